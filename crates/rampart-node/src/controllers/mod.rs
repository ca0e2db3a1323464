//! The node's loops, one module each, and what they decide with (`rampart-core`) and act on.
//! Every node runs `elector` (pre-vote elections), `raft_metrics` (the engine's gauges),
//! `regions` (asks the other regions how they are), `region_lease` (the primary's leader renews the region lease, and every node of the primary region asks it how long the lease has left; every leader grants it), `link` (a standby's leader follows the
//! primary region's shipped writes), `takeover` (a standby's leader takes over a lost primary region), `prober` (probes the instances of every
//! service and reports its views), `hooks` (the role hooks of the instances it hosts, and
//! self-fencing when cut off) `supervisor` (restarts the instances it hosts) and `postgres` (runs the PostgreSQL instances it hosts). The leader
//! alone runs `rules` (adopts this build's apply rules in a region migrated from data dir
//! format 1), `leases` (lease expiry), `verdicts` (committed health verdicts from every
//! node's views and heartbeats), `primaries` (automatic failover), `switchover` (planned
//! switchover and hook reports), `backups` (schedules, retention, the
//! log archiver), the alert webhooks, the bootstrap token and the registry's configured services.
//!
//! Order of imports: a controller may use another listed before it here, never one after.

pub mod backups;
pub mod elector;
pub mod hooks;
pub mod leases;
pub mod link;
pub mod postgres;
pub mod primaries;
pub mod prober;
pub mod raft_metrics;
pub mod region_failover;
pub mod region_lease;
pub mod regions;
pub mod rules;
pub mod supervisor;
pub mod switchover;
pub mod takeover;
pub mod verdicts;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::node::Shared;

/// Starts every loop of the node; they run until aborted.
pub fn spawn(node: &Shared, alert_queue: mpsc::Receiver<rampart_core::api::Event>) -> Vec<JoinHandle<()>> {
    vec![
        tokio::spawn(leases::run_expiry(node.clone())),
        tokio::spawn(elector::run(node.clone())),
        tokio::spawn(raft_metrics::run(node.clone())),
        tokio::spawn(rules::run(node.clone())),
        tokio::spawn(regions::run(node.clone())),
        tokio::spawn(region_lease::run(node.clone())),
        tokio::spawn(region_lease::run_end(node.clone())),
        tokio::spawn(link::run(node.clone())),
        tokio::spawn(link::run_acks(node.clone())),
        tokio::spawn(takeover::run(node.clone())),
        tokio::spawn(regions::run_verify(node.clone())),
        tokio::spawn(crate::tokens::run_bootstrap(node.clone())),
        tokio::spawn(prober::run(node.clone())),
        tokio::spawn(verdicts::run(node.clone())),
        tokio::spawn(hooks::run(node.clone())),
        tokio::spawn(primaries::run(node.clone())),
        tokio::spawn(crate::alerts::run(node.clone(), alert_queue)),
        tokio::spawn(supervisor::run(node.clone())),
        tokio::spawn(postgres::run(node.clone())),
        tokio::spawn(postgres::run_synchronous(node.clone())),
        tokio::spawn(postgres::run_archive(node.clone())),
        tokio::spawn(crate::services::register_configured(node.clone())),
        tokio::spawn(backups::run(node.clone())),
        tokio::spawn(backups::archive(node.clone())),
    ]
}
