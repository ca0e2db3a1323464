//! Integration tests: every test runs real `rampart` processes on loopback through
//! `rampart-testkit` and asserts outcomes a user cares about. One test binary, so the
//! suite links once.

mod backup;
mod cli;
mod drills;
mod elections;
mod failover;
mod input;
mod layout;
mod leases;
mod membership;
mod openapi;
mod partition;
mod postgres;
mod proxy;
mod proxy_registry;
mod region_failover;
mod region_lease;
mod regions;
mod security;
mod services;
mod snapshot;
mod upgrade;
mod watch;

use std::time::Duration;

use rampart_testkit::{Cluster, ClusterOptions};

/// Generous: the suite runs on a loaded 2-core machine; tests poll, they never sleep.
pub const DEADLINE: Duration = Duration::from_secs(60);

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_rampart")
}

pub async fn cluster(nodes: usize) -> Cluster {
    Cluster::start(
        binary(),
        ClusterOptions {
            nodes,
            ..ClusterOptions::default()
        },
    )
    .await
    .expect("start cluster")
}

pub async fn cluster_with_relays(nodes: usize) -> Cluster {
    Cluster::start(
        binary(),
        ClusterOptions {
            nodes,
            relays: true,
            ..ClusterOptions::default()
        },
    )
    .await
    .expect("start cluster")
}
