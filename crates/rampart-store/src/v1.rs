//! Data dir format 1: the layout of the state before it was split in two, kept to read
//! what a format-1 node or backup wrote, and its migration to the current layout.
//!
//! A migrated state applies rules 1 (see [`crate::state::RULES`]) until its region's
//! leader adopts the current rules through the log, so every node of the region counts
//! revisions the same way whatever the point its own snapshot was taken at.

use std::collections::{BTreeMap, VecDeque};

use rampart_core::api::Event;
use rampart_core::health::Health;
use rampart_core::service::{Instance, InstanceRole, Policy};
use serde::Deserialize;

use crate::local::{Local, QuotaStanding, Verdict};
use crate::shipped::{Hold, InstanceRecord, Lease, Record, Service, Shipped, Token};
use crate::state::State;

/// The state as format 1 encodes it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct StateV1 {
    revision: u64,
    kv: imbl::OrdMap<String, Record>,
    leases: BTreeMap<u64, Lease>,
    elections: BTreeMap<String, Hold>,
    next_lease_id: u64,
    tokens: BTreeMap<String, Token>,
    auth_bootstrapped: bool,
    events: VecDeque<Event>,
    next_event_id: u64,
    services: BTreeMap<String, ServiceV1>,
    quotas: BTreeMap<(String, String), QuotaStanding>,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct ServiceV1 {
    policy: Policy,
    instances: BTreeMap<String, InstanceV1>,
    primary: Option<String>,
    demoting: bool,
    promotions: u64,
    token: u64,
}

#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct InstanceV1 {
    instance: Instance,
    role: InstanceRole,
    health: Health,
    health_since_ms: u64,
    ready: Health,
    losses_ms: Vec<u64>,
    fenced: bool,
}

impl StateV1 {
    /// The same state in the current layout, under rules 1: the revision stays, the local
    /// revision starts at 0, instance verdicts move to the local part.
    pub fn migrate(self) -> State {
        let mut verdicts: BTreeMap<String, BTreeMap<String, Verdict>> = BTreeMap::new();
        let mut services = BTreeMap::new();
        for (name, old) in self.services {
            let mut instances = BTreeMap::new();
            for (id, i) in old.instances {
                let verdict = Verdict {
                    health: i.health,
                    health_since_ms: i.health_since_ms,
                    ready: i.ready,
                    fenced: i.fenced,
                };
                verdicts.entry(name.clone()).or_default().insert(id.clone(), verdict);
                let record = InstanceRecord {
                    instance: i.instance,
                    role: i.role,
                    losses_ms: i.losses_ms,
                };
                instances.insert(id, record);
            }
            let service = Service {
                policy: old.policy,
                instances,
                primary: old.primary,
                demoting: old.demoting,
                promotions: old.promotions,
                token: old.token,
                kind: rampart_core::service::Kind::Generic,
            };
            services.insert(name, service);
        }
        State {
            shipped: Shipped {
                revision: self.revision,
                rules: 1,
                kv: self.kv,
                leases: self.leases,
                elections: self.elections,
                next_lease_id: self.next_lease_id,
                tokens: self.tokens,
                auth_bootstrapped: self.auth_bootstrapped,
                services,
                epochs: Vec::new(),
            },
            local: Local {
                revision: 0,
                events: self.events,
                next_event_id: self.next_event_id,
                quotas: self.quotas,
                verdicts,
                promise: None,
                synchronous: BTreeMap::new(),
            },
            seeding: None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::command::{Command, Op, Outcome};

    /// A format-1 state with a key, a service whose instance was seen down and fenced, an
    /// event and a quota standing, at revision 7.
    pub(crate) fn a_format_1_state() -> StateV1 {
        let policy = rampart_core::service::PolicySpec::default().validate().expect("policy");
        let spec: rampart_core::service::InstanceSpec =
            serde_json::from_str(r#"{"endpoint": "127.0.0.1:1"}"#).expect("instance");
        let instance = InstanceV1 {
            instance: spec.validate("r").expect("valid"),
            role: InstanceRole::Replica,
            health: Health::Down,
            health_since_ms: 42,
            ready: Health::Up,
            losses_ms: vec![40],
            fenced: true,
        };
        let service = ServiceV1 {
            policy,
            instances: BTreeMap::from([("i1".to_string(), instance)]),
            primary: None,
            demoting: false,
            promotions: 1,
            token: 5,
        };
        let record = Record {
            value: "v".into(),
            revision: 7,
            create_revision: 7,
            lease: None,
        };
        let event = Event {
            id: 3,
            at_ms: 9,
            kind: "failover".into(),
            action: "promote".into(),
            actor: "leader".into(),
            source: "node 1".into(),
            outcome: "ok".into(),
            detail: String::new(),
        };
        StateV1 {
            revision: 7,
            kv: imbl::OrdMap::from_iter([("k".to_string(), record)]),
            leases: BTreeMap::new(),
            elections: BTreeMap::new(),
            next_lease_id: 0,
            tokens: BTreeMap::new(),
            auth_bootstrapped: true,
            events: VecDeque::from([event]),
            next_event_id: 3,
            services: BTreeMap::from([("db".to_string(), service)]),
            quotas: BTreeMap::new(),
        }
    }

    fn at(at_ms: u64, op: Op) -> Command {
        Command { at_ms, op }
    }

    #[test]
    fn a_format_1_state_migrates_with_its_verdicts_moved_to_the_local_part() {
        let bytes = postcard::to_allocvec(&a_format_1_state()).expect("encode");
        let state = postcard::from_bytes::<StateV1>(&bytes).expect("decode").migrate();
        assert_eq!((state.revision(), state.shipped.rules, state.local.revision), (7, 1, 0));
        assert_eq!(state.get("k").expect("the key").value, "v");
        let verdict = state.local.verdict("db", "i1");
        assert_eq!(
            verdict,
            Verdict {
                health: Health::Down,
                health_since_ms: 42,
                ready: Health::Up,
                fenced: true
            }
        );
        let service = &state.shipped.services["db"];
        assert_eq!((service.token, service.promotions), (5, 1));
        assert_eq!(service.instances["i1"].losses_ms, vec![40]);
        assert_eq!(state.local.events.len(), 1);
        assert!(state.shipped.auth_bootstrapped);
    }

    #[test]
    fn rules_1_count_as_format_1_did_until_the_region_adopts_the_current_rules() {
        let mut state = a_format_1_state().migrate();
        let policy = rampart_core::service::PolicySpec::default().validate().expect("policy");
        let service_put = |at_ms| {
            at(
                at_ms,
                Op::ServicePut {
                    name: "web".into(),
                    policy: policy.clone(),
                },
            )
        };
        let up = at(
            2,
            Op::InstanceHealth {
                service: "db".into(),
                id: "i1".into(),
                health: Health::Up,
            },
        );
        state.apply(&service_put(1));
        state.apply(&up);
        assert_eq!(
            (state.revision(), state.local.revision),
            (7, 0),
            "under rules 1 a registry write and a verdict move no revision"
        );
        assert!(!state.local.verdict("db", "i1").fenced, "seen up: forgiven, as before");
        let put = at(
            3,
            Op::Put {
                key: "k".into(),
                value: "w".into(),
                lease: None,
                if_revision: None,
            },
        );
        assert_eq!(
            state.apply(&put).0,
            Outcome::Put { revision: 8 },
            "key writes always did"
        );

        assert_eq!(
            state.apply(&at(4, Op::AdoptRules { rules: crate::RULES })).0,
            Outcome::RulesAdopted { rules: crate::RULES }
        );
        assert_eq!(state.revision(), 9, "adopting the rules is a shipped change under them");
        state.apply(&service_put(5));
        state.apply(&up);
        assert_eq!(
            (state.revision(), state.local.revision),
            (10, 0),
            "the verdict did not change"
        );
        state.apply(&at(
            6,
            Op::InstanceHealth {
                service: "db".into(),
                id: "i1".into(),
                health: Health::Down,
            },
        ));
        assert_eq!((state.revision(), state.local.revision), (10, 1));
        assert_eq!(
            state.apply(&at(7, Op::AdoptRules { rules: crate::RULES })).0,
            Outcome::RulesAdopted { rules: crate::RULES }
        );
        assert_eq!(state.revision(), 10, "adopting them again changes nothing");
    }

    #[test]
    #[should_panic(expected = "upgrade every node of the region")]
    fn a_node_asked_for_rules_it_does_not_know_stops() {
        let mut state = State::default();
        state.apply(&at(
            1,
            Op::AdoptRules {
                rules: crate::RULES + 1,
            },
        ));
    }
}
