//! Partitions and pauses: a leader cut off from the majority, or frozen past the election
//! timeout, acknowledges nothing and serves no linearizable read.

use std::sync::Arc;
use std::time::Duration;

use rampart_client::PutOptions;
use rampart_testkit::{final_state, RelayMode, Workload};

use crate::{cluster, cluster_with_relays, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_off_leader_acknowledges_nothing_and_majority_goes_on() {
    let cluster = cluster_with_relays(3).await;
    let old_leader = cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    client
        .put("part/before", "1", PutOptions::default())
        .await
        .expect("write before the partition");

    cluster.isolate(old_leader, RelayMode::Blackhole);
    let cut_off = cluster.client_of(old_leader).with_deadline(Duration::from_secs(3));
    for i in 0..5 {
        let answer = cut_off
            .put(&format!("part/minority-{i}"), "x", PutOptions::default())
            .await;
        assert!(answer.is_err(), "the cut-off leader acknowledged a write: {answer:?}");
    }
    let read = cut_off.get_key("part/before", false).await;
    assert!(read.is_err(), "the cut-off leader served a linearizable read: {read:?}");

    // The majority elects a leader among itself and keeps accepting writes.
    let majority: Vec<u64> = cluster.nodes.keys().copied().filter(|id| *id != old_leader).collect();
    let majority_client = Arc::new(
        rampart_client::Client::new(
            &majority
                .iter()
                .map(|id| cluster.nodes[id].endpoint())
                .collect::<Vec<_>>(),
        )
        .expect("client"),
    );
    let new_leader = rampart_testkit::eventually(DEADLINE, "a leader in the majority", || async {
        let status = cluster.status_of(majority[0]).await?;
        status.leader.filter(|l| *l != old_leader)
    })
    .await;
    assert!(majority.contains(&new_leader));
    let workload = Workload::start(majority_client.clone(), 2, "part/majority");
    workload.wait_progress(20, DEADLINE).await;

    cluster.heal();
    workload.wait_progress(20, DEADLINE).await;
    let history = workload.stop().await;
    cluster.wait_converged(DEADLINE).await;
    let state = final_state(&majority_client, "part/").await;
    assert!(history.lost_acknowledged_writes(&state).is_empty());
    assert_eq!(state.get("part/before").map(String::as_str), Some("1"));
}

/// Found by a drill (`partition-minority`): a write the leader had taken when it was cut
/// off waited for the node's request timeout or the client's deadline, whichever came
/// first, though the majority had a new leader within a second. It is now answered
/// `leadership_lost` (outcome unknown) once the leader has not heard from a majority for
/// twice the election timeout, so the client moves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_in_flight_on_a_cut_off_leader_is_answered_unknown_not_left_to_a_deadline() {
    let cluster = cluster_with_relays(3).await;
    let leader = cluster.wait_for_leader(DEADLINE).await;
    // A deadline far past anything the region takes to notice.
    let client = cluster.client_of(leader).with_deadline(Duration::from_secs(120));
    client
        .put("cut/before", "1", PutOptions::default())
        .await
        .expect("write before the partition");
    cluster.isolate(leader, RelayMode::Blackhole);
    let answer = client.put("cut/in-flight", "x", PutOptions::default()).await;
    match answer {
        Err(rampart_client::ClientError::Api { code, .. }) => {
            assert_eq!(code, "leadership_lost", "answered {code}");
        }
        other => panic!("expected leadership_lost from the cut-off leader, got {other:?}"),
    }
    cluster.heal();
    cluster.wait_converged(DEADLINE).await;
}

/// The same through a follower: its forward to the cut-off leader goes into the partition;
/// the follower answers it with an unknown outcome (`leadership_lost` once it knows the new
/// leader, or `outcome_unknown` when the partition cut its connection), and the client's
/// next write reaches the new leader. How soon is the drill's to measure
/// (`partition-minority`), not this test's.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_a_follower_forwarded_to_a_replaced_leader_is_answered_unknown() {
    let cluster = cluster_with_relays(3).await;
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).expect("a follower");
    let client = cluster.client_of(follower).with_deadline(Duration::from_secs(120));
    client
        .put("fwd/before", "1", PutOptions::default())
        .await
        .expect("write before the partition");
    cluster.isolate(leader, RelayMode::Blackhole);
    let answer = client.put("fwd/in-flight", "x", PutOptions::default()).await;
    match answer {
        // Acknowledged: the follower already knew the new leader when the write came.
        Ok(put) => assert!(put.revision > 0),
        // Outcome unknown, answered: the replaced leader, or the connection cut with the
        // partition.
        Err(rampart_client::ClientError::Api { code, .. }) => {
            assert!(
                code == "leadership_lost" || code == "outcome_unknown",
                "answered {code}"
            )
        }
        Err(other) => panic!("expected an answer from the follower, got {other:?}"),
    }
    // Its next write reaches the new leader.
    client
        .put("fwd/after", "y", PutOptions::default())
        .await
        .expect("the majority takes writes");
    cluster.heal();
    cluster.wait_converged(DEADLINE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_leader_acknowledges_nothing_with_stale_leadership() {
    let mut cluster = cluster(3).await;
    let old_leader = cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    client
        .put("pause/register", "before", PutOptions::default())
        .await
        .expect("write");

    cluster.pause(old_leader);
    let new_leader = cluster.wait_for_leader(DEADLINE).await;
    assert_ne!(new_leader, old_leader);
    let others: Vec<String> = cluster
        .nodes
        .values()
        .filter(|n| n.id != old_leader)
        .map(|n| n.endpoint())
        .collect();
    let majority = rampart_client::Client::new(&others).expect("client");
    majority
        .put("pause/register", "after", PutOptions::default())
        .await
        .expect("write during the pause");
    cluster.resume(old_leader);

    // Straight after waking, the old leader still thinks it leads. Whatever it answers
    // must be true: no stale read, and every write it acknowledges survives.
    let woken = Arc::new(cluster.client_of(old_leader).with_deadline(Duration::from_secs(5)));
    let mut acknowledged = Vec::new();
    for i in 0..10 {
        if let Ok(Some(kv)) = woken.get_key("pause/register", false).await {
            assert_eq!(kv.value, "after", "read {i} from the woken leader was stale");
        }
        let key = format!("pause/woken-{i}");
        if woken.put(&key, "v", PutOptions::default()).await.is_ok() {
            acknowledged.push(key);
        }
    }
    cluster.wait_converged(DEADLINE).await;
    let state = final_state(&majority, "pause/").await;
    for key in acknowledged {
        assert!(
            state.contains_key(&key),
            "write {key} acknowledged by the woken leader was lost"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejoining_follower_does_not_depose_a_healthy_leader() {
    let cluster = cluster_with_relays(3).await;
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let term = cluster.status_of(leader).await.expect("status").term;
    let follower = *cluster.nodes.keys().find(|id| **id != leader).expect("a follower");

    // Cut one follower off for many election timeouts; without pre-vote it would
    // campaign again and again, raising its term, and depose the leader on return.
    cluster.isolate(follower, RelayMode::Blackhole);
    let client = cluster.client_of(leader);
    for i in 0..20 {
        client
            .put(&format!("rejoin/{i}"), "v", PutOptions::default())
            .await
            .expect("majority keeps writing");
    }
    // Its API is still reachable directly: wait until it has tried (and failed) to start
    // an election three more times.
    let lost_pre_votes = || async {
        let metrics = reqwest::get(format!("http://{}/metrics", cluster.nodes[&follower].endpoint()))
            .await
            .ok()?;
        let text = metrics.text().await.ok()?;
        text.lines()
            .find(|l| l.starts_with("rampart_pre_votes_lost_total"))?
            .split(' ')
            .nth(1)?
            .parse::<f64>()
            .ok()
    };
    let before = lost_pre_votes().await.expect("metrics of the cut-off follower");
    rampart_testkit::eventually(
        DEADLINE,
        "three more lost pre-votes on the cut-off follower",
        || async { (lost_pre_votes().await? >= before + 3.0).then_some(()) },
    )
    .await;
    cluster.heal();
    cluster.wait_converged(DEADLINE).await;
    let after = cluster.status_of(leader).await.expect("status");
    assert_eq!(
        after.leader,
        Some(leader),
        "the leader was deposed by a rejoining follower"
    );
    assert_eq!(
        after.term, term,
        "the term moved: the rejoining follower disrupted the region"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_whose_node_hangs_sends_its_next_write_elsewhere() {
    let mut cluster = cluster(3).await;
    let leader = cluster.wait_for_leader(DEADLINE).await;
    // The leader first: the client's first write goes there and it stays preferred.
    let mut endpoints = vec![cluster.nodes[&leader].endpoint()];
    endpoints.extend(cluster.nodes.values().filter(|n| n.id != leader).map(|n| n.endpoint()));
    let client = rampart_client::Client::new(&endpoints)
        .expect("client")
        .with_deadline(Duration::from_secs(2));
    client.put("hang/0", "v", PutOptions::default()).await.expect("write");
    cluster.pause(leader);
    let new_leader = cluster.wait_for_leader(DEADLINE).await;
    assert_ne!(new_leader, leader);
    // The paused node takes the write and never answers: its outcome is unknown...
    let hung = client.put("hang/1", "v", PutOptions::default()).await;
    assert!(hung.is_err(), "{hung:?}");
    // ...but the next write starts with another node and is acknowledged.
    client
        .put("hang/2", "v", PutOptions::default())
        .await
        .expect("the next write went elsewhere");
    cluster.resume(leader);
}
