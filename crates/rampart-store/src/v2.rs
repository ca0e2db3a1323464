//! Data dir format 2: the state before the region epoch history (`Shipped::epochs`) and the
//! region's promise in the region lease (`Local::promise`), kept to read what a format-2
//! node, backup or install step wrote, and its migration to the current layout: no region
//! failover yet, nothing promised, every service generic (as in format 3, [`crate::v3`]).

use std::collections::{BTreeMap, VecDeque};

use rampart_core::api::Event;
use serde::Deserialize;

use crate::local::{Local, QuotaStanding, Verdict};
use crate::seed::{SeedStep, Seeding};
use crate::shipped::{Hold, Lease, Record, Shipped, Token};
use crate::v3::ServiceV3;

/// The shipped part as format 2 encodes it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct ShippedV2 {
    revision: u64,
    rules: u32,
    kv: imbl::OrdMap<String, Record>,
    leases: BTreeMap<u64, Lease>,
    elections: BTreeMap<String, Hold>,
    next_lease_id: u64,
    tokens: BTreeMap<String, Token>,
    auth_bootstrapped: bool,
    services: BTreeMap<String, ServiceV3>,
}

/// The local part as format 2 encodes it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
struct LocalV2 {
    revision: u64,
    events: VecDeque<Event>,
    next_event_id: u64,
    quotas: BTreeMap<(String, String), QuotaStanding>,
    verdicts: BTreeMap<String, BTreeMap<String, Verdict>>,
}

/// The state as format 2 encodes it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct StateV2 {
    shipped: ShippedV2,
    local: LocalV2,
}

/// An install step as format 2 encodes it (in a log written before the upgrade).
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub enum SeedStepV2 {
    Begin {
        revision: u64,
        rest: Box<ShippedV2>,
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

/// An install under way, as a format-2 snapshot keeps it after the state.
#[derive(Deserialize)]
#[cfg_attr(test, derive(serde::Serialize))]
pub struct SeedingV2 {
    revision: u64,
    shipped: ShippedV2,
    last_key: Option<String>,
}

impl ShippedV2 {
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
            services: crate::v3::migrate_services(self.services),
            epochs: Vec::new(),
        }
    }
}

impl StateV2 {
    /// The same state's parts in the current layout: no region failover yet, nothing
    /// promised (`State::from` puts them together).
    pub fn migrate(self) -> (Shipped, Local) {
        let local = self.local;
        let local = Local {
            revision: local.revision,
            events: local.events,
            next_event_id: local.next_event_id,
            quotas: local.quotas,
            verdicts: local.verdicts,
            promise: None,
            synchronous: BTreeMap::new(),
        };
        (self.shipped.migrate(), local)
    }
}

impl SeedStepV2 {
    pub fn migrate(self) -> SeedStep {
        match self {
            SeedStepV2::Begin { revision, rest } => SeedStep::Begin {
                revision,
                rest: Box::new(rest.migrate()),
            },
            SeedStepV2::Keys { revision, entries } => SeedStep::Keys { revision, entries },
            SeedStepV2::End { revision, checksum } => SeedStep::End { revision, checksum },
        }
    }
}

/// An encoded install step (`Op::Seed`) as a format-2 node wrote it (a step in a log
/// written before the upgrade lacks the epoch history); `State::apply` tries the newer
/// layouts first.
pub fn decode_seed_step(encoded: &[u8]) -> Result<SeedStep, postcard::Error> {
    postcard::from_bytes::<SeedStepV2>(encoded).map(SeedStepV2::migrate)
}

impl From<SeedingV2> for Seeding {
    fn from(old: SeedingV2) -> Seeding {
        old.migrate()
    }
}

impl SeedingV2 {
    pub fn migrate(self) -> Seeding {
        Seeding {
            revision: self.revision,
            shipped: self.shipped.migrate(),
            last_key: self.last_key,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn shipped_v2(shipped: &Shipped) -> ShippedV2 {
        assert!(shipped.epochs.is_empty(), "format 2 has no epoch history");
        ShippedV2 {
            revision: shipped.revision,
            rules: shipped.rules,
            kv: shipped.kv.clone(),
            leases: shipped.leases.clone(),
            elections: shipped.elections.clone(),
            next_lease_id: shipped.next_lease_id,
            tokens: shipped.tokens.clone(),
            auth_bootstrapped: shipped.auth_bootstrapped,
            services: crate::v3::tests::services_v3(&shipped.services),
        }
    }

    /// A state of these parts as format 2 lays it out, and its install under way.
    pub(crate) fn state_v2(
        shipped: &Shipped,
        local: &Local,
        seeding: Option<&Seeding>,
    ) -> (StateV2, Option<SeedingV2>) {
        let v2 = StateV2 {
            shipped: shipped_v2(shipped),
            local: LocalV2 {
                revision: local.revision,
                events: local.events.clone(),
                next_event_id: local.next_event_id,
                quotas: local.quotas.clone(),
                verdicts: local.verdicts.clone(),
            },
        };
        let seeding = seeding.map(|s| SeedingV2 {
            revision: s.revision,
            shipped: shipped_v2(&s.shipped),
            last_key: s.last_key.clone(),
        });
        (v2, seeding)
    }

    fn put() -> crate::command::Command {
        crate::command::Command {
            at_ms: 5,
            op: crate::command::Op::Put {
                key: "k".into(),
                value: "v".into(),
                lease: None,
                if_revision: None,
            },
        }
    }

    #[test]
    fn a_format_2_state_reads_as_before_with_no_failover_and_no_promise() {
        let mut shipped = Shipped::default();
        shipped.apply(&put());
        let local = Local::default();
        let bytes = postcard::to_allocvec(&state_v2(&shipped, &local, None).0).expect("encode");
        let migrated = postcard::from_bytes::<StateV2>(&bytes).expect("decode").migrate();
        assert_eq!(migrated, (shipped, local));
        assert_eq!(migrated.0.epoch(), rampart_core::region::FIRST_EPOCH);
    }

    #[test]
    fn an_install_step_a_format_2_node_wrote_is_taken_as_written() {
        let mut source = Shipped::default();
        source.apply(&put());
        let mut rest = source.clone();
        rest.kv.clear();
        let old = SeedStepV2::Begin {
            revision: source.revision,
            rest: Box::new(shipped_v2(&rest)),
        };
        let encoded = postcard::to_allocvec(&old).expect("encode");
        let mut seeding = None;
        let mut standby = Shipped::default();
        let step = decode_seed_step(&encoded).expect("a format-2 step decodes");
        let outcome = crate::seed::step(&mut seeding, &mut standby, &step);
        assert_eq!(outcome, crate::command::Outcome::Seeding { revision: 1 });
        assert!(decode_seed_step(b"\xff\xff").is_err());
    }
}
