//! Log compaction: snapshots keep every node's log bounded, and a node that fell behind
//! the compacted log catches up from a snapshot.

use rampart_client::PutOptions;
use rampart_testkit::{eventually, Cluster, ClusterOptions};

use crate::{binary, DEADLINE};

const SNAPSHOT_LOGS: u64 = 50;
const WRITES: u64 = 400;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_behind_the_compacted_log_catches_up_from_a_snapshot() {
    let options = ClusterOptions {
        nodes: 3,
        node_args: vec!["--snapshot-logs".into(), SNAPSHOT_LOGS.to_string()],
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(binary(), options).await.expect("start cluster");
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let stopped = *cluster.nodes.keys().find(|id| **id != leader).expect("a follower");
    let behind = cluster.status_of(stopped).await.expect("status").applied_index;
    cluster.kill(stopped);

    // One writer, so each write is a log entry of its own; 20 keys overwritten keep the
    // state small while the log grows.
    let client = cluster.client();
    let value = "x".repeat(512);
    for i in 0..WRITES {
        client
            .put(&format!("snap/{}", i % 20), &value, PutOptions::default())
            .await
            .expect("put with a majority up");
    }
    let purged = eventually(
        DEADLINE,
        "the leader to compact its log past the stopped node",
        || async {
            let purged = cluster.status_of(leader).await?.purged_index;
            (purged > behind + SNAPSHOT_LOGS).then_some(purged)
        },
    )
    .await;

    cluster.restart(stopped).expect("restart");
    let (revision, _checksum) = cluster.wait_converged(DEADLINE).await;
    assert_eq!(revision, WRITES, "every write applied once on every node");
    let status = cluster.status_of(stopped).await.expect("status of the restarted node");
    assert!(
        status.snapshot_index >= purged.min(status.applied_index) && status.snapshot_index > behind,
        "the restarted node should hold a snapshot past the compacted log: {status:?}"
    );
    for id in cluster.nodes.keys() {
        let s = cluster.status_of(*id).await.expect("status");
        let kept = s.applied_index - s.purged_index;
        assert!(
            kept <= 3 * SNAPSHOT_LOGS,
            "node {id} keeps {kept} log entries; compaction should bound it near {SNAPSHOT_LOGS}"
        );
    }
}
