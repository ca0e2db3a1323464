//! Data dir format 3: the state before service kinds (`Service::kind`) and synchronous
//! standbys (`Local::synchronous`), kept to read what a format-3 node, backup or install
//! step wrote, and its migration to the current layout: every service generic, as it was,
//! and no synchronous standby.

use std::collections::BTreeMap;

use rampart_core::service::{Kind, Policy};
use serde::Deserialize;

use crate::local::Local;
use crate::seed::{SeedStep, Seeding};
use crate::shipped::{Hold, InstanceRecord, Lease, Record, Service, Shipped, Token};

/// A service as format 3 encodes it (formats 2 and 3 alike).
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct ServiceV3 {
    policy: Policy,
    instances: BTreeMap<String, InstanceRecord>,
    primary: Option<String>,
    demoting: bool,
    promotions: u64,
    token: u64,
}

/// The shipped part as format 3 encodes it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct ShippedV3 {
    revision: u64,
    rules: u32,
    kv: imbl::OrdMap<String, Record>,
    leases: BTreeMap<u64, Lease>,
    elections: BTreeMap<String, Hold>,
    next_lease_id: u64,
    tokens: BTreeMap<String, Token>,
    auth_bootstrapped: bool,
    services: BTreeMap<String, ServiceV3>,
    epochs: Vec<rampart_core::region::EpochStart>,
}

/// The local part as format 3 encodes it (before `Local::synchronous`).
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct LocalV3 {
    revision: u64,
    events: std::collections::VecDeque<rampart_core::api::Event>,
    next_event_id: u64,
    quotas: BTreeMap<(String, String), crate::local::QuotaStanding>,
    verdicts: BTreeMap<String, BTreeMap<String, crate::local::Verdict>>,
    promise: Option<rampart_core::region::lease::Promise>,
}

/// The state as format 3 encodes it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct StateV3 {
    shipped: ShippedV3,
    local: LocalV3,
}

/// An install step as format 3 encodes it (in a log written before the upgrade).
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub enum SeedStepV3 {
    Begin {
        revision: u64,
        rest: Box<ShippedV3>,
    },
    Keys {
        revision: u64,
        entries: Vec<(String, Record)>,
    },
    End {
        revision: u64,
        checksum: String,
    },
}

/// An install under way, as a format-3 snapshot keeps it after the state.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct SeedingV3 {
    revision: u64,
    shipped: ShippedV3,
    last_key: Option<String>,
}

impl ServiceV3 {
    pub fn migrate(self) -> Service {
        Service {
            policy: self.policy,
            instances: self.instances,
            primary: self.primary,
            demoting: self.demoting,
            promotions: self.promotions,
            token: self.token,
            kind: Kind::Generic,
        }
    }
}

/// Format 3's services in the current layout: every one generic.
pub fn migrate_services(services: BTreeMap<String, ServiceV3>) -> BTreeMap<String, Service> {
    services.into_iter().map(|(name, s)| (name, s.migrate())).collect()
}

impl ShippedV3 {
    pub fn migrate(self) -> Shipped {
        Shipped {
            revision: self.revision,
            rules: self.rules,
            kv: self.kv,
            leases: self.leases,
            elections: self.elections,
            next_lease_id: self.next_lease_id,
            tokens: self.tokens,
            auth_bootstrapped: self.auth_bootstrapped,
            services: migrate_services(self.services),
            epochs: self.epochs,
        }
    }
}

impl StateV3 {
    /// The same state's parts in the current layout (`State::from` puts them together).
    pub fn migrate(self) -> (Shipped, Local) {
        let local = self.local;
        let local = Local {
            revision: local.revision,
            events: local.events,
            next_event_id: local.next_event_id,
            quotas: local.quotas,
            verdicts: local.verdicts,
            promise: local.promise,
            synchronous: BTreeMap::new(),
        };
        (self.shipped.migrate(), local)
    }
}

impl SeedStepV3 {
    pub fn migrate(self) -> SeedStep {
        match self {
            SeedStepV3::Begin { revision, rest } => SeedStep::Begin {
                revision,
                rest: Box::new(rest.migrate()),
            },
            SeedStepV3::Keys { revision, entries } => SeedStep::Keys { revision, entries },
            SeedStepV3::End { revision, checksum } => SeedStep::End { revision, checksum },
        }
    }
}

impl From<SeedingV3> for Seeding {
    fn from(old: SeedingV3) -> Seeding {
        old.migrate()
    }
}

impl SeedingV3 {
    pub fn migrate(self) -> Seeding {
        Seeding {
            revision: self.revision,
            shipped: self.shipped.migrate(),
            last_key: self.last_key,
        }
    }
}

/// An encoded install step (`Op::Seed`) as a format-3 node wrote it (a step in a log
/// written before the upgrade lacks the services' kinds).
pub fn decode_seed_step(encoded: &[u8]) -> Result<SeedStep, postcard::Error> {
    postcard::from_bytes::<SeedStepV3>(encoded).map(SeedStepV3::migrate)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rampart_core::service::InstanceRole;

    pub(crate) fn service_v3(service: &Service) -> ServiceV3 {
        assert_eq!(service.kind, Kind::Generic, "format 3 has no kinds");
        ServiceV3 {
            policy: service.policy.clone(),
            instances: service.instances.clone(),
            primary: service.primary.clone(),
            demoting: service.demoting,
            promotions: service.promotions,
            token: service.token,
        }
    }

    pub(crate) fn services_v3(services: &BTreeMap<String, Service>) -> BTreeMap<String, ServiceV3> {
        services.iter().map(|(name, s)| (name.clone(), service_v3(s))).collect()
    }

    fn shipped_v3(shipped: &Shipped) -> ShippedV3 {
        ShippedV3 {
            revision: shipped.revision,
            rules: shipped.rules,
            kv: shipped.kv.clone(),
            leases: shipped.leases.clone(),
            elections: shipped.elections.clone(),
            next_lease_id: shipped.next_lease_id,
            tokens: shipped.tokens.clone(),
            auth_bootstrapped: shipped.auth_bootstrapped,
            services: services_v3(&shipped.services),
            epochs: shipped.epochs.clone(),
        }
    }

    /// A state of these parts as format 3 lays it out, and its install under way.
    pub(crate) fn state_v3(
        shipped: &Shipped,
        local: &Local,
        seeding: Option<&Seeding>,
    ) -> (StateV3, Option<SeedingV3>) {
        assert!(local.synchronous.is_empty(), "format 3 has no synchronous standbys");
        let v3 = StateV3 {
            shipped: shipped_v3(shipped),
            local: LocalV3 {
                revision: local.revision,
                events: local.events.clone(),
                next_event_id: local.next_event_id,
                quotas: local.quotas.clone(),
                verdicts: local.verdicts.clone(),
                promise: local.promise.clone(),
            },
        };
        let seeding = seeding.map(|s| SeedingV3 {
            revision: s.revision,
            shipped: shipped_v3(&s.shipped),
            last_key: s.last_key.clone(),
        });
        (v3, seeding)
    }

    /// A shipped part with one generic service, its primary promoted.
    pub(crate) fn with_a_service() -> Shipped {
        use crate::command::{Command, Op};
        let mut shipped = Shipped::default();
        let policy = rampart_core::service::PolicySpec::default().validate().expect("policy");
        let instance = rampart_core::service::InstanceSpec {
            endpoint: "127.0.0.1:1".into(),
            ..Default::default()
        }
        .validate("east")
        .expect("instance");
        for op in [
            Op::ServicePut {
                name: "db".into(),
                policy,
            },
            Op::InstancePut {
                service: "db".into(),
                id: "a".into(),
                instance,
            },
        ] {
            shipped.apply(&Command { at_ms: 5, op });
        }
        shipped
    }

    #[test]
    fn a_format_3_state_reads_as_before_with_every_service_generic() {
        let shipped = with_a_service();
        let local = Local::default();
        let bytes = postcard::to_allocvec(&state_v3(&shipped, &local, None).0).expect("encode");
        assert!(
            postcard::from_bytes::<(Shipped, Local)>(&bytes).is_err(),
            "format 4 must not read format 3's bytes as its own"
        );
        let migrated = postcard::from_bytes::<StateV3>(&bytes).expect("decode").migrate();
        assert_eq!(migrated, (shipped, local));
        assert_eq!(migrated.0.services["db"].kind, Kind::Generic);
        let roles: Vec<_> = migrated.0.services["db"].instances.values().map(|i| i.role).collect();
        assert_eq!(roles, vec![InstanceRole::Replica]);
    }

    #[test]
    fn an_install_step_a_format_3_node_wrote_is_taken_as_written() {
        let source = with_a_service();
        let old = SeedStepV3::Begin {
            revision: source.revision,
            rest: Box::new(shipped_v3(&source)),
        };
        let encoded = postcard::to_allocvec(&old).expect("encode");
        let mut seeding = None;
        let mut standby = Shipped::default();
        let step = decode_seed_step(&encoded).expect("a format-3 step decodes");
        let outcome = crate::seed::step(&mut seeding, &mut standby, &step);
        assert_eq!(
            outcome,
            crate::command::Outcome::Seeding {
                revision: source.revision
            }
        );
        let seeding = seeding.expect("an install under way");
        assert_eq!(seeding.shipped.services["db"].kind, Kind::Generic);
        assert!(decode_seed_step(b"\xff\xff").is_err());
    }
}
