//! Watches resume across leader changes and see every change once, in order.

use std::collections::BTreeSet;
use std::time::Duration;

use rampart_client::PutOptions;

use crate::{cluster, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_resumed_across_leader_change_sees_every_change_once_in_order() {
    let mut cluster = cluster(3).await;
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let start = client
        .put("watch/first", "0", PutOptions::default())
        .await
        .expect("put")
        .revision;
    let mut watch = client.watch("watch/", Some(start));

    let mut acknowledged = BTreeSet::new();
    acknowledged.insert(start);
    for i in 0..60 {
        if i == 30 {
            cluster.kill(leader);
        }
        if let Ok(answer) = client
            .put(&format!("watch/k{i:03}"), &i.to_string(), PutOptions::default())
            .await
        {
            acknowledged.insert(answer.revision);
        }
    }
    let last = *acknowledged.iter().max().expect("writes");
    let mut seen = Vec::new();
    while seen.last().is_none_or(|r| *r < last) {
        let event = tokio::time::timeout(DEADLINE, watch.next())
            .await
            .expect("watch stalled")
            .expect("watch ended")
            .expect("watch failed");
        seen.push(event.revision);
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "events repeated or out of order: {seen:?}"
    );
    let seen: BTreeSet<u64> = seen.into_iter().collect();
    let missing: Vec<_> = acknowledged.difference(&seen).collect();
    assert!(missing.is_empty(), "watch missed acknowledged revisions {missing:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watch_from_a_compacted_revision_answers_410() {
    let cluster = rampart_testkit::Cluster::start(
        crate::binary(),
        rampart_testkit::ClusterOptions {
            nodes: 1,
            node_args: vec!["--watch-history".into(), "5".into()],
            ..Default::default()
        },
    )
    .await
    .expect("start");
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    for i in 0..20 {
        client
            .put(&format!("c/{i}"), "v", PutOptions::default())
            .await
            .expect("put");
    }
    let mut watch = client.watch("c/", Some(1));
    let answer = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("answer")
        .expect("item");
    let error = answer.expect_err("a compacted revision must fail");
    assert_eq!(error.code(), Some("compacted"));
}
