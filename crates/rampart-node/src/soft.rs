//! The leader's soft state of instances (DESIGN rule 8: never committed): every node's
//! latest probe view, heartbeats with the lag they reported, and supervised restarts. It is
//! kept by the leader only, reset when a node gains leadership, and read by the verdict,
//! failover and switchover controllers and by the registry's views.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rampart_core::health::{confirm, report_fresh_for, Health};
use rampart_core::service::Policy;

/// (service, instance).
pub type InstanceKey = (String, String);

/// What the leader has heard, per instance. Lock order: the applied state first, then this.
#[derive(Debug, Default)]
pub struct Soft {
    /// Liveness probes: a primary confirmed down is failed over.
    pub live: Confirmation,
    /// Readiness probes: an instance confirmed not ready leaves the serving set.
    pub ready: Confirmation,
    /// The last heartbeat and the lag it reported.
    pub heartbeats: HashMap<InstanceKey, Heartbeat>,
    /// Supervised instances their node last restarted (when this leader heard it), or gave
    /// up on (`true`): a primary being restarted is not failed over yet.
    pub restarts: HashMap<InstanceKey, Restart>,
    /// When this node last became leader: heartbeat deadlines count from no earlier.
    pub leader_since: Option<Instant>,
    /// Hook runs this leader recorded an event for (service, instance, hook, token,
    /// outcome): a report sent again (a self-fence's, retried until its region can commit)
    /// is recorded once. Cleared when it grows past [`HOOK_EVENTS_KEPT`].
    pub hook_events: std::collections::BTreeSet<(String, String, String, u64, String)>,
    /// Each `postgres` instance's WAL position as its node last reported it, and when it
    /// arrived (wall-clock ms), and whether it streamed from its primary then.
    pub positions: HashMap<InstanceKey, Position>,
}

/// How many recorded hook runs a leader remembers, to record each once.
pub const HOOK_EVENTS_KEPT: usize = 4096;

/// One node's latest probe view of an instance, and when it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub health: Health,
    pub at: Instant,
}

/// An instance's last heartbeat, and the lag it reported.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    pub at: Instant,
    pub lag_revisions: Option<u64>,
}

/// A `postgres` instance's WAL position as its node last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub lsn: rampart_core::postgres::Lsn,
    /// When it arrived (wall-clock ms).
    pub at_ms: u64,
    pub streaming: bool,
}

/// The WAL a promoted `postgres` replica was known to lack: the old primary's last
/// reported position minus its own, and when that position arrived (the old primary may
/// have written more since).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalRpo {
    pub bytes: u64,
    pub primary: rampart_core::postgres::Lsn,
    pub promoted: rampart_core::postgres::Lsn,
    pub seen_ms: u64,
}

/// A supervised instance its node last restarted (when this leader heard it), or gave up on.
#[derive(Debug, Clone, Copy)]
pub struct Restart {
    pub at: Instant,
    pub gave_up: bool,
}

/// Every node's latest probe view of each instance for one purpose, and the confirmed
/// verdict of the probes alone.
#[derive(Debug, Default)]
pub struct Confirmation {
    /// Each node's latest view, and when it arrived.
    pub reports: HashMap<InstanceKey, BTreeMap<u64, Report>>,
    verdicts: HashMap<InstanceKey, Health>,
}

impl Confirmation {
    pub fn record(&mut self, key: &InstanceKey, node: u64, health: Health, now: Instant) {
        self.reports
            .entry(key.clone())
            .or_default()
            .insert(node, Report { health, at: now });
    }

    /// The probes' verdict from the reports still fresh, by the policy's rule; without a
    /// decision it stays what it was (at first, the committed verdict).
    pub fn verdict(
        &mut self,
        key: &InstanceKey,
        now: Instant,
        policy: &Policy,
        voters: usize,
        committed: Health,
    ) -> Health {
        let fresh_for = fresh_for(policy);
        let seen = self.reports.entry(key.clone()).or_default();
        // Only the policy's probers count (all voters without a list); a node that stopped
        // being one is forgotten.
        let counts = |node: &u64| policy.probers.is_empty() || policy.probers.contains(node);
        seen.retain(|node, report| counts(node) && now.duration_since(report.at) < fresh_for);
        let fresh: Vec<Health> = seen.values().map(|report| report.health).collect();
        let observers = if policy.probers.is_empty() {
            voters
        } else {
            policy.probers.len()
        };
        let current = *self.verdicts.get(key).unwrap_or(&committed);
        let verdict = confirm(&fresh, observers, policy.confirm, current);
        self.verdicts.insert(key.clone(), verdict);
        verdict
    }

    pub fn retain(&mut self, known: impl Fn(&InstanceKey) -> bool) {
        self.reports.retain(|k, _| known(k));
        self.verdicts.retain(|k, _| known(k));
    }
}

impl Soft {
    /// The lag an instance last reported with its heartbeat, if any; for a `postgres`
    /// instance, the bytes of WAL between its position and the newest one reported for
    /// its service (the primary's while it reports, else the replica furthest ahead).
    pub fn lag_revisions(&self, service: &str, instance: &str) -> Option<u64> {
        let key = (service.to_string(), instance.to_string());
        if let Some(lag) = self.heartbeats.get(&key).and_then(|beat| beat.lag_revisions) {
            return Some(lag);
        }
        let own = self.positions.get(&key)?.lsn;
        let newest = self
            .positions
            .iter()
            .filter(|((s, _), _)| s == service)
            .map(|(_, position)| position.lsn)
            .max()?;
        Some(own.behind(newest))
    }

    /// What a promotion of `promoted` in place of `previous` may have lost, as far as the
    /// WAL positions tell; none without both positions.
    pub fn wal_rpo(&self, service: &str, previous: &str, promoted: &str) -> Option<WalRpo> {
        let old = self.positions.get(&(service.to_string(), previous.to_string()))?;
        let new = self.positions.get(&(service.to_string(), promoted.to_string()))?;
        Some(WalRpo {
            bytes: new.lsn.behind(old.lsn),
            primary: old.lsn,
            promoted: new.lsn,
            seen_ms: old.at_ms,
        })
    }

    /// Whether instance `id`'s last reported position says it streams from its primary.
    /// The WAL position a `postgres` instance last reported.
    pub fn lsn(&self, service: &str, id: &str) -> Option<rampart_core::postgres::Lsn> {
        self.positions
            .get(&(service.to_string(), id.to_string()))
            .map(|position| position.lsn)
    }

    pub fn streaming(&self, service: &str, id: &str) -> bool {
        self.positions
            .get(&(service.to_string(), id.to_string()))
            .is_some_and(|position| position.streaming)
    }

    /// Whether the instance's node restarted it less than `start_timeout` ago and has not
    /// given up on it since.
    pub fn restarting(&self, key: &InstanceKey, start_timeout: Duration) -> bool {
        self.restarts
            .get(key)
            .is_some_and(|restart| !restart.gave_up && restart.at.elapsed() < start_timeout)
    }
}

fn fresh_for(policy: &Policy) -> Duration {
    let slowest_ms = policy.checks.iter().map(|c| c.interval_ms).max().unwrap_or(1000);
    report_fresh_for(slowest_ms)
}

/// What a node last heard from another region (every node asks each one, every
/// `regions.health_check_interval`).
#[derive(Debug, Clone)]
pub struct RegionSeen {
    pub contact: rampart_core::region::Contact<std::time::Instant>,
    /// Wall clock of the last answer, ms since the epoch.
    pub last_contact_ms: Option<u64>,
    /// Its last answer to `GET /v1/cluster`.
    pub status: Option<rampart_core::api::ClusterStatus>,
}

/// A standby's last comparison of its shipped checksum with the primary region's at the
/// same revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub revision: u64,
    /// When it was made, ms since the epoch.
    pub at_ms: u64,
    pub matched: bool,
    pub primary_checksum: String,
    pub own_checksum: String,
}

/// The region lease as this node takes part in it (safety rule 5), each side rebuilt when
/// the node starts a new term as leader: the holder on the primary region's leader, the
/// grantor on every region's leader.
#[derive(Debug, Default)]
pub struct RegionLease {
    /// The Raft term it was made in, and the holder.
    pub holder: Option<(u64, rampart_core::region::lease::Holder)>,
    /// The Raft term it was made in, and the grantor.
    pub grantor: Option<(u64, rampart_core::region::lease::Grantor)>,
    /// The promise each region last refused this one's renewals with (said once each).
    pub refused_with: std::collections::BTreeMap<String, rampart_core::region::lease::Promise>,
    /// A planned failover is handing over the lease of this epoch: no renewal at that epoch
    /// until then (or until it is called off), so nothing is acknowledged meanwhile. A
    /// later epoch (the region made primary again, by a fail-back) renews at once.
    pub handing_over: Option<(u64, std::time::Instant)>,
    /// On the primary's leader: the shipped revision each standby region last said it
    /// applied (`POST /v1/regions/ack`), for the bounded RPO.
    pub acked: std::collections::BTreeMap<String, u64>,
    /// On every node of the primary region: the latest end of the lease its leader told it
    /// of, for fencing the service primaries it hosts (`core::region::fence`).
    pub end: Option<rampart_core::region::fence::LeaseEnd>,
}

impl RegionLease {
    /// The view of the lease end at `epoch`, started afresh at `now_ms` when there is none
    /// yet or it is of another epoch (the region just took over, or the node just started).
    pub fn end_at(&mut self, epoch: u64, now_ms: u64, lease_ms: u64) -> &mut rampart_core::region::fence::LeaseEnd {
        use rampart_core::region::fence::LeaseEnd;
        let end = self.end.get_or_insert_with(|| LeaseEnd::new(now_ms, epoch, lease_ms));
        if end.epoch() != epoch {
            *end = LeaseEnd::new(now_ms, epoch, lease_ms);
        }
        end
    }
}
