//! One node as its request handlers and controllers see it (`Shared`): its Raft engine and
//! applied state, its settings, clients and soft state, and the few things every part asks of
//! it: propose a command, wait for a linearizable read, name the leader, reach a peer.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::error::RaftError;
use openraft::ServerState;
use rampart_core::config::NodeConfig;
use rampart_core::election::leader_counts_itself;
use rampart_core::failover::Hold;
use rampart_core::lease::LeaseClock;
use rampart_store::{Applied, Command, NodeId, Op, Outcome, Raft, StateMachineStore};

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::peer::PeerLinks;
use crate::proposer::Proposer;
use crate::soft::Soft;
use crate::tls::NodeTls;
use crate::vault::Backups;

/// Everything a request handler or controller of one node needs.
pub struct Node {
    pub id: NodeId,
    pub config: NodeConfig,
    pub raft: Raft,
    pub sm: StateMachineStore,
    pub applied: Arc<RwLock<Applied>>,
    pub leases: Mutex<LeaseClock>,
    pub http: reqwest::Client,
    /// For region links and region health checks: on TLS, this node's certificate and the
    /// region ALPN (`tls::REGION_ALPN`).
    pub region_http: reqwest::Client,
    pub metrics: Arc<Metrics>,
    pub watchers: AtomicUsize,
    pub links: Arc<PeerLinks>,
    pub proposer: Proposer,
    /// `Some` when the node runs with TLS (and tokens).
    pub tls: Option<NodeTls>,
    pub auth_failures: Mutex<rampart_core::auth::FailureLimiter>,
    /// Runs this node's health probes of instances (HTTP checks).
    pub probe_http: reqwest::Client,
    /// Services with a switchover running on this (leader) node: the failover controller
    /// leaves them alone while the role is between holders.
    pub switchovers: Mutex<std::collections::BTreeSet<String>>,
    /// Alerts waiting for the webhook sender (bounded).
    pub alerts: tokio::sync::mpsc::Sender<rampart_core::api::Event>,
    /// Leader-only soft state: node views, heartbeats and lags of instances.
    pub soft: Mutex<Soft>,
    /// `Some` with a `[backup]` section: its destination and key.
    pub backups: Option<Backups>,
    /// Reads committed log entries for the log archive.
    pub log: rampart_store::LogStore,
    /// What this node last heard from each other region, by name.
    pub regions: Mutex<std::collections::BTreeMap<String, crate::soft::RegionSeen>>,
    /// A standby's last checksum comparison with the primary region.
    pub verified: Mutex<Option<crate::soft::Verified>>,
    /// The region lease as this node holds or grants it.
    pub region_lease: Mutex<crate::soft::RegionLease>,
    /// Where this node's monotonic ms (`mono_ms`) count from: the region lease's clock.
    pub clock: std::time::Instant,
}

pub type Shared = Arc<Node>;

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Node {
    /// The service registry's local change counter: work derived from the registry is
    /// rebuilt only when it moves (`Applied::services_version`).
    pub fn services_version(&self) -> u64 {
        self.applied.read().expect("state lock").services_version
    }

    /// The leader this node currently knows, if any. A leader that has not heard from a
    /// majority for longer than the election timeout does not count itself: it is likely
    /// cut off, and answering `no_leader` at once beats letting the client time out.
    pub fn known_leader(&self) -> Option<NodeId> {
        let receiver = self.raft.metrics();
        let metrics = receiver.borrow();
        let leader = metrics.current_leader?;
        if leader == self.id && metrics.state == ServerState::Leader {
            let quorum_ack_age = metrics.millis_since_quorum_ack.map(Duration::from_millis);
            let voters = metrics.membership_config.membership().voter_ids().count();
            if !leader_counts_itself(quorum_ack_age, voters, self.config.election_timeout) {
                return None;
            }
        }
        Some(leader)
    }

    /// The primaries' hold and when a cut-off node fences (safety rule 4).
    pub fn hold(&self) -> Hold {
        Hold::new(self.config.election_timeout, self.config.heartbeat_interval)
    }

    /// How long ago this node was last surely in touch with the region's majority.
    pub async fn majority_contact_age(&self) -> Duration {
        let metrics = self.raft.metrics().borrow().clone();
        if metrics.state == ServerState::Leader {
            if metrics.membership_config.membership().voter_ids().count() <= 1 {
                return Duration::ZERO;
            }
            return metrics
                .millis_since_quorum_ack
                .map_or(Duration::MAX, Duration::from_millis);
        }
        // A follower's vote is refreshed by every append and heartbeat of its leader.
        self.raft
            .with_raft_state(|s| s.vote_last_modified().map(|i| i.into_std()))
            .await
            .ok()
            .flatten()
            .map_or(Duration::MAX, |at| at.elapsed())
    }

    /// How this node reaches peer `id`: its `--peer-via` override, else the member address.
    pub fn address_of(&self, id: NodeId) -> Option<String> {
        if let Some(via) = self.config.peer_via.get(&id) {
            return Some(via.to_string());
        }
        let metrics = self.raft.metrics().borrow().clone();
        metrics
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())
    }

    /// Whether this node hosts `instance`: it names this node's id, and it is registered in
    /// this region (node ids are per region: another region's node 1 is not this one).
    pub fn hosts(&self, instance: &rampart_core::service::Instance) -> bool {
        instance.node == Some(self.id) && self.config.regions.looks_after(&instance.region)
    }

    /// Whether an instance registered in `region` is a standby instance, promoted only by a
    /// region failover (`core::region::Regions::in_standby_region`).
    /// `primary` is the primary region (`primary_region`), read by the caller before it
    /// takes the applied state's lock, if it holds it.
    pub fn in_standby_region(&self, primary: &str, region: &str) -> bool {
        self.config
            .regions
            .in_standby_region(primary, &self.config.region, region)
    }

    /// This node's monotonic clock in ms: the only clock the region lease reads.
    pub fn mono_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// The primary region and the region epoch, as this region's shipped history says:
    /// the configured primary at epoch 1 until a region failover. Read-locks the applied
    /// state: never call it (or `is_standby`, `primary_region`) while holding that lock,
    /// or a waiting apply deadlocks both.
    pub fn primary_and_epoch(&self) -> (String, u64) {
        let applied = self.applied.read().expect("state lock");
        let (primary, epoch) = self.primary_and_epoch_in(&applied.state.shipped);
        (primary.to_string(), epoch)
    }

    /// The same, from a shipped state the caller holds (under the applied state's lock).
    pub fn primary_and_epoch_in<'a>(&'a self, shipped: &'a rampart_store::Shipped) -> (&'a str, u64) {
        let primary = shipped.primary_region().unwrap_or(&self.config.regions.primary);
        (primary, shipped.epoch())
    }

    /// The primary region, as this region's shipped history says.
    pub fn primary_region(&self) -> String {
        self.primary_and_epoch().0
    }

    /// Whether this region is a standby: its shipped state changes only by the primary
    /// region's writes (`Op::Replicate`), never by its own.
    pub fn is_standby(&self) -> bool {
        self.primary_region() != self.config.region
    }

    /// 503 `read_only_region`, naming the primary region and its endpoints.
    pub fn read_only(&self) -> ApiError {
        let regions = &self.config.regions;
        let (primary, epoch) = self.primary_and_epoch();
        let endpoints: Vec<String> = regions
            .known
            .get(&primary)
            .map(|r| r.endpoints.iter().map(|a| a.to_string()).collect())
            .unwrap_or_default();
        ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "read_only_region",
            format!(
                "region {} is a standby and takes no writes: send them to the primary region {primary} ({}) at region epoch {epoch}",
                self.config.region,
                endpoints.join(",")
            ),
        )
        .with_current(serde_json::json!({ "primary_region": primary, "endpoints": endpoints, "epoch": epoch }))
    }

    /// Whether this node may acknowledge a write of the shipped state now: always in a
    /// region alone; else only the primary region's leader while it holds the region
    /// lease (safety rule 5).
    pub fn holds_region_lease(&self) -> bool {
        if self.config.regions.known.is_empty() {
            return true;
        }
        let now = self.mono_ms();
        let lease = self.region_lease.lock().expect("region lease lock");
        lease
            .holder
            .as_ref()
            .is_some_and(|(_, holder)| holder.may_acknowledge(now))
    }

    /// Whether this node, in the primary region of several, must treat its region's lease
    /// as ending: it fences the service primaries it hosts and does not serve its registry
    /// as current (`core::region::fence`). Reads the applied state: never call it while
    /// holding that lock.
    pub fn region_fenced(&self) -> bool {
        if self.config.regions.known.is_empty() {
            return false;
        }
        let (primary, epoch) = self.primary_and_epoch();
        if primary != self.config.region {
            return false;
        }
        let now = self.mono_ms();
        let mut lease = self.region_lease.lock().expect("region lease lock");
        lease
            .end_at(epoch, now, self.config.regions.region_lease_ms)
            .must_fence(now)
    }

    /// 503 `region_lease_lost` (nothing was written: safe to retry), or, once the write was
    /// applied, `outcome_unknown`: the primary region could not renew its lease from a
    /// majority of regions, so it acknowledges no write (another region may be taking over).
    pub fn lease_lost(&self, applied: bool) -> ApiError {
        let why = format!(
            "region {} does not hold the region lease (no grant from a majority of regions within regions.region_lease): it acknowledges no write until it renews, or another region takes over",
            self.config.region
        );
        not_acknowledged("region_lease_lost", why, applied)
    }

    /// With `[regions] max_rpo_lag`: 503 `rpo_bound` while every standby region is further
    /// behind than the bound (by what each last said it applied), so a forced failover never
    /// loses more than it. `applied`: the write is in, but not acknowledged.
    pub fn rpo_refusal(&self, applied: bool) -> Option<ApiError> {
        let why = format!("{}; writes resume when one catches up", self.rpo_stop()?);
        Some(not_acknowledged("rpo_bound", why, applied))
    }

    /// With `[regions] max_rpo_lag`: why writes are stopped, while every standby region is
    /// further behind than the bound.
    pub fn rpo_stop(&self) -> Option<String> {
        let bound = self.config.regions.max_rpo_lag?;
        let closest = self.rpo_standing(bound)?;
        Some(format!(
            "every standby region is further behind than regions.max_rpo_lag ({bound}): the closest lacks {closest}"
        ))
    }

    /// Why a shipped write of this region may not be acknowledged now (`applied`: it is in
    /// already), if it may not: the region lease (on the leader, which holds it), then the
    /// bounded RPO.
    fn unacknowledgeable(&self, leads: bool, applied: bool) -> Option<ApiError> {
        if leads && !self.holds_region_lease() {
            return Some(self.lease_lost(applied));
        }
        self.rpo_refusal(applied)
    }

    /// The region epoch: from the shipped history, or the first one for a region alone
    /// (it has no other to fail over to), without reading the state.
    pub fn epoch(&self) -> u64 {
        if self.config.regions.known.is_empty() {
            return rampart_core::region::FIRST_EPOCH;
        }
        self.primary_and_epoch().1
    }

    /// How far the closest standby region is behind, in words, when that is past `bound`;
    /// `None` when one is within it (or there is no standby to keep within it).
    fn rpo_standing(&self, bound: rampart_core::region::RpoBound) -> Option<String> {
        let standbys: Vec<&String> = self
            .config
            .regions
            .known
            .iter()
            .filter(|(_, r)| !r.witness)
            .map(|(name, _)| name)
            .collect();
        if standbys.is_empty() {
            return None;
        }
        let acked = self.region_lease.lock().expect("region lease lock").acked.clone();
        let now = now_ms();
        let applied = self.applied.read().expect("state lock");
        let committed = applied.state.revision();
        let mut closest: Option<(u64, u64)> = None;
        for region in standbys {
            let had = acked.get(region).copied().unwrap_or(0);
            let revisions = committed.saturating_sub(had);
            let age_ms = match applied.shipped_write(had + 1) {
                Some(oldest) => now.saturating_sub(oldest.command.at_ms),
                None if revisions == 0 => 0,
                None => u64::MAX,
            };
            if bound.holds(revisions, age_ms) {
                return None;
            }
            closest = Some(closest.map_or((revisions, age_ms), |c| c.min((revisions, age_ms))));
        }
        let (revisions, age_ms) = closest.expect("at least one standby");
        Some(if age_ms == u64::MAX {
            format!("{revisions} revisions")
        } else {
            format!("{revisions} revisions, the oldest committed {age_ms}ms ago")
        })
    }

    /// Proposes one command and waits for it to be applied, within the request timeout.
    /// Concurrent proposals share Raft entries (see `proposer.rs`). In a standby region a
    /// write of the shipped state is refused here, the one gate every handler and
    /// controller goes through: only the region link's `Op::Replicate` changes it.
    /// In the primary region, a shipped write is proposed and acknowledged only while the
    /// region lease is held: checked before, and again once applied (the lease may have
    /// run out meanwhile; the write is then not acknowledged).
    pub async fn propose(&self, op: Op) -> Result<Outcome, ApiError> {
        let own_write =
            !op.is_local() && !matches!(op, Op::Replicate { .. } | Op::Seed { .. } | Op::RegionEpoch { .. });
        // The region rules apply only among regions: a region alone is its own primary.
        let regional = own_write && !self.config.regions.known.is_empty();
        if regional && self.is_standby() {
            return Err(self.read_only());
        }
        // A follower's proposal fails as not the leader's, below: only the leader holds it.
        let leads = regional && self.raft.metrics().borrow().state == ServerState::Leader;
        if let Some(refused) = regional.then(|| self.unacknowledgeable(leads, false)).flatten() {
            return Err(refused);
        }
        let started = std::time::Instant::now();
        let command = Command { at_ms: now_ms(), op };
        let outcome = self.proposer.propose(command, self.config.request_timeout).await?;
        self.metrics.proposal_seconds.observe(started.elapsed().as_secs_f64());
        if let Some(refused) = regional.then(|| self.unacknowledgeable(leads, true)).flatten() {
            return Err(refused);
        }
        Ok(outcome)
    }

    /// Queues the region link's write of the primary's `Op::Replicate` without waiting for
    /// it: the link keeps many in flight, applied in the order submitted (a gap among them
    /// is refused by apply, so a failed one cannot be skipped over).
    pub async fn submit_replicated(
        &self,
        revision: u64,
        command: Command,
    ) -> Result<crate::proposer::Pending, ApiError> {
        let op = Op::Replicate {
            revision,
            command: Box::new(command),
        };
        self.proposer.submit(Command { at_ms: now_ms(), op }).await
    }

    /// Waits until this node may serve a linearizable read (ReadIndex: leadership confirmed
    /// by a majority, and everything committed before the read applied).
    pub async fn read_barrier(&self) -> Result<(), ApiError> {
        let timeout = self.config.request_timeout;
        match tokio::time::timeout(timeout, self.raft.ensure_linearizable()).await {
            Err(_) => Err(ApiError::timeout("the read", timeout)),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(_)))) => {
                Err(ApiError::not_leader())
            }
            Ok(Err(e)) => Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "no_quorum",
                format!("leadership could not be confirmed by a majority: {e}"),
            )),
        }
    }
}

/// 503 for a write not acknowledged for `why`: `code` when nothing was written (safe to
/// retry), `outcome_unknown` when it was applied here already.
fn not_acknowledged(code: &'static str, why: String, applied: bool) -> ApiError {
    let (code, outcome) = if applied {
        (
            "outcome_unknown",
            "the write was applied here but is not acknowledged: read the key to know whether it stays",
        )
    } else {
        (code, "nothing was written")
    };
    ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        code,
        format!("{why}; {outcome}"),
    )
}
