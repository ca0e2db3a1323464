//! Elections: at most one holder at a time; fencing tokens strictly increase, also across
//! a leader kill (safety rule 3).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rampart_testkit::history::tokens_strictly_increase;

use crate::{cluster, DEADLINE};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_campaigners_hold_one_at_a_time_with_increasing_tokens() {
    let mut cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = Arc::new(cluster.client());
    // (token, holder) in the order wins were observed, and the holder seen while holding.
    let wins: Arc<Mutex<Vec<(u64, String)>>> = Arc::default();
    let overlaps: Arc<Mutex<Vec<String>>> = Arc::default();
    let holding: Arc<Mutex<Option<String>>> = Arc::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    let mut tasks = Vec::new();
    for c in 0..3 {
        let (client, wins, overlaps, holding) = (client.clone(), wins.clone(), overlaps.clone(), holding.clone());
        tasks.push(tokio::spawn(async move {
            let me = format!("cand-{c}");
            let lease = loop {
                if let Ok(l) = client.lease_grant(Duration::from_secs(30)).await {
                    break l.id;
                }
            };
            while tokio::time::Instant::now() < deadline {
                let Ok(won) = client
                    .campaign("jobs", &me, lease, Some(Duration::from_millis(500)))
                    .await
                else {
                    continue;
                };
                {
                    let mut h = holding.lock().unwrap();
                    if let Some(other) = h.as_ref() {
                        overlaps.lock().unwrap().push(format!("{me} won while {other} held"));
                    }
                    *h = Some(me.clone());
                    wins.lock().unwrap().push((won.token, me.clone()));
                }
                if let Ok(Some(seen)) = client.observe("jobs").await {
                    if seen.leader != me || seen.token != won.token {
                        overlaps
                            .lock()
                            .unwrap()
                            .push(format!("{me} holds token {} but observe says {seen:?}", won.token));
                    }
                }
                *holding.lock().unwrap() = None;
                // Retry until the resign is known to be applied, so the next winner is clean.
                while client
                    .resign("jobs", Some(&me))
                    .await
                    .is_err_and(|e| e.code() != Some("not_holder"))
                {}
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let leader = cluster.wait_for_leader(DEADLINE).await;
    cluster.kill(leader);
    for task in tasks {
        task.await.expect("campaigner");
    }
    let wins = wins.lock().unwrap().clone();
    assert!(wins.len() >= 3, "too few wins to judge: {wins:?}");
    assert!(
        overlaps.lock().unwrap().is_empty(),
        "two holders at once: {:?}",
        overlaps.lock().unwrap()
    );
    let tokens: Vec<u64> = wins.iter().map(|(t, _)| *t).collect();
    assert!(
        tokens_strictly_increase(&tokens),
        "tokens not strictly increasing: {tokens:?}"
    );
}
