//! Growing and shrinking a region while writes continue.

use std::sync::Arc;

use rampart_testkit::{final_state, Workload};

use crate::{cluster, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adding_and_removing_a_member_under_writes() {
    let mut cluster = cluster(3).await;
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let client = Arc::new(cluster.client());
    let workload = Workload::start(client.clone(), 2, "members");
    workload.wait_progress(30, DEADLINE).await;

    let joiner = cluster.start_joiner().expect("start a fourth node");
    let addr = cluster.nodes[&joiner].endpoint();
    let members = client.add_member(joiner, &addr).await.expect("add member");
    assert_eq!(members.members.iter().filter(|m| m.role == "voter").count(), 4);
    workload.wait_progress(30, DEADLINE).await;

    let follower = *cluster
        .nodes
        .keys()
        .find(|id| **id != leader && **id != joiner)
        .expect("a follower");
    let members = client.remove_member(follower).await.expect("remove member");
    assert!(
        members.members.iter().all(|m| m.id != follower),
        "removed node still listed: {members:?}"
    );
    cluster.forget(follower);
    workload.wait_progress(30, DEADLINE).await;

    let history = workload.stop().await;
    cluster.wait_converged(DEADLINE).await;
    let state = final_state(&client, "members/").await;
    assert!(history.lost_acknowledged_writes(&state).is_empty());
    let status = cluster.status_of(joiner).await.expect("joiner answers");
    assert_eq!(status.members.len(), 3);
}
