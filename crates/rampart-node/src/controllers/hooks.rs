//! Role hooks, run by the node that hosts an instance (`node = N` in its registration),
//! never by another node on its behalf. A node learns what to run from the applied state
//! (`rampart_core::failover::hooks::HookMemory` decides):
//!
//! - its instance was asked to step down (`demoting`): run `on_demote`, and on success
//!   tell the leader, which releases the primary role;
//! - its instance became primary with a new fencing token: run `on_promote`;
//! - the service's primary changed and its instance is not it: run `on_role_change`.
//!
//! Hooks run with `RAMPART_SERVICE`, `RAMPART_INSTANCE`, `RAMPART_ROLE`,
//! `RAMPART_FENCING_TOKEN`, `RAMPART_REGION_EPOCH` (compare tokens as (epoch, token) across
//! region failovers) and `RAMPART_PRIMARY_ENDPOINT`, the policy's timeout, and
//! bounded captured output; each run is reported to the leader, which records an event.
//! A node that must let go of a primary it hosts (cut off from its region's majority, or
//! its region's lease about to end) runs `on_demote` by itself: self-fencing.
//! A node restarted mid-way runs the hooks for the current state again: hooks are at least
//! once, and must be idempotent for a given fencing token.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use rampart_core::api::HookReport;
use rampart_core::failover::hooks::{Applied, Hook, HookMemory};
use rampart_core::service::InstanceRole;

use crate::node::Shared;
use crate::pipe::read_bounded;

/// Output kept from one hook run (the rest is read and dropped).
pub const HOOK_OUTPUT_BYTES_MAX: usize = 64 * 1024;
const TICK: Duration = Duration::from_millis(100);
/// How often a node checks whether it is cut off: well inside the two heartbeats between
/// its fencing deadline and the end of the hold.
const FENCE_TICK: Duration = Duration::from_millis(20);

/// One hook to run.
#[derive(Debug, Clone)]
struct Due {
    service: String,
    instance: String,
    hook: &'static str,
    command: Option<String>,
    role: InstanceRole,
    token: u64,
    primary_endpoint: String,
    timeout: Duration,
    /// A `postgres` instance's settings and endpoint: its built-in action runs first.
    postgres: Option<(Box<rampart_core::postgres::Postgres>, String)>,
}

pub async fn run(node: Shared) {
    // Fencing has its own loop: no slow hook or unreachable leader may delay it.
    tokio::spawn(fence(node.clone()));
    let mut seen: HashMap<(String, String), HookMemory> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    let mut seen_version = None;
    loop {
        tick.tick().await;
        // Hooks follow roles and tokens, which change only with the registry.
        let version = node.services_version();
        if seen_version == Some(version) {
            continue;
        }
        seen_version = Some(version);
        for due in due_hooks(&node, &mut seen) {
            let report = run_hook(&node, &due).await;
            // Delivered in the background: a leader out of reach must not stall hooks.
            let node = node.clone();
            tokio::spawn(async move { deliver(&node, &due, report).await });
        }
    }
}

/// Safety rule 4: a node cut off from the region's majority fences the primaries it hosts
/// (`on_demote`) before their hold can run out at the leader; and, with rule 5, a node of a
/// primary region that may be losing its region lease fences them before that lease can
/// end, since another region promotes its own instances only after it ended
/// (`core::region::fence`).
async fn fence(node: Shared) {
    let mut fenced: HashMap<(String, String), u64> = HashMap::new();
    let mut tick = tokio::time::interval(FENCE_TICK);
    // A restarted node counts its start as contact: a primary whose node merely restarted
    // is fenced only if the node cannot reach the majority soon after.
    let started = Instant::now();
    // Whether this node hosts a primary it has not fenced for its token, as of a registry
    // version: only then is there anything to fence. The checks below cost a round trip to
    // Raft's core (and, for the region lease, to the leader), so they are skipped otherwise.
    let mut unfenced = (None, false);
    loop {
        tick.tick().await;
        let version = node.services_version();
        if unfenced.0 != Some(version) {
            unfenced = (Some(version), hosts_unfenced_primary(&node, &fenced));
        }
        if !unfenced.1 {
            continue;
        }
        // About to fence for the region lease: ask once more first, within an eighth of
        // the lease (half the margin), in case it was renewed since the last ask.
        if node.region_fenced() {
            let lease_ms = node.config.regions.region_lease_ms;
            super::region_lease::ask_end(&node, Duration::from_millis(lease_ms / 8)).await;
        }
        let why = if node.region_fenced() {
            "the region's lease may end (not renewed from a majority of regions): fencing the primary (on_demote)"
        } else {
            let contact_age = node.majority_contact_age().await.min(started.elapsed());
            if !node.hold().must_fence(contact_age) {
                continue;
            }
            "cut off from the region's majority: fencing the primary (on_demote)"
        };
        for due in self_fence(&node, &mut fenced, why) {
            let node = node.clone();
            tokio::spawn(async move {
                let report = run_hook(&node, &due).await;
                deliver_fence(&node, &due, report).await;
            });
        }
        // Every primary it hosts is fenced now, until the registry changes.
        unfenced.1 = false;
    }
}

fn hosts_unfenced_primary(node: &Shared, fenced: &HashMap<(String, String), u64>) -> bool {
    let applied = node.applied.read().expect("state lock");
    applied.state.shipped.services.iter().any(|(name, service)| {
        service.primary_record().is_some_and(|(id, record)| {
            node.hosts(&record.instance) && fenced.get(&(name.clone(), id.to_string())) != Some(&service.token)
        })
    })
}

/// `on_demote` for every primary this node hosts and has not fenced yet for its token.
fn self_fence(node: &Shared, fenced: &mut HashMap<(String, String), u64>, why: &str) -> Vec<Due> {
    let applied = node.applied.read().expect("state lock");
    let mut due = Vec::new();
    for (service_name, service) in &applied.state.shipped.services {
        let Some((primary, record)) = service.primary_record() else {
            continue;
        };
        if !node.hosts(&record.instance) {
            continue;
        }
        let key = (service_name.clone(), primary.to_string());
        if fenced.get(&key) == Some(&service.token) {
            continue;
        }
        tracing::warn!(
            service = %service_name,
            instance = %primary,
            token = service.token,
            "{why}"
        );
        fenced.insert(key, service.token);
        due.push(Due {
            service: service_name.clone(),
            instance: primary.to_string(),
            hook: Hook::OnDemote.name(),
            command: service.policy.hooks.on_demote.clone(),
            role: InstanceRole::Replica,
            token: service.token,
            primary_endpoint: String::new(),
            timeout: Duration::from_millis(service.policy.hooks.timeout_ms),
            postgres: postgres_of(service, &record.instance),
        });
    }
    due
}

/// The hooks the applied state asks of this node, noted as handled in `seen`.
fn due_hooks(node: &Shared, seen: &mut HashMap<(String, String), HookMemory>) -> Vec<Due> {
    let applied = node.applied.read().expect("state lock");
    let mut due = Vec::new();
    for (service_name, service) in &applied.state.shipped.services {
        let primary_endpoint = service
            .primary_record()
            .map(|(_, r)| r.instance.endpoint.clone())
            .unwrap_or_default();
        for (id, record) in &service.instances {
            if !node.hosts(&record.instance) {
                continue;
            }
            let hooks = &service.policy.hooks;
            let make = |hook: Hook| Due {
                service: service_name.clone(),
                instance: id.clone(),
                hook: hook.name(),
                command: match hook {
                    Hook::OnPromote => hooks.on_promote.clone(),
                    Hook::OnDemote => hooks.on_demote.clone(),
                    Hook::OnRoleChange => hooks.on_role_change.clone(),
                },
                role: record.role,
                token: service.token,
                primary_endpoint: primary_endpoint.clone(),
                timeout: Duration::from_millis(hooks.timeout_ms),
                postgres: postgres_of(service, &record.instance),
            };
            let key = (service_name.clone(), id.clone());
            let is_primary = service.primary.as_deref() == Some(id.as_str());
            let now = Applied {
                role: record.role,
                is_primary,
                demoting: service.demoting,
                token: service.token,
                service_has_primary: service.primary.is_some(),
            };
            if let Some(hook) = seen.entry(key).or_default().due(now) {
                due.push(make(hook));
            }
        }
    }
    due
}

fn postgres_of(
    service: &rampart_store::shipped::Service,
    instance: &rampart_core::service::Instance,
) -> Option<(Box<rampart_core::postgres::Postgres>, String)> {
    let pg = service.kind.postgres()?;
    Some((Box::new(pg.clone()), instance.endpoint.clone()))
}

/// A `postgres` instance's own part of a hook: `on_promote` promotes its server,
/// `on_demote` stops it; `on_role_change` has none (its node re-points it).
async fn builtin(due: &Due) -> Result<(), String> {
    let Some((pg, endpoint)) = &due.postgres else {
        return Ok(());
    };
    if due.hook == Hook::OnPromote.name() {
        super::postgres::promote(pg, endpoint, due.timeout).await
    } else if due.hook == Hook::OnDemote.name() {
        super::postgres::demote(pg, &due.instance).await
    } else {
        Ok(())
    }
}

/// Runs one hook (or, without a command, reports success at once); a `postgres`
/// instance's own part first.
async fn run_hook(node: &Shared, due: &Due) -> HookReport {
    let started = Instant::now();
    let report = |exit_code: Option<i32>, outcome: String, output: String| HookReport {
        node: node.id,
        hook: due.hook.to_string(),
        token: due.token,
        outcome,
        exit_code,
        duration_ms: started.elapsed().as_millis() as u64,
        output,
    };
    if let Err(e) = builtin(due).await {
        return report(None, format!("failed: {e}"), String::new());
    }
    let Some(command) = &due.command else {
        return report(Some(0), "ok".into(), String::new());
    };
    let role = match due.role {
        InstanceRole::Primary => "primary",
        InstanceRole::Replica => "replica",
        InstanceRole::Standby => "standby",
    };
    // Read before the child starts: compare tokens as (epoch, token) across region failovers.
    let epoch = node.epoch();
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("RAMPART_SERVICE", &due.service)
        .env("RAMPART_INSTANCE", &due.instance)
        .env("RAMPART_ROLE", role)
        .env("RAMPART_FENCING_TOKEN", due.token.to_string())
        .env("RAMPART_REGION_EPOCH", epoch.to_string())
        .env("RAMPART_PRIMARY_ENDPOINT", &due.primary_endpoint)
        .env("RAMPART_NODE_ID", node.id.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => return report(None, format!("failed: cannot start sh: {e}"), String::new()),
    };
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let collect = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let (a, b) = tokio::join!(
            read_bounded(&mut stdout, &mut out, HOOK_OUTPUT_BYTES_MAX),
            read_bounded(&mut stderr, &mut err, HOOK_OUTPUT_BYTES_MAX)
        );
        let _ = (a, b);
        out.extend_from_slice(&err);
        out.truncate(HOOK_OUTPUT_BYTES_MAX);
        String::from_utf8_lossy(&out).into_owned()
    };
    match tokio::time::timeout(due.timeout, async { tokio::join!(child.wait(), collect) }).await {
        Err(_) => report(
            None,
            format!("failed: timed out after {}ms", due.timeout.as_millis()),
            String::new(),
        ),
        Ok((Ok(status), output)) if status.success() => report(status.code(), "ok".into(), output),
        Ok((Ok(status), output)) => report(
            status.code(),
            format!(
                "failed: exit status {}",
                status.code().map_or("signal".to_string(), |c| c.to_string())
            ),
            output,
        ),
        Ok((Err(e), output)) => report(None, format!("failed: {e}"), output),
    }
}

/// Sends a hook's result to the leader, retrying within a bound: the leader records it and,
/// for a successful `on_demote`, releases the primary role.
async fn deliver(node: &Shared, due: &Due, report: HookReport) {
    tracing::info!(
        service = %due.service,
        instance = %due.instance,
        hook = due.hook,
        token = due.token,
        outcome = %report.outcome,
        "hook ran"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if crate::controllers::switchover::hook_reported(node, &due.service, &due.instance, &report).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::warn!(service = %due.service, instance = %due.instance, hook = due.hook, "hook result not delivered");
}

/// Sends a self-fence's `on_demote` result until a leader takes it (it then releases the
/// role), for as long as the registry still names the instance primary with that token,
/// with no other bound: a region that cannot commit (cut off, or without its region lease)
/// may stay so for long, and until the report is taken its registry names a primary that
/// let go.
async fn deliver_fence(node: &Shared, due: &Due, report: HookReport) {
    tracing::info!(
        service = %due.service,
        instance = %due.instance,
        token = due.token,
        outcome = %report.outcome,
        "self-fence hook ran"
    );
    let still_primary = || {
        let applied = node.applied.read().expect("state lock");
        applied
            .state
            .shipped
            .services
            .get(&due.service)
            .is_some_and(|s| s.primary.as_deref() == Some(due.instance.as_str()) && s.token == due.token)
    };
    while still_primary() {
        if crate::controllers::switchover::hook_reported(node, &due.service, &due.instance, &report).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
