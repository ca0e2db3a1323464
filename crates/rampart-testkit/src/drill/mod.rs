//! `rampart drill run --local`: a drill against a topology it starts itself
//! ([`local::LocalTopology`]: regions of nodes whose every link passes through a relay).
//! For each scenario in turn: canary writers put fresh keys through the API, the fault is
//! written to the journal and injected, the first write sent after it and acknowledged
//! gives the RTO, the fault is undone, and once the topology is healthy again the canary's
//! acknowledged writes are looked for (the RPO) and the safety checkers run. A monitor
//! samples each region's leader, term and epoch for the report's timelines.
//!
//! Whatever ends the drill (success, a failed step, Ctrl-C, a SIGKILL of the drill),
//! [`cleanup`] undoes the faults the journal holds and stops the topology.

pub mod journal;
pub mod local;
pub mod report;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use rampart_client::Client;
use rampart_core::api::FailoverRequest;
use rampart_core::drill::Scenario;
use serde::{Deserialize, Serialize};

use crate::history::{epochs_overlap, History, OpOutcome};
use crate::relay::RelayMode;
use crate::Workload;
use journal::{Fault, Journal};
use local::{LocalTopology, TopologyPlan};

/// The scenarios `run_local` can run so far.
pub const LOCAL_SCENARIOS: [Scenario; 9] = [
    Scenario::LeaderKill,
    Scenario::LeaderPause,
    Scenario::PartitionMinority,
    Scenario::PartitionMajority,
    Scenario::RegionOutage,
    Scenario::LinkCut,
    Scenario::LinkSlow,
    Scenario::RegionFailover,
    Scenario::Failback,
];

/// Canary writers per drill.
const CANARY_WRITERS: usize = 4;
/// How long recovery may take before the step fails.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(60);
/// How long the topology may take to be healthy again after an undo.
const HEALTHY_DEADLINE: Duration = Duration::from_secs(120);
/// The one-way latency `link-slow` adds.
const SLOW_LINK: Duration = Duration::from_millis(200);
/// How often the monitor samples each region.
const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// What a drill is held to.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Budgets {
    pub rto_ms: u64,
    /// Acknowledged writes that may be lost.
    pub rpo_writes: u64,
}

/// One safety check's verdict.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// What happened at one moment of a step, for the timelines.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Mark {
    /// From the step's start, ms.
    pub at_ms: u64,
    pub label: String,
}

/// One region as the monitor saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub at_ms: u64,
    pub region: String,
    /// None: no leader, or no node answered.
    pub leader: Option<u64>,
    pub term: u64,
    pub epoch: u64,
    pub primary: Option<String>,
}

/// The canary's writes in one slice of time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bucket {
    pub at_ms: u64,
    pub acknowledged: u32,
    pub failed: u32,
    pub unknown: u32,
}

/// Width of a [`Bucket`].
pub const BUCKET_MS: u64 = 250;

/// One scenario's measurements.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub scenario: Scenario,
    /// From the drill's start to the fault, ms.
    pub injected_at_ms: u64,
    /// From the step's start to the fault, ms (the timelines' zero is the step's start).
    pub fault_at_ms: u64,
    /// What was broken, in words.
    pub fault: String,
    /// The longest time from the fault until a write sent after it (after a planned
    /// operation's answer) was acknowledged, that no write was (none: no recovery).
    pub rto_ms: Option<u64>,
    pub acknowledged: usize,
    /// Acknowledged writes missing from the final state.
    pub lost: usize,
    /// The RPO the failover said, when the scenario moved the primary region.
    pub reported_rpo: Option<String>,
    pub checks: Vec<Check>,
    pub within_budget: bool,
    pub marks: Vec<Mark>,
    pub samples: Vec<Sample>,
    pub writes: Vec<Bucket>,
}

/// A whole drill.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// When it started, ms since the Unix epoch.
    pub started_ms: u64,
    pub scenarios: Vec<Scenario>,
    pub budgets: Budgets,
    pub steps: Vec<Step>,
    /// Every step within budget and every check passed.
    pub passed: bool,
    /// Why the drill stopped before its last step, when it did.
    pub aborted: Option<String>,
}

/// Refuses scenarios `run_local` cannot run, or not in that order, before anything starts.
pub fn check_local(scenarios: &[Scenario], plan: &TopologyPlan) -> Result<(), String> {
    if let Some(missing) = scenarios.iter().find(|s| !LOCAL_SCENARIOS.contains(s)) {
        let built: Vec<&str> = LOCAL_SCENARIOS.iter().map(|s| s.name()).collect();
        return Err(format!(
            "scenario {missing} is not built yet; built so far: {}",
            built.join(", ")
        ));
    }
    rampart_core::drill::check_sequence(scenarios)?;
    plan.check()?;
    if let Some(needs) = scenarios.iter().find(|s| s.needs_regions()) {
        if plan.regions.iter().filter(|r| !r.witness).count() < 2 {
            return Err(format!(
                "scenario {needs} needs a topology of two regions and a witness"
            ));
        }
    }
    Ok(())
}

/// The topology `--local` starts when no topology file is given: one region, or two and a
/// witness when a scenario needs them.
pub fn default_plan(scenarios: &[Scenario]) -> TopologyPlan {
    if scenarios.iter().any(|s| s.needs_regions()) {
        TopologyPlan::two_regions()
    } else {
        TopologyPlan::one_region()
    }
}

/// Runs `scenarios` in turn against `plan`, started under `dir/topology`, with the
/// journal in `dir`. Whatever happens, the faults are undone and the topology stopped
/// before it returns; a step that fails ends the drill with the steps so far.
pub async fn run_local(
    binary: &Path,
    plan: &TopologyPlan,
    scenarios: &[Scenario],
    budgets: Budgets,
    dir: &Path,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Report, String> {
    check_local(scenarios, plan)?;
    let started_ms = now_ms();
    let outcome = std::panic::AssertUnwindSafe(run_steps(binary, plan, scenarios, budgets, dir, progress))
        .catch_unwind()
        .await;
    let (steps, aborted) = match outcome {
        Ok(Ok(steps)) => (steps, None),
        Ok(Err((steps, why))) => (steps, Some(why)),
        Err(panic) => (Vec::new(), Some(panic_text(panic))),
    };
    progress("undoing every fault and stopping the topology");
    let cleaned = cleanup(dir, false).await;
    let passed = aborted.is_none()
        && cleaned.is_ok()
        && steps
            .iter()
            .all(|s| s.within_budget && s.checks.iter().all(|c| c.passed));
    let aborted = match (aborted, cleaned) {
        (Some(why), _) => Some(why),
        (None, Err(why)) => Some(format!("clean-up failed: {why}")),
        (None, Ok(_)) => None,
    };
    Ok(Report {
        started_ms,
        scenarios: scenarios.to_vec(),
        budgets,
        steps,
        passed,
        aborted,
    })
}

type Partial = (Vec<Step>, String);

async fn run_steps(
    binary: &Path,
    plan: &TopologyPlan,
    scenarios: &[Scenario],
    budgets: Budgets,
    dir: &Path,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Vec<Step>, Partial> {
    let fail = |steps: &Vec<Step>, why: String| (steps.clone(), why);
    let mut steps = Vec::new();
    std::fs::create_dir_all(dir).map_err(|e| fail(&steps, format!("cannot make {}: {e}", dir.display())))?;
    let mut journal = Journal::open(dir).map_err(|e| fail(&steps, format!("cannot open the journal: {e}")))?;
    let names: Vec<String> = plan
        .regions
        .iter()
        .map(|r| format!("{} ({})", r.name, r.nodes))
        .collect();
    progress(&format!("starting the topology: {}", names.join(", ")));
    let mut topology = LocalTopology::start(binary, plan, &dir.join("topology"))
        .map_err(|e| fail(&steps, format!("cannot start the topology: {e}")))?;
    topology
        .wait_healthy(HEALTHY_DEADLINE)
        .await
        .map_err(|e| fail(&steps, format!("the topology did not come up: {e}")))?;
    let started = Instant::now();
    for (i, scenario) in scenarios.iter().enumerate() {
        progress(&format!(
            "[{}/{}] {scenario}: {}",
            i + 1,
            scenarios.len(),
            scenario.fault()
        ));
        let ran = std::panic::AssertUnwindSafe(step(&mut topology, &mut journal, *scenario, i, started, budgets))
            .catch_unwind()
            .await;
        let done = match ran {
            Ok(done) => done,
            Err(panic) => Err(panic_text(panic)),
        };
        match done {
            Ok(step) => {
                progress(&format!(
                    "[{}/{}] {scenario}: RTO {}, {} of {} acknowledged writes lost, checks {}",
                    i + 1,
                    scenarios.len(),
                    step.rto_ms.map_or("none (no recovery)".into(), |ms| format!("{ms} ms")),
                    step.lost,
                    step.acknowledged,
                    if step.checks.iter().all(|c| c.passed) {
                        "passed"
                    } else {
                        "FAILED"
                    }
                ));
                steps.push(step);
            }
            Err(why) => return Err(fail(&steps, format!("scenario {scenario}: {why}"))),
        }
    }
    Ok(steps)
}

fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a step panicked".into())
}

/// The fault `scenario` injects now, with `primary` the primary region and `leader` its
/// Raft leader.
fn plan_fault(topology: &LocalTopology, scenario: Scenario, primary: &str, leader: &str) -> Result<Fault, String> {
    let standby = topology
        .data_regions()
        .into_iter()
        .find(|r| r != primary)
        .unwrap_or_default();
    let within = |region: &str, a: &[String]| {
        let side: Vec<String> = a.to_vec();
        let region = region.to_string();
        topology.relays_where(move |r| {
            r.to_region == region
                && r.from_node.as_ref().is_some_and(|from| {
                    // A link crossing the cut, either way.
                    side.contains(from) != side.contains(&r.to)
                })
        })
    };
    let between = |a: &str, b: &str| {
        topology.relays_where(|r| {
            r.from_node.is_none()
                && ((r.from_region == a && r.to_region == b) || (r.from_region == b && r.to_region == a))
        })
    };
    Ok(match scenario {
        Scenario::LeaderKill => Fault::Kill {
            nodes: vec![leader.to_string()],
        },
        Scenario::LeaderPause => Fault::Pause {
            node: leader.to_string(),
            pid: topology.node(leader).pid.ok_or("the leader has no process")?,
        },
        Scenario::PartitionMinority => Fault::Links {
            relays: within(primary, &[leader.to_string()]),
            mode: RelayMode::Blackhole,
        },
        Scenario::PartitionMajority => {
            // The leader and enough others for a majority, cut off from the rest.
            let mut side = vec![leader.to_string()];
            let count = topology.region_nodes(primary).count();
            side.extend(
                topology
                    .region_nodes(primary)
                    .map(|n| n.name.clone())
                    .filter(|n| n != leader)
                    .take(count / 2),
            );
            Fault::Links {
                relays: within(primary, &side),
                mode: RelayMode::Blackhole,
            }
        }
        Scenario::RegionOutage => Fault::Kill {
            nodes: topology.region_nodes(primary).map(|n| n.name.clone()).collect(),
        },
        Scenario::LinkCut => Fault::Links {
            relays: between(primary, &standby),
            mode: RelayMode::Blackhole,
        },
        Scenario::LinkSlow => Fault::Links {
            relays: between(primary, &standby),
            mode: RelayMode::Delay(SLOW_LINK),
        },
        Scenario::RegionFailover => Fault::None {
            what: format!("planned failover from {primary} to {standby}"),
        },
        Scenario::Failback => Fault::None {
            what: format!("planned fail-back from {primary} to {}", topology.plan.primary()),
        },
        other => return Err(format!("scenario {other} is not built yet")),
    })
}

/// Injects `fault` (for the planned scenarios: asks for the operation).
async fn inject(topology: &mut LocalTopology, scenario: Scenario, fault: &Fault, primary: &str) -> Result<(), String> {
    match fault {
        Fault::Kill { nodes } => {
            for node in nodes {
                topology
                    .kill_node(node)
                    .map_err(|e| format!("cannot kill {node}: {e}"))?;
            }
        }
        Fault::Pause { node, .. } => {
            topology.pause_node(node).ok_or(format!("{node} is not running"))?;
        }
        Fault::Links { relays, mode } => topology
            .set_links(relays, *mode)
            .map_err(|e| format!("cannot set the links: {e}"))?,
        Fault::KillInstance { pid, .. } => {
            // SAFETY: the PID the instance's own health answer gave, a moment ago.
            unsafe {
                libc::kill(*pid as i32, libc::SIGKILL);
            }
        }
        Fault::None { .. } => {
            let to = match scenario {
                Scenario::Failback => topology.plan.primary().to_string(),
                _ => topology
                    .data_regions()
                    .into_iter()
                    .find(|r| r != primary)
                    .ok_or("no standby region")?,
            };
            let request = FailoverRequest {
                to: to.clone(),
                allow_data_loss: false,
                dry_run: false,
            };
            // Asked of the primary region: it hands over.
            let client = topology.region_client(primary);
            let answer = if scenario == Scenario::Failback {
                client.regions_failback(&request).await
            } else {
                client.regions_failover(&request).await
            };
            answer.map_err(|e| format!("the {scenario} to {to} was refused: {e}"))?;
        }
    }
    Ok(())
}

/// Undoes `fault` on `topology`.
pub fn undo(topology: &mut LocalTopology, fault: &Fault) -> std::io::Result<()> {
    match fault {
        Fault::Kill { nodes } => {
            for node in nodes {
                topology.start_node(node)?;
            }
        }
        Fault::Pause { node, pid } => topology.resume_node(node, *pid),
        Fault::Links { relays, .. } => topology.set_links(relays, RelayMode::Pass)?,
        Fault::KillInstance { .. } | Fault::None { .. } => {}
    }
    Ok(())
}

/// The monitor: samples every data region's leader, term, epoch and primary.
fn start_monitor(topology: &LocalTopology, zero: Instant) -> (Arc<Mutex<Vec<Sample>>>, AbortOnDrop) {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<(String, Client)> = topology
        .data_regions()
        .into_iter()
        .map(|r| {
            let client = topology.region_client(&r).with_deadline(Duration::from_millis(500));
            (r, client)
        })
        .collect();
    let sink = samples.clone();
    let task = tokio::spawn(async move {
        loop {
            for (region, client) in &clients {
                let status = client.cluster().await.ok();
                let regions = client.regions().await.ok();
                sink.lock().expect("samples lock").push(Sample {
                    at_ms: zero.elapsed().as_millis() as u64,
                    region: region.clone(),
                    leader: status.as_ref().and_then(|s| s.leader),
                    term: status.as_ref().map_or(0, |s| s.term),
                    epoch: regions.as_ref().map_or(0, |r| r.epoch),
                    primary: regions.map(|r| r.primary),
                });
            }
            tokio::time::sleep(SAMPLE_EVERY).await;
        }
    });
    (samples, AbortOnDrop(task))
}

/// A task that ends with its handle (a step that fails leaves no monitor behind).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The canary's writes in [`BUCKET_MS`] slices from `zero`.
fn buckets(history: &History, zero: Instant) -> Vec<Bucket> {
    let mut out: Vec<Bucket> = Vec::new();
    for write in history.writes() {
        let slot = write.answered.saturating_duration_since(zero).as_millis() as u64 / BUCKET_MS;
        while out.len() as u64 <= slot {
            out.push(Bucket {
                at_ms: out.len() as u64 * BUCKET_MS,
                acknowledged: 0,
                failed: 0,
                unknown: 0,
            });
        }
        let bucket = &mut out[slot as usize];
        match write.outcome {
            OpOutcome::Acknowledged { .. } => bucket.acknowledged += 1,
            OpOutcome::Failed => bucket.failed += 1,
            OpOutcome::Unknown => bucket.unknown += 1,
        }
    }
    out
}

async fn current_primary(client: &Client) -> Result<String, String> {
    let deadline = Instant::now() + RECOVERY_DEADLINE;
    loop {
        match client.regions().await {
            Ok(regions) => return Ok(regions.primary),
            Err(e) if Instant::now() >= deadline => return Err(format!("cannot read the primary region: {e}")),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn wait_leader(topology: &LocalTopology, region: &str) -> Result<String, String> {
    let deadline = Instant::now() + RECOVERY_DEADLINE;
    loop {
        if let Some(leader) = topology.leader(region).await {
            return Ok(leader);
        }
        if Instant::now() >= deadline {
            return Err(format!("region {region} has no leader"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn step(
    topology: &mut LocalTopology,
    journal: &mut Journal,
    scenario: Scenario,
    index: usize,
    started: Instant,
    budgets: Budgets,
) -> Result<Step, String> {
    let zero = Instant::now();
    let mut marks = Vec::new();
    let mark = |marks: &mut Vec<Mark>, label: &str| {
        marks.push(Mark {
            at_ms: zero.elapsed().as_millis() as u64,
            label: label.to_string(),
        })
    };
    let (samples, _monitor) = start_monitor(topology, zero);
    let client = Arc::new(topology.client().with_deadline(Duration::from_secs(2)));
    let prefix = format!("drill/{:02}-{}", index + 1, scenario.name());
    let canary = Workload::start(client.clone(), CANARY_WRITERS, &prefix);
    canary.wait_progress(20, RECOVERY_DEADLINE).await;
    let primary = current_primary(&client).await?;
    let leader = wait_leader(topology, &primary).await?;
    let fault = plan_fault(topology, scenario, &primary, &leader)?;
    let number = journal
        .injecting(scenario, &fault)
        .map_err(|e| format!("cannot write the journal: {e}"))?;
    let injected = Instant::now();
    mark(&mut marks, &format!("fault: {}", describe(&fault)));
    let injected_result = inject(topology, scenario, &fault, &primary).await;
    // A planned operation is done when its call returns; a fault at once.
    let done = Instant::now();
    if matches!(fault, Fault::None { .. }) {
        mark(&mut marks, "operation answered");
    }
    // Recovery: a write sent after that acknowledged. The RTO is the longest time from the
    // fault to then that nothing was acknowledged.
    let deadline = injected + RECOVERY_DEADLINE;
    let recovered = loop {
        if injected_result.is_err() {
            break None;
        }
        if let Some(after) = canary.history.first_ack_after(done) {
            break Some(done + after);
        }
        if Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let rto = recovered.map(|at| canary.history.longest_gap_without_ack(injected, at));
    if let Some(at) = recovered {
        marks.push(Mark {
            at_ms: at.duration_since(zero).as_millis() as u64,
            label: "recovered: a write sent after it acknowledged".into(),
        });
    }
    // Undo, whatever happened.
    undo(topology, &fault).map_err(|e| format!("cannot undo the fault: {e}"))?;
    journal
        .undone(number)
        .map_err(|e| format!("cannot write the journal: {e}"))?;
    mark(&mut marks, "undone");
    injected_result?;
    canary.wait_progress(20, RECOVERY_DEADLINE).await;
    let history = canary.stop().await;
    topology.wait_healthy(HEALTHY_DEADLINE).await?;
    mark(&mut marks, "healthy");
    let primary_now = current_primary(&client).await?;
    let reader = topology.region_client(&primary_now);
    let state = crate::workload::final_state(&reader, &prefix).await;
    let lost = history.lost_acknowledged_writes(&state);
    let failed_applied = history.failed_but_applied(&state);
    let order = history.revision_order_violations();
    let overlap = epochs_overlap(&history.epoch_acks());
    let acknowledged = history.acknowledged();
    let reported_rpo = if primary_now != primary {
        failover_event(&reader).await
    } else {
        None
    };
    let mut checks = vec![
        if scenario.promises_no_loss() {
            Check {
                name: "no acknowledged write lost".into(),
                passed: lost.is_empty(),
                detail: format!("{} of {acknowledged} missing", lost.len()),
            }
        } else {
            Check {
                name: "acknowledged writes lost, within what the failover reported".into(),
                passed: true,
                detail: format!(
                    "{} of {acknowledged} missing; the failover said: {}",
                    lost.len(),
                    reported_rpo.as_deref().unwrap_or("nothing")
                ),
            }
        },
        Check {
            name: "no refused write applied".into(),
            passed: failed_applied.is_empty(),
            detail: format!("{} refused writes found applied", failed_applied.len()),
        },
        Check {
            name: "each writer's acknowledged revisions increase".into(),
            passed: order.is_empty() || !scenario.promises_no_loss(),
            detail: format!("{} out of order", order.len()),
        },
    ];
    checks.push(Check {
        name: "no two writable regions (epochs)".into(),
        passed: overlap.is_none(),
        detail: match overlap {
            Some((older, newer)) => format!(
                "epoch {} acknowledged a write sent after epoch {} had acknowledged one",
                older.epoch, newer.epoch
            ),
            None => "no older epoch acknowledged a write sent after a newer one answered".into(),
        },
    });
    let rto_ms = rto.map(|d| d.as_millis() as u64);
    let within_budget = rto_ms.is_some_and(|ms| ms <= budgets.rto_ms) && lost.len() as u64 <= budgets.rpo_writes;
    let samples = samples.lock().expect("samples lock").clone();
    Ok(Step {
        scenario,
        injected_at_ms: injected.duration_since(started).as_millis() as u64,
        fault_at_ms: injected.duration_since(zero).as_millis() as u64,
        fault: describe(&fault),
        rto_ms,
        acknowledged,
        lost: lost.len(),
        reported_rpo,
        checks,
        within_budget,
        marks,
        samples,
        writes: buckets(&history, zero),
    })
}

/// The newest region failover event's words, as the new primary region keeps them.
async fn failover_event(client: &Client) -> Option<String> {
    let events = client.events(Some("region"), None).await.ok()?.events;
    events
        .into_iter()
        .rev()
        .find(|e| e.action == "region.failover" || e.action == "region.failback")
        .map(|e| e.detail)
}

/// A fault in words.
pub fn describe(fault: &Fault) -> String {
    match fault {
        Fault::Kill { nodes } => format!("SIGKILL {}", nodes.join(", ")),
        Fault::Pause { node, pid } => format!("SIGSTOP {node} (pid {pid})"),
        Fault::Links { relays, mode } => format!("{} links set to {mode:?}", relays.len()),
        Fault::KillInstance { service, instance, pid } => format!("SIGKILL {service}/{instance} (pid {pid})"),
        Fault::None { what } => what.clone(),
    }
}

/// What [`cleanup`] did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Cleanup {
    /// The faults undone, in words.
    pub undone: Vec<String>,
    /// Whether a topology the drill started was found running.
    pub topology_found: bool,
    /// Whether it was healthy once the faults were undone.
    pub healthy: Option<bool>,
    /// Why not, when not.
    pub unhealthy: Option<String>,
    /// Whether it was then stopped.
    pub stopped: bool,
}

/// Undoes every fault the journal in `dir` holds and never saw undone (newest first), then
/// checks that the drill's own topology, if one is still running, is healthy, and stops it
/// unless `keep`.
pub async fn cleanup(dir: &Path, keep: bool) -> Result<Cleanup, String> {
    let pending = journal::pending(dir).map_err(|e| format!("cannot read the journal in {}: {e}", dir.display()))?;
    let topology_dir = dir.join("topology");
    let mut topology = match LocalTopology::load(&topology_dir) {
        Ok(t) if !t.stopped => Some(t),
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot read {}: {e}", topology_dir.display())),
    };
    let journal = Journal::open(dir).map_err(|e| format!("cannot open the journal: {e}"))?;
    let mut done = Cleanup {
        topology_found: topology.is_some(),
        ..Cleanup::default()
    };
    for (number, scenario, fault) in pending {
        match topology.as_mut() {
            Some(topology) => undo(topology, &fault).map_err(|e| format!("cannot undo step {number}: {e}"))?,
            None if matches!(fault, Fault::None { .. } | Fault::KillInstance { .. }) => {}
            None => {
                return Err(format!(
                    "step {number} ({scenario}: {}) cannot be undone: its topology is gone",
                    describe(&fault)
                ))
            }
        }
        journal
            .undone(number)
            .map_err(|e| format!("cannot write the journal: {e}"))?;
        done.undone.push(format!("{scenario}: {}", describe(&fault)));
    }
    if let Some(mut topology) = topology {
        let health = topology.wait_healthy(HEALTHY_DEADLINE).await;
        done.healthy = Some(health.is_ok());
        done.unhealthy = health.err();
        if !keep {
            topology.stop().map_err(|e| format!("cannot stop the topology: {e}"))?;
            done.stopped = true;
        }
    }
    Ok(done)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
