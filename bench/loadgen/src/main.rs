//! Measures etcd and Rampart side by side on this machine: 3 nodes each on loopback, fsync
//! on, the same load loop and failover clock (`rampart_testkit::bench`) for both, each
//! system through its own native client. Prints a Markdown report with ratios and writes
//! the raw figures as JSON.
//!
//! Usage: rampart-loadgen RAMPART_BIN ETCD_BIN OUT_JSON [quick]
//!        rampart-loadgen regions RAMPART_BIN ETCD_BIN OUT_JSON [quick]   (see `regions`)
//!        rampart-loadgen region-failover RAMPART_BIN OUT_JSON [quick|failback]    (see `failover`)

mod failover;
mod regions;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rampart_testkit::bench::{
    failover_write_gap, load_keys, FAILOVER_ATTEMPT_TIMEOUT, FAILOVER_WRITERS_PER_MEMBER, median, put_load, rampart_suite, report_markdown, rss_kib, KvDriver, PutStats,
    SuiteOptions, SuiteReport,
};
use rampart_testkit::cluster::free_port;

/// etcd through its gRPC client.
#[derive(Clone)]
struct EtcdDriver {
    kv: etcd_client::KvClient,
}

impl KvDriver for EtcdDriver {
    async fn put(&self, key: String, value: String) -> Result<(), String> {
        let mut kv = self.kv.clone();
        kv.put(key, value, None).await.map(|_| ()).map_err(|e| e.to_string())
    }
}

struct EtcdNode {
    client: SocketAddr,
    args: Vec<String>,
    child: Option<Child>,
}

/// A 3-member etcd cluster of child processes.
struct EtcdCluster {
    binary: PathBuf,
    _dir: tempfile::TempDir,
    nodes: Vec<EtcdNode>,
}

impl EtcdCluster {
    fn start(binary: &Path, heartbeat_ms: u64, election_ms: u64) -> std::io::Result<EtcdCluster> {
        let dir = tempfile::tempdir()?;
        let members: Vec<(String, SocketAddr, SocketAddr)> =
            (1..=3).map(|i| Ok((format!("e{i}"), free_port()?, free_port()?))).collect::<std::io::Result<_>>()?;
        let initial: Vec<String> = members.iter().map(|(n, _, p)| format!("{n}=http://{p}")).collect();
        let mut cluster = EtcdCluster { binary: binary.to_path_buf(), _dir: dir, nodes: Vec::new() };
        for (name, client, peer) in members {
            let data = cluster._dir.path().join(&name);
            let args = vec![
                format!("--name={name}"),
                format!("--data-dir={}", data.display()),
                format!("--listen-client-urls=http://{client}"),
                format!("--advertise-client-urls=http://{client}"),
                format!("--listen-peer-urls=http://{peer}"),
                format!("--initial-advertise-peer-urls=http://{peer}"),
                format!("--initial-cluster={}", initial.join(",")),
                "--initial-cluster-state=new".into(),
                format!("--heartbeat-interval={heartbeat_ms}"),
                format!("--election-timeout={election_ms}"),
                "--log-level=error".into(),
            ];
            let mut node = EtcdNode { client, args, child: None };
            node.child = Some(cluster.launch(&node)?);
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    fn launch(&self, node: &EtcdNode) -> std::io::Result<Child> {
        Command::new(&self.binary).args(&node.args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()
    }

    fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("http://{}", n.client)).collect()
    }

    /// (index of the leader, raft term), as the members report it.
    async fn leader(&self) -> Option<(usize, u64)> {
        for node in self.nodes.iter().filter(|n| n.child.is_some()) {
            let Ok(Ok(mut client)) = tokio::time::timeout(
                Duration::from_millis(500),
                etcd_client::Client::connect([format!("http://{}", node.client)], None),
            )
            .await
            else {
                continue;
            };
            let Ok(Ok(status)) = tokio::time::timeout(Duration::from_millis(500), client.status()).await else {
                continue;
            };
            let leader_id = status.leader();
            for (index, other) in self.nodes.iter().enumerate().filter(|(_, n)| n.child.is_some()) {
                let mut c = etcd_client::Client::connect([format!("http://{}", other.client)], None).await.ok()?;
                let s = c.status().await.ok()?;
                if s.header().map(|h| h.member_id()) == Some(leader_id) && leader_id != 0 {
                    return Some((index, s.raft_term()));
                }
            }
        }
        None
    }

    async fn wait_leader(&self) -> (usize, u64) {
        rampart_testkit::eventually(Duration::from_secs(60), "an etcd leader", || self.leader()).await
    }

    fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].child.take() {
            // SAFETY: kill(2) on a child this process spawned and has not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
        }
    }

    fn restart(&mut self, index: usize) -> std::io::Result<()> {
        let child = self.launch(&self.nodes[index])?;
        self.nodes[index].child = Some(child);
        Ok(())
    }

    async fn driver(&self, endpoints: Vec<String>) -> EtcdDriver {
        let client = rampart_testkit::eventually(Duration::from_secs(30), "an etcd connection", || {
            let endpoints = endpoints.clone();
            async move { etcd_client::Client::connect(endpoints, None).await.ok() }
        })
        .await;
        EtcdDriver { kv: client.kv_client() }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}

async fn etcd_suite(binary: &Path, options: &SuiteOptions, heartbeat_ms: u64, election_ms: u64, failover_only: bool) -> SuiteReport {
    let mut report = SuiteReport {
        system: format!("etcd {heartbeat_ms}ms/{election_ms}ms"),
        put: Vec::new(),
        failover_ms: Vec::new(),
        failover_median_ms: 0,
        term_before_load: 0,
        term_after_load: 0,
        stability_seconds: options.stability.as_secs(),
        memory_keys: options.memory_keys,
        rss_kib: Vec::new(),
    };
    if !failover_only {
        let cluster = EtcdCluster::start(binary, heartbeat_ms, election_ms).expect("start etcd");
        let (leader, term) = cluster.wait_leader().await;
        let leader_endpoint = format!("http://{}", cluster.nodes[leader].client);
        for &clients in &options.clients {
            let mut drivers = Vec::new();
            for _ in 0..clients {
                drivers.push(cluster.driver(vec![leader_endpoint.clone()]).await);
            }
            report.put.push(put_load(drivers, options.duration, options.value_bytes, &format!("c{clients}")).await);
        }
        report.term_before_load = term;
        let mut drivers = Vec::new();
        for _ in 0..64 {
            drivers.push(cluster.driver(vec![leader_endpoint.clone()]).await);
        }
        put_load(drivers, options.stability, options.value_bytes, "stability").await;
        report.term_after_load = cluster.wait_leader().await.1;
        // Memory: a fresh cluster holding exactly `memory_keys` keys.
        drop(cluster);
        let cluster = EtcdCluster::start(binary, heartbeat_ms, election_ms).expect("start etcd");
        cluster.wait_leader().await;
        load_keys(cluster.driver(cluster.endpoints()).await, options.memory_keys, 100).await;
        report.rss_kib = cluster.nodes.iter().filter_map(|n| n.child.as_ref().and_then(|c| rss_kib(c.id()))).collect();
    }
    let mut cluster = EtcdCluster::start(binary, heartbeat_ms, election_ms).expect("start etcd");
    let mut gaps = Vec::new();
    for _ in 0..options.failover_rounds {
        let (leader, _) = cluster.wait_leader().await;
        let mut drivers = Vec::new();
        for (_, node) in cluster.nodes.iter().enumerate().filter(|(i, _)| *i != leader) {
            for _ in 0..FAILOVER_WRITERS_PER_MEMBER {
                drivers.push(cluster.driver(vec![format!("http://{}", node.client)]).await);
            }
        }
        let cluster_ref = &mut cluster;
        let gap = failover_write_gap(drivers, FAILOVER_ATTEMPT_TIMEOUT, || async move { cluster_ref.kill(leader) }).await;
        gaps.push(gap);
        cluster.restart(leader).expect("restart etcd member");
        // Let the restarted member catch up before the next round.
        rampart_testkit::eventually(Duration::from_secs(60), "all etcd members healthy", || async {
            for node in &cluster.nodes {
                let mut c = etcd_client::Client::connect([format!("http://{}", node.client)], None).await.ok()?;
                c.status().await.ok()?;
            }
            Some(())
        })
        .await;
    }
    report.failover_ms = gaps.iter().map(|g| g.as_millis() as u64).collect();
    report.failover_median_ms = median(&mut gaps).as_millis() as u64;
    report
}

fn ratio(a: f64, b: f64) -> String {
    if b == 0.0 {
        "n/a".into()
    } else {
        format!("{:.2}", a / b)
    }
}

fn put_row(clients: usize, r: &PutStats, e: &PutStats) -> String {
    format!(
        "| {clients} | {:.0} | {:.0} | **{}** | {:.2} | {:.2} | **{}** | {:.2} | {:.2} |\n",
        r.puts_per_second,
        e.puts_per_second,
        ratio(r.puts_per_second, e.puts_per_second),
        r.p99_ms,
        e.p99_ms,
        ratio(r.p99_ms, e.p99_ms),
        r.p50_ms,
        e.p50_ms,
    )
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).is_some_and(|a| a == "region-failover") && args.len() >= 4 {
        let (rampart, out) = (PathBuf::from(&args[2]), PathBuf::from(&args[3]));
        failover::run(&rampart, &out, args.get(4).map(String::as_str)).await;
        return;
    }
    if args.get(1).is_some_and(|a| a == "regions") && args.len() >= 5 {
        let (rampart, etcd, out) = (PathBuf::from(&args[2]), PathBuf::from(&args[3]), PathBuf::from(&args[4]));
        let quick = args.get(5).is_some_and(|a| a == "quick");
        regions::run(&rampart, &etcd, &regions::etcdctl_beside(&etcd), &out, quick).await;
        return;
    }
    if args.len() < 4 {
        eprintln!("usage: rampart-loadgen RAMPART_BIN ETCD_BIN OUT_JSON [quick]");
        std::process::exit(2);
    }
    let (rampart_bin, etcd_bin, out) = (PathBuf::from(&args[1]), PathBuf::from(&args[2]), PathBuf::from(&args[3]));
    let quick = args.get(4).is_some_and(|a| a == "quick");
    let options = if quick {
        SuiteOptions {
            duration: Duration::from_secs(3),
            failover_rounds: 3,
            stability: Duration::from_secs(5),
            memory_keys: 10_000,
            ..SuiteOptions::default()
        }
    } else {
        SuiteOptions::default()
    };

    eprintln!("rampart at its defaults (50ms/250ms)...");
    let rampart = rampart_suite(&rampart_bin, &options).await.expect("rampart suite");
    eprintln!("etcd at its defaults (100ms/1000ms)...");
    let etcd = etcd_suite(&etcd_bin, &options, 100, 1000, false).await;
    eprintln!("etcd at 50ms/250ms (failover only)...");
    let etcd_tuned = etcd_suite(&etcd_bin, &options, 50, 250, true).await;

    let mut md = String::from("| clients | Rampart puts/s | etcd puts/s | ratio | Rampart p99 ms | etcd p99 ms | ratio | Rampart p50 ms | etcd p50 ms |\n|---|---|---|---|---|---|---|---|---|\n");
    for (r, e) in rampart.put.iter().zip(&etcd.put) {
        md.push_str(&put_row(r.clients, r, e));
    }
    md.push_str(&format!(
        "\n| failover (kill leader → first acknowledged write), median | Rampart | etcd | ratio |\n|---|---|---|---|\n| each at its defaults | {} ms | {} ms | **{}** |\n| both at 50 ms / 250 ms | {} ms | {} ms | **{}** |\n",
        rampart.failover_median_ms,
        etcd.failover_median_ms,
        ratio(rampart.failover_median_ms as f64, etcd.failover_median_ms as f64),
        rampart.failover_median_ms,
        etcd_tuned.failover_median_ms,
        ratio(rampart.failover_median_ms as f64, etcd_tuned.failover_median_ms as f64),
    ));
    let max_rss = |r: &SuiteReport| r.rss_kib.iter().max().copied().unwrap_or(0) as f64 / 1024.0;
    md.push_str(&format!(
        "\n| {} s of 64-client load | Rampart | etcd |\n|---|---|---|\n| Raft term before → after | {} → {} | {} → {} |\n\n| resident memory per node, {} keys of 100 B | Rampart | etcd | ratio |\n|---|---|---|---|\n| largest node | {:.0} MiB | {:.0} MiB | **{}** |\n",
        rampart.stability_seconds,
        rampart.term_before_load,
        rampart.term_after_load,
        etcd.term_before_load,
        etcd.term_after_load,
        rampart.memory_keys,
        max_rss(&rampart),
        max_rss(&etcd),
        ratio(max_rss(&rampart), max_rss(&etcd)),
    ));
    md.push_str(&format!(
        "\nfailover rounds (ms): Rampart {:?}; etcd defaults {:?}; etcd 50/250 {:?}\n",
        rampart.failover_ms, etcd.failover_ms, etcd_tuned.failover_ms
    ));
    println!("{md}");
    for report in [&rampart, &etcd, &etcd_tuned] {
        eprintln!("{}", report_markdown(report));
    }
    let json = serde_json::json!({ "rampart": rampart, "etcd_defaults": etcd, "etcd_50_250": etcd_tuned, "markdown": md });
    std::fs::write(&out, serde_json::to_string_pretty(&json).expect("json")).expect("write results");
}
