//! One service's failover episode, as the leader runs it: what to do, at `now`, about a
//! primary that went down, from facts the node gathered. The node only carries out the
//! [`Action`]s and tells the episode what came of them.
//!
//! The story of one failover (safety rule 4: never two primaries):
//! 1. The primary is confirmed down ([`Facts::primary`] with health down). If its node is
//!    restarting it within the policy's budget, wait ([`Action::Defer`], said once).
//! 2. If its node answers the leader, ask it to step down ([`Action::AskDemote`]): the node
//!    runs `on_demote`, and the hook's report releases the role ([`on_hook_report`]). A
//!    failed hook calls the demotion off; it is asked again after [`DEMOTE_RETRY`].
//! 3. If its node has not answered for the whole hold, release the role
//!    ([`Action::Release`]): the node fenced itself before ([`Hold`]). An instance no node
//!    hosts is released a hold after its verdict.
//! 4. With nobody primary, promote eligibility's first instance ([`Action::Promote`]), or
//!    say once why nobody can be ([`Action::Blocked`]).
//!
//! The region lease and region failover follow the same shape (`core::region`, next).

use std::time::{Duration, Instant};

use super::Hold;
use crate::health::Health;

/// How soon a demotion whose hook failed is asked for again.
pub const DEMOTE_RETRY: Duration = Duration::from_secs(5);

/// Where the primary runs, as the leader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// No node hosts it (an external instance): nothing can run its hook.
    External,
    /// A node hosts it, which last answered the leader this long ago (counted from no
    /// earlier than the leader's start of office; zero when the leader hosts it).
    Node { since_answer: Duration },
}

/// The primary of the service, as applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Primary {
    pub id: String,
    /// The committed verdict.
    pub health: Health,
    /// When the verdict was committed (wall clock, ms).
    pub health_since_ms: u64,
    pub host: Host,
    /// Its node is restarting it within the policy's budget and start timeout.
    pub restarting: bool,
}

/// What the leader knows of one service at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// Only an active-passive service has a primary to replace.
    pub active_passive: bool,
    /// A planned switchover is moving the role: not a failure, left alone.
    pub switchover_running: bool,
    pub primary: Option<Primary>,
    /// The primary was asked to step down and has not let go yet.
    pub demoting: bool,
    /// The service had a primary before (its token is above 0). A service that never had
    /// one gets its first from an operator's switchover.
    pub had_primary: bool,
    /// Eligibility's first instance (rank 1), if any.
    pub best: Option<String>,
}

/// What the node is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Record `failover.deferred` (once per episode): its node is restarting it.
    Defer { primary: String },
    /// Commit `Demote`: the primary's node runs `on_demote`; its report releases the role.
    AskDemote { primary: String },
    /// Commit `Release`: the primary's node has not answered for the whole hold (it fenced
    /// itself), or no node hosts it.
    Release { primary: String },
    /// Commit `Promote`.
    Promote { instance: String },
    /// Record `failover.blocked` (once per episode): nobody may be promoted.
    Blocked,
}

/// How the old primary let go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LetGo {
    /// Not known (the role was already free when this leader looked).
    #[default]
    Unknown,
    /// Its node ran `on_demote`.
    Demoted,
    /// Its hold ran out.
    HoldLapsed,
}

impl LetGo {
    pub fn label(self) -> &'static str {
        match self {
            LetGo::Unknown => "-",
            LetGo::Demoted => "demoted",
            LetGo::HoldLapsed => "hold_lapsed",
        }
    }
}

/// What the `failover.promote` event says: the episode's timings (wall clock, ms).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failover {
    pub previous: Option<String>,
    pub promoted: String,
    pub how: LetGo,
    /// When the old primary's down verdict was committed (0 if this leader never saw it).
    pub detected_ms: u64,
    /// When this leader released the role (0 if it did not).
    pub released_ms: u64,
    pub decided_ms: u64,
    pub promoted_ms: u64,
}

impl Failover {
    /// Detection to promotion, if the detection was seen.
    pub fn duration_ms(&self) -> Option<u64> {
        (self.detected_ms > 0).then(|| self.promoted_ms.saturating_sub(self.detected_ms))
    }
}

/// The leader's memory of one service's episode. A new leader starts a new one.
#[derive(Debug, Clone, Default)]
pub struct Episode {
    demote_asked: Option<Instant>,
    released_ms: Option<u64>,
    detected_ms: u64,
    previous: Option<String>,
    how: LetGo,
    decided_ms: u64,
    blocked_said: bool,
    deferral_said: bool,
}

impl Episode {
    /// The actions for this moment. `now` orders the leader's own retries; `now_ms` is the
    /// wall clock the verdicts were committed with.
    pub fn step(&mut self, now: Instant, now_ms: u64, hold: Hold, facts: &Facts) -> Vec<Action> {
        if !facts.active_passive || facts.switchover_running {
            return Vec::new();
        }
        match &facts.primary {
            Some(primary) if primary.health == Health::Down => self.replace(now, now_ms, hold, facts, primary),
            Some(_) => {
                // A primary that is up: any episode is over.
                *self = Episode::default();
                Vec::new()
            }
            None if facts.had_primary => self.promote(now_ms, facts),
            None => Vec::new(),
        }
    }

    fn replace(&mut self, now: Instant, now_ms: u64, hold: Hold, facts: &Facts, primary: &Primary) -> Vec<Action> {
        self.detected_ms = primary.health_since_ms;
        self.previous = Some(primary.id.clone());
        if primary.restarting {
            if self.deferral_said {
                return Vec::new();
            }
            self.deferral_said = true;
            return vec![Action::Defer {
                primary: primary.id.clone(),
            }];
        }
        let release = Action::Release {
            primary: primary.id.clone(),
        };
        match primary.host {
            Host::External => {
                self.how = LetGo::HoldLapsed;
                let down_for = Duration::from_millis(now_ms.saturating_sub(primary.health_since_ms));
                if hold.lapsed(down_for) {
                    vec![release]
                } else {
                    Vec::new()
                }
            }
            Host::Node { since_answer } if hold.lapsed(since_answer) => {
                self.how = LetGo::HoldLapsed;
                vec![release]
            }
            Host::Node { .. } => {
                // Its node answers: it runs on_demote, and the hook's report releases.
                self.how = LetGo::Demoted;
                let due = self
                    .demote_asked
                    .is_none_or(|at| now.saturating_duration_since(at) >= DEMOTE_RETRY);
                if facts.demoting || !due {
                    return Vec::new();
                }
                self.demote_asked = Some(now);
                vec![Action::AskDemote {
                    primary: primary.id.clone(),
                }]
            }
        }
    }

    fn promote(&mut self, now_ms: u64, facts: &Facts) -> Vec<Action> {
        match &facts.best {
            Some(best) => {
                self.decided_ms = now_ms;
                vec![Action::Promote { instance: best.clone() }]
            }
            None if self.blocked_said => Vec::new(),
            None => {
                self.blocked_said = true;
                vec![Action::Blocked]
            }
        }
    }

    /// The leader committed the release it was asked for.
    pub fn released(&mut self, now_ms: u64) {
        self.released_ms = Some(now_ms);
    }

    /// The leader committed the promotion: what the event says; the episode is over.
    pub fn promoted(&mut self, instance: &str, now_ms: u64) -> Failover {
        let record = Failover {
            previous: self.previous.clone(),
            promoted: instance.to_string(),
            how: self.how,
            detected_ms: self.detected_ms,
            released_ms: self.released_ms.unwrap_or(0),
            decided_ms: self.decided_ms,
            promoted_ms: now_ms,
        };
        *self = Episode::default();
        record
    }
}

/// What a hook's report asks of the leader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookAction {
    /// Commit `Release`: the primary let go.
    Release,
    /// Commit `CancelDemote`: its `on_demote` failed, it stays primary (asked again later).
    CancelDemote,
    /// Commit `PromotionFailed`: its `on_promote` failed; the role goes back, fenced, so
    /// the next candidate gets its chance.
    GiveBack,
}

/// What a hook run means for the role. Any successful `on_demote` for the current token
/// means the primary let go (asked to, or fencing itself after losing the majority); a
/// failed one calls off the demotion that asked for it. A report for an older token is
/// history.
pub fn on_hook_report(hook: &str, ok: bool, still_primary: bool, demoting: bool) -> Option<HookAction> {
    match (hook, ok) {
        ("on_demote", true) if still_primary => Some(HookAction::Release),
        ("on_demote", false) if still_primary && demoting => Some(HookAction::CancelDemote),
        ("on_promote", false) => Some(HookAction::GiveBack),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
