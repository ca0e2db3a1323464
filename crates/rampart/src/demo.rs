//! `rampart demo`: a newcomer's first look. Starts a 3-node region from this same binary,
//! drives writes, SIGKILLs the leader, and reports the new leader, the measured write gap
//! and that no acknowledged write was lost; then restarts the killed node and shows it
//! caught up. Then the service part: three sample-service instances supervised by the
//! nodes, writes to the primary, SIGKILL of the primary's process, and the measured
//! detection, promotion and first-write times and lost writes. Then the backup part: a
//! backup of the region (zstd, AES-256-GCM, to a local directory), restored into a new
//! region whose revision and checksum match it. Keeps running until Ctrl-C.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use rampart_client::{Client, PutOptions};
use rampart_testkit::{Cluster, ClusterOptions, History, OpOutcome};

use crate::outcome::Failure;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Concurrent writers during the demo
    #[arg(long, default_value_t = 4)]
    writers: usize,
    /// Print the report and stop instead of running until Ctrl-C
    #[arg(long)]
    exit_after_report: bool,
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
    let binary =
        std::env::current_exe().map_err(|e| Failure::message(format!("cannot find the rampart binary: {e}")))?;
    println!("== Rampart demo: one region of 3 nodes on this machine ==");
    let work = tempfile::Builder::new()
        .prefix("rampart-demo-")
        .tempdir()
        .map_err(|e| Failure::message(format!("cannot make a directory for the demo: {e}")))?;
    let backup_config =
        backup_config(work.path()).map_err(|e| Failure::message(format!("cannot write the demo's config: {e}")))?;
    let options = ClusterOptions {
        base_dir: Some(work.path().join("region")),
        node_args: vec!["--config".into(), backup_config.display().to_string()],
        ..ClusterOptions::default()
    };
    let mut cluster = Cluster::start(&binary, options)
        .await
        .map_err(|e| Failure::message(format!("cannot start nodes: {e}")))?;
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
        .map_err(|e| Failure::message(format!("cannot restart node {leader}: {e}")))?;
    println!("restarted node {leader} on its data dir");
    let (revision, checksum) = cluster.wait_converged(Duration::from_secs(30)).await;
    println!("all 3 nodes caught up: revision {revision}, checksum {checksum}");

    let range = client
        .range("demo/", false)
        .await
        .map_err(|e| Failure::message(format!("final read failed: {e}")))?;
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
        return Err(Failure::message(format!(
            "{} acknowledged writes were lost: {:?}",
            lost.len(),
            &lost[..lost.len().min(5)]
        )));
    }
    service_part(&cluster, &binary, &client).await?;
    backup_part(&binary, &client, &backup_config, work.path()).await?;
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

/// A node config with only `[backup]`: a local destination and a fresh key, in `dir`.
fn backup_config(dir: &std::path::Path) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    let key = dir.join("backup.key");
    rampart_node::certs::write_file(&key, rampart_node::vault::new_key_text().as_bytes(), true)?;
    let config = dir.join("backup.toml");
    std::fs::write(
        &config,
        format!(
            "[backup]\ndestination = \"file://{}\"\nkey_file = \"{}\"\n",
            dir.join("backups").display(),
            key.display()
        ),
    )?;
    Ok(config)
}

/// The backup part: a backup of the live region, restored into a new region of 3 nodes,
/// whose revision and checksum must be the backup's.
async fn backup_part(
    binary: &std::path::Path,
    client: &Client,
    config: &std::path::Path,
    dir: &std::path::Path,
) -> Result<(), Failure> {
    println!("\n== Backup and restore: the region backed up, then restored as a new region ==");
    let started = Instant::now();
    let manifest = client
        .backup_create(Duration::from_secs(120))
        .await
        .map_err(|e| Failure::message(format!("backup failed: {e}")))?;
    println!(
        "backup {}: revision {}, {} state bytes stored as {} (zstd, {}) in {} ms",
        manifest.id,
        manifest.revision,
        manifest.state_bytes,
        manifest.stored_bytes(),
        manifest.encryption,
        started.elapsed().as_millis()
    );
    let text = std::fs::read_to_string(config).map_err(Failure::message)?;
    let table: toml::Table = text.parse().map_err(Failure::message)?;
    let backup = crate::node_cmd::file_backup(config, table["backup"].clone())?;
    let vault = rampart_node::vault::Vault::open(&backup).map_err(Failure::message)?;
    let restore_started = Instant::now();
    let addresses = (0..3)
        .map(|_| rampart_testkit::cluster::free_port())
        .collect::<Result<Vec<_>, _>>()
        .map_err(Failure::message)?;
    let members = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| (i as u64 + 1, a.to_string()))
        .collect();
    let restored_dir = dir.join("restored");
    let data_dirs: Vec<_> = (1..=3).map(|i| restored_dir.join(format!("n{i}"))).collect();
    vault
        .restore(Some(&manifest.id), &data_dirs, &members)
        .await
        .map_err(|e| Failure::message(format!("restore failed: {e}")))?;
    let options = ClusterOptions {
        base_dir: Some(restored_dir),
        addresses,
        ..ClusterOptions::default()
    };
    let mut restored = Cluster::start(binary, options)
        .await
        .map_err(|e| Failure::message(format!("cannot start the restored region: {e}")))?;
    let (revision, checksum) = restored.wait_converged(Duration::from_secs(30)).await;
    println!(
        "restored region of 3 nodes: revision {revision}, checksum {checksum}, serving {} ms after the restore began",
        restore_started.elapsed().as_millis()
    );
    restored.stop_all();
    if (revision, checksum.as_str()) != (manifest.revision, manifest.checksum.as_str()) {
        return Err(Failure::message(format!(
            "the restored region differs from backup {}: revision {} checksum {}",
            manifest.id, manifest.revision, manifest.checksum
        )));
    }
    println!("restored state matches the backup (revision and checksum)");
    Ok(())
}

/// The service part: supervised sample services, a primary killed under writes.
async fn service_part(cluster: &Cluster, binary: &std::path::Path, client: &Client) -> Result<(), Failure> {
    use rampart_core::service::PolicySpec;
    println!("\n== A service kept available: 3 sample-service instances, one per node ==");
    let policy: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "heartbeat", "ttl": "1s"}],
        "max_lag_on_failover": 0,
    }))
    .map_err(Failure::message)?;
    client.service_put("kv", &policy).await.map_err(Failure::message)?;
    let endpoints = cluster.endpoints().join(",");
    let mut addrs = BTreeMap::new();
    for node in 1..=3u64 {
        let id = format!("s-{node}");
        let addr = rampart_testkit::cluster::free_port()
            .map_err(Failure::message)?
            .to_string();
        crate::sample_fleet::register(client, binary, &endpoints, "kv", &id, node, &addr, 0).await?;
        println!("  instance {id} on node {node}, serving {addr}");
        addrs.insert(id, addr);
    }
    crate::sample_fleet::wait_all_up(client, "kv", Duration::from_secs(30)).await;
    client.switchover("kv", "s-1").await.map_err(Failure::message)?;
    println!("switchover: s-1 is the primary");

    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .map_err(Failure::message)?;
    let primary_addr = |id: &str| addrs[id].clone();
    // Wait until s-1 takes writes, then write for a second.
    rampart_testkit::eventually(Duration::from_secs(10), "s-1 writable", || async {
        let health = crate::sample_fleet::json(&http, &primary_addr("s-1"), "/health").await?;
        (health["writable"] == true).then_some(())
    })
    .await;
    let mut acknowledged = Vec::new();
    let started = Instant::now();
    let mut n = 0;
    while started.elapsed() < Duration::from_secs(1) {
        n += 1;
        let key = format!("d{n}");
        let ok = http
            .put(format!("http://{}/kv/{key}", primary_addr("s-1")))
            .body(key.clone())
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            acknowledged.push(key);
        }
    }
    let pid = crate::sample_fleet::json(&http, &primary_addr("s-1"), "/health")
        .await
        .and_then(|h| h["pid"].as_i64())
        .ok_or_else(|| Failure::message("cannot read the primary's pid"))? as i32;
    let killed_at = Instant::now();
    // SAFETY: the sample-service process the demo registered, started by its own node.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    println!(
        "SIGKILL the primary s-1 (pid {pid}) after {} acknowledged writes",
        acknowledged.len()
    );
    // Write to whichever instance takes writes, until one does.
    let (new_primary, first_write) =
        rampart_testkit::eventually(Duration::from_secs(30), "a write on a new primary", || async {
            for id in ["s-2", "s-3"] {
                let ok = http
                    .put(format!("http://{}/kv/after", primary_addr(id)))
                    .body("after")
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success());
                if ok {
                    return Some((id, Instant::now()));
                }
            }
            None
        })
        .await;
    let events = client
        .events(Some("failover"), Some(1))
        .await
        .map_err(Failure::message)?;
    let detail = events.events.last().map(|e| e.detail.clone()).unwrap_or_default();
    let field = |name: &str| {
        detail
            .split_whitespace()
            .find_map(|part| part.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut lost = 0;
    for key in &acknowledged {
        let got = http
            .get(format!("http://{}/kv/{key}", primary_addr(new_primary)))
            .send()
            .await;
        let present = match got {
            Ok(r) => r.text().await.is_ok_and(|v| v == *key),
            Err(_) => false,
        };
        if !present {
            lost += 1;
        }
    }
    println!("new primary: {new_primary} (fencing token {})", field("token"));
    println!(
        "detection -> promotion: {} ms; kill -> first write accepted by {new_primary}: {} ms",
        field("detection_to_promotion_ms"),
        first_write.duration_since(killed_at).as_millis()
    );
    println!(
        "service RTO {} ms, RPO {lost} of {} acknowledged writes lost",
        first_write.duration_since(killed_at).as_millis(),
        acknowledged.len()
    );
    if lost > 0 {
        // The sample service replicates asynchronously: writes its primary acknowledged in
        // the last moments before the kill may not have reached a replica. That is the
        // RPO Rampart measures and reports; a synchronous standby would make it 0.
        println!("  (asynchronous replication: the last writes before the kill had not reached a replica)");
    }
    Ok(())
}
