//! Leader loss under load: no acknowledged write is lost (safety rule 1).

use std::sync::Arc;

use rampart_testkit::{final_state, Workload};

use crate::{cluster, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kill_under_writers_loses_no_acknowledged_write() {
    let mut cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = Arc::new(cluster.client());
    let workload = Workload::start(client.clone(), 4, "failover");
    for round in 1..=3 {
        workload.wait_progress(50, DEADLINE).await;
        let leader = cluster.wait_for_leader(DEADLINE).await;
        cluster.kill(leader);
        let new_leader = cluster.wait_for_leader(DEADLINE).await;
        assert_ne!(new_leader, leader, "round {round}: a killed node cannot lead");
        workload.wait_progress(50, DEADLINE).await;
        cluster.restart(leader).expect("restart");
        // The restarted node must be back before the next round kills another.
        rampart_testkit::eventually(DEADLINE, "restarted node to rejoin", || async {
            cluster
                .status_of(leader)
                .await
                .filter(|s| s.leader.is_some())
                .map(|_| ())
        })
        .await;
    }
    let history = workload.stop().await;
    let (revision, _checksum) = cluster.wait_converged(DEADLINE).await;
    let state = final_state(&client, "failover/").await;
    let lost = history.lost_acknowledged_writes(&state);
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost, first: {:?}",
        lost.len(),
        lost.first()
    );
    assert!(
        history.failed_but_applied(&state).is_empty(),
        "writes answered as failed were applied"
    );
    assert!(
        history.revision_order_violations().is_empty(),
        "a client saw revisions go backwards"
    );
    assert!(
        revision as usize >= history.acknowledged(),
        "revision {revision} below acknowledged writes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_nodes_survive_two_kills() {
    let mut cluster = cluster(5).await;
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let client = Arc::new(cluster.client());
    let workload = Workload::start(client.clone(), 4, "five");
    workload.wait_progress(50, DEADLINE).await;
    let other = *cluster.nodes.keys().find(|id| **id != leader).expect("a follower");
    cluster.kill(leader);
    cluster.kill(other);
    cluster.wait_for_leader(DEADLINE).await;
    workload.wait_progress(100, DEADLINE).await;
    let history = workload.stop().await;
    cluster.wait_converged(DEADLINE).await;
    let state = final_state(&client, "five/").await;
    let lost = history.lost_acknowledged_writes(&state);
    assert!(
        lost.is_empty(),
        "{} acknowledged writes lost after 2 of 5 died",
        lost.len()
    );
}
