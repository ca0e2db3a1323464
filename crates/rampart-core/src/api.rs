//! Bodies of the HTTP API (`/v1`), shared by the node that serves them and the client that
//! calls them, so the two cannot drift apart. docs/api/openapi.yaml documents the same
//! shapes for everyone else.

use serde::{Deserialize, Serialize};

use crate::auth::Role;

/// Every error answer: `{"error": {"code": "...", "message": "..."}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// Stable machine-readable code, e.g. `no_leader`, `revision_mismatch`, `key_too_long`.
    pub code: String,
    pub message: String,
    /// For conflicts: the current state the request collided with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PutRequest {
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<u64>,
    /// Compare-and-set: the key's current `revision` must equal this; 0 = must not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub if_revision: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResponse {
    pub revision: u64,
    /// The region epoch that acknowledged the write (also in the `X-Rampart-Epoch` header).
    #[serde(default = "first_epoch")]
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
    /// Revision of the last write to this key.
    pub revision: u64,
    /// Revision of the write that created this key.
    pub create_revision: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResponse {
    /// Store revision at which the range was read.
    pub revision: u64,
    pub items: Vec<KeyValue>,
    /// True when more keys matched than `limit` allowed.
    #[serde(default)]
    pub more: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteResponse {
    pub revision: u64,
    pub deleted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseGrantRequest {
    pub ttl_ms: u64,
}

/// `POST /v1/quotas/{name}/take`: one request's worth of `client`'s standing in quota
/// `name`, shared by every proxy of the region. The limits travel with each request
/// (every proxy reads them from its own config); 429 `quota_exceeded` when over, with
/// `current = {"limit": "rate"|"daily", "retry_after_ms": n}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaTakeRequest {
    pub client: String,
    pub rate: Option<u32>,
    pub burst: Option<u32>,
    pub daily: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaTakeResponse {
    /// Requests counted for this client today, this one included.
    pub used_today: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrantResponse {
    pub id: u64,
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseKeepaliveResponse {
    pub ttl_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignRequest {
    pub candidate: String,
    pub lease: u64,
    /// How long to wait for the election to become free before answering 409.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignResponse {
    pub leader: String,
    pub token: u64,
    /// The region epoch the token was issued at: compare fencing tokens as (epoch, token),
    /// since a region that takes over counts revisions from its own.
    #[serde(default = "first_epoch")]
    pub epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ElectionState {
    pub leader: String,
    /// Fencing token: the revision of the winning write.
    pub token: u64,
    pub lease: u64,
    /// How long the current holder has held it, by the answering node's clock.
    pub since_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ResignRequest {
    /// Only resign if this candidate holds the election (guards against resigning a successor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: u64,
    pub addr: String,
    /// `voter` or `learner`.
    pub role: String,
}

/// `GET /v1/regions`: every region of the deployment as the answering node sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionsResponse {
    /// The answering node's region.
    pub region: String,
    /// The primary region (as configured until region failover moves it).
    pub primary: String,
    /// The region epoch the answering node knows: 1 until a region failover moves it.
    #[serde(default = "first_epoch")]
    pub epoch: u64,
    /// Whether the regions fail over by themselves when the primary region is lost
    /// (`[regions] auto_failover`).
    #[serde(default)]
    pub auto_failover: bool,
    /// Why they do not, when they do not (two regions and no witness).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_note: Option<String>,
    /// The region lease, as the answering node holds it: on the primary region's leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseStatus>,
    /// On the primary region's leader with `max_rpo_lag`: why it acknowledges no write now
    /// (every standby is further behind than the bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_bound: Option<String>,
    /// This region's durable word in the region lease: the newest epoch it promised, and
    /// to which region (a vote in a failover, or the primary it grants).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promise: Option<crate::region::lease::Promise>,
    /// Divergence files on the answering node (writes it held as an old primary and never
    /// shipped): `GET /v1/regions/divergence` lists and exports them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub divergence: Vec<DivergenceFile>,
    /// This region first, then the others by name.
    pub regions: Vec<RegionStatus>,
}

/// `POST /v1/regions/failover` and `POST /v1/regions/failback`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    /// The region to make the primary.
    pub to: String,
    /// With the primary region unreachable, fail over anyway, losing what it did not ship.
    #[serde(default)]
    pub allow_data_loss: bool,
    /// Say what would be done, and the data it would lose, without doing it.
    #[serde(default)]
    pub dry_run: bool,
}

/// What a region failover did (or, with `dry_run`, would do).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailoverResponse {
    pub from: String,
    pub to: String,
    /// The primary region answered: writes stopped, the target caught up, checksums
    /// compared, the lease handed over; nothing lost.
    pub planned: bool,
    pub dry_run: bool,
    /// The region epoch after the failover (or that it would start).
    pub epoch: u64,
    /// What it lost (or would lose): revisions known, the last reported revision, and the
    /// window after it in which more may have been committed.
    pub rpo: crate::region::takeover::Rpo,
    /// When the target received its last write from the old primary, ms since the Unix
    /// epoch on the old primary's clock (a forced failover's plan).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_shipped_ms: Option<u64>,
    /// The steps, in words.
    pub plan: String,
    /// How long it took, ms (0 for a dry run).
    pub took_ms: u64,
}

/// A divergence file: writes an old primary region held and never shipped, set aside on the
/// node that led it when it resynced from the new primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DivergenceFile {
    /// Its name in the node's `divergence/` directory: `epoch-E-from-R1-to-R2.jsonl`.
    pub name: String,
    pub node_id: u64,
    pub epoch: u64,
    pub from_revision: u64,
    pub to_revision: u64,
    /// Lines in it (writes saved).
    pub writes: u64,
}

/// `GET /v1/regions/divergence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DivergenceResponse {
    /// The files on the answering node.
    pub files: Vec<DivergenceFile>,
    /// The region's `region.divergence` events (which node saved what), newest last.
    pub events: Vec<Event>,
}

/// The region lease on the primary region's leader (safety rule 5).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    /// It may acknowledge writes now.
    pub held: bool,
    /// How long the grants it has count for from now (0: read-only).
    pub valid_for_ms: u64,
    /// The regions whose grants still count, newest renewal first.
    pub granted_by: Vec<String>,
    /// `[regions] region_lease`.
    pub lease_ms: u64,
}

/// `POST /v1/regions/lease/left` (node to its own leader): how long the region lease of
/// `epoch` has left on the leader's clock (0: none held).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseLeft {
    pub epoch: u64,
    pub remaining_ms: u64,
}

/// `POST /v1/regions/verify`: a verification made now by each standby region (from a
/// primary region's node: every standby; from a standby's: its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyResponse {
    pub verifications: Vec<Verification>,
}

/// One standby's comparison of its shipped checksum with the primary's at one revision,
/// or why it could not make one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    /// The standby region.
    pub region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// Whether the checksums were equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby_checksum: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_checksum: Option<String>,
    /// When it was made, ms since the epoch on the standby's clock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
    /// Why no comparison was made (the standby did not answer, or did not reach the
    /// primary's revision in time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RegionStatus {
    /// A region with nothing heard of it yet: no revision, lag or verification.
    pub fn unheard(name: &str, role: &str, this_region: bool, endpoints: Vec<String>) -> RegionStatus {
        RegionStatus {
            name: name.to_string(),
            role: role.to_string(),
            epoch: crate::region::FIRST_EPOCH,
            this_region,
            endpoints,
            reachable: this_region,
            last_contact_ms: None,
            revision: None,
            checksum: None,
            leader: None,
            lag_revisions: None,
            lag_bytes: None,
            lag_ms: None,
            checksum_match: None,
            verified_revision: None,
            verified_ms: None,
        }
    }
}

impl Verification {
    /// No comparison was made, and why.
    pub fn failed(region: &str, error: String) -> Verification {
        Verification {
            region: region.to_string(),
            revision: None,
            matched: None,
            standby_checksum: None,
            primary_checksum: None,
            at_ms: None,
            error: Some(error),
        }
    }
}

/// One region in `GET /v1/regions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionStatus {
    pub name: String,
    /// `primary`, `standby` or `witness`.
    pub role: String,
    /// The region epoch: 1 until a region failover moves it.
    pub epoch: u64,
    /// The answering node's own region.
    pub this_region: bool,
    pub endpoints: Vec<String>,
    /// Answered within `regions.region_timeout` (always true for this region).
    pub reachable: bool,
    /// When it last answered the answering node, ms since the epoch on that node's clock.
    pub last_contact_ms: Option<u64>,
    /// Its shipped revision and checksum when it last answered.
    pub revision: Option<u64>,
    pub checksum: Option<String>,
    /// Its leader when it last answered.
    pub leader: Option<u64>,
    /// How far a standby is behind the primary, where the answering node can tell: a
    /// primary region's node for each standby; a standby's node for itself (revisions only).
    /// Measured as of the standby's last answer while it answers, as of now once it has not
    /// answered for two health-check intervals (then the lag grows). Revisions: the shipped
    /// writes committed by then that it had not applied (from a standby's node: the
    /// primary's last reported revision minus its own).
    #[serde(default)]
    pub lag_revisions: Option<u64>,
    /// The bytes of those writes (their approximate size).
    #[serde(default)]
    pub lag_bytes: Option<u64>,
    /// The age then, on the primary's clock, of the oldest of those writes (0 when caught
    /// up): no two machines' clocks compared.
    #[serde(default)]
    pub lag_ms: Option<u64>,
    /// On a standby's own entry: whether its shipped checksum equalled the primary's at
    /// `verified_revision` when last verified (`false`: its reads are suspect).
    #[serde(default)]
    pub checksum_match: Option<bool>,
    #[serde(default)]
    pub verified_revision: Option<u64>,
    /// When it was last verified, ms since the epoch on the answering node's clock.
    #[serde(default)]
    pub verified_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub region: String,
    pub node_id: u64,
    pub leader: Option<u64>,
    pub term: u64,
    /// The shipped revision: moves by one for every change of the shipped state (KV,
    /// leases, elections, services and their roles, tokens).
    pub revision: u64,
    /// XXH3-64 of the shipped state at `revision`: equal on every caught-up node, and what
    /// backups, restores and standby regions compare.
    pub checksum: String,
    /// The region-local revision: moves by one for every change of the state only this
    /// region keeps (events, quota standings, instance verdicts).
    #[serde(default)]
    pub local_revision: u64,
    /// XXH3-64 of the region-local state at `local_revision`.
    #[serde(default)]
    pub local_checksum: String,
    pub commit_index: u64,
    pub applied_index: u64,
    /// Last log index covered by this node's latest snapshot (0: none yet).
    #[serde(default)]
    pub snapshot_index: u64,
    /// Log entries up to this index are compacted away on this node: a member further
    /// behind catches up from a snapshot, not from the log.
    #[serde(default)]
    pub purged_index: u64,
    /// The first log entry this node still holds (0: none). Below `purged_index + 1` while
    /// compaction keeps entries a log reader (the backup archiver) has not read yet.
    #[serde(default)]
    pub first_log_index: u64,
    /// Readers of the log besides Raft (`archiver`) and the next index each needs:
    /// compaction keeps those entries, within `max-retained-log-bytes`.
    #[serde(default)]
    pub log_readers: std::collections::BTreeMap<String, u64>,
    pub members: Vec<Member>,
    /// How this node guards its API: `tls` (TLS and tokens), `loopback` (plaintext, bound
    /// to loopback only) or `insecure` (plaintext on a reachable address, by `--insecure`).
    #[serde(default)]
    pub security: String,
    /// The answering node is a witness (`rampart node --witness`): it keeps no data.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub witness: bool,
    /// The region epoch the answering node knows (1 until a region failover moves it).
    #[serde(default = "first_epoch")]
    pub epoch: u64,
    /// The primary region at that epoch, as the answering node knows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_region: Option<String>,
}

fn first_epoch() -> u64 {
    crate::region::FIRST_EPOCH
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddMemberRequest {
    pub id: u64,
    pub addr: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembersResponse {
    pub members: Vec<Member>,
}

/// One change seen by a watch, sent as one server-sent event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEvent {
    pub revision: u64,
    /// `put` or `delete`.
    pub kind: String,
    pub key: String,
    /// Shared with the state and the watch history: never a copy per event or watcher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<std::sync::Arc<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenCreateRequest {
    pub name: String,
    pub role: Role,
    /// Restrict the token to keys under these prefixes (empty: every key).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
}

/// A token as listed: never its secret, nor the hash of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefixes: Vec<String>,
    pub created_ms: u64,
}

/// The answer to a token creation: the only time the secret is shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    #[serde(flatten)]
    pub info: TokenInfo,
    /// `NAME.SECRET`, to pass as `Authorization: Bearer ...`; shown once, stored hashed.
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokensResponse {
    pub tokens: Vec<TokenInfo>,
}

/// One entry of the region's event log (`GET /v1/events`), committed so every node shows
/// the same history. Audit events (`kind = "audit"`) record who changed what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increases by one per event in the region.
    pub id: u64,
    /// Leader's wall clock when the event was committed, ms since the epoch.
    pub at_ms: u64,
    /// `audit`, and later `failover`, `health`, `backup`, ...
    pub kind: String,
    /// What happened, e.g. `token.create`, `member.add`.
    pub action: String,
    /// The token name that asked (`-` when the node runs without tokens).
    pub actor: String,
    /// The client address the request came from.
    pub source: String,
    /// `ok`, or `failed: <reason>`.
    pub outcome: String,
    /// The action's arguments, never a secret.
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsResponse {
    pub events: Vec<Event>,
}

/// A service as `GET /v1/services/{name}` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    pub name: String,
    pub primary: Option<String>,
    /// Fencing token of the current primary's term (0 before the first promotion).
    pub token: u64,
    /// The region epoch the role and token were read at: compare tokens as (epoch, token).
    #[serde(default = "first_epoch")]
    pub epoch: u64,
    pub instances: Vec<InstanceView>,
    /// Instances that should get traffic now: every healthy one (active-active), or the
    /// primary and the healthy replicas (active-passive; the primary first).
    pub serving: Vec<String>,
    pub policy: crate::service::Policy,
    /// What its instances are: `"generic"` or `{"postgres": {...}}` (the settings, never a
    /// password: only where each node reads it).
    #[serde(default)]
    pub kind: crate::service::Kind,
    /// A `postgres` service in synchronous mode: the replica its primary waits for, the
    /// only one that may be promoted (none: commits wait, or go on alone with
    /// `synchronous_fallback = "async"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synchronous_standby: Option<String>,
    /// This node's registry change index when the view was read: pass it back as
    /// `?index=` to wait until the view changes (a blocking read, as Consul's). Local to
    /// the node that answered; another node's index is unrelated (a mismatch answers at once).
    #[serde(default)]
    pub index: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    pub id: String,
    pub endpoint: String,
    pub region: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub priority: u32,
    pub role: crate::service::InstanceRole,
    /// Liveness verdict: a primary that is down is failed over.
    pub health: crate::health::Health,
    /// Readiness verdict: an instance that is not ready leaves the serving set.
    pub ready: crate::health::Health,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<u64>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: std::collections::BTreeMap<String, String>,
    /// On the leader: each node's latest view of this instance (the inputs of `health`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub reports: std::collections::BTreeMap<u64, crate::health::Health>,
    /// Registered as the synchronous standby of a `synchronous = true` policy.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub synchronous: bool,
    /// On the leader: how far behind it last was, as eligibility counts it (revisions its
    /// heartbeats reported; bytes of WAL for a `postgres` instance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSummary {
    pub name: String,
    pub primary: Option<String>,
    pub instances: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicesResponse {
    pub services: Vec<ServiceSummary>,
}

/// The answer to a registration: whether it created the service or instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    pub created: bool,
}

/// `GET /v1/services/{name}/eligibility`: for every instance, whether it could be promoted
/// now (its rank) and, if not, every reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EligibilityResponse {
    pub service: String,
    pub primary: Option<String>,
    pub instances: Vec<crate::failover::Eligibility>,
}

/// One node's current view of one instance (worst of its checks), sent to the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    pub service: String,
    pub instance: String,
    /// Worst of the liveness checks (`purpose` liveness or both).
    pub health: crate::health::Health,
    /// Worst of the readiness checks (`purpose` readiness or both).
    pub ready: crate::health::Health,
}

/// `POST /v1/observations` (node to leader): a batch of one node's observations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObservationsRequest {
    pub node: u64,
    pub observations: Vec<Observation>,
    /// Instances this node's supervisor has just restarted, or given up on.
    #[serde(default)]
    pub restarts: Vec<RestartReport>,
    /// How far the WAL of each `postgres` instance this node runs goes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub positions: Vec<WalPosition>,
}

/// A `postgres` instance's WAL position as its node last read it: a primary's current
/// one, a replica's received one. The leader ranks replicas by it (the most WAL first) and
/// counts each one's lag in bytes against the newest position of the service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WalPosition {
    pub service: String,
    pub instance: String,
    pub lsn: crate::postgres::Lsn,
    /// A replica streams from its primary (a primary: true). Only a streaming replica is
    /// named synchronous standby.
    #[serde(default)]
    pub streaming: bool,
}

/// A supervised instance exited and its node restarted it (`gave_up`: the restart budget
/// is spent and it stays down). A primary being restarted keeps its role for the
/// policy's `recovery.start_timeout`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestartReport {
    pub service: String,
    pub instance: String,
    pub gave_up: bool,
}

/// `POST /v1/services/{name}/instances/{id}/heartbeat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeartbeatRequest {
    /// Revisions this instance is behind its primary (replicas); used for promotion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
}

/// What a heartbeat answers: the instance's role and its service's primary and token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatResponse {
    pub role: crate::service::InstanceRole,
    pub primary: Option<String>,
    pub token: u64,
}

/// A hook run, reported by the node that ran it to the leader
/// (`POST /v1/services/{name}/instances/{id}/hooks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookReport {
    pub node: u64,
    /// `on_promote`, `on_demote` or `on_role_change`.
    pub hook: String,
    /// The fencing token the hook ran for.
    pub token: u64,
    /// `ok`, or `failed: <reason>`.
    pub outcome: String,
    pub exit_code: Option<i32>,
    pub duration_ms: u64,
    /// Captured stdout and stderr, bounded.
    pub output: String,
}

/// `POST /v1/services/{name}/switchover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchoverRequest {
    pub to: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchoverResponse {
    pub primary: String,
    pub token: u64,
    /// The primary before, if any.
    pub previous: Option<String>,
    pub duration_ms: u64,
}
