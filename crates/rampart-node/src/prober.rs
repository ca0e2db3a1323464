//! Health probing on every node: one task per (service, instance, check) runs the check on
//! its interval with its timeout and feeds `rampart_core::health::CheckState`; a reporter
//! sends this node's changed healths to the leader in one batch per tick (and everything
//! every few seconds, so a new leader learns the picture quickly). The leader confirms
//! (`verdicts.rs`); nothing here decides more than this node's own view.

use std::collections::{BTreeMap, HashMap};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rampart_core::api::{Observation, ObservationsRequest};
use rampart_core::health::{worst, CheckState, Health};
use rampart_core::service::{Check, Probe, Purpose};
use tokio::task::JoinHandle;

use crate::verdicts::InstanceKey;
use crate::{now_ms, Shared};

/// How often the set of probes is reconciled with the registry, and reports are sent.
const TICK: Duration = Duration::from_millis(250);
/// Everything is re-sent this often even without changes.
const FULL_REPORT_EVERY: Duration = Duration::from_secs(3);
/// Output an `exec` check may produce that is read (the rest is discarded).
const EXEC_OUTPUT_BYTES_MAX: usize = 4096;

/// This node's latest health per instance and check, and what has not been reported yet.
#[derive(Default)]
struct Views {
    checks: HashMap<InstanceKey, BTreeMap<usize, (Health, Purpose)>>,
    dirty: HashMap<InstanceKey, (Health, Health)>,
}

/// An instance's (liveness, readiness) from its checks: each the worst of its checks.
fn summary(checks: &BTreeMap<usize, (Health, Purpose)>) -> (Health, Health) {
    let of = |wanted: fn(Purpose) -> bool| worst(checks.values().filter(|(_, p)| wanted(*p)).map(|(h, _)| *h));
    (of(Purpose::liveness), of(Purpose::readiness))
}

impl Views {
    fn set(&mut self, key: &InstanceKey, index: usize, health: Health, purpose: Purpose) {
        let before = self.checks.get(key).map(summary);
        self.checks
            .entry(key.clone())
            .or_default()
            .insert(index, (health, purpose));
        let after = summary(&self.checks[key]);
        if before != Some(after) {
            self.dirty.insert(key.clone(), after);
        }
    }

    fn forget(&mut self, key: &InstanceKey) {
        self.checks.remove(key);
        self.dirty.remove(key);
    }
}

/// What one probe task runs; a change restarts the task.
#[derive(Clone, PartialEq, Eq)]
struct ProbeSpec {
    check: Check,
    endpoint: String,
}

pub async fn run(node: Shared) {
    let views = Arc::new(Mutex::new(Views::default()));
    let mut tasks: HashMap<(InstanceKey, usize), (ProbeSpec, JoinHandle<()>)> = HashMap::new();
    let mut last_full = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        let desired = desired_probes(&node);
        tasks.retain(|key, (spec, task)| {
            let keep = desired.get(key) == Some(spec);
            if !keep {
                task.abort();
                if !desired.keys().any(|(instance, _)| *instance == key.0) {
                    views.lock().expect("views lock").forget(&key.0);
                }
            }
            keep
        });
        for (key, spec) in desired {
            if let std::collections::hash_map::Entry::Vacant(slot) = tasks.entry(key) {
                let task = tokio::spawn(probe_loop(
                    node.clone(),
                    views.clone(),
                    slot.key().clone(),
                    spec.clone(),
                ));
                slot.insert((spec, task));
            }
        }
        let full = last_full.elapsed() >= FULL_REPORT_EVERY;
        let batch: Vec<Observation> = {
            let mut views = views.lock().expect("views lock");
            let chosen: Vec<(InstanceKey, (Health, Health))> = if full {
                views.checks.iter().map(|(k, c)| (k.clone(), summary(c))).collect()
            } else {
                views.dirty.iter().map(|(k, h)| (k.clone(), *h)).collect()
            };
            views.dirty.clear();
            chosen
                .into_iter()
                .map(|((service, instance), (health, ready))| Observation {
                    service,
                    instance,
                    health,
                    ready,
                })
                .collect()
        };
        if full {
            last_full = Instant::now();
        }
        if !batch.is_empty() && !report(&node, &batch).await {
            // Not delivered: send it all again at the next tick.
            last_full = Instant::now() - FULL_REPORT_EVERY;
        }
    }
}

/// Every probe this node should be running, from the applied registry.
fn desired_probes(node: &Shared) -> HashMap<(InstanceKey, usize), ProbeSpec> {
    let applied = node.applied.read().expect("state lock");
    let mut desired = HashMap::new();
    for (service_name, service) in &applied.state.services {
        for (id, record) in &service.instances {
            for (index, check) in service.policy.checks.iter().enumerate() {
                // Heartbeat checks are judged by the leader from the instance's own calls.
                if matches!(check.probe, Probe::Heartbeat { .. }) {
                    continue;
                }
                desired.insert(
                    ((service_name.clone(), id.clone()), index),
                    ProbeSpec {
                        check: check.clone(),
                        endpoint: record.instance.endpoint.clone(),
                    },
                );
            }
        }
    }
    desired
}

async fn probe_loop(node: Shared, views: Arc<Mutex<Views>>, key: (InstanceKey, usize), spec: ProbeSpec) {
    let (instance_key, index) = key;
    let mut state = CheckState::new(now_ms());
    let interval = Duration::from_millis(spec.check.interval_ms);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    views
        .lock()
        .expect("views lock")
        .set(&instance_key, index, Health::Unknown, spec.check.purpose);
    loop {
        tick.tick().await;
        let timeout = Duration::from_millis(spec.check.timeout_ms);
        let ok = tokio::time::timeout(timeout, probe(&node, &instance_key, &spec))
            .await
            .unwrap_or(false);
        if let Some(health) = state.observe(now_ms(), ok, spec.check.thresholds()) {
            tracing::info!(
                service = %instance_key.0,
                instance = %instance_key.1,
                check = index,
                ?health,
                "check changed"
            );
            views
                .lock()
                .expect("views lock")
                .set(&instance_key, index, health, spec.check.purpose);
        }
    }
}

/// Runs one probe; true when healthy. The caller bounds it with the check's timeout.
async fn probe(node: &Shared, instance: &InstanceKey, spec: &ProbeSpec) -> bool {
    match &spec.check.probe {
        Probe::Http {
            target,
            path,
            status_min,
            status_max,
            body_contains,
        } => {
            let url = target.clone().unwrap_or_else(|| match spec.endpoint.contains("://") {
                true => format!("{}{path}", spec.endpoint.trim_end_matches('/')),
                false => format!("http://{}{path}", spec.endpoint),
            });
            let Ok(response) = node.probe_http.get(&url).send().await else {
                return false;
            };
            let status = response.status().as_u16();
            if !(*status_min..=*status_max).contains(&status) {
                return false;
            }
            match body_contains {
                None => true,
                Some(needle) => response.text().await.is_ok_and(|body| body.contains(needle.as_str())),
            }
        }
        Probe::Tcp { target } => {
            let addr = target.clone().unwrap_or_else(|| spec.endpoint.clone());
            tokio::net::TcpStream::connect(addr).await.is_ok()
        }
        Probe::Exec { command } => {
            let child = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(command)
                .env("RAMPART_SERVICE", &instance.0)
                .env("RAMPART_INSTANCE", &instance.1)
                .env("RAMPART_ENDPOINT", &spec.endpoint)
                .env("RAMPART_NODE_ID", node.id.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                // A timed-out probe's process is killed with its future.
                .kill_on_drop(true)
                .spawn();
            let Ok(mut child) = child else { return false };
            if let Some(mut stdout) = child.stdout.take() {
                // Read (and drop) bounded output so a chatty check cannot block on a pipe.
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = vec![0u8; EXEC_OUTPUT_BYTES_MAX];
                    while matches!(stdout.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
            child.wait().await.is_ok_and(|s| s.success())
        }
        Probe::Heartbeat { .. } => true,
    }
}

/// Sends a batch of observations to the leader; false when it did not arrive.
async fn report(node: &Shared, batch: &[Observation]) -> bool {
    let body = ObservationsRequest {
        node: node.id,
        observations: batch.to_vec(),
        restarts: Vec::new(),
    };
    send(node, body).await
}

/// Delivers a node-to-leader report (the leader takes its own directly); false when it
/// did not arrive.
pub async fn send(node: &Shared, body: ObservationsRequest) -> bool {
    let Some(leader) = node.known_leader() else {
        return false;
    };
    if leader == node.id {
        crate::verdicts::receive(node, body).await;
        return true;
    }
    let Some(addr) = node.address_of(leader) else {
        return false;
    };
    let scheme = if node.tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{addr}/v1/observations");
    // The node certificate authenticates this call on a TLS region (no token needed).
    node.http
        .post(url)
        .header(crate::forward::FORWARDED_HEADER, node.id.to_string())
        .json(&body)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}
