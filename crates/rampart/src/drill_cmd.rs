//! `rampart drill`: disaster-recovery drills. `list` names the scenarios (their names are
//! fixed: schedules and scripts rely on them) with what each breaks and how it is undone.
//! Running them comes next (docs/design/drills.md).

use clap::Subcommand;
use rampart_core::drill::catalogue;

use crate::outcome::{print, Failure, Output};

#[derive(Subcommand, Debug)]
pub enum DrillCommand {
    /// The scenarios a drill can run: each name, the fault it injects and its undo
    List,
}

pub fn run(output: Output, command: DrillCommand) -> Result<(), Failure> {
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
    }
    Ok(())
}
