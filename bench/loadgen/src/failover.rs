//! Region failover, measured on real processes (east and west of three nodes, and a
//! witness): the whole primary region SIGKILLed under writes, to the first write a client
//! with both regions' endpoints gets acknowledged by the new primary (at the default
//! timings and tuned ones); a planned failover's longest write gap for a client writing
//! continuously; and a fail-back after a long divergence (the old primary kept taking writes
//! its standby never received): how long the old primary takes to resync, and its
//! divergence file beside the writes it should hold.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rampart_client::{Client, PutOptions};
use rampart_testkit::{RegionSpec, Regions, RegionsOptions, RelayMode};
use serde::Serialize;

/// `[regions]` timings at their defaults, and tuned for a fast failover.
const DEFAULTS: &[&str] = &[];
const TUNED: &[&str] = &[
    "health_check_interval = \"200ms\"",
    "region_timeout = \"1s\"",
    "region_lease = \"1s\"",
];

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub rto_default_ms: Vec<u64>,
    pub rto_tuned_ms: Vec<u64>,
    pub planned_gap_ms: Vec<u64>,
    pub failback: Option<Failback>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failback {
    pub divergence_seconds: u64,
    /// Writes the old primary acknowledged that its standby never received.
    pub unshipped_acknowledged: usize,
    /// Lines of its divergence file(s).
    pub divergence_file_writes: usize,
    pub divergence_file_bytes: u64,
    /// From the heal to the old primary at the new primary's checksum.
    pub resync_ms: u64,
    /// The new primary's shipped state then, in keys.
    pub keys: usize,
}

type Acks = Arc<Mutex<Vec<(Instant, Instant, u64)>>>;

async fn start(binary: &Path, settings: &[&str]) -> Regions {
    let options = RegionsOptions {
        primary: "east".into(),
        regions: vec![
            RegionSpec::new("east", 3),
            RegionSpec::new("west", 3),
            RegionSpec::witness("witness"),
        ],
        settings: settings.iter().map(|s| s.to_string()).collect(),
        tls: false,
    };
    let regions = Regions::start(binary, options).await.expect("start the regions");
    regions.wait_for_leaders(Duration::from_secs(60)).await;
    regions
}

/// A client over both data regions' endpoints, east's first.
fn both(regions: &Regions) -> Client {
    regions.client_over(&["east", "west"]).with_deadline(Duration::from_secs(1))
}

/// One writer, back to back, until `stop`: every acknowledgement's send and answer times
/// and epoch.
fn writer(client: Client, prefix: &'static str, stop: Arc<AtomicBool>) -> (Acks, tokio::task::JoinHandle<()>) {
    let acks: Acks = Arc::default();
    let record = acks.clone();
    let task = tokio::spawn(async move {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            let sent = Instant::now();
            if let Ok(put) = client.put(&format!("{prefix}/{n}"), "v", PutOptions::default()).await {
                record.lock().expect("acks").push((sent, Instant::now(), put.epoch));
            }
        }
    });
    (acks, task)
}

/// The whole primary region SIGKILLed under writes: ms to the first write sent after the
/// kill and acknowledged at the new epoch.
async fn rto_run(binary: &Path, settings: &[&str]) -> u64 {
    let mut regions = start(binary, settings).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, task) = writer(both(&regions), "rto", stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ids: Vec<u64> = regions.region("east").nodes.keys().copied().collect();
    let killed = Instant::now();
    for id in ids {
        regions.region_mut("east").kill(id);
    }
    let first = rampart_testkit::eventually(Duration::from_secs(120), "a write acknowledged by west", || async {
        acks.lock()
            .expect("acks")
            .iter()
            .filter(|(sent, _, epoch)| *epoch >= 2 && *sent > killed)
            .map(|(_, answered, _)| *answered)
            .min()
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let _ = task.await;
    first.duration_since(killed).as_millis() as u64
}

/// A planned failover under continuous writes: the longest time between two acknowledged
/// writes, ms.
async fn planned_run(binary: &Path) -> u64 {
    let regions = start(binary, TUNED).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, task) = writer(both(&regions), "planned", stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let request = rampart_core::api::FailoverRequest {
        to: "west".into(),
        allow_data_loss: false,
        dry_run: false,
    };
    let answer = regions.client("east").regions_failover(&request).await.expect("planned failover");
    assert!(answer.planned, "{answer:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = task.await;
    let mut answered: Vec<Instant> = acks.lock().expect("acks").iter().map(|(_, a, _)| *a).collect();
    answered.sort();
    let epochs: Vec<u64> = acks.lock().expect("acks").iter().map(|(_, _, e)| *e).collect();
    assert!(epochs.contains(&2), "writes went on at epoch 2");
    answered.windows(2).map(|w| w[1].duration_since(w[0]).as_millis() as u64).max().unwrap_or(0)
}

/// East keeps acknowledging writes its standby never receives for `seconds` (west's link is
/// cut; the witness keeps east's lease), then loses the others; west takes over; the links
/// heal and east resyncs.
async fn failback_run(binary: &Path, seconds: u64) -> Failback {
    let regions = start(binary, TUNED).await;
    let east = regions.client("east").with_deadline(Duration::from_secs(1));
    let west = regions.client("west");
    east.put("fb/first", "v", PutOptions::default()).await.expect("put");
    regions.set_link("west", "east", RelayMode::Blackhole);
    let stop = Arc::new(AtomicBool::new(false));
    let (acks, task) = writer(regions.client("east").with_deadline(Duration::from_secs(1)), "fb", stop.clone());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = task.await;
    let unshipped_acknowledged = acks.lock().expect("acks").len();
    regions.cut("east", "west");
    regions.cut("east", "witness");
    rampart_testkit::eventually(Duration::from_secs(120), "west promoted", || async {
        (west.cluster().await.ok()?.epoch == 2).then_some(())
    })
    .await;
    for i in 0..100 {
        west.put(&format!("fb/west-{i}"), "v", PutOptions::default()).await.expect("west takes writes");
    }
    let healed = Instant::now();
    regions.heal("east", "west");
    regions.heal("east", "witness");
    rampart_testkit::eventually(Duration::from_secs(600), "east resynced", || async {
        let own = east.cluster().await.ok()?;
        let primary = west.cluster().await.ok()?;
        (own.epoch == 2 && own.checksum == primary.checksum).then_some(())
    })
    .await;
    let resync_ms = healed.elapsed().as_millis() as u64;
    let (mut lines, mut bytes) = (0, 0);
    for node in regions.region("east").nodes.values() {
        let Ok(files) = std::fs::read_dir(node.data_dir.join("divergence")) else { continue };
        for file in files.flatten() {
            let text = std::fs::read_to_string(file.path()).unwrap_or_default();
            lines += text.lines().count();
            bytes += text.len() as u64;
        }
    }
    let keys = west.range("fb/", false).await.map(|r| r.items.len()).unwrap_or(0);
    Failback {
        divergence_seconds: seconds,
        unshipped_acknowledged,
        divergence_file_writes: lines,
        divergence_file_bytes: bytes,
        resync_ms,
        keys,
    }
}

fn median(values: &[u64]) -> u64 {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    sorted.get(sorted.len() / 2).copied().unwrap_or(0)
}

/// `mode`: "quick" (2 rounds, 5 s of divergence), "failback" (the fail-back alone), or
/// none (5 rounds, 60 s).
pub async fn run(binary: &Path, out: &Path, mode: Option<&str>) {
    let quick = mode == Some("quick");
    let rounds = match mode {
        Some("quick") => 2,
        Some("failback") => 0,
        _ => 5,
    };
    let mut report = Report {
        rto_default_ms: Vec::new(),
        rto_tuned_ms: Vec::new(),
        planned_gap_ms: Vec::new(),
        failback: None,
    };
    for round in 0..rounds {
        report.rto_default_ms.push(rto_run(binary, DEFAULTS).await);
        report.rto_tuned_ms.push(rto_run(binary, TUNED).await);
        report.planned_gap_ms.push(planned_run(binary).await);
        eprintln!("round {round}: {report:?}");
    }
    report.failback = Some(failback_run(binary, if quick { 5 } else { 60 }).await);
    std::fs::write(out, serde_json::to_vec_pretty(&report).expect("json")).expect("write the results");
    let fb = report.failback.as_ref().expect("set above");
    println!("| Measure (median of {rounds}) | Rampart | Goal |");
    println!("|---|---|---|");
    println!(
        "| Whole primary region SIGKILLed -> first acknowledged write in the new primary, defaults | {} ms (runs: {:?}) | < 10 s |",
        median(&report.rto_default_ms),
        report.rto_default_ms
    );
    println!(
        "| The same, tuned ({}) | {} ms (runs: {:?}) | < 3 s |",
        TUNED.join(", "),
        median(&report.rto_tuned_ms),
        report.rto_tuned_ms
    );
    println!(
        "| Planned failover: longest write gap of a continuous writer | {} ms (runs: {:?}) | < 1 s |",
        median(&report.planned_gap_ms),
        report.planned_gap_ms
    );
    println!(
        "| Fail-back after {} s of divergence: resync | {} ms; divergence file {} writes ({} bytes) for {} acknowledged writes never shipped | - |",
        fb.divergence_seconds, fb.resync_ms, fb.divergence_file_writes, fb.divergence_file_bytes, fb.unshipped_acknowledged
    );
}
