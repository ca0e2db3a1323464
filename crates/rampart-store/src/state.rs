//! The region's state in two parts (docs/design/state-split.md), each with its own
//! revision and checksum: the *shipped* part a standby region replicates
//! ([`crate::shipped`]) and the *region-local* part ([`crate::local`]: events, quota
//! standings, instance verdicts); and the checks of an encoded state.
//!
//! Invariants, asserted in [`State::apply`] and checked by tests: a command moves each
//! revision by at most one; the shipped part's change depends only on the shipped part and
//! the command (what only this region knows is checked before, in [`Local::refuses`]).

use std::collections::BTreeMap;

use rampart_core::api::{KeyValue, WatchEvent};
use rampart_core::service::InstanceRole;
use serde::{Deserialize, Serialize};

use crate::command::{Command, Op, Outcome};
pub use crate::local::{Local, QuotaStanding, Verdict, EVENTS_MAX, QUOTA_CLIENTS_MAX};
pub use crate::shipped::{Hold, InstanceRecord, Lease, Record, Service, Shipped, Token, LOSSES_KEPT, RULES};

/// The region's state: the shipped part, then the local part. Ordered maps keep iteration,
/// serialisation and the checksums identical on every node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub shipped: Shipped,
    pub local: Local,
    /// A standby's install of the primary's shipped state, under way (`seed`). Not part of
    /// the state's encoding (backups, checksums): snapshots keep it after the state.
    #[serde(skip)]
    pub seeding: Option<Box<crate::seed::Seeding>>,
}

/// An encoded install step (`Op::Seed`), as this build writes it or, failing that, as a
/// format-3 or format-2 node did (a step in a log written before an upgrade).
fn decode_seed_step(encoded: &[u8]) -> Result<crate::seed::SeedStep, String> {
    postcard::from_bytes::<crate::seed::SeedStep>(encoded)
        .or_else(|e| {
            crate::v3::decode_seed_step(encoded)
                .or_else(|_| crate::v2::decode_seed_step(encoded))
                .map_err(|_| e)
        })
        .map_err(|e| format!("the step does not decode: {e}"))
}

impl From<crate::v3::StateV3> for State {
    /// A format-3 state in the current layout: every service generic.
    fn from(old: crate::v3::StateV3) -> State {
        let (shipped, local) = old.migrate();
        State {
            shipped,
            local,
            seeding: None,
        }
    }
}

impl From<crate::v2::StateV2> for State {
    /// A format-2 state in the current layout: no region failover yet, nothing promised.
    fn from(old: crate::v2::StateV2) -> State {
        let (shipped, local) = old.migrate();
        State {
            shipped,
            local,
            seeding: None,
        }
    }
}

impl State {
    /// Applies one command; returns its outcome and the watch events it caused.
    pub fn apply(&mut self, command: &Command) -> (Outcome, Vec<WatchEvent>) {
        let before = (self.shipped.revision, self.local.revision);
        let applied = if let Op::Replicate { revision, command } = &command.op {
            self.replicate(*revision, command)
        } else if let Op::Seed { step } = &command.op {
            let outcome = match decode_seed_step(step) {
                Ok(step) => crate::seed::step(&mut self.seeding, &mut self.shipped, &step),
                Err(reason) => Outcome::SeedRefused { reason },
            };
            if let Outcome::Seeded { .. } = outcome {
                // An install is no write: the shipped revision takes the primary's at once.
                return (outcome, Vec::new());
            }
            (outcome, Vec::new())
        } else if command.op.is_local() {
            (self.local.apply(&self.shipped, command), Vec::new())
        } else if let Some(refused) = self.local.refuses(&self.shipped, command) {
            (refused, Vec::new())
        } else {
            let (outcome, events) = self.shipped.apply(command);
            self.local.follow(&self.shipped, command, &outcome);
            (outcome, events)
        };
        // Each revision moves by one per write at most: otherwise two writes could share a
        // revision or a watcher could miss one, on every node.
        for (part, before, after) in [
            ("shipped", before.0, self.shipped.revision),
            ("local", before.1, self.local.revision),
        ] {
            assert!(
                after == before || after == before + 1,
                "invariant broken: one command moved the {part} revision from {before} to {after}"
            );
        }
        applied
    }

    /// Applies the primary region's shipped write at `revision` to the shipped part alone.
    fn replicate(&mut self, revision: u64, command: &Command) -> (Outcome, Vec<WatchEvent>) {
        let current = self.shipped.revision;
        if revision <= current {
            return (Outcome::Replicated { revision: current }, Vec::new());
        }
        if revision != current + 1
            || command.op.is_local()
            || matches!(command.op, Op::Replicate { .. } | Op::Seed { .. })
        {
            return (Outcome::ReplicationGap { expected: current + 1 }, Vec::new());
        }
        let (_, events) = self.shipped.apply(command);
        // The primary's write moved its revision to `revision`; the same write on the same
        // shipped state must do the same here, or the two states differ.
        assert_eq!(
            self.shipped.revision, revision,
            "invariant broken: the primary region's write at revision {revision} ({:?}) moved this standby's shipped revision from {current} to {}: the shipped states differ",
            command.op, self.shipped.revision
        );
        (Outcome::Replicated { revision }, events)
    }

    /// The shipped revision: what reads, watches, backups and regions count in.
    pub fn revision(&self) -> u64 {
        self.shipped.revision
    }

    /// The shipped part's checksum: what backups, restores and regions compare.
    pub fn checksum(&self) -> u64 {
        checksum_of(&self.shipped)
    }

    /// The local part's checksum.
    pub fn local_checksum(&self) -> u64 {
        checksum_of(&self.local)
    }

    pub fn get(&self, key: &str) -> Option<KeyValue> {
        self.shipped.get(key)
    }

    /// Keys starting with `prefix`, in key order, at most `limit`.
    pub fn range(&self, prefix: &str, limit: usize) -> Vec<KeyValue> {
        self.shipped.range(prefix, limit)
    }

    /// Where the backup command of `service` runs: the primary; for an active-active service
    /// (no primary), the first instance, in id order, that serves (up, ready, not a
    /// standby) on a node.
    pub fn backup_source(&self, name: &str) -> Option<(&str, &InstanceRecord)> {
        let service = self.shipped.services.get(name)?;
        if service.policy.mode != rampart_core::service::Mode::ActiveActive {
            return service.primary_record();
        }
        let serves = |id: &str, r: &InstanceRecord| {
            self.local.verdict(name, id).serves() && r.role != InstanceRole::Standby && r.instance.node.is_some()
        };
        service
            .instances
            .iter()
            .find(|(id, r)| serves(id, r))
            .map(|(id, r)| (id.as_str(), r))
    }
}

/// [`State::checksum`] of a copy of the shipped part alone (a standby's verification).
pub fn shipped_checksum(shipped: &Shipped) -> u64 {
    checksum_of(shipped)
}

/// XXH3-64 over the canonical encoding of `part`: equal parts have equal checksums.
/// Hashed as it is encoded: never a second copy of the state in memory.
fn checksum_of(part: &impl Serialize) -> u64 {
    let mut checksum = Checksum::default();
    postcard::to_io(part, &mut checksum).expect("state always encodes");
    checksum.value()
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
    if let Some(key) = shape.shipped.kv.out_of_order {
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
    shipped: ShippedShape,
    local: Local,
}

/// [`Shipped`]'s encoding, as [`StateShape`] checks it.
#[derive(Deserialize)]
#[allow(dead_code)] // decoded to be checked, never read
struct ShippedShape {
    revision: u64,
    rules: u32,
    kv: OrderedEntries<Record>,
    leases: BTreeMap<u64, Lease>,
    elections: BTreeMap<String, Hold>,
    next_lease_id: u64,
    tokens: BTreeMap<String, Token>,
    auth_bootstrapped: bool,
    services: BTreeMap<String, Service>,
    epochs: Vec<rampart_core::region::EpochStart>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::Op;
    use rampart_core::api::Event;
    use rampart_core::auth::Role;
    use rampart_core::health::Health;
    use std::sync::Arc;

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
        assert_eq!(s.revision(), 2, "a failed compare leaves the revision alone");
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
                token: 5
            },
            "the grant (1), three puts, then the campaign"
        );
        let (_, events) = s.apply(&cmd(Op::LeaseRevoke { id }));
        assert_eq!(events.len(), 2);
        assert!(events.iter().all(|e| e.revision == 6 && e.kind == "delete"));
        assert!(s.get("k1").is_none() && s.get("k3").is_some());
        assert!(s.shipped.elections.is_empty());
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
        assert_eq!(
            s.revision(),
            2,
            "one creation and one revocation moved the shipped revision; refusals did not"
        );
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
        assert_eq!(s.local.events.len(), EVENTS_MAX);
        assert_eq!(s.local.events.front().unwrap().id, 6);
        assert_eq!(s.local.events.back().unwrap().id, EVENTS_MAX as u64 + 5);
        assert_eq!(s.local.events.back().unwrap().at_ms, 1000);
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
        s.shipped
            .services
            .get_mut("db")
            .unwrap()
            .instances
            .get_mut("a")
            .unwrap()
            .role = InstanceRole::Primary;
        promote(&mut s, "b");
    }

    #[test]
    #[should_panic(expected = "not above")]
    fn a_token_that_would_not_increase_stops_the_node() {
        let mut s = service_with(&["a"]);
        // Corrupted: the service's token is ahead of the region's revision.
        s.shipped.services.get_mut("db").unwrap().token = s.revision() + 10;
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
        let service = &s.shipped.services["db"];
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
        assert_eq!(s.shipped.services["db"].primary, None);
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
        assert_eq!(s.revision(), 0, "quota takes are not key-value revisions");
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
    fn a_replicated_write_keeps_the_primarys_revision_and_a_gap_is_refused() {
        let mut primary = State::default();
        put(&mut primary, "a", None, None);
        put(&mut primary, "b", None, None);
        let replicate = |revision, key: &str| {
            cmd(Op::Replicate {
                revision,
                command: Box::new(cmd(Op::Put {
                    key: key.into(),
                    value: "v".into(),
                    lease: None,
                    if_revision: None,
                })),
            })
        };
        let mut standby = State::default();
        assert_eq!(
            standby.apply(&replicate(2, "b")).0,
            Outcome::ReplicationGap { expected: 1 }
        );
        assert_eq!(standby.apply(&replicate(1, "a")).0, Outcome::Replicated { revision: 1 });
        let (outcome, events) = standby.apply(&replicate(2, "b"));
        assert_eq!(outcome, Outcome::Replicated { revision: 2 });
        assert_eq!(
            events[0].revision, 2,
            "watches on the standby see the primary's revision"
        );
        assert_eq!(
            standby.apply(&replicate(1, "a")).0,
            Outcome::Replicated { revision: 2 },
            "again: nothing"
        );
        assert_eq!(standby.checksum(), primary.checksum());
        let local = cmd(Op::Record {
            event: Event {
                id: 0,
                at_ms: 0,
                kind: "k".into(),
                action: "a".into(),
                actor: String::new(),
                source: String::new(),
                outcome: String::new(),
                detail: String::new(),
            },
        });
        let wrapped = cmd(Op::Replicate {
            revision: 3,
            command: Box::new(local),
        });
        assert_eq!(
            standby.apply(&wrapped).0,
            Outcome::ReplicationGap { expected: 3 },
            "local writes are not shipped"
        );
    }

    #[test]
    #[should_panic(expected = "the shipped states differ")]
    fn a_replicated_write_that_lands_elsewhere_stops_the_node() {
        let mut standby = State::default();
        // A delete of a key the standby does not have moves no revision here.
        standby.apply(&cmd(Op::Replicate {
            revision: 1,
            command: Box::new(cmd(Op::Delete { key: "a".into() })),
        }));
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
        let (before, after) = (&copy.shipped.kv["a"].value, &s.shipped.kv["a"].value);
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
            Arc::ptr_eq(event_value, &s.shipped.kv["d"].value),
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
        let old: BTreeMap<&str, OldRecord> = s
            .shipped
            .kv
            .iter()
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
            postcard::to_allocvec(&s.shipped.kv).unwrap(),
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
        assert_eq!(s.backup_source("db"), None, "no primary yet");
        promote(&mut s, "b");
        assert_eq!(s.backup_source("db").map(|(id, _)| id), Some("b"));

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
        assert_eq!(s.backup_source("db").map(|(id, _)| id), Some("c"));
    }

    #[test]
    fn a_region_failover_is_a_shipped_write_a_standby_follows_and_only_a_newer_epoch_starts() {
        let mut primary = State::default();
        let put = cmd(Op::Put {
            key: "k".into(),
            value: "v".into(),
            lease: None,
            if_revision: None,
        });
        primary.apply(&put);
        let epoch = |epoch: u64, region: &str| {
            cmd(Op::RegionEpoch {
                epoch,
                region: region.into(),
                forced: false,
            })
        };
        assert_eq!(primary.shipped.epoch(), rampart_core::region::FIRST_EPOCH);
        assert_eq!(primary.shipped.primary_region(), None);
        let (outcome, _) = primary.apply(&epoch(2, "us-west-2"));
        assert_eq!(
            outcome,
            Outcome::EpochStarted {
                epoch: 2,
                started: true
            }
        );
        assert_eq!(primary.shipped.revision, 2, "a write of its own");
        assert_eq!(primary.shipped.primary_region(), Some("us-west-2"));
        assert_eq!(primary.shipped.epochs[0].revision, 2);
        let (outcome, _) = primary.apply(&epoch(2, "eu"));
        assert_eq!(
            outcome,
            Outcome::EpochStarted {
                epoch: 2,
                started: false
            }
        );
        assert_eq!(
            (primary.shipped.revision, primary.shipped.primary_region()),
            (2, Some("us-west-2"))
        );
        // A standby replicates it in order and holds the same history and checksum.
        let mut standby = State::default();
        standby.apply(&cmd(Op::Replicate {
            revision: 1,
            command: Box::new(put),
        }));
        standby.apply(&cmd(Op::Replicate {
            revision: 2,
            command: Box::new(epoch(2, "us-west-2")),
        }));
        assert_eq!(standby.shipped.epochs, primary.shipped.epochs);
        assert_eq!(standby.checksum(), primary.checksum());
    }

    #[test]
    fn a_region_promises_only_newer_epochs_and_keeps_the_newest() {
        use rampart_core::region::lease::Promise;
        let mut s = State::default();
        let promise = |epoch: u64, region: &str| Promise {
            epoch,
            region: region.into(),
        };
        let promised = |s: &mut State, p: Promise| s.apply(&cmd(Op::RegionPromise { promise: p })).0;
        assert_eq!(
            promised(&mut s, promise(1, "a")),
            Outcome::Promised {
                promise: promise(1, "a")
            }
        );
        assert_eq!(
            promised(&mut s, promise(2, "b")),
            Outcome::Promised {
                promise: promise(2, "b")
            }
        );
        assert_eq!(s.local.revision, 2);
        assert_eq!(
            promised(&mut s, promise(2, "c")),
            Outcome::Promised {
                promise: promise(2, "b")
            }
        );
        assert_eq!(
            promised(&mut s, promise(1, "a")),
            Outcome::Promised {
                promise: promise(2, "b")
            }
        );
        assert_eq!(s.local.revision, 2, "a refused promise changes nothing");
        assert_eq!(s.shipped.revision, 0, "region-local");
    }
}
