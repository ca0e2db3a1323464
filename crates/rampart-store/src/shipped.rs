//! The shipped part of the state: what a standby region replicates (KV, leases,
//! elections, the service registry and its roles, tokens) and its deterministic apply.
//!
//! It reads nothing but itself and the command: a standby region applies the primary's
//! shipped commands with [`Shipped::apply`] alone. Its revision moves by one for every
//! change (under [`RULES`]); every key and election tied to a lease is listed under that
//! lease; a fencing token is the revision of the write that won it, so tokens strictly
//! increase.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rampart_core::api::{KeyValue, WatchEvent};
use rampart_core::auth::Role;
use rampart_core::service::{Instance, InstanceRole, Kind, Policy};
use serde::{Deserialize, Serialize};

use crate::command::{Command, Op, Outcome};

/// The apply rules this build writes. Rules 2 move the shipped revision on every shipped
/// change and keep a local revision. Rules 1 (a data dir of format 1, until its region's
/// leader adopts rules 2 with `Op::AdoptRules`) move the revision only for key writes,
/// elections and promotions, and keep the local revision at 0: every node replays the log
/// of an upgraded region under the rules in force where each entry stands, so all agree.
pub const RULES: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Shared, never copied: a copy of the state shares every value with the original.
    pub value: Arc<str>,
    pub revision: u64,
    pub create_revision: u64,
    pub lease: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ttl_ms: u64,
    pub keys: BTreeSet<String>,
    pub elections: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub candidate: String,
    pub lease: u64,
    pub token: u64,
    pub since_ms: u64,
}

/// An API token as stored: the SHA-256 of its secret, never the secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Token {
    pub role: Role,
    pub prefixes: Vec<String>,
    pub hash: [u8; 32],
    pub created_ms: u64,
}

/// A service the region keeps available: its policy, its instances and its primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub policy: Policy,
    pub instances: BTreeMap<String, InstanceRecord>,
    pub primary: Option<String>,
    /// The primary was asked to step down and its node has not confirmed yet.
    pub demoting: bool,
    /// Promotions so far (planned and automatic): `rampart_service_primary_changes_total`.
    pub promotions: u64,
    /// Fencing token of the current primary's term (the revision-like counter of
    /// promotions); 0 before the first.
    pub token: u64,
    /// What its instances are (data dir format 4).
    pub kind: Kind,
}

impl Service {
    /// The primary's id and record, if the service has a primary.
    pub fn primary_record(&self) -> Option<(&str, &InstanceRecord)> {
        let id = self.primary.as_deref()?;
        Some((id, self.instances.get(id)?))
    }

    /// The rules for promoting an instance: the policy's; a `postgres` service's lag is in
    /// bytes of WAL, bounded by its `max_lag_bytes` (else unbounded: the replica with the
    /// most WAL is promoted), and in synchronous mode only its synchronous standby
    /// (`Local::synchronous`) may be promoted.
    pub fn rules(&self) -> rampart_core::service::Rules {
        let mut rules = self.policy.rules();
        if let Some(pg) = self.kind.postgres() {
            rules.lag_revisions_max = pg.max_lag_bytes.unwrap_or(u64::MAX);
            // Synchronous mode: only the synchronous standby has every acknowledged commit
            // (before the first primary there is none).
            rules.synchronous_only |= pg.is_synchronous() && self.token > 0;
        }
        rules
    }

    /// Ends the primary's term: nobody is primary, `id` is a replica again.
    fn step_down(&mut self, id: &str) -> Option<&mut InstanceRecord> {
        self.primary = None;
        self.demoting = false;
        let record = self.instances.get_mut(id)?;
        record.role = InstanceRole::Replica;
        Some(record)
    }
}

/// One registered instance and its role. What this region's nodes decided about its health
/// is region-local: `Local::verdict`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub instance: Instance,
    pub role: InstanceRole,
    /// When it lost the primary role, newest last, at most [`LOSSES_KEPT`].
    pub losses_ms: Vec<u64>,
}

/// Primary-role losses remembered per instance, for flap damping.
pub const LOSSES_KEPT: usize = 16;

/// The part of the state a standby region replicates. `kv`, the one map that grows with
/// the data, is a persistent B-tree: cloning the state (for a Raft snapshot or a backup) is
/// O(1), and later writes copy only the nodes they touch. It encodes exactly as a
/// `BTreeMap`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipped {
    /// Moves by one for every change of this part (under rules 1, see [`RULES`], only for
    /// key writes, elections and promotions).
    pub revision: u64,
    /// The apply rules in force.
    pub rules: u32,
    pub kv: imbl::OrdMap<String, Record>,
    pub leases: BTreeMap<u64, Lease>,
    pub elections: BTreeMap<String, Hold>,
    pub next_lease_id: u64,
    pub tokens: BTreeMap<String, Token>,
    /// Set by the first bootstrap admin token, so a region gets one exactly once.
    pub auth_bootstrapped: bool,
    pub services: BTreeMap<String, Service>,
    /// Every region failover, oldest first (data dir format 3): who is primary at which
    /// epoch from which revision on.
    pub epochs: Vec<rampart_core::region::EpochStart>,
}

impl Default for Shipped {
    fn default() -> Shipped {
        Shipped {
            revision: 0,
            rules: RULES,
            kv: imbl::OrdMap::new(),
            leases: BTreeMap::new(),
            elections: BTreeMap::new(),
            next_lease_id: 0,
            tokens: BTreeMap::new(),
            auth_bootstrapped: false,
            services: BTreeMap::new(),
            epochs: Vec::new(),
        }
    }
}

impl Shipped {
    /// Applies a command of the shipped part. Reads nothing else: a standby region applies
    /// the primary's shipped commands with this alone.
    pub fn apply(&mut self, command: &Command) -> (Outcome, Vec<WatchEvent>) {
        let mut events = Vec::new();
        let outcome = match &command.op {
            Op::Put {
                key,
                value,
                lease,
                if_revision,
            } => {
                let current = self.kv.get(key).map_or(0, |r| r.revision);
                if let Some(expected) = if_revision {
                    if *expected != current {
                        return (Outcome::RevisionMismatch { current }, events);
                    }
                }
                if let Some(id) = lease {
                    if !self.leases.contains_key(id) {
                        return (Outcome::LeaseNotFound { id: *id }, events);
                    }
                }
                let revision = self.bump();
                let value = self.put(key, value, *lease, revision);
                events.push(WatchEvent {
                    revision,
                    kind: "put".into(),
                    key: key.clone(),
                    value: Some(value),
                });
                Outcome::Put { revision }
            }
            Op::Delete { key } => {
                if self.kv.contains_key(key) {
                    let revision = self.bump();
                    self.delete(key);
                    events.push(delete_event(revision, key));
                    Outcome::Deleted {
                        revision,
                        deleted: true,
                    }
                } else {
                    Outcome::Deleted {
                        revision: self.revision,
                        deleted: false,
                    }
                }
            }
            Op::LeaseGrant { ttl_ms } => {
                self.next_lease_id += 1;
                let id = self.next_lease_id;
                self.leases.insert(
                    id,
                    Lease {
                        ttl_ms: *ttl_ms,
                        ..Lease::default()
                    },
                );
                self.wrote();
                Outcome::LeaseGranted { id, ttl_ms: *ttl_ms }
            }
            Op::LeaseRevoke { id } => match self.leases.remove(id) {
                None => Outcome::LeaseRevoked { found: false },
                Some(lease) => {
                    // Like etcd: every key of the lease goes in one revision.
                    if lease.keys.is_empty() {
                        self.wrote();
                    } else {
                        let revision = self.bump();
                        for key in &lease.keys {
                            self.kv.remove(key);
                            events.push(delete_event(revision, key));
                        }
                    }
                    for name in &lease.elections {
                        self.elections.remove(name);
                    }
                    Outcome::LeaseRevoked { found: true }
                }
            },
            Op::Campaign { name, candidate, lease } => {
                if !self.leases.contains_key(lease) {
                    return (Outcome::LeaseNotFound { id: *lease }, events);
                }
                match self.elections.get(name) {
                    Some(hold) if hold.candidate == *candidate && hold.lease == *lease => Outcome::Elected {
                        leader: hold.candidate.clone(),
                        token: hold.token,
                    },
                    Some(hold) => Outcome::Held {
                        leader: hold.candidate.clone(),
                        token: hold.token,
                        lease: hold.lease,
                    },
                    None => {
                        let token = self.bump();
                        let hold = Hold {
                            candidate: candidate.clone(),
                            lease: *lease,
                            token,
                            since_ms: command.at_ms,
                        };
                        self.elections.insert(name.clone(), hold);
                        self.leases
                            .get_mut(lease)
                            .expect("checked above")
                            .elections
                            .insert(name.clone());
                        Outcome::Elected {
                            leader: candidate.clone(),
                            token,
                        }
                    }
                }
            }
            Op::Resign { name, candidate } => {
                let matches = match (self.elections.get(name), candidate) {
                    (None, _) => false,
                    (Some(hold), Some(who)) => hold.candidate == *who,
                    (Some(_), None) => true,
                };
                if matches {
                    let hold = self.elections.remove(name).expect("checked above");
                    if let Some(lease) = self.leases.get_mut(&hold.lease) {
                        lease.elections.remove(name);
                    }
                    self.wrote();
                }
                Outcome::Resigned { found: matches }
            }
            Op::TokenCreate {
                name,
                role,
                prefixes,
                hash,
                bootstrap,
            } => {
                let taken = self.tokens.contains_key(name);
                if *bootstrap {
                    if self.auth_bootstrapped {
                        return (Outcome::TokenExists, events);
                    }
                    // Once per region, even when the name is taken (by a token made while
                    // the region ran without TLS): that region already has an admin.
                    self.auth_bootstrapped = true;
                } else if taken {
                    return (Outcome::TokenExists, events);
                }
                self.wrote();
                if taken {
                    return (Outcome::TokenExists, events);
                }
                self.tokens.insert(
                    name.clone(),
                    Token {
                        role: *role,
                        prefixes: prefixes.clone(),
                        hash: *hash,
                        created_ms: command.at_ms,
                    },
                );
                Outcome::TokenCreated
            }
            Op::TokenRevoke { name } => {
                let found = self.tokens.remove(name).is_some();
                if found {
                    self.wrote();
                }
                Outcome::TokenRevoked { found }
            }
            Op::ServicePut { name, policy } => self.put_service(name, policy, &Kind::Generic),
            Op::ServiceKindPut { name, policy, kind } => self.put_service(name, policy, kind),
            Op::ServiceDelete { name } => {
                let found = self.services.remove(name).is_some();
                if found {
                    self.wrote();
                }
                Outcome::ServiceDeleted { found }
            }
            Op::InstancePut { service, id, instance } => {
                if !self.services.contains_key(service) {
                    return (Outcome::ServiceNotFound, events);
                }
                let service = self.wrote().services.get_mut(service).expect("checked above");
                match service.instances.get_mut(id) {
                    Some(record) => {
                        record.instance = instance.clone();
                        Outcome::InstanceStored { created: false }
                    }
                    None => {
                        let record = InstanceRecord {
                            instance: instance.clone(),
                            role: InstanceRole::Replica,
                            losses_ms: Vec::new(),
                        };
                        service.instances.insert(id.clone(), record);
                        Outcome::InstanceStored { created: true }
                    }
                }
            }
            Op::InstanceDelete { service, id } => match self.services.get_mut(service) {
                None => Outcome::ServiceNotFound,
                Some(service) => {
                    let found = service.instances.remove(id).is_some();
                    let was_primary = service.primary.as_deref() == Some(id.as_str());
                    if was_primary {
                        service.primary = None;
                    }
                    if found || was_primary {
                        self.wrote();
                    }
                    Outcome::InstanceDeleted { found }
                }
            },
            Op::Demote { service, id } => match self.primary_write(service, id, None) {
                Err(refused) => refused,
                Ok(s) => {
                    s.demoting = true;
                    Outcome::Demoting
                }
            },
            Op::CancelDemote { service, id } => match self.primary_write(service, id, None) {
                Err(refused) => refused,
                Ok(s) => {
                    s.demoting = false;
                    Outcome::Demoting
                }
            },
            Op::Release { service, id } => match self.primary_write(service, id, None) {
                Err(refused) => refused,
                Ok(s) => {
                    if let Some(record) = s.step_down(id) {
                        record.losses_ms.push(command.at_ms);
                        let excess = record.losses_ms.len().saturating_sub(LOSSES_KEPT);
                        record.losses_ms.drain(..excess);
                    }
                    Outcome::Released
                }
            },
            Op::PromotionFailed { service, id, token } => match self.primary_write(service, id, Some(*token)) {
                Err(refused) => refused,
                Ok(s) => {
                    s.step_down(id);
                    Outcome::Released
                }
            },
            Op::Promote { service, id } => {
                let Some(s) = self.services.get(service) else {
                    return (Outcome::ServiceNotFound, events);
                };
                if !s.instances.contains_key(id) {
                    return (Outcome::InstanceNotFound, events);
                }
                match &s.primary {
                    Some(primary) if primary == id => Outcome::Promoted { token: s.token },
                    Some(primary) => Outcome::PrimaryHeld {
                        primary: primary.clone(),
                    },
                    None => {
                        // Like an election's token: the revision of the winning write, so
                        // tokens of every service and election strictly increase together.
                        let token = self.bump();
                        let s = self.services.get_mut(service).expect("checked above");
                        // Safety rules 3 and 4: a new primary's token is above every token
                        // before it, and no other instance holds the role.
                        assert!(
                            token > s.token,
                            "invariant broken: service {service} promoted {id} with token {token}, not above {}",
                            s.token
                        );
                        s.primary = Some(id.clone());
                        s.token = token;
                        s.promotions += 1;
                        s.instances.get_mut(id).expect("checked above").role = InstanceRole::Primary;
                        let primaries = s.instances.values().filter(|r| r.role == InstanceRole::Primary).count();
                        assert_eq!(
                            primaries, 1,
                            "invariant broken: service {service} has {primaries} primaries after promoting {id}"
                        );
                        Outcome::Promoted { token }
                    }
                }
            }
            Op::AdoptRules { rules } => {
                assert!(
                    *rules <= RULES,
                    "this node applies rules up to {RULES} and the log asks for rules {rules}: \
                     upgrade every node of the region to the same release"
                );
                if *rules > self.rules {
                    self.rules = *rules;
                    self.wrote();
                }
                Outcome::RulesAdopted { rules: self.rules }
            }
            Op::RegionEpoch { epoch, region, forced } => {
                let started = *epoch > self.epoch();
                if started {
                    self.bump();
                    self.epochs.push(rampart_core::region::EpochStart {
                        epoch: *epoch,
                        region: region.clone(),
                        revision: self.revision,
                        at_ms: command.at_ms,
                        forced: *forced,
                    });
                }
                Outcome::EpochStarted {
                    epoch: self.epoch(),
                    started,
                }
            }
            Op::Record { .. }
            | Op::QuotaTake { .. }
            | Op::InstanceHealth { .. }
            | Op::InstanceReadiness { .. }
            | Op::RegionPromise { .. }
            | Op::SynchronousStandby { .. } => {
                unreachable!("a command of the local part: {:?}", command.op)
            }
            Op::Replicate { .. } | Op::Seed { .. } => {
                unreachable!("a standby's replicated write or install is taken by State::apply")
            }
        };
        (outcome, events)
    }

    /// The service whose primary is `id` (with fencing token `token`, if given), counted as
    /// written; or the outcome that refuses a command about a primary that is not (or no
    /// longer) it.
    fn primary_write(&mut self, service: &str, id: &str, token: Option<u64>) -> Result<&mut Service, Outcome> {
        let s = self.services.get(service).ok_or(Outcome::ServiceNotFound)?;
        if s.primary.as_deref() != Some(id) || token.is_some_and(|t| t != s.token) {
            return Err(Outcome::NotPrimary {
                primary: s.primary.clone(),
            });
        }
        Ok(self.wrote().services.get_mut(service).expect("checked above"))
    }

    /// Whether `id` of `service` is registered.
    pub fn is_registered(&self, service: &str, id: &str) -> bool {
        self.services.get(service).is_some_and(|s| s.instances.contains_key(id))
    }

    /// Whether a promotion of `id` would make it the primary (it is registered and the
    /// service has none), before what the region knows of its health.
    pub fn would_promote(&self, service: &str, id: &str) -> bool {
        self.services
            .get(service)
            .is_some_and(|s| s.primary.is_none() && s.instances.contains_key(id))
    }

    /// The region epoch: [`rampart_core::region::FIRST_EPOCH`] until a region failover.
    pub fn epoch(&self) -> u64 {
        self.epochs
            .last()
            .map_or(rampart_core::region::FIRST_EPOCH, |e| e.epoch)
    }

    /// The primary region since the last region failover; `None` before the first (the
    /// configured primary).
    pub fn primary_region(&self) -> Option<&str> {
        self.epochs.last().map(|e| e.region.as_str())
    }

    /// Creates service `name` or replaces its policy and kind; its instances and roles stay.
    fn put_service(&mut self, name: &str, policy: &Policy, kind: &Kind) -> Outcome {
        match self.wrote().services.get_mut(name) {
            Some(service) => {
                service.policy = policy.clone();
                service.kind = kind.clone();
                Outcome::ServiceStored { created: false }
            }
            None => {
                self.services.insert(
                    name.to_string(),
                    Service {
                        policy: policy.clone(),
                        instances: BTreeMap::new(),
                        primary: None,
                        demoting: false,
                        promotions: 0,
                        token: 0,
                        kind: kind.clone(),
                    },
                );
                Outcome::ServiceStored { created: true }
            }
        }
    }

    /// A change of this part that is not a key write, an election or a promotion: it moves
    /// the revision under rules 2 (see [`RULES`]).
    fn wrote(&mut self) -> &mut Shipped {
        if self.rules >= 2 {
            self.bump();
        }
        self
    }

    fn bump(&mut self) -> u64 {
        self.revision += 1;
        self.revision
    }

    /// Stores `value` under `key`; returns it as stored, to share with the watch event.
    fn put(&mut self, key: &str, value: &str, lease: Option<u64>, revision: u64) -> Arc<str> {
        let previous = self.kv.get(key).cloned();
        if let Some(old_lease) = previous.as_ref().and_then(|r| r.lease) {
            if Some(old_lease) != lease {
                if let Some(l) = self.leases.get_mut(&old_lease) {
                    l.keys.remove(key);
                }
            }
        }
        if let Some(id) = lease {
            self.leases
                .get_mut(&id)
                .expect("lease checked by caller")
                .keys
                .insert(key.to_string());
        }
        let create_revision = previous.map_or(revision, |r| r.create_revision);
        let value: Arc<str> = Arc::from(value);
        let record = Record {
            value: value.clone(),
            revision,
            create_revision,
            lease,
        };
        self.kv.insert(key.to_string(), record);
        value
    }

    fn delete(&mut self, key: &str) {
        if let Some(record) = self.kv.remove(key) {
            if let Some(l) = record.lease.and_then(|id| self.leases.get_mut(&id)) {
                l.keys.remove(key);
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<KeyValue> {
        self.kv.get(key).map(|r| key_value(key, r))
    }

    /// Keys starting with `prefix`, in key order, at most `limit`.
    pub fn range(&self, prefix: &str, limit: usize) -> Vec<KeyValue> {
        self.kv
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, r)| key_value(k, r))
            .collect()
    }
}

fn key_value(key: &str, r: &Record) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: r.value.to_string(),
        revision: r.revision,
        create_revision: r.create_revision,
        lease: r.lease,
    }
}

fn delete_event(revision: u64, key: &str) -> WatchEvent {
    WatchEvent {
        revision,
        kind: "delete".into(),
        key: key.to_string(),
        value: None,
    }
}
