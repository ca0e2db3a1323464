//! `rampart demo`: a newcomer's first look. Starts a 3-node region from this same binary,
//! drives writes, SIGKILLs the leader, and reports the new leader, the measured write gap
//! and that no acknowledged write was lost; then restarts the killed node and shows it
//! caught up. Keeps the region running until Ctrl-C.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use rampart_client::{Client, PutOptions};
use rampart_testkit::{Cluster, ClusterOptions, History, OpOutcome};

use crate::cli::Failure;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Concurrent writers during the demo
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Print the report and stop instead of running until Ctrl-C
    #[arg(long)]
    exit_after_report: bool,
}

fn failed(message: impl std::fmt::Display) -> Failure {
    Failure::failed(anyhow::anyhow!("{message}"))
}

/// (sent, acknowledged) times of the workload's writes, to measure the gap around the kill.
#[derive(Default)]
struct AckTimes {
    times: Mutex<Vec<(Instant, Instant)>>,
}

async fn write_loop(
    client: Arc<Client>,
    writer: usize,
    stop: Arc<AtomicBool>,
    history: Arc<History>,
    acks: Arc<AckTimes>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let key = format!("demo/w{writer}/{n:06}");
        let value = format!("v{n}");
        let sent = Instant::now();
        let outcome = match client.put(&key, &value, PutOptions::default()).await {
            Ok(answer) => {
                acks.times.lock().expect("acks lock").push((sent, Instant::now()));
                OpOutcome::Acknowledged {
                    revision: answer.revision,
                }
            }
            Err(e) if e.is_definite() => OpOutcome::Failed,
            Err(_) => OpOutcome::Unknown,
        };
        history.record(writer, &key, &value, outcome);
    }
}

pub async fn run(args: DemoArgs) -> Result<(), Failure> {
    let binary = std::env::current_exe().map_err(|e| failed(format!("cannot find the rampart binary: {e}")))?;
    println!("== Rampart demo: one region of 3 nodes on this machine ==");
    let mut cluster = Cluster::start(&binary, ClusterOptions::default())
        .await
        .map_err(|e| failed(format!("cannot start nodes: {e}")))?;
    println!("data under {}", cluster.base_dir().display());
    for node in cluster.nodes.values() {
        println!(
            "  node {} listening on {} (pid {})",
            node.id,
            node.addr,
            node.pid().unwrap_or(0)
        );
    }
    let leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
    println!("leader elected: node {leader}");

    let client = Arc::new(cluster.client().with_deadline(Duration::from_secs(5)));
    let stop = Arc::new(AtomicBool::new(false));
    let history = Arc::new(History::default());
    let acks = Arc::new(AckTimes::default());
    let writers: Vec<_> = (0..args.writers.max(1))
        .map(|w| {
            tokio::spawn(write_loop(
                client.clone(),
                w,
                stop.clone(),
                history.clone(),
                acks.clone(),
            ))
        })
        .collect();
    println!("driving writes with {} concurrent writers...", args.writers.max(1));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = history.acknowledged();

    let killed_at = Instant::now();
    cluster.kill(leader);
    println!("SIGKILL leader node {leader} after {before} acknowledged writes");
    let new_leader = cluster.wait_for_leader(Duration::from_secs(20)).await;
    // The first write sent after the kill and acknowledged: what a client saw as downtime.
    let first_ack_after = rampart_testkit::eventually(
        Duration::from_secs(20),
        "a write sent after the kill to be acknowledged",
        || {
            let acks = acks.clone();
            async move {
                acks.times
                    .lock()
                    .expect("acks lock")
                    .iter()
                    .filter(|(sent, _)| *sent > killed_at)
                    .map(|(_, acked)| *acked)
                    .min()
            }
        },
    )
    .await;
    let gap = first_ack_after.duration_since(killed_at);
    println!("new leader: node {new_leader}");
    println!(
        "write gap (kill -> first write sent after it acknowledged): {} ms",
        gap.as_millis()
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        let _ = writer.await;
    }

    cluster
        .restart(leader)
        .map_err(|e| failed(format!("cannot restart node {leader}: {e}")))?;
    println!("restarted node {leader} on its data dir");
    let (revision, checksum) = cluster.wait_converged(Duration::from_secs(30)).await;
    println!("all 3 nodes caught up: revision {revision}, checksum {checksum}");

    let range = client
        .range("demo/", false)
        .await
        .map_err(|e| failed(format!("final read failed: {e}")))?;
    let state: BTreeMap<String, String> = range.items.into_iter().map(|kv| (kv.key, kv.value)).collect();
    let lost = history.lost_acknowledged_writes(&state);
    let writes = history.writes();
    let unknown = writes.iter().filter(|w| w.outcome == OpOutcome::Unknown).count();
    println!(
        "acknowledged writes: {}, lost: {}, outcome unknown (timed out during failover): {unknown}",
        history.acknowledged(),
        lost.len()
    );
    println!("RTO (write gap) {} ms, RPO 0 acknowledged writes lost", gap.as_millis());
    if !lost.is_empty() {
        return Err(failed(format!(
            "{} acknowledged writes were lost: {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        )));
    }
    if args.exit_after_report {
        return Ok(());
    }
    println!("\nThe region keeps running. Try, in another terminal:");
    println!(
        "  RAMPART_ENDPOINTS={} cargo run -q -- status",
        cluster.endpoints().join(",")
    );
    println!("Ctrl-C stops every node.");
    let _ = tokio::signal::ctrl_c().await;
    cluster.stop_all();
    println!("stopped.");
    Ok(())
}
