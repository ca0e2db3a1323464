//! `rampart demo`: a newcomer's first look. Starts a 3-node region from this same binary,
//! drives writes, SIGKILLs the leader, and reports the new leader, the measured write gap
//! and that no acknowledged write was lost; then restarts the killed node and shows it
//! caught up. Then the service part: three sample-service instances supervised by the
//! nodes, writes to the primary, SIGKILL of the primary's process, and the measured
//! detection, promotion and first-write times and lost writes. Then the backup part: a
//! backup of the region (zstd, AES-256-GCM, to a local directory), restored into a new
//! region whose revision and checksum match it. Then the regions part: a standby region of
//! three nodes and a witness join; the standby installs the primary's state, follows it
//! under writes with its lag shown live, and is verified equal. Keeps running until Ctrl-C.

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
    println!("== Rampart demo: region east, 3 nodes on this machine ==");
    let work = tempfile::Builder::new()
        .prefix("rampart-demo-")
        .tempdir()
        .map_err(|e| Failure::message(format!("cannot make a directory for the demo: {e}")))?;
    let topology = Topology::new().map_err(|e| Failure::message(format!("no free ports: {e}")))?;
    let backup_config = backup_config(work.path(), &topology)
        .map_err(|e| Failure::message(format!("cannot write the demo's config: {e}")))?;
    // East knows the regions to come: it takes writes while a majority of them (east and
    // the witness) grant it the region lease, so the witness starts first.
    let mut witness = start_region(&binary, &topology, work.path(), "witness", vec![topology.witness], true).await?;
    println!(
        "a witness (one node, no data) on {}: with east, the majority that grants east the region lease",
        topology.witness
    );
    let options = ClusterOptions {
        base_dir: Some(work.path().join("region")),
        addresses: topology.east.clone(),
        node_args: vec![
            "--region".into(),
            "east".into(),
            "--config".into(),
            backup_config.display().to_string(),
        ],
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
    service_part(&cluster, &binary, &client, false).await?;
    service_part(&cluster, &binary, &client, true).await?;
    backup_part(&binary, &client, &backup_config, work.path()).await?;
    let mut west = regions_part(&binary, &client, &topology, work.path(), args.writers.max(1)).await?;
    region_outage_part(&mut cluster, &west, args.writers.max(1)).await?;
    if args.exit_after_report {
        return Ok(());
    }
    println!("\nThe regions keep running. Try, in another terminal:");
    println!(
        "  RAMPART_ENDPOINTS={} cargo run -q -- regions",
        cluster.endpoints().join(",")
    );
    println!(
        "  RAMPART_ENDPOINTS={} cargo run -q -- kv put k v    # refused: west is a standby",
        west.endpoints().join(",")
    );
    println!("Ctrl-C stops every node.");
    let _ = tokio::signal::ctrl_c().await;
    cluster.stop_all();
    west.stop_all();
    witness.stop_all();
    println!("stopped.");
    Ok(())
}

/// Where the demo's regions listen: east (the primary), west (a standby), and a witness.
struct Topology {
    east: Vec<std::net::SocketAddr>,
    west: Vec<std::net::SocketAddr>,
    witness: std::net::SocketAddr,
}

impl Topology {
    fn new() -> std::io::Result<Topology> {
        let ports = |n| {
            (0..n)
                .map(|_| rampart_testkit::cluster::free_port())
                .collect::<std::io::Result<Vec<_>>>()
        };
        Ok(Topology {
            east: ports(3)?,
            west: ports(3)?,
            witness: rampart_testkit::cluster::free_port()?,
        })
    }

    /// `[regions]` for a node of `own`: east is the primary; the others as known regions.
    fn regions_table(&self, own: &str) -> String {
        let list =
            |addrs: &[std::net::SocketAddr]| addrs.iter().map(|a| format!("\"{a}\"")).collect::<Vec<_>>().join(", ");
        let mut text = String::from(
            "[regions]\nprimary = \"east\"\nhealth_check_interval = \"500ms\"\nregion_timeout = \"3s\"\nmax_lag = \"2s\"\nverify_interval = \"5s\"\n",
        );
        let regions = [
            ("east", list(&self.east), false),
            ("west", list(&self.west), false),
            ("witness", list(&[self.witness]), true),
        ];
        for (name, endpoints, witness) in regions.iter().filter(|(name, ..)| *name != own) {
            text.push_str(&format!(
                "[regions.known.{name}]\nendpoints = [{endpoints}]\nwitness = {witness}\n"
            ));
        }
        text
    }
}

/// The primary region's node config: `[backup]` (a local destination and a fresh key, in
/// `dir`) and `[regions]`.
fn backup_config(dir: &std::path::Path, topology: &Topology) -> Result<std::path::PathBuf, Box<dyn std::error::Error>> {
    let key = dir.join("backup.key");
    rampart_node::certs::write_file(&key, rampart_node::vault::new_key_text().as_bytes(), true)?;
    let config = dir.join("east.toml");
    std::fs::write(
        &config,
        format!(
            "[backup]\ndestination = \"file://{}\"\nkey_file = \"{}\"\n{}",
            dir.join("backups").display(),
            key.display(),
            topology.regions_table("east")
        ),
    )?;
    Ok(config)
}

/// Starts region `name` of the demo (a witness when `witness`) on `addresses`, with its
/// `[regions]` table.
async fn start_region(
    binary: &std::path::Path,
    topology: &Topology,
    dir: &std::path::Path,
    name: &str,
    addresses: Vec<std::net::SocketAddr>,
    witness: bool,
) -> Result<Cluster, Failure> {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(&config, topology.regions_table(name)).map_err(Failure::message)?;
    let options = ClusterOptions {
        nodes: addresses.len(),
        base_dir: Some(dir.join(name)),
        addresses,
        witness,
        node_args: vec![
            "--region".into(),
            name.into(),
            "--config".into(),
            config.display().to_string(),
        ],
        ..ClusterOptions::default()
    };
    Cluster::start(binary, options)
        .await
        .map_err(|e| Failure::message(format!("cannot start region {name}: {e}")))
}

/// The regions part: a 3-node standby region starts; it installs the primary's state,
/// follows it under writes (its lag printed live) and is verified equal.
async fn regions_part(
    binary: &std::path::Path,
    primary: &Arc<Client>,
    topology: &Topology,
    dir: &std::path::Path,
    writers: usize,
) -> Result<Cluster, Failure> {
    println!("\n== A standby region: west, 3 more nodes (the witness already runs) ==");
    let west = start_region(binary, topology, dir, "west", topology.west.clone(), false).await?;
    west.wait_for_leader(Duration::from_secs(20)).await;
    let standby = Client::new(&west.endpoints()).map_err(Failure::message)?;
    let joined = Instant::now();
    let target = primary.cluster().await.map_err(Failure::message)?.revision;
    rampart_testkit::eventually(Duration::from_secs(60), "west to catch up", || async {
        let own = standby.cluster().await.ok()?;
        (own.revision >= target).then_some(())
    })
    .await;
    println!(
        "west has east's state (revision {target}) {} ms after it started (replayed from east's log, or installed from its state when east no longer keeps the writes)",
        joined.elapsed().as_millis()
    );

    println!("writing to east with {writers} writers; west's lag as east sees it:");
    let stop = Arc::new(AtomicBool::new(false));
    let (history, acks) = (Arc::new(History::default()), Arc::new(AckTimes::default()));
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            tokio::spawn(write_loop(
                primary.clone(),
                w,
                stop.clone(),
                history.clone(),
                acks.clone(),
            ))
        })
        .collect();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let Ok(view) = primary.regions().await else { continue };
        if let Some(west) = view.regions.iter().find(|r| r.name == "west") {
            println!(
                "  west: revision {}, {} revisions ({} bytes, {} ms) behind",
                west.revision.unwrap_or(0),
                west.lag_revisions.unwrap_or(0),
                west.lag_bytes.unwrap_or(0),
                west.lag_ms.unwrap_or(0)
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    let east_now = primary.cluster().await.map_err(Failure::message)?;
    let caught_up = Instant::now();
    rampart_testkit::eventually(Duration::from_secs(60), "west to reach east's revision", || async {
        let own = standby.cluster().await.ok()?;
        (own.revision >= east_now.revision).then_some(())
    })
    .await;
    println!(
        "writes stopped at east's revision {}: west had it {} ms later",
        east_now.revision,
        caught_up.elapsed().as_millis()
    );
    let verified = primary.regions_verify().await.map_err(Failure::message)?;
    for v in &verified.verifications {
        match v.matched {
            Some(true) => println!(
                "verified: {} equals east at revision {}",
                v.region,
                v.revision.unwrap_or(0)
            ),
            _ => return Err(Failure::message(format!("verification of {} failed: {v:?}", v.region))),
        }
    }
    let view = primary.regions().await.map_err(Failure::message)?;
    for r in &view.regions {
        println!(
            "  {:<8} {:<8} reachable {:<5} revision {}",
            r.name,
            r.role,
            r.reachable,
            r.revision.map_or("-".to_string(), |v| v.to_string())
        );
    }
    match standby.put("demo/refused", "x", PutOptions::default()).await {
        Err(e) if e.code() == Some("read_only_region") => println!("a write sent to west: {e}"),
        other => return Err(Failure::message(format!("west took a write: {other:?}"))),
    }
    Ok(west)
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

/// The service part: supervised sample services, a primary killed under writes;
/// asynchronous (RPO as measured), then `synchronous` (one synchronous standby, s-2: a
/// write is acknowledged once it has it, and only it may be promoted: RPO 0).
async fn service_part(
    cluster: &Cluster,
    binary: &std::path::Path,
    client: &Client,
    synchronous: bool,
) -> Result<(), Failure> {
    use rampart_core::service::PolicySpec;
    let service = if synchronous { "kv-sync" } else { "kv" };
    if synchronous {
        println!("\n== The same, synchronous: s-2 is the synchronous standby (sample-service --synchronous) ==");
    } else {
        println!("\n== A service kept available: 3 sample-service instances, one per node ==");
    }
    let policy: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "heartbeat", "ttl": "1s"}],
        "max_lag_on_failover": if synchronous { u64::MAX } else { 0 },
        "synchronous": synchronous,
    }))
    .map_err(Failure::message)?;
    client.service_put(service, &policy).await.map_err(Failure::message)?;
    let endpoints = cluster.endpoints().join(",");
    let mut addrs = BTreeMap::new();
    for node in 1..=3u64 {
        let id = format!("s-{node}");
        let addr = rampart_testkit::cluster::free_port()
            .map_err(Failure::message)?
            .to_string();
        let mode = rampart_testkit::sample_fleet::Mode {
            synchronous,
            // s-1, the first primary, and s-2, its synchronous standby: the instances a
            // synchronous policy may promote.
            standby: synchronous && node <= 2,
            zone: None,
        };
        rampart_testkit::sample_fleet::register(client, binary, &endpoints, service, &id, node, &addr, 0, mode)
            .await
            .map_err(Failure::message)?;
        println!("  instance {id} on node {node}, serving {addr}");
        addrs.insert(id, addr);
    }
    rampart_testkit::sample_fleet::wait_all_up(client, service, Duration::from_secs(30)).await;
    client.switchover(service, "s-1").await.map_err(Failure::message)?;
    println!("switchover: s-1 is the primary");

    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .map_err(Failure::message)?;
    let primary_addr = |id: &str| addrs[id].clone();
    // Wait until s-1 takes writes, then write for a second.
    rampart_testkit::eventually(Duration::from_secs(10), "s-1 writable", || async {
        let health = rampart_testkit::sample_fleet::json(&http, &primary_addr("s-1"), "/health").await?;
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
    let pid = rampart_testkit::sample_fleet::json(&http, &primary_addr("s-1"), "/health")
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
    if synchronous {
        // The standby was promoted: name the remaining replica synchronous, as Rampart's
        // PostgreSQL services do by themselves, so that writes can be acknowledged again.
        rampart_testkit::eventually(Duration::from_secs(30), "a new primary", || async {
            let view = client.service(service).await.ok()?;
            view.primary.filter(|p| p != "s-1")
        })
        .await;
        let mode = rampart_testkit::sample_fleet::Mode {
            synchronous,
            standby: true,
            zone: None,
        };
        rampart_testkit::sample_fleet::register(client, binary, &endpoints, service, "s-3", 3, &addrs["s-3"], 0, mode)
            .await
            .map_err(Failure::message)?;
    }
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
    if synchronous && new_primary != "s-2" {
        return Err(Failure::message(format!(
            "{new_primary} was promoted, not the synchronous standby s-2"
        )));
    }
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
    if synchronous && lost > 0 {
        return Err(Failure::message(format!(
            "synchronous mode lost {lost} acknowledged writes"
        )));
    }
    if synchronous {
        println!("  (synchronous: every acknowledged write was on s-2 before it was acknowledged)");
    }
    if lost > 0 {
        // The sample service replicates asynchronously: writes its primary acknowledged in
        // the last moments before the kill may not have reached a replica. That is the
        // RPO Rampart measures and reports; a synchronous standby would make it 0.
        println!("  (asynchronous replication: the last writes before the kill had not reached a replica)");
    }
    Ok(())
}

/// Acknowledged writes of a region outage's writers: key, when sent and answered, epoch.
type Acks = Arc<Mutex<Vec<(String, Instant, Instant, u64)>>>;

/// Writes `outage/{phase}/{w}/{n}` through `client` until `stop`, recording every
/// acknowledgement.
async fn outage_writer(client: Arc<Client>, phase: &'static str, w: usize, stop: Arc<AtomicBool>, acks: Acks) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("outage/{phase}/{w}/{n}");
        n += 1;
        let sent = Instant::now();
        if let Ok(put) = client.put(&key, "v", PutOptions::default()).await {
            acks.lock()
                .expect("acks lock")
                .push((key, sent, Instant::now(), put.epoch));
        }
    }
}

/// Starts `writers` writers of `phase` through both regions' endpoints.
fn start_outage_writers(
    client: &Arc<Client>,
    phase: &'static str,
    writers: usize,
) -> (Arc<AtomicBool>, Acks, Vec<tokio::task::JoinHandle<()>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let acks: Acks = Arc::default();
    let tasks = (0..writers)
        .map(|w| tokio::spawn(outage_writer(client.clone(), phase, w, stop.clone(), acks.clone())))
        .collect();
    (stop, acks, tasks)
}

async fn stop_writers(stop: Arc<AtomicBool>, tasks: Vec<tokio::task::JoinHandle<()>>) {
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
}

/// The keys under `prefix` in the state `client` reads.
async fn keys_under(client: &Client, prefix: &str) -> Result<std::collections::BTreeSet<String>, Failure> {
    let range = client.range(prefix, false).await.map_err(Failure::message)?;
    Ok(range.items.into_iter().map(|kv| kv.key).collect())
}

/// The region outage: writes go on through both regions' endpoints while the whole primary
/// region is killed; west takes over by the votes of west and the witness, and the RTO and
/// the reported RPO are printed beside the acknowledged writes really missing (the demo's
/// own canary); east comes back as a standby, sets aside what it never shipped, and the
/// regions fail back with nothing lost.
async fn region_outage_part(east: &mut Cluster, west: &Cluster, writers: usize) -> Result<(), Failure> {
    println!("\n== A region outage: the whole primary region east is killed ==");
    let endpoints: Vec<String> = east.endpoints().into_iter().chain(west.endpoints()).collect();
    let client = Arc::new(
        Client::new(&endpoints)
            .map_err(Failure::message)?
            .with_deadline(Duration::from_secs(2)),
    );
    let west_client = Client::new(&west.endpoints()).map_err(Failure::message)?;
    let east_client = Client::new(&east.endpoints()).map_err(Failure::message)?;
    let (stop, acks, tasks) = start_outage_writers(&client, "kill", writers);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = Instant::now();
    let ids: Vec<u64> = east.nodes.keys().copied().collect();
    for id in &ids {
        east.kill(*id);
    }
    println!(
        "SIGKILL all of east's nodes after {} acknowledged writes; writers go on through both regions' endpoints",
        acks.lock().expect("acks lock").len()
    );
    let first_after = rampart_testkit::eventually(Duration::from_secs(60), "a write acknowledged by west", || async {
        let acks = acks.lock().expect("acks lock");
        acks.iter()
            .filter(|(_, sent, _, epoch)| *epoch >= 2 && *sent > killed_at)
            .map(|(_, _, answered, _)| *answered)
            .min()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_writers(stop, tasks).await;
    let failover = west_client
        .events(Some("region"), None)
        .await
        .map_err(Failure::message)?
        .events
        .into_iter()
        .rev()
        .find(|e| e.action == "region.failover")
        .ok_or_else(|| Failure::message("no region.failover event in west"))?;
    println!("west's event: {}", failover.detail);
    let kept = keys_under(&west_client, "outage/kill/").await?;
    let acknowledged: Vec<(String, Instant, Instant, u64)> = acks.lock().expect("acks lock").clone();
    let missing = acknowledged.iter().filter(|(key, ..)| !kept.contains(key)).count();
    println!(
        "region RTO (kill -> first write acknowledged by west) {} ms; acknowledged writes really missing in west: {missing} of {} (the RPO the event states covers them: revisions east reported, plus its last lease)",
        first_after.duration_since(killed_at).as_millis(),
        acknowledged.len()
    );

    for id in &ids {
        east.restart(*id)
            .map_err(|e| Failure::message(format!("cannot restart east's node {id}: {e}")))?;
    }
    rampart_testkit::eventually(Duration::from_secs(90), "east following west", || async {
        let status = east_client.cluster().await.ok()?;
        let west_now = west_client.cluster().await.ok()?;
        (status.epoch >= 2 && status.checksum == west_now.checksum).then_some(())
    })
    .await;
    let view = east_client.regions().await.map_err(Failure::message)?;
    let set_aside: u64 = view.divergence.iter().map(|f| f.writes).sum();
    let divergence_events = east_client
        .events(Some("region"), None)
        .await
        .map_err(Failure::message)?
        .events
        .into_iter()
        .filter(|e| e.action == "region.divergence")
        .count();
    println!(
        "east is back as a standby of west at epoch {}: {} writes it never shipped set aside in a divergence file ({} divergence events; rampart regions divergence lists them)",
        view.epoch, set_aside, divergence_events
    );

    let (stop, acks, tasks) = start_outage_writers(&client, "back", writers);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let request = rampart_core::api::FailoverRequest {
        to: "east".into(),
        allow_data_loss: false,
        dry_run: false,
    };
    let back = client.regions_failback(&request).await.map_err(Failure::message)?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_writers(stop, tasks).await;
    let acknowledged: Vec<(String, Instant, Instant, u64)> = acks.lock().expect("acks lock").clone();
    let mut answers: Vec<Instant> = acknowledged.iter().map(|(_, _, answered, _)| *answered).collect();
    answers.sort();
    let gap = answers
        .windows(2)
        .map(|w| w[1].duration_since(w[0]))
        .max()
        .unwrap_or_default();
    let kept = keys_under(&east_client, "outage/back/").await?;
    let lost = acknowledged.iter().filter(|(key, ..)| !kept.contains(key)).count();
    println!(
        "fail-back to east (planned) at epoch {} in {} ms: longest write gap {} ms, acknowledged writes lost: {lost} of {} (RPO 0)",
        back.epoch,
        back.took_ms,
        gap.as_millis(),
        acknowledged.len()
    );
    if lost > 0 {
        return Err(Failure::message(format!(
            "{lost} acknowledged writes lost in the fail-back"
        )));
    }
    Ok(())
}
