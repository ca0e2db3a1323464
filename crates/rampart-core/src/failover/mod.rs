//! Which instance becomes primary when the primary is confirmed down, and — the question
//! operators of Patroni, CloudNativePG and pg_auto_failover ask most — why every other one
//! did not. [`eligibility`] answers both from plain facts about each instance: it refuses
//! every instance that breaks a hard rule, with every reason, and ranks the rest by
//! priority, then the primary region, then the least replication lag.
//!
//! Also the arithmetic of the primary's hold ([`Hold`], safety rule 4), which refusals
//! stop a planned switchover ([`switchover_blockers`]), and the leader's failover episode
//! as a step function ([`episode`]).

pub mod episode;
pub mod hooks;

use std::cmp::Reverse;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::health::Health;
use crate::service::{Damping, Rules};

/// What the policy knows of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    /// The region's confirmed verdict.
    pub health: Health,
    /// Higher is preferred; 0 means never promote automatically (as Redis's
    /// `replica-priority 0`).
    pub priority: u32,
    pub in_primary_region: bool,
    /// Registered in a standby region of the deployment (`Regions::in_standby_region`):
    /// only a region failover promotes it.
    pub in_standby_region: bool,
    /// Revisions behind the primary, as last reported; `None` if it never reports lag (a
    /// stateless instance: nothing to lose).
    pub lag_revisions: Option<u64>,
    /// The synchronous standby (receives every write before it is acknowledged).
    pub synchronous: bool,
    /// Currently fenced: its last primary term ended without a confirmed demotion.
    pub fenced: bool,
    /// Lost the primary role too often lately (see [`damped`]).
    pub damped: bool,
    pub is_primary: bool,
}

/// Why an instance would not be promoted now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Refusal {
    /// It is the primary.
    IsPrimary,
    /// Its confirmed health is not up.
    Unhealthy {
        health: Health,
    },
    /// Serialized as `lag` and `max_lag` (the API's names).
    Lagging {
        #[serde(rename = "lag")]
        lag_revisions: u64,
        #[serde(rename = "max_lag")]
        lag_revisions_max: u64,
    },
    /// The policy is synchronous and this is not the synchronous standby.
    NotSynchronous,
    /// Priority 0: never promoted automatically.
    NeverPromote,
    Fenced,
    Damped,
    /// In a standby region: only a region failover promotes it.
    InStandbyRegion,
    /// Promotable, but another instance comes first.
    Outranked {
        by: String,
        because: String,
    },
}

/// One instance's answer: `rank` 1 is the one that would be promoted now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Eligibility {
    pub id: String,
    /// Place among the promotable instances (1 = first), `None` if it may not be promoted.
    pub rank: Option<usize>,
    pub reasons: Vec<Refusal>,
}

impl Eligibility {
    pub fn promotable(&self) -> bool {
        self.rank.is_some()
    }
}

fn hard_refusals(c: &Candidate, rules: Rules) -> Vec<Refusal> {
    let mut reasons = Vec::new();
    if c.is_primary {
        reasons.push(Refusal::IsPrimary);
    }
    if c.in_standby_region {
        reasons.push(Refusal::InStandbyRegion);
    }
    if c.health != Health::Up {
        reasons.push(Refusal::Unhealthy { health: c.health });
    }
    let lag_revisions = c.lag_revisions.unwrap_or(0);
    if lag_revisions > rules.lag_revisions_max {
        reasons.push(Refusal::Lagging {
            lag_revisions,
            lag_revisions_max: rules.lag_revisions_max,
        });
    }
    if rules.synchronous_only && !c.synchronous {
        reasons.push(Refusal::NotSynchronous);
    }
    if c.priority == 0 {
        reasons.push(Refusal::NeverPromote);
    }
    if c.fenced {
        reasons.push(Refusal::Fenced);
    }
    if c.damped {
        reasons.push(Refusal::Damped);
    }
    reasons
}

/// The order of promotable instances: priority, then the primary region, then least lag;
/// the id breaks ties so every node ranks alike.
fn rank_key(c: &Candidate) -> (Reverse<u32>, Reverse<bool>, u64, &str) {
    (
        Reverse(c.priority),
        Reverse(c.in_primary_region),
        c.lag_revisions.unwrap_or(0),
        c.id.as_str(),
    )
}

fn why_outranked(loser: &Candidate, winner: &Candidate) -> String {
    if loser.priority != winner.priority {
        format!("priority {} < {}", loser.priority, winner.priority)
    } else if loser.in_primary_region != winner.in_primary_region {
        "outside the primary region".to_string()
    } else if loser.lag_revisions.unwrap_or(0) != winner.lag_revisions.unwrap_or(0) {
        format!(
            "lag {} > {}",
            loser.lag_revisions.unwrap_or(0),
            winner.lag_revisions.unwrap_or(0)
        )
    } else {
        "equal in every respect; ties go by id".to_string()
    }
}

/// Every instance's eligibility, in rank order (promotable first), then the refused ones.
pub fn eligibility(candidates: &[Candidate], rules: Rules) -> Vec<Eligibility> {
    let mut promotable: Vec<&Candidate> = Vec::new();
    let mut refused = Vec::new();
    for c in candidates {
        let reasons = hard_refusals(c, rules);
        if reasons.is_empty() {
            promotable.push(c);
        } else {
            refused.push(Eligibility {
                id: c.id.clone(),
                rank: None,
                reasons,
            });
        }
    }
    promotable.sort_by(|a, b| rank_key(a).cmp(&rank_key(b)));
    let first = promotable.first().copied();
    let mut answer: Vec<Eligibility> = promotable
        .iter()
        .enumerate()
        .map(|(i, c)| Eligibility {
            id: c.id.clone(),
            rank: Some(i + 1),
            reasons: match first {
                Some(best) if i > 0 => vec![Refusal::Outranked {
                    by: best.id.clone(),
                    because: why_outranked(c, best),
                }],
                _ => Vec::new(),
            },
        })
        .collect();
    answer.extend(refused);
    answer
}

/// True when `losses_ms` (when it lost the primary role) holds `losses_max` or more within
/// the window ending now.
pub fn damped(losses_ms: &[u64], now_ms: u64, damping: Damping) -> bool {
    let since = now_ms.saturating_sub(damping.window_ms);
    let recent = losses_ms.iter().filter(|at| **at >= since && **at <= now_ms).count();
    damping.losses_max > 0 && recent >= damping.losses_max as usize
}

/// How long a primary may act as primary past its node's last contact with the region's
/// majority (safety rule 4). A node cut off for `self_fence_after` runs `on_demote` for the
/// primaries it hosts; the leader releases the role of a primary whose node it has not heard
/// for the whole `hold`. The leader measures from the node's last *answer*, which came after
/// anything the node itself heard, so with clocks that run at the same rate the node has
/// fenced before the leader may promote another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hold {
    pub hold: Duration,
    pub self_fence_after: Duration,
}

impl Hold {
    /// Four election timeouts (well above a leader change, so an election alone never costs
    /// a primary its role); the node fences a quarter of the hold, and at least two
    /// heartbeats, before it ends, so its hook has run before the leader can promote.
    pub fn new(election_timeout: Duration, heartbeat: Duration) -> Hold {
        let hold = election_timeout * 4;
        let margin = (hold / 4).max(heartbeat * 2);
        let held = Hold {
            hold,
            self_fence_after: hold.saturating_sub(margin),
        };
        // Safety rule 4 rests on this: a node must let go before the leader may promote.
        assert!(
            held.self_fence_after < held.hold,
            "self-fence ({:?}) must come before the hold ends ({:?})",
            held.self_fence_after,
            held.hold
        );
        held
    }

    /// Whether a node that has not been in touch with the majority for `contact_age` must
    /// fence the primaries it hosts.
    pub fn must_fence(&self, contact_age: Duration) -> bool {
        contact_age > self.self_fence_after
    }

    /// Whether the leader may release an unreachable primary whose node last answered it
    /// `since_answer` ago (or, for an instance no node hosts, was confirmed down that long).
    pub fn lapsed(&self, since_answer: Duration) -> bool {
        since_answer >= self.hold
    }
}

/// The refusals that stop a planned switchover to an instance at once. Being outranked,
/// being the primary already or damped do not count (the operator chose it), and lag is
/// waited for (the target catches up once the old primary stops writing).
pub fn switchover_blockers(reasons: &[Refusal]) -> Vec<&Refusal> {
    reasons
        .iter()
        .filter(|r| {
            !matches!(
                r,
                Refusal::Outranked { .. } | Refusal::IsPrimary | Refusal::Damped | Refusal::Lagging { .. }
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str, priority: u32, lag: u64) -> Candidate {
        Candidate {
            id: id.into(),
            health: Health::Up,
            priority,
            in_primary_region: true,
            in_standby_region: false,
            lag_revisions: Some(lag),
            synchronous: false,
            fenced: false,
            damped: false,
            is_primary: false,
        }
    }

    const LOOSE: Rules = Rules {
        lag_revisions_max: 100,
        synchronous_only: false,
    };

    #[test]
    fn the_highest_priority_then_least_lag_wins() {
        let answer = eligibility(
            &[replica("a", 100, 5), replica("b", 100, 1), replica("c", 50, 0)],
            LOOSE,
        );
        let order: Vec<&str> = answer.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(order, ["b", "a", "c"]);
        assert!(answer[0].reasons.is_empty() && answer[0].rank == Some(1));
        assert_eq!(
            answer[1].reasons,
            vec![Refusal::Outranked {
                by: "b".into(),
                because: "lag 5 > 1".into()
            }]
        );
        assert!(matches!(&answer[2].reasons[0], Refusal::Outranked { because, .. } if because == "priority 50 < 100"));
    }

    #[test]
    fn every_reason_is_listed_for_a_refused_instance() {
        let mut bad = replica("bad", 0, 500);
        bad.health = Health::Down;
        bad.fenced = true;
        bad.damped = true;
        let strict = Rules {
            lag_revisions_max: 0,
            synchronous_only: true,
        };
        let answer = eligibility(&[bad], strict);
        assert_eq!(answer[0].rank, None);
        assert_eq!(
            answer[0].reasons,
            vec![
                Refusal::Unhealthy { health: Health::Down },
                Refusal::Lagging {
                    lag_revisions: 500,
                    lag_revisions_max: 0
                },
                Refusal::NotSynchronous,
                Refusal::NeverPromote,
                Refusal::Fenced,
                Refusal::Damped,
            ]
        );
    }

    #[test]
    fn synchronous_mode_promotes_only_the_synchronous_standby() {
        let mut sync = replica("sync", 10, 0);
        sync.synchronous = true;
        let rules = Rules {
            lag_revisions_max: 0,
            synchronous_only: true,
        };
        let answer = eligibility(&[replica("fast", 100, 0), sync], rules);
        assert_eq!(answer[0].id, "sync");
        assert_eq!(answer[0].rank, Some(1));
        assert_eq!(answer[1].reasons, vec![Refusal::NotSynchronous]);
    }

    #[test]
    fn an_instance_in_a_standby_region_is_never_promoted_by_a_service_failover() {
        let mut far = replica("far", 1000, 0);
        far.in_standby_region = true;
        let answer = eligibility(&[far, replica("near", 1, 50)], LOOSE);
        assert_eq!(answer[0].id, "near");
        assert_eq!((answer[1].id.as_str(), answer[1].rank), ("far", None));
        assert_eq!(answer[1].reasons, vec![Refusal::InStandbyRegion]);
        let json = serde_json::to_value(&answer[1].reasons[0]).expect("json");
        assert_eq!(json["reason"], "in_standby_region");
    }

    #[test]
    fn the_primary_region_comes_before_lag() {
        let mut far = replica("far", 100, 0);
        far.in_primary_region = false;
        let answer = eligibility(&[far, replica("near", 100, 3)], LOOSE);
        assert_eq!(answer[0].id, "near");
        assert!(matches!(&answer[1].reasons[0], Refusal::Outranked { because, .. } if because.contains("region")));
    }

    #[test]
    fn an_instance_that_keeps_losing_the_role_is_damped_for_a_window() {
        let damping = Damping {
            losses_max: 3,
            window_ms: 60_000,
        };
        assert!(!damped(&[1_000, 2_000], 3_000, damping));
        assert!(damped(&[1_000, 2_000, 3_000], 3_000, damping));
        assert!(
            !damped(&[1_000, 2_000, 3_000], 62_000, damping),
            "the oldest left the window"
        );
    }

    const HEARTBEAT: Duration = Duration::from_millis(50);
    const ELECTION: Duration = Duration::from_millis(250);

    #[test]
    fn a_cut_off_node_fences_a_quarter_of_the_hold_before_the_leader_may_release() {
        let hold = Hold::new(ELECTION, HEARTBEAT);
        assert_eq!(hold.hold, Duration::from_millis(1000));
        assert_eq!(hold.self_fence_after, Duration::from_millis(750));
        assert!(!hold.must_fence(Duration::from_millis(750)));
        assert!(hold.must_fence(Duration::from_millis(751)));
        assert!(!hold.lapsed(Duration::from_millis(999)));
        assert!(hold.lapsed(Duration::from_millis(1000)));
    }

    #[test]
    fn the_fencing_margin_is_at_least_two_heartbeats() {
        // A short election timeout against a long heartbeat: a quarter of the hold would be
        // less than two heartbeats.
        let hold = Hold::new(Duration::from_millis(100), Duration::from_millis(60));
        assert_eq!(hold.hold, Duration::from_millis(400));
        assert_eq!(hold.self_fence_after, Duration::from_millis(280));
        for age_ms in 0..=400 {
            let age = Duration::from_millis(age_ms);
            // Whenever the leader could release, the node has fenced already.
            assert!(!hold.lapsed(age) || hold.must_fence(age), "at {age_ms} ms");
        }
    }

    #[test]
    #[should_panic(expected = "self-fence")]
    fn a_hold_that_leaves_no_time_to_fence_stops_the_node() {
        Hold::new(Duration::ZERO, HEARTBEAT);
    }

    #[test]
    fn a_switchover_waits_for_lag_and_ignores_rank_but_not_health() {
        let reasons = vec![
            Refusal::Outranked {
                by: "b".into(),
                because: "priority".into(),
            },
            Refusal::IsPrimary,
            Refusal::Damped,
            Refusal::Lagging {
                lag_revisions: 3,
                lag_revisions_max: 0,
            },
        ];
        assert!(switchover_blockers(&reasons).is_empty());
        let mut hard = reasons.clone();
        hard.push(Refusal::Unhealthy { health: Health::Down });
        hard.push(Refusal::Fenced);
        hard.push(Refusal::NotSynchronous);
        hard.push(Refusal::NeverPromote);
        assert_eq!(
            switchover_blockers(&hard),
            [
                &Refusal::Unhealthy { health: Health::Down },
                &Refusal::Fenced,
                &Refusal::NotSynchronous,
                &Refusal::NeverPromote
            ]
        );
    }
}
