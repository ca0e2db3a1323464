//! Health probing on every node: one task per (service, instance, check) runs the check on
//! its interval with its timeout and feeds `rampart_core::health::CheckState`; a reporter
//! sends this node's changed healths to the leader in one batch per tick (and everything
//! every few seconds, so a new leader learns the picture quickly). The leader confirms
//! (`verdicts.rs`); nothing here decides more than this node's own view.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rampart_core::api::{Observation, ObservationsRequest};
use rampart_core::health::{worst, CheckState, Health};
use rampart_core::service::{Check, Probe, Purpose};
use tokio::task::JoinHandle;

use crate::http_probe;
use crate::node::{now_ms, Shared};
use crate::soft::InstanceKey;

/// How often reports are sent, and the set of probes is reconciled with the registry if it
/// changed.
const TICK: Duration = Duration::from_millis(250);
/// The granularity of probe start times (see [`phase`]).
const PHASE_SLOT: Duration = Duration::from_millis(100);
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
    /// A `postgres` service's settings (its SQL check logs in with them).
    postgres: Option<Box<rampart_core::postgres::Postgres>>,
}

/// A thread of its own, with a single-threaded runtime, runs every probe: probes are many
/// small I/O waits, which a work-stealing pool serves at the price of waking its other
/// threads; one thread serves them without that.
fn probe_runtime() -> tokio::runtime::Handle {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("rampart-probes".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("probe runtime");
            let _ = sender.send(runtime.handle().clone());
            runtime.block_on(std::future::pending::<()>());
        })
        .expect("probe thread");
    receiver.recv().expect("probe runtime handle")
}

pub async fn run(node: Shared) {
    let runtime = probe_runtime();
    let views = Arc::new(Mutex::new(Views::default()));
    let mut tasks = Tasks::new();
    let mut last_full = Instant::now();
    let mut seen_version = None;
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        let version = node.services_version();
        if seen_version != Some(version) {
            seen_version = Some(version);
            reconcile(&node, &runtime, &views, &mut tasks);
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

type Tasks = HashMap<(InstanceKey, usize), (ProbeSpec, JoinHandle<()>)>;

/// Brings the running probe tasks in line with the registry: stops the ones no longer
/// wanted (or changed), starts the new ones.
fn reconcile(node: &Shared, runtime: &tokio::runtime::Handle, views: &Arc<Mutex<Views>>, tasks: &mut Tasks) {
    let desired = desired_probes(node);
    let wanted: HashSet<&InstanceKey> = desired.keys().map(|(instance, _)| instance).collect();
    let mut gone = Vec::new();
    tasks.retain(|key, (spec, task)| {
        let keep = desired.get(key) == Some(spec);
        if !keep {
            task.abort();
            if !wanted.contains(&key.0) {
                gone.push(key.0.clone());
            }
        }
        keep
    });
    let mut views_now = views.lock().expect("views lock");
    for instance in gone {
        views_now.forget(&instance);
    }
    drop(views_now);
    for (key, spec) in desired {
        if let std::collections::hash_map::Entry::Vacant(slot) = tasks.entry(key) {
            let task = runtime.spawn(probe_loop(
                node.clone(),
                views.clone(),
                slot.key().clone(),
                spec.clone(),
            ));
            slot.insert((spec, task));
        }
    }
}

/// Every probe this node should be running, from the applied registry.
fn desired_probes(node: &Shared) -> HashMap<(InstanceKey, usize), ProbeSpec> {
    let applied = node.applied.read().expect("state lock");
    let mut desired = HashMap::new();
    for (service_name, service) in &applied.state.shipped.services {
        let probers = &service.policy.probers;
        if !probers.is_empty() && !probers.contains(&node.id) {
            continue;
        }
        // Another region's instances are its own nodes' to probe: verdicts are region-local.
        let ours = service
            .instances
            .iter()
            .filter(|(_, r)| node.config.regions.looks_after(&r.instance.region));
        for (id, record) in ours {
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
                        postgres: service.kind.postgres().map(|pg| Box::new(pg.clone())),
                    },
                );
            }
        }
    }
    desired
}

/// How long a new probe waits for its first run. Probes run on a grid of [`PHASE_SLOT`]s
/// shared by every probe of the node (wall-clock milliseconds modulo the interval), at a
/// slot chosen by a hash of the probe's name: a thousand 1 s checks wake the node ten
/// times a second, in groups, instead of a thousand times, and never all at once. Measured
/// (`bench --check-cost`), grouping cut the CPU per probe by more than half.
fn first_delay(key: &impl Hash, interval: Duration, now_ms: u64) -> Duration {
    let interval_ms = (interval.as_millis() as u64).max(1);
    let slots = (interval_ms / PHASE_SLOT.as_millis() as u64).max(1);
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    let offset_ms = hasher.finish() % slots * PHASE_SLOT.as_millis() as u64;
    Duration::from_millis((offset_ms + interval_ms - now_ms % interval_ms) % interval_ms)
}

async fn probe_loop(node: Shared, views: Arc<Mutex<Views>>, key: (InstanceKey, usize), spec: ProbeSpec) {
    let (instance_key, index) = key;
    let mut state = CheckState::new(now_ms());
    let interval = Duration::from_millis(spec.check.interval_ms);
    let first = tokio::time::Instant::now() + first_delay(&(&instance_key, index), interval, now_ms());
    let mut tick = tokio::time::interval_at(first, interval);
    // Skip keeps the probe on its grid slot after a late tick (Delay would drift off it).
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    views
        .lock()
        .expect("views lock")
        .set(&instance_key, index, Health::Unknown, spec.check.purpose);
    let mut client = Client::for_spec(&spec);
    loop {
        tick.tick().await;
        let timeout = Duration::from_millis(spec.check.timeout_ms);
        let ok = tokio::time::timeout(timeout, probe(&node, &instance_key, &spec, &mut client))
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

/// What an `http` probe keeps between runs.
enum Client {
    /// Plain HTTP: its own kept connection.
    Plain(http_probe::Target, http_probe::HttpProbe),
    /// HTTPS, through the node's general client, to this URL (empty: not an HTTP check).
    General(String),
    /// A `postgres` check's login, kept while it works.
    Postgres(Option<tokio_postgres::Client>),
}

impl Client {
    fn for_spec(spec: &ProbeSpec) -> Client {
        if spec.check.probe == Probe::Postgres {
            return Client::Postgres(None);
        }
        let url = http_url(spec);
        match http_probe::Target::parse(&url) {
            Some(target) => Client::Plain(target, http_probe::HttpProbe::default()),
            None => Client::General(url),
        }
    }
}

/// The URL an `http` check asks: its target, or its path on the instance's endpoint.
fn http_url(spec: &ProbeSpec) -> String {
    let Probe::Http { target, path, .. } = &spec.check.probe else {
        return String::new();
    };
    target.clone().unwrap_or_else(|| match spec.endpoint.contains("://") {
        true => format!("{}{path}", spec.endpoint.trim_end_matches('/')),
        false => format!("http://{}{path}", spec.endpoint),
    })
}

/// Runs one probe; true when healthy. The caller bounds it with the check's timeout.
async fn probe(node: &Shared, instance: &InstanceKey, spec: &ProbeSpec, client: &mut Client) -> bool {
    match &spec.check.probe {
        Probe::Http {
            status_min,
            status_max,
            body_contains,
            ..
        } => {
            let url = match client {
                Client::Plain(target, http) => {
                    let expect = http_probe::Expect {
                        status_min: *status_min,
                        status_max: *status_max,
                        body_contains: body_contains.as_deref(),
                    };
                    return http.check(target, expect).await;
                }
                Client::General(url) => url.as_str(),
                Client::Postgres(_) => return false,
            };
            let Ok(response) = node.probe_http.get(url).send().await else {
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
        Probe::Postgres => {
            let (Some(pg), Client::Postgres(kept)) = (&spec.postgres, client) else {
                return false;
            };
            let is_primary = {
                let applied = node.applied.read().expect("state lock");
                applied
                    .state
                    .shipped
                    .services
                    .get(&instance.0)
                    .is_some_and(|s| s.primary.as_deref() == Some(instance.1.as_str()))
            };
            if kept.as_ref().is_none_or(|c| c.is_closed()) {
                *kept = crate::pg::connect(pg, &spec.endpoint).await.ok();
            }
            let Some(sql) = kept.as_ref() else { return false };
            match crate::pg::status(sql).await {
                Ok(status) => status.in_recovery != is_primary,
                Err(_) => {
                    *kept = None;
                    false
                }
            }
        }
    }
}

/// Sends a batch of observations to the leader; false when it did not arrive.
async fn report(node: &Shared, batch: &[Observation]) -> bool {
    let body = ObservationsRequest {
        node: node.id,
        observations: batch.to_vec(),
        restarts: Vec::new(),
        positions: Vec::new(),
    };
    send(node, body).await
}

/// Delivers a node-to-leader report (the leader takes its own directly); false when it
/// did not arrive.
pub async fn send(node: &Shared, body: ObservationsRequest) -> bool {
    if node.known_leader() == Some(node.id) {
        crate::controllers::verdicts::receive(node, body).await;
        return true;
    }
    let sent = crate::forward::call(node, crate::forward::To::Leader, "/v1/observations", &body, None).await;
    sent.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_start_on_a_shared_grid_spread_over_the_interval() {
        let interval = Duration::from_secs(1);
        let mut slots = HashSet::new();
        for i in 0..200 {
            let key = ("svc", format!("i-{i}"), 0usize);
            for now in [0, 7, 999, 1_700_000_000_123] {
                let delay = first_delay(&key, interval, now);
                assert!(delay < interval);
                let at = now + delay.as_millis() as u64;
                assert_eq!(at % 100, 0, "on the 100 ms grid");
                slots.insert((i, at % 1000));
            }
        }
        // Each probe keeps its slot whenever it starts; the probes spread over many slots.
        assert_eq!(slots.len(), 200);
        let distinct: HashSet<u64> = slots.iter().map(|(_, slot)| *slot).collect();
        assert_eq!(distinct.len(), 10, "every slot of the interval in use");
    }
}
