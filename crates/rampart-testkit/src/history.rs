//! Operation histories and the checkers that read them.
//!
//! Workloads record every operation with its outcome: acknowledged, failed (certainly not
//! applied) or unknown (may have been applied). Checkers then test the safety rules against
//! the final state: no acknowledged write lost, fencing tokens strictly increasing.

use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpOutcome {
    /// The cluster acknowledged the write at this revision.
    Acknowledged { revision: u64 },
    /// The cluster refused it: it was not applied.
    Failed,
    /// No answer: it may or may not have been applied.
    Unknown,
}

#[derive(Debug, Clone)]
pub struct WriteRecord {
    pub client: usize,
    pub key: String,
    pub value: String,
    pub outcome: OpOutcome,
}

/// A thread-safe log of writes.
#[derive(Debug, Default)]
pub struct History {
    writes: Mutex<Vec<WriteRecord>>,
}

impl History {
    pub fn record(&self, client: usize, key: &str, value: &str, outcome: OpOutcome) {
        self.writes.lock().expect("history lock").push(WriteRecord {
            client,
            key: key.to_string(),
            value: value.to_string(),
            outcome,
        });
    }

    pub fn writes(&self) -> Vec<WriteRecord> {
        self.writes.lock().expect("history lock").clone()
    }

    pub fn acknowledged(&self) -> usize {
        self.writes()
            .iter()
            .filter(|w| matches!(w.outcome, OpOutcome::Acknowledged { .. }))
            .count()
    }

    /// Acknowledged writes whose value is not in `final_state`, for workloads that write
    /// each key once. Empty when none was lost.
    pub fn lost_acknowledged_writes(&self, final_state: &BTreeMap<String, String>) -> Vec<WriteRecord> {
        self.writes()
            .into_iter()
            .filter(|w| matches!(w.outcome, OpOutcome::Acknowledged { .. }))
            .filter(|w| final_state.get(&w.key) != Some(&w.value))
            .collect()
    }

    /// Writes answered `Failed` whose value is nevertheless in the final state: the cluster
    /// said "not applied" and applied it anyway.
    pub fn failed_but_applied(&self, final_state: &BTreeMap<String, String>) -> Vec<WriteRecord> {
        self.writes()
            .into_iter()
            .filter(|w| w.outcome == OpOutcome::Failed)
            .filter(|w| final_state.get(&w.key) == Some(&w.value))
            .collect()
    }

    /// Revisions acknowledged to one client must increase with each of its writes.
    pub fn revision_order_violations(&self) -> Vec<(usize, u64, u64)> {
        let mut last: BTreeMap<usize, u64> = BTreeMap::new();
        let mut violations = Vec::new();
        for w in self.writes() {
            if let OpOutcome::Acknowledged { revision } = w.outcome {
                if let Some(previous) = last.insert(w.client, revision) {
                    if revision <= previous {
                        violations.push((w.client, previous, revision));
                    }
                }
            }
        }
        violations
    }
}

/// Fencing tokens in the order they were won must strictly increase.
/// One acknowledged write as a client saw it: when it sent it, when the answer came, and
/// the region epoch that acknowledged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochAck {
    pub sent: std::time::Instant,
    pub answered: std::time::Instant,
    pub epoch: u64,
}

/// Safety rule 5 on a history: two epochs never acknowledged writes in overlapping real
/// time. A violation is a write acknowledged by an older epoch that was *sent* after a
/// newer epoch had already acknowledged one (a write in flight across the change may be
/// answered by either, so only that order is a proof). Returns the first pair found.
pub fn epochs_overlap(acks: &[EpochAck]) -> Option<(EpochAck, EpochAck)> {
    // The earliest answer of each epoch.
    let mut first_answer: BTreeMap<u64, EpochAck> = BTreeMap::new();
    for ack in acks {
        let first = first_answer.entry(ack.epoch).or_insert(*ack);
        if ack.answered < first.answered {
            *first = *ack;
        }
    }
    acks.iter().find_map(|older| {
        first_answer
            .range(older.epoch + 1..)
            .map(|(_, newer)| newer)
            .find(|newer| newer.answered < older.sent)
            .map(|newer| (*older, *newer))
    })
}

pub fn tokens_strictly_increase(tokens: &[u64]) -> bool {
    tokens.windows(2).all(|w| w[0] < w[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_lost_acknowledged_write() {
        let history = History::default();
        history.record(0, "a", "1", OpOutcome::Acknowledged { revision: 1 });
        history.record(0, "b", "1", OpOutcome::Acknowledged { revision: 2 });
        history.record(0, "c", "1", OpOutcome::Unknown);
        let state = BTreeMap::from([("a".to_string(), "1".to_string())]);
        let lost = history.lost_acknowledged_writes(&state);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].key, "b");
    }

    #[test]
    fn finds_revisions_out_of_order() {
        let history = History::default();
        history.record(0, "a", "1", OpOutcome::Acknowledged { revision: 5 });
        history.record(0, "b", "1", OpOutcome::Acknowledged { revision: 4 });
        assert_eq!(history.revision_order_violations(), vec![(0, 5, 4)]);
        assert!(!tokens_strictly_increase(&[1, 3, 3]));
        assert!(tokens_strictly_increase(&[1, 3, 4]));
    }

    #[test]
    fn an_older_epoch_acknowledging_a_write_sent_after_a_newer_ones_answer_is_caught() {
        let start = std::time::Instant::now();
        let at = |ms: u64| start + std::time::Duration::from_millis(ms);
        let ack = |sent, answered, epoch| EpochAck {
            sent: at(sent),
            answered: at(answered),
            epoch,
        };
        // Epoch 1 until 100, epoch 2 from 150; a write in flight across the change.
        let fine = [ack(0, 10, 1), ack(90, 200, 1), ack(150, 160, 2), ack(170, 180, 2)];
        assert_eq!(epochs_overlap(&fine), None);
        let split = [ack(0, 10, 1), ack(150, 160, 2), ack(170, 175, 1)];
        assert_eq!(epochs_overlap(&split), Some((split[2], split[1])));
    }
}
