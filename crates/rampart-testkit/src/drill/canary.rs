//! The canary: writers on each path (the API; the drill's service through the proxy; its
//! PostgreSQL through the proxy), and
//! a register canary whose reads and writes of a few keys give histories small enough for
//! the linearizability check.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rampart_client::{Client, PutOptions};

use super::{service, RECOVERY_DEADLINE};
use crate::history::{linearizable, History, RegisterCall, RegisterOp, REGISTER_OPS_MAX};
use crate::workload::Writers;
use crate::Workload;

/// The canary's paths: the API always, the drill's service through the proxy when it runs.
pub(crate) struct Canaries {
    pub api: Workload,
    pub service: Option<service::ServiceCanary>,
    /// Inserts into the drill's PostgreSQL through the proxy.
    pub sql: Option<super::postgres::SqlCanary>,
    /// Register reads and writes, for the linearizability check.
    pub register: Option<RegisterCanary>,
}

impl Canaries {
    pub fn histories(&self) -> Vec<(&'static str, &History)> {
        let mut all = vec![("api", self.api.history.as_ref())];
        if let Some(service) = &self.service {
            all.push(("proxy", service.history.as_ref()));
        }
        if let Some(sql) = &self.sql {
            all.push(("sql", sql.history.as_ref()));
        }
        all
    }

    /// Waits until every path has `more` further acknowledged writes.
    pub async fn wait_progress(&self, more: usize) -> Result<(), String> {
        let targets: Vec<usize> = self.histories().iter().map(|(_, h)| h.acknowledged() + more).collect();
        let deadline = Instant::now() + RECOVERY_DEADLINE;
        loop {
            let behind: Vec<&str> = self
                .histories()
                .iter()
                .zip(&targets)
                .filter(|((_, h), target)| h.acknowledged() < **target)
                .map(|((path, _), _)| *path)
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no {more} more acknowledged writes through {} within {} s",
                    behind.join(" and "),
                    RECOVERY_DEADLINE.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// When every path has acknowledged a write sent after `at`: the latest of those.
    pub fn recovered_after(&self, at: Instant) -> Option<Instant> {
        self.histories()
            .iter()
            .map(|(_, h)| h.first_ack_after(at).map(|d| at + d))
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .max()
    }
}

/// Register workers on one key at a time, each alternating a write of a fresh value and a
/// linearizable read, paced, and moving on to a fresh key once a key has
/// [`REGISTER_OPS_MAX`] operations (what the checker takes).
pub(crate) struct RegisterCanary {
    writers: Writers,
    /// Each key's operations, in microseconds since the canary started.
    ops: Arc<Mutex<Vec<Vec<RegisterOp>>>>,
}

/// Register workers sharing one key.
const REGISTER_WORKERS: usize = 3;
/// The pause between one worker's operations.
const REGISTER_PACE: Duration = Duration::from_millis(10);

impl RegisterCanary {
    pub fn start(client: Arc<Client>, prefix: &str) -> RegisterCanary {
        let ops: Arc<Mutex<Vec<Vec<RegisterOp>>>> = Arc::new(Mutex::new(vec![Vec::new()]));
        // Slots taken on the current key, so a key never has more than the checker takes.
        let reserved = Arc::new(Mutex::new((0usize, 0usize)));
        let zero = Instant::now();
        let (sink, prefix) = (ops.clone(), prefix.to_string());
        let writers = Writers::start(REGISTER_WORKERS, move |worker, stop| {
            let (client, ops, reserved, prefix) = (client.clone(), sink.clone(), reserved.clone(), prefix.clone());
            async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key_index = {
                        let mut slot = reserved.lock().expect("register lock");
                        if slot.1 == REGISTER_OPS_MAX {
                            *slot = (slot.0 + 1, 0);
                            ops.lock().expect("register lock").push(Vec::new());
                        }
                        slot.1 += 1;
                        slot.0
                    };
                    let key = format!("{prefix}/register/{key_index}");
                    let sent = zero.elapsed().as_micros() as u64;
                    let op = if (n + worker as u64).is_multiple_of(2) {
                        let value = format!("w{worker}-{n}");
                        match client.put(&key, &value, PutOptions::default()).await {
                            Ok(_) => Some((RegisterCall::Write(value), Some(zero.elapsed().as_micros() as u64))),
                            // Refused: never applied, so not part of the history.
                            Err(e) if e.is_definite() => None,
                            Err(_) => Some((RegisterCall::Write(value), None)),
                        }
                    } else {
                        match client.get_key(&key, false).await {
                            Ok(found) => Some((
                                RegisterCall::Read(found.map(|kv| kv.value)),
                                Some(zero.elapsed().as_micros() as u64),
                            )),
                            // No answer: a read says nothing.
                            Err(_) => None,
                        }
                    };
                    if let Some((call, answered)) = op {
                        let mut all = ops.lock().expect("register lock");
                        all[key_index].push(RegisterOp { call, sent, answered });
                    }
                    tokio::time::sleep(REGISTER_PACE).await;
                }
            }
        });
        RegisterCanary { writers, ops }
    }

    /// Stops the workers and checks each key's history: how many keys, how many
    /// operations, and the first key whose history is not linearizable.
    pub async fn stop_and_check(mut self) -> (usize, usize, Option<String>) {
        self.writers.stop().await;
        let all = self.ops.lock().expect("register lock").clone();
        let operations = all.iter().map(Vec::len).sum();
        let broken = all
            .iter()
            .enumerate()
            .find_map(|(i, ops)| match linearizable(None, ops) {
                Ok(true) => None,
                Ok(false) => Some(format!("register {i}: {} operations admit no linearization", ops.len())),
                Err(e) => Some(format!("register {i}: {e}")),
            });
        (all.len(), operations, broken)
    }
}
