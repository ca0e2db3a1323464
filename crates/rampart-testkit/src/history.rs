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
    /// When it was sent, and when its outcome was known.
    pub sent: std::time::Instant,
    pub answered: std::time::Instant,
    /// The region epoch that acknowledged it, when the answer said.
    pub epoch: Option<u64>,
}

/// A thread-safe log of writes.
#[derive(Debug, Default)]
pub struct History {
    writes: Mutex<Vec<WriteRecord>>,
}

impl History {
    pub fn record(&self, client: usize, key: &str, value: &str, outcome: OpOutcome) {
        self.record_sent(client, key, value, outcome, std::time::Instant::now());
    }

    /// The same, for a write sent at `sent` (its outcome is known now).
    pub fn record_sent(&self, client: usize, key: &str, value: &str, outcome: OpOutcome, sent: std::time::Instant) {
        self.record_epoch(client, key, value, outcome, sent, None);
    }

    /// The same, with the region epoch that acknowledged it.
    pub fn record_epoch(
        &self,
        client: usize,
        key: &str,
        value: &str,
        outcome: OpOutcome,
        sent: std::time::Instant,
        epoch: Option<u64>,
    ) {
        self.writes.lock().expect("history lock").push(WriteRecord {
            client,
            key: key.to_string(),
            value: value.to_string(),
            outcome,
            sent,
            answered: std::time::Instant::now(),
            epoch,
        });
    }

    /// How long after `at` the first write sent after it was acknowledged (what a client
    /// saw as downtime from then on); none if none was.
    pub fn first_ack_after(&self, at: std::time::Instant) -> Option<std::time::Duration> {
        self.writes()
            .iter()
            .filter(|w| w.sent >= at && matches!(w.outcome, OpOutcome::Acknowledged { .. }))
            .map(|w| w.answered.duration_since(at))
            .min()
    }

    /// The longest time within `from..=to` that no write was acknowledged: what a client
    /// saw as the outage, whether it began at `from` (a kill) or later (a planned
    /// handover, when writes stop for a moment after the operation began).
    pub fn longest_gap_without_ack(&self, from: std::time::Instant, to: std::time::Instant) -> std::time::Duration {
        let mut acks: Vec<std::time::Instant> = self
            .writes()
            .iter()
            .filter(|w| matches!(w.outcome, OpOutcome::Acknowledged { .. }))
            .map(|w| w.answered)
            .filter(|at| *at > from && *at < to)
            .collect();
        acks.sort();
        let mut longest = std::time::Duration::ZERO;
        let mut last = from;
        for at in acks.into_iter().chain([to]) {
            longest = longest.max(at.duration_since(last));
            last = at;
        }
        longest
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

/// One acknowledged write as a client saw it: when it sent it, when the answer came, and
/// the region epoch that acknowledged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochAck {
    pub sent: std::time::Instant,
    pub answered: std::time::Instant,
    pub epoch: u64,
}

impl History {
    /// The acknowledged writes that carry their epoch, for [`epochs_overlap`].
    pub fn epoch_acks(&self) -> Vec<EpochAck> {
        self.writes()
            .iter()
            .filter(|w| matches!(w.outcome, OpOutcome::Acknowledged { .. }))
            .filter_map(|w| {
                Some(EpochAck {
                    sent: w.sent,
                    answered: w.answered,
                    epoch: w.epoch?,
                })
            })
            .collect()
    }
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

/// One write a service's primary acknowledged, as a client saw it: when it was sent and
/// answered, which instance answered and under which fencing token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryAck {
    pub instance: String,
    pub token: u64,
    pub sent: std::time::Instant,
    pub answered: std::time::Instant,
}

/// Safety rule 4 on one service's history: at most one primary at a time. A violation is
/// one token acknowledged by two instances, or a write acknowledged under an older token
/// that was *sent* after a write under a newer token had been answered (the old primary
/// still took writes once the new one did). Returns the first pair found.
pub fn two_primaries(acks: &[PrimaryAck]) -> Option<(PrimaryAck, PrimaryAck)> {
    let mut holder: BTreeMap<u64, &PrimaryAck> = BTreeMap::new();
    for ack in acks {
        let first = holder.entry(ack.token).or_insert(ack);
        if first.instance != ack.instance {
            return Some(((*first).clone(), ack.clone()));
        }
        if ack.answered < first.answered {
            *first = ack;
        }
    }
    acks.iter().find_map(|older| {
        holder
            .range(older.token + 1..)
            .map(|(_, newer)| *newer)
            .find(|newer| newer.answered < older.sent)
            .map(|newer| (older.clone(), newer.clone()))
    })
}

/// One operation on a register (one key) as a client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterOp {
    pub call: RegisterCall,
    /// When it was sent (any clock shared by every client of the history, e.g. ms).
    pub sent: u64,
    /// When its answer came; none when the outcome is unknown (a write that may or may not
    /// have taken effect; a read without an answer says nothing and is left out).
    pub answered: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegisterCall {
    /// Values are unique per history, so a read names the write it saw.
    Write(String),
    /// What it returned (none: the key did not exist).
    Read(Option<String>),
}

/// The most operations [`linearizable`] checks in one history.
pub const REGISTER_OPS_MAX: usize = 64;

/// Whether a register's history is linearizable (Wing and Gong's search, with the states
/// already tried remembered): some order of the operations, each placed between its
/// sending and its answer, in which every read returns the last value written (`initial`
/// before any). A write with an unknown outcome may be placed anywhere after it was sent,
/// or not at all. Refuses histories of more than [`REGISTER_OPS_MAX`] operations.
pub fn linearizable(initial: Option<&str>, ops: &[RegisterOp]) -> Result<bool, String> {
    let ops: Vec<&RegisterOp> = ops
        .iter()
        .filter(|op| op.answered.is_some() || matches!(op.call, RegisterCall::Write(_)))
        .collect();
    if ops.len() > REGISTER_OPS_MAX {
        return Err(format!(
            "{} operations: at most {REGISTER_OPS_MAX} per register",
            ops.len()
        ));
    }
    let required: u64 = ops
        .iter()
        .enumerate()
        .filter(|(_, op)| op.answered.is_some())
        .fold(0, |mask, (i, _)| mask | 1 << i);
    let mut tried = std::collections::HashSet::new();
    Ok(place(&ops, required, 0, initial, &mut tried))
}

/// Places the next operation of `ops` after those in `done`, with the register at `value`.
fn place<'a>(
    ops: &[&'a RegisterOp],
    required: u64,
    done: u64,
    value: Option<&'a str>,
    tried: &mut std::collections::HashSet<(u64, Option<&'a str>)>,
) -> bool {
    if done & required == required {
        return true;
    }
    if !tried.insert((done, value)) {
        return false;
    }
    // An operation may come next only if it was sent before every remaining one answered.
    let horizon = ops
        .iter()
        .enumerate()
        .filter(|(i, _)| done & 1 << i == 0)
        .filter_map(|(_, op)| op.answered)
        .min()
        .unwrap_or(u64::MAX);
    for (i, op) in ops.iter().enumerate() {
        if done & 1 << i != 0 || op.sent > horizon {
            continue;
        }
        let next = match &op.call {
            RegisterCall::Write(written) => Some(written.as_str()),
            RegisterCall::Read(read) if read.as_deref() == value => value,
            RegisterCall::Read(_) => continue,
        };
        if place(ops, required, done | 1 << i, next, tried) {
            return true;
        }
    }
    false
}

/// Fencing tokens in the order they were won must strictly increase.
pub fn tokens_strictly_increase(tokens: &[u64]) -> bool {
    tokens.windows(2).all(|w| w[0] < w[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_gap_without_an_acknowledgement_is_found_wherever_it_falls() {
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        let history = History::default();
        let write = |sent: u64, answered: u64, outcome: OpOutcome| {
            let mut writes = history.writes.lock().unwrap();
            writes.push(WriteRecord {
                client: 0,
                key: format!("k{sent}"),
                value: String::new(),
                outcome,
                sent: at(sent),
                answered: at(answered),
                epoch: None,
            });
        };
        let ok = || OpOutcome::Acknowledged { revision: 1 };
        // Acknowledged at 10 and 20, refused until 300, then acknowledged again at 310.
        write(5, 10, ok());
        write(15, 20, ok());
        write(25, 300, OpOutcome::Failed);
        write(301, 310, ok());
        write(311, 320, ok());
        let ms = |d: std::time::Duration| d.as_millis();
        // From 0: the gap from 20 to 310, not the first acknowledgement's 10 ms.
        assert_eq!(ms(history.longest_gap_without_ack(at(0), at(320))), 290);
        // A kill at 100 recovered at 310.
        assert_eq!(ms(history.longest_gap_without_ack(at(100), at(310))), 210);
        // Nothing acknowledged in the window: all of it.
        assert_eq!(ms(history.longest_gap_without_ack(at(30), at(90))), 60);
    }

    #[test]
    fn two_primaries_are_found_by_token_and_by_real_time() {
        let t0 = std::time::Instant::now();
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        let ack = |instance: &str, token, sent, answered| PrimaryAck {
            instance: instance.into(),
            token,
            sent: at(sent),
            answered: at(answered),
        };
        // A clean handover: a's writes end before b's begin; one in flight across it
        // answered by a is no proof.
        let clean = [
            ack("a", 1, 0, 5),
            ack("a", 1, 10, 30),
            ack("b", 2, 20, 25),
            ack("b", 2, 40, 45),
        ];
        assert_eq!(two_primaries(&clean), None);
        // a answers a write sent after b had answered one: two primaries.
        let late = [ack("b", 2, 20, 25), ack("a", 1, 30, 35)];
        assert_eq!(two_primaries(&late), Some((late[1].clone(), late[0].clone())));
        // One token, two instances.
        let shared = [ack("a", 3, 0, 5), ack("b", 3, 10, 15)];
        assert!(two_primaries(&shared).is_some());
    }

    #[test]
    fn a_register_history_is_linearizable_or_not() {
        let write = |v: &str, sent, answered| RegisterOp {
            call: RegisterCall::Write(v.into()),
            sent,
            answered,
        };
        let read = |v: Option<&str>, sent, answered| RegisterOp {
            call: RegisterCall::Read(v.map(str::to_string)),
            sent,
            answered: Some(answered),
        };
        // Sequential and right.
        let ok = [
            write("1", 0, Some(1)),
            read(Some("1"), 2, 3),
            write("2", 4, Some(5)),
            read(Some("2"), 6, 7),
        ];
        assert_eq!(linearizable(None, &ok), Ok(true));
        // A stale read: 2 was written before the read began, yet it returned 1.
        let stale = [write("1", 0, Some(1)), write("2", 2, Some(3)), read(Some("1"), 4, 5)];
        assert_eq!(linearizable(None, &stale), Ok(false));
        // Concurrent: the read overlaps the write, either value is fine.
        let overlapping = [write("1", 0, Some(1)), write("2", 2, Some(6)), read(Some("1"), 3, 4)];
        assert_eq!(linearizable(None, &overlapping), Ok(true));
        // A write with an unknown outcome may have happened...
        let maybe = [write("1", 0, Some(1)), write("2", 2, None), read(Some("2"), 10, 11)];
        assert_eq!(linearizable(None, &maybe), Ok(true));
        // ...or not.
        let not = [write("1", 0, Some(1)), write("2", 2, None), read(Some("1"), 10, 11)];
        assert_eq!(linearizable(None, &not), Ok(true));
        // But a value read once cannot be unread: 2 then 1 again is not linearizable.
        let flip = [
            write("1", 0, Some(1)),
            write("2", 2, None),
            read(Some("2"), 10, 11),
            read(Some("1"), 12, 13),
        ];
        assert_eq!(linearizable(None, &flip), Ok(false));
        // A read of a value nobody wrote.
        assert_eq!(linearizable(None, &[read(Some("9"), 0, 1)]), Ok(false));
        assert_eq!(linearizable(Some("0"), &[read(Some("0"), 0, 1)]), Ok(true));
        let many: Vec<RegisterOp> = (0..65).map(|i| write(&i.to_string(), i, Some(i))).collect();
        assert!(linearizable(None, &many).is_err());
    }

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
