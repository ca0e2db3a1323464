//! `rampart drill`: disaster-recovery drills. `list` names the scenarios (their names are
//! fixed: schedules and scripts rely on them) with what each breaks and how it is undone;
//! `run` runs some against a region it starts itself (`--local`) and reports RTO, RPO and
//! the safety checks, exiting 1 when a budget is missed or a check fails
//! (docs/design/drills.md).

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use rampart_core::drill::{catalogue, Scenario};
use rampart_testkit::drill::{markdown, run_local, Budgets};

use crate::outcome::{print, Failure, Output};

#[derive(Subcommand, Debug)]
pub enum DrillCommand {
    /// The scenarios a drill can run: each name, the fault it injects and its undo
    List,
    /// Run scenarios in turn against a local region of three nodes it starts and stops
    /// itself; built so far: leader-kill, leader-pause, partition-minority
    Run {
        /// Scenario names (see `drill list`)
        #[arg(required = true, value_parser = scenario_arg)]
        scenarios: Vec<Scenario>,
        /// Write report.json and report.md here
        #[arg(long)]
        report_dir: Option<PathBuf>,
        /// Each scenario's recovery (fault to the first write sent after it and
        /// acknowledged) must take at most this long
        #[arg(long, default_value = "5s", value_parser = crate::outcome::duration_arg)]
        rto_budget: Duration,
        /// At most this many acknowledged writes may be lost
        #[arg(long, default_value_t = 0)]
        rpo_budget: u64,
    },
}

fn scenario_arg(text: &str) -> Result<Scenario, String> {
    text.parse()
}

pub async fn run(output: Output, command: DrillCommand) -> Result<(), Failure> {
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
            report_dir,
            rto_budget,
            rpo_budget,
        } => {
            let binary = std::env::current_exe().map_err(|e| Failure::failed(e.into()))?;
            let budgets = Budgets {
                rto_ms: rto_budget.as_millis() as u64,
                rpo_writes: rpo_budget,
            };
            let report = run_local(&binary, &scenarios, budgets)
                .await
                .map_err(|e| Failure::usage(anyhow::anyhow!(e)))?;
            let text = markdown(&report);
            if let Some(dir) = &report_dir {
                let written = std::fs::create_dir_all(dir)
                    .and_then(|()| {
                        std::fs::write(
                            dir.join("report.json"),
                            serde_json::to_vec_pretty(&report).expect("a report encodes"),
                        )
                    })
                    .and_then(|()| std::fs::write(dir.join("report.md"), &text));
                written.map_err(|e| {
                    Failure::failed(anyhow::anyhow!("cannot write the report into {}: {e}", dir.display()))
                })?;
            }
            print(output, &report, |_| text.trim_end().to_string());
            if !report.passed {
                return Err(Failure::failed(anyhow::anyhow!(
                    "the drill failed: a budget was missed or a safety check failed"
                )));
            }
        }
    }
    Ok(())
}
