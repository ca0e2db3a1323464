//! A region of real `rampart node` processes on loopback.
//!
//! Each node gets an ephemeral port and a data dir under one temp dir. With relays on,
//! every ordered pair of nodes talks through its own [`Relay`] (via `--peer-via`), so a
//! test can cut any link in either direction. Dropping the cluster SIGKILLs every process
//! it started, and only those.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use rampart_client::Client;
use rampart_core::api::ClusterStatus;

use crate::relay::{Relay, RelayMode};

/// How to start a region.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: usize,
    /// Put a fault-injecting relay on every peer link.
    pub relays: bool,
    /// Extra `rampart node` flags for every node, e.g. `["--snapshot-logs", "100"]`.
    pub node_args: Vec<String>,
    /// Where data dirs go; a fresh temp dir when `None`.
    pub base_dir: Option<PathBuf>,
    /// Run with TLS and tokens: `rampart certs init` in `<base>/certs`, each node on its own
    /// certificate; clients use the cluster CA and the region's bootstrap admin token.
    pub tls: bool,
    /// Node addresses, node 1 first; free loopback ports when empty. A region restored
    /// from a backup must listen where its restore said.
    pub addresses: Vec<SocketAddr>,
    /// Environment variables for every node, e.g. S3 credentials.
    pub env: Vec<(String, String)>,
    /// A witness region: one `rampart node --witness`, no `--initial-cluster`.
    pub witness: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            nodes: 3,
            relays: false,
            node_args: Vec::new(),
            base_dir: None,
            tls: false,
            addresses: Vec::new(),
            env: Vec::new(),
            witness: false,
        }
    }
}

/// One node process.
pub struct NodeProcess {
    pub id: u64,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    paused: bool,
}

impl NodeProcess {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some() && !self.paused
    }

    pub fn endpoint(&self) -> String {
        self.addr.to_string()
    }
}

pub struct Cluster {
    binary: PathBuf,
    base_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
    pub nodes: BTreeMap<u64, NodeProcess>,
    /// Relay carrying traffic from the first node to the second.
    relays: BTreeMap<(u64, u64), Relay>,
    options: ClusterOptions,
    /// The bootstrap admin token, once a node has written it.
    admin_token: std::sync::OnceLock<String>,
}

/// Where node ports come from: below the kernel's ephemeral range, so no `bind(0)` (relays,
/// other tests' nodes) and no outgoing connection can take a port between the moment it is
/// picked here and the moment the node process binds it.
fn node_port_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    (10_000, ephemeral_low.max(10_000 + 1024))
}

/// Picks a free loopback port for a node. Ports are handed out in turn from a range of
/// their own (see [`node_port_range`]), starting at an offset drawn from the process id so
/// that two test processes rarely walk the same ports; a port that is busy is skipped.
pub fn free_port() -> std::io::Result<SocketAddr> {
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let (low, high) = node_port_range();
    let span = u32::from(high - low);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(2_654_435_761) % span,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..span.min(4096) {
        let port = low + (NEXT.fetch_add(1, Ordering::Relaxed) % span) as u16;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            return listener.local_addr();
        }
    }
    // Every candidate busy: fall back to the kernel's choice.
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Runs `binary certs init --dir DIR --nodes IDS`.
pub(crate) fn certs_init(binary: &Path, dir: &Path, ids: &str) -> std::io::Result<()> {
    let out = Command::new(binary)
        .args(["certs", "init", "--dir"])
        .arg(dir)
        .args(["--nodes", ids])
        .output()?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "certs init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// The leader every one of `statuses` names, if they all name the same one.
pub fn agreed_leader(statuses: &[ClusterStatus]) -> Option<u64> {
    let first = statuses.first()?.leader?;
    statuses.iter().all(|s| s.leader == Some(first)).then_some(first)
}

/// The revision and checksum every one of `statuses` has applied, if they all have the
/// same (shipped and local state both).
pub fn converged(statuses: &[ClusterStatus]) -> Option<(u64, String)> {
    let first = statuses.first()?;
    let same = |s: &ClusterStatus| {
        (s.revision, &s.checksum, s.local_revision, &s.local_checksum)
            == (
                first.revision,
                &first.checksum,
                first.local_revision,
                &first.local_checksum,
            )
    };
    statuses
        .iter()
        .all(same)
        .then(|| (first.revision, first.checksum.clone()))
}

fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a PID this process spawned and has not reaped yet.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

impl Cluster {
    /// Starts `options.nodes` nodes of `binary` (the `rampart` executable) as one region.
    pub async fn start(binary: impl AsRef<Path>, options: ClusterOptions) -> std::io::Result<Cluster> {
        let (temp, base_dir) = match &options.base_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                (None, dir.clone())
            }
            None => {
                let temp = tempfile::Builder::new().prefix("rampart-cluster-").tempdir()?;
                let path = temp.path().to_path_buf();
                (Some(temp), path)
            }
        };
        let mut addrs = BTreeMap::new();
        for id in 1..=options.nodes as u64 {
            let addr = match options.addresses.get(id as usize - 1) {
                Some(addr) => *addr,
                None => free_port()?,
            };
            addrs.insert(id, addr);
        }
        let mut cluster = Cluster {
            binary: binary.as_ref().to_path_buf(),
            base_dir,
            _temp: temp,
            nodes: BTreeMap::new(),
            relays: BTreeMap::new(),
            options: options.clone(),
            admin_token: std::sync::OnceLock::new(),
        };
        if options.tls {
            let ids: Vec<String> = addrs.keys().map(u64::to_string).collect();
            cluster.issue_certificates(&ids.join(","))?;
        }
        if options.relays {
            for from in addrs.keys() {
                for (to, to_addr) in &addrs {
                    if from != to {
                        cluster.relays.insert((*from, *to), Relay::start(*to_addr).await?);
                    }
                }
            }
        }
        let initial: Vec<String> = addrs.iter().map(|(id, addr)| format!("{id}={addr}")).collect();
        let initial = initial.join(",");
        for (id, addr) in &addrs {
            let mut args = if options.witness {
                vec!["--witness".to_string()]
            } else {
                vec!["--initial-cluster".to_string(), initial.clone()]
            };
            args.extend(cluster.peer_via_args(*id, addrs.keys().copied()));
            cluster.spawn(*id, *addr, args)?;
        }
        Ok(cluster)
    }

    fn peer_via_args(&self, id: u64, peers: impl Iterator<Item = u64>) -> Vec<String> {
        let via: Vec<String> = peers
            .filter(|p| *p != id)
            .filter_map(|p| self.relays.get(&(id, p)).map(|r| format!("{p}={}", r.addr())))
            .collect();
        if via.is_empty() {
            Vec::new()
        } else {
            vec!["--peer-via".to_string(), via.join(",")]
        }
    }

    fn spawn(&mut self, id: u64, addr: SocketAddr, extra: Vec<String>) -> std::io::Result<()> {
        let data_dir = self.base_dir.join(format!("n{id}"));
        std::fs::create_dir_all(&data_dir)?;
        let mut args = vec![
            "node".to_string(),
            "--id".to_string(),
            id.to_string(),
            "--listen".to_string(),
            addr.to_string(),
            "--data-dir".to_string(),
            data_dir.display().to_string(),
        ];
        args.extend(extra);
        if self.options.tls {
            let certs = self.certs_dir();
            for (flag, file) in [
                ("--tls-cert", format!("node-{id}.pem")),
                ("--tls-key", format!("node-{id}-key.pem")),
                ("--tls-ca", "ca.pem".to_string()),
            ] {
                args.push(flag.to_string());
                args.push(certs.join(file).display().to_string());
            }
        }
        args.extend(self.options.node_args.iter().cloned());
        let mut node = NodeProcess {
            id,
            addr,
            data_dir,
            args,
            child: None,
            paused: false,
        };
        node.child = Some(self.launch(&node)?);
        self.nodes.insert(id, node);
        Ok(())
    }

    fn launch(&self, node: &NodeProcess) -> std::io::Result<Child> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(node.data_dir.join("node.log"))?;
        Command::new(&self.binary)
            .args(&node.args)
            .env_remove("RAMPART_ENDPOINTS")
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
    }

    pub fn base_dir(&self) -> &Path {
        &self.base_dir
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.values().map(NodeProcess::endpoint).collect()
    }

    /// Where `certs init` wrote the region's certificates (TLS clusters).
    pub fn certs_dir(&self) -> PathBuf {
        self.base_dir.join("certs")
    }

    /// Runs `rampart certs init` for these node ids: creates the CA on the first call, and
    /// reissues node and client certificates from the same CA on later ones (rotation; a
    /// node picks up its new certificate when restarted).
    pub fn issue_certificates(&self, ids: &str) -> std::io::Result<()> {
        certs_init(&self.binary, &self.certs_dir(), ids)
    }

    /// The client's TLS settings on a TLS cluster.
    pub fn tls_options(&self) -> Option<rampart_client::TlsOptions> {
        self.options.tls.then(|| rampart_client::TlsOptions {
            ca: self.certs_dir().join("ca.pem"),
            cert: None,
            key: None,
        })
    }

    /// The region's bootstrap admin token, if a node has written it yet.
    pub fn admin_token(&self) -> Option<String> {
        if let Some(token) = self.admin_token.get() {
            return Some(token.clone());
        }
        let token = self.nodes.values().find_map(|n| {
            let text = std::fs::read_to_string(n.data_dir.join("admin.token")).ok()?;
            let text = text.trim();
            text.contains('.').then(|| text.to_string())
        })?;
        Some(self.admin_token.get_or_init(|| token).clone())
    }

    /// Uses `token` as this region's admin token: a standby region has none of its own (it
    /// takes the primary's tokens with its shipped state).
    pub fn adopt_admin_token(&self, token: String) {
        let _ = self.admin_token.set(token);
    }

    /// A client over `endpoints` with this region's TLS settings and `token`.
    pub fn client_with_token(&self, endpoints: &[String], token: Option<&str>) -> Client {
        Client::secured(endpoints, self.tls_options().as_ref(), token).expect("loopback endpoints are valid")
    }

    /// A client over every node (as the admin on a TLS cluster).
    pub fn client(&self) -> Client {
        self.client_with_token(&self.endpoints(), self.admin_token().as_deref())
    }

    /// A client that only talks to node `id` (as the admin on a TLS cluster).
    pub fn client_of(&self, id: u64) -> Client {
        self.client_with_token(&[self.nodes[&id].endpoint()], self.admin_token().as_deref())
    }

    /// Panics, with the tail of its log, if a node that should be running has exited: a
    /// wait for a condition it takes part in could only time out.
    pub fn assert_running(&self) {
        for node in self.nodes.values().filter(|n| n.child.is_some()) {
            let Some(pid) = node.pid() else { continue };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state follows the command name in parentheses; Z: exited, not yet reaped.
            let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next());
            if stat.is_empty() || state == Some("Z") {
                let log = std::fs::read_to_string(self.log_path(node.id)).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                panic!(
                    "node {} (pid {pid}) exited unexpectedly; last lines of its log:\n{tail}",
                    node.id
                );
            }
        }
    }

    /// A node's own view of the region, if it answers quickly.
    pub async fn status_of(&self, id: u64) -> Option<ClusterStatus> {
        // On TLS, no call before the admin token exists: each would count as a failed
        // authentication from this address, and enough of them lock it out.
        if self.options.tls && self.admin_token().is_none() {
            return None;
        }
        let client = self.client_of(id).with_deadline(Duration::from_millis(500));
        client.cluster().await.ok()
    }

    /// Waits until every running node agrees on one leader that is running; returns it.
    pub async fn wait_for_leader(&self, timeout: Duration) -> u64 {
        crate::eventually(timeout, "one leader agreed by every running node", || async {
            self.assert_running();
            let mut statuses = Vec::new();
            for node in self.nodes.values().filter(|n| n.is_running()) {
                statuses.push(self.status_of(node.id).await?);
            }
            let leader = agreed_leader(&statuses)?;
            self.nodes
                .get(&leader)
                .is_some_and(|n| n.is_running())
                .then_some(leader)
        })
        .await
    }

    /// Waits until every running node has applied the same revision with the same checksum,
    /// and returns them.
    pub async fn wait_converged(&self, timeout: Duration) -> (u64, String) {
        crate::eventually(
            timeout,
            "every running node at the same revisions and checksums (shipped and local)",
            || async {
                self.assert_running();
                let mut statuses = Vec::new();
                for node in self.nodes.values().filter(|n| n.is_running()) {
                    statuses.push(self.status_of(node.id).await?);
                }
                converged(&statuses)
            },
        )
        .await
    }

    /// SIGKILLs a node; its data dir stays for [`Cluster::restart`].
    pub fn kill(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("known node");
        if let Some(mut child) = node.child.take() {
            send_signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
        }
        node.paused = false;
    }

    /// SIGSTOPs a node: it stays alive but silent, like a long GC pause.
    pub fn pause(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("known node");
        if let Some(pid) = node.pid() {
            send_signal(pid, libc::SIGSTOP);
            node.paused = true;
        }
    }

    /// SIGCONTs a paused node.
    pub fn resume(&mut self, id: u64) {
        let node = self.nodes.get_mut(&id).expect("known node");
        if let Some(pid) = node.pid() {
            send_signal(pid, libc::SIGCONT);
            node.paused = false;
        }
    }

    /// Starts a killed node again on its data dir.
    pub fn restart(&mut self, id: u64) -> std::io::Result<()> {
        let child = {
            let node = &self.nodes[&id];
            assert!(node.child.is_none(), "node {id} is still running; kill it first");
            self.launch(node)?
        };
        self.nodes.get_mut(&id).expect("known node").child = Some(child);
        Ok(())
    }

    /// Starts a new node that joins with no `--initial-cluster` (add it with `members add`).
    pub fn start_joiner(&mut self) -> std::io::Result<u64> {
        assert!(!self.options.relays, "joining nodes are not wired through relays");
        let id = self.nodes.keys().max().copied().unwrap_or(0) + 1;
        self.spawn(id, free_port()?, Vec::new())?;
        Ok(id)
    }

    /// Forgets a stopped node (after it was removed from the region).
    pub fn forget(&mut self, id: u64) {
        self.kill(id);
        self.nodes.remove(&id);
    }

    /// Cuts node `id` off from every other node, both directions.
    pub fn isolate(&self, id: u64, mode: RelayMode) {
        assert!(self.options.relays, "start the cluster with relays to cut links");
        for ((from, to), relay) in &self.relays {
            if *from == id || *to == id {
                relay.set_mode(mode);
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        for relay in self.relays.values() {
            relay.set_mode(RelayMode::Pass);
        }
    }

    /// Starts a node that is *not* one of the region's: it claims membership of the region
    /// (every real member plus itself) and presents `tls` = (cert, key, CA) files. Used to
    /// show that a process without a node certificate of the cluster CA cannot get in.
    pub fn start_outsider(&self, id: u64, tls: [&Path; 3]) -> std::io::Result<Outsider> {
        let addr = free_port()?;
        let dir = self.base_dir.join(format!("outsider-{id}"));
        std::fs::create_dir_all(&dir)?;
        let mut members: Vec<String> = self.nodes.values().map(|n| format!("{}={}", n.id, n.addr)).collect();
        members.push(format!("{id}={addr}"));
        let log = File::options().create(true).append(true).open(dir.join("node.log"))?;
        let child = Command::new(&self.binary)
            .args(["node", "--id", &id.to_string(), "--listen", &addr.to_string()])
            .arg("--data-dir")
            .arg(&dir)
            .args(["--initial-cluster", &members.join(",")])
            .arg("--tls-cert")
            .arg(tls[0])
            .arg("--tls-key")
            .arg(tls[1])
            .arg("--tls-ca")
            .arg(tls[2])
            .env_remove("RAMPART_ENDPOINTS")
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        Ok(Outsider {
            child,
            addr,
            log: dir.join("node.log"),
        })
    }

    /// Panics if a secret shows up in any node's log or in the region's event log: the
    /// given token secrets, the bootstrap admin token, or any line of a private key in the
    /// certificates directory.
    pub async fn assert_no_secrets_leaked(&self, token_secrets: &[String]) {
        let mut secrets: Vec<String> = token_secrets.to_vec();
        if let Some(admin) = self.admin_token() {
            secrets.push(admin.split_once('.').map_or(admin.clone(), |(_, s)| s.to_string()));
        }
        if let Ok(dir) = std::fs::read_dir(self.certs_dir()) {
            for entry in dir.flatten() {
                if entry.file_name().to_string_lossy().ends_with("-key.pem") {
                    let pem = std::fs::read_to_string(entry.path()).unwrap_or_default();
                    secrets.extend(
                        pem.lines()
                            .filter(|l| !l.starts_with("-----") && l.len() >= 16)
                            .map(str::to_string),
                    );
                }
            }
        }
        let mut haystacks: Vec<(String, String)> = self
            .nodes
            .values()
            .map(|n| {
                let path = n.data_dir.join("node.log");
                (
                    path.display().to_string(),
                    std::fs::read_to_string(&path).unwrap_or_default(),
                )
            })
            .collect();
        let events = self.client().events(None, None).await.expect("read the event log");
        haystacks.push((
            "the event log".to_string(),
            serde_json::to_string(&events).expect("events encode"),
        ));
        for secret in secrets.iter().filter(|s| s.len() >= 16) {
            for (place, text) in &haystacks {
                assert!(!text.contains(secret.as_str()), "secret material found in {place}");
            }
        }
    }

    /// Path of a node's log file, for failure messages.
    pub fn log_path(&self, id: u64) -> PathBuf {
        self.nodes[&id].data_dir.join("node.log")
    }

    /// SIGKILLs every node (also done on drop).
    pub fn stop_all(&mut self) {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            self.resume(id);
            self.kill(id);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}

/// A node process outside the region, SIGKILLed on drop.
pub struct Outsider {
    child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Drop for Outsider {
    fn drop(&mut self) {
        send_signal(self.child.id(), libc::SIGKILL);
        let _ = self.child.wait();
    }
}
