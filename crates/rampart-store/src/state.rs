//! The region's state and its deterministic apply.
//!
//! Invariants, checked by tests: the revision increases by exactly one per state-changing
//! command; every key and election tied to a lease is listed under that lease; an election's
//! fencing token is the revision of the write that won it, so tokens strictly increase.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use rampart_core::api::{Event, KeyValue, WatchEvent};
use rampart_core::auth::Role;
use rampart_core::health::Health;
use rampart_core::service::{Instance, InstanceRole, Policy};
use serde::{Deserialize, Serialize};

use crate::command::{Command, Op, Outcome};

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
}

impl Service {
    /// The primary's id and record, if the service has a primary.
    pub fn primary_record(&self) -> Option<(&str, &InstanceRecord)> {
        let id = self.primary.as_deref()?;
        Some((id, self.instances.get(id)?))
    }

    /// Where the policy's backup command runs: the primary; for an active-active service
    /// (no primary), the first instance, in id order, that serves (up, ready, not a
    /// standby) on a node.
    pub fn backup_source(&self) -> Option<(&str, &InstanceRecord)> {
        if self.policy.mode != rampart_core::service::Mode::ActiveActive {
            return self.primary_record();
        }
        let serves = |r: &InstanceRecord| {
            r.health == Health::Up
                && r.ready == Health::Up
                && r.role != InstanceRole::Standby
                && r.instance.node.is_some()
        };
        self.instances
            .iter()
            .find(|(_, r)| serves(r))
            .map(|(id, r)| (id.as_str(), r))
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

/// One registered instance and what the region has decided about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub instance: Instance,
    pub role: InstanceRole,
    /// The committed verdict (every node agrees on it).
    pub health: Health,
    /// When the verdict last changed (the proposing leader's clock): a failover's
    /// detection time.
    pub health_since_ms: u64,
    /// The readiness verdict: whether it should get traffic.
    pub ready: Health,
    /// When it lost the primary role, newest last, at most [`LOSSES_KEPT`].
    pub losses_ms: Vec<u64>,
    pub fenced: bool,
}

/// Primary-role losses remembered per instance, for flap damping.
pub const LOSSES_KEPT: usize = 16;

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

/// Events kept in the replicated log of events; older ones drop off.
pub const EVENTS_MAX: usize = 1000;

/// Everything a region replicates. Ordered maps keep iteration, serialisation and the
/// checksum identical on every node. `kv`, the one map that grows with the data, is a
/// persistent B-tree: cloning the state (for a Raft snapshot or a backup) is O(1), and
/// later writes copy only the nodes they touch. It encodes exactly as a `BTreeMap`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub revision: u64,
    pub kv: imbl::OrdMap<String, Record>,
    pub leases: BTreeMap<u64, Lease>,
    pub elections: BTreeMap<String, Hold>,
    pub next_lease_id: u64,
    pub tokens: BTreeMap<String, Token>,
    /// Set by the first bootstrap admin token, so a region gets one exactly once.
    pub auth_bootstrapped: bool,
    /// The newest [`EVENTS_MAX`] events, oldest first.
    pub events: VecDeque<Event>,
    pub next_event_id: u64,
    pub services: BTreeMap<String, Service>,
    /// Cluster-scope quota standings by (quota name, client key).
    pub quotas: BTreeMap<(String, String), QuotaStanding>,
}

impl State {
    /// Applies one command; returns its outcome and the watch events it caused.
    pub fn apply(&mut self, command: &Command) -> (Outcome, Vec<WatchEvent>) {
        let before = self.revision;
        let applied = self.apply_op(command);
        // The revision moves by exactly one per state-changing write, never more: otherwise
        // two writes could share a revision or a watcher could miss one, on every node.
        assert!(
            self.revision == before || self.revision == before + 1,
            "invariant broken: one command moved the revision from {before} to {}",
            self.revision
        );
        applied
    }

    fn apply_op(&mut self, command: &Command) -> (Outcome, Vec<WatchEvent>) {
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
                Outcome::LeaseGranted { id, ttl_ms: *ttl_ms }
            }
            Op::LeaseRevoke { id } => match self.leases.remove(id) {
                None => Outcome::LeaseRevoked { found: false },
                Some(lease) => {
                    // Like etcd: every key of the lease goes in one revision.
                    if !lease.keys.is_empty() {
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
                if *bootstrap {
                    if self.auth_bootstrapped {
                        return (Outcome::TokenExists, events);
                    }
                    // Once per region, even when the name is taken (by a token made while
                    // the region ran without TLS): that region already has an admin.
                    self.auth_bootstrapped = true;
                }
                if self.tokens.contains_key(name) {
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
            Op::TokenRevoke { name } => Outcome::TokenRevoked {
                found: self.tokens.remove(name).is_some(),
            },
            Op::ServicePut { name, policy } => match self.services.get_mut(name) {
                Some(service) => {
                    service.policy = policy.clone();
                    Outcome::ServiceStored { created: false }
                }
                None => {
                    self.services.insert(
                        name.clone(),
                        Service {
                            policy: policy.clone(),
                            instances: BTreeMap::new(),
                            primary: None,
                            demoting: false,
                            promotions: 0,
                            token: 0,
                        },
                    );
                    Outcome::ServiceStored { created: true }
                }
            },
            Op::ServiceDelete { name } => Outcome::ServiceDeleted {
                found: self.services.remove(name).is_some(),
            },
            Op::InstancePut { service, id, instance } => match self.services.get_mut(service) {
                None => Outcome::ServiceNotFound,
                Some(service) => match service.instances.get_mut(id) {
                    Some(record) => {
                        record.instance = instance.clone();
                        record.fenced = false;
                        Outcome::InstanceStored { created: false }
                    }
                    None => {
                        service.instances.insert(
                            id.clone(),
                            InstanceRecord {
                                instance: instance.clone(),
                                role: InstanceRole::Replica,
                                health: Health::Unknown,
                                health_since_ms: command.at_ms,
                                ready: Health::Unknown,
                                losses_ms: Vec::new(),
                                fenced: false,
                            },
                        );
                        Outcome::InstanceStored { created: true }
                    }
                },
            },
            Op::InstanceDelete { service, id } => match self.services.get_mut(service) {
                None => Outcome::ServiceNotFound,
                Some(service) => {
                    let found = service.instances.remove(id).is_some();
                    if service.primary.as_deref() == Some(id.as_str()) {
                        service.primary = None;
                    }
                    Outcome::InstanceDeleted { found }
                }
            },
            Op::InstanceHealth { service, id, health } => {
                match self.services.get_mut(service).and_then(|s| s.instances.get_mut(id)) {
                    None => Outcome::InstanceNotFound,
                    Some(record) => {
                        if record.health != *health {
                            record.health_since_ms = command.at_ms;
                            // Back up after being down: a failed promotion is forgiven.
                            if *health == Health::Up {
                                record.fenced = false;
                            }
                        }
                        record.health = *health;
                        Outcome::HealthRecorded
                    }
                }
            }
            Op::InstanceReadiness { service, id, ready } => {
                match self.services.get_mut(service).and_then(|s| s.instances.get_mut(id)) {
                    None => Outcome::InstanceNotFound,
                    Some(record) => {
                        record.ready = *ready;
                        Outcome::HealthRecorded
                    }
                }
            }
            Op::Demote { service, id } => match self.primary_mut(service, id, None) {
                Err(refused) => refused,
                Ok(s) => {
                    s.demoting = true;
                    Outcome::Demoting
                }
            },
            Op::CancelDemote { service, id } => match self.primary_mut(service, id, None) {
                Err(refused) => refused,
                Ok(s) => {
                    s.demoting = false;
                    Outcome::Demoting
                }
            },
            Op::Release { service, id } => match self.primary_mut(service, id, None) {
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
            Op::PromotionFailed { service, id, token } => match self.primary_mut(service, id, Some(*token)) {
                Err(refused) => refused,
                Ok(s) => {
                    if let Some(record) = s.step_down(id) {
                        record.fenced = true;
                    }
                    Outcome::Released
                }
            },
            Op::Promote { service, id } => {
                let Some(s) = self.services.get(service) else {
                    return (Outcome::ServiceNotFound, events);
                };
                let Some(record) = s.instances.get(id) else {
                    return (Outcome::InstanceNotFound, events);
                };
                match &s.primary {
                    Some(primary) if primary == id => Outcome::Promoted { token: s.token },
                    Some(primary) => Outcome::PrimaryHeld {
                        primary: primary.clone(),
                    },
                    None if record.health != Health::Up => Outcome::NotPromotable { health: record.health },
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
            Op::QuotaTake { name, client, tier } => self.quota_take(name, client, *tier, command.at_ms),
            Op::Record { event } => {
                self.next_event_id += 1;
                let id = self.next_event_id;
                if self.events.len() >= EVENTS_MAX {
                    self.events.pop_front();
                }
                self.events.push_back(Event {
                    id,
                    at_ms: command.at_ms,
                    ..event.clone()
                });
                Outcome::Recorded { id }
            }
        };
        (outcome, events)
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

    /// The service whose primary is `id` (with fencing token `token`, if given), or the
    /// outcome that refuses a command about a primary that is not (or no longer) it.
    fn primary_mut(&mut self, service: &str, id: &str, token: Option<u64>) -> Result<&mut Service, Outcome> {
        let s = self.services.get_mut(service).ok_or(Outcome::ServiceNotFound)?;
        if s.primary.as_deref() != Some(id) || token.is_some_and(|t| t != s.token) {
            return Err(Outcome::NotPrimary {
                primary: s.primary.clone(),
            });
        }
        Ok(s)
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

    /// XXH3-64 over the canonical encoding: equal states have equal checksums.
    /// Hashed as it is encoded: never a second copy of the state in memory.
    pub fn checksum(&self) -> u64 {
        let mut checksum = Checksum::default();
        postcard::to_io(self, &mut checksum).expect("state always encodes");
        checksum.value()
    }
}

/// [`State::checksum`] computed over the encoded state as it streams by (a backup encodes
/// the state into chunks, never whole into memory).
#[derive(Clone, Default)]
pub struct Checksum(xxhash_rust::xxh3::Xxh3);

impl Checksum {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn value(&self) -> u64 {
        self.0.digest()
    }

    /// The checksum as the API and backup manifests write it.
    pub fn text(&self) -> String {
        checksum_text(self.value())
    }
}

/// A checksum as the API and backup manifests write it: 16 hex digits.
pub fn checksum_text(value: u64) -> String {
    format!("{value:016x}")
}

impl std::io::Write for Checksum {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Checks that `reader` holds exactly one encoded [`State`] whose keys are in canonical
/// order, decoding it as it streams: one key-value entry at a time is in memory, never the
/// whole state (a backup's verification runs on the leader). `scratch` must hold the
/// largest single value.
pub fn check_encoded(reader: impl std::io::Read, scratch: &mut [u8]) -> Result<(), String> {
    let (shape, (mut rest, _)) =
        postcard::from_io::<StateShape, _>((reader, scratch)).map_err(|e| format!("the bytes are not a state: {e}"))?;
    if let Some(key) = shape.kv.out_of_order {
        return Err(format!("the state's key {key:?} is out of order"));
    }
    let mut extra = [0u8; 1];
    match rest.read(&mut extra) {
        Ok(0) => Ok(()),
        Ok(_) => Err("the bytes are not a state: they go on after its end".to_string()),
        Err(e) => Err(format!("reading the state: {e}")),
    }
}

/// [`State`]'s encoding, field for field, with `kv` checked entry by entry instead of kept.
/// A field added to `State` and not here leaves bytes after the end, which
/// [`check_encoded`] refuses (and its test catches).
#[derive(Deserialize)]
#[allow(dead_code)] // decoded to be checked, never read
struct StateShape {
    revision: u64,
    kv: OrderedEntries<Record>,
    leases: BTreeMap<u64, Lease>,
    elections: BTreeMap<String, Hold>,
    next_lease_id: u64,
    tokens: BTreeMap<String, Token>,
    auth_bootstrapped: bool,
    events: VecDeque<Event>,
    next_event_id: u64,
    services: BTreeMap<String, Service>,
    quotas: BTreeMap<(String, String), QuotaStanding>,
}

/// A map with string keys, decoded one entry at a time and dropped, keeping the first key
/// that does not come after the one before it (a state's encoding writes them in order).
/// Reported after decoding: postcard keeps no message of a decoder's own.
struct OrderedEntries<V> {
    out_of_order: Option<String>,
    entries: std::marker::PhantomData<V>,
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedEntries<V> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Visit<V> {
            type Value = OrderedEntries<V>;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map with string keys")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut previous: Option<String> = None;
                let mut out_of_order = None;
                while let Some((key, _)) = map.next_entry::<String, V>()? {
                    if out_of_order.is_none() && previous.as_ref().is_some_and(|p| *p >= key) {
                        out_of_order = Some(key.clone());
                    }
                    previous = Some(key);
                }
                Ok(OrderedEntries {
                    out_of_order,
                    entries: std::marker::PhantomData,
                })
            }
        }
        deserializer.deserialize_map(Visit(std::marker::PhantomData))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(op: Op) -> Command {
        Command { at_ms: 1000, op }
    }

    fn put(state: &mut State, key: &str, lease: Option<u64>, if_revision: Option<u64>) -> Outcome {
        state
            .apply(&cmd(Op::Put {
                key: key.into(),
                value: "v".into(),
                lease,
                if_revision,
            }))
            .0
    }

    #[test]
    fn every_write_increments_the_revision() {
        let mut s = State::default();
        assert_eq!(put(&mut s, "a", None, None), Outcome::Put { revision: 1 });
        assert_eq!(put(&mut s, "a", None, None), Outcome::Put { revision: 2 });
        let got = s.get("a").unwrap();
        assert_eq!((got.revision, got.create_revision), (2, 1));
        let (out, events) = s.apply(&cmd(Op::Delete { key: "a".into() }));
        assert_eq!(
            out,
            Outcome::Deleted {
                revision: 3,
                deleted: true
            }
        );
        assert_eq!(events.len(), 1);
        let (out, _) = s.apply(&cmd(Op::Delete { key: "a".into() }));
        assert_eq!(
            out,
            Outcome::Deleted {
                revision: 3,
                deleted: false
            }
        );
    }

    #[test]
    fn compare_and_set_checks_the_revision() {
        let mut s = State::default();
        assert_eq!(put(&mut s, "a", None, Some(0)), Outcome::Put { revision: 1 });
        assert_eq!(
            put(&mut s, "a", None, Some(0)),
            Outcome::RevisionMismatch { current: 1 }
        );
        assert_eq!(put(&mut s, "a", None, Some(1)), Outcome::Put { revision: 2 });
        assert_eq!(s.revision, 2, "a failed compare leaves the revision alone");
    }

    #[test]
    fn revoking_a_lease_deletes_its_keys_and_frees_its_elections() {
        let mut s = State::default();
        let (Outcome::LeaseGranted { id, .. }, _) = s.apply(&cmd(Op::LeaseGrant { ttl_ms: 1000 })) else {
            panic!()
        };
        put(&mut s, "k1", Some(id), None);
        put(&mut s, "k2", Some(id), None);
        put(&mut s, "k3", None, None);
        let (won, _) = s.apply(&cmd(Op::Campaign {
            name: "e".into(),
            candidate: "a".into(),
            lease: id,
        }));
        assert_eq!(
            won,
            Outcome::Elected {
                leader: "a".into(),
                token: 4
            }
        );
        let (_, events) = s.apply(&cmd(Op::LeaseRevoke { id }));
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.revision == 5 && e.kind == "delete"));
        assert!(s.get("k1").is_none() && s.get("k3").is_some());
        assert!(s.elections.is_empty());
    }

    #[test]
    fn election_has_one_holder_and_tokens_increase() {
        let mut s = State::default();
        let (Outcome::LeaseGranted { id: l1, .. }, _) = s.apply(&cmd(Op::LeaseGrant { ttl_ms: 1000 })) else {
            panic!()
        };
        let (Outcome::LeaseGranted { id: l2, .. }, _) = s.apply(&cmd(Op::LeaseGrant { ttl_ms: 1000 })) else {
            panic!()
        };
        let campaign = |s: &mut State, who: &str, lease| {
            s.apply(&cmd(Op::Campaign {
                name: "e".into(),
                candidate: who.into(),
                lease,
            }))
            .0
        };
        let Outcome::Elected { token: t1, .. } = campaign(&mut s, "a", l1) else {
            panic!()
        };
        assert!(matches!(campaign(&mut s, "b", l2), Outcome::Held { token, .. } if token == t1));
        assert_eq!(
            campaign(&mut s, "a", l1),
            Outcome::Elected {
                leader: "a".into(),
                token: t1
            }
        );
        s.apply(&cmd(Op::Resign {
            name: "e".into(),
            candidate: Some("a".into()),
        }));
        let Outcome::Elected { token: t2, .. } = campaign(&mut s, "b", l2) else {
            panic!()
        };
        assert!(t2 > t1);
    }

    #[test]
    fn a_region_bootstraps_one_admin_token_once() {
        let mut s = State::default();
        let create = |name: &str, bootstrap| {
            cmd(Op::TokenCreate {
                name: name.into(),
                role: Role::Admin,
                prefixes: vec![],
                hash: [1; 32],
                bootstrap,
            })
        };
        assert_eq!(s.apply(&create("admin", true)).0, Outcome::TokenCreated);
        assert_eq!(s.apply(&create("admin-2", true)).0, Outcome::TokenExists);
        assert_eq!(s.apply(&create("admin", false)).0, Outcome::TokenExists);
        assert_eq!(
            s.apply(&cmd(Op::TokenRevoke { name: "admin".into() })).0,
            Outcome::TokenRevoked { found: true }
        );
        assert_eq!(
            s.apply(&create("again", true)).0,
            Outcome::TokenExists,
            "revoking the bootstrap token does not allow a second bootstrap"
        );
        assert_eq!(s.revision, 0, "tokens are not key writes");
    }

    #[test]
    fn the_event_log_is_bounded_and_numbered() {
        let mut s = State::default();
        let event = Event {
            id: 0,
            at_ms: 0,
            kind: "audit".into(),
            action: "token.create".into(),
            actor: "admin".into(),
            source: "127.0.0.1".into(),
            outcome: "ok".into(),
            detail: String::new(),
        };
        for _ in 0..EVENTS_MAX + 5 {
            s.apply(&cmd(Op::Record { event: event.clone() }));
        }
        assert_eq!(s.events.len(), EVENTS_MAX);
        assert_eq!(s.events.front().unwrap().id, 6);
        assert_eq!(s.events.back().unwrap().id, EVENTS_MAX as u64 + 5);
        assert_eq!(s.events.back().unwrap().at_ms, 1000);
    }

    fn service_with(ids: &[&str]) -> State {
        let mut s = State::default();
        let policy = rampart_core::service::PolicySpec::default().validate().unwrap();
        s.apply(&cmd(Op::ServicePut {
            name: "db".into(),
            policy,
        }));
        for id in ids {
            let instance: rampart_core::service::InstanceSpec =
                serde_json::from_str(r#"{"endpoint": "127.0.0.1:1"}"#).unwrap();
            s.apply(&cmd(Op::InstancePut {
                service: "db".into(),
                id: id.to_string(),
                instance: instance.validate("r").unwrap(),
            }));
            s.apply(&cmd(Op::InstanceHealth {
                service: "db".into(),
                id: id.to_string(),
                health: Health::Up,
            }));
        }
        s
    }

    fn promote(s: &mut State, id: &str) -> Outcome {
        s.apply(&cmd(Op::Promote {
            service: "db".into(),
            id: id.into(),
        }))
        .0
    }

    #[test]
    #[should_panic(expected = "invariant broken: service db has 2 primaries")]
    fn a_promotion_beside_a_stale_primary_role_stops_the_node() {
        let mut s = service_with(&["a", "b"]);
        // Corrupted: "a" still holds the role although the service has no primary.
        s.services.get_mut("db").unwrap().instances.get_mut("a").unwrap().role = InstanceRole::Primary;
        promote(&mut s, "b");
    }

    #[test]
    #[should_panic(expected = "not above")]
    fn a_token_that_would_not_increase_stops_the_node() {
        let mut s = service_with(&["a"]);
        // Corrupted: the service's token is ahead of the region's revision.
        s.services.get_mut("db").unwrap().token = s.revision + 10;
        promote(&mut s, "a");
    }

    #[test]
    fn one_primary_at_a_time_and_its_token_increases() {
        let mut s = service_with(&["a", "b"]);
        let Outcome::Promoted { token: first } = promote(&mut s, "a") else {
            panic!()
        };
        assert_eq!(promote(&mut s, "a"), Outcome::Promoted { token: first }, "idempotent");
        assert_eq!(
            promote(&mut s, "b"),
            Outcome::PrimaryHeld { primary: "a".into() },
            "no second primary before the first is released"
        );
        let release = |s: &mut State, id: &str| {
            s.apply(&cmd(Op::Release {
                service: "db".into(),
                id: id.into(),
            }))
            .0
        };
        assert!(matches!(release(&mut s, "b"), Outcome::NotPrimary { .. }));
        assert_eq!(release(&mut s, "a"), Outcome::Released);
        let Outcome::Promoted { token: second } = promote(&mut s, "b") else {
            panic!()
        };
        assert!(second > first);
        let service = &s.services["db"];
        assert_eq!(service.instances["a"].role, InstanceRole::Replica);
        assert_eq!(service.instances["a"].losses_ms, vec![1000]);
        assert_eq!(service.instances["b"].role, InstanceRole::Primary);
    }

    #[test]
    fn an_instance_that_is_not_up_is_not_promoted() {
        let mut s = service_with(&["a"]);
        s.apply(&cmd(Op::InstanceHealth {
            service: "db".into(),
            id: "a".into(),
            health: Health::Down,
        }));
        assert_eq!(promote(&mut s, "a"), Outcome::NotPromotable { health: Health::Down });
        assert_eq!(s.services["db"].primary, None);
    }

    #[test]
    fn service_commands_survive_the_log_encoding() {
        let spec: rampart_core::service::PolicySpec = serde_json::from_str(
            r#"{"mode": "active-active", "confirm": "any",
                "checks": [{"kind": "http", "target": "http://127.0.0.1:1/h", "body_contains": "ok"},
                           {"kind": "tcp"}, {"kind": "exec", "command": "true"},
                           {"kind": "heartbeat", "ttl": "3s", "purpose": "liveness"}],
                "recovery": {"action": "restart"}, "hooks": {"on_promote": "p"},
                "flap_damping": {"max_losses": 2, "window": "10m"}}"#,
        )
        .unwrap();
        let instance: rampart_core::service::InstanceSpec =
            serde_json::from_str(r#"{"endpoint": "127.0.0.1:1", "tags": {"a": "b"}, "node": 1, "command": "run"}"#)
                .unwrap();
        let batch = crate::Batch {
            commands: vec![
                cmd(Op::ServicePut {
                    name: "s".into(),
                    policy: spec.validate().unwrap(),
                }),
                cmd(Op::InstancePut {
                    service: "s".into(),
                    id: "i".into(),
                    instance: instance.validate("r").unwrap(),
                }),
            ],
        };
        let bytes = postcard::to_allocvec(&batch).unwrap();
        assert_eq!(postcard::from_bytes::<crate::Batch>(&bytes).unwrap(), batch);
        let mut s = State::default();
        for c in &batch.commands {
            s.apply(c);
        }
        let bytes = postcard::to_allocvec(&s).unwrap();
        assert_eq!(postcard::from_bytes::<State>(&bytes).unwrap(), s, "snapshots too");
    }

    #[test]
    fn quota_standings_are_counted_once_for_every_proxy_and_survive_snapshots() {
        let tier = rampart_core::proxy::Tier {
            rate: None,
            burst: 0,
            daily: Some(3),
        };
        let take = |s: &mut State, client: &str, at_ms: u64| {
            s.apply(&Command {
                at_ms,
                op: Op::QuotaTake {
                    name: "api".into(),
                    client: client.into(),
                    tier,
                },
            })
            .0
        };
        let mut s = State::default();
        let outcomes: Vec<Outcome> = (0..4).map(|i| take(&mut s, "k", 1000 + i)).collect();
        assert_eq!(outcomes[2], Outcome::QuotaTaken { used_today: 3 });
        assert!(matches!(&outcomes[3], Outcome::OverQuota { limit, .. } if limit == "daily"));
        assert_eq!(take(&mut s, "other", 1000), Outcome::QuotaTaken { used_today: 1 });
        assert_eq!(s.revision, 0, "quota takes are not key-value revisions");
        let bytes = postcard::to_allocvec(&s).unwrap();
        let mut restored = postcard::from_bytes::<State>(&bytes).unwrap();
        assert_eq!(restored, s);
        assert!(matches!(take(&mut restored, "k", 2000), Outcome::OverQuota { .. }));
        let next_day = 86_400_000 + 5;
        assert_eq!(
            take(&mut restored, "k", next_day),
            Outcome::QuotaTaken { used_today: 1 }
        );
    }

    #[test]
    fn checksum_follows_state() {
        let mut a = State::default();
        let mut b = State::default();
        put(&mut a, "x", None, None);
        assert_ne!(a.checksum(), b.checksum());
        put(&mut b, "x", None, None);
        assert_eq!(a.checksum(), b.checksum());
    }

    #[test]
    fn a_copy_shares_its_values_and_encodes_as_the_btreemap_it_replaced() {
        let mut s = State::default();
        for key in ["a", "b", "c"] {
            put(&mut s, key, None, None);
        }
        let copy = s.clone();
        put(&mut s, "b", None, None);
        let (before, after) = (&copy.kv["a"].value, &s.kv["a"].value);
        assert!(Arc::ptr_eq(before, after), "an untouched value is shared, not copied");
        assert_eq!(copy.get("b").unwrap().revision, 2, "the copy keeps its own revision");
        assert_eq!(s.get("b").unwrap().revision, 4);
        let (_, events) = s.apply(&cmd(Op::Put {
            key: "d".into(),
            value: "big".into(),
            lease: None,
            if_revision: None,
        }));
        let event_value = events[0].value.as_ref().unwrap();
        assert!(
            Arc::ptr_eq(event_value, &s.kv["d"].value),
            "the watch event shares the value"
        );

        // Data dirs and backups written with a BTreeMap<String, Record{value: String}> read
        // back: the two encodings are the same bytes.
        #[derive(Serialize)]
        struct OldRecord<'a> {
            value: &'a str,
            revision: u64,
            create_revision: u64,
            lease: Option<u64>,
        }
        let old: BTreeMap<&str, OldRecord> =
            s.kv.iter()
                .map(|(k, r)| {
                    let old = OldRecord {
                        value: &r.value,
                        revision: r.revision,
                        create_revision: r.create_revision,
                        lease: r.lease,
                    };
                    (k.as_str(), old)
                })
                .collect();
        assert_eq!(
            postcard::to_allocvec(&s.kv).unwrap(),
            postcard::to_allocvec(&old).unwrap()
        );
    }

    #[test]
    fn an_encoded_state_is_checked_as_it_streams() {
        let mut s = State::default();
        let (Outcome::LeaseGranted { id, .. }, _) = s.apply(&cmd(Op::LeaseGrant { ttl_ms: 1000 })) else {
            panic!()
        };
        put(&mut s, "a", Some(id), None);
        put(&mut s, "b", None, None);
        let bytes = postcard::to_allocvec(&s).unwrap();
        let check = |bytes: &[u8]| check_encoded(bytes, &mut [0u8; 64]);
        assert_eq!(check(&bytes), Ok(()));
        assert_eq!(check(&postcard::to_allocvec(&State::default()).unwrap()), Ok(()));

        let mut longer = bytes.clone();
        longer.push(0);
        assert!(check(&longer).unwrap_err().contains("go on after its end"));
        assert!(check(&bytes[..bytes.len() - 1]).is_err(), "a cut state is refused");

        // Keys "a" and "b" swapped in place: same length, out of order.
        let mut swapped = bytes.clone();
        let a = swapped.windows(2).position(|w| w == b"\x01a").unwrap();
        let b = swapped.windows(2).position(|w| w == b"\x01b").unwrap();
        swapped.swap(a + 1, b + 1);
        let error = check(&swapped).unwrap_err();
        assert!(error.contains("out of order"), "{error}");
    }

    #[test]
    fn a_backup_runs_on_the_primary_or_an_active_active_services_first_serving_instance() {
        let mut s = service_with(&["a", "b"]);
        assert_eq!(s.services["db"].backup_source(), None, "no primary yet");
        promote(&mut s, "b");
        assert_eq!(s.services["db"].backup_source().map(|(id, _)| id), Some("b"));

        let spec: rampart_core::service::PolicySpec = serde_json::from_str(r#"{"mode": "active-active"}"#).unwrap();
        let mut s = State::default();
        s.apply(&cmd(Op::ServicePut {
            name: "db".into(),
            policy: spec.validate().unwrap(),
        }));
        for (id, node, ready) in [
            ("a", None, Health::Up),
            ("b", Some(2), Health::Down),
            ("c", Some(3), Health::Up),
        ] {
            let mut instance: rampart_core::service::InstanceSpec =
                serde_json::from_str(r#"{"endpoint": "127.0.0.1:1"}"#).unwrap();
            instance.node = node;
            let (service, id) = ("db".to_string(), id.to_string());
            s.apply(&cmd(Op::InstancePut {
                service: service.clone(),
                id: id.clone(),
                instance: instance.validate("r").unwrap(),
            }));
            s.apply(&cmd(Op::InstanceHealth {
                service: service.clone(),
                id: id.clone(),
                health: Health::Up,
            }));
            s.apply(&cmd(Op::InstanceReadiness { service, id, ready }));
        }
        // a has no node to run on, b is not ready: c.
        assert_eq!(s.services["db"].backup_source().map(|(id, _)| id), Some("c"));
    }
}
