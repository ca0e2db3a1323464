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

mod canary;
mod faults;
pub mod journal;
pub mod local;
pub mod postgres;
pub mod remote;
pub mod report;
pub mod service;
pub mod target;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use rampart_client::Client;
use rampart_core::drill::Scenario;
use serde::{Deserialize, Serialize};

use crate::history::{epochs_overlap, two_primaries, History, OpOutcome, PrimaryAck};
use crate::Workload;
use canary::{Canaries, RegisterCanary};
use faults::{current_primary, inject, now, plan_fault, undo_restore};
pub use faults::{describe, undo};
use journal::{Fault, Journal};
use local::{LocalTopology, TopologyPlan};
use remote::{Access, Commands, Remote};
use target::Target;

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

/// One step of a drill: a scenario, the budgets it is held to, how long to let the
/// topology settle before it (a drill plan's `settle`), and how long its fault stays at
/// the least (`hold`: a partition healed the moment the first write got through would
/// test nothing).
#[derive(Debug, Clone, Copy)]
pub struct PlannedStep {
    pub scenario: Scenario,
    pub budgets: Budgets,
    pub settle: Duration,
    pub hold: Duration,
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
    /// What this step was held to.
    pub budgets: Budgets,
    /// The longest time from the fault until a write sent after it (after a planned
    /// operation's answer) was acknowledged, that no write was, on the slowest path (none:
    /// no recovery).
    pub rto_ms: Option<u64>,
    pub acknowledged: usize,
    /// Acknowledged writes missing from the final state, on every path.
    pub lost: usize,
    /// The RPO the failover said, when the scenario moved the primary region.
    pub reported_rpo: Option<String>,
    pub checks: Vec<Check>,
    pub within_budget: bool,
    pub marks: Vec<Mark>,
    pub samples: Vec<Sample>,
    /// Each way the canary wrote: `api`, and `proxy` (the sample service through the
    /// proxy) when the drill runs the service.
    pub paths: Vec<PathFigures>,
}

/// One canary path's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PathFigures {
    pub path: String,
    pub rto_ms: Option<u64>,
    pub acknowledged: usize,
    pub lost: usize,
    pub writes: Vec<Bucket>,
    /// Through the proxy: which instance acknowledged, under which fencing token, from
    /// when (one entry per change).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holders: Vec<Holder>,
}

/// The service primary that acknowledged the proxy canary's writes from `at_ms` on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    pub at_ms: u64,
    pub instance: String,
    pub token: u64,
}

/// The changes of acknowledging instance and token, in the order of the answers.
fn holders(acks: &[PrimaryAck], zero: Instant) -> Vec<Holder> {
    let mut sorted: Vec<&PrimaryAck> = acks.iter().collect();
    sorted.sort_by_key(|a| a.answered);
    let mut out: Vec<Holder> = Vec::new();
    for ack in sorted {
        if out
            .last()
            .is_none_or(|h| h.instance != ack.instance || h.token != ack.token)
        {
            out.push(Holder {
                at_ms: ack.answered.saturating_duration_since(zero).as_millis() as u64,
                instance: ack.instance.clone(),
                token: ack.token,
            });
        }
    }
    out
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

/// Refuses scenarios `run_local` cannot run in that order, or on `plan`, before anything
/// starts.
pub fn check_local(scenarios: &[Scenario], plan: &TopologyPlan) -> Result<(), String> {
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

/// Runs `planned` in turn against `plan`, started under `dir/topology`, with the journal
/// in `dir`. Whatever happens, the faults are undone and the topology stopped before it
/// returns; a step that fails ends the drill with the steps so far.
pub async fn run_local(
    binary: &Path,
    plan: &TopologyPlan,
    planned: &[PlannedStep],
    budgets: Budgets,
    dir: &Path,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Report, String> {
    let scenarios: Vec<Scenario> = planned.iter().map(|p| p.scenario).collect();
    check_local(&scenarios, plan)?;
    let started_ms = now_ms();
    let run = async {
        let mut target = Target::Local(start_local(binary, plan, planned, dir, progress).await?);
        run_steps(&mut target, planned, dir, progress).await
    };
    let outcome = std::panic::AssertUnwindSafe(run).catch_unwind().await;
    progress("undoing every fault and stopping the topology");
    let cleaned = cleanup(dir, false).await.map(|_| ());
    Ok(report(started_ms, scenarios, budgets, outcome, cleaned))
}

/// Runs `planned` in turn against the deployment `access` reaches, its faults through
/// `commands`, with the journal in `dir`. Whatever happens, the faults the journal holds
/// are undone before it returns, and the deployment is waited on to be healthy again.
pub async fn run_remote(
    access: Access,
    commands: Commands,
    planned: &[PlannedStep],
    budgets: Budgets,
    dir: &Path,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Report, String> {
    let scenarios: Vec<Scenario> = planned.iter().map(|p| p.scenario).collect();
    check_remote(&scenarios)?;
    let remote = Remote::discover(access, commands).await?;
    let names: Vec<&str> = remote.nodes.iter().map(|n| n.name.as_str()).collect();
    progress(&format!("drilling {} nodes: {}", names.len(), names.join(", ")));
    let mut target = Target::Remote(remote);
    target
        .wait_healthy(HEALTHY_DEADLINE)
        .await
        .map_err(|e| format!("the deployment is not healthy before the drill: {e}"))?;
    let started_ms = now_ms();
    let outcome = std::panic::AssertUnwindSafe(run_steps(&mut target, planned, dir, progress))
        .catch_unwind()
        .await;
    progress("undoing every fault");
    let cleaned = match cleanup(dir, false).await {
        Ok(_) => target.wait_healthy(HEALTHY_DEADLINE).await,
        Err(e) => Err(e),
    };
    Ok(report(started_ms, scenarios, budgets, outcome, cleaned))
}

/// Refuses scenarios `--endpoints` cannot run, or not in that order.
pub fn check_remote(scenarios: &[Scenario]) -> Result<(), String> {
    if let Some(missing) = scenarios.iter().find(|s| !remote::REMOTE_SCENARIOS.contains(s)) {
        let built: Vec<&str> = remote::REMOTE_SCENARIOS.iter().map(|s| s.name()).collect();
        return Err(format!(
            "scenario {missing} is not available with --endpoints; these are: {}",
            built.join(", ")
        ));
    }
    rampart_core::drill::check_sequence(scenarios)
}

type Partial = (Vec<Step>, String);

/// The report of a drill that ran (or stopped) with `outcome`, and cleaned up with
/// `cleaned`.
fn report(
    started_ms: u64,
    scenarios: Vec<Scenario>,
    budgets: Budgets,
    outcome: Result<Result<Vec<Step>, Partial>, Box<dyn std::any::Any + Send>>,
    cleaned: Result<(), String>,
) -> Report {
    let (steps, aborted) = match outcome {
        Ok(Ok(steps)) => (steps, None),
        Ok(Err((steps, why))) => (steps, Some(why)),
        Err(panic) => (Vec::new(), Some(panic_text(panic))),
    };
    let passed = aborted.is_none()
        && cleaned.is_ok()
        && steps
            .iter()
            .all(|s| s.within_budget && s.checks.iter().all(|c| c.passed));
    let aborted = match (aborted, cleaned) {
        (Some(why), _) => Some(why),
        (None, Err(why)) => Some(format!("clean-up failed: {why}")),
        (None, Ok(())) => None,
    };
    Report {
        started_ms,
        scenarios,
        budgets,
        steps,
        passed,
        aborted,
    }
}

/// Starts the drill's own topology under `dir/topology`, healthy, with the services the
/// steps need.
async fn start_local(
    binary: &Path,
    plan: &TopologyPlan,
    planned: &[PlannedStep],
    dir: &Path,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<LocalTopology, Partial> {
    let fail = |why: String| (Vec::new(), why);
    std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot make {}: {e}", dir.display())))?;
    let names: Vec<String> = plan
        .regions
        .iter()
        .map(|r| format!("{} ({})", r.name, r.nodes))
        .collect();
    progress(&format!("starting the topology: {}", names.join(", ")));
    let backups = planned.iter().any(|p| p.scenario == Scenario::BackupRestore);
    let mut topology = LocalTopology::start(binary, plan, &dir.join("topology"), backups)
        .map_err(|e| fail(format!("cannot start the topology: {e}")))?;
    topology
        .wait_healthy(HEALTHY_DEADLINE)
        .await
        .map_err(|e| fail(format!("the topology did not come up: {e}")))?;
    let kv = planned.iter().any(|p| p.scenario.needs_service());
    let pg = planned.iter().any(|p| p.scenario.needs_postgres());
    if kv || pg {
        let names: Vec<&str> = [(kv, service::SERVICE), (pg, postgres::PG_SERVICE)]
            .iter()
            .filter(|(on, _)| *on)
            .map(|(_, name)| *name)
            .collect();
        progress(&format!(
            "starting {}: an instance on each node of {}, behind a proxy",
            names.join(" and "),
            plan.primary()
        ));
        topology
            .start_services(kv, pg)
            .await
            .map_err(|e| fail(format!("the services did not come up: {e}")))?;
    }
    Ok(topology)
}

/// Runs each step in turn; the first that cannot finish ends the drill.
async fn run_steps(
    target: &mut Target,
    planned: &[PlannedStep],
    dir: &Path,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Vec<Step>, Partial> {
    let fail = |steps: &Vec<Step>, why: String| (steps.clone(), why);
    let mut steps = Vec::new();
    std::fs::create_dir_all(dir).map_err(|e| fail(&steps, format!("cannot make {}: {e}", dir.display())))?;
    let mut journal = Journal::open(dir).map_err(|e| fail(&steps, format!("cannot open the journal: {e}")))?;
    let started = Instant::now();
    let total = planned.len();
    for (
        i,
        PlannedStep {
            scenario,
            budgets,
            settle,
            hold,
        },
    ) in planned.iter().enumerate()
    {
        if !settle.is_zero() {
            progress(&format!(
                "[{}/{total}] letting the topology settle for {settle:?}",
                i + 1
            ));
            tokio::time::sleep(*settle).await;
        }
        progress(&format!("[{}/{total}] {scenario}: {}", i + 1, scenario.fault()));
        let ran = std::panic::AssertUnwindSafe(step(target, &mut journal, *scenario, i, started, *budgets, *hold))
            .catch_unwind()
            .await;
        let done = match ran {
            Ok(done) => done,
            Err(panic) => Err(panic_text(panic)),
        };
        match done {
            Ok(step) => {
                progress(&format!(
                    "[{}/{total}] {scenario}: RTO {}, {} of {} acknowledged writes lost, checks {}",
                    i + 1,
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

/// The monitor: samples every data region's leader, term, epoch and primary.
/// What the monitor has sampled so far.
type Samples = Arc<Mutex<Vec<Sample>>>;

fn start_monitor(target: &Target, zero: Instant) -> Result<(Samples, AbortOnDrop), String> {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let clients: Vec<(String, Client)> = target
        .data_regions()
        .into_iter()
        .map(|r| {
            let client = target.region_client(&r)?.with_deadline(Duration::from_millis(500));
            Ok((r, client))
        })
        .collect::<Result<_, String>>()?;
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
    Ok((samples, AbortOnDrop(task)))
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

async fn step(
    target: &mut Target,
    journal: &mut Journal,
    scenario: Scenario,
    index: usize,
    started: Instant,
    budgets: Budgets,
    hold: Duration,
) -> Result<Step, String> {
    let zero = Instant::now();
    let mut marks = Vec::new();
    let mark = |marks: &mut Vec<Mark>, label: &str| {
        marks.push(Mark {
            at_ms: zero.elapsed().as_millis() as u64,
            label: label.to_string(),
        })
    };
    let (samples, _monitor) = start_monitor(target, zero)?;
    let client = Arc::new(target.client()?.with_deadline(Duration::from_secs(2)));
    let prefix = format!("drill/{:02}-{}", index + 1, scenario.name());
    // Register reads go to the primary region only: a standby region serves reads of
    // what it has (documented), which no check should call a broken rule; and a scenario
    // that moves the primary region gets no register check.
    let register = if scenario.moves_primary_region() {
        None
    } else {
        let region = current_primary(&client).await?;
        let reads = Arc::new(target.region_client(&region)?.with_deadline(Duration::from_secs(2)));
        Some(RegisterCanary::start(reads, &prefix))
    };
    let canaries = Canaries {
        api: Workload::start(client.clone(), CANARY_WRITERS, &prefix),
        service: target
            .local()
            .and_then(|t| t.service.as_ref())
            .map(|s| service::ServiceCanary::start(s.proxy, CANARY_WRITERS, &prefix)),
        sql: target
            .local()
            .and_then(|t| t.postgres.as_ref())
            .map(|p| postgres::SqlCanary::start(p.proxy, CANARY_WRITERS, &prefix)),
        register,
    };
    canaries.wait_progress(20).await?;
    let before = now(target, &client).await?;
    let fault = plan_fault(target, scenario, &before).await?;
    let number = journal
        .injecting(scenario, &fault)
        .map_err(|e| format!("cannot write the journal: {e}"))?;
    let injected = Instant::now();
    mark(&mut marks, &format!("fault: {}", describe(&fault)));
    let injected_result = inject(target, scenario, &fault, &before.region).await;
    // A planned operation is done when its call returns; a fault at once.
    let done = Instant::now();
    if matches!(fault, Fault::Planned { .. }) {
        mark(&mut marks, "operation answered");
    }
    // Recovery: on every path, a write sent after that acknowledged.
    let deadline = injected + RECOVERY_DEADLINE;
    let recovered = loop {
        if injected_result.is_err() {
            break None;
        }
        if let Some(at) = canaries.recovered_after(done) {
            break Some(at);
        }
        if Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if let Some(at) = recovered {
        marks.push(Mark {
            at_ms: at.duration_since(zero).as_millis() as u64,
            label: "recovered: a write sent after it acknowledged on every path".into(),
        });
    }
    // The fault stays for `hold` at the least (a planned operation is over once answered).
    if !matches!(fault, Fault::Planned { .. }) && injected_result.is_ok() {
        tokio::time::sleep_until((injected + hold).into()).await;
    }
    // Undo, whatever happened.
    undo(target, &fault)
        .await
        .map_err(|e| format!("cannot undo the fault: {e}"))?;
    journal
        .undone(number)
        .map_err(|e| format!("cannot write the journal: {e}"))?;
    mark(&mut marks, "undone");
    let operation_checks = injected_result?;
    canaries.wait_progress(20).await?;
    // Each path's RTO: the longest time from the fault on that it acknowledged nothing,
    // until the canary stops (every path recovered, the fault undone, 20 more writes
    // acknowledged on each). A dying primary's last acknowledgements do not hide the gap
    // after them, nor does an outage the undo itself causes go uncounted.
    let end = Instant::now();
    let rto_of = |history: &History| {
        history
            .first_ack_after(done)
            .map(|_| history.longest_gap_without_ack(injected, end).as_millis() as u64)
    };
    let api_rto = rto_of(&canaries.api.history);
    let service_rto = canaries.service.as_ref().map(|c| rto_of(&c.history));
    let register = match canaries.register {
        Some(canary) => Some(canary.stop_and_check().await),
        None => None,
    };
    let api_history = canaries.api.stop().await;
    let sql_rto = canaries.sql.as_ref().map(|c| rto_of(&c.history));
    let sql_history = match canaries.sql {
        Some(canary) => Some(canary.stop().await),
        None => None,
    };
    let service_run = match canaries.service {
        Some(canary) => Some(canary.stop().await),
        None => None,
    };
    target.wait_healthy(HEALTHY_DEADLINE).await?;
    mark(&mut marks, "healthy");
    let after = now(target, &client).await?;
    let reader = target.region_client(&after.region)?;

    let state = crate::workload::final_state(&reader, &prefix).await;
    let lost = api_history.lost_acknowledged_writes(&state);
    let failed_applied = api_history.failed_but_applied(&state);
    let order = api_history.revision_order_violations();
    let overlap = epochs_overlap(&api_history.epoch_acks());
    let reported_rpo = if after.region != before.region {
        failover_event(&reader).await
    } else {
        None
    };
    let mut paths = vec![PathFigures {
        path: "api".into(),
        rto_ms: api_rto,
        acknowledged: api_history.acknowledged(),
        lost: lost.len(),
        writes: buckets(&api_history, zero),
        holders: Vec::new(),
    }];
    let mut checks = vec![
        if scenario.promises_no_loss() {
            Check {
                name: "no acknowledged write lost (API)".into(),
                passed: lost.is_empty(),
                detail: format!("{} of {} missing", lost.len(), api_history.acknowledged()),
            }
        } else {
            Check {
                name: "acknowledged writes lost (API), within what the failover reported".into(),
                passed: true,
                detail: format!(
                    "{} of {} missing; the failover said: {}",
                    lost.len(),
                    api_history.acknowledged(),
                    reported_rpo.as_deref().unwrap_or("nothing")
                ),
            }
        },
        Check {
            name: "no refused write applied (API)".into(),
            passed: failed_applied.is_empty(),
            detail: format!("{} refused writes found applied", failed_applied.len()),
        },
        Check {
            name: "each writer's acknowledged revisions increase (API)".into(),
            passed: order.is_empty() || !scenario.promises_no_loss(),
            detail: format!("{} out of order", order.len()),
        },
        Check {
            name: "no two writable regions (epochs)".into(),
            passed: overlap.is_none(),
            detail: match overlap {
                Some((older, newer)) => format!(
                    "epoch {} acknowledged a write sent after epoch {} had acknowledged one",
                    older.epoch, newer.epoch
                ),
                None => "no older epoch acknowledged a write sent after a newer one answered".into(),
            },
        },
    ];
    checks.extend(operation_checks);
    if let Some((keys, operations, broken)) = register {
        checks.push(Check {
            name: "a linearizable register".into(),
            passed: broken.is_none(),
            detail: broken
                .unwrap_or_else(|| format!("{operations} reads and writes of {keys} keys, each history linearizable")),
        });
    }
    if let (Some((history, acks)), Some(rto_ms), Some(primary)) = (service_run, service_rto, &after.instance) {
        let state = service::final_state(primary.addr).await?;
        let lost = history.lost_acknowledged_writes(&state);
        let applied = history.failed_but_applied(&state);
        checks.extend(service_checks(&history, &acks, lost.len(), applied.len()));
        paths.push(PathFigures {
            path: "proxy".into(),
            rto_ms,
            acknowledged: history.acknowledged(),
            lost: lost.len(),
            writes: buckets(&history, zero),
            holders: holders(&acks, zero),
        });
    }
    if let (Some(history), Some(rto_ms), Some(primary)) = (sql_history, sql_rto, &after.pg_primary) {
        let addr = SocketAddr::from(([127, 0, 0, 1], primary.port));
        let state = postgres::final_state(addr, &prefix).await?;
        let lost = history.lost_acknowledged_writes(&state);
        let applied = history.failed_but_applied(&state);
        checks.push(Check {
            name: "no acknowledged row lost (SQL; synchronous commit)".into(),
            passed: lost.is_empty(),
            detail: format!(
                "{} of {} missing from the new primary",
                lost.len(),
                history.acknowledged()
            ),
        });
        checks.push(Check {
            name: "no refused row applied (SQL)".into(),
            passed: applied.is_empty(),
            detail: format!("{} refused inserts found applied", applied.len()),
        });
        paths.push(PathFigures {
            path: "sql".into(),
            rto_ms,
            acknowledged: history.acknowledged(),
            lost: lost.len(),
            writes: buckets(&history, zero),
            holders: Vec::new(),
        });
    }
    let rto_ms = paths
        .iter()
        .map(|p| p.rto_ms)
        .collect::<Option<Vec<u64>>>()
        .and_then(|all| all.into_iter().max());
    let lost_total: usize = paths.iter().map(|p| p.lost).sum();
    let within_budget = rto_ms.is_some_and(|ms| ms <= budgets.rto_ms) && lost_total as u64 <= budgets.rpo_writes;
    let samples = samples.lock().expect("samples lock").clone();
    Ok(Step {
        scenario,
        injected_at_ms: injected.duration_since(started).as_millis() as u64,
        fault_at_ms: injected.duration_since(zero).as_millis() as u64,
        fault: describe(&fault),
        budgets,
        rto_ms,
        acknowledged: paths.iter().map(|p| p.acknowledged).sum(),
        lost: lost_total,
        reported_rpo,
        checks,
        within_budget,
        marks,
        samples,
        paths,
    })
}

/// The checks on the service path: no two primaries by fencing token, and what its
/// asynchronous replication lost (counted against the RPO budget, not a broken rule).
fn service_checks(history: &History, acks: &[PrimaryAck], lost: usize, applied: usize) -> Vec<Check> {
    let two = two_primaries(acks);
    vec![
        Check {
            name: "no two primaries of the service (fencing tokens)".into(),
            passed: two.is_none(),
            detail: match two {
                Some((a, b)) => format!(
                    "{} under token {} and {} under token {} both acknowledged",
                    a.instance, a.token, b.instance, b.token
                ),
                None => format!(
                    "{} acknowledgements, each token held by one instance and none after a newer one answered",
                    acks.len()
                ),
            },
        },
        Check {
            name: "acknowledged writes lost (proxy; asynchronous replication)".into(),
            passed: true,
            detail: format!("{lost} of {} missing from the new primary", history.acknowledged()),
        },
        Check {
            name: "no refused write applied (proxy)".into(),
            passed: applied == 0,
            detail: format!("{applied} refused writes found applied"),
        },
    ]
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
    let mut target = match LocalTopology::load(&topology_dir) {
        Ok(t) if !t.stopped => Some(Target::Local(t)),
        Ok(_) => None,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(format!("cannot read {}: {e}", topology_dir.display())),
    };
    let journal = Journal::open(dir).map_err(|e| format!("cannot open the journal: {e}"))?;
    let mut done = Cleanup {
        topology_found: target.is_some(),
        ..Cleanup::default()
    };
    for (number, scenario, fault) in pending {
        let undone = match (target.as_mut(), &fault) {
            (Some(target), _) => undo(target, &fault).await,
            // Without a topology of its own: what needs none.
            (None, Fault::Planned { .. }) => Ok(()),
            (None, Fault::Restore { dir }) => undo_restore(dir),
            (None, Fault::Commands { undo, .. }) => remote::run_commands(undo).await,
            (None, _) => Err("its topology is gone".to_string()),
        };
        undone.map_err(|e| format!("step {number} ({scenario}: {}) cannot be undone: {e}", describe(&fault)))?;
        journal
            .undone(number)
            .map_err(|e| format!("cannot write the journal: {e}"))?;
        done.undone.push(format!("{scenario}: {}", describe(&fault)));
    }
    if let Some(Target::Local(mut topology)) = target {
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
