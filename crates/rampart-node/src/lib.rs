//! `rampart-node` is the daemon behind `rampart node`: a region member's Raft engine
//! (openraft over the redb store), the peer transport, the HTTP API with leader forwarding,
//! the service registry, the event log, backups, metrics, and the loops in `controllers`
//! (elections, lease expiry, probes and verdicts, failover and switchover, role hooks and
//! self-fencing, supervision, backup schedules). Decisions live in `rampart-core`; this
//! crate gathers their inputs and carries out their verdicts. `lib.rs` only wires a node
//! together (`run`); `node.rs` is what every part sees of it.

mod alerts;
mod api;
mod auth;
pub mod certs;
mod controllers;
mod error;
mod events;
mod forward;
mod http_probe;
mod metrics;
mod node;
mod peer;
mod pg;
pub mod pg_backup;
mod pipe;
mod proposer;
mod quotas;
pub mod sample;
mod secret;
mod server;
mod services;
mod soft;
mod start;
pub mod tls;
mod tokens;
pub mod vault;
mod watch;
mod witness;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{BasicNode, SnapshotPolicy};
use proposer::Proposer;
use rampart_core::config::NodeConfig;
use rampart_core::lease::LeaseClock;
use rampart_store::{NodeId, Raft};

pub use controllers::backups::check_schedules as check_backup_schedules;
pub use error::ApiError;
use metrics::Metrics;
pub use start::NodeError;
use start::{bind, log_security, owner_only_data_dir, region_client, shutdown_signal};

fn raft_config(config: &NodeConfig) -> Result<openraft::Config, NodeError> {
    let heartbeat_ms = config.heartbeat_interval.as_millis() as u64;
    // Elections are started by our pre-vote controller (elector.rs), not openraft's own
    // timer. Openraft's `election_timeout_max` remains its leader lease: a voter refuses a
    // real vote within it of hearing a leader. Pre-vote already keeps disruptive candidates
    // away, so this lease only needs to end before any candidate that passed pre-vote asks.
    // The crash fast path campaigns after two silent heartbeats, so the lease must end
    // before that: one and a half heartbeats.
    let lease_ms = heartbeat_ms + heartbeat_ms / 2;
    let raft = openraft::Config {
        cluster_name: config.region.clone(),
        heartbeat_interval: heartbeat_ms,
        election_timeout_min: heartbeat_ms + 1,
        election_timeout_max: lease_ms,
        max_payload_entries: 1000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_logs),
        max_in_snapshot_log_to_keep: config.snapshot_logs.min(1000),
        ..Default::default()
    };
    raft.validate().map_err(|e| NodeError::RaftConfig(e.to_string()))
}

/// Runs a node (or, with `--witness`, a witness) until Ctrl-C or SIGTERM.
pub async fn run(config: NodeConfig) -> Result<(), NodeError> {
    if config.witness {
        return witness::run(config).await;
    }
    // A missing or unusable backup key stops the node before it touches anything, not at
    // its first backup.
    let backups = config.backup.as_ref().map(vault::Backups::open).transpose()?;
    if let Some(backups) = &backups {
        backups.vault.refuse_restored_from_here(&config.data_dir)?;
    }
    let data_dir = config.data_dir.clone();
    owner_only_data_dir(&data_dir)?;
    let metrics = Arc::new(Metrics::new());
    let fsync_metrics = metrics.clone();
    let store_path = data_dir.join("rampart.redb");
    let (log, sm) = rampart_store::open(
        &store_path,
        config.watch_history,
        Some(Arc::new(move |d: Duration| {
            fsync_metrics.fsync_seconds.observe(d.as_secs_f64())
        })),
    )
    .map_err(|e| match e {
        rampart_store::OpenError::Format { .. } => NodeError::Format {
            path: data_dir.display().to_string(),
            message: e.to_string(),
        },
        rampart_store::OpenError::Storage(e) => {
            let mut message = e.to_string();
            if message.contains("already open") {
                message.push_str(" (is another node running on this data dir?)");
            }
            NodeError::Store {
                path: store_path.display().to_string(),
                message,
            }
        }
    })?;

    log.set_max_retained_bytes(config.max_retained_log_bytes);

    let tls = config.tls.as_ref().map(tls::NodeTls::load).transpose()?;
    log_security(&config);
    let listener = bind(&config).await?;

    let links = Arc::new(peer::PeerLinks::default());
    let network = peer::PeerNetwork {
        links: links.clone(),
        peer_via: Arc::new(config.peer_via.clone()),
        tls: tls.as_ref().map(|t| t.peer_connector.clone()),
    };
    let log_reader = log.clone();
    let raft = Raft::new(config.id, Arc::new(raft_config(&config)?), network, log, sm.clone())
        .await
        .map_err(|e| NodeError::Raft(e.to_string()))?;
    raft.runtime_config().elect(false);

    if !config.initial_cluster.is_empty()
        && !raft
            .is_initialized()
            .await
            .map_err(|e| NodeError::Raft(e.to_string()))?
    {
        let members: BTreeMap<NodeId, BasicNode> = config
            .initial_cluster
            .iter()
            .map(|(id, addr)| (*id, BasicNode { addr: addr.to_string() }))
            .collect();
        // Every member bootstraps with the same membership, as etcd's --initial-cluster
        // does; identical initial logs make the order irrelevant.
        if let Err(e) = raft.initialize(members).await {
            tracing::info!("initialize skipped: {e}");
        }
    }

    let (alerts, alert_queue) = tokio::sync::mpsc::channel(alerts::QUEUE_MAX);
    let proposer = Proposer::start(
        raft.clone(),
        metrics.clone(),
        config.request_timeout,
        config.election_timeout,
    );
    let node = Arc::new(node::Node {
        id: config.id,
        applied: sm.applied(),
        sm,
        raft: raft.clone(),
        leases: Mutex::new(LeaseClock::default()),
        http: forwarding_client(&config, tls.as_ref())?,
        region_http: region_client(tls.as_ref())?,
        metrics,
        watchers: AtomicUsize::new(0),
        links,
        proposer,
        config,
        tls,
        probe_http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Like HAProxy's `check-ssl verify none`: a health check asks "does it answer",
            // not "is its certificate valid".
            .danger_accept_invalid_certs(true)
            // Checks keep their connections (instances behind one address share them):
            // a new TCP connection per probe cost 2.5x the CPU in `bench --check-cost`.
            .pool_max_idle_per_host(64)
            .build()
            .map_err(|e| NodeError::Raft(e.to_string()))?,
        soft: Mutex::new(soft::Soft::default()),
        backups,
        log: log_reader,
        switchovers: Mutex::new(std::collections::BTreeSet::new()),
        regions: Mutex::new(std::collections::BTreeMap::new()),
        verified: Mutex::new(None),
        region_lease: Mutex::new(soft::RegionLease::default()),
        clock: std::time::Instant::now(),
        alerts,
        auth_failures: Mutex::new(rampart_core::auth::FailureLimiter::new(
            auth::FAILURES_BURST,
            auth::FAILURES_DRAIN_MS,
            auth::FAILURE_SOURCES_MAX,
        )),
    });
    // Asserts the self-fence comes before the hold ends (safety rule 4) before anything runs.
    let hold = node.hold();
    tracing::info!(
        id = node.id,
        listen = %node.config.listen,
        region = %node.config.region,
        hold_ms = hold.hold.as_millis() as u64,
        self_fence_after_ms = hold.self_fence_after.as_millis() as u64,
        "node started"
    );
    if let Some(note) = controllers::regions::failover_note(&node.config.regions) {
        tracing::warn!("{note}");
    }

    let mut tasks = controllers::spawn(&node, alert_queue);
    tasks.push(tokio::spawn(server::serve(listener, node.clone())));
    shutdown_signal().await;
    tracing::info!("shutting down");
    for task in tasks {
        task.abort();
    }
    let _ = raft.shutdown().await;
    Ok(())
}

/// The client a follower forwards API calls to the leader with: HTTPS with this node's
/// certificate on a TLS node, so the leader trusts the client address it passes along.
fn forwarding_client(config: &NodeConfig, tls: Option<&tls::NodeTls>) -> Result<reqwest::Client, NodeError> {
    let builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(500))
        .timeout(config.request_timeout + Duration::from_secs(1))
        .tcp_nodelay(true);
    let builder = match tls {
        Some(tls) => builder.use_preconfigured_tls(tls.forward_config.clone()),
        None => builder,
    };
    builder.build().map_err(|e| NodeError::Raft(e.to_string()))
}
