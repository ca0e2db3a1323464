//! Sidecar mode: a node runs the instances it hosts that have a `command` as child
//! processes (`sh -c`, with the registration's `env` and `workdir`, output appended to
//! `<data-dir>/instances/SERVICE.INSTANCE.log`). When one exits, the node restarts it per
//! the policy's `recovery = { action = "restart", max_retries, window }` and tells the
//! leader at once, which keeps a restarted primary in its role for `recovery.start_timeout`
//! (a crash is repaired before it is failed over); past the budget it leaves the instance
//! down, tells the leader so, and failover takes over. A deregistered instance,
//! or one whose command changed, is stopped cleanly: SIGTERM, then SIGKILL after
//! [`STOP_GRACE`]. If the node itself dies, its instances get SIGTERM from the kernel.

use std::collections::{HashMap, VecDeque};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rampart_core::api::{Event, ObservationsRequest, RestartReport};
use tokio::process::{Child, Command};

use crate::node::Shared;
use crate::soft::InstanceKey;

const TICK: Duration = Duration::from_millis(100);
/// How long a stopped instance may take to exit after SIGTERM.
pub const STOP_GRACE: Duration = Duration::from_secs(10);
/// Output of one instance kept in its log file before it is started afresh.
const LOG_BYTES_MAX: u64 = 10 << 20;

/// What a child runs; a change restarts it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spec {
    command: String,
    env: Vec<InstanceKey>,
    workdir: Option<String>,
    restart: bool,
    max_retries: u32,
    window: Duration,
}

struct Supervised {
    spec: Spec,
    child: Option<Child>,
    /// Started at least once: a later start is a restart, within the budget.
    started: bool,
    /// When it was restarted, within the window.
    restarts: VecDeque<Instant>,
    gave_up: bool,
}

pub async fn run(node: Shared) {
    let mut children: HashMap<InstanceKey, Supervised> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    let mut desired_now = HashMap::new();
    let mut seen_version = None;
    loop {
        tick.tick().await;
        let version = node.services_version();
        if seen_version != Some(version) {
            seen_version = Some(version);
            desired_now = desired(&node);
        }
        let desired = &desired_now;
        // Stop what is no longer ours or changed.
        let stale: Vec<InstanceKey> = children
            .iter()
            .filter(|(key, s)| desired.get(*key) != Some(&s.spec))
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            if let Some(mut supervised) = children.remove(&key) {
                if let Some(child) = supervised.child.take() {
                    tokio::spawn(stop(child));
                }
            }
        }
        for (key, spec) in desired {
            let supervised = children.entry(key.clone()).or_insert_with(|| Supervised {
                spec: spec.clone(),
                child: None,
                started: false,
                restarts: VecDeque::new(),
                gave_up: false,
            });
            let running = match &mut supervised.child {
                Some(child) => matches!(child.try_wait(), Ok(None)),
                None => false,
            };
            if running || supervised.gave_up {
                continue;
            }
            supervised.child = None;
            let restart = supervised.started;
            if restart {
                let now = Instant::now();
                while supervised
                    .restarts
                    .front()
                    .is_some_and(|at| now.duration_since(*at) > spec.window)
                {
                    supervised.restarts.pop_front();
                }
                if !spec.restart || supervised.restarts.len() >= spec.max_retries as usize {
                    supervised.gave_up = true;
                    tell_leader(&node, key, true);
                    event(&node, key, "instance.gave_up", "failed: exited; restart budget spent").await;
                    continue;
                }
                supervised.restarts.push_back(now);
                tell_leader(&node, key, false);
            }
            supervised.started = true;
            match start(&node, key, spec) {
                Ok(child) => {
                    supervised.child = Some(child);
                    if restart {
                        let detail = format!("restart {} of {}", supervised.restarts.len(), spec.max_retries);
                        event(&node, key, "instance.restart", &format!("ok: {detail}")).await;
                    }
                }
                // The next tick counts it as a restart.
                Err(e) => tracing::warn!(service = %key.0, instance = %key.1, "cannot start the instance: {e}"),
            }
        }
    }
}

/// The instances this node should be running.
fn desired(node: &Shared) -> HashMap<InstanceKey, Spec> {
    let applied = node.applied.read().expect("state lock");
    let mut desired = HashMap::new();
    for (name, service) in &applied.state.shipped.services {
        for (id, record) in &service.instances {
            let Some(command) = &record.instance.command else {
                continue;
            };
            if !node.hosts(&record.instance) {
                continue;
            }
            let recovery = &service.policy.recovery;
            desired.insert(
                (name.clone(), id.clone()),
                Spec {
                    command: command.clone(),
                    env: record
                        .instance
                        .env
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    workdir: record.instance.workdir.clone(),
                    restart: recovery.restart,
                    max_retries: recovery.max_retries,
                    window: Duration::from_millis(recovery.window_ms),
                },
            );
        }
    }
    desired
}

/// An instance's output file, `<data-dir>/instances/SERVICE.INSTANCE.log`, opened to
/// append (the previous one kept as `.log.1` once it passed [`LOG_BYTES_MAX`]).
pub fn log_file(node: &Shared, key: &InstanceKey) -> std::io::Result<std::fs::File> {
    let dir = node.config.data_dir.join("instances");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.{}.log", key.0, key.1));
    if std::fs::metadata(&path).is_ok_and(|m| m.len() > LOG_BYTES_MAX) {
        let _ = std::fs::rename(&path, path.with_extension("log.1"));
    }
    std::fs::OpenOptions::new().create(true).append(true).open(&path)
}

fn start(node: &Shared, key: &InstanceKey, spec: &Spec) -> std::io::Result<Child> {
    let log = log_file(node, key)?;
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(&spec.command)
        .envs(spec.env.iter().cloned())
        .env("RAMPART_SERVICE", &key.0)
        .env("RAMPART_INSTANCE", &key.1)
        .env("RAMPART_NODE_ID", node.id.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // If the node dies, its children are not left behind.
        .kill_on_drop(true);
    if let Some(workdir) = &spec.workdir {
        command.current_dir(workdir);
    }
    // SAFETY: prctl(2) is async-signal-safe and touches only the child being exec'd. A
    // node that dies (even by SIGKILL) takes its instances down with it (SIGTERM), so a
    // restarted node never finds a second copy running.
    unsafe {
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = command.spawn()?;
    tracing::info!(service = %key.0, instance = %key.1, pid = child.id(), "instance started");
    Ok(child)
}

/// SIGTERM, then SIGKILL after the grace period.
async fn stop(mut child: Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child, not yet reaped (we hold it).
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
    }
    if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

/// Tells the leader at once that the instance is being restarted (or given up on), so a
/// primary keeps its role while it comes back (`recovery.start_timeout`).
fn tell_leader(node: &Shared, key: &InstanceKey, gave_up: bool) {
    let body = ObservationsRequest {
        node: node.id,
        observations: Vec::new(),
        positions: Vec::new(),
        restarts: vec![RestartReport {
            service: key.0.clone(),
            instance: key.1.clone(),
            gave_up,
        }],
    };
    let node = node.clone();
    let key = key.clone();
    tokio::spawn(async move {
        // A few tries: without it the leader fails the primary over instead of waiting.
        for _ in 0..3 {
            if crate::controllers::prober::send(&node, body.clone()).await {
                return;
            }
            tokio::time::sleep(TICK).await;
        }
        tracing::warn!(service = %key.0, instance = %key.1, "the leader did not hear of the restart");
    });
}

async fn event(node: &Shared, key: &InstanceKey, action: &str, outcome: &str) {
    tracing::info!(service = %key.0, instance = %key.1, action, outcome, "supervision");
    let event = instance_event(node, key, "supervision", action, outcome);
    crate::events::record_anywhere(node, event).await;
}

/// An event of `kind` about one instance this node hosts.
pub(crate) fn instance_event(node: &Shared, key: &InstanceKey, kind: &str, action: &str, outcome: &str) -> Event {
    Event {
        id: 0,
        at_ms: 0,
        kind: kind.to_string(),
        action: action.to_string(),
        actor: "-".to_string(),
        source: format!("node {}", node.id),
        outcome: outcome.to_string(),
        detail: format!("service={} instance={}", key.0, key.1),
    }
}
