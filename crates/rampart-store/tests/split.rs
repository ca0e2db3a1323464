//! The state split's promise to cross-region replication: a standby that applies only the
//! primary region's commands that moved the shipped revision (as `Op::Replicate`, which
//! skips every region-local check and effect), knowing nothing of the primary's local
//! state, holds the primary's shipped state at every revision, and a write sent again
//! changes nothing; a command that did not move a part's revision left that part as it
//! was; a command moves each revision by at most one (asserted inside `State::apply`); and a
//! standby that missed writes installs the primary's shipped state in steps of any size
//! (`Op::Seed`) and then follows it again.

use proptest::prelude::*;
use rampart_core::api::Event;
use rampart_core::auth::Role;
use rampart_core::health::Health;
use rampart_store::{Command, Op, Outcome, State};

fn one_of(names: &'static [&'static str]) -> impl Strategy<Value = String> {
    proptest::sample::select(names).prop_map(str::to_string)
}

fn health() -> impl Strategy<Value = Health> {
    prop_oneof![Just(Health::Up), Just(Health::Down), Just(Health::Unknown)]
}

/// Commands of every kind over a few names, so they run into each other.
fn op() -> impl Strategy<Value = Op> {
    let key = || one_of(&["a", "b", "c"]);
    let lease = || 1u64..4;
    let service = || one_of(&["db", "cache"]);
    let instance = || one_of(&["i1", "i2", "i3"]);
    let policy = rampart_core::service::PolicySpec::default()
        .validate()
        .expect("the default policy");
    let spec: rampart_core::service::InstanceSpec =
        serde_json::from_str(r#"{"endpoint": "127.0.0.1:1"}"#).expect("an instance");
    let registration = spec.validate("r").expect("a valid instance");
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
    let tier = rampart_core::proxy::Tier {
        rate: None,
        burst: 0,
        daily: Some(2),
    };
    prop_oneof![
        (key(), proptest::option::of(lease()), proptest::option::of(0u64..6)).prop_map(|(key, lease, if_revision)| {
            Op::Put {
                key,
                value: "v".into(),
                lease,
                if_revision,
            }
        }),
        key().prop_map(|key| Op::Delete { key }),
        Just(Op::LeaseGrant { ttl_ms: 1000 }),
        lease().prop_map(|id| Op::LeaseRevoke { id }),
        (one_of(&["e1", "e2"]), one_of(&["x", "y"]), lease()).prop_map(|(name, candidate, lease)| Op::Campaign {
            name,
            candidate,
            lease
        }),
        (one_of(&["e1", "e2"]), proptest::option::of(one_of(&["x", "y"])))
            .prop_map(|(name, candidate)| Op::Resign { name, candidate }),
        (one_of(&["t1", "t2"]), any::<bool>()).prop_map(|(name, bootstrap)| Op::TokenCreate {
            name,
            role: Role::Admin,
            prefixes: vec![],
            hash: [7; 32],
            bootstrap,
        }),
        one_of(&["t1", "t2"]).prop_map(|name| Op::TokenRevoke { name }),
        service().prop_map(move |name| Op::ServicePut {
            name,
            policy: policy.clone()
        }),
        service().prop_map(|name| Op::ServiceDelete { name }),
        (service(), instance()).prop_map(move |(service, id)| Op::InstancePut {
            service,
            id,
            instance: registration.clone()
        }),
        (service(), instance()).prop_map(|(service, id)| Op::InstanceDelete { service, id }),
        (service(), instance(), health()).prop_map(|(service, id, health)| Op::InstanceHealth { service, id, health }),
        (service(), instance(), health()).prop_map(|(service, id, ready)| Op::InstanceReadiness { service, id, ready }),
        (service(), instance()).prop_map(|(service, id)| Op::Demote { service, id }),
        (service(), instance()).prop_map(|(service, id)| Op::CancelDemote { service, id }),
        (service(), instance()).prop_map(|(service, id)| Op::Release { service, id }),
        // Token 0 stands for the service's current token (the driver fills it in).
        (service(), instance(), prop_oneof![Just(0u64), 1u64..40])
            .prop_map(|(service, id, token)| Op::PromotionFailed { service, id, token }),
        (service(), instance()).prop_map(|(service, id)| Op::Promote { service, id }),
        (service(), instance()).prop_map(|(service, id)| Op::Promote { service, id }),
        one_of(&["k1", "k2"]).prop_map(move |client| Op::QuotaTake {
            name: "api".into(),
            client,
            tier
        }),
        Just(Op::Record { event }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn a_standby_applying_the_shipped_writes_alone_holds_the_primarys_shipped_state(
        commands in proptest::collection::vec((op(), 0u64..120_000), 1..250)
    ) {
        let mut primary = State::default();
        let mut standby = State::default();
        let mut at_ms = 1_000_000;
        for (mut op, step) in commands {
            at_ms += step;
            if let Op::PromotionFailed { service, token: token @ 0, .. } = &mut op {
                *token = primary.shipped.services.get(service.as_str()).map_or(0, |s| s.token);
            }
            let command = Command { at_ms, op };
            let before = primary.shipped.clone();
            let local_before = primary.local.clone();
            primary.apply(&command);
            if primary.local.revision == local_before.revision {
                prop_assert_eq!(&primary.local, &local_before, "{:?} changed the local state without moving its revision", command.op);
            }
            if primary.revision() == before.revision {
                prop_assert_eq!(&primary.shipped, &before, "{:?} changed the shipped state without moving its revision", command.op);
                continue;
            }
            prop_assert!(!command.op.is_local(), "a local command moved the shipped revision: {:?}", command.op);
            let replicated = Command {
                at_ms,
                op: Op::Replicate { revision: primary.revision(), command: Box::new(command.clone()) },
            };
            prop_assert_eq!(standby.apply(&replicated).0, Outcome::Replicated { revision: primary.revision() });
            prop_assert_eq!(&standby.shipped, &primary.shipped, "after {:?}", command.op);
            // A link that resumed sends it again: nothing changes.
            prop_assert_eq!(standby.apply(&replicated).0, Outcome::Replicated { revision: primary.revision() });
            prop_assert_eq!(&standby.shipped, &primary.shipped);
        }
        prop_assert_eq!(standby.checksum(), primary.checksum());
        prop_assert_eq!(&standby.local, &rampart_store::Local::default(), "the standby's local part is its own");
    }

    #[test]
    fn a_standby_cut_off_installs_the_primarys_shipped_state_in_steps_and_goes_on(
        commands in proptest::collection::vec((op(), 0u64..120_000, proptest::bool::weighted(0.8)), 1..250),
        chunk in 1usize..8,
    ) {
        use rampart_store::SeedStep;
        let mut primary = State::default();
        let mut standby = State::default();
        let mut at_ms = 1_000_000;
        for (op, step, link_up) in commands {
            at_ms += step;
            let command = Command { at_ms, op };
            let before = primary.shipped.clone();
            primary.apply(&command);
            if primary.revision() == before.revision || !link_up {
                continue;
            }
            if standby.revision() + 1 < primary.revision() {
                // Behind what a link can replay: install the primary's state as it stood
                // before this write, `chunk` keys a step, as GET /v1/regions/snapshot sends it.
                let source = State { shipped: before, ..State::default() };
                let mut rest = source.shipped.clone();
                rest.kv.clear();
                let seed = |step: SeedStep| Command { at_ms, op: step.to_op() };
                let revision = source.revision();
                prop_assert_eq!(standby.apply(&seed(SeedStep::Begin { revision, rest: Box::new(rest) })).0, Outcome::Seeding { revision });
                let keys: Vec<_> = source.shipped.kv.iter().map(|(k, r)| (k.clone(), r.clone())).collect();
                for entries in keys.chunks(chunk) {
                    let step = SeedStep::Keys { revision, entries: entries.to_vec() };
                    prop_assert_eq!(standby.apply(&seed(step)).0, Outcome::Seeding { revision });
                }
                let checksum = rampart_store::checksum_text(source.checksum());
                let end = standby.apply(&seed(SeedStep::End { revision, checksum: checksum.clone() })).0;
                prop_assert_eq!(end, Outcome::Seeded { revision, checksum });
                prop_assert_eq!(&standby.shipped, &source.shipped);
            }
            let replicated = Command {
                at_ms,
                op: Op::Replicate { revision: primary.revision(), command: Box::new(command.clone()) },
            };
            prop_assert_eq!(standby.apply(&replicated).0, Outcome::Replicated { revision: primary.revision() });
            prop_assert_eq!(&standby.shipped, &primary.shipped, "after {:?}", command.op);
        }
    }
}
