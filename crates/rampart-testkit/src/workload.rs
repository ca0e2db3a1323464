//! A write workload: N concurrent writers, each writing its own fresh keys in a loop and
//! recording every outcome in a [`History`], until stopped.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rampart_client::{Client, PutOptions};

use crate::history::{History, OpOutcome};

/// Tasks that write until told to stop (or dropped): the shape every workload and canary
/// shares.
pub struct Writers {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Writers {
    /// Starts `count` tasks, each `body(index, stop)`; a body returns soon after `stop`
    /// is set.
    pub fn start<F, Fut>(count: usize, body: F) -> Writers
    where
        F: Fn(usize, Arc<AtomicBool>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..count).map(|i| tokio::spawn(body(i, stop.clone()))).collect();
        Writers { stop, tasks }
    }

    /// Stops every task and waits for each to finish its current write.
    pub async fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
    }
}

impl Drop for Writers {
    /// Tasks left running (a drill step that failed) stop after their current write.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

pub struct Workload {
    writers: Writers,
    pub history: Arc<History>,
}

impl Workload {
    /// Starts `writers` writers putting `PREFIX/wN/SEQ` keys through `client`.
    pub fn start(client: Arc<Client>, writers: usize, prefix: &str) -> Workload {
        let history = Arc::new(History::default());
        let sink = history.clone();
        let prefix = prefix.to_string();
        let writers = Writers::start(writers, move |writer, stop| {
            let (client, history, prefix) = (client.clone(), sink.clone(), prefix.clone());
            async move {
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
            }
        });
        Workload { writers, history }
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
        self.writers.stop().await;
        self.history
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
