//! `rampart drill run --local`: a drill against a topology it starts itself (a region of
//! three nodes, each peer link through a relay). For each scenario in turn: canary writers
//! put fresh keys through the API, the fault is injected, the first write sent after it
//! and acknowledged gives the RTO, the fault is undone, and once the region is whole again
//! the canary's acknowledged writes are looked for (the RPO) and the safety checkers run.
//! Scenarios not built yet are refused before anything starts.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use rampart_core::drill::Scenario;
use serde::Serialize;

use crate::{Cluster, ClusterOptions, RelayMode, Workload};

/// The scenarios `run_local` can run so far.
pub const LOCAL_SCENARIOS: [Scenario; 3] = [Scenario::LeaderKill, Scenario::LeaderPause, Scenario::PartitionMinority];

/// Canary writers per drill.
const CANARY_WRITERS: usize = 4;
/// How long recovery may take before the step fails.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(60);

/// What a drill is held to.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Budgets {
    pub rto_ms: u64,
    /// Acknowledged writes that may be lost.
    pub rpo_writes: u64,
}

/// One safety check's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    pub detail: String,
}

/// One scenario's measurements.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub scenario: Scenario,
    /// From the drill's start to the fault, ms.
    pub injected_at_ms: u64,
    /// Fault to the first write sent after it and acknowledged (none: no recovery).
    pub rto_ms: Option<u64>,
    pub acknowledged: usize,
    /// Acknowledged writes missing from the final state.
    pub lost: usize,
    pub checks: Vec<Check>,
    pub within_budget: bool,
}

/// A whole drill.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub budgets: Budgets,
    pub steps: Vec<Step>,
    /// Every step within budget and every check passed.
    pub passed: bool,
}

/// Runs `scenarios` in turn against a region it starts (and stops) itself.
pub async fn run_local(binary: &Path, scenarios: &[Scenario], budgets: Budgets) -> Result<Report, String> {
    if let Some(missing) = scenarios.iter().find(|s| !LOCAL_SCENARIOS.contains(s)) {
        let built: Vec<&str> = LOCAL_SCENARIOS.iter().map(|s| s.name()).collect();
        return Err(format!(
            "scenario {missing} is not built yet; built so far: {}",
            built.join(", ")
        ));
    }
    let options = ClusterOptions {
        nodes: 3,
        relays: true,
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(binary, options)
        .await
        .map_err(|e| format!("cannot start the region: {e}"))?;
    cluster.wait_for_leader(RECOVERY_DEADLINE).await;
    let started = Instant::now();
    let mut steps = Vec::new();
    for scenario in scenarios {
        // The waits inside a step panic past their deadline (the testkit's way): a drill
        // reports that as the step's failure instead.
        let ran = std::panic::AssertUnwindSafe(step(&mut cluster, *scenario, started, budgets))
            .catch_unwind()
            .await;
        match ran {
            Ok(done) => steps.push(done?),
            Err(panic) => {
                let said = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                cluster.stop_all();
                return Err(format!("scenario {scenario}: {said}"));
            }
        }
    }
    cluster.stop_all();
    let passed = steps
        .iter()
        .all(|s| s.within_budget && s.checks.iter().all(|c| c.passed));
    Ok(Report { budgets, steps, passed })
}

async fn step(cluster: &mut Cluster, scenario: Scenario, started: Instant, budgets: Budgets) -> Result<Step, String> {
    let client = Arc::new(cluster.client().with_deadline(Duration::from_secs(2)));
    let prefix = format!("drill/{}", scenario.name());
    let canary = Workload::start(client.clone(), CANARY_WRITERS, &prefix);
    canary.wait_progress(20, RECOVERY_DEADLINE).await;
    let leader = cluster.wait_for_leader(RECOVERY_DEADLINE).await;
    let injected = Instant::now();
    match scenario {
        Scenario::LeaderKill => cluster.kill(leader),
        Scenario::LeaderPause => cluster.pause(leader),
        Scenario::PartitionMinority => cluster.isolate(leader, RelayMode::Blackhole),
        other => return Err(format!("scenario {other} is not built yet")),
    }
    // Recovery: a write sent after the fault acknowledged.
    let deadline = injected + RECOVERY_DEADLINE;
    let rto = loop {
        if let Some(rto) = canary.history.first_ack_after(injected) {
            break Some(rto);
        }
        if Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // Undo, whatever happened.
    match scenario {
        Scenario::LeaderKill => cluster
            .restart(leader)
            .map_err(|e| format!("cannot restart node {leader}: {e}"))?,
        Scenario::LeaderPause => cluster.resume(leader),
        _ => cluster.heal(),
    }
    canary.wait_progress(20, RECOVERY_DEADLINE).await;
    let history = canary.stop().await;
    cluster.wait_converged(RECOVERY_DEADLINE).await;
    let state = crate::workload::final_state(&client, &prefix).await;
    let lost = history.lost_acknowledged_writes(&state);
    let failed_applied = history.failed_but_applied(&state);
    let order = history.revision_order_violations();
    let acknowledged = history.acknowledged();
    let checks = vec![
        Check {
            name: "no acknowledged write lost".into(),
            passed: lost.is_empty(),
            detail: format!("{} of {acknowledged} missing", lost.len()),
        },
        Check {
            name: "no refused write applied".into(),
            passed: failed_applied.is_empty(),
            detail: format!("{} refused writes found applied", failed_applied.len()),
        },
        Check {
            name: "each writer's acknowledged revisions increase".into(),
            passed: order.is_empty(),
            detail: format!("{} out of order", order.len()),
        },
    ];
    let rto_ms = rto.map(|d| d.as_millis() as u64);
    let within_budget = rto_ms.is_some_and(|ms| ms <= budgets.rto_ms) && lost.len() as u64 <= budgets.rpo_writes;
    Ok(Step {
        scenario,
        injected_at_ms: injected.duration_since(started).as_millis() as u64,
        rto_ms,
        acknowledged,
        lost: lost.len(),
        checks,
        within_budget,
    })
}

/// The report as Markdown.
pub fn markdown(report: &Report) -> String {
    let mut lines = vec![
        "# Rampart drill".to_string(),
        String::new(),
        format!(
            "Budgets: RTO {} ms, RPO {} acknowledged writes. Result: **{}**.",
            report.budgets.rto_ms,
            report.budgets.rpo_writes,
            if report.passed { "passed" } else { "failed" }
        ),
        String::new(),
        "| scenario | RTO | acknowledged | lost | within budget | checks |".to_string(),
        "|---|---|---|---|---|---|".to_string(),
    ];
    for step in &report.steps {
        let checks: Vec<String> = step
            .checks
            .iter()
            .map(|c| format!("{} {}", if c.passed { "✓" } else { "✗" }, c.name))
            .collect();
        lines.push(format!(
            "| {} | {} | {} | {} | {} | {} |",
            step.scenario,
            step.rto_ms.map_or("no recovery".to_string(), |ms| format!("{ms} ms")),
            step.acknowledged,
            step.lost,
            if step.within_budget { "yes" } else { "no" },
            checks.join("; ")
        ));
    }
    lines.join("\n") + "\n"
}
