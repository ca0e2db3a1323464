//! Region failover on real processes (safety rules 5 and 7): the whole primary region lost,
//! a standby promoted by a majority's votes after the old lease ran out, the failover
//! recorded with its timings and RPO; the old primary coming back follows the new one, and
//! sets aside the writes it never shipped in a divergence file before it resyncs.

use std::time::Duration;

use rampart_client::{Client, PutOptions};
use rampart_testkit::{eventually, RegionSpec, Regions, RegionsOptions};

use crate::{binary, DEADLINE};

/// East (primary) and west of one node each and the witness "judge", with automatic
/// failover (three regions) and short timings.
async fn three_regions() -> Regions {
    let options = RegionsOptions {
        primary: "east".into(),
        regions: vec![
            RegionSpec::new("east", 1),
            RegionSpec::new("west", 1),
            RegionSpec::witness("judge"),
        ],
        settings: vec![
            "health_check_interval = \"100ms\"".into(),
            "region_timeout = \"500ms\"".into(),
            "region_lease = \"1s\"".into(),
        ],
        tls: false,
    };
    let regions = Regions::start(binary(), options).await.expect("start the regions");
    regions.wait_for_leaders(DEADLINE).await;
    regions
}

/// A client over both data regions' endpoints, east's first: writes find the primary.
fn both(regions: &Regions) -> Client {
    let endpoints: Vec<String> = ["east", "west"]
        .iter()
        .flat_map(|r| regions.region(r).endpoints())
        .collect();
    Client::new(&endpoints)
        .expect("client")
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
