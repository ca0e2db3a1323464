//! `rampart drill`: disaster-recovery drills. `list` names the scenarios (their names are
//! fixed: schedules and scripts rely on them) with what each breaks and how it is undone;
//! `run` runs some against a topology it starts itself (`--local`) and reports RTO, RPO and
//! the safety checks, exiting 1 when a budget is missed or a check fails; `cleanup` undoes
//! what a killed drill left; `history` lists past reports (docs/design/drills.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use rampart_core::drill::{catalogue, Scenario};
use rampart_testkit::drill::local::TopologyPlan;
use rampart_testkit::drill::remote::{Access, Commands};
use rampart_testkit::drill::report::{html, markdown, summarize, summary_markdown};
use rampart_testkit::drill::{
    check_local, check_remote, cleanup, default_plan, run_local, run_remote, Budgets, Cleanup, PlannedStep, Report,
};
use serde::{Deserialize, Serialize};

use crate::outcome::{print, Failure, Output};

#[derive(Subcommand, Debug)]
pub enum DrillCommand {
    /// The scenarios a drill can run: each name, the fault it injects and its undo
    List,
    /// Run scenarios in turn against a topology of local nodes it starts and stops itself
    /// (one region of three, or with a region scenario two regions and a witness; with a
    /// service scenario a sample service behind a proxy too, with postgres-primary-kill
    /// PostgreSQL behind it)
    Run {
        /// Scenario names (see `drill list`), run in this order
        #[arg(required_unless_present = "plan", conflicts_with = "plan", value_parser = scenario_arg)]
        scenarios: Vec<Scenario>,
        /// A drill plan (TOML): `[drill]` with budgets and a topology file, and its
        /// `[[drill.steps]]` (scenario, and optionally rto_budget, rpo_budget, settle, hold)
        #[arg(long)]
        plan: Option<PathBuf>,
        /// The drill's directory: its journal, its topology while it runs, and
        /// report.json, report.md and report.html [default: DATA_DIR/drills/TIME-SCENARIO]
        #[arg(long)]
        report_dir: Option<PathBuf>,
        /// Where drills are kept when --report-dir is not given
        #[arg(long, env = "RAMPART_DATA_DIR", default_value = "./rampart-data")]
        data_dir: PathBuf,
        /// A topology file (TOML, `[[regions]]` with name, nodes, witness, zones) instead
        /// of the default one
        #[arg(long, conflicts_with = "commands")]
        topology: Option<PathBuf>,
        /// With --endpoints (and --token-file, --cacert as any command), which drills that
        /// deployment instead of a local topology: the operator commands that break and
        /// mend its nodes (TOML: kill, start, pause, resume, cut, heal templates, and
        /// per-node [nodes.REGION-ID] overrides)
        #[arg(long)]
        commands: Option<PathBuf>,
        /// Run against a local topology the drill starts itself (the default)
        #[arg(long, conflicts_with = "commands")]
        local: bool,
        /// Each scenario's recovery (the longest time without an acknowledged write, from
        /// the fault until a write sent after it is acknowledged) must take at most this
        /// long [default: the plan's, else 5s]
        #[arg(long, value_parser = crate::outcome::duration_arg)]
        rto_budget: Option<Duration>,
        /// At most this many acknowledged writes may be lost in a scenario [default: the
        /// plan's, else 0]
        #[arg(long)]
        rpo_budget: Option<u64>,
        /// How long each fault stays at the least, even once writes go through again (a
        /// plan's steps may say otherwise with `hold`)
        #[arg(long, default_value = "5s", value_parser = crate::outcome::duration_arg)]
        hold: Duration,
        /// Run the whole drill this many times, each against a fresh topology (run-1,
        /// run-2, ... in the drill's directory), and summarise each scenario's RTO and RPO:
        /// median and worst (summary.md, summary.json)
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
        repeat: u32,
    },
    /// Undo whatever a drill that was killed left: faults it recorded and never undid
    /// (healed links, SIGCONT, killed nodes started again); then check that its topology
    /// is healthy and stop it
    Cleanup {
        /// One drill's directory [default: every drill under DATA_DIR/drills]
        dir: Option<PathBuf>,
        #[arg(long, env = "RAMPART_DATA_DIR", default_value = "./rampart-data")]
        data_dir: PathBuf,
        /// Leave the drill's topology running once it is healthy
        #[arg(long)]
        keep: bool,
    },
    /// Past drills and their results, newest first
    History {
        /// A directory of drills (or one drill's) [default: DATA_DIR/drills]
        dir: Option<PathBuf>,
        #[arg(long, env = "RAMPART_DATA_DIR", default_value = "./rampart-data")]
        data_dir: PathBuf,
    },
    /// Run the relays of a drill's topology (started by `drill run`, not by hand)
    #[command(hide = true)]
    Relays { dir: PathBuf },
}

fn scenario_arg(text: &str) -> Result<Scenario, String> {
    text.parse()
}

/// A drill plan file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    drill: PlanTable,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanTable {
    /// A topology file, relative to the plan's directory.
    topology: Option<PathBuf>,
    rto_budget: Option<String>,
    rpo_budget: Option<u64>,
    #[serde(default)]
    steps: Vec<PlanStep>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanStep {
    scenario: String,
    rto_budget: Option<String>,
    rpo_budget: Option<u64>,
    /// How long to let the topology settle before this step.
    settle: Option<String>,
    /// How long the fault stays at the least.
    hold: Option<String>,
}

fn plan_duration(field: &str, text: &str) -> Result<Duration, Failure> {
    rampart_core::duration::parse_duration(text)
        .map_err(|e| Failure::usage(anyhow::anyhow!("{field}: {text:?} is not a duration ({e})")))
}

/// The steps, budgets and topology file a plan gives; `--rto-budget`/`--rpo-budget`
/// replace the plan's defaults, a step's own budget wins for that step.
fn read_plan(
    path: &Path,
    rto: Option<Duration>,
    rpo: Option<u64>,
    hold: Duration,
) -> Result<(Vec<PlannedStep>, Budgets, Option<PathBuf>), Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(anyhow::anyhow!("cannot read {}: {e}", path.display())))?;
    let file: PlanFile =
        toml::from_str(&text).map_err(|e| Failure::usage(anyhow::anyhow!("{}: {}", path.display(), e.message())))?;
    let table = file.drill;
    let in_file = |e: Failure| Failure::usage(anyhow::anyhow!("{}: {}", path.display(), e.error));
    let defaults = Budgets {
        rto_ms: match (rto, &table.rto_budget) {
            (Some(d), _) => d.as_millis() as u64,
            (None, Some(text)) => plan_duration("drill.rto_budget", text).map_err(in_file)?.as_millis() as u64,
            (None, None) => DEFAULT_RTO.as_millis() as u64,
        },
        rpo_writes: rpo.or(table.rpo_budget).unwrap_or(0),
    };
    if table.steps.is_empty() {
        return Err(Failure::usage(anyhow::anyhow!(
            "{}: drill.steps: a plan needs at least one [[drill.steps]]",
            path.display()
        )));
    }
    let mut steps = Vec::new();
    for (i, step) in table.steps.iter().enumerate() {
        let field = |name: &str| format!("drill.steps[{i}].{name}");
        let scenario: Scenario = step
            .scenario
            .parse()
            .map_err(|e: String| Failure::usage(anyhow::anyhow!("{}: {}: {e}", path.display(), field("scenario"))))?;
        let rto_ms = match &step.rto_budget {
            Some(text) => plan_duration(&field("rto_budget"), text).map_err(in_file)?.as_millis() as u64,
            None => defaults.rto_ms,
        };
        let settle = match &step.settle {
            Some(text) => plan_duration(&field("settle"), text).map_err(in_file)?,
            None => Duration::ZERO,
        };
        steps.push(PlannedStep {
            scenario,
            budgets: Budgets {
                rto_ms,
                rpo_writes: step.rpo_budget.unwrap_or(defaults.rpo_writes),
            },
            settle,
            hold: match &step.hold {
                Some(text) => plan_duration(&field("hold"), text).map_err(in_file)?,
                None => hold,
            },
        });
    }
    let topology = table.topology.map(|t| path.parent().unwrap_or(Path::new(".")).join(t));
    Ok((steps, defaults, topology))
}

/// The RTO budget when neither a flag nor a plan gives one.
const DEFAULT_RTO: Duration = Duration::from_secs(5);

/// Reads a topology file, naming the field at fault.
fn read_topology(path: &Path) -> Result<TopologyPlan, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(anyhow::anyhow!("cannot read {}: {e}", path.display())))?;
    let plan: TopologyPlan =
        toml::from_str(&text).map_err(|e| Failure::usage(anyhow::anyhow!("{}: {}", path.display(), e.message())))?;
    plan.check()
        .map_err(|e| Failure::usage(anyhow::anyhow!("{}: {e}", path.display())))?;
    Ok(plan)
}

/// Writes report.json, report.md and report.html into `dir`.
fn write_report(dir: &Path, report: &Report) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_vec_pretty(report).expect("a report encodes"),
    )?;
    std::fs::write(dir.join("report.md"), markdown(report))?;
    std::fs::write(dir.join("report.html"), html(report))
}

/// One drill in `drill history`.
#[derive(Debug, Serialize)]
struct Past {
    dir: PathBuf,
    started_ms: u64,
    scenarios: Vec<Scenario>,
    passed: bool,
    worst_rto_ms: Option<u64>,
    lost: usize,
}

/// The drills under `dir` (or `dir` itself when it holds a report), newest first.
fn past_drills(dir: &Path) -> Result<Vec<Past>, Failure> {
    let read = |path: &Path| -> Option<Past> {
        let report: Report = serde_json::from_slice(&std::fs::read(path.join("report.json")).ok()?).ok()?;
        Some(Past {
            dir: path.to_path_buf(),
            started_ms: report.started_ms,
            worst_rto_ms: report.steps.iter().filter_map(|s| s.rto_ms).max(),
            lost: report.steps.iter().map(|s| s.lost).sum(),
            scenarios: report.scenarios,
            passed: report.passed,
        })
    };
    if let Some(one) = read(dir) {
        return Ok(vec![one]);
    }
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Failure::failed(anyhow::anyhow!("cannot read {}: {e}", dir.display()))),
    };
    let mut past: Vec<Past> = entries.flatten().filter_map(|e| read(&e.path())).collect();
    past.sort_by_key(|p| std::cmp::Reverse(p.started_ms));
    Ok(past)
}

/// The drills under `dir` that may have something to clean up: a journal or a topology.
fn drill_dirs(dir: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("journal.jsonl").exists() || p.join("topology").exists())
        .collect();
    dirs.sort();
    dirs
}

fn cleanup_text(dir: &Path, done: &Cleanup) -> String {
    let mut lines = vec![format!("{}:", dir.display())];
    if done.undone.is_empty() {
        lines.push("  no fault left to undo".into());
    }
    for fault in &done.undone {
        lines.push(format!("  undone: {fault}"));
    }
    match (done.topology_found, done.healthy) {
        (false, _) => lines.push("  no topology of its own still running".into()),
        (true, Some(true)) => lines.push("  its topology is healthy".into()),
        (true, _) => lines.push(format!(
            "  its topology is NOT healthy: {}",
            done.unhealthy.as_deref().unwrap_or("unknown")
        )),
    }
    if done.stopped {
        lines.push("  its topology was stopped".into());
    }
    lines.join("\n")
}

/// Reads an operator commands file, naming the field at fault.
fn read_commands(path: &Path) -> Result<Commands, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(anyhow::anyhow!("cannot read {}: {e}", path.display())))?;
    let commands: Commands =
        toml::from_str(&text).map_err(|e| Failure::usage(anyhow::anyhow!("{}: {}", path.display(), e.message())))?;
    commands
        .check()
        .map_err(|e| Failure::usage(anyhow::anyhow!("{}: {e}", path.display())))?;
    Ok(commands)
}

/// `access`: the deployment `--endpoints` names, when given on the command line.
pub async fn run(output: Output, command: DrillCommand, access: Option<Access>) -> Result<(), Failure> {
    match command {
        DrillCommand::List => {
            let scenarios = catalogue();
            print(output, &scenarios, |all| {
                let width = all.iter().map(|s| s.name.name().len()).max().unwrap_or(0);
                all.iter()
                    .map(|s| format!("{:width$}  {}; undo: {}", s.name.name(), s.fault, s.undo))
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        DrillCommand::Run {
            scenarios,
            plan: plan_file,
            report_dir,
            data_dir,
            topology,
            commands,
            local: _,
            rto_budget,
            rpo_budget,
            hold,
            repeat,
        } => {
            let (steps, budgets, planned_topology) = match &plan_file {
                Some(path) => read_plan(path, rto_budget, rpo_budget, hold)?,
                None => {
                    let budgets = Budgets {
                        rto_ms: rto_budget.unwrap_or(DEFAULT_RTO).as_millis() as u64,
                        rpo_writes: rpo_budget.unwrap_or(0),
                    };
                    let steps = scenarios
                        .iter()
                        .map(|scenario| PlannedStep {
                            scenario: *scenario,
                            budgets,
                            settle: Duration::ZERO,
                            hold,
                        })
                        .collect();
                    (steps, budgets, None)
                }
            };
            let scenarios: Vec<Scenario> = steps.iter().map(|s| s.scenario).collect();
            let remote = match (&commands, access) {
                (Some(path), Some(access)) => {
                    let commands = read_commands(path)?;
                    check_remote(&scenarios).map_err(|e| Failure::usage(anyhow::anyhow!(e)))?;
                    Some((access, commands))
                }
                (None, None) => None,
                (Some(_), None) => {
                    return Err(Failure::usage(anyhow::anyhow!(
                        "--commands drills an existing deployment: name it with --endpoints"
                    )))
                }
                (None, Some(_)) => {
                    return Err(Failure::usage(anyhow::anyhow!(
                        "--endpoints drills an existing deployment: give --commands FILE with the commands that break and mend its nodes (kill, start, pause, resume, cut, heal); without --endpoints the drill starts a local topology"
                    )))
                }
            };
            let plan = match topology.or(planned_topology) {
                Some(path) => read_topology(&path)?,
                None => default_plan(&scenarios),
            };
            if remote.is_none() {
                check_local(&scenarios, &plan).map_err(|e| Failure::usage(anyhow::anyhow!(e)))?;
            }
            let binary = std::env::current_exe().map_err(|e| Failure::failed(e.into()))?;
            let dir = report_dir.unwrap_or_else(|| {
                data_dir.join("drills").join(format!(
                    "{}-{}",
                    chrono::Utc::now().format("%Y%m%d-%H%M%S"),
                    scenarios[0]
                ))
            });
            let progress = |line: &str| eprintln!("{line}");
            let mut reports = Vec::new();
            for run in 1..=repeat {
                let run_dir = if repeat == 1 {
                    dir.clone()
                } else {
                    eprintln!("== run {run} of {repeat} ==");
                    dir.join(format!("run-{run}"))
                };
                eprintln!("drill in {}", run_dir.display());
                let drill = async {
                    match &remote {
                        Some((access, commands)) => {
                            run_remote(access.clone(), commands.clone(), &steps, budgets, &run_dir, &progress).await
                        }
                        None => run_local(&binary, &plan, &steps, budgets, &run_dir, &progress).await,
                    }
                };
                let report = tokio::select! {
                    report = drill => report.map_err(|e| Failure::usage(anyhow::anyhow!(e)))?,
                    _ = tokio::signal::ctrl_c() => {
                        eprintln!("interrupted: undoing every fault and stopping the topology");
                        let done = cleanup(&run_dir, false).await.map_err(|e| Failure::failed(anyhow::anyhow!(e)))?;
                        eprintln!("{}", cleanup_text(&run_dir, &done));
                        return Err(Failure::failed(anyhow::anyhow!("the drill was interrupted")));
                    }
                };
                write_report(&run_dir, &report).map_err(|e| {
                    Failure::failed(anyhow::anyhow!(
                        "cannot write the report into {}: {e}",
                        run_dir.display()
                    ))
                })?;
                if report.passed {
                    // The topology's data is not needed once everything passed.
                    let _ = std::fs::remove_dir_all(run_dir.join("topology"));
                }
                reports.push(report);
            }
            let failed: Vec<usize> = (0..reports.len()).filter(|i| !reports[*i].passed).collect();
            if repeat == 1 {
                let report = &reports[0];
                let text = markdown(report);
                print(output, report, |_| {
                    format!("{}\nreport: {}", text.trim_end(), dir.join("report.html").display())
                });
            } else {
                let summary = summarize(&reports);
                let text = summary_markdown(&summary, repeat as usize);
                std::fs::write(
                    dir.join("summary.json"),
                    serde_json::to_vec_pretty(&summary).expect("a summary encodes"),
                )
                .and_then(|()| std::fs::write(dir.join("summary.md"), &text))
                .map_err(|e| {
                    Failure::failed(anyhow::anyhow!("cannot write the summary into {}: {e}", dir.display()))
                })?;
                print(output, &summary, |_| text.trim_end().to_string());
            }
            if !failed.is_empty() {
                let runs: Vec<String> = failed.iter().map(|i| (i + 1).to_string()).collect();
                return Err(Failure::failed(anyhow::anyhow!(
                    "the drill failed{}: a budget was missed, a safety check failed or a step could not finish (reports and nodes' logs under {})",
                    if repeat == 1 { String::new() } else { format!(" in run {}", runs.join(", ")) },
                    dir.display()
                )));
            }
        }
        DrillCommand::Cleanup { dir, data_dir, keep } => {
            let dirs = match dir {
                Some(dir) => vec![dir],
                None => drill_dirs(&data_dir.join("drills")),
            };
            let mut all = Vec::new();
            let mut unhealthy = false;
            for dir in dirs {
                let done = cleanup(&dir, keep)
                    .await
                    .map_err(|e| Failure::failed(anyhow::anyhow!("{}: {e}", dir.display())))?;
                unhealthy |= done.healthy == Some(false);
                all.push((dir, done));
            }
            let shown: Vec<serde_json::Value> = all
                .iter()
                .map(|(dir, done)| serde_json::json!({"dir": dir, "cleanup": done}))
                .collect();
            print(output, &shown, |_| {
                if all.is_empty() {
                    "no drill to clean up".to_string()
                } else {
                    all.iter()
                        .map(|(dir, done)| cleanup_text(dir, done))
                        .collect::<Vec<_>>()
                        .join("\n")
                }
            });
            if unhealthy {
                return Err(Failure::failed(anyhow::anyhow!(
                    "a drill's topology is not healthy after the clean-up"
                )));
            }
        }
        DrillCommand::History { dir, data_dir } => {
            let past = past_drills(&dir.unwrap_or_else(|| data_dir.join("drills")))?;
            print(output, &past, |all| {
                if all.is_empty() {
                    return "no drill reports".to_string();
                }
                all.iter()
                    .map(|p| {
                        let started = chrono::DateTime::from_timestamp_millis(p.started_ms as i64)
                            .map_or_else(String::new, |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string());
                        let names: Vec<&str> = p.scenarios.iter().map(|s| s.name()).collect();
                        format!(
                            "{started}  {:6}  worst RTO {:>9}  lost {:>3}  {}  {}",
                            if p.passed { "passed" } else { "FAILED" },
                            p.worst_rto_ms.map_or("none".into(), |ms| format!("{ms} ms")),
                            p.lost,
                            names.join(","),
                            p.dir.display()
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
        }
        DrillCommand::Relays { dir } => {
            rampart_testkit::drill::local::run_relays(&dir)
                .await
                .map_err(|e| Failure::failed(anyhow::anyhow!("the relays stopped: {e}")))?;
        }
    }
    Ok(())
}
