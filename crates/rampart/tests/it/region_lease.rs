//! The region lease on real processes (safety rule 5): the primary region acknowledges
//! writes only while a majority of regions (the witness included) grant it the lease. Cut
//! off from every other region it turns read-only on its own within the lease, and takes
//! writes again once it renews; one region down (the witness) changes nothing while a
//! majority is left.

use std::time::Duration;

use rampart_client::{Client, ClientError, PutOptions};
use rampart_testkit::{eventually, Regions};

use crate::DEADLINE;

/// East (primary) and west of one node each, and the witness "judge"; no automatic
/// failover, so the lease alone is under test.
async fn three_regions() -> Regions {
    crate::region_failover::east_west_judge(&["auto_failover = false"]).await
}

/// A client of region `name` whose calls give up after 300 ms.
fn quick(regions: &Regions, name: &str) -> Client {
    regions.client(name).with_deadline(Duration::from_millis(300))
}

/// One put (of a `quick` client): `Ok` when acknowledged, else the error's text.
async fn put_once(client: &Client, key: &str) -> Result<u64, String> {
    match client.put(key, "v", PutOptions::default()).await {
        Ok(put) => Ok(put.revision),
        Err(ClientError::Unavailable { last_error, .. }) => Err(last_error),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_cut_off_from_every_region_turns_read_only_within_its_lease_and_resumes_when_healed() {
    let regions = three_regions().await;
    let primary = quick(&regions, "east");
    eventually(DEADLINE, "a first acknowledged write", || async {
        put_once(&primary, "lease/first").await.ok()
    })
    .await;
    let view = primary.regions().await.expect("regions");
    let lease = view.lease.expect("the primary's leader shows its lease");
    assert!(lease.held && lease.granted_by.len() >= 2, "{lease:?}");
    assert_eq!((view.epoch, view.auto_failover), (1, false));

    regions.cut("east", "west");
    regions.cut("east", "judge");
    // No majority renews it: once the grants it holds run out, nothing is acknowledged. (A
    // write let in just before they ran out is answered outcome_unknown, and one the client
    // gave up on has an unknown outcome too; the next ones are refused before anything is
    // written.)
    let refusal = eventually(DEADLINE, "the cut-off primary to refuse writes", || async {
        put_once(&primary, "lease/cut")
            .await
            .err()
            .filter(|e| !e.contains("outcome_unknown") && !e.contains("outcome unknown"))
    })
    .await;
    assert!(refusal.contains("region_lease_lost"), "{refusal}");
    let lease = primary.regions().await.expect("regions").lease.expect("lease");
    assert!(!lease.held && lease.valid_for_ms == 0, "{lease:?}");
    // It stays so while cut off.
    for i in 0..5 {
        assert!(put_once(&primary, &format!("lease/cut-{i}")).await.is_err());
    }
    // The standby never took a write, and never will while the primary is its primary.
    let west = regions.client("west");
    let refused = west
        .put("lease/west", "v", PutOptions::default())
        .await
        .expect_err("a standby");
    assert!(refused.to_string().contains("read_only_region"), "{refused}");

    regions.heal("east", "west");
    regions.heal("east", "judge");
    eventually(DEADLINE, "writes acknowledged again once renewed", || async {
        put_once(&primary, "lease/healed").await.ok()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_witness_down_while_the_primary_is_healthy_changes_nothing() {
    let mut regions = three_regions().await;
    let primary = quick(&regions, "east");
    eventually(DEADLINE, "a first acknowledged write", || async {
        put_once(&primary, "quiet/first").await.ok()
    })
    .await;
    regions.region_mut("judge").kill(1);
    // Renewed by east and west alone: the witness's last grant no longer counts.
    eventually(DEADLINE, "the lease held without the witness", || async {
        let lease = primary.regions().await.ok()?.lease?;
        (lease.held && !lease.granted_by.iter().any(|r| r == "judge")).then_some(())
    })
    .await;
    for i in 0..20 {
        put_once(&primary, &format!("quiet/{i}"))
            .await
            .unwrap_or_else(|e| panic!("write {i} refused with the witness down: {e}"));
    }
    let view = primary.regions().await.expect("regions");
    assert_eq!((view.primary.as_str(), view.epoch), ("east", 1), "no failover");
}
