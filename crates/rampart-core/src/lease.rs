//! Lease deadlines as the leader keeps them.
//!
//! Like etcd, keepalives are leader-local soft state, never log entries: only the decision
//! that a lease has expired is committed (as a revoke). A new leader cannot know when the
//! old one last heard a keepalive, so it restarts every deadline from its own `now`; a lease
//! may therefore outlive its TTL by up to one leader change, never fall short of it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long an expiry stays "proposed" before it is offered again, in case the revoke was
/// lost (leader change, timeout).
const REPROPOSE_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
struct Deadline {
    ttl: Duration,
    expires_at: Instant,
    proposed_at: Option<Instant>,
}

/// Why a keepalive was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeepaliveError {
    #[error("lease not found")]
    NotFound,
    #[error("lease expired")]
    Expired,
}

/// Leader-local deadlines of every live lease.
#[derive(Debug, Default)]
pub struct LeaseClock {
    deadlines: HashMap<u64, Deadline>,
}

impl LeaseClock {
    /// Forgets everything and restarts each lease's deadline from `now` (new leader).
    pub fn restart_all(&mut self, now: Instant, leases: impl IntoIterator<Item = (u64, Duration)>) {
        self.deadlines.clear();
        for (id, ttl) in leases {
            self.granted(now, id, ttl);
        }
    }

    /// A grant was applied: the lease lives `ttl` from `now`.
    pub fn granted(&mut self, now: Instant, id: u64, ttl: Duration) {
        self.deadlines.insert(
            id,
            Deadline {
                ttl,
                expires_at: now + ttl,
                proposed_at: None,
            },
        );
    }

    /// A revoke was applied: forget the lease.
    pub fn revoked(&mut self, id: u64) {
        self.deadlines.remove(&id);
    }

    /// Extends the lease by its TTL from `now`. A lease already past its deadline cannot be
    /// revived: its revoke may already be in the log.
    pub fn keepalive(&mut self, now: Instant, id: u64) -> Result<Duration, KeepaliveError> {
        let deadline = self.deadlines.get_mut(&id).ok_or(KeepaliveError::NotFound)?;
        if now >= deadline.expires_at {
            return Err(KeepaliveError::Expired);
        }
        deadline.expires_at = now + deadline.ttl;
        Ok(deadline.ttl)
    }

    /// Time left before the lease expires, if it is known.
    pub fn remaining(&self, now: Instant, id: u64) -> Option<Duration> {
        self.deadlines
            .get(&id)
            .map(|d| d.expires_at.saturating_duration_since(now))
    }

    /// Leases whose deadline has passed and whose revoke should be proposed now. Each is
    /// offered once, then again only if it is still alive [`REPROPOSE_AFTER`] later.
    pub fn due(&mut self, now: Instant) -> Vec<u64> {
        let mut due = Vec::new();
        for (id, deadline) in &mut self.deadlines {
            if now < deadline.expires_at {
                continue;
            }
            let offer = match deadline.proposed_at {
                None => true,
                Some(at) => now.duration_since(at) >= REPROPOSE_AFTER,
            };
            if offer {
                deadline.proposed_at = Some(now);
                due.push(*id);
            }
        }
        due.sort_unstable();
        due
    }

    /// Every lease the clock tracks.
    pub fn ids(&self) -> Vec<u64> {
        self.deadlines.keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.deadlines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deadlines.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_millis(3000);

    #[test]
    fn lease_is_due_only_after_its_ttl() {
        let t0 = Instant::now();
        let mut clock = LeaseClock::default();
        clock.granted(t0, 7, TTL);
        assert!(clock.due(t0 + TTL - Duration::from_millis(1)).is_empty());
        assert_eq!(clock.due(t0 + TTL), vec![7]);
    }

    #[test]
    fn keepalive_extends_from_now() {
        let t0 = Instant::now();
        let mut clock = LeaseClock::default();
        clock.granted(t0, 7, TTL);
        let t1 = t0 + Duration::from_millis(2000);
        assert_eq!(clock.keepalive(t1, 7), Ok(TTL));
        assert!(clock.due(t0 + TTL).is_empty());
        assert_eq!(clock.due(t1 + TTL), vec![7]);
    }

    #[test]
    fn expired_lease_cannot_be_revived() {
        let t0 = Instant::now();
        let mut clock = LeaseClock::default();
        clock.granted(t0, 7, TTL);
        assert_eq!(clock.keepalive(t0 + TTL, 7), Err(KeepaliveError::Expired));
        assert_eq!(clock.keepalive(t0, 8), Err(KeepaliveError::NotFound));
    }

    #[test]
    fn due_lease_is_offered_once_then_again_after_a_pause() {
        let t0 = Instant::now();
        let mut clock = LeaseClock::default();
        clock.granted(t0, 7, TTL);
        assert_eq!(clock.due(t0 + TTL), vec![7]);
        assert!(clock.due(t0 + TTL + Duration::from_millis(10)).is_empty());
        assert_eq!(clock.due(t0 + TTL + REPROPOSE_AFTER), vec![7]);
        clock.revoked(7);
        assert!(clock.due(t0 + TTL * 10).is_empty());
    }

    #[test]
    fn new_leader_restarts_every_deadline_from_now() {
        let t0 = Instant::now();
        let mut clock = LeaseClock::default();
        clock.granted(t0, 7, TTL);
        let t_new_leader = t0 + TTL * 2;
        clock.restart_all(t_new_leader, [(7, TTL)]);
        assert!(clock.due(t_new_leader + TTL - Duration::from_millis(1)).is_empty());
        assert_eq!(clock.remaining(t_new_leader, 7), Some(TTL));
    }
}
