//! The region-local part of the state: what only makes sense in the region that recorded
//! it, Raft-replicated among the region's nodes and never shipped to another region.
//! docs/design/state-split.md gives the reason for each part.
//!
//! It reads the shipped part (whether an instance is registered) and never changes it; the
//! shipped part never reads it. Its revision moves by one for every change (every event and
//! quota take, every verdict that changed), under the apply rules in force (see
//! [`crate::state::RULES`]).

use std::collections::{BTreeMap, VecDeque};

use rampart_core::api::Event;
use rampart_core::health::Health;
use serde::{Deserialize, Serialize};

use crate::command::{Command, Op, Outcome};
use crate::shipped::Shipped;

/// Events kept in the replicated log of events; older ones drop off.
pub const EVENTS_MAX: usize = 1000;

/// Client standings kept for cluster-scope quotas. Standings that are as good as new are
/// forgotten to make room; beyond this a new client is refused.
pub const QUOTA_CLIENTS_MAX: usize = 100_000;

/// One client's standing in a cluster-scope quota, with the limits it was last taken
/// under (to know when it may be forgotten).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaStanding {
    pub allowance: rampart_core::proxy::Allowance,
    pub tier: rampart_core::proxy::Tier,
}

/// What this region's nodes decided about one instance (every node of the region agrees).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The liveness verdict.
    pub health: Health,
    /// When the liveness verdict last changed (the proposing leader's clock): a failover's
    /// detection time.
    pub health_since_ms: u64,
    /// The readiness verdict: whether it should get traffic.
    pub ready: Health,
    /// A promotion of it failed; it is not promoted again until it is seen up again or is
    /// registered anew.
    pub fenced: bool,
}

impl Verdict {
    /// Nothing known yet, since `at_ms`.
    pub fn unknown_since(at_ms: u64) -> Verdict {
        Verdict {
            health: Health::Unknown,
            health_since_ms: at_ms,
            ready: Health::Unknown,
            fenced: false,
        }
    }

    /// Up and ready: it gets traffic.
    pub fn serves(&self) -> bool {
        self.health == Health::Up && self.ready == Health::Up
    }
}

/// The region-local part of the state. Ordered maps keep its encoding and checksum the same
/// on every node of the region.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Local {
    pub revision: u64,
    /// The newest [`EVENTS_MAX`] events, oldest first.
    pub events: VecDeque<Event>,
    pub next_event_id: u64,
    /// Cluster-scope quota standings by (quota name, client key).
    pub quotas: BTreeMap<(String, String), QuotaStanding>,
    /// Verdicts by service, then instance id.
    pub verdicts: BTreeMap<String, BTreeMap<String, Verdict>>,
    /// This region's word in the region lease (data dir format 3): whose the lease of the
    /// newest epoch it promised is.
    pub promise: Option<rampart_core::region::lease::Promise>,
    /// Each `postgres` service's synchronous standby in synchronous mode (data dir format
    /// 4): the replica its primary waits for, and the only one that may be promoted.
    pub synchronous: BTreeMap<String, String>,
}

impl Local {
    /// The verdict on instance `id` of `service`; unknown if none was recorded here.
    pub fn verdict(&self, service: &str, id: &str) -> Verdict {
        self.verdicts
            .get(service)
            .and_then(|instances| instances.get(id))
            .copied()
            .unwrap_or(Verdict::unknown_since(0))
    }

    /// Applies a command of the local part, reading the shipped part for registrations.
    pub(crate) fn apply(&mut self, shipped: &Shipped, command: &Command) -> Outcome {
        let at_ms = command.at_ms;
        let (outcome, changed) = match &command.op {
            Op::Record { event } => {
                self.next_event_id += 1;
                let id = self.next_event_id;
                if self.events.len() >= EVENTS_MAX {
                    self.events.pop_front();
                }
                self.events.push_back(Event {
                    id,
                    at_ms,
                    ..event.clone()
                });
                (Outcome::Recorded { id }, true)
            }
            // A standing changes with every take (its allowance refills with time).
            Op::QuotaTake { name, client, tier } => (self.quota_take(name, client, *tier, at_ms), true),
            Op::InstanceHealth { service, id, health } => {
                if !shipped.is_registered(service, id) {
                    return Outcome::InstanceNotFound;
                }
                let verdict = self.verdict_mut(service, id, at_ms);
                let before = *verdict;
                if verdict.health != *health {
                    verdict.health_since_ms = at_ms;
                    // Back up after being down: a failed promotion is forgiven.
                    if *health == Health::Up {
                        verdict.fenced = false;
                    }
                }
                verdict.health = *health;
                (Outcome::HealthRecorded, *verdict != before)
            }
            Op::InstanceReadiness { service, id, ready } => {
                if !shipped.is_registered(service, id) {
                    return Outcome::InstanceNotFound;
                }
                let verdict = self.verdict_mut(service, id, at_ms);
                let before = *verdict;
                verdict.ready = *ready;
                (Outcome::HealthRecorded, *verdict != before)
            }
            Op::RegionPromise { promise } => {
                let newer = self.promise.as_ref().is_none_or(|p| promise.epoch > p.epoch);
                if newer {
                    self.promise = Some(promise.clone());
                }
                let kept = self.promise.clone().expect("set above or before");
                (Outcome::Promised { promise: kept }, newer)
            }
            Op::SynchronousStandby { service, standby } => {
                let before = self.synchronous.get(service).cloned();
                match standby {
                    Some(id) if shipped.is_registered(service, id) => {
                        self.synchronous.insert(service.clone(), id.clone());
                    }
                    Some(_) => return Outcome::InstanceNotFound,
                    None => {
                        self.synchronous.remove(service);
                    }
                }
                let changed = before.as_ref() != self.synchronous.get(service);
                (
                    Outcome::SynchronousStandby {
                        standby: standby.clone(),
                    },
                    changed,
                )
            }
            other => unreachable!("a command of the shipped part: {other:?}"),
        };
        self.changed(shipped, changed);
        outcome
    }

    /// Moves the revision for a change, under rules 2 (see [`crate::state::RULES`]).
    fn changed(&mut self, shipped: &Shipped, changed: bool) {
        if changed && shipped.rules >= 2 {
            self.revision += 1;
        }
    }

    /// Why this region refuses shipped `command` on what only it knows, if it does: a
    /// promotion of an instance it has not seen up. Checked before the shipped part
    /// applies it, so the shipped part's change depends on nothing local (a standby region
    /// applies the primary's shipped commands without these checks).
    pub(crate) fn refuses(&self, shipped: &Shipped, command: &Command) -> Option<Outcome> {
        match &command.op {
            Op::Promote { service, id } if shipped.would_promote(service, id) => {
                let health = self.verdict(service, id).health;
                (health != Health::Up).then_some(Outcome::NotPromotable { health })
            }
            _ => None,
        }
    }

    /// What a shipped command that was applied (with `outcome`) changes here: a new
    /// registration starts unknown, a registration anew or a failed promotion sets the
    /// fence, a removed instance or service takes its verdicts along.
    pub(crate) fn follow(&mut self, shipped: &Shipped, command: &Command, outcome: &Outcome) {
        let at_ms = command.at_ms;
        let changed = match (&command.op, outcome) {
            (Op::InstancePut { service, id, .. }, Outcome::InstanceStored { .. }) => {
                self.set_fence(service, id, at_ms, false)
            }
            (Op::InstanceDelete { service, id }, _) => {
                let standby = self.forget_synchronous(service, id);
                let verdict = self
                    .verdicts
                    .get_mut(service)
                    .is_some_and(|instances| instances.remove(id).is_some());
                standby || verdict
            }
            (Op::ServiceDelete { name }, Outcome::ServiceDeleted { found: true }) => {
                let standby = self.synchronous.remove(name).is_some();
                self.verdicts.remove(name).is_some() || standby
            }
            // A synchronous standby promoted is the primary: its successor is chosen anew.
            (Op::Promote { service, id }, Outcome::Promoted { .. }) => self.forget_synchronous(service, id),
            (Op::PromotionFailed { service, id, .. }, Outcome::Released) => self.set_fence(service, id, at_ms, true),
            _ => false,
        };
        self.changed(shipped, changed);
    }

    /// Sets or lifts the fence of `id` (a verdict unknown since `at_ms` if it had none);
    /// whether that changed anything.
    fn forget_synchronous(&mut self, service: &str, id: &str) -> bool {
        let is_it = self.synchronous.get(service).is_some_and(|standby| standby == id);
        if is_it {
            self.synchronous.remove(service);
        }
        is_it
    }

    fn set_fence(&mut self, service: &str, id: &str, at_ms: u64, fenced: bool) -> bool {
        let known = self.verdicts.get(service).is_some_and(|v| v.contains_key(id));
        let verdict = self.verdict_mut(service, id, at_ms);
        let changed = !known || verdict.fenced != fenced;
        verdict.fenced = fenced;
        changed
    }

    fn verdict_mut(&mut self, service: &str, id: &str, at_ms: u64) -> &mut Verdict {
        self.verdicts
            .entry(service.to_string())
            .or_default()
            .entry(id.to_string())
            .or_insert(Verdict::unknown_since(at_ms))
    }

    fn quota_take(&mut self, name: &str, client: &str, tier: rampart_core::proxy::Tier, now_ms: u64) -> Outcome {
        let key = (name.to_string(), client.to_string());
        if self.quotas.len() >= QUOTA_CLIENTS_MAX && !self.quotas.contains_key(&key) {
            self.quotas
                .retain(|_, standing| !standing.allowance.forgettable(now_ms, standing.tier));
            if self.quotas.len() >= QUOTA_CLIENTS_MAX {
                return Outcome::QuotaClientsFull;
            }
        }
        let standing = self.quotas.entry(key).or_insert(QuotaStanding {
            allowance: rampart_core::proxy::Allowance::default(),
            tier,
        });
        standing.tier = tier;
        match standing.allowance.take(now_ms, tier) {
            Ok(()) => Outcome::QuotaTaken {
                used_today: standing.allowance.used_today(),
            },
            Err(over) => Outcome::OverQuota {
                limit: over.limit.to_string(),
                retry_after_ms: over.retry_after_ms,
            },
        }
    }
}
