//! `rampart-testkit` runs real Rampart regions for tests, benchmarks and `rampart demo`:
//! N `rampart node` processes on ephemeral loopback ports, faults (SIGKILL, SIGSTOP/SIGCONT,
//! restart on the same data dir, partitions through a fault-injecting TCP relay), several
//! regions with a relay on each link between them (`regions`), operation histories with
//! checkers for the safety rules, a scripted HTTP backend, and a real PostgreSQL server
//! (`postgres`).

pub mod bench;
pub mod cluster;
pub mod drill;
pub mod history;
pub mod http_backend;
pub mod postgres;
pub mod regions;
pub mod relay;
pub mod sample_fleet;
pub mod workload;

pub use cluster::{free_port, Cluster, ClusterOptions, Outsider};
pub use history::{epochs_overlap, EpochAck, History, OpOutcome};
pub use http_backend::{Answer, HttpBackend};
pub use regions::{RegionSpec, Regions, RegionsOptions};
pub use relay::{Relay, RelayMode};
pub use workload::{final_state, Workload};

use std::time::Duration;

/// Polls `check` until it returns `Some`, or fails with `what` after `timeout`. Tests wait
/// for conditions this way, never by sleeping a fixed time.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {}ms waiting for {what}", timeout.as_millis());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
