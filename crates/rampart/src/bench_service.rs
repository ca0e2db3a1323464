//! `rampart bench --service-failover`: how long a service is without a writable primary
//! when its primary's process is SIGKILLed. Three sample-service instances supervised by a
//! local 3-node region, an `http` check on `/health`; each round kills the primary's
//! process and times until a write is accepted by another instance. Run at the checks'
//! defaults (1 s interval, fall 3) and tuned (200 ms, fall 2), as the issue asks.

use std::time::{Duration, Instant};

use rampart_client::Client;
use rampart_core::service::{InstanceSpec, PolicySpec};
use rampart_testkit::{eventually, Cluster, ClusterOptions};
use serde::Serialize;

use crate::outcome::Failure;

/// One check configuration's result.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceFailover {
    pub checks: String,
    pub rounds_ms: Vec<u64>,
    pub median_ms: u64,
}

use rampart_testkit::sample_fleet::{self, json};

async fn writable(http: &reqwest::Client, addr: &str) -> bool {
    http.put(format!("http://{addr}/kv/bench"))
        .body("x")
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// What each round kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Kill {
    /// The primary instance's process.
    Instance,
    /// The node hosting the primary (with it, the instance it supervises), as Patroni's
    /// figure is measured: SIGKILL of the primary's node.
    Node,
}

/// Measures `rounds` kills of the primary with checks every `interval`, `fall` failures.
pub async fn measure(
    binary: &std::path::Path,
    interval: &str,
    timeout: &str,
    fall: u32,
    rounds: usize,
    kill: Kill,
) -> Result<ServiceFailover, Failure> {
    let mut cluster = Cluster::start(binary, ClusterOptions::default())
        .await
        .map_err(Failure::message)?;
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    let client: Client = cluster.client();
    let policy: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "http", "path": "/health", "interval": interval, "timeout": timeout, "rise": 1, "fall": fall}],
        "flap_damping": {"max_losses": 0, "window": "1m"},
    }))
    .map_err(Failure::message)?;
    client.service_put("kv", &policy).await.map_err(Failure::message)?;
    let endpoints = cluster.endpoints().join(",");
    let mut addrs = Vec::new();
    for node in 1..=3u64 {
        let addr = rampart_testkit::cluster::free_port()
            .map_err(Failure::message)?
            .to_string();
        let id = format!("s-{node}");
        sample_fleet::register(
            &client,
            binary,
            &endpoints,
            "kv",
            &id,
            node,
            &addr,
            0,
            Default::default(),
        )
        .await
        .map_err(Failure::message)?;
        addrs.push(addr);
    }
    sample_fleet::wait_all_up(&client, "kv", Duration::from_secs(60)).await;
    client.switchover("kv", "s-1").await.map_err(Failure::message)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .map_err(Failure::message)?;
    let mut rounds_ms = Vec::new();
    for round in 1..=rounds {
        let view = client.service("kv").await.map_err(Failure::message)?;
        let primary = view.primary.ok_or_else(|| Failure::message("no primary"))?;
        let index: usize = primary
            .trim_start_matches("s-")
            .parse::<usize>()
            .map_err(Failure::message)?
            - 1;
        eventually(Duration::from_secs(30), "a writable primary", || async {
            writable(&http, &addrs[index]).await.then_some(())
        })
        .await;
        let pid = json(&http, &addrs[index], "/health")
            .await
            .and_then(|h| h["pid"].as_i64())
            .ok_or_else(|| Failure::message("cannot read the primary's pid"))? as i32;
        let killed = Instant::now();
        match kill {
            // SAFETY: the sample-service process this benchmark registered, run by its node.
            Kill::Instance => unsafe {
                libc::kill(pid, libc::SIGKILL);
            },
            // Its instance gets SIGTERM from the kernel as the node dies.
            Kill::Node => cluster.kill(index as u64 + 1),
        }
        eventually(Duration::from_secs(60), "a write on a new primary", || async {
            for (i, addr) in addrs.iter().enumerate() {
                if i != index && writable(&http, addr).await {
                    return Some(());
                }
            }
            None
        })
        .await;
        rounds_ms.push(killed.elapsed().as_millis() as u64);
        if kill == Kill::Node {
            // Back on its data dir, the node starts its instance again.
            cluster.restart(index as u64 + 1).map_err(Failure::message)?;
            sample_fleet::wait_all_up(&client, "kv", Duration::from_secs(60)).await;
            continue;
        }
        // Bring the killed instance back (a changed command restarts it) for the next round.
        sample_fleet::register(
            &client,
            binary,
            &endpoints,
            "kv",
            &primary,
            index as u64 + 1,
            &addrs[index],
            round,
            Default::default(),
        )
        .await
        .map_err(Failure::message)?;
        sample_fleet::wait_all_up(&client, "kv", Duration::from_secs(60)).await;
    }
    let mut sorted = rounds_ms.clone();
    sorted.sort_unstable();
    Ok(ServiceFailover {
        checks: format!(
            "http every {interval}, timeout {timeout}, fall {fall}; kill the {}",
            match kill {
                Kill::Instance => "instance",
                Kill::Node => "node",
            }
        ),
        median_ms: sorted[sorted.len() / 2],
        rounds_ms,
    })
}

pub fn markdown(results: &[ServiceFailover]) -> String {
    let mut out =
        String::from("| checks | median ms (kill -> first write on the new primary) | rounds ms |\n|---|---|---|\n");
    for r in results {
        out.push_str(&format!("| {} | {} | {:?} |\n", r.checks, r.median_ms, r.rounds_ms));
    }
    out
}

/// CPU of each node while checking `instances` instances.
#[derive(Debug, Clone, Serialize)]
pub struct CheckCost {
    pub instances: usize,
    pub seconds: u64,
    /// Per node, percent of one core, with the checks running.
    pub cpu_percent: Vec<f64>,
    /// Per node, percent of one core, idle region before any service was registered.
    pub idle_cpu_percent: Vec<f64>,
}

/// Clock ticks a process has used (user + system).
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit(')').next()?.split_whitespace().collect();
    // After the command name: state is field 3, utime 14 and stime 15 (1-based).
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

async fn cpu_over(cluster: &Cluster, seconds: u64) -> Vec<f64> {
    let pids: Vec<u32> = cluster.nodes.values().filter_map(|n| n.pid()).collect();
    let before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p).unwrap_or(0)).collect();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    pids.iter()
        .zip(before)
        .map(|(p, b)| (cpu_ticks(*p).unwrap_or(b) - b) as f64 / hz / seconds as f64 * 100.0)
        .collect()
}

/// Every node probes `instances` instances with 1 s HTTP checks; measures each node's CPU.
pub async fn check_cost(binary: &std::path::Path, instances: usize, seconds: u64) -> Result<CheckCost, Failure> {
    let cluster = Cluster::start(binary, ClusterOptions::default())
        .await
        .map_err(Failure::message)?;
    cluster.wait_for_leader(Duration::from_secs(30)).await;
    let idle_cpu_percent = cpu_over(&cluster, seconds).await;
    // One HTTP target for every instance: its own CPU is not what is measured.
    let addr = rampart_testkit::cluster::free_port()
        .map_err(Failure::message)?
        .to_string();
    let mut target = std::process::Command::new(binary)
        .args(["--endpoints", "127.0.0.1:1", "sample-service", "--listen", &addr])
        .args(["--service", "target", "--instance", "t"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(Failure::message)?;
    let client: Client = cluster.client();
    let policy: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "http", "path": "/health", "interval": "1s", "timeout": "500ms"}],
    }))
    .map_err(Failure::message)?;
    client.service_put("fleet", &policy).await.map_err(Failure::message)?;
    for i in 0..instances {
        let spec = InstanceSpec {
            endpoint: addr.clone(),
            ..InstanceSpec::default()
        };
        client
            .instance_put("fleet", &format!("i-{i}"), &spec)
            .await
            .map_err(Failure::message)?;
    }
    eventually(Duration::from_secs(120), "every instance up", || async {
        let view = client.service("fleet").await.ok()?;
        (view.instances.len() == instances
            && view
                .instances
                .iter()
                .all(|i| i.health == rampart_core::health::Health::Up))
        .then_some(())
    })
    .await;
    let cpu_percent = cpu_over(&cluster, seconds).await;
    let _ = target.kill();
    let _ = target.wait();
    Ok(CheckCost {
        instances,
        seconds,
        cpu_percent,
        idle_cpu_percent,
    })
}
