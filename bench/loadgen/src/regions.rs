//! Cross-region replication, measured: how long after a write is acknowledged by the
//! primary it is visible on the standby (Rampart's region link against `etcdctl
//! make-mirror` between two etcd clusters), both through the same relay with a fixed
//! one-way delay; what standbys cost the primary's throughput; and a standby catching up a
//! large state from nothing.
//!
//! Lag is timed on one clock: a writer notes when each put is acknowledged, a watcher on
//! the mirror notes when the key appears there.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rampart_testkit::bench::{load_keys, put_load, rss_kib, KvDriver, PutStats, RampartDriver};
use rampart_testkit::{RegionSpec, Regions, RegionsOptions, Relay, RelayMode};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::EtcdCluster;

/// Lag of one run.
#[derive(Debug, Clone, Serialize)]
pub struct LagStats {
    pub system: String,
    pub load: String,
    pub writes: usize,
    pub writes_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Acknowledged writes the mirror never showed within the wait.
    pub missing: usize,
}

/// How a lag run writes.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// Open loop at this many writes a second.
    Rate(u32),
    /// Closed loop: this many clients back to back.
    Clients(usize),
}

impl Load {
    fn label(self) -> String {
        match self {
            Load::Rate(rate) => format!("{rate} writes/s"),
            Load::Clients(clients) => format!("as fast as {clients} clients go"),
        }
    }
}

type Acks = Arc<Mutex<HashMap<String, Instant>>>;

/// Writes fresh keys under `prefix` for `duration` as `load` says, and times each from its
/// acknowledgement to its arrival in `seen` (fed by a watcher on the mirror).
async fn lag_run<D: KvDriver>(
    system: &str,
    driver: D,
    load: Load,
    duration: Duration,
    prefix: &str,
    seen: &mut mpsc::UnboundedReceiver<(String, Instant)>,
) -> LagStats {
    let acks: Acks = Arc::default();
    let value = "v".repeat(100);
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    match load {
        Load::Rate(rate) => {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut seq = 0u64;
            while Instant::now() < deadline {
                tick.tick().await;
                seq += 1;
                let (driver, acks, value) = (driver.clone(), acks.clone(), value.clone());
                let key = format!("{prefix}{seq:09}");
                tasks.push(tokio::spawn(async move {
                    if driver.put(key.clone(), value).await.is_ok() {
                        acks.lock().expect("acks").insert(key, Instant::now());
                    }
                }));
            }
        }
        Load::Clients(clients) => {
            for c in 0..clients {
                let (driver, acks, value, prefix) = (driver.clone(), acks.clone(), value.clone(), prefix.to_string());
                tasks.push(tokio::spawn(async move {
                    let mut seq = 0u64;
                    while Instant::now() < deadline {
                        seq += 1;
                        let key = format!("{prefix}{c:03}/{seq:09}");
                        if driver.put(key.clone(), value.clone()).await.is_ok() {
                            acks.lock().expect("acks").insert(key, Instant::now());
                        }
                    }
                }));
            }
        }
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let acks = std::mem::take(&mut *acks.lock().expect("acks"));
    let mut arrived: HashMap<String, Instant> = HashMap::new();
    let wait_until = Instant::now() + Duration::from_secs(60);
    while acks.keys().any(|k| !arrived.contains_key(k)) && Instant::now() < wait_until {
        match tokio::time::timeout(Duration::from_secs(1), seen.recv()).await {
            Ok(Some((key, at))) => {
                arrived.entry(key).or_insert(at);
            }
            Ok(None) => break,
            Err(_) => {}
        }
    }
    let mut lags: Vec<f64> = acks
        .iter()
        .filter_map(|(key, acked)| {
            let at = arrived.get(key)?;
            Some(at.saturating_duration_since(*acked).as_secs_f64() * 1000.0)
        })
        .collect();
    lags.sort_by(f64::total_cmp);
    let pick = |p: f64| {
        if lags.is_empty() {
            return 0.0;
        }
        lags[((lags.len() as f64 * p).ceil() as usize).clamp(1, lags.len()) - 1]
    };
    LagStats {
        system: system.into(),
        load: load.label(),
        writes: acks.len(),
        writes_per_second: acks.len() as f64 / elapsed,
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
        max_ms: pick(1.0),
        missing: acks.len() - lags.len(),
    }
}

/// Runs the lag measurements through a relay delaying each way by `delay`.
async fn rampart_lag(binary: &Path, delay: Duration, loads: &[Load], duration: Duration) -> Vec<LagStats> {
    let options = RegionsOptions {
        primary: "east".into(),
        regions: vec![RegionSpec::new("east", 3), RegionSpec::new("west", 3)],
        settings: Vec::new(),
        tls: false,
    };
    let regions = Regions::start(binary, options).await.expect("start the regions");
    regions.wait_for_leaders(Duration::from_secs(60)).await;
    regions.delay("east", "west", delay);
    let (tx, mut seen) = mpsc::unbounded_channel();
    // Watched on the standby's leader, which applies the link's writes first.
    let leader = regions.region("west").wait_for_leader(Duration::from_secs(60)).await;
    let standby = regions.region("west").client_of(leader);
    tokio::spawn(async move {
        let mut watch = standby.watch("lag/", None);
        while let Some(Ok(event)) = watch.next().await {
            if tx.send((event.key, Instant::now())).is_err() {
                return;
            }
        }
    });
    let driver = RampartDriver {
        client: Arc::new(regions.client("east")),
    };
    warm_up(&driver, &mut seen).await;
    let mut stats = Vec::new();
    for (i, load) in loads.iter().enumerate() {
        let prefix = format!("lag/{i}/");
        stats.push(lag_run("Rampart", driver.clone(), *load, duration, &prefix, &mut seen).await);
        eprintln!("  {:?}", stats.last());
    }
    stats
}

/// Writes until one write shows on the mirror: the link (or mirror) is running.
async fn warm_up<D: KvDriver>(driver: &D, seen: &mut mpsc::UnboundedReceiver<(String, Instant)>) {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut i = 0;
    while Instant::now() < deadline {
        i += 1;
        let key = format!("lag/warmup/{i}");
        let _ = driver.put(key.clone(), "w".into()).await;
        let until = Instant::now() + Duration::from_secs(2);
        while let Ok(Some((arrived, _))) = tokio::time::timeout_at(until.into(), seen.recv()).await {
            if arrived == key {
                // Drain what is left of the warm-up.
                while seen.try_recv().is_ok() {}
                return;
            }
        }
    }
    panic!("the mirror never showed a write");
}

/// etcd 3.4: two clusters, `etcdctl make-mirror` next to the destination, reading the
/// source through the delaying relays.
async fn etcd_lag(etcd: &Path, etcdctl: &Path, delay: Duration, loads: &[Load], duration: Duration) -> Vec<LagStats> {
    let source = EtcdCluster::start(etcd, 100, 1000).expect("start the source etcd");
    let dest = EtcdCluster::start(etcd, 100, 1000).expect("start the destination etcd");
    source.wait_leader().await;
    let (dest_leader, _) = dest.wait_leader().await;
    let mut relays = Vec::new();
    for node in &source.nodes {
        let relay = Relay::start(node.client).await.expect("relay");
        relay.set_mode(RelayMode::Delay(delay));
        relays.push(relay);
    }
    let through: Vec<String> = relays.iter().map(|r| r.addr().to_string()).collect();
    let mirror = MirrorProcess::start(etcdctl, &through.join(","), &dest.endpoints()[0]);
    let (tx, mut seen) = mpsc::unbounded_channel();
    // Watched on the destination's leader, where the mirror's writes commit first.
    let dest_endpoints = vec![format!("http://{}", dest.nodes[dest_leader].client)];
    tokio::spawn(async move {
        let mut client = etcd_client::Client::connect(dest_endpoints, None).await.expect("etcd watch");
        let options = etcd_client::WatchOptions::new().with_prefix();
        let mut stream = client.watch("lag/", Some(options)).await.expect("watch");
        while let Ok(Some(response)) = stream.message().await {
            let at = Instant::now();
            for event in response.events() {
                let Some(kv) = event.kv() else { continue };
                let key = kv.key_str().unwrap_or_default().to_string();
                if tx.send((key, at)).is_err() {
                    return;
                }
            }
        }
    });
    let driver = source.driver(source.endpoints()).await;
    warm_up(&driver, &mut seen).await;
    let mut stats = Vec::new();
    for (i, load) in loads.iter().enumerate() {
        let prefix = format!("lag/{i}/");
        stats.push(lag_run("etcd make-mirror", driver.clone(), *load, duration, &prefix, &mut seen).await);
        eprintln!("  {:?}", stats.last());
    }
    drop(mirror);
    stats
}

/// `etcdctl make-mirror`, stopped when dropped.
struct MirrorProcess(Child);

impl MirrorProcess {
    fn start(etcdctl: &Path, source: &str, dest: &str) -> MirrorProcess {
        let child = Command::new(etcdctl)
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", source, "make-mirror", "--prefix", "lag/", dest])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start etcdctl make-mirror");
        MirrorProcess(child)
    }
}

impl Drop for MirrorProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What follows the primary while its throughput is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Followers {
    None,
    /// Two plain readers of the region log (`curl`): the primary's own cost of serving two
    /// links, without two more processes applying on this machine.
    LinkReaders,
    /// Two one-node standby regions standing in for other machines: data dirs on tmpfs
    /// (not the primary's disk), lowest CPU priority.
    StandbysApart,
    /// Two one-node standby regions on the primary's disk and CPUs.
    StandbysShared,
}

/// The primary's put throughput with `followers`, one figure per round.
#[derive(Debug, Clone, Serialize)]
pub struct CostStats {
    pub followers: Followers,
    pub put: Vec<PutStats>,
}

async fn primary_cost(binary: &Path, followers: Followers, clients: &[usize], duration: Duration) -> CostStats {
    let standbys = matches!(followers, Followers::StandbysApart | Followers::StandbysShared);
    let mut specs = vec![RegionSpec::new("east", 3)];
    for name in ["west", "north"].iter().filter(|_| standbys) {
        let mut spec = RegionSpec::new(name, 1);
        if followers == Followers::StandbysApart {
            spec.data_root = Some(PathBuf::from("/dev/shm"));
        }
        specs.push(spec);
    }
    let options = RegionsOptions {
        primary: "east".into(),
        regions: specs,
        settings: Vec::new(),
        tls: false,
    };
    let regions = Regions::start(binary, options).await.expect("start the regions");
    regions.wait_for_leaders(Duration::from_secs(60)).await;
    if followers == Followers::StandbysApart {
        for name in ["west", "north"] {
            for node in regions.region(name).nodes.values() {
                let pid = node.pid().expect("pid");
                // SAFETY: setpriority(2) on a process this harness started.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, pid, 19) };
            }
        }
    }
    let mut readers = Vec::new();
    if followers == Followers::LinkReaders {
        for _ in 0..2 {
            let url = format!("http://{}/v1/regions/log?from_revision=1", regions.region("east").endpoints()[0]);
            let child = Command::new("curl")
                .args(["-sN", &url, "-o", "/dev/null"])
                .stdin(Stdio::null())
                .spawn()
                .expect("curl");
            readers.push(MirrorProcess(child));
        }
    }
    let client = Arc::new(regions.client("east"));
    let mut put = Vec::new();
    for &n in clients {
        let drivers = (0..n).map(|_| RampartDriver { client: client.clone() }).collect();
        put.push(put_load(drivers, duration, 100, &format!("c{n}")).await);
        eprintln!("  {followers:?}: {:?}", put.last());
    }
    CostStats { followers, put }
}

/// Each configuration `rounds` times, interleaved (the machine's drift hits all alike);
/// the median round of each, per client count.
async fn cost_rounds(binary: &Path, rounds: usize, clients: &[usize], duration: Duration) -> Vec<CostStats> {
    let configs = [
        Followers::None,
        Followers::LinkReaders,
        Followers::StandbysApart,
        Followers::StandbysShared,
    ];
    let mut runs: Vec<Vec<CostStats>> = vec![Vec::new(); configs.len()];
    for _ in 0..rounds {
        for (i, config) in configs.iter().enumerate() {
            runs[i].push(primary_cost(binary, *config, clients, duration).await);
        }
    }
    runs.into_iter()
        .zip(configs)
        .map(|(runs, followers)| {
            let put = (0..clients.len())
                .map(|c| {
                    let mut figures: Vec<PutStats> = runs.iter().map(|r| r.put[c].clone()).collect();
                    figures.sort_by(|a, b| a.puts_per_second.total_cmp(&b.puts_per_second));
                    figures[figures.len() / 2].clone()
                })
                .collect();
            CostStats { followers, put }
        })
        .collect()
}

/// A standby catching up `bytes` of state from nothing.
#[derive(Debug, Clone, Serialize)]
pub struct CatchUp {
    pub state_mib: u64,
    pub seconds: f64,
    /// The standby node's peak and final resident memory, MiB.
    pub peak_rss_mib: u64,
    pub final_rss_mib: u64,
    pub primary_rss_mib: u64,
}

async fn catch_up(binary: &Path, bytes: usize) -> CatchUp {
    let options = RegionsOptions {
        primary: "east".into(),
        regions: vec![RegionSpec::new("east", 1), RegionSpec::new("west", 1)],
        settings: Vec::new(),
        tls: false,
    };
    let regions = Regions::start(binary, options).await.expect("start the regions");
    regions.wait_for_leaders(Duration::from_secs(60)).await;
    // The standby starts empty and cut off; the primary is loaded.
    regions.cut("east", "west");
    let value_bytes = 64 << 10;
    let driver = RampartDriver {
        client: Arc::new(regions.client("east")),
    };
    load_keys(driver, bytes / value_bytes, value_bytes).await;
    let primary = regions.client("east").cluster().await.expect("status");
    let pid = regions.region("west").nodes[&1].pid().expect("the standby's pid");
    let started = Instant::now();
    regions.heal("east", "west");
    let standby = regions.client("west");
    rampart_testkit::eventually(Duration::from_secs(1800), "the standby to catch up", || async {
        let own = standby.cluster().await.ok()?;
        (own.revision >= primary.revision).then_some(())
    })
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let own = standby.cluster().await.expect("status");
    assert_eq!(own.checksum, primary.checksum, "the standby's state is the primary's");
    let peak = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    let primary_pid = regions.region("east").nodes[&1].pid().expect("pid");
    CatchUp {
        state_mib: (bytes >> 20) as u64,
        seconds,
        peak_rss_mib: peak / 1024,
        final_rss_mib: rss_kib(pid).unwrap_or(0) / 1024,
        primary_rss_mib: rss_kib(primary_pid).unwrap_or(0) / 1024,
    }
}

fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "n/a".into()
    } else {
        format!("{:.2}", a / b)
    }
}

pub async fn run(rampart: &Path, etcd: &Path, etcdctl: &Path, out: &Path, quick: bool) {
    let delay = Duration::from_millis(50);
    let duration = Duration::from_secs(if quick { 5 } else { 20 });
    let loads = [Load::Rate(1000), Load::Clients(64)];
    let only = std::env::var("RAMPART_BENCH_ONLY").unwrap_or_default();
    let clients = [16, 64];
    let cost_duration = Duration::from_secs(if quick { 3 } else { 10 });
    let rounds = if quick { 1 } else { 3 };
    if only == "cost" {
        let cost = cost_rounds(rampart, rounds, &clients, cost_duration).await;
        eprintln!("{cost:?}");
        return;
    }
    eprintln!("lag through a {delay:?} one-way delay: Rampart...");
    let rampart_lag = rampart_lag(rampart, delay, &loads, duration).await;
    if only == "rampart-lag" {
        return;
    }
    eprintln!("lag: etcd make-mirror...");
    let etcd_lag = etcd_lag(etcd, etcdctl, delay, &loads, duration).await;
    eprintln!("the primary's throughput with and without standbys...");
    let cost = cost_rounds(rampart, rounds, &clients, cost_duration).await;
    let state = if quick { 64 << 20 } else { 1 << 30 };
    eprintln!("a standby catching up {} MiB...", state >> 20);
    let catch = catch_up(rampart, state).await;

    let mut md = format!(
        "| lag, ack on the primary → visible on the mirror ({} ms one way) | writes/s | p50 ms | p99 ms | max ms | missing |\n|---|---|---|---|---|---|\n",
        delay.as_millis()
    );
    for s in rampart_lag.iter().chain(&etcd_lag) {
        md.push_str(&format!(
            "| {}, {} | {:.0} | {:.1} | {:.1} | {:.1} | {} |\n",
            s.system, s.load, s.writes_per_second, s.p50_ms, s.p99_ms, s.max_ms, s.missing
        ));
    }
    md.push_str("\n| load | Rampart p99 / make-mirror p99 |\n|---|---|\n");
    for (r, e) in rampart_lag.iter().zip(&etcd_lag) {
        md.push_str(&format!("| {} | **{:.4}** |\n", r.load, r.p99_ms / e.p99_ms));
    }
    md.push_str(&format!(
        "\n| clients | puts/s, nothing follows | 2 link readers | ratio | 2 standbys apart (tmpfs, nice 19) | ratio | 2 standbys, same disk and CPUs | ratio |\n|---|---|---|---|---|---|---|---|\n"
    ));
    for c in 0..clients.len() {
        let base = cost[0].put[c].puts_per_second;
        let mut row = format!("| {} | {:.0} |", clients[c], base);
        for config in &cost[1..] {
            let figure = config.put[c].puts_per_second;
            row.push_str(&format!(" {figure:.0} | **{}** |", ratio(figure, base)));
        }
        md.push_str(&row);
        md.push('\n');
    }
    md.push_str(&format!("\n(median of {rounds} interleaved rounds of {} s each)\n", cost_duration.as_secs()));
    md.push_str(&format!(
        "\n| a standby catching up | state | time | peak RSS | RSS after | peak over after | primary RSS |\n|---|---|---|---|---|---|---|\n| from nothing, link cut while loading | {} MiB | {:.1} s | {} MiB | {} MiB | {} MiB | {} MiB |\n",
        catch.state_mib,
        catch.seconds,
        catch.peak_rss_mib,
        catch.final_rss_mib,
        catch.peak_rss_mib.saturating_sub(catch.final_rss_mib),
        catch.primary_rss_mib,
    ));
    println!("{md}");
    let json = serde_json::json!({
        "lag": { "rampart": rampart_lag, "etcd_make_mirror": etcd_lag },
        "cost": cost,
        "catch_up": catch,
        "markdown": md,
    });
    std::fs::write(out, serde_json::to_string_pretty(&json).expect("json")).expect("write results");
}

/// Where `etcdctl` is, beside `etcd` or on the PATH.
pub fn etcdctl_beside(etcd: &Path) -> PathBuf {
    let beside = etcd.with_file_name("etcdctl");
    if beside.exists() {
        beside
    } else {
        PathBuf::from("etcdctl")
    }
}
