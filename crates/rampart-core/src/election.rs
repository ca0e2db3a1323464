//! When a follower may start a Raft election: the election timer and pre-vote.
//!
//! Like etcd's `PreVote` (Raft thesis §9.6), a follower that stops hearing from its leader
//! first asks the other voters whether they *would* vote for it, without raising the term.
//! They agree only if they too have not heard from a leader for a lease (half an election
//! timeout: several missed heartbeats) and the candidate's log is at least as up to date
//! as theirs. So a node that was cut off, or
//! a follower whose log lags, cannot force a term change that delays the election of the
//! follower that should win — the cause of most slow failovers under write load.
//!
//! A crashed leader process is also noticed sooner than its silence: the kernel closes
//! its connections, and a follower whose link from the leader closed and that has heard
//! nothing for two heartbeats since may campaign at once ([`LeaderContact::gone`]). A
//! partition or a paused leader closes nothing and takes the timer path.

use std::time::{Duration, Instant};

/// A log position as Raft orders it: by term, then index.
pub type LogPosition = (u64, u64);

/// The randomised election timer of one follower.
#[derive(Debug, Clone)]
pub struct ElectionTimer {
    base: Duration,
    timeout: Duration,
    last_attempt: Option<Instant>,
}

impl ElectionTimer {
    /// `jitter` in [0, 1) spreads the timeout over [base, 2 base), so followers rarely
    /// campaign at the same moment.
    pub fn new(base: Duration, jitter: f64) -> ElectionTimer {
        ElectionTimer {
            base,
            timeout: Self::spread(base, jitter),
            last_attempt: None,
        }
    }

    fn spread(base: Duration, jitter: f64) -> Duration {
        base + base.mul_f64(jitter.clamp(0.0, 0.999))
    }

    /// The current randomised timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// True when neither a leader (`last_contact`) nor this node's own last attempt has
    /// been heard of for a whole timeout. `started` stands in for contact at boot.
    pub fn due(&self, now: Instant, started: Instant, last_contact: Option<Instant>) -> bool {
        let quiet_since = [Some(started), last_contact, self.last_attempt]
            .into_iter()
            .flatten()
            .max()
            .unwrap_or(started);
        now.saturating_duration_since(quiet_since) >= self.timeout
    }

    /// True when the last attempt (if any) is at least `pause` old: bounds how often the
    /// fast path may ask for pre-votes.
    pub fn rested(&self, now: Instant, pause: Duration) -> bool {
        self.last_attempt
            .is_none_or(|at| now.saturating_duration_since(at) >= pause)
    }

    /// Records an attempt (pre-vote asked, whatever its result) and draws a new timeout.
    pub fn attempted(&mut self, now: Instant, jitter: f64) {
        self.last_attempt = Some(now);
        self.timeout = Self::spread(self.base, jitter);
    }
}

/// What a follower knows of its leader's liveness.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LeaderContact {
    /// When it last heard from a leader (append, heartbeat) or voted.
    pub last: Option<Instant>,
    /// When a peer connection from the current leader last closed.
    pub link_closed: Option<Instant>,
}

impl LeaderContact {
    /// Time since the last contact, `None` if there never was one.
    pub fn silence(&self, now: Instant) -> Option<Duration> {
        self.last.map(|at| now.saturating_duration_since(at))
    }

    /// The leader's link closed after the last contact and it has been silent for
    /// `quiet` since: its process is most likely gone.
    pub fn gone(&self, now: Instant, quiet: Duration) -> bool {
        match (self.link_closed, self.last) {
            (Some(closed), Some(last)) => closed >= last && now.saturating_duration_since(last) >= quiet,
            _ => false,
        }
    }
}

/// Whether to grant a pre-vote: never as the leader; never to a candidate whose log is
/// behind this node's; otherwise only when no leader has been heard within `lease`, or the
/// leader's link closed and it has been silent for a `heartbeat` since. The lease must be
/// shorter than the shortest election timeout, or a candidate whose timer fired first
/// could be refused by a peer that heard the dead leader's last heartbeat a moment later.
pub fn grant_pre_vote(
    now: Instant,
    is_leader: bool,
    contact: LeaderContact,
    lease: Duration,
    heartbeat: Duration,
    candidate_log: Option<LogPosition>,
    own_log: Option<LogPosition>,
) -> bool {
    if is_leader || candidate_log < own_log {
        return false;
    }
    let lease_expired = contact.silence(now).is_none_or(|silence| silence >= lease);
    lease_expired || contact.gone(now, heartbeat)
}

/// Whether a follower that won a pre-vote round begun at `asked_at` may still campaign:
/// only if it has heard no leader since. On a busy machine a stalled follower's election
/// timer can fire before its Raft core has handled the appends its leader sent meanwhile;
/// once it has, the leader is plainly alive, and deposing it would cost a term for nothing.
pub fn may_campaign(asked_at: Instant, contact: LeaderContact) -> bool {
    contact.last.is_none_or(|last| last < asked_at)
}

/// The lease that goes with an election timeout: half of it.
pub fn lease_for(election_timeout: Duration) -> Duration {
    election_timeout / 2
}

/// True when `granted` votes (the candidate's own included) are a majority of `voters`.
pub fn is_majority(granted: usize, voters: usize) -> bool {
    granted * 2 > voters
}

/// Whether a leader still counts itself as the region's leader. Not once no majority has
/// acknowledged it for two election timeouts: it is most likely cut off, and answering
/// `no_leader` at once beats letting a client time out (a majority elsewhere has elected or
/// will elect another). A region of one voter always has its leader.
pub fn leader_counts_itself(quorum_ack_age: Option<Duration>, voters: usize, election_timeout: Duration) -> bool {
    voters <= 1 || quorum_ack_age.is_some_and(|age| age <= election_timeout * 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(250);

    #[test]
    fn timer_fires_after_a_quiet_timeout_only() {
        let t0 = Instant::now();
        let timer = ElectionTimer::new(T, 0.5);
        assert_eq!(timer.timeout(), Duration::from_millis(375));
        assert!(!timer.due(t0 + Duration::from_millis(374), t0, None));
        assert!(timer.due(t0 + Duration::from_millis(375), t0, None));
        let heard = t0 + Duration::from_millis(300);
        assert!(!timer.due(t0 + Duration::from_millis(600), t0, Some(heard)));
        assert!(timer.due(heard + Duration::from_millis(375), t0, Some(heard)));
    }

    #[test]
    fn an_attempt_restarts_the_timer_with_a_new_draw() {
        let t0 = Instant::now();
        let mut timer = ElectionTimer::new(T, 0.0);
        let t1 = t0 + T;
        assert!(timer.due(t1, t0, None));
        timer.attempted(t1, 0.9);
        assert!(!timer.due(t1 + T, t0, None));
        assert!(timer.due(t1 + timer.timeout(), t0, None));
        assert!(timer.timeout() >= T && timer.timeout() < T * 2);
    }

    const HB: Duration = Duration::from_millis(50);

    fn heard(at: Instant) -> LeaderContact {
        LeaderContact {
            last: Some(at),
            link_closed: None,
        }
    }

    #[test]
    fn pre_vote_is_refused_while_a_leader_is_heard() {
        let t0 = Instant::now();
        let lease = T / 2;
        let log = Some((2, 10));
        assert!(!grant_pre_vote(
            t0 + lease - Duration::from_millis(1),
            false,
            heard(t0),
            lease,
            HB,
            log,
            log
        ));
        assert!(grant_pre_vote(t0 + lease, false, heard(t0), lease, HB, log, log));
        assert!(!grant_pre_vote(
            t0 + T,
            true,
            LeaderContact::default(),
            lease,
            HB,
            log,
            log
        ));
    }

    #[test]
    fn pre_vote_is_refused_to_a_lagging_log() {
        let now = Instant::now();
        let none = LeaderContact::default();
        assert!(!grant_pre_vote(now, false, none, T, HB, Some((2, 9)), Some((2, 10))));
        assert!(!grant_pre_vote(now, false, none, T, HB, Some((1, 50)), Some((2, 10))));
        assert!(grant_pre_vote(now, false, none, T, HB, Some((3, 1)), Some((2, 10))));
        assert!(grant_pre_vote(now, false, none, T, HB, Some((2, 10)), None));
    }

    #[test]
    fn a_closed_leader_link_shortens_the_wait_only_while_the_leader_is_silent() {
        let t0 = Instant::now();
        let log = Some((2, 10));
        let closed = LeaderContact {
            last: Some(t0),
            link_closed: Some(t0 + Duration::from_millis(5)),
        };
        assert!(!closed.gone(t0 + HB - Duration::from_millis(1), HB));
        assert!(closed.gone(t0 + HB, HB));
        assert!(grant_pre_vote(t0 + HB, false, closed, T / 2, HB, log, log));
        // The leader spoke again after the link closed (it reconnected): not gone.
        let reconnected = LeaderContact {
            last: Some(t0 + Duration::from_millis(10)),
            link_closed: Some(t0 + Duration::from_millis(5)),
        };
        assert!(!reconnected.gone(t0 + T, HB));
        assert!(!grant_pre_vote(
            t0 + Duration::from_millis(60),
            false,
            reconnected,
            T / 2,
            HB,
            log,
            log
        ));
    }

    #[test]
    fn majority_counts_the_candidate() {
        assert!(is_majority(1, 1));
        assert!(!is_majority(1, 2));
        assert!(is_majority(2, 3));
        assert!(!is_majority(2, 5));
        assert!(is_majority(3, 5));
    }

    #[test]
    fn a_leader_unacknowledged_for_two_election_timeouts_does_not_count_itself() {
        assert!(leader_counts_itself(Some(T * 2), 3, T));
        assert!(!leader_counts_itself(Some(T * 2 + Duration::from_millis(1)), 3, T));
        assert!(!leader_counts_itself(None, 3, T), "never acknowledged");
        assert!(leader_counts_itself(None, 1, T), "a region of one");
    }

    #[test]
    fn a_leader_heard_during_the_pre_vote_round_is_not_deposed() {
        let asked = Instant::now();
        let before = LeaderContact {
            last: Some(asked - Duration::from_millis(400)),
            link_closed: None,
        };
        assert!(may_campaign(asked, before));
        assert!(may_campaign(asked, LeaderContact::default()), "never heard a leader");
        let during = LeaderContact {
            last: Some(asked + Duration::from_millis(3)),
            link_closed: None,
        };
        assert!(!may_campaign(asked, during));
    }
}
