//! What goes through the Raft log, and what applying it answers.

use rampart_core::api::Event;
use rampart_core::auth::Role;
use rampart_core::service::{Instance, Policy};
use serde::{Deserialize, Serialize};

/// One Raft entry: the client writes a leader gathered while its earlier proposals were in
/// flight, applied in order, each with its own revision and outcome. Batching is Rampart's
/// group commit: openraft 0.9 appends and fsyncs one entry at a time, so many writes per
/// entry means many writes per fsync, on the leader and on every follower.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub commands: Vec<Command>,
}

/// One client write, as proposed by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// The proposing leader's wall clock in ms since the epoch: the only notion of time
    /// apply sees, so `since_ms` of an election is the same on every node.
    pub at_ms: u64,
    pub op: Op,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put {
        key: String,
        value: String,
        lease: Option<u64>,
        if_revision: Option<u64>,
    },
    Delete {
        key: String,
    },
    LeaseGrant {
        ttl_ms: u64,
    },
    /// Revoke by a client, or expiry decided by the leader.
    LeaseRevoke {
        id: u64,
    },
    Campaign {
        name: String,
        candidate: String,
        lease: u64,
    },
    Resign {
        name: String,
        candidate: Option<String>,
    },
    /// Adds an API token. Only the SHA-256 of its secret travels through the log.
    TokenCreate {
        name: String,
        role: Role,
        prefixes: Vec<String>,
        hash: [u8; 32],
        /// The region's first admin token: applies only if none was ever bootstrapped.
        bootstrap: bool,
    },
    TokenRevoke {
        name: String,
    },
    /// Appends to the region's event log (audit trail and, later, failovers and backups).
    Record {
        event: Event,
    },
    /// Creates a service or replaces its policy (its instances stay).
    ServicePut {
        name: String,
        policy: Policy,
    },
    ServiceDelete {
        name: String,
    },
    /// Registers an instance or replaces its registration (its role and health stay).
    InstancePut {
        service: String,
        id: String,
        instance: Instance,
    },
    InstanceDelete {
        service: String,
        id: String,
    },
    /// The region's confirmed verdict on an instance changed (decided by the leader from
    /// every node's probes).
    InstanceHealth {
        service: String,
        id: String,
        health: rampart_core::health::Health,
    },
    /// The region's readiness verdict on an instance changed (it joins or leaves the
    /// serving set; no failover).
    InstanceReadiness {
        service: String,
        id: String,
        ready: rampart_core::health::Health,
    },
    /// Asks the current primary to step down: its node runs `on_demote` and answers with
    /// [`Op::Release`]. Meanwhile the primary is `demoting`.
    Demote {
        service: String,
        id: String,
    },
    /// Calls off a demotion whose hook failed: the primary stays primary.
    CancelDemote {
        service: String,
        id: String,
    },
    /// The primary no longer serves as primary (its demotion hook ran).
    Release {
        service: String,
        id: String,
    },
    /// `id`'s `on_promote` hook failed (or timed out) for `token`: it gives the role back and
    /// is fenced (not promoted again automatically) until its health recovers or it is
    /// registered anew, so the next candidate is tried.
    PromotionFailed {
        service: String,
        id: String,
        token: u64,
    },
    /// Makes `id` the primary with a new fencing token; refused while another instance is
    /// primary or the instance is not up.
    Promote {
        service: String,
        id: String,
    },
    /// Takes one request's worth of `client`'s standing in quota `name` (cluster-scope
    /// proxy quotas), at the proposing leader's clock.
    QuotaTake {
        name: String,
        client: String,
        tier: rampart_core::proxy::Tier,
    },
    /// Moves the region to apply rules `rules` (see `state::RULES`), proposed by a leader
    /// whose region still applies older ones. Added last: the encoding of the commands
    /// before it is unchanged.
    AdoptRules {
        rules: u32,
    },
    /// A write of the primary region's shipped state, at its `revision` there, applied by a
    /// standby region to its own shipped part alone (no region-local check or effect), so
    /// the standby keeps the primary's revisions. One at or below the standby's revision
    /// was applied already (a link that resumed) and changes nothing.
    Replicate {
        revision: u64,
        command: Box<Command>,
    },
    /// A standby region's install of the primary region's shipped state, in steps (see
    /// `seed`): for a standby further behind than the primary keeps writes for. The step
    /// (`seed::SeedStep`) travels encoded, so the log's commands do not depend on the
    /// state's types; apply decodes it.
    Seed {
        step: Vec<u8>,
    },
    /// This region's durable word in the region lease (`core::region::lease`): the lease of
    /// `promise.epoch` is `promise.region`'s. Region-local; an older epoch than the one
    /// promised is refused.
    RegionPromise {
        promise: rampart_core::region::lease::Promise,
    },
    /// A region failover: `region` is the primary from this write on, at `epoch`. Shipped,
    /// so every standby that follows learns it in order; refused unless `epoch` is newer.
    RegionEpoch {
        epoch: u64,
        region: String,
        /// Won by an operator's forced failover (see `EpochStart::forced`).
        forced: bool,
    },
    /// Creates a service or replaces its policy and kind (data dir format 4; its instances
    /// stay). `ServicePut`, from before kinds, stores a generic service.
    ServiceKindPut {
        name: String,
        policy: Policy,
        kind: rampart_core::service::Kind,
    },
    /// The synchronous standby of a `postgres` service in synchronous mode (none: nobody
    /// may be promoted). Region-local: decided by this region's leader from its verdicts.
    SynchronousStandby {
        service: String,
        standby: Option<String>,
    },
}

/// What applying a command may change: the region-local part of the state (else the
/// shipped part, see docs/design/state-split.md), and the service registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Touches {
    pub local: bool,
    pub services: bool,
}

impl Op {
    /// What applying it may change.
    pub fn touches(&self) -> Touches {
        const SHIPPED: Touches = Touches {
            local: false,
            services: false,
        };
        const REGISTRY: Touches = Touches {
            local: false,
            services: true,
        };
        const VERDICTS: Touches = Touches {
            local: true,
            services: true,
        };
        const LOCAL: Touches = Touches {
            local: true,
            services: false,
        };
        // Exhaustive, so a new command must say which it is.
        match self {
            Op::Put { .. }
            | Op::Delete { .. }
            | Op::LeaseGrant { .. }
            | Op::LeaseRevoke { .. }
            | Op::Campaign { .. }
            | Op::Resign { .. }
            | Op::TokenCreate { .. }
            | Op::TokenRevoke { .. }
            | Op::AdoptRules { .. }
            | Op::RegionEpoch { .. } => SHIPPED,
            Op::ServicePut { .. }
            | Op::ServiceKindPut { .. }
            | Op::ServiceDelete { .. }
            | Op::InstancePut { .. }
            | Op::InstanceDelete { .. }
            | Op::Demote { .. }
            | Op::CancelDemote { .. }
            | Op::Release { .. }
            | Op::PromotionFailed { .. }
            | Op::Promote { .. }
            | Op::Replicate { .. }
            | Op::Seed { .. } => REGISTRY,
            Op::InstanceHealth { .. } | Op::InstanceReadiness { .. } => VERDICTS,
            Op::Record { .. } | Op::QuotaTake { .. } | Op::RegionPromise { .. } => LOCAL,
            Op::SynchronousStandby { .. } => VERDICTS,
        }
    }

    /// Whether it is a command of the region-local part of the state.
    pub fn is_local(&self) -> bool {
        self.touches().local
    }

    /// Whether applying it may change the service registry (definitions, roles, verdicts).
    pub fn touches_services(&self) -> bool {
        self.touches().services
    }

    /// Its size, near enough to bound a batch's (or a history's) bytes.
    pub fn approx_bytes(&self) -> usize {
        const OVERHEAD: usize = 32;
        OVERHEAD
            + match self {
                Op::Put { key, value, .. } => key.len() + value.len(),
                Op::Delete { key } => key.len(),
                Op::Campaign { name, candidate, .. } => name.len() + candidate.len(),
                Op::Resign { name, candidate } => name.len() + candidate.as_ref().map_or(0, String::len),
                Op::TokenCreate { name, prefixes, .. } => {
                    name.len() + 32 + prefixes.iter().map(String::len).sum::<usize>()
                }
                Op::TokenRevoke { name } => name.len(),
                Op::Record { event } => {
                    event.kind.len()
                        + event.action.len()
                        + event.actor.len()
                        + event.source.len()
                        + event.outcome.len()
                        + event.detail.len()
                }
                // Policies and registrations are small; a generous flat size bounds them.
                Op::ServicePut { name, .. } | Op::ServiceKindPut { name, .. } | Op::ServiceDelete { name } => {
                    name.len() + 4096
                }
                Op::InstancePut { service, id, .. } | Op::InstanceDelete { service, id } => {
                    service.len() + id.len() + 4096
                }
                Op::InstanceHealth { service, id, .. }
                | Op::InstanceReadiness { service, id, .. }
                | Op::Demote { service, id }
                | Op::CancelDemote { service, id }
                | Op::Release { service, id }
                | Op::Promote { service, id }
                | Op::PromotionFailed { service, id, .. } => service.len() + id.len(),
                Op::QuotaTake { name, client, .. } => name.len() + client.len() + 16,
                Op::LeaseGrant { .. } | Op::LeaseRevoke { .. } | Op::AdoptRules { .. } => 0,
                Op::Replicate { command, .. } => 8 + command.op.approx_bytes(),
                Op::Seed { step } => 8 + step.len(),
                Op::RegionPromise { promise } => 8 + promise.region.len(),
                Op::RegionEpoch { region, .. } => 8 + region.len(),
                Op::SynchronousStandby { service, standby } => service.len() + standby.as_ref().map_or(0, String::len),
            }
    }
}

/// The answers to one applied entry, one per command of its [`Batch`] (none for blank and
/// membership entries).
pub type Outcomes = Vec<Outcome>;

/// The answer to one applied command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Put {
        revision: u64,
    },
    Deleted {
        revision: u64,
        deleted: bool,
    },
    /// `if_revision` did not match; `current` is the key's revision (0 = absent).
    RevisionMismatch {
        current: u64,
    },
    LeaseNotFound {
        id: u64,
    },
    LeaseGranted {
        id: u64,
        ttl_ms: u64,
    },
    LeaseRevoked {
        found: bool,
    },
    /// The candidate holds the election (newly or already) with this fencing token.
    Elected {
        leader: String,
        token: u64,
    },
    /// Someone else holds it.
    Held {
        leader: String,
        token: u64,
        lease: u64,
    },
    Resigned {
        found: bool,
    },
    TokenCreated,
    /// A token of that name exists (or, for a bootstrap, one was already made).
    TokenExists,
    TokenRevoked {
        found: bool,
    },
    Recorded {
        id: u64,
    },
    ServiceStored {
        created: bool,
    },
    ServiceDeleted {
        found: bool,
    },
    ServiceNotFound,
    InstanceStored {
        created: bool,
    },
    InstanceDeleted {
        found: bool,
    },
    InstanceNotFound,
    HealthRecorded,
    /// Demotion requested (or already under way).
    Demoting,
    Released,
    /// `id` is not the primary (release or demote of someone else).
    NotPrimary {
        primary: Option<String>,
    },
    Promoted {
        token: u64,
    },
    /// Another instance still holds the primary role.
    PrimaryHeld {
        primary: String,
    },
    /// The instance may not be promoted: its committed health is not up.
    NotPromotable {
        health: rampart_core::health::Health,
    },
    QuotaTaken {
        used_today: u64,
    },
    /// Over the `rate` or `daily` limit; a request is allowed again after `retry_after_ms`.
    OverQuota {
        limit: String,
        retry_after_ms: u64,
    },
    /// The region keeps [`crate::state::QUOTA_CLIENTS_MAX`] standings and none of them can
    /// be forgotten yet: a new client is refused rather than counted nowhere.
    QuotaClientsFull,
    /// The apply rules now in force.
    RulesAdopted {
        rules: u32,
    },
    /// The standby's shipped revision after a replicated write.
    Replicated {
        revision: u64,
    },
    /// A replicated write that does not follow the standby's revision: the link must
    /// resume from `expected` (or from a snapshot).
    ReplicationGap {
        expected: u64,
    },
    /// A step of an install taken (see `seed`).
    Seeding {
        revision: u64,
    },
    /// An install finished: the shipped part is the primary's at `revision`, whose
    /// checksum there was `checksum`.
    Seeded {
        revision: u64,
        checksum: String,
    },
    /// A step of an install out of turn; nothing changed.
    SeedRefused {
        reason: String,
    },
    /// The region's promise after a `RegionPromise` (the one asked for, or a newer one
    /// it keeps).
    Promised {
        promise: rampart_core::region::lease::Promise,
    },
    /// The region epoch after a `RegionEpoch` (the new one, or a newer one already there).
    EpochStarted {
        epoch: u64,
        started: bool,
    },
    /// The synchronous standby now recorded.
    SynchronousStandby {
        standby: Option<String>,
    },
}
