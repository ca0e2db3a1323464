//! Regions and the link between them, on real processes: how a node sees the other
//! regions (`GET /v1/regions`, `rampart regions`, unreachable after `region_timeout` and
//! back, with events); the region log; a standby that follows the primary under writes
//! (revisions, checksum, the history checker), refuses its own writes, lags and catches up
//! when killed and restarted; and a link that goes on when either region's leader is
//! killed mid-stream.

use std::path::Path;

use rampart_core::api::{RegionStatus, RegionsResponse};
use rampart_testkit::{eventually, free_port, Cluster, ClusterOptions, RegionSpec, Regions, RegionsOptions};

use crate::{binary, DEADLINE};

/// A region `name` of one node per address in `addrs` that knows region `other` at
/// `other_addrs`; "east" is the primary.
async fn region(
    dir: &Path,
    name: &str,
    addrs: &[std::net::SocketAddr],
    other: &str,
    other_addrs: &[std::net::SocketAddr],
) -> Cluster {
    region_with(dir, name, addrs, other, other_addrs, &[]).await
}

/// [`region`] with `extra` flags for its nodes.
async fn region_with(
    dir: &Path,
    name: &str,
    addrs: &[std::net::SocketAddr],
    other: &str,
    other_addrs: &[std::net::SocketAddr],
    extra: &[&str],
) -> Cluster {
    let config = dir.join(format!("{name}.toml"));
    let endpoints: Vec<String> = other_addrs.iter().map(|a| format!("\"{a}\"")).collect();
    let text = format!(
        "[regions]\nprimary = \"east\"\nhealth_check_interval = \"100ms\"\nregion_timeout = \"500ms\"\nmax_lag = \"1s\"\nverify_interval = \"1s\"\n\
         [regions.known.{other}]\nendpoints = [{}]\n",
        endpoints.join(", ")
    );
    std::fs::write(&config, text).expect("config");
    let options = ClusterOptions {
        nodes: addrs.len(),
        addresses: addrs.to_vec(),
        node_args: ["--region", name, "--config", config.to_str().expect("utf-8")]
            .iter()
            .chain(extra)
            .map(|a| a.to_string())
            .collect(),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(binary(), options).await.expect("start");
    cluster.wait_for_leader(DEADLINE).await;
    cluster
}

/// The text of a metrics endpoint.
async fn scrape(url: &str) -> String {
    let answer = reqwest::get(url).await.expect("scrape");
    answer.text().await.expect("metrics text")
}

fn other(regions: &RegionsResponse) -> &RegionStatus {
    regions
        .regions
        .iter()
        .find(|r| !r.this_region)
        .expect("the other region")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_region_is_reported_unreachable_after_the_timeout_and_back_when_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (east_addr, west_addr) = (free_port().expect("port"), free_port().expect("port"));
    let mut east = region(dir.path(), "east", &[east_addr], "west", &[west_addr]).await;
    let west = region(dir.path(), "west", &[west_addr], "east", &[east_addr]).await;
    east.client()
        .put("regions/k", "v", rampart_client::PutOptions::default())
        .await
        .expect("put");
    let east_now = east.client().cluster().await.expect("status");

    let client = west.client();
    let seen = eventually(DEADLINE, "west to see east's revision", || async {
        let regions = client.regions().await.ok()?;
        let east = other(&regions);
        (east.reachable && east.revision == Some(east_now.revision)).then_some(regions)
    })
    .await;
    assert_eq!((seen.region.as_str(), seen.primary.as_str()), ("west", "east"));
    let (own, east_seen) = (&seen.regions[0], other(&seen));
    assert!(own.this_region && own.role == "standby" && own.name == "west");
    assert_eq!(
        (east_seen.name.as_str(), east_seen.role.as_str(), east_seen.epoch),
        ("east", "primary", 1)
    );
    assert_eq!(east_seen.checksum.as_deref(), Some(east_now.checksum.as_str()));
    assert_eq!(east_seen.endpoints, vec![east_addr.to_string()]);

    east.kill(1);
    eventually(DEADLINE, "west to report east unreachable", || async {
        let regions = client.regions().await.ok()?;
        (!other(&regions).reachable).then_some(())
    })
    .await;
    let event = |action: &'static str| {
        let client = &client;
        async move {
            let events = client.events(Some("region"), None).await.ok()?;
            events.events.into_iter().find(|e| e.action == action)
        }
    };
    let lost = eventually(DEADLINE, "a region.unreachable event", || event("region.unreachable")).await;
    assert!(lost.detail.contains("east: no answer for 500ms"), "{}", lost.detail);

    east.restart(1).expect("restart east");
    eventually(DEADLINE, "west to see east again", || async {
        let regions = client.regions().await.ok()?;
        other(&regions).reachable.then_some(())
    })
    .await;
    eventually(DEADLINE, "a region.reachable event", || event("region.reachable")).await;

    // The CLI prints the same, as a table or as JSON.
    let endpoints = format!("--endpoints={west_addr}");
    let (code, out, err) = crate::cli::run(&[&endpoints, "regions"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("seen from region west (primary east)") && out.contains("east  primary  1  yes"),
        "{out}"
    );
    let (code, out, err) = crate::cli::run(&[&endpoints, "regions", "--output", "json"]);
    assert_eq!(code, 0, "{err}");
    let parsed: RegionsResponse = serde_json::from_str(&out).expect("json");
    assert_eq!(parsed.regions.len(), 2);
}

/// Reads newline-delimited JSON writes from `response` until `count` of them arrived
/// (skipping keep-alive empty lines), within the deadline.
async fn read_writes(response: &mut reqwest::Response, buffer: &mut Vec<u8>, count: usize) -> Vec<serde_json::Value> {
    let mut writes = Vec::new();
    tokio::time::timeout(DEADLINE, async {
        while writes.len() < count {
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                if line.len() > 1 {
                    writes.push(serde_json::from_slice(&line).expect("a JSON write"));
                }
            }
            if writes.len() >= count {
                break;
            }
            let chunk = response
                .chunk()
                .await
                .expect("read the stream")
                .expect("the stream goes on");
            buffer.extend_from_slice(&chunk);
        }
    })
    .await
    .expect("the writes within the deadline");
    writes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_region_log_replays_the_shipped_writes_then_follows_them_live() {
    let options = ClusterOptions {
        nodes: 1,
        node_args: vec!["--watch-history".into(), "10".into()],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(binary(), options).await.expect("start");
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    for key in ["a", "b", "c"] {
        client
            .put(&format!("log/{key}"), key, rampart_client::PutOptions::default())
            .await
            .expect("put");
    }
    let status = client.cluster().await.expect("status");
    let url = format!("http://{}/v1/regions/log?from_revision=1", cluster.endpoints()[0]);
    let mut response = reqwest::get(&url).await.expect("open the log");
    assert_eq!(response.status(), 200);
    let mut buffer = Vec::new();
    let replayed = read_writes(&mut response, &mut buffer, status.revision as usize).await;
    let revisions: Vec<u64> = replayed
        .iter()
        .map(|w| w["revision"].as_u64().expect("revision"))
        .collect();
    assert_eq!(
        revisions,
        (1..=status.revision).collect::<Vec<_>>(),
        "every shipped revision, in order"
    );
    assert_eq!(
        replayed.last().expect("a write")["command"]["op"]["Put"]["key"],
        "log/c"
    );

    client
        .put("log/d", "d", rampart_client::PutOptions::default())
        .await
        .expect("put");
    let live = read_writes(&mut response, &mut buffer, 1).await;
    assert_eq!(live[0]["revision"].as_u64(), Some(status.revision + 1));
    assert_eq!(live[0]["command"]["op"]["Put"]["key"], "log/d");

    // Past what the node keeps (10 writes here): 410, start from a snapshot.
    for i in 0..12 {
        client
            .put(&format!("log/more{i}"), "v", rampart_client::PutOptions::default())
            .await
            .expect("put");
    }
    let gone = reqwest::get(&url).await.expect("ask again");
    assert_eq!(gone.status(), 410);
    let body: serde_json::Value = gone.json().await.expect("json");
    assert_eq!(body["error"]["code"], "compacted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_follows_the_primary_under_writes_and_refuses_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (east_addr, west_addr) = (free_port().expect("port"), free_port().expect("port"));
    let east = region(dir.path(), "east", &[east_addr], "west", &[west_addr]).await;
    let mut west = region(dir.path(), "west", &[west_addr], "east", &[east_addr]).await;
    let writer = std::sync::Arc::new(east.client());
    let workload = rampart_testkit::Workload::start(writer.clone(), 4, "link/");
    workload.wait_progress(200, DEADLINE).await;
    let history = workload.stop().await;
    assert!(history.acknowledged() >= 200);

    let standby = west.client();
    let revision = wait_caught_up(&east.client(), &standby).await;

    // Every revision of the primary, in order, no gap and no repeat: the standby's own log.
    let url = format!("http://{west_addr}/v1/regions/log?from_revision=1");
    let mut response = reqwest::get(&url).await.expect("the standby's log");
    let mut buffer = Vec::new();
    let writes = read_writes(&mut response, &mut buffer, revision as usize).await;
    let revisions: Vec<u64> = writes
        .iter()
        .map(|w| w["revision"].as_u64().expect("revision"))
        .collect();
    assert_eq!(revisions, (1..=revision).collect::<Vec<_>>());

    // Its reads hold every write the primary acknowledged; its writes are refused, naming
    // the primary.
    let state = rampart_testkit::final_state(&standby, "link/").await;
    let lost = history.lost_acknowledged_writes(&state);
    assert!(
        lost.is_empty(),
        "{} acknowledged writes missing on the standby",
        lost.len()
    );
    // A read says the revision it reflects.
    let key = state.keys().next().expect("a key").clone();
    let read = reqwest::get(format!("http://{west_addr}/v1/kv/{key}"))
        .await
        .expect("read");
    assert_eq!(read.status(), 200);
    assert_eq!(
        read.headers()["x-rampart-revision"].to_str().ok(),
        Some(revision.to_string().as_str())
    );
    assert_eq!(
        read.headers()["x-rampart-epoch"].to_str().ok(),
        Some("1"),
        "the answering region's epoch"
    );
    match standby
        .put("link/mine", "no", rampart_client::PutOptions::default())
        .await
    {
        Err(e) => {
            assert_eq!(e.code(), Some("read_only_region"), "{e}");
            assert!(e.to_string().contains("primary region east"), "{e}");
        }
        Ok(_) => panic!("a standby took a write"),
    }
    // A client given both regions' endpoints, the standby's first, gets its write done.
    let both = rampart_client::Client::new(&[west_addr.to_string(), east_addr.to_string()]).expect("client");
    both.put("link/both", "yes", rampart_client::PutOptions::default())
        .await
        .expect("the write finds the primary region");
    let landed = east.client().get_key("link/both", false).await.expect("get");
    assert_eq!(landed.map(|kv| kv.value), Some("yes".to_string()));

    // Lag, seen from the primary: none once caught up, and /health/regions says so.
    let primary_view = east.client();
    let west_seen = |regions: RegionsResponse| other(&regions).clone();
    eventually(DEADLINE, "the primary to see the standby caught up", || async {
        let west = west_seen(primary_view.regions().await.ok()?);
        (west.lag_revisions == Some(0) && west.lag_ms == Some(0)).then_some(())
    })
    .await;
    let health = format!("http://{east_addr}/health/regions");
    assert_eq!(reqwest::get(&health).await.expect("health").status(), 200);

    // The standby's node is killed; the primary goes on writing: the lag grows, in
    // revisions, bytes and ms, and the region is unhealthy.
    west.kill(1);
    for i in 0..5 {
        writer
            .put(&format!("link/later{i}"), "v", rampart_client::PutOptions::default())
            .await
            .expect("put");
    }
    let lagging = eventually(DEADLINE, "the primary to see the standby behind and gone", || async {
        let west = west_seen(primary_view.regions().await.ok()?);
        (!west.reachable && west.lag_revisions >= Some(5) && west.lag_ms > Some(0)).then_some(west)
    })
    .await;
    assert!(lagging.lag_bytes > Some(0), "{lagging:?}");
    let answer = reqwest::get(&health).await.expect("health");
    assert_eq!(answer.status(), 503);
    let body: serde_json::Value = answer.json().await.expect("json");
    assert!(body["problems"].to_string().contains("west: unreachable"), "{body}");
    let events = |action: &'static str| {
        let client = &primary_view;
        async move {
            let events = client.events(Some("region"), None).await.ok()?;
            events.events.into_iter().find(|e| e.action == action)
        }
    };
    let lagging = eventually(DEADLINE, "a region.lagging event past max_lag", || {
        events("region.lagging")
    })
    .await;
    assert!(
        lagging.detail.contains("west: ") && lagging.detail.contains("regions.max_lag 1000ms"),
        "{}",
        lagging.detail
    );

    // Back: the link resumes from the standby's own revision and catches up.
    west.restart(1).expect("restart the standby");
    let revision = east.client().cluster().await.expect("status").revision;
    eventually(DEADLINE, "the standby caught up again", || async {
        let west = west_seen(primary_view.regions().await.ok()?);
        (west.reachable && west.lag_revisions == Some(0) && west.revision == Some(revision)).then_some(())
    })
    .await;
    assert_eq!(reqwest::get(&health).await.expect("health").status(), 200);
    eventually(DEADLINE, "a region.caught_up event", || events("region.caught_up")).await;
    let metrics = scrape(&format!("http://{east_addr}/metrics/regions")).await;
    assert!(
        metrics.contains("rampart_region_lag_revisions{region=\"west\"} 0"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("rampart_raft_term"),
        "only the region series: {metrics}"
    );
    let ha = scrape(&format!("http://{east_addr}/metrics/ha")).await;
    assert!(
        ha.contains("rampart_raft_term ") && ha.contains("rampart_is_leader 1") && !ha.contains("rampart_region_"),
        "{ha}"
    );
    assert!(
        metrics.contains("rampart_region_reachable{region=\"west\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_link_goes_on_when_either_regions_leader_is_killed_mid_stream() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ports = |n| (0..n).map(|_| free_port().expect("port")).collect::<Vec<_>>();
    let (east_addrs, west_addrs) = (ports(3), ports(3));
    let mut east = region(dir.path(), "east", &east_addrs, "west", &west_addrs).await;
    let mut west = region(dir.path(), "west", &west_addrs, "east", &east_addrs).await;
    let standby = west.client();
    let workload = rampart_testkit::Workload::start(std::sync::Arc::new(east.client()), 4, "mid/");
    workload.wait_progress(100, DEADLINE).await;
    eventually(DEADLINE, "the standby to follow", || async {
        let status = standby.cluster().await.ok()?;
        (status.revision > 0).then_some(())
    })
    .await;

    // The primary region's leader dies mid-stream; then the standby region's.
    let leader = east.wait_for_leader(DEADLINE).await;
    east.kill(leader);
    workload.wait_progress(100, DEADLINE).await;
    let leader = west.wait_for_leader(DEADLINE).await;
    west.kill(leader);
    workload.wait_progress(100, DEADLINE).await;
    let history = workload.stop().await;

    let (revision, checksum) = east.wait_converged(DEADLINE).await;
    eventually(DEADLINE, "the standby at the primary's revision", || async {
        let status = standby.cluster().await.ok()?;
        (status.revision == revision).then_some(())
    })
    .await;
    assert_eq!(standby.cluster().await.expect("status").checksum, checksum);
    let state = rampart_testkit::final_state(&standby, "mid/").await;
    let lost = history.lost_acknowledged_writes(&state);
    assert!(
        lost.is_empty(),
        "{} acknowledged writes missing on the standby",
        lost.len()
    );

    // No gap, no repeat: a surviving standby node's own log holds every revision once.
    let survivor = west
        .nodes
        .values()
        .find(|n| n.is_running())
        .map(|n| n.addr)
        .expect("a running standby node");
    let url = format!("http://{survivor}/v1/regions/log?from_revision=1");
    let mut response = reqwest::get(&url).await.expect("the standby's log");
    let mut buffer = Vec::new();
    let writes = read_writes(&mut response, &mut buffer, revision as usize).await;
    let revisions: Vec<u64> = writes
        .iter()
        .map(|w| w["revision"].as_u64().expect("revision"))
        .collect();
    assert_eq!(revisions, (1..=revision).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupted_standby_is_found_by_verification() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (east_addr, west_addr) = (free_port().expect("port"), free_port().expect("port"));
    let east = region(dir.path(), "east", &[east_addr], "west", &[west_addr]).await;
    let extra = ["--snapshot-logs", "10"];
    let mut west = region_with(dir.path(), "west", &[west_addr], "east", &[east_addr], &extra).await;
    let writer = east.client();
    let marked = "AAAAAAAAAAAAAAAA";
    writer
        .put("verify/x", marked, rampart_client::PutOptions::default())
        .await
        .expect("put");
    for i in 0..30 {
        writer
            .put(&format!("verify/n{i}"), "v", rampart_client::PutOptions::default())
            .await
            .expect("put");
    }
    let standby = west.client();
    let own = |regions: RegionsResponse| regions.regions[0].clone();
    eventually(DEADLINE, "the standby verified equal to the primary", || async {
        let own = own(standby.regions().await.ok()?);
        (own.checksum_match == Some(true)).then_some(())
    })
    .await;
    let health = format!("http://{west_addr}/health/regions");
    assert_eq!(reqwest::get(&health).await.expect("health").status(), 200);
    // On demand, asked of the primary: every standby compares now.
    let east_endpoint = format!("--endpoints={east_addr}");
    let (code, out, err) = crate::cli::run(&[&east_endpoint, "regions", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("west: equal to the primary at revision"), "{out}");

    // Offline, one value in the standby's snapshot is changed (same length, still decodes).
    let data_dir = west.nodes[&1].data_dir.clone();
    west.kill(1);
    let snapshot = data_dir.join("snapshot.bin");
    let mut bytes = std::fs::read(&snapshot).expect("the standby's snapshot");
    let at = bytes
        .windows(marked.len())
        .position(|w| w == marked.as_bytes())
        .expect("the value in the snapshot");
    bytes[at..at + marked.len()].copy_from_slice(b"BBBBBBBBBBBBBBBB");
    std::fs::write(&snapshot, bytes).expect("write the snapshot");
    west.restart(1).expect("restart the standby");
    writer
        .put("verify/after", "v", rampart_client::PutOptions::default())
        .await
        .expect("put");

    let suspect = eventually(DEADLINE, "the verification to find the mismatch", || async {
        let own = own(standby.regions().await.ok()?);
        (own.checksum_match == Some(false)).then_some(own)
    })
    .await;
    assert!(
        suspect.verified_revision > Some(0) && suspect.verified_ms.is_some(),
        "{suspect:?}"
    );
    let event = eventually(DEADLINE, "a region.checksum_mismatch event", || async {
        let events = standby.events(Some("region"), None).await.ok()?;
        events
            .events
            .into_iter()
            .find(|e| e.action == "region.checksum_mismatch")
    })
    .await;
    assert!(event.detail.contains("its reads are suspect"), "{}", event.detail);
    let answer = reqwest::get(&health).await.expect("health");
    assert_eq!(answer.status(), 503);
    let body: serde_json::Value = answer.json().await.expect("json");
    assert!(body["problems"].to_string().contains("reads are suspect"), "{body}");
    // On demand, from either region, the difference is found again: exit 1.
    for endpoint in [format!("--endpoints={west_addr}"), east_endpoint] {
        let (code, out, err) = crate::cli::run(&[&endpoint, "regions", "verify"]);
        assert_eq!(code, 1, "{out}{err}");
        assert!(out.contains("west: DIFFERS from the primary at revision"), "{out}");
    }
    let metrics = scrape(&format!("http://{west_addr}/metrics/regions")).await;
    assert!(
        metrics.contains("rampart_region_checksum_mismatches_total{region=\"west\"} 1"),
        "{metrics}"
    );
}

/// Two one-node regions, "east" primary, with a relay on the link between them.
async fn linked_regions(east_args: &[&str]) -> Regions {
    let settings = [
        "health_check_interval = \"100ms\"",
        "region_timeout = \"500ms\"",
        "max_lag = \"1s\"",
        "verify_interval = \"1s\"",
    ];
    let mut east = RegionSpec::new("east", 1);
    east.node_args = east_args.iter().map(|a| a.to_string()).collect();
    let options = RegionsOptions {
        primary: "east".into(),
        regions: vec![east, RegionSpec::new("west", 1)],
        settings: settings.iter().map(|s| s.to_string()).collect(),
        tls: false,
    };
    let regions = Regions::start(binary(), options).await.expect("start the regions");
    regions.wait_for_leaders(DEADLINE).await;
    regions
}

/// The first region event of kind `action` `client` lists, if any.
async fn event(client: &rampart_client::Client, action: &str) -> Option<rampart_core::api::Event> {
    let events = client.events(Some("region"), None).await.ok()?;
    events.events.into_iter().find(|e| e.action == action)
}

/// Waits until `standby` is at the primary's revision with the primary's checksum.
async fn wait_caught_up(primary: &rampart_client::Client, standby: &rampart_client::Client) -> u64 {
    let status = primary.cluster().await.expect("the primary's status");
    eventually(DEADLINE, "the standby at the primary's revision", || async {
        let own = standby.cluster().await.ok()?;
        (own.revision == status.revision).then_some(())
    })
    .await;
    let own = standby.cluster().await.expect("the standby's status");
    assert_eq!(
        own.checksum, status.checksum,
        "the standby's shipped state is the primary's"
    );
    status.revision
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_link_grows_the_lag_raises_unreachable_and_recovers_when_healed() {
    let regions = linked_regions(&[]).await;
    let (primary, standby) = (regions.client("east"), regions.client("west"));
    primary
        .put("cut/first", "v", rampart_client::PutOptions::default())
        .await
        .expect("put");
    let before = wait_caught_up(&primary, &standby).await;
    eventually(DEADLINE, "the primary to see the standby caught up", || async {
        let west = other(&primary.regions().await.ok()?).clone();
        (west.revision == Some(before)).then_some(())
    })
    .await;

    regions.cut("east", "west");
    for i in 0..10 {
        primary
            .put(&format!("cut/during{i}"), "v", rampart_client::PutOptions::default())
            .await
            .expect("the primary writes with its standby cut off");
    }
    let behind = eventually(
        DEADLINE,
        "the primary to see the standby cut off and behind",
        || async {
            let west = other(&primary.regions().await.ok()?).clone();
            (!west.reachable && west.lag_revisions >= Some(10) && west.revision == Some(before)).then_some(west)
        },
    )
    .await;
    assert!(behind.lag_bytes > Some(0) && behind.lag_ms > Some(0), "{behind:?}");
    let grown = eventually(DEADLINE, "the lag in ms to grow while cut", || async {
        let west = other(&primary.regions().await.ok()?).clone();
        (west.lag_ms > behind.lag_ms).then_some(west)
    })
    .await;
    assert_eq!(
        grown.lag_revisions, behind.lag_revisions,
        "no write reached the standby"
    );
    let lost = eventually(DEADLINE, "region.unreachable on the primary", || {
        event(&primary, "region.unreachable")
    })
    .await;
    assert!(lost.detail.contains("west: no answer for 500ms"), "{}", lost.detail);
    eventually(DEADLINE, "region.unreachable on the standby", || {
        event(&standby, "region.unreachable")
    })
    .await;
    assert_eq!(
        standby.cluster().await.expect("status").revision,
        before,
        "the standby moved while cut off"
    );

    regions.heal("east", "west");
    let revision = wait_caught_up(&primary, &standby).await;
    eventually(
        DEADLINE,
        "the primary to see the standby back and caught up",
        || async {
            let west = other(&primary.regions().await.ok()?).clone();
            (west.reachable && west.lag_revisions == Some(0) && west.revision == Some(revision)).then_some(())
        },
    )
    .await;
    eventually(DEADLINE, "region.reachable on the primary", || {
        event(&primary, "region.reachable")
    })
    .await;
    let health = format!("http://{}/health/regions", regions.region("east").endpoints()[0]);
    eventually(DEADLINE, "/health/regions to be 200 again", || async {
        let status = reqwest::get(&health).await.ok()?.status();
        (status == 200).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_cut_off_past_the_primarys_history_installs_its_state_and_goes_on() {
    // The primary keeps its last 20 shipped writes for links that resume.
    let regions = linked_regions(&["--watch-history", "20"]).await;
    let (primary, standby) = (regions.client("east"), regions.client("west"));
    let writer = std::sync::Arc::new(regions.client("east"));
    let workload = rampart_testkit::Workload::start(writer, 4, "far/");
    workload.wait_progress(50, DEADLINE).await;
    let before = standby.cluster().await.expect("status").revision;

    regions.cut("east", "west");
    workload.wait_progress(100, DEADLINE).await;
    let cut_at = primary.cluster().await.expect("status").revision;
    assert!(cut_at > before + 20, "the primary's history moved past the standby");
    regions.heal("east", "west");
    workload.wait_progress(100, DEADLINE).await;
    let history = workload.stop().await;

    let revision = wait_caught_up(&primary, &standby).await;
    let state = rampart_testkit::final_state(&standby, "far/").await;
    let lost = history.lost_acknowledged_writes(&state);
    assert!(
        lost.is_empty(),
        "{} acknowledged writes missing on the standby",
        lost.len()
    );
    // The install was checked against the primary's checksum at its revision.
    let own = eventually(DEADLINE, "the standby verified after its install", || async {
        let regions = standby.regions().await.ok()?;
        let own = regions.regions[0].clone();
        (own.checksum_match == Some(true) && own.verified_revision > Some(before)).then_some(own)
    })
    .await;
    assert!(own.verified_revision <= Some(revision), "{own:?}");
    let log = std::fs::read_to_string(regions.region("west").log_path(1)).expect("the standby's log");
    assert!(
        log.contains("installing the primary region's shipped state"),
        "the standby went through an install"
    );

    // After the install the standby's own log goes on without a gap or a repeat: it starts
    // at the installed revision.
    let west = regions.region("west").endpoints()[0].clone();
    let gone = reqwest::get(format!("http://{west}/v1/regions/log?from_revision=1"))
        .await
        .expect("the standby's log");
    assert_eq!(gone.status(), 410);
    let body: serde_json::Value = gone.json().await.expect("json");
    let installed = body["error"]["current"]["compact_revision"]
        .as_u64()
        .expect("compact_revision");
    assert!(installed > before && installed <= revision, "{body}");
    let url = format!("http://{west}/v1/regions/log?from_revision={}", installed + 1);
    let mut response = reqwest::get(&url).await.expect("the standby's log");
    assert_eq!(response.status(), 200);
    let mut buffer = Vec::new();
    let writes = read_writes(&mut response, &mut buffer, (revision - installed) as usize).await;
    let revisions: Vec<u64> = writes
        .iter()
        .map(|w| w["revision"].as_u64().expect("revision"))
        .collect();
    assert_eq!(revisions, (installed + 1..=revision).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_region_link_is_mutual_tls_and_a_node_of_another_ca_cannot_open_it() {
    let options = RegionsOptions {
        primary: "east".into(),
        regions: vec![RegionSpec::new("east", 1), RegionSpec::new("west", 1)],
        settings: vec![
            "health_check_interval = \"100ms\"".into(),
            "region_timeout = \"500ms\"".into(),
        ],
        tls: true,
    };
    let regions = Regions::start(binary(), options).await.expect("start the regions");
    regions.wait_for_leaders(DEADLINE).await;
    let east = regions.region("east");
    let primary = regions.client("east");
    primary
        .put("tls/k", "v", rampart_client::PutOptions::default())
        .await
        .expect("put");
    // The standby follows over mutual TLS, tokens included: the primary's admin token
    // works there.
    wait_caught_up(&primary, &regions.client("west")).await;

    // The log is a region link's alone: an admin with a token, on plain HTTPS, is refused.
    let east_addr = east.endpoints()[0].clone();
    let ca = std::fs::read(east.certs_dir().join("ca.pem")).expect("ca.pem");
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA"))
        .build()
        .expect("client");
    let answer = https
        .get(format!("https://{east_addr}/v1/regions/log?from_revision=1"))
        .bearer_auth(east.admin_token().expect("token"))
        .send()
        .await
        .expect("ask");
    assert_eq!(answer.status(), 403);
    let body: serde_json::Value = answer.json().await.expect("json");
    assert_eq!(body["error"]["code"], "region_link_only", "{body}");

    // A node whose certificate comes from another CA (trusting ours, so only its own
    // certificate is wrong) cannot open the link: the primary refuses the handshake, and
    // the rogue standby never gets a revision.
    let rogue = tempfile::tempdir().expect("tempdir");
    let certs = rogue.path().join("certs");
    let (code, _, err) = crate::cli::run(&["certs", "init", "--dir", certs.to_str().expect("utf-8"), "--nodes", "1"]);
    assert_eq!(code, 0, "{err}");
    let bundle = rogue.path().join("both-cas.pem");
    let mut both = std::fs::read(certs.join("ca.pem")).expect("rogue CA");
    both.extend_from_slice(&ca);
    std::fs::write(&bundle, both).expect("bundle");
    let config = rogue.path().join("rogue.toml");
    std::fs::write(
        &config,
        format!(
            "[regions]\nprimary = \"east\"\nhealth_check_interval = \"100ms\"\nregion_timeout = \"500ms\"\n\
             [regions.known.east]\nendpoints = [\"{east_addr}\"]\n"
        ),
    )
    .expect("config");
    let path = |p: std::path::PathBuf| p.display().to_string();
    let node_args = vec![
        "--region".into(),
        "rogue".into(),
        "--config".into(),
        path(config),
        "--tls-cert".into(),
        path(certs.join("node-1.pem")),
        "--tls-key".into(),
        path(certs.join("node-1-key.pem")),
        "--tls-ca".into(),
        path(bundle.clone()),
    ];
    let options = ClusterOptions {
        nodes: 1,
        node_args,
        base_dir: Some(rogue.path().join("data")),
        ..ClusterOptions::default()
    };
    let refused = |m: &str| crate::security::counter(m, "tls_handshake");
    let before = refused(&crate::security::metrics_of(east, 1).await);
    let rogue_region = Cluster::start(binary(), options).await.expect("start the rogue node");
    eventually(DEADLINE, "the primary to refuse the rogue's handshakes", || async {
        let now = refused(&crate::security::metrics_of(east, 1).await);
        (now >= before + 3).then_some(())
    })
    .await;
    // Its own node certificate lets us ask it (break glass): it never followed.
    let tls = rampart_client::TlsOptions {
        ca: bundle,
        cert: Some(certs.join("node-1.pem")),
        key: Some(certs.join("node-1-key.pem")),
    };
    let rogue_client = rampart_client::Client::secured(&rogue_region.endpoints(), Some(&tls), None).expect("client");
    let seen = rogue_client.regions().await.expect("the rogue's view");
    assert!(!other(&seen).reachable, "{seen:?}");
    assert_eq!(rogue_client.cluster().await.expect("status").revision, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_witness_keeps_no_data_answers_region_health_and_is_watched() {
    let settings = ["health_check_interval = \"100ms\"", "region_timeout = \"500ms\""];
    let mut regions = crate::region_failover::east_west_judge_with(1, &settings).await;
    let (primary, witness) = (regions.client("east"), regions.client("judge"));
    primary
        .put("judge/k", "v", rampart_client::PutOptions::default())
        .await
        .expect("put");
    let status = witness.cluster().await.expect("the witness's status");
    assert!(status.witness && status.revision == 0, "{status:?}");

    // The witness sees the other regions, and they see it, as a witness.
    let seen = eventually(DEADLINE, "the witness to see both regions", || async {
        let seen = witness.regions().await.ok()?;
        seen.regions.iter().all(|r| r.reachable).then_some(seen)
    })
    .await;
    let roles: Vec<(&str, &str)> = seen
        .regions
        .iter()
        .map(|r| (r.name.as_str(), r.role.as_str()))
        .collect();
    assert_eq!(roles, [("judge", "witness"), ("east", "primary"), ("west", "standby")]);
    let judge_of = |view: &RegionsResponse| view.regions.iter().find(|r| r.name == "judge").cloned();
    let judge = eventually(DEADLINE, "the primary to see the witness", || async {
        judge_of(&primary.regions().await.ok()?).filter(|j| j.reachable)
    })
    .await;
    assert_eq!(judge.role, "witness");
    assert_eq!(judge.lag_revisions, None, "a witness has no data to lag");
    wait_caught_up(&primary, &regions.client("west")).await;
    let witness_dir = regions.region("judge").nodes[&1].data_dir.clone();
    assert!(!witness_dir.join("rampart.redb").exists(), "a witness keeps no data");

    // Gone: the primary reports it unreachable, in /health/regions and as an event.
    regions.region_mut("judge").kill(1);
    eventually(DEADLINE, "region.unreachable for the witness", || async {
        let lost = event(&primary, "region.unreachable").await?;
        lost.detail.contains("judge: no answer").then_some(())
    })
    .await;
    let health = format!("http://{}/health/regions", regions.region("east").endpoints()[0]);
    let body: serde_json::Value = reqwest::get(&health).await.expect("health").json().await.expect("json");
    assert!(body["problems"].to_string().contains("judge: unreachable"), "{body}");
}

/// A TCP endpoint that accepts connections until dropped (a live instance for `tcp` checks).
pub async fn live_endpoint() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let task = tokio::spawn(async move { while listener.accept().await.is_ok() {} });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_in_a_standby_region_is_watched_there_and_never_promoted_by_the_primary() {
    use rampart_core::failover::Refusal;
    use rampart_core::health::Health;
    use rampart_core::service::{InstanceRole, InstanceSpec, PolicySpec};
    let regions = linked_regions(&[]).await;
    let (primary, standby) = (regions.client("east"), regions.client("west"));
    let (near, near_task) = live_endpoint().await;
    let (far, _far_task) = live_endpoint().await;
    let policy: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "tcp", "interval": "100ms", "timeout": "100ms", "rise": 1, "fall": 2}],
    }))
    .expect("policy");
    primary.service_put("db", &policy).await.expect("service");
    // The standby-region instance has the higher priority: only its region keeps it out.
    for (id, endpoint, region, priority) in [("near", &near, "east", 100), ("far", &far, "west", 1000)] {
        let spec = InstanceSpec {
            endpoint: endpoint.clone(),
            region: Some(region.into()),
            priority: Some(priority),
            node: Some(1),
            ..InstanceSpec::default()
        };
        primary.instance_put("db", id, &spec).await.expect("instance");
    }

    // A switchover to the standby-region instance is refused, naming why; to the primary
    // region's own, done.
    eventually(DEADLINE, "the primary region to judge its own instance up", || async {
        let view = primary.service("db").await.ok()?;
        let near = view.instances.iter().find(|i| i.id == "near")?;
        (near.health == Health::Up).then_some(())
    })
    .await;
    let refused = primary
        .switchover("db", "far")
        .await
        .expect_err("not to a standby region");
    assert!(
        refused.to_string().contains("in_standby_region") || refused.to_string().contains("standby region"),
        "{refused}"
    );
    primary.switchover("db", "near").await.expect("switchover to near");
    let promoted = primary.service("db").await.expect("view");
    assert_eq!(promoted.primary.as_deref(), Some("near"));
    let far_seen = promoted.instances.iter().find(|i| i.id == "far").expect("far");
    assert_eq!(
        (far_seen.region.as_str(), far_seen.role),
        ("west", InstanceRole::Standby)
    );
    assert_eq!(far_seen.health, Health::Unknown, "the primary region does not probe it");
    let report = primary.eligibility("db").await.expect("eligibility");
    let far_entry = report.instances.iter().find(|e| e.id == "far").expect("far");
    assert_eq!(far_entry.rank, None);
    assert!(far_entry.reasons.contains(&Refusal::InStandbyRegion), "{far_entry:?}");
    let json = serde_json::to_string(&report).expect("json");
    assert!(json.contains("\"reason\":\"in_standby_region\""), "{json}");

    // The standby region watches its own instance (its verdicts are its own) and not the
    // primary region's.
    let seen = eventually(DEADLINE, "the standby region to judge its own instance up", || async {
        let view = standby.service("db").await.ok()?;
        let far = view.instances.iter().find(|i| i.id == "far")?.clone();
        (far.health == Health::Up).then_some(view)
    })
    .await;
    let near_there = seen.instances.iter().find(|i| i.id == "near").expect("near");
    assert_eq!(near_there.health, Health::Unknown, "{seen:?}");
    assert_eq!(seen.primary.as_deref(), Some("near"), "roles are shipped");
    // And the primary region still has no verdict of its own on it.
    let view = primary.service("db").await.expect("view");
    let far_here = view.instances.iter().find(|i| i.id == "far").expect("far");
    assert_eq!(far_here.health, Health::Unknown);

    // The primary region's instance dies: the failover finds nobody to promote, though the
    // standby region's instance is up there, and says so.
    near_task.abort();
    let blocked = eventually(DEADLINE, "a failover.blocked event", || async {
        let events = primary.events(Some("failover"), None).await.ok()?;
        events.events.into_iter().find(|e| e.action == "failover.blocked")
    })
    .await;
    assert!(blocked.detail.contains("far"), "{}", blocked.detail);
    let view = primary.service("db").await.expect("view");
    assert_ne!(view.primary.as_deref(), Some("far"));
}
