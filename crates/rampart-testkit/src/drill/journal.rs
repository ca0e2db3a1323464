//! The fault journal: `journal.jsonl` in a drill's directory. Each fault is written (and
//! synced) before it is injected, and its undo after it is undone, so whatever a killed
//! drill left is there to read: [`pending`] gives the faults injected and never undone.

use std::io::Write;
use std::path::{Path, PathBuf};

use rampart_core::drill::Scenario;
use serde::{Deserialize, Serialize};

use crate::relay::RelayMode;

/// A fault as the drill injected it, with what undoing it takes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Fault {
    /// Nodes SIGKILLed: undone by starting them again from their recorded command lines.
    Kill { nodes: Vec<String> },
    /// A node SIGSTOPped: undone by SIGCONT to that PID, if it is still that node's.
    Pause { node: String, pid: u32 },
    /// Relays set to `mode`: undone by setting them to pass.
    Links { relays: Vec<usize>, mode: RelayMode },
    /// A service instance's process SIGKILLed: undone by registering it again (its node
    /// starts it).
    KillInstance {
        service: String,
        instance: String,
        pid: u32,
    },
    /// A backup restored into a scratch region under `dir`: undone by stopping its nodes
    /// (every process with an argument under `dir`) and removing `dir`.
    Restore { dir: std::path::PathBuf },
    /// Operator commands run (`--endpoints`): undone by running `undo`, rendered when the
    /// fault was planned.
    Commands {
        what: String,
        run: Vec<String>,
        undo: Vec<String>,
    },
    /// A planned operation (a switchover, a region failover or fail-back) to `to`:
    /// nothing to undo.
    Planned { what: String, to: String },
}

/// One line of the journal.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Entry {
    Injecting {
        step: u64,
        scenario: Scenario,
        fault: Fault,
        at_ms: u64,
    },
    Undone {
        step: u64,
        at_ms: u64,
    },
}

const JOURNAL_FILE: &str = "journal.jsonl";

/// The journal of one drill.
pub struct Journal {
    path: PathBuf,
    next: u64,
}

impl Journal {
    /// Opens (or starts) the journal in `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Journal> {
        let path = dir.join(JOURNAL_FILE);
        // A line torn by a killed drill is ended, so the next one starts on its own.
        if let Ok(text) = std::fs::read(&path) {
            if text.last().is_some_and(|b| *b != b'\n') {
                std::fs::File::options().append(true).open(&path)?.write_all(b"\n")?;
            }
        }
        let next = entries(dir)?
            .iter()
            .filter_map(|e| match e {
                Entry::Injecting { step, .. } => Some(*step + 1),
                Entry::Undone { .. } => None,
            })
            .max()
            .unwrap_or(1);
        Ok(Journal { path, next })
    }

    /// Records `fault` before it is injected; returns its step number.
    pub fn injecting(&mut self, scenario: Scenario, fault: &Fault) -> std::io::Result<u64> {
        let step = self.next;
        self.next += 1;
        self.append(&Entry::Injecting {
            step,
            scenario,
            fault: fault.clone(),
            at_ms: now_ms(),
        })?;
        Ok(step)
    }

    /// Records that `step`'s fault was undone.
    pub fn undone(&self, step: u64) -> std::io::Result<()> {
        self.append(&Entry::Undone { step, at_ms: now_ms() })
    }

    fn append(&self, entry: &Entry) -> std::io::Result<()> {
        let mut file = std::fs::File::options().create(true).append(true).open(&self.path)?;
        let mut line = serde_json::to_vec(entry).expect("an entry encodes");
        line.push(b'\n');
        file.write_all(&line)?;
        file.sync_all()
    }
}

/// Every entry of the journal in `dir` (none when there is no journal). A torn last line
/// (the drill killed while writing it) is skipped: its fault was never injected.
pub fn entries(dir: &Path) -> std::io::Result<Vec<Entry>> {
    let text = match std::fs::read_to_string(dir.join(JOURNAL_FILE)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect())
}

/// The faults injected and never undone, newest first (the order to undo them in).
pub fn pending(dir: &Path) -> std::io::Result<Vec<(u64, Scenario, Fault)>> {
    let all = entries(dir)?;
    let undone: std::collections::BTreeSet<u64> = all
        .iter()
        .filter_map(|e| match e {
            Entry::Undone { step, .. } => Some(*step),
            Entry::Injecting { .. } => None,
        })
        .collect();
    let mut open: Vec<(u64, Scenario, Fault)> = all
        .into_iter()
        .filter_map(|e| match e {
            Entry::Injecting {
                step, scenario, fault, ..
            } if !undone.contains(&step) => Some((step, scenario, fault)),
            _ => None,
        })
        .collect();
    open.reverse();
    Ok(open)
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_is_pending_from_its_record_until_its_undo_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut journal = Journal::open(dir.path()).unwrap();
        let kill = Fault::Kill {
            nodes: vec!["east-1".into()],
        };
        let cut = Fault::Links {
            relays: vec![1, 2],
            mode: RelayMode::Blackhole,
        };
        let first = journal.injecting(Scenario::LeaderKill, &kill).unwrap();
        let second = journal.injecting(Scenario::PartitionMinority, &cut).unwrap();
        assert_eq!(
            pending(dir.path()).unwrap(),
            vec![
                (second, Scenario::PartitionMinority, cut.clone()),
                (first, Scenario::LeaderKill, kill.clone())
            ]
        );
        journal.undone(first).unwrap();
        // A drill killed while writing a line leaves half of it.
        let mut file = std::fs::File::options()
            .append(true)
            .open(dir.path().join(JOURNAL_FILE))
            .unwrap();
        file.write_all(b"{\"event\":\"undone\",\"st").unwrap();
        assert_eq!(
            pending(dir.path()).unwrap(),
            vec![(second, Scenario::PartitionMinority, cut)]
        );
        // A journal opened again numbers on.
        let mut again = Journal::open(dir.path()).unwrap();
        assert_eq!(again.injecting(Scenario::LeaderKill, &kill).unwrap(), second + 1);
    }
}
