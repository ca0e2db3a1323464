//! A write workload: N concurrent writers, each writing its own fresh keys in a loop and
//! recording every outcome in a [`History`], until stopped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rampart_client::{Client, PutOptions};

use crate::history::{History, OpOutcome};

pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub history: Arc<History>,
}

impl Workload {
    /// Starts `writers` writers putting `PREFIX/wN/SEQ` keys through `client`.
    pub fn start(client: Arc<Client>, writers: usize, prefix: &str) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let history = Arc::new(History::default());
        let tasks = (0..writers)
            .map(|writer| {
                let (client, stop, history) = (client.clone(), stop.clone(), history.clone());
                let prefix = prefix.to_string();
                tokio::spawn(async move {
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        let key = format!("{prefix}/w{writer}/{seq:07}");
                        let value = format!("{writer}-{seq}");
                        let sent = std::time::Instant::now();
                        let (outcome, epoch) = match client.put(&key, &value, PutOptions::default()).await {
                            Ok(answer) => (
                                OpOutcome::Acknowledged {
                                    revision: answer.revision,
                                },
                                Some(answer.epoch),
                            ),
                            Err(e) if e.is_definite() => (OpOutcome::Failed, None),
                            Err(_) => (OpOutcome::Unknown, None),
                        };
                        history.record_epoch(writer, &key, &value, outcome, sent, epoch);
                    }
                })
            })
            .collect();
        Workload { stop, tasks, history }
    }

    /// Waits until `more` further writes have been acknowledged.
    pub async fn wait_progress(&self, more: usize, timeout: Duration) {
        let target = self.history.acknowledged() + more;
        crate::eventually(timeout, &format!("{more} more acknowledged writes"), || async {
            (self.history.acknowledged() >= target).then_some(())
        })
        .await
    }

    /// Stops every writer and returns the history.
    pub async fn stop(mut self) -> Arc<History> {
        self.stop.store(true, Ordering::Relaxed);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        self.history.clone()
    }
}

impl Drop for Workload {
    /// Writers left running (a drill step that failed) stop after their current write.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Every key and value under `prefix`, read linearizably.
pub async fn final_state(client: &Client, prefix: &str) -> BTreeMap<String, String> {
    let range = client
        .range_limited(prefix, false, Some(1_000_000))
        .await
        .expect("final read of the workload's keys");
    range.items.into_iter().map(|kv| (kv.key, kv.value)).collect()
}
