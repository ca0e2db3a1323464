//! Health verdicts, in two steps. Each observing node turns its own probe results into a
//! health per check with rise/fall thresholds and a start period ([`CheckState`], as
//! HAProxy's `rise`/`fall` and Docker's `start_period`). The leader then turns every
//! observer's latest health into the region's verdict ([`confirm`]): with
//! `confirm = "majority"`, one node that cannot reach an instance cannot fail it over.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What is known of an instance (or of one check of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Not enough probes yet to say.
    Unknown,
    Up,
    Down,
}

/// How many probes in a row change a check's health, and the grace period after start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Successes in a row that make a check up.
    pub rise: u32,
    /// Failures in a row that make it down.
    pub fall: u32,
    /// Failures before the first success within this long of the start do not count.
    pub start_period_ms: u64,
}

/// One observer's view of one check of one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckState {
    health: Health,
    ok_streak: u32,
    fail_streak: u32,
    started_ms: u64,
    ever_up: bool,
}

impl CheckState {
    pub fn new(now_ms: u64) -> CheckState {
        CheckState {
            health: Health::Unknown,
            ok_streak: 0,
            fail_streak: 0,
            started_ms: now_ms,
            ever_up: false,
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Feeds one probe result; returns the new health when it changed.
    pub fn observe(&mut self, now_ms: u64, ok: bool, thresholds: Thresholds) -> Option<Health> {
        let before = self.health;
        if ok {
            self.ok_streak = self.ok_streak.saturating_add(1);
            self.fail_streak = 0;
            if self.ok_streak >= thresholds.rise.max(1) {
                self.health = Health::Up;
                self.ever_up = true;
            }
        } else {
            // Like Docker: a slow starter is not failed for the probes it misses while it
            // boots, but once it has been up every failure counts.
            let starting = !self.ever_up && now_ms.saturating_sub(self.started_ms) < thresholds.start_period_ms;
            if starting {
                return None;
            }
            self.fail_streak = self.fail_streak.saturating_add(1);
            self.ok_streak = 0;
            if self.fail_streak >= thresholds.fall.max(1) {
                self.health = Health::Down;
            }
        }
        (self.health != before).then_some(self.health)
    }
}

/// An instance's health from its checks' healths: down if any is down, up only if all are.
pub fn worst(healths: impl IntoIterator<Item = Health>) -> Health {
    let mut result = Health::Up;
    for health in healths {
        match health {
            Health::Down => return Health::Down,
            Health::Unknown => result = Health::Unknown,
            Health::Up => {}
        }
    }
    result
}

/// How many observers must agree before the region changes its verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Confirm {
    /// A majority of the observers must see the change: one node's network problem cannot
    /// fail an instance over.
    Majority,
    /// Any observer seeing an instance down is enough (fast, and fooled by one bad link).
    Any,
}

/// The region's verdict on an instance, from the latest health each observer reported
/// (`observers` counts every node expected to probe it; one that has not reported counts
/// as not having seen anything). Without a decision either way the verdict stays `current`.
pub fn confirm(reports: &[Health], observers: usize, rule: Confirm, current: Health) -> Health {
    let observers = observers.max(reports.len()).max(1);
    let down = reports.iter().filter(|h| **h == Health::Down).count();
    let up = reports.iter().filter(|h| **h == Health::Up).count();
    let majority = observers / 2 + 1;
    match rule {
        Confirm::Majority if down >= majority => Health::Down,
        Confirm::Majority if up >= majority => Health::Up,
        Confirm::Any if down > 0 => Health::Down,
        Confirm::Any if up > 0 => Health::Up,
        _ => current,
    }
}

/// How long a node's probe report counts at the leader: twice the slowest check's interval
/// and ten seconds more. A node that stopped reporting (dead, cut off) is no vote either way
/// after that.
pub fn report_fresh_for(slowest_interval_ms: u64) -> Duration {
    Duration::from_millis(slowest_interval_ms.saturating_mul(2)) + Duration::from_secs(10)
}

/// A `heartbeat` check's verdict: up while the last heartbeat is younger than its TTL. The
/// leader counts from its own start of office when that is later (as etcd restarts lease
/// deadlines on a new leader), so `since_beat` is measured from the later of the two.
pub fn heartbeat_verdict(since_beat: Duration, ttl: Duration) -> Health {
    if since_beat < ttl {
        Health::Up
    } else {
        Health::Down
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        rise: 2,
        fall: 3,
        start_period_ms: 1000,
    };

    #[test]
    fn rise_and_fall_need_streaks() {
        let mut check = CheckState::new(0);
        assert_eq!(check.observe(10, true, T), None);
        assert_eq!(check.observe(20, true, T), Some(Health::Up));
        assert_eq!(check.observe(30, false, T), None);
        assert_eq!(check.observe(40, true, T), None, "a success resets the failures");
        assert_eq!(check.observe(50, false, T), None);
        assert_eq!(check.observe(60, false, T), None);
        assert_eq!(check.observe(70, false, T), Some(Health::Down));
        assert_eq!(check.observe(80, true, T), None);
        assert_eq!(check.observe(90, true, T), Some(Health::Up));
    }

    #[test]
    fn failures_during_the_start_period_do_not_count_until_the_first_success() {
        let mut check = CheckState::new(0);
        for at in [100, 200, 300, 400] {
            assert_eq!(check.observe(at, false, T), None, "still starting at {at}ms");
        }
        assert_eq!(check.health(), Health::Unknown);
        for at in [1000, 1100] {
            assert_eq!(check.observe(at, false, T), None);
        }
        assert_eq!(
            check.observe(1200, false, T),
            Some(Health::Down),
            "after the start period"
        );

        let mut started = CheckState::new(0);
        started.observe(100, true, T);
        started.observe(200, true, T);
        for at in [300, 400] {
            started.observe(at, false, T);
        }
        assert_eq!(
            started.observe(500, false, T),
            Some(Health::Down),
            "once up, failures count even within the start period"
        );
    }

    #[test]
    fn an_instance_is_as_healthy_as_its_worst_check() {
        assert_eq!(worst([Health::Up, Health::Up]), Health::Up);
        assert_eq!(worst([Health::Up, Health::Unknown]), Health::Unknown);
        assert_eq!(worst([Health::Unknown, Health::Down]), Health::Down);
        assert_eq!(worst([]), Health::Up);
    }

    #[test]
    fn one_observer_cannot_fail_an_instance_over_by_majority() {
        let one_down = [Health::Down, Health::Up, Health::Up];
        assert_eq!(confirm(&one_down, 3, Confirm::Majority, Health::Up), Health::Up);
        assert_eq!(confirm(&one_down, 3, Confirm::Any, Health::Up), Health::Down);
        let two_down = [Health::Down, Health::Down, Health::Up];
        assert_eq!(confirm(&two_down, 3, Confirm::Majority, Health::Up), Health::Down);
    }

    #[test]
    fn silence_is_not_a_vote() {
        // Of 3 observers only one reported: no majority either way, the verdict stands.
        assert_eq!(confirm(&[Health::Down], 3, Confirm::Majority, Health::Up), Health::Up);
        assert_eq!(confirm(&[Health::Up], 3, Confirm::Majority, Health::Down), Health::Down);
        assert_eq!(
            confirm(
                &[Health::Unknown, Health::Unknown],
                2,
                Confirm::Majority,
                Health::Unknown
            ),
            Health::Unknown
        );
    }

    #[test]
    fn a_report_counts_for_twice_the_slowest_interval_and_ten_seconds() {
        assert_eq!(report_fresh_for(1000), Duration::from_secs(12));
        assert_eq!(
            report_fresh_for(u64::MAX),
            Duration::from_millis(u64::MAX) + Duration::from_secs(10)
        );
    }

    #[test]
    fn a_heartbeat_older_than_its_ttl_is_down() {
        let ttl = Duration::from_millis(3000);
        assert_eq!(heartbeat_verdict(Duration::from_millis(2999), ttl), Health::Up);
        assert_eq!(heartbeat_verdict(ttl, ttl), Health::Down);
    }
}
