//! Prometheus metrics (`/metrics`), all named `rampart_*`.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Why an API call or connection was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `missing_token`, `invalid_token`, `forbidden`, `rate_limited`, `tls_handshake`,
    /// `peer_without_node_certificate`, `connection_limit`.
    pub reason: String,
}

/// One service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

/// One instance of one service.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    pub service: String,
    pub instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RegionLabels {
    pub region: String,
}

/// Backups and their verification (`[backup]`).
#[derive(Default)]
pub struct BackupMetrics {
    pub last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub duration: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub size: Gauge,
    pub failures: Counter,
    pub verify_last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub verify_failures: Counter,
    pub stale: Gauge,
    pub archived_index: Gauge,
}

impl BackupMetrics {
    fn register(&self, registry: &mut Registry) {
        let registry = registry.sub_registry_with_prefix("backup");
        registry.register(
            "last_success_timestamp_seconds",
            "When this node last finished a backup (Unix time)",
            self.last_success.clone(),
        );
        registry.register(
            "last_duration_seconds",
            "How long the last backup took",
            self.duration.clone(),
        );
        registry.register("last_size_bytes", "Bytes stored by the last backup", self.size.clone());
        registry.register("failures", "Backups that failed", self.failures.clone());
        registry.register(
            "verify_last_success_timestamp_seconds",
            "When a verification last restored a backup and found its checksum (Unix time)",
            self.verify_last_success.clone(),
        );
        registry.register(
            "verify_failures",
            "Verifications that failed",
            self.verify_failures.clone(),
        );
        registry.register(
            "archived_log_index",
            "The last log index archived for point-in-time restores",
            self.archived_index.clone(),
        );
        registry.register(
            "stale",
            "1 when no backup succeeded within twice the schedule's period",
            self.stale.clone(),
        );
    }
}

pub struct Metrics {
    registry: Registry,
    pub backup: BackupMetrics,
    /// Committed verdict per instance: 1 up, 0 down, -1 unknown.
    pub instance_health: Family<InstanceLabels, Gauge>,
    /// 1 for the instance that is its service's primary, else 0.
    pub instance_primary: Family<InstanceLabels, Gauge>,
    /// Promotions per service, from the replicated state (so every node shows the same).
    pub primary_changes: Family<ServiceLabels, Gauge>,
    /// Per other region, as this node last saw it (set when scraped).
    pub region_reachable: Family<RegionLabels, Gauge>,
    pub region_lag_revisions: Family<RegionLabels, Gauge>,
    pub region_lag_seconds: Family<RegionLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// 1 while the primary's leader acknowledges no write because of `max_rpo_lag`.
    pub region_rpo_bound_stopped: Gauge,
    /// A standby's verifications that found its shipped checksum differing from the primary's.
    pub region_checksum_mismatches: Family<RegionLabels, Counter>,
    /// Leader-observed: from a primary's down verdict to its replacement's promotion.
    pub failover_seconds: Histogram,
    pub alerts_sent: Counter,
    pub alerts_failed: Counter,
    pub alerts_dropped: Counter,
    pub auth_failures: Family<RefusalLabels, Counter>,
    pub term: Gauge,
    pub is_leader: Gauge,
    pub leader_changes: Counter,
    pub commit_index: Gauge,
    pub apply_index: Gauge,
    pub revision: Gauge,
    pub snapshot_index: Gauge,
    pub purged_index: Gauge,
    pub watchers: Gauge,
    pub proposal_seconds: Histogram,
    pub fsync_seconds: Histogram,
    pub batch_commands: Histogram,
    pub forwarded_requests: Counter,
    pub pre_votes_won: Counter,
    pub pre_votes_lost: Counter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("rampart");
        let term = Gauge::default();
        let is_leader = Gauge::default();
        let leader_changes = Counter::default();
        let commit_index = Gauge::default();
        let apply_index = Gauge::default();
        let revision = Gauge::default();
        let snapshot_index = Gauge::default();
        let purged_index = Gauge::default();
        let watchers = Gauge::default();
        // 100 µs to ~6.5 s.
        let proposal_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 17));
        let fsync_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 17));
        // 1 to 1024 writes per Raft entry.
        let batch_commands = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        let forwarded_requests = Counter::default();
        let pre_votes_won = Counter::default();
        let pre_votes_lost = Counter::default();
        let auth_failures = Family::<RefusalLabels, Counter>::default();
        let instance_health = Family::<InstanceLabels, Gauge>::default();
        let instance_primary = Family::<InstanceLabels, Gauge>::default();
        let primary_changes = Family::<ServiceLabels, Gauge>::default();
        let region_reachable = Family::<RegionLabels, Gauge>::default();
        let region_lag_revisions = Family::<RegionLabels, Gauge>::default();
        let region_lag_seconds = Family::<RegionLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let region_checksum_mismatches = Family::<RegionLabels, Counter>::default();
        let region_rpo_bound_stopped = Gauge::default();
        registry.register(
            "region_rpo_bound_stopped",
            "1 while this primary's leader acknowledges no write: every standby is further behind than regions.max_rpo_lag",
            region_rpo_bound_stopped.clone(),
        );
        registry.register(
            "region_checksum_mismatches",
            "Verifications in which this standby's shipped checksum differed from the primary region's at the same revision",
            region_checksum_mismatches.clone(),
        );
        registry.register(
            "region_reachable",
            "1 if the region answered this node within regions.region_timeout",
            region_reachable.clone(),
        );
        registry.register(
            "region_lag_revisions",
            "Shipped revisions a standby region is behind the primary (seen from a primary region's node: each standby; from a standby's: itself)",
            region_lag_revisions.clone(),
        );
        registry.register(
            "region_lag_seconds",
            "Age on the primary's clock of the oldest shipped write a standby has not applied (seen from a primary region's node)",
            region_lag_seconds.clone(),
        );
        // 100 ms to ~100 s.
        let failover_seconds = Histogram::new(exponential_buckets(0.1, 2.0, 11));
        registry.register(
            "service_primary_changes",
            "Promotions of each service's primary so far, planned and automatic (a counter kept in the replicated state)",
            primary_changes.clone(),
        );
        let alerts_sent = Counter::default();
        let alerts_failed = Counter::default();
        let alerts_dropped = Counter::default();
        registry.register("alerts_sent", "Alerts a webhook accepted", alerts_sent.clone());
        registry.register(
            "alerts_failed",
            "Alerts given up after every retry",
            alerts_failed.clone(),
        );
        registry.register(
            "alerts_dropped",
            "Alerts dropped because the queue was full",
            alerts_dropped.clone(),
        );
        registry.register(
            "service_failover_duration_seconds",
            "From a primary's down verdict to its replacement's promotion, as the leader saw it",
            failover_seconds.clone(),
        );
        registry.register(
            "service_instance_health",
            "The region's committed verdict per instance: 1 up, 0 down, -1 unknown",
            instance_health.clone(),
        );
        registry.register(
            "service_instance_primary",
            "1 for the instance that is its service's primary",
            instance_primary.clone(),
        );
        registry.register(
            "auth_failures",
            "API calls and connections refused, by reason: a missing or invalid token, a weak role, a bad certificate, the connection limit",
            auth_failures.clone(),
        );
        registry.register(
            "pre_votes_won",
            "Pre-votes this node won, each followed by a campaign",
            pre_votes_won.clone(),
        );
        registry.register(
            "pre_votes_lost",
            "Pre-votes this node lost: it stayed a follower",
            pre_votes_lost.clone(),
        );
        registry.register("raft_term", "Current Raft term", term.clone());
        registry.register("is_leader", "1 if this node is the region's leader", is_leader.clone());
        registry.register(
            "leader_changes",
            "Leader changes seen by this node",
            leader_changes.clone(),
        );
        registry.register(
            "commit_index",
            "Highest log index known committed",
            commit_index.clone(),
        );
        registry.register(
            "apply_index",
            "Highest log index applied to the state machine",
            apply_index.clone(),
        );
        registry.register("revision", "Store revision of the applied state", revision.clone());
        registry.register(
            "snapshot_index",
            "Last log index covered by this node's latest snapshot",
            snapshot_index.clone(),
        );
        registry.register(
            "log_purged_index",
            "Log entries up to this index are compacted away (covered by a snapshot)",
            purged_index.clone(),
        );
        registry.register("watchers", "Open watch streams on this node", watchers.clone());
        registry.register(
            "proposal_duration_seconds",
            "Time from proposing a write to its apply on the leader",
            proposal_seconds.clone(),
        );
        registry.register(
            "fsync_duration_seconds",
            "Duration of each durable log commit",
            fsync_seconds.clone(),
        );
        registry.register(
            "proposal_batch_commands",
            "Client writes per proposed Raft entry (group commit)",
            batch_commands.clone(),
        );
        registry.register(
            "forwarded_requests",
            "Requests this node forwarded to the leader",
            forwarded_requests.clone(),
        );
        let backup = BackupMetrics::default();
        backup.register(&mut registry);
        Metrics {
            registry,
            backup,
            instance_health,
            instance_primary,
            primary_changes,
            region_reachable,
            region_lag_revisions,
            region_lag_seconds,
            region_rpo_bound_stopped,
            region_checksum_mismatches,
            failover_seconds,
            alerts_sent,
            alerts_failed,
            alerts_dropped,
            auth_failures,
            term,
            is_leader,
            leader_changes,
            commit_index,
            apply_index,
            revision,
            snapshot_index,
            purged_index,
            watchers,
            proposal_seconds,
            fsync_seconds,
            batch_commands,
            forwarded_requests,
            pre_votes_won,
            pre_votes_lost,
        }
    }

    /// Sets the per-instance gauges from the applied registry (at scrape time), dropping
    /// instances that left it.
    pub fn set_instances(&self, state: &rampart_store::State) {
        self.instance_health.clear();
        self.instance_primary.clear();
        self.primary_changes.clear();
        for (name, service) in &state.shipped.services {
            self.primary_changes
                .get_or_create(&ServiceLabels { service: name.clone() })
                .set(service.promotions as i64);
            for id in service.instances.keys() {
                let labels = InstanceLabels {
                    service: name.clone(),
                    instance: id.clone(),
                };
                let health = match state.local.verdict(name, id).health {
                    rampart_core::health::Health::Up => 1,
                    rampart_core::health::Health::Down => 0,
                    rampart_core::health::Health::Unknown => -1,
                };
                self.instance_health.get_or_create(&labels).set(health);
                let primary = service.primary.as_deref() == Some(id.as_str());
                self.instance_primary.get_or_create(&labels).set(i64::from(primary));
            }
        }
    }

    /// Sets the region gauges from the region view (at scrape time).
    pub fn set_regions(&self, view: &rampart_core::api::RegionsResponse) {
        self.region_reachable.clear();
        self.region_lag_revisions.clear();
        self.region_lag_seconds.clear();
        self.region_rpo_bound_stopped.set(i64::from(view.rpo_bound.is_some()));
        for region in &view.regions {
            let labels = RegionLabels {
                region: region.name.clone(),
            };
            if !region.this_region {
                self.region_reachable
                    .get_or_create(&labels)
                    .set(i64::from(region.reachable));
            }
            if let Some(lag) = region.lag_revisions {
                self.region_lag_revisions.get_or_create(&labels).set(lag as i64);
            }
            if let Some(ms) = region.lag_ms {
                self.region_lag_seconds.get_or_create(&labels).set(ms as f64 / 1000.0);
            }
        }
    }

    pub fn refused(&self, reason: &str) {
        self.auth_failures
            .get_or_create(&RefusalLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// [`Metrics::render`] with only the series of `families` (names after `rampart_`, as
    /// prefixes), with their help and type lines.
    pub fn render_only(&self, families: &[&str]) -> String {
        let wanted = |line: &str| {
            let name = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
                .or_else(|| line.strip_prefix("# UNIT "))
                .unwrap_or(line);
            line == "# EOF"
                || name
                    .strip_prefix("rampart_")
                    .is_some_and(|rest| families.iter().any(|f| rest.starts_with(f)))
        };
        let mut out = String::new();
        for line in self.render().lines().filter(|l| wanted(l)) {
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}

/// The series of `GET /metrics/ha`: the region's leader and term, commits, and each
/// service's primaries, health and failovers (the names HA dashboards look for).
pub const HA_FAMILIES: &[&str] = &[
    "raft_term",
    "is_leader",
    "leader_changes",
    "commit_index",
    "apply_index",
    "revision",
    "pre_votes",
    "service_",
];

/// The series of `GET /metrics/regions`.
pub const REGION_FAMILIES: &[&str] = &["region_"];

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
