//! Region failover on real processes (safety rules 5 and 7): the whole primary region lost,
//! a standby promoted by a majority's votes after the old lease ran out, the failover
//! recorded with its timings and RPO; the old primary coming back follows the new one, and
//! sets aside the writes it never shipped in a divergence file before it resyncs.

use std::time::Duration;

use rampart_client::{Client, PutOptions};
use rampart_testkit::{eventually, RegionSpec, Regions, RegionsOptions};

use crate::{binary, DEADLINE};

/// The short timings under `[regions]` the tests run with.
const FAST: [&str; 3] = [
    "health_check_interval = \"100ms\"",
    "region_timeout = \"500ms\"",
    "region_lease = \"1s\"",
];

/// `FAST` and `extra` as `[regions]` lines.
fn fast_with(extra: &[&str]) -> Vec<String> {
    FAST.iter().chain(extra).map(|s| s.to_string()).collect()
}

/// East (primary) and west of one node each and the witness "judge", with short timings
/// and `extra` lines under `[regions]`; automatic failover unless they say otherwise.
pub(crate) async fn east_west_judge(extra: &[&str]) -> Regions {
    let mut settings = FAST.to_vec();
    settings.extend(extra);
    east_west_judge_with(1, &settings).await
}

/// East (one node, primary), west of `west_nodes` and the witness "judge", with these
/// lines under `[regions]`.
pub(crate) async fn east_west_judge_with(west_nodes: usize, settings: &[&str]) -> Regions {
    let options = RegionsOptions {
        primary: "east".into(),
        regions: vec![
            RegionSpec::new("east", 1),
            RegionSpec::new("west", west_nodes),
            RegionSpec::witness("judge"),
        ],
        settings: settings.iter().map(|s| s.to_string()).collect(),
        tls: false,
    };
    let regions = Regions::start(binary(), options).await.expect("start the regions");
    regions.wait_for_leaders(DEADLINE).await;
    regions
}

/// East (primary) and west of one node each, without a witness, with the short timings.
async fn east_west() -> Regions {
    let options = RegionsOptions {
        primary: "east".into(),
        regions: vec![RegionSpec::new("east", 1), RegionSpec::new("west", 1)],
        settings: fast_with(&[]),
        tls: false,
    };
    let regions = Regions::start(binary(), options).await.expect("start the regions");
    regions.wait_for_leaders(DEADLINE).await;
    regions
}

async fn three_regions() -> Regions {
    east_west_judge(&[]).await
}

/// Waits until the region `client` asks judges instance `id` of "db" up.
async fn judged_up(client: &Client, id: &str) {
    eventually(DEADLINE, &format!("{id} judged up in its region"), || async {
        let view = client.service("db").await.ok()?;
        (view.instances.iter().find(|i| i.id == id)?.health == rampart_core::health::Health::Up).then_some(())
    })
    .await
}

/// Service "db" with instance "near" (east, at `near`) and "far" (west, at `far`), fast tcp
/// checks and these `hooks`, near the primary once each region judges its own up; the
/// token then.
async fn db_in_both(east: &Client, west: &Client, near: String, far: String, hooks: serde_json::Value) -> u64 {
    use rampart_core::service::{InstanceSpec, PolicySpec};
    let policy: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "tcp", "interval": "100ms", "timeout": "100ms", "rise": 1, "fall": 2}],
        "hooks": hooks,
    }))
    .expect("policy");
    east.service_put("db", &policy).await.expect("service");
    for (id, endpoint, region) in [("near", near, "east"), ("far", far, "west")] {
        let spec = InstanceSpec {
            endpoint,
            region: Some(region.into()),
            node: Some(1),
            ..InstanceSpec::default()
        };
        east.instance_put("db", id, &spec).await.expect("instance");
    }
    judged_up(east, "near").await;
    east.switchover("db", "near").await.expect("near is the primary");
    judged_up(west, "far").await;
    east.service("db").await.expect("view").token
}

/// A planned failover (or fail-back) to `region`.
pub(crate) fn planned(region: &str) -> rampart_core::api::FailoverRequest {
    rampart_core::api::FailoverRequest {
        to: region.into(),
        allow_data_loss: false,
        dry_run: false,
    }
}

/// West asked (through `through`) to take over from east (planned), which calls it off
/// with `code`: east then takes writes again at epoch 1, and west was never promoted.
async fn called_off(through: &Client, east: &Client, west: &Client, code: &str) {
    let refused = through
        .regions_failover(&planned("west"))
        .await
        .expect_err("called off");
    assert!(refused.to_string().contains(code), "{refused}");
    let put = eventually(DEADLINE, "writes resumed on east", || async {
        east.put("called-off/after", "v", PutOptions::default()).await.ok()
    })
    .await;
    assert_eq!(put.epoch, 1);
    assert_eq!(west.cluster().await.expect("west").epoch, 1, "west was never promoted");
}

/// A client over both data regions' endpoints, east's first: writes find the primary.
fn both(regions: &Regions) -> Client {
    regions
        .client_over(&["east", "west"])
        .with_deadline(Duration::from_secs(5))
}

async fn wait_caught_up(primary: &Client, standby: &Client) -> u64 {
    let revision = primary.cluster().await.expect("the primary's status").revision;
    eventually(DEADLINE, "the standby at the primary's revision", || async {
        (standby.cluster().await.ok()?.revision >= revision).then_some(())
    })
    .await;
    revision
}

async fn event_detail(client: &Client, action: &str) -> Option<String> {
    let events = client.events(Some("region"), None).await.ok()?;
    events
        .events
        .into_iter()
        .rev()
        .find(|e| e.action == action)
        .map(|e| e.detail)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_whole_primary_region_lost_a_standby_takes_over_and_the_old_one_follows_it_back() {
    let mut regions = three_regions().await;
    let (east, west) = (regions.client("east"), regions.client("west"));
    let client = both(&regions);
    for i in 0..20 {
        client
            .put(&format!("fo/{i}"), "before", PutOptions::default())
            .await
            .expect("put");
    }
    wait_caught_up(&east, &west).await;

    regions.region_mut("east").kill(1);
    // A write through both regions' endpoints is acknowledged again, by west.
    let put = eventually(
        DEADLINE,
        "a write acknowledged after the primary region died",
        || async { client.put("fo/after", "after", PutOptions::default()).await.ok() },
    )
    .await;
    assert_eq!(put.epoch, 2, "the acknowledging epoch is in the answer");
    let view = west.regions().await.expect("west's view");
    assert_eq!((view.primary.as_str(), view.epoch), ("west", 2), "{view:?}");
    assert!(view.lease.is_some_and(|l| l.held), "west holds the lease");
    let detail = eventually(DEADLINE, "the failover event", || {
        event_detail(&west, "region.failover")
    })
    .await;
    assert!(
        detail.contains("west is the primary region at epoch 2") && detail.contains("RPO: at least 0 revisions"),
        "{detail}"
    );
    for i in 0..20 {
        let kv = west
            .get_key(&format!("fo/{i}"), false)
            .await
            .expect("read")
            .expect("kept");
        assert_eq!(kv.value, "before");
    }

    // East comes back: it sees epoch 2, stays read-only, had nothing unshipped, and follows
    // west from its own revision (no install, no divergence file).
    regions.region_mut("east").restart(1).expect("restart east");
    eventually(DEADLINE, "east following west at epoch 2", || async {
        let status = east.cluster().await.ok()?;
        (status.epoch == 2 && status.primary_region.as_deref() == Some("west") && status.revision >= put.revision)
            .then_some(())
    })
    .await;
    let refused = east
        .put("fo/east", "v", PutOptions::default())
        .await
        .expect_err("east is a standby");
    assert!(refused.to_string().contains("read_only_region"), "{refused}");
    let dir = regions.region("east").nodes[&1].data_dir.join("divergence");
    assert!(!dir.exists(), "nothing was set aside");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_returning_old_primary_sets_aside_exactly_its_unshipped_writes_and_converges() {
    let regions = three_regions().await;
    let (east, west) = (regions.client("east"), regions.client("west"));
    for i in 0..10 {
        east.put(&format!("dv/{i}"), "shipped", PutOptions::default())
            .await
            .expect("put");
    }
    let shipped = wait_caught_up(&east, &west).await;

    // West stops reading east's log (its calls to east vanish); east still holds its lease
    // (its own calls to west and the witness go through) and acknowledges writes west will
    // never have.
    regions.set_link("west", "east", rampart_testkit::RelayMode::Blackhole);
    let mut unshipped = Vec::new();
    for i in 0..10 {
        let key = format!("dv/late-{i}");
        let put = east
            .put(&key, "unshipped", PutOptions::default())
            .await
            .expect("east still holds the lease");
        unshipped.push((key, put.revision));
    }
    regions.cut("east", "west");
    regions.cut("east", "judge");
    // West takes over once east's lease ran out.
    eventually(DEADLINE, "west promoted", || async {
        let status = west.cluster().await.ok()?;
        (status.primary_region.as_deref() == Some("west") && status.epoch == 2).then_some(())
    })
    .await;
    west.put("dv/new", "west", PutOptions::default())
        .await
        .expect("west takes writes");

    regions.heal("east", "west");
    regions.heal("east", "judge");
    let detail = eventually(DEADLINE, "east's divergence event", || {
        event_detail(&east, "region.divergence")
    })
    .await;
    assert!(
        detail.contains(&format!("{} shipped writes", unshipped.len())),
        "{detail} {unshipped:?}"
    );
    // The file holds exactly the late writes, in order, from the revision after the last
    // one west had.
    let dir = regions.region("east").nodes[&1].data_dir.join("divergence");
    let file = std::fs::read_dir(&dir)
        .expect("a divergence dir")
        .next()
        .expect("a file")
        .expect("entry");
    let text = std::fs::read_to_string(file.path()).expect("read");
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("json")).collect();
    let saved: Vec<(String, u64)> = lines
        .iter()
        .map(|l| {
            (
                l["key"].as_str().expect("key").to_string(),
                l["revision"].as_u64().expect("revision"),
            )
        })
        .collect();
    assert_eq!(saved, unshipped);
    assert_eq!(saved[0].1, shipped + 1);
    // The same through the API: listed with its node and counts, exported line by line.
    let view = east.regions().await.expect("east's view");
    assert_eq!(view.divergence.len(), 1, "/v1/regions shows it: {view:?}");
    let listed = east.regions_divergence().await.expect("divergence");
    let file = listed.files.first().expect("a file listed");
    assert_eq!(
        (file.epoch, file.from_revision, file.writes),
        (1, shipped + 1, unshipped.len() as u64)
    );
    assert!(
        listed.events.iter().any(|e| e.detail.contains(&file.name)),
        "{listed:?}"
    );
    let exported = east.regions_divergence_export(&file.name).await.expect("export");
    assert_eq!(exported["writes"].as_array().map(Vec::len), Some(unshipped.len()));
    assert!(east.regions_divergence_export("nothing.jsonl").await.is_err());
    assert!(lines
        .iter()
        .all(|l| l["operation"] == "put" && l["value"] == "unshipped"));
    // East converges on west's state: the new write there, the late ones gone.
    eventually(DEADLINE, "east resynced from west", || async {
        let status = east.cluster().await.ok()?;
        let west_status = west.cluster().await.ok()?;
        (status.epoch == 2 && status.checksum == west_status.checksum).then_some(())
    })
    .await;
    assert!(east.get_key("dv/late-0", true).await.expect("read").is_none());
    assert_eq!(
        east.get_key("dv/new", true).await.expect("read").expect("kept").value,
        "west"
    );
}

/// Writes `pw/N` for N = 0, 1, ... through `client` until `stop`, one at a time; the keys
/// acknowledged, and the longest time between two acknowledgements.
async fn write_until(
    client: std::sync::Arc<Client>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<String>, Duration) {
    let mut acknowledged = Vec::new();
    let mut last = std::time::Instant::now();
    let mut gap = Duration::ZERO;
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let key = format!("pw/{n}");
        n += 1;
        if client.put(&key, "v", PutOptions::default()).await.is_ok() {
            gap = gap.max(last.elapsed());
            last = std::time::Instant::now();
            acknowledged.push(key);
        }
    }
    (acknowledged, gap)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn planned_failover_and_failback_under_writes_lose_no_acknowledged_write() {
    let regions = three_regions().await;
    let (east, west) = (regions.client("east"), regions.client("west"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = tokio::spawn(write_until(std::sync::Arc::new(both(&regions)), stop.clone()));
    eventually(DEADLINE, "writes going on", || async {
        (east.cluster().await.ok()?.revision > 20).then_some(())
    })
    .await;

    // A dry run changes nothing.
    let plan = east
        .regions_failover(&rampart_core::api::FailoverRequest {
            to: "west".into(),
            allow_data_loss: false,
            dry_run: true,
        })
        .await
        .expect("dry run");
    assert!(
        plan.dry_run && plan.planned && plan.plan.contains("nothing is lost"),
        "{plan:?}"
    );
    assert_eq!(east.cluster().await.expect("status").epoch, 1);

    // Asked of east's endpoints: passed on to west, which runs it.
    let answer = east.regions_failover(&planned("west")).await.expect("planned failover");
    assert!(
        answer.planned && answer.epoch == 2 && answer.rpo.revisions == 0,
        "{answer:?}"
    );
    let detail = eventually(DEADLINE, "the failover event", || {
        event_detail(&west, "region.failover")
    })
    .await;
    assert!(detail.contains("planned failover to west"), "{detail}");
    eventually(DEADLINE, "writes acknowledged by west", || async {
        let before = west.cluster().await.ok()?.revision;
        eventually(DEADLINE, "more", || async {
            (west.cluster().await.ok()?.revision > before + 20).then_some(())
        })
        .await;
        Some(())
    })
    .await;
    // East follows west without an install or a divergence file, then takes it back.
    eventually(DEADLINE, "east following west", || async {
        let status = east.cluster().await.ok()?;
        (status.epoch == 2 && status.primary_region.as_deref() == Some("west")).then_some(())
    })
    .await;
    let back = west.regions_failback(&planned("east")).await.expect("fail-back");
    assert!(back.planned && back.epoch == 3, "{back:?}");
    let before = east.cluster().await.expect("status").revision;
    eventually(DEADLINE, "writes acknowledged by east again", || async {
        (east.cluster().await.ok()?.revision > before + 20).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acknowledged, gap) = writer.await.expect("writer");
    eprintln!("longest write gap across two planned failovers: {gap:?}");
    let dir = regions.region("east").nodes[&1].data_dir.join("divergence");
    assert!(!dir.exists(), "nothing was set aside");
    // Every acknowledged write is in the final primary's state.
    let range = east.range("pw/", false).await.expect("range");
    let kept: std::collections::BTreeSet<String> = range.items.into_iter().map(|kv| kv.key).collect();
    let lost: Vec<&String> = acknowledged.iter().filter(|k| !kept.contains(*k)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(5)]
    );
    assert!(acknowledged.len() > 60, "{}", acknowledged.len());
}

/// Found by a drill (`rampart drill run region-failover failback`): a region failed back
/// to right after it handed its lease over kept refusing writes for the rest of that
/// handover's window (20 s), its new epoch's lease never renewed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_region_failed_back_to_right_after_it_handed_over_renews_its_new_lease_at_once() {
    let regions = east_west_judge(&[]).await;
    let west = regions.client("west");
    // One client deadline, far inside the handover's window.
    let east = regions.client("east").with_deadline(Duration::from_secs(5));
    east.put("fb/before", "v", PutOptions::default())
        .await
        .expect("east takes writes");
    let away = east.regions_failover(&planned("west")).await.expect("planned failover");
    assert_eq!(away.epoch, 2, "{away:?}");
    eventually(DEADLINE, "east following west at epoch 2", || async {
        (east.cluster().await.ok()?.epoch == 2).then_some(())
    })
    .await;
    let back = west.regions_failback(&planned("east")).await.expect("fail-back");
    assert_eq!(back.epoch, 3, "{back:?}");
    let put = east
        .put("fb/after", "v", PutOptions::default())
        .await
        .expect("east acknowledges at its new epoch within one client deadline");
    assert_eq!(put.epoch, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_regions_without_a_witness_fail_over_only_when_told_to_and_report_the_rpo() {
    let mut regions = east_west().await;
    let (east, west) = (regions.client("east"), regions.client("west"));
    for i in 0..10 {
        east.put(&format!("two/{i}"), "v", PutOptions::default())
            .await
            .expect("put");
    }
    wait_caught_up(&east, &west).await;
    let view = west.regions().await.expect("view");
    assert!(
        !view.auto_failover && view.failover_note.as_deref().is_some_and(|n| n.contains("manual")),
        "{view:?}"
    );

    regions.region_mut("east").kill(1);
    eventually(DEADLINE, "west to see east unreachable", || async {
        let view = west.regions().await.ok()?;
        view.regions
            .iter()
            .any(|r| r.name == "east" && !r.reachable)
            .then_some(())
    })
    .await;
    // An observation window, not a synchronisation: ten region timeouts without a failover.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(west.cluster().await.expect("status").epoch, 1, "no failover by itself");

    let ask = |allow_data_loss: bool, dry_run: bool| rampart_core::api::FailoverRequest {
        to: "west".into(),
        allow_data_loss,
        dry_run,
    };
    let refused = west
        .regions_failover(&ask(false, false))
        .await
        .expect_err("refused without --allow-data-loss");
    assert!(refused.to_string().contains("data_loss_possible"), "{refused}");
    let plan = west.regions_failover(&ask(false, true)).await.expect("dry run");
    assert!(
        !plan.planned && plan.dry_run && plan.rpo.reported_revision.is_some(),
        "{plan:?}"
    );
    assert_eq!(west.cluster().await.expect("status").epoch, 1);
    let forced = west.regions_failover(&ask(true, false)).await.expect("forced failover");
    assert!(!forced.planned && forced.epoch == 2, "{forced:?}");
    assert_eq!(forced.rpo.revisions, 0, "west had everything east reported: {forced:?}");
    west.put("two/after", "v", PutOptions::default())
        .await
        .expect("west takes writes");
    let detail = eventually(DEADLINE, "the failover event", || {
        event_detail(&west, "region.failover")
    })
    .await;
    assert!(
        detail.contains("forced failover") && detail.contains("RPO: at least 0 revisions"),
        "{detail}"
    );
}

/// Writes `{prefix}/N` through `client` until `stop`, recording every acknowledgement with
/// its epoch and the keys acknowledged.
async fn write_epochs(
    client: Client,
    prefix: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<(String, rampart_testkit::EpochAck)> {
    let mut acks = Vec::new();
    let mut n = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let key = format!("{prefix}/{n}");
        n += 1;
        let sent = std::time::Instant::now();
        if let Ok(put) = client.put(&key, "v", PutOptions::default()).await {
            let ack = rampart_testkit::EpochAck {
                sent,
                answered: std::time::Instant::now(),
                epoch: put.epoch,
            };
            acks.push((key, ack));
        }
    }
    acks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_primary_stops_before_a_standby_takes_over_and_no_two_epochs_acknowledge_at_once() {
    let regions = three_regions().await;
    let (east, west) = (regions.client("east"), regions.client("west"));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Two writers that only know east, two that know both regions.
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = if w < 2 {
            regions.client("east").with_deadline(Duration::from_millis(500))
        } else {
            both(&regions).with_deadline(Duration::from_millis(500))
        };
        writers.push(tokio::spawn(write_epochs(client, format!("h{w}"), stop.clone())));
    }
    eventually(DEADLINE, "writes going on", || async {
        (east.cluster().await.ok()?.revision > 50).then_some(())
    })
    .await;
    let cut = std::time::Instant::now();
    regions.cut("east", "west");
    regions.cut("east", "judge");
    eventually(DEADLINE, "west promoted and taking writes", || async {
        let status = west.cluster().await.ok()?;
        (status.epoch == 2 && status.primary_region.as_deref() == Some("west")).then_some(())
    })
    .await;
    let promoted = west.cluster().await.expect("status").revision;
    eventually(DEADLINE, "writes acknowledged at epoch 2", || async {
        (west.cluster().await.ok()?.revision > promoted + 30).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acks = Vec::new();
    for writer in writers {
        acks.extend(writer.await.expect("writer"));
    }
    let epochs: std::collections::BTreeSet<u64> = acks.iter().map(|(_, a)| a.epoch).collect();
    assert_eq!(epochs, [1, 2].into(), "writes acknowledged at both epochs");
    let only: Vec<rampart_testkit::EpochAck> = acks.iter().map(|(_, a)| *a).collect();
    assert_eq!(
        rampart_testkit::epochs_overlap(&only),
        None,
        "two epochs acknowledged at once"
    );

    // East comes back: every write it acknowledged is in west's state or in its divergence
    // file.
    regions.heal("east", "west");
    regions.heal("east", "judge");
    eventually(DEADLINE, "east following west", || async {
        let status = east.cluster().await.ok()?;
        (status.epoch == 2 && status.checksum == west.cluster().await.ok()?.checksum).then_some(())
    })
    .await;
    let mut set_aside = std::collections::BTreeSet::new();
    if let Ok(files) = std::fs::read_dir(regions.region("east").nodes[&1].data_dir.join("divergence")) {
        for file in files {
            let text = std::fs::read_to_string(file.expect("entry").path()).expect("read");
            for line in text.lines() {
                let line: serde_json::Value = serde_json::from_str(line).expect("json");
                set_aside.insert(line["key"].as_str().expect("key").to_string());
            }
        }
    }
    let mut missing = Vec::new();
    let mut lost_early = Vec::new();
    let report = Duration::from_millis(100); // health_check_interval: a renewal reports then
    for (key, ack) in acks.iter().filter(|(_, a)| a.epoch == 1) {
        if west.get_key(key, false).await.expect("read").is_some() {
            continue;
        }
        if !set_aside.contains(key) {
            missing.push(key.clone());
        }
        // Lost in the failover: committed after east's last report to a voter (no earlier
        // than the cut, less one renewal interval) it is in the report's window; before it,
        // in the revisions the report counts.
        if ack.answered + report < cut {
            lost_early.push(key.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "acknowledged writes neither kept nor set aside: {missing:?}"
    );
    // Those committed before east's last report are counted in the report's N.
    let detail = event_detail(&west, "region.failover")
        .await
        .expect("the failover event");
    let counted: usize = detail
        .split("at least ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {detail}"));
    assert!(
        lost_early.len() <= counted,
        "{} acknowledged writes lost before east's last report, the report counts {counted}: {detail}",
        lost_early.len()
    );
    assert!(
        detail.contains("RPO: ") && detail.contains("before contact was lost"),
        "{detail}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_region_paused_past_its_lease_acknowledges_nothing_after_it_resumes() {
    let mut regions = three_regions().await;
    let west = regions.client("west");
    let east_only = regions.client("east").with_deadline(Duration::from_millis(300));
    for i in 0..10 {
        east_only
            .put(&format!("st/{i}"), "v", PutOptions::default())
            .await
            .expect("put");
    }
    regions.region_mut("east").pause(1);
    eventually(DEADLINE, "west promoted while east is stopped", || async {
        (west.cluster().await.ok()?.epoch == 2).then_some(())
    })
    .await;
    regions.region_mut("east").resume(1);
    // From the moment it runs again until it follows west, nothing it is sent is
    // acknowledged: its lease ran out while it was stopped.
    let tries = std::sync::atomic::AtomicU64::new(0);
    eventually(DEADLINE, "east following west at epoch 2", || async {
        let n = tries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Ok(put) = east_only
            .put(&format!("st/after-{n}"), "v", PutOptions::default())
            .await
        {
            panic!("east acknowledged a write after it resumed: {put:?}");
        }
        (east_only.cluster().await.ok()?.epoch == 2).then_some(())
    })
    .await;
    assert!(tries.into_inner() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_link_cut_and_healed_every_two_seconds_causes_at_most_one_failover() {
    let settings = [
        "health_check_interval = \"100ms\"",
        "region_timeout = \"1s\"",
        "region_lease = \"1s\"",
    ];
    let regions = east_west_judge_with(1, &settings).await;
    let west = regions.client("west");
    let east = regions.client("east");
    // Fifteen rounds: the current primary is cut off from both others for 2 s, then healed
    // for 2 s. The first round may fail it over; after that the anti-flap rule asks for 4 s
    // of silence, which no round gives.
    for _ in 0..15 {
        let primary = east
            .regions()
            .await
            .ok()
            .map(|v| v.primary)
            .unwrap_or_else(|| "east".to_string());
        let others: Vec<&str> = ["east", "west", "judge"]
            .into_iter()
            .filter(|r| *r != primary)
            .collect();
        for other in &others {
            regions.cut(&primary, other);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        for other in &others {
            regions.heal(&primary, other);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let epochs = [
        east.cluster().await.expect("east").epoch,
        west.cluster().await.expect("west").epoch,
    ];
    assert!(
        epochs.iter().all(|e| *e <= 2),
        "more than one failover: epochs {epochs:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_region_failover_promotes_each_services_best_instance_in_the_new_primary_region() {
    use rampart_core::service::InstanceRole;
    let mut regions = three_regions().await;
    let (east, west) = (regions.client("east"), regions.client("west"));
    let (near, _near_task) = crate::regions::live_endpoint().await;
    let (far, _far_task) = crate::regions::live_endpoint().await;
    let token_before = db_in_both(&east, &west, near, far, serde_json::json!({})).await;

    regions.region_mut("east").kill(1);
    // West takes over the region, then the service: its own instance, with a new token.
    let view = eventually(DEADLINE, "far promoted in west", || async {
        let view = west.service("db").await.ok()?;
        (view.primary.as_deref() == Some("far")).then_some(view)
    })
    .await;
    assert!(view.token > token_before, "a new fencing token: {view:?}");
    assert_eq!(view.epoch, 2, "issued at the new epoch: compare as (epoch, token)");
    let roles: Vec<(&str, InstanceRole)> = view.instances.iter().map(|i| (i.id.as_str(), i.role)).collect();
    assert!(roles.contains(&("far", InstanceRole::Primary)), "{roles:?}");
    assert!(
        roles.contains(&("near", InstanceRole::Standby)),
        "east's instance is a standby now: {roles:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_standbys_leader_killed_mid_promotion_the_promotion_is_retried_and_never_two_primaries() {
    let settings = [
        "health_check_interval = \"100ms\"",
        "region_timeout = \"500ms\"",
        // Long enough that west's leader is still waiting it out when it is killed.
        "region_lease = \"3s\"",
    ];
    let mut regions = east_west_judge_with(3, &settings).await;
    let (east, west) = (regions.client("east"), regions.client("west"));
    east.put("mid/0", "v", PutOptions::default()).await.expect("put");
    wait_caught_up(&east, &west).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers = [
        tokio::spawn(write_epochs(
            regions.client("east").with_deadline(Duration::from_millis(500)),
            "mid-e".into(),
            stop.clone(),
        )),
        tokio::spawn(write_epochs(
            both(&regions).with_deadline(Duration::from_millis(500)),
            "mid-b".into(),
            stop.clone(),
        )),
    ];

    regions.cut("east", "west");
    regions.cut("east", "judge");
    // West's leader has promised itself epoch 2 and waits out east's lease: kill it then.
    let leader = eventually(DEADLINE, "west's leader mid-promotion", || async {
        let view = west.regions().await.ok()?;
        let promised = view
            .promise
            .as_ref()
            .is_some_and(|p| p.epoch == 2 && p.region == "west");
        let status = west.cluster().await.ok()?;
        (promised && status.epoch == 1).then_some(status.leader?)
    })
    .await;
    regions.region_mut("west").kill(leader);
    eventually(DEADLINE, "west promoted by its next leader", || async {
        let status = west.cluster().await.ok()?;
        (status.epoch == 2 && status.leader.is_some_and(|l| l != leader)).then_some(())
    })
    .await;
    let promoted = west.cluster().await.expect("status").revision;
    eventually(DEADLINE, "writes acknowledged at epoch 2", || async {
        (west.cluster().await.ok()?.revision > promoted + 20).then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acks = Vec::new();
    for writer in writers {
        acks.extend(writer.await.expect("writer").into_iter().map(|(_, a)| a));
    }
    assert_eq!(
        rampart_testkit::epochs_overlap(&acks),
        None,
        "two epochs acknowledged at once"
    );
    let view = west.regions().await.expect("view");
    assert_eq!(
        (view.primary.as_str(), view.epoch),
        ("west", 2),
        "one promotion: {view:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_max_rpo_lag_a_failover_under_a_load_that_outruns_the_link_loses_no_more_than_the_bound() {
    const BOUND: usize = 40;
    let bound = format!("max_rpo_lag = {BOUND}");
    let settings = [
        // Checks slower than the link's round trip below.
        "health_check_interval = \"500ms\"",
        "region_timeout = \"2s\"",
        "region_lease = \"2s\"",
        &bound,
    ];
    let mut regions = east_west_judge_with(1, &settings).await;
    let (east, west) = (regions.client("east"), regions.client("west"));
    east.put("rpo/0", "v", PutOptions::default()).await.expect("put");
    // West reads east's log (and says what it applied) 150 ms late each way: four writers
    // outrun it, so east keeps stopping at the bound.
    regions.set_link(
        "west",
        "east",
        rampart_testkit::RelayMode::Delay(Duration::from_millis(150)),
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let client = regions.client("east").with_deadline(Duration::from_millis(500));
            tokio::spawn(write_epochs(client, format!("rpo{w}"), stop.clone()))
        })
        .collect();
    let stopped = eventually(DEADLINE, "east to stop at the bound", || async {
        let view = east.regions().await.ok()?;
        view.rpo_bound.filter(|why| why.contains("max_rpo_lag"))
    })
    .await;
    assert!(stopped.contains(&format!("{BOUND} revisions")), "{stopped}");
    eventually(DEADLINE, "the bound's event", || {
        event_detail(&east, "region.rpo_bound")
    })
    .await;
    // Writes go on in bursts, as west catches up within the bound.
    eventually(DEADLINE, "many writes past the bound", || async {
        (east.cluster().await.ok()?.revision > 6 * BOUND as u64).then_some(())
    })
    .await;
    // East dies with west behind.
    regions.region_mut("east").kill(1);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acks = Vec::new();
    for writer in writers {
        acks.extend(writer.await.expect("writer"));
    }
    eventually(DEADLINE, "west promoted", || async {
        (west.cluster().await.ok()?.epoch == 2).then_some(())
    })
    .await;
    let mut missing = 0;
    for (key, _) in &acks {
        if west.get_key(key, false).await.expect("read").is_none() {
            missing += 1;
        }
    }
    assert!(
        acks.len() > 4 * BOUND,
        "the load outran the link: {} acknowledged",
        acks.len()
    );
    assert!(
        missing <= BOUND,
        "{missing} acknowledged writes lost, over the bound of {BOUND}"
    );
    let detail = eventually(DEADLINE, "the failover event", || {
        event_detail(&west, "region.failover")
    })
    .await;
    assert!(
        detail.contains(&format!("max_rpo_lag ({BOUND} revisions) held")),
        "{detail}"
    );
}

/// The hook log a test's hooks append to (both regions' nodes write one file, so its order
/// is the order the hooks ran in), and the hooks that write "HOOK INSTANCE EPOCH" lines.
fn hook_log() -> (tempfile::TempDir, std::path::PathBuf, serde_json::Value) {
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("hooks.log");
    let hook = |name: &str| {
        format!(
            r#"echo "{name} $RAMPART_INSTANCE $RAMPART_REGION_EPOCH" >> {}"#,
            log.display()
        )
    };
    let hooks = serde_json::json!({"on_promote": hook("promote"), "on_demote": hook("demote")});
    (dir, log, hooks)
}

/// Waits for `line` in the hook log, then asserts that `before` is there ahead of it.
async fn ran_before(log: &std::path::Path, before: &str, line: &str) {
    let lines = eventually(DEADLINE, line, || async {
        let text = std::fs::read_to_string(log).ok()?;
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines.iter().any(|l| l == line).then_some(lines)
    })
    .await;
    let first = lines
        .iter()
        .position(|l| l == before)
        .unwrap_or_else(|| panic!("never ran: {before:?}: {lines:?}"));
    let then = lines.iter().position(|l| l == line).expect("found above");
    assert!(first < then, "{before:?} must run before {line:?}: {lines:?}");
}

/// A planned failover and its fail-back move a service's primary with it, the old one
/// letting go (`on_demote`) before the new region promotes its own (`on_promote`), both
/// ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planned_failover_and_failback_demote_the_services_primary_before_promoting_the_other() {
    let regions = three_regions().await;
    let (east, west) = (regions.client("east"), regions.client("west"));
    let (_dir, log, hooks) = hook_log();
    let (near, _near_task) = crate::regions::live_endpoint().await;
    let (far, _far_task) = crate::regions::live_endpoint().await;
    db_in_both(&east, &west, near, far, hooks).await;
    let moved = west.regions_failover(&planned("west")).await.expect("planned failover");
    assert!(moved.planned && moved.epoch == 2, "{moved:?}");
    ran_before(&log, "demote near 1", "promote far 2").await;
    // East follows west; once it judges near up again it can take the primary back.
    eventually(DEADLINE, "east following west", || async {
        (east.cluster().await.ok()?.epoch == 2).then_some(())
    })
    .await;
    let back = east.regions_failback(&planned("east")).await.expect("fail-back");
    assert!(back.planned && back.epoch == 3, "{back:?}");
    ran_before(&log, "demote far 2", "promote near 3").await;
}

/// A primary region that loses its lease and renews it in time (two regions, the standby
/// killed and restarted): its service primary, fenced meanwhile, is released on the fence's
/// report once the region can commit again, and promoted again with a new token.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_primary_fenced_while_its_region_lacked_the_lease_is_promoted_again_once_it_renews() {
    let mut regions = east_west().await;
    let (east, west) = (regions.client("east"), regions.client("west"));
    let (_dir, log, hooks) = hook_log();
    let (near, _near_task) = crate::regions::live_endpoint().await;
    let (far, _far_task) = crate::regions::live_endpoint().await;
    let token = db_in_both(&east, &west, near, far, hooks).await;

    // Without west, east's lease (both regions' grants) runs out: near is fenced.
    regions.region_mut("west").kill(1);
    let fenced = |lines: &[String]| lines.iter().filter(|l| *l == "demote near 1").count();
    let hook_lines = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    eventually(DEADLINE, "near fenced", || async {
        (fenced(&hook_lines()) == 1).then_some(())
    })
    .await;
    regions.region_mut("west").restart(1).expect("restart west");
    let view = eventually(DEADLINE, "near promoted again with a new token", || async {
        let view = east.service("db").await.ok()?;
        (view.primary.as_deref() == Some("near") && view.token > token).then_some(view)
    })
    .await;
    assert_eq!(view.epoch, 1, "no region failover: {view:?}");
    let promoted = |lines: &[String]| lines.iter().filter(|l| *l == "promote near 1").count();
    eventually(DEADLINE, "near's on_promote again", || async {
        (promoted(&hook_lines()) == 2).then_some(())
    })
    .await;
    assert_eq!(fenced(&hook_lines()), 1, "fenced once: {:?}", hook_lines());
}

/// The primary region cut off from the others but alive: its node fences the service's
/// primary (`on_demote`) before the new primary region promotes its own (`on_promote`),
/// and a proxy given both regions' endpoints, the old one first, moves to the new region's
/// instance and closes its connection to the fenced one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_primary_region_fences_its_service_primary_first_and_a_proxy_moves_to_the_new_one() {
    let regions = three_regions().await;
    let (east, west) = (regions.client("east"), regions.client("west"));
    let (_dir, log, hooks) = hook_log();
    let (near, _near_task) = crate::proxy::backend("near");
    let (far, _far_task) = crate::proxy::backend("far");
    db_in_both(&east, &west, near.to_string(), far.to_string(), hooks).await;
    let port = rampart_testkit::cluster::free_port().expect("port");
    let endpoints: Vec<String> = ["east", "west"]
        .iter()
        .flat_map(|r| regions.region(r).endpoints())
        .collect();
    let admin = rampart_testkit::cluster::free_port().expect("port");
    let (_proxy, _dir) = crate::proxy::start_proxy_with(
        &format!(
            "[proxy]\nadmin = \"{admin}\"\n[[proxy.listeners]]\nname = \"db\"\nbind = \"{port}\"\nservice = \"db\"\nroute = \"primary\"\n"
        ),
        &["--endpoints".to_string(), endpoints.join(",")],
    );
    let through = port.to_string();
    eventually(DEADLINE, "near through the proxy", || async {
        (crate::proxy::ask(&through).await? == "near").then_some(())
    })
    .await;
    let (name, mut to_old) = crate::proxy_registry::connect(&through).await.expect("a connection");
    assert_eq!(name, "near");

    // East loses the other regions, not the proxy.
    regions.cut("east", "west");
    regions.cut("east", "judge");
    crate::proxy_registry::wait_closed(&mut to_old, "the connection to the fenced primary").await;
    eventually(DEADLINE, "far through the proxy", || async {
        (crate::proxy::ask(&through).await? == "far").then_some(())
    })
    .await;
    let (status, body) = crate::proxy_registry::get_json(&format!("http://{admin}/listeners/db/primary")).await;
    assert_eq!((status, &body["primary"]), (200, &serde_json::json!("far")), "{body}");

    // East's primary let go before west's took over.
    ran_before(&log, "demote near 1", "promote far 2").await;
    // East still answers, but not with its registry as current.
    let east_only = east.with_deadline(Duration::from_millis(500));
    let refused = east_only.service("db").await.expect_err("east's view is not current");
    assert!(refused.to_string().contains("region_lease_lost"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planned_failover_to_a_region_whose_state_differs_is_called_off_and_writes_resume() {
    let mut west_spec = RegionSpec::new("west", 1);
    west_spec.node_args = vec!["--snapshot-logs".into(), "10".into()];
    let options = RegionsOptions {
        primary: "east".into(),
        regions: vec![RegionSpec::new("east", 1), west_spec, RegionSpec::witness("judge")],
        // No failover by itself while west restarts below.
        settings: fast_with(&["auto_failover = false"]),
        tls: false,
    };
    let mut regions = Regions::start(binary(), options).await.expect("start the regions");
    regions.wait_for_leaders(DEADLINE).await;
    let (east, west) = (regions.client("east"), regions.client("west"));
    let marked = "AAAAAAAAAAAAAAAA";
    east.put("off/x", marked, PutOptions::default()).await.expect("put");
    // Enough of west's own log entries for a snapshot that holds the value (its link
    // proposes many writes an entry).
    let mut i = 0;
    eventually(DEADLINE, "west's snapshot taken", || {
        i += 1;
        let (east, west) = (&east, &west);
        let n = i;
        async move {
            for j in 0..20 {
                east.put(&format!("off/{n}-{j}"), "v", PutOptions::default())
                    .await
                    .ok()?;
            }
            wait_caught_up(east, west).await;
            (west.cluster().await.ok()?.snapshot_index > 0).then_some(())
        }
    })
    .await;
    // Offline, one value in west's snapshot is changed (same length, still decodes): west
    // holds east's revisions with other contents.
    let data_dir = regions.region("west").nodes[&1].data_dir.clone();
    let snapshot = data_dir.join("snapshot.bin");
    eventually(DEADLINE, "west's snapshot with the value", || async {
        let bytes = std::fs::read(&snapshot).ok()?;
        bytes
            .windows(marked.len())
            .any(|w| w == marked.as_bytes())
            .then_some(())
    })
    .await;
    regions.region_mut("west").kill(1);
    let mut bytes = std::fs::read(&snapshot).expect("the snapshot");
    let at = bytes
        .windows(marked.len())
        .position(|w| w == marked.as_bytes())
        .expect("the value");
    bytes[at..at + marked.len()].copy_from_slice(b"BBBBBBBBBBBBBBBB");
    std::fs::write(&snapshot, bytes).expect("write the snapshot");
    regions.region_mut("west").restart(1).expect("restart west");
    regions.region("west").wait_for_leader(DEADLINE).await;
    wait_caught_up(&east, &west).await;
    // The restarted west decides planned or forced by its own contact with east: until
    // its first health poll of east answers, it would take east for lost.
    eventually(DEADLINE, "west to hear from east again", || async {
        let view = west.regions().await.ok()?;
        view.regions
            .iter()
            .any(|r| r.name == "east" && r.reachable)
            .then_some(())
    })
    .await;

    called_off(&east, &east, &west, "checksum_mismatch").await;
}

/// A planned failover whose target never shows it has the last revision (the primary cannot
/// reach it, while the target still reaches the primary): the primary calls the handover
/// off after its catch-up timeout, the operator gets `handover_timeout`, and the primary
/// takes writes again at the same epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_planned_failover_that_times_out_is_called_off_and_writes_resume() {
    let regions = three_regions().await;
    let (east, west) = (regions.client("east"), regions.client("west"));
    east.put("late/0", "v", PutOptions::default()).await.expect("put");
    wait_caught_up(&east, &west).await;
    // One way only: west still follows east and reaches it; east hears nothing from west
    // (the judge and east itself keep granting its lease).
    regions.set_link("east", "west", rampart_testkit::RelayMode::Blackhole);
    called_off(&west, &east, &west, "handover_timeout").await;
    assert_eq!(
        east.regions().await.expect("east").primary,
        "east",
        "east is still the primary region"
    );
}
