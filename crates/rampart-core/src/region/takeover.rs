//! A region failover as the taking-over standby's leader runs it: which standby should
//! take over, how long the primary region must have been silent first (the anti-flap
//! rule), and the [`Campaign`] that gathers promises for the new epoch, waits out the old
//! lease and says what the failover may have lost (the RPO report, safety rule 7).
//!
//! Like the service failover episode, a step function: the node sends the vote requests,
//! hands every answer to [`Campaign::answered`] and carries out what [`Campaign::step`]
//! says at `now_ms` (its own monotonic clock).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::lease::{wait_out_ms, Promise, VoteAnswer};

/// A standby region as one region sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standby<'a> {
    pub name: &'a str,
    /// Its shipped revision.
    pub revision: u64,
}

/// Whether `a` should take over before `b`: more revisions (the least lag), then the
/// first name (the order regions are listed in the configuration, which keeps them by
/// name).
fn ahead(a: &Standby<'_>, b: &Standby<'_>) -> bool {
    (a.revision, std::cmp::Reverse(a.name)) > (b.revision, std::cmp::Reverse(b.name))
}

/// The standby that should take over among `standbys`.
pub fn best<'a>(standbys: &[Standby<'a>]) -> Option<&'a str> {
    standbys
        .iter()
        .copied()
        .reduce(|best, s| if ahead(&s, &best) { s } else { best })
        .map(|s| s.name)
}

/// A standby among `others` that should take over before `candidate`, if any.
pub fn better_than<'a>(candidate: &Standby<'_>, others: &[Standby<'a>]) -> Option<&'a str> {
    others
        .iter()
        .filter(|s| s.name != candidate.name && ahead(s, candidate))
        .map(|s| s.name)
        .next()
}

/// Failovers within this long count as recent for the anti-flap rule.
pub const FLAP_WINDOW_MS: u64 = 600_000;

/// How long the primary region must have been silent before an automatic failover, after
/// `recent` failovers within [`FLAP_WINDOW_MS`]: `region_timeout`, four times longer for
/// each recent one (at most 16 times). A flapping link heals within that and causes no
/// second failover; a primary that is really gone is still failed over, later. (Unlike a
/// fixed block after a recovery, which can refuse a failover that is needed.)
pub fn required_silence_ms(region_timeout_ms: u64, recent: usize) -> u64 {
    region_timeout_ms << (2 * recent.min(2))
}

/// What a failover may have lost, stated as what is known plus what cannot be: the
/// revisions the surviving regions know were committed and the new primary never received,
/// and how long after the last report the old primary may have committed more.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Rpo {
    /// The newest committed revision the old primary reported to any voter.
    pub reported_revision: Option<u64>,
    /// Revisions known committed that the new primary never received.
    pub revisions: u64,
    /// After its last report the old primary may have acknowledged writes for this long
    /// (its lease): any committed then are lost too, uncounted.
    pub window_ms: u64,
}

/// What the campaign is to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Not enough promises yet: ask again the regions that did not answer.
    Gathering { promised: usize, needed: usize },
    /// Promised; the old lease may still run until `until_ms`.
    WaitingOutLease { until_ms: u64 },
    /// Commit the new epoch.
    Promote { rpo: Rpo },
    /// Some region promised a newer epoch, or this one to another region: stop.
    Superseded { promise: Promise },
    /// No majority within the campaign's time: stop, and try again later if still needed.
    GaveUp { refusals: Vec<(String, String)> },
}

/// A promise received: when its grantor's last grant runs out, and the old primary's last
/// report it carried, both on this clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Promised {
    wait_until_ms: u64,
    report: Option<(u64, u64)>,
}

/// One standby's bid for `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Campaign {
    pub epoch: u64,
    needed: usize,
    deadline_ms: u64,
    promised: BTreeMap<String, Promised>,
    refusals: BTreeMap<String, String>,
    superseded: Option<Promise>,
}

impl Campaign {
    /// A bid for `epoch` needing `needed` promises (a majority; for a forced failover, a
    /// blocking set), started at `now_ms`, given up at `now_ms + timeout_ms`.
    pub fn new(epoch: u64, needed: usize, now_ms: u64, timeout_ms: u64) -> Campaign {
        Campaign {
            epoch,
            needed,
            deadline_ms: now_ms + timeout_ms,
            promised: BTreeMap::new(),
            refusals: BTreeMap::new(),
            superseded: None,
        }
    }

    /// Whether `region` has promised.
    pub fn has_promised(&self, region: &str) -> bool {
        self.promised.contains_key(region)
    }

    /// `from` answered at `now_ms`.
    pub fn answered(&mut self, now_ms: u64, from: &str, answer: &VoteAnswer) {
        match answer {
            VoteAnswer::Granted { remaining_ms, report } => {
                let report = report.map(|r| (r.committed_revision, now_ms.saturating_sub(r.age_ms)));
                let wait_until_ms = now_ms + wait_out_ms(*remaining_ms);
                // A repeated promise keeps the later wait: the grantor's own word on its
                // last grant, whichever answer said it.
                let entry = self
                    .promised
                    .entry(from.to_string())
                    .or_insert(Promised { wait_until_ms, report });
                entry.wait_until_ms = entry.wait_until_ms.max(wait_until_ms);
                entry.report = entry.report.max(report);
                self.refusals.remove(from);
            }
            VoteAnswer::Refused { reason, promise } => {
                if let Some(promise) = promise.as_ref().filter(|p| p.epoch >= self.epoch) {
                    self.superseded = Some(promise.clone());
                }
                if !self.promised.contains_key(from) {
                    self.refusals.insert(from.to_string(), reason.clone());
                }
            }
        }
    }

    /// What to do at `now_ms`, for a standby at shipped revision `own_revision`.
    pub fn step(&self, now_ms: u64, own_revision: u64) -> Step {
        if let Some(promise) = &self.superseded {
            return Step::Superseded {
                promise: promise.clone(),
            };
        }
        if self.promised.len() < self.needed {
            if now_ms >= self.deadline_ms {
                return Step::GaveUp {
                    refusals: self.refusals.iter().map(|(r, why)| (r.clone(), why.clone())).collect(),
                };
            }
            return Step::Gathering {
                promised: self.promised.len(),
                needed: self.needed,
            };
        }
        let until_ms = self.promised.values().map(|p| p.wait_until_ms).max().unwrap_or(0);
        if now_ms < until_ms {
            return Step::WaitingOutLease { until_ms };
        }
        let last = self.promised.values().filter_map(|p| p.report).max();
        let rpo = Rpo {
            reported_revision: last.map(|(revision, _)| revision),
            revisions: last.map_or(0, |(revision, _)| revision.saturating_sub(own_revision)),
            // From the last report to the end of the last grant: the old primary's lease
            // can have run no longer than that after it.
            window_ms: last.map_or(0, |(_, at_ms)| until_ms.saturating_sub(at_ms)),
        };
        Step::Promote { rpo }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::lease::Report;

    fn standby(name: &str, revision: u64) -> Standby<'_> {
        Standby { name, revision }
    }

    #[test]
    fn the_standby_with_least_lag_takes_over_then_the_first_by_name() {
        assert_eq!(best(&[standby("b", 10), standby("c", 12)]), Some("c"));
        assert_eq!(best(&[standby("c", 12), standby("b", 12)]), Some("b"));
        assert_eq!(best(&[]), None);
        let others = [standby("b", 10), standby("c", 12)];
        assert_eq!(better_than(&standby("b", 10), &others), Some("c"));
        assert_eq!(
            better_than(&standby("b", 12), &others),
            None,
            "as far, and first by name"
        );
        assert_eq!(better_than(&standby("c", 12), &others), None);
    }

    #[test]
    fn each_recent_failover_makes_the_next_wait_four_times_longer_up_to_sixteen() {
        assert_eq!(required_silence_ms(5_000, 0), 5_000);
        assert_eq!(required_silence_ms(5_000, 1), 20_000);
        assert_eq!(required_silence_ms(5_000, 2), 80_000);
        assert_eq!(required_silence_ms(5_000, 9), 80_000, "delayed, never blocked");
    }

    fn granted(remaining_ms: u64, report: Option<(u64, u64)>) -> VoteAnswer {
        VoteAnswer::Granted {
            remaining_ms,
            report: report.map(|(committed_revision, age_ms)| Report {
                committed_revision,
                age_ms,
            }),
        }
    }

    #[test]
    fn a_campaign_promotes_after_a_majority_and_the_old_lease_and_reports_the_rpo() {
        let mut campaign = Campaign::new(2, 2, 10_000, 10_000);
        assert_eq!(campaign.step(10_000, 90), Step::Gathering { promised: 0, needed: 2 });
        campaign.answered(10_100, "b", &granted(0, Some((95, 6_000))));
        campaign.answered(
            10_120,
            "a",
            &VoteAnswer::Refused {
                reason: "unreachable".into(),
                promise: None,
            },
        );
        assert_eq!(campaign.step(10_150, 90), Step::Gathering { promised: 1, needed: 2 });
        // The witness granted the old primary a lease 1 s before: 4 s are left.
        campaign.answered(10_200, "w", &granted(4_000, Some((100, 1_000))));
        let until_ms = 10_200 + wait_out_ms(4_000);
        assert_eq!(campaign.step(10_300, 90), Step::WaitingOutLease { until_ms });
        let Step::Promote { rpo } = campaign.step(until_ms, 90) else {
            panic!("promoted once the lease ran out")
        };
        assert_eq!(rpo.reported_revision, Some(100));
        assert_eq!(rpo.revisions, 10);
        // The report arrived at 9 200 on this clock; the lease ends at `until_ms`.
        assert_eq!(rpo.window_ms, until_ms - 9_200);
    }

    #[test]
    fn a_campaign_stops_when_a_newer_epoch_is_promised_or_its_time_runs_out() {
        let mut campaign = Campaign::new(2, 2, 0, 1_000);
        campaign.answered(
            10,
            "w",
            &VoteAnswer::Refused {
                reason: "epoch 2 is promised to c".into(),
                promise: Some(Promise {
                    epoch: 2,
                    region: "c".into(),
                }),
            },
        );
        assert!(matches!(campaign.step(20, 0), Step::Superseded { promise } if promise.region == "c"));

        let mut campaign = Campaign::new(2, 2, 0, 1_000);
        campaign.answered(
            10,
            "w",
            &VoteAnswer::Refused {
                reason: "this region still hears from the primary region".into(),
                promise: Some(Promise {
                    epoch: 1,
                    region: "a".into(),
                }),
            },
        );
        assert!(
            matches!(campaign.step(20, 0), Step::Gathering { .. }),
            "an older promise is no obstacle"
        );
        let Step::GaveUp { refusals } = campaign.step(1_000, 0) else {
            panic!("gave up at its deadline")
        };
        assert_eq!(refusals[0].0, "w");
    }
}
