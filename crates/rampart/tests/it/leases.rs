//! Leases: keepalive extends, expiry deletes attached keys and frees elections, and the
//! next election winner gets a higher fencing token.

use std::time::Duration;

use rampart_client::PutOptions;

use crate::{cluster, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_expiry_deletes_keys_and_frees_the_election() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let ttl = Duration::from_millis(1000);
    let lease = client.lease_grant(ttl).await.expect("grant").id;
    client
        .put(
            "lease/owned",
            "v",
            PutOptions {
                lease: Some(lease),
                ..Default::default()
            },
        )
        .await
        .expect("put");
    client.put("lease/free", "v", PutOptions::default()).await.expect("put");
    let first = client
        .campaign("lease-election", "a", lease, None)
        .await
        .expect("campaign");
    assert_eq!(first.leader, "a");

    // Keepalives for three TTLs: the key must survive all of them.
    let kept_until = tokio::time::Instant::now() + ttl * 3;
    while tokio::time::Instant::now() < kept_until {
        client.lease_keepalive(lease).await.expect("keepalive");
        assert!(
            client.get_key("lease/owned", false).await.expect("get").is_some(),
            "kept-alive key vanished"
        );
        tokio::time::sleep(ttl / 4).await;
    }

    // No more keepalives: the leader expires the lease.
    rampart_testkit::eventually(DEADLINE, "the lease's key to be deleted", || async {
        client
            .get_key("lease/owned", false)
            .await
            .ok()
            .flatten()
            .is_none()
            .then_some(())
    })
    .await;
    assert!(
        client.observe("lease-election").await.expect("observe").is_none(),
        "election still held"
    );
    assert!(
        client.get_key("lease/free", false).await.expect("get").is_some(),
        "a key without lease was deleted"
    );
    let keepalive = client.lease_keepalive(lease).await;
    assert!(keepalive.is_err(), "an expired lease was kept alive");

    let lease2 = client.lease_grant(ttl * 5).await.expect("grant").id;
    let second = client
        .campaign("lease-election", "b", lease2, None)
        .await
        .expect("campaign");
    assert_eq!(second.leader, "b");
    assert!(
        second.token > first.token,
        "token {} not above {}",
        second.token,
        first.token
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_survives_leader_change_when_kept_alive() {
    let mut cluster = cluster(3).await;
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let ttl = Duration::from_millis(2000);
    let lease = client.lease_grant(ttl).await.expect("grant").id;
    client
        .put(
            "lease2/owned",
            "v",
            PutOptions {
                lease: Some(lease),
                ..Default::default()
            },
        )
        .await
        .expect("put");
    cluster.kill(leader);
    cluster.wait_for_leader(DEADLINE).await;
    // A new leader restarts every deadline from now: keepalives keep working.
    for _ in 0..6 {
        client.lease_keepalive(lease).await.expect("keepalive after failover");
        tokio::time::sleep(ttl / 4).await;
    }
    assert!(client.get_key("lease2/owned", false).await.expect("get").is_some());
}
