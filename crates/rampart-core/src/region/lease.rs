//! The region lease (safety rule 5: at most one region accepts writes), as two plain state
//! machines with explicit time: the [`Holder`] (the primary region's leader, which may
//! acknowledge a write only while a majority of regions grant it the lease) and the
//! [`Grantor`] (every region, the witness and the primary's own included, which grants the
//! lease to at most one region per epoch and votes on who takes over).
//!
//! Like a Raft leader lease, and like etcd's leases, time here is each machine's own
//! monotonic clock in ms; no two clocks are compared. The argument for safety:
//! - A grantor promises each epoch to one region, durably, and never goes back to an older
//!   epoch: it refuses renewals of an epoch below its promise.
//! - The holder counts a grant from the moment it *sent* the renewal, which is before the
//!   grantor received it, and shortened by [`CLOCK_MARGIN_PERCENT`]: its lease ends on its
//!   clock no later than the grantor's grant ends on the grantor's.
//! - A candidate is promoted only with promises for its epoch from a majority, and only
//!   after each of those grantors' last grant (to anyone) has run out, waited on the
//!   candidate's clock lengthened by the same margin.
//! - Any majority that grants the old holder its lease shares a region with the
//!   candidate's majority; that region's last grant ran out before the promotion, and it
//!   grants no more after its promise. So the old holder's lease has ended.
//!
//! The clock assumption: any two regions' monotonic clocks run at rates within
//! [`CLOCK_MARGIN_PERCENT`]/2 % of real time (NTP keeps them within 0.05%). A node
//! paused between its check and its answer (a stopped process) is not covered: its answer
//! reports the epoch that acknowledged it, so a client can tell.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// The room left for clock rates: a holder's grant counts for this much less than granted,
/// and a candidate waits this much longer than a grantor reports.
pub const CLOCK_MARGIN_PERCENT: u64 = 5;

/// How long a grant counts for its holder, counted from when it asked: shortened by the
/// margin.
pub fn holder_counts_ms(lease_ms: u64) -> u64 {
    lease_ms * (100 - CLOCK_MARGIN_PERCENT) / 100
}

/// How long a candidate waits out a grant a grantor reports `remaining_ms` left on: longer
/// by the margin, and one more ms for the rounding.
pub fn wait_out_ms(remaining_ms: u64) -> u64 {
    if remaining_ms == 0 {
        return 0;
    }
    remaining_ms * (100 + CLOCK_MARGIN_PERCENT) / 100 + 1
}

/// The regions needed to grant a lease or promote a region: a majority of all of them
/// (this one, the witness and every other).
pub fn majority(regions: usize) -> usize {
    regions / 2 + 1
}

/// The fewest regions every majority shares one with. With two regions, one.
pub fn blocking(regions: usize) -> usize {
    regions - majority(regions) + 1
}

/// The promises a forced failover needs so that the primary it replaces, whose lease
/// needs `quorum` grants, cannot renew without one of them: after a normal epoch (a
/// majority's lease) a blocking set, with two regions the standby alone; after a forced
/// one (a blocking set's lease) a majority, so forced failovers cannot flip-flop.
pub fn forced_needs(regions: usize, quorum: usize) -> usize {
    regions - quorum + 1
}

/// A region's durable word: the lease of `epoch` is `region`'s. Given once per epoch, and
/// only for a newer epoch than the last.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Promise {
    pub epoch: u64,
    pub region: String,
}

/// The primary's leader asks every region to grant (or extend) its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewal {
    pub epoch: u64,
    /// The region that holds the lease.
    pub holder: String,
    /// Increases with every renewal, across the holder's leaders (see [`Holder::new`]).
    pub seq: u64,
    pub lease_ms: u64,
    /// The holder's last committed revision: what a region that takes over will know was
    /// written, beyond what it received (the RPO report).
    pub committed_revision: u64,
}

/// Why a standby asks for a vote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum VoteKind {
    /// Automatic failover: the primary region was lost.
    Lost,
    /// An operator's `failover --allow-data-loss`: no contact or ranking required.
    Forced,
    /// A planned failover: the holder itself asks, having stopped acknowledging, and it
    /// counts no grant it asked for up to `released_seq`.
    Planned { holder: String, released_seq: u64 },
}

/// A request for this region's promise of `epoch` to `candidate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VoteRequest {
    pub epoch: u64,
    pub candidate: String,
    /// The candidate's shipped revision when it asked.
    pub revision: u64,
    #[serde(flatten)]
    pub kind: VoteKind,
}

/// What the voting region sees for itself, for an automatic failover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VoteFacts<'a> {
    /// This region has not heard from the primary region for the silence a failover
    /// needs (`takeover::required_silence_ms`).
    pub primary_lost: bool,
    /// A standby this region reaches that is ahead of the candidate (more revisions, or as
    /// many and first in name order): it should take over instead.
    pub better: Option<&'a str>,
}

/// The primary's last report as one grantor received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub committed_revision: u64,
    /// How long before the answer it arrived.
    pub age_ms: u64,
}

/// A grantor's answer to a renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "answer")]
pub enum RenewAnswer {
    Granted {
        seq: u64,
    },
    /// This region promised a newer epoch, or this one to another region.
    Refused {
        promise: Promise,
    },
}

/// A grantor's answer to a vote request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "answer")]
pub enum VoteAnswer {
    /// Promised. The candidate waits `remaining_ms` (this region's last grant to anyone,
    /// left to run) before it is promoted.
    Granted {
        remaining_ms: u64,
        report: Option<Report>,
    },
    Refused {
        reason: String,
        promise: Option<Promise>,
    },
}

/// A decision, and the promise to make durable before the answer goes out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided<A> {
    pub persist: Option<Promise>,
    pub answer: A,
}

/// The last grant a region gave, on its own clock.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    holder: String,
    seq: u64,
    until_ms: u64,
}

/// One region's side of the lease: its promise (durable, kept by the caller) and its last
/// grant and the primary's last report (soft: a new leader or a restarted witness assumes
/// a grant to its promised holder runs a whole lease from its start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grantor {
    promise: Option<Promise>,
    grant: Option<Grant>,
    report: Option<(u64, u64)>,
}

impl Grantor {
    /// The grantor of a region whose durable promise is `promise`, starting at `now_ms`:
    /// like etcd's leases on a new leader, a grant it may have given runs from now.
    pub fn new(now_ms: u64, promise: Option<Promise>, lease_ms: u64) -> Grantor {
        let grant = promise.as_ref().map(|p| Grant {
            holder: p.region.clone(),
            seq: u64::MAX,
            until_ms: now_ms + lease_ms,
        });
        Grantor {
            promise,
            grant,
            report: None,
        }
    }

    pub fn promise(&self) -> Option<&Promise> {
        self.promise.as_ref()
    }

    /// The holder's last report (its committed revision) as this region received it, with
    /// its age at `now_ms`.
    pub fn report(&self, now_ms: u64) -> Option<Report> {
        self.report.map(|(revision, at_ms)| Report {
            committed_revision: revision,
            age_ms: now_ms.saturating_sub(at_ms),
        })
    }

    /// How long this region's last grant has left to run at `now_ms`.
    pub fn remaining_ms(&self, now_ms: u64) -> u64 {
        self.grant.as_ref().map_or(0, |g| g.until_ms.saturating_sub(now_ms))
    }

    /// The holder's renewal arrives at `now_ms`.
    pub fn renew(&mut self, now_ms: u64, renewal: &Renewal) -> Decided<RenewAnswer> {
        let asked = Promise {
            epoch: renewal.epoch,
            region: renewal.holder.clone(),
        };
        let persist = match &self.promise {
            Some(promise) if *promise == asked => None,
            Some(promise) if promise.epoch >= asked.epoch => {
                return Decided {
                    persist: None,
                    answer: RenewAnswer::Refused {
                        promise: promise.clone(),
                    },
                }
            }
            // A newer epoch's holder: it was promoted by a majority this region was not in.
            _ => Some(asked.clone()),
        };
        if persist.is_some() {
            self.promise = Some(asked);
        }
        self.grant = Some(Grant {
            holder: renewal.holder.clone(),
            seq: renewal.seq,
            until_ms: now_ms + renewal.lease_ms,
        });
        self.report = Some((renewal.committed_revision, now_ms));
        Decided {
            persist,
            answer: RenewAnswer::Granted { seq: renewal.seq },
        }
    }

    /// A vote request arrives at `now_ms`.
    pub fn vote(&mut self, now_ms: u64, request: &VoteRequest, facts: VoteFacts<'_>) -> Decided<VoteAnswer> {
        let asked = Promise {
            epoch: request.epoch,
            region: request.candidate.clone(),
        };
        let refuse = |reason: String, promise: Option<&Promise>| Decided {
            persist: None,
            answer: VoteAnswer::Refused {
                reason,
                promise: promise.cloned(),
            },
        };
        let already = self.promise.as_ref() == Some(&asked);
        if !already {
            if let Some(promise) = self.promise.as_ref().filter(|p| p.epoch >= asked.epoch) {
                return refuse(
                    format!("epoch {} is promised to {}", promise.epoch, promise.region),
                    Some(promise),
                );
            }
            match &request.kind {
                VoteKind::Lost if !facts.primary_lost => {
                    return refuse("this region still hears from the primary region".into(), None)
                }
                VoteKind::Lost => {
                    if let Some(better) = facts.better {
                        return refuse(format!("{better} is further ahead and reachable"), None);
                    }
                }
                VoteKind::Planned { holder, .. } => {
                    let holds = self
                        .promise
                        .as_ref()
                        .is_some_and(|p| p.region == *holder && p.epoch + 1 == asked.epoch);
                    if !holds {
                        return refuse(format!("{holder} does not hold the epoch before {}", asked.epoch), None);
                    }
                }
                VoteKind::Forced => {}
            }
        }
        // A planned handover: the holder counts no grant up to `released_seq`.
        let remaining_ms = match (&request.kind, &self.grant) {
            (VoteKind::Planned { holder, released_seq }, Some(g)) if g.holder == *holder && g.seq <= *released_seq => 0,
            _ => self.remaining_ms(now_ms),
        };
        let report = self.report(now_ms);
        let persist = (!already).then(|| asked.clone());
        self.promise = Some(asked);
        Decided {
            persist,
            answer: VoteAnswer::Granted { remaining_ms, report },
        }
    }
}

/// The primary region's leader's side of the lease: the renewals it sent, the grants it
/// got, and whether it may acknowledge a write now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    region: String,
    epoch: u64,
    lease_ms: u64,
    /// Grants needed: a majority of regions, or a blocking set after a forced failover
    /// (`EpochStart::lease_quorum`).
    quorum: usize,
    next_seq: u64,
    /// When each recent renewal went out, oldest first.
    sent: VecDeque<(u64, u64)>,
    /// The newest grant from each region: when its renewal went out.
    granted: BTreeMap<String, u64>,
    /// Grants asked for up to here no longer count (a planned handover).
    released_seq: Option<u64>,
}

/// Renewals remembered for their grants: later answers to older ones are ignored.
const SENT_KEPT: usize = 64;

impl Holder {
    /// The holder for `region` at `epoch`, needing `quorum` regions' grants, run by a leader
    /// of Raft term `term`: its renewals count from `term << 32`, so a later leader's are
    /// always higher than an earlier one's.
    pub fn new(region: &str, epoch: u64, lease_ms: u64, quorum: usize, term: u64) -> Holder {
        assert!(quorum >= 1, "a lease needs at least one grant");
        Holder {
            region: region.to_string(),
            epoch,
            lease_ms,
            quorum,
            next_seq: (term << 32) + 1,
            sent: VecDeque::new(),
            granted: BTreeMap::new(),
            released_seq: None,
        }
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The grants it needs.
    pub fn quorum(&self) -> usize {
        self.quorum
    }

    /// The renewal to send to every region (its own included) at `now_ms`.
    pub fn renewal(&mut self, now_ms: u64, committed_revision: u64) -> Renewal {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.sent.push_back((seq, now_ms));
        if self.sent.len() > SENT_KEPT {
            self.sent.pop_front();
        }
        Renewal {
            epoch: self.epoch,
            holder: self.region.clone(),
            seq,
            lease_ms: self.lease_ms,
            committed_revision,
        }
    }

    /// `from` granted renewal `seq`.
    pub fn granted(&mut self, from: &str, seq: u64) {
        if self.released_seq.is_some_and(|released| seq <= released) {
            return;
        }
        let Some(&(_, sent_ms)) = self.sent.iter().find(|(s, _)| *s == seq) else {
            return;
        };
        let newest = self.granted.entry(from.to_string()).or_insert(sent_ms);
        *newest = (*newest).max(sent_ms);
    }

    /// Until when (this clock) a majority's grants count, if they do.
    pub fn valid_until_ms(&self) -> Option<u64> {
        let mut ends: Vec<u64> = self
            .granted
            .values()
            .map(|sent| sent + holder_counts_ms(self.lease_ms))
            .collect();
        ends.sort_unstable_by(|a, b| b.cmp(a));
        ends.get(self.quorum - 1).copied()
    }

    /// How long from `now_ms` a majority's grants still count (0: none do).
    pub fn valid_for_ms(&self, now_ms: u64) -> u64 {
        self.valid_until_ms().map_or(0, |until| until.saturating_sub(now_ms))
    }

    /// The regions whose grants still count at `now_ms`, newest renewal first.
    pub fn granted_by(&self, now_ms: u64) -> Vec<String> {
        let counts = holder_counts_ms(self.lease_ms);
        let mut by: Vec<(&String, &u64)> = self
            .granted
            .iter()
            .filter(|(_, sent)| **sent + counts > now_ms)
            .collect();
        by.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        by.into_iter().map(|(region, _)| region.clone()).collect()
    }

    /// Whether a write may be acknowledged at `now_ms`.
    pub fn may_acknowledge(&self, now_ms: u64) -> bool {
        self.valid_until_ms().is_some_and(|until| now_ms < until)
    }

    /// A planned handover: from now on no grant asked for so far counts (the handover's
    /// votes tell grantors so); returns the last renewal released. Renewals sent later
    /// count again, so a handover called off resumes with the next renewal.
    pub fn release(&mut self) -> u64 {
        let released = self.next_seq - 1;
        self.released_seq = Some(released);
        self.granted.clear();
        released
    }
}

#[cfg(test)]
mod tests;
