//! Benchmark machinery shared by `rampart bench` and the side-by-side harness in
//! `bench/loadgen`: the same load loop, latency accounting and failover clock drive every
//! system through a small [`KvDriver`], so Rampart and its anchors are measured alike.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rampart_client::{Client, PutOptions};
use serde::Serialize;

/// One system's put path.
pub trait KvDriver: Clone + Send + Sync + 'static {
    /// One attempt: Ok when the system acknowledged the write.
    fn put(&self, key: String, value: String) -> impl Future<Output = Result<(), String>> + Send;
}

/// Rampart through `rampart-client`.
#[derive(Clone)]
pub struct RampartDriver {
    pub client: Arc<Client>,
}

impl KvDriver for RampartDriver {
    async fn put(&self, key: String, value: String) -> Result<(), String> {
        self.client
            .put(&key, &value, PutOptions::default())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// Result of a put load.
#[derive(Debug, Clone, Serialize)]
pub struct PutStats {
    pub clients: usize,
    pub ops: u64,
    pub errors: u64,
    pub seconds: f64,
    pub puts_per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

fn percentile_ms(sorted_us: &[u32], p: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let index = ((sorted_us.len() as f64 * p).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    f64::from(sorted_us[index]) / 1000.0
}

/// Runs `drivers.len()` concurrent clients, each putting fresh keys of `value_bytes` bytes
/// back to back for `duration`.
pub async fn put_load<D: KvDriver>(drivers: Vec<D>, duration: Duration, value_bytes: usize, tag: &str) -> PutStats {
    let clients = drivers.len();
    let value = "x".repeat(value_bytes);
    let started = Instant::now();
    let deadline = started + duration;
    let tasks: Vec<_> = drivers
        .into_iter()
        .enumerate()
        .map(|(c, driver)| {
            let value = value.clone();
            let tag = tag.to_string();
            tokio::spawn(async move {
                let mut latencies_us = Vec::new();
                let mut errors = 0u64;
                let mut seq = 0u64;
                while Instant::now() < deadline {
                    seq += 1;
                    let sent = Instant::now();
                    match driver.put(format!("bench/{tag}/{c}/{seq}"), value.clone()).await {
                        Ok(()) => latencies_us.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32),
                        Err(_) => errors += 1,
                    }
                }
                (latencies_us, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for task in tasks {
        let (latencies, e) = task.await.expect("load client");
        all.extend(latencies);
        errors += e;
    }
    let seconds = started.elapsed().as_secs_f64();
    all.sort_unstable();
    PutStats {
        clients,
        ops: all.len() as u64,
        errors,
        seconds,
        puts_per_second: all.len() as f64 / seconds,
        p50_ms: percentile_ms(&all, 0.50),
        p99_ms: percentile_ms(&all, 0.99),
    }
}

/// Measures one failover as the surviving members serve it: one writer per driver (give
/// one pinned to each surviving member) puts back to back, each attempt bounded by
/// `attempt_timeout` and retried at once on failure; `kill` stops the leader; the answer
/// is the time from the kill to the first acknowledgement of a write sent after it.
/// Writers pinned to survivors keep a client library's choice of endpoint (a connection
/// stuck on the dead leader) out of the figure, for every system alike.
pub async fn failover_write_gap<D, K, KF>(drivers: Vec<D>, attempt_timeout: Duration, kill: K) -> Duration
where
    D: KvDriver,
    K: FnOnce() -> KF,
    KF: Future<Output = ()>,
{
    let stop = Arc::new(AtomicBool::new(false));
    let acks: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let writers: Vec<_> = drivers
        .into_iter()
        .enumerate()
        .map(|(w, driver)| {
            let (stop, acks) = (stop.clone(), acks.clone());
            tokio::spawn(async move {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let sent = Instant::now();
                    let key = format!("failover/{w}/{seq}");
                    let attempt = tokio::time::timeout(attempt_timeout, driver.put(key, "v".into()));
                    if let Ok(Ok(())) = attempt.await {
                        acks.lock().expect("acks").push((sent, Instant::now()));
                    } else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            })
        })
        .collect();
    crate::eventually(Duration::from_secs(30), "writes before the kill", || async {
        (acks.lock().expect("acks").len() >= 20).then_some(())
    })
    .await;
    let killed_at = Instant::now();
    kill().await;
    let first = crate::eventually(
        Duration::from_secs(60),
        "a write acknowledged after the kill",
        || async {
            acks.lock()
                .expect("acks")
                .iter()
                .filter(|(sent, _)| *sent >= killed_at)
                .map(|(_, acked)| *acked)
                .min()
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        let _ = writer.await;
    }
    first.duration_since(killed_at)
}

/// Failover writers pinned to each surviving member: their retries interleave, so the
/// clock resolves a recovery to about a quarter of [`FAILOVER_ATTEMPT_TIMEOUT`].
pub const FAILOVER_WRITERS_PER_MEMBER: usize = 4;
/// How long one failover write attempt may take before it is retried. Short, because some
/// systems (etcd) hold a proposal made without a leader until their own request timeout.
pub const FAILOVER_ATTEMPT_TIMEOUT: Duration = Duration::from_millis(100);

/// Resident memory of a process in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn median(values: &mut [Duration]) -> Duration {
    values.sort_unstable();
    if values.is_empty() {
        Duration::ZERO
    } else {
        values[values.len() / 2]
    }
}

/// What a whole benchmark run measures for one system.
#[derive(Debug, Clone, Serialize)]
pub struct SuiteReport {
    pub system: String,
    pub put: Vec<PutStats>,
    /// Write gap of each failover round, ms.
    pub failover_ms: Vec<u64>,
    pub failover_median_ms: u64,
    pub term_before_load: u64,
    pub term_after_load: u64,
    pub stability_seconds: u64,
    /// Resident memory of each node after loading `memory_keys` keys, KiB.
    pub memory_keys: usize,
    pub rss_kib: Vec<u64>,
}

/// Knobs of a benchmark run.
#[derive(Debug, Clone)]
pub struct SuiteOptions {
    pub clients: Vec<usize>,
    pub duration: Duration,
    pub value_bytes: usize,
    pub failover_rounds: usize,
    pub stability: Duration,
    pub memory_keys: usize,
    /// Extra node flags, e.g. heartbeat and election timeout.
    pub node_args: Vec<String>,
}

impl Default for SuiteOptions {
    fn default() -> Self {
        SuiteOptions {
            clients: vec![1, 16, 64],
            duration: Duration::from_secs(10),
            value_bytes: 100,
            failover_rounds: 5,
            stability: Duration::from_secs(30),
            memory_keys: 100_000,
            node_args: Vec::new(),
        }
    }
}

/// Loads `keys` keys of `value_bytes` with 64 concurrent writers.
pub async fn load_keys<D: KvDriver>(driver: D, keys: usize, value_bytes: usize) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let value = "m".repeat(value_bytes);
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (driver, next, value) = (driver.clone(), next.clone(), value.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= keys {
                        return;
                    }
                    // Retry until acknowledged (the count must be exact), within a budget.
                    let mut attempts = 0;
                    while driver.put(format!("mem/{i:08}"), value.clone()).await.is_err() {
                        attempts += 1;
                        assert!(attempts < 100, "key mem/{i:08} failed 100 times; is the system up?");
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("loader");
    }
}

/// Runs the full benchmark against a fresh 3-node Rampart region of `binary`.
pub async fn rampart_suite(binary: &std::path::Path, options: &SuiteOptions) -> std::io::Result<SuiteReport> {
    use crate::cluster::{Cluster, ClusterOptions};
    let cluster_options = ClusterOptions {
        nodes: 3,
        node_args: options.node_args.clone(),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(binary, cluster_options.clone()).await?;
    let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
    let leader_endpoint = cluster.nodes[&leader].endpoint();

    let mut put = Vec::new();
    for &clients in &options.clients {
        // One client object per load client: each gets its own connection pool.
        let drivers = (0..clients)
            .map(|_| RampartDriver {
                client: Arc::new(Client::new(&[&leader_endpoint]).expect("endpoint")),
            })
            .collect();
        put.push(put_load(drivers, options.duration, options.value_bytes, &format!("c{clients}")).await);
    }

    // Stability: the term must not move under sustained 64-client load.
    let term_before_load = cluster.status_of(leader).await.map_or(0, |s| s.term);
    let drivers = (0..64)
        .map(|_| RampartDriver {
            client: Arc::new(Client::new(&[&leader_endpoint]).expect("endpoint")),
        })
        .collect();
    put_load(drivers, options.stability, options.value_bytes, "stability").await;
    let term_after_load = cluster.status_of(leader).await.map_or(0, |s| s.term);

    // Memory: a fresh region holding exactly `memory_keys` keys, so the load rounds above
    // do not add theirs.
    drop(cluster);
    let cluster = Cluster::start(binary, cluster_options.clone()).await?;
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    load_keys(
        RampartDriver {
            client: Arc::new(cluster.client()),
        },
        options.memory_keys,
        100,
    )
    .await;
    cluster.wait_converged(Duration::from_secs(120)).await;
    let rss_kib = cluster
        .nodes
        .values()
        .filter_map(|n| n.pid().and_then(rss_kib))
        .collect();

    // Failover rounds on a fresh region, so the memory load does not colour them.
    drop(cluster);
    let mut cluster = Cluster::start(binary, cluster_options).await?;
    let mut gaps = Vec::new();
    for _ in 0..options.failover_rounds {
        let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
        let drivers = cluster
            .nodes
            .keys()
            .filter(|id| **id != leader)
            .flat_map(|id| std::iter::repeat_n(*id, FAILOVER_WRITERS_PER_MEMBER))
            .map(|id| RampartDriver {
                client: Arc::new(cluster.client_of(id).with_deadline(FAILOVER_ATTEMPT_TIMEOUT)),
            })
            .collect();
        let cluster_ref = &mut cluster;
        let gap = failover_write_gap(
            drivers,
            FAILOVER_ATTEMPT_TIMEOUT,
            || async move { cluster_ref.kill(leader) },
        )
        .await;
        gaps.push(gap);
        cluster.restart(leader)?;
        cluster.wait_converged(Duration::from_secs(60)).await;
    }
    let failover_ms: Vec<u64> = gaps.iter().map(|g| g.as_millis() as u64).collect();
    let failover_median_ms = median(&mut gaps).as_millis() as u64;
    Ok(SuiteReport {
        system: "rampart".into(),
        put,
        failover_ms,
        failover_median_ms,
        term_before_load,
        term_after_load,
        stability_seconds: options.stability.as_secs(),
        memory_keys: options.memory_keys,
        rss_kib,
    })
}

/// A Markdown table of one report.
pub fn report_markdown(report: &SuiteReport) -> String {
    let mut out = format!(
        "### {}\n\n| clients | puts/s | p50 ms | p99 ms | errors |\n|---|---|---|---|---|\n",
        report.system
    );
    for p in &report.put {
        out.push_str(&format!(
            "| {} | {:.0} | {:.2} | {:.2} | {} |\n",
            p.clients, p.puts_per_second, p.p50_ms, p.p99_ms, p.errors
        ));
    }
    out.push_str(&format!(
        "\nfailover write gap: median {} ms (rounds: {:?})\nterm through {} s of 64-client load: {} -> {}\nRSS with {} keys: {:?} MiB\n",
        report.failover_median_ms,
        report.failover_ms,
        report.stability_seconds,
        report.term_before_load,
        report.term_after_load,
        report.memory_keys,
        report.rss_kib.iter().map(|k| k / 1024).collect::<Vec<_>>()
    ));
    out
}

/// One client count of the security benchmark: the same put load on a plaintext region and
/// on a TLS region with tokens; each figure is its median over the rounds (ops, errors and
/// seconds are totals).
#[derive(Debug, Clone, Serialize)]
pub struct SecurityCost {
    pub clients: usize,
    pub plaintext: PutStats,
    pub tls: PutStats,
    /// TLS throughput over plaintext throughput (1.0 = free).
    pub throughput_ratio: f64,
    /// TLS p99 over plaintext p99 (1.0 = free).
    pub p99_ratio: f64,
}

/// Measures what TLS and tokens cost: a plaintext region and a TLS region run side by side
/// (idle but for their heartbeats when not measured), and each round puts to one, then the
/// other, alternating, so drift in the machine's disk speed hits both alike. Each load
/// client has its own connection, kept for the round, as a real client keeps its pool.
pub async fn security_cost(
    binary: &std::path::Path,
    clients: &[usize],
    duration: Duration,
    rounds: usize,
    node_args: &[String],
) -> std::io::Result<Vec<SecurityCost>> {
    use crate::cluster::{Cluster, ClusterOptions};
    let start = |tls| {
        Cluster::start(
            binary,
            ClusterOptions {
                nodes: 3,
                tls,
                node_args: node_args.to_vec(),
                ..ClusterOptions::default()
            },
        )
    };
    let plain = start(false).await?;
    let secure = start(true).await?;
    let mut regions = Vec::new();
    for cluster in [&plain, &secure] {
        let leader = cluster.wait_for_leader(Duration::from_secs(30)).await;
        let token = match cluster.tls_options() {
            Some(_) => Some(
                crate::eventually(Duration::from_secs(30), "the bootstrap token", || async {
                    cluster.admin_token()
                })
                .await,
            ),
            None => None,
        };
        regions.push((cluster, cluster.nodes[&leader].endpoint(), token));
    }
    let mut costs = Vec::new();
    for &count in clients {
        let mut runs: [Vec<PutStats>; 2] = [Vec::new(), Vec::new()];
        for round in 0..rounds.max(1) {
            for (which, (cluster, leader, token)) in regions.iter().enumerate() {
                let drivers = (0..count)
                    .map(|_| RampartDriver {
                        client: Arc::new(cluster.client_with_token(std::slice::from_ref(leader), token.as_deref())),
                    })
                    .collect();
                let tag = format!("sec{which}-c{count}-r{round}");
                runs[which].push(put_load(drivers, duration, 100, &tag).await);
            }
        }
        // Each figure's median over the rounds, taken on its own: one slow disk moment in a
        // round should not decide the p99 of the round picked for its throughput.
        let [plaintext, tls] = runs.map(|stats| {
            let median_of = |field: fn(&PutStats) -> f64| {
                let mut values: Vec<f64> = stats.iter().map(field).collect();
                values.sort_by(f64::total_cmp);
                values[values.len() / 2]
            };
            PutStats {
                clients: count,
                ops: stats.iter().map(|s| s.ops).sum(),
                errors: stats.iter().map(|s| s.errors).sum(),
                seconds: stats.iter().map(|s| s.seconds).sum(),
                puts_per_second: median_of(|s| s.puts_per_second),
                p50_ms: median_of(|s| s.p50_ms),
                p99_ms: median_of(|s| s.p99_ms),
            }
        });
        costs.push(SecurityCost {
            clients: count,
            throughput_ratio: tls.puts_per_second / plaintext.puts_per_second.max(f64::MIN_POSITIVE),
            p99_ratio: tls.p99_ms / plaintext.p99_ms.max(f64::MIN_POSITIVE),
            plaintext,
            tls,
        });
    }
    Ok(costs)
}

/// A Markdown table of the security benchmark.
pub fn security_markdown(costs: &[SecurityCost]) -> String {
    let mut out = String::from(
        "| clients | plaintext puts/s | TLS+tokens puts/s | throughput ratio | plaintext p99 ms | TLS+tokens p99 ms | p99 ratio |\n|---|---|---|---|---|---|---|\n",
    );
    for c in costs {
        out.push_str(&format!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            c.clients,
            c.plaintext.puts_per_second,
            c.tls.puts_per_second,
            c.throughput_ratio,
            c.plaintext.p99_ms,
            c.tls.p99_ms,
            c.p99_ratio
        ));
    }
    out
}
