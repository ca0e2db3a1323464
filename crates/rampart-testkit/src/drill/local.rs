//! A drill's own topology (`rampart drill run --local`): regions of `rampart node`
//! processes on loopback whose links all pass through relays. Unlike [`crate::Cluster`],
//! nothing here dies with the drill process: the nodes run in process groups of their own
//! and the relays in a process of their own (`rampart drill relays`), and everything needed
//! to find, signal, restart or heal them is written to `topology.json` in the drill's
//! directory. So a drill killed half-way leaves a topology that `rampart drill cleanup`
//! can put right and stop.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rampart_client::Client;
use rampart_core::api::ClusterStatus;
use serde::{Deserialize, Serialize};

use super::postgres::{self, PgInstance, PgRecord, PG_SERVICE};
use super::service::{self, InstanceRecord, ServiceRecord, SERVICE};
use crate::cluster::{agreed_leader, converged, free_port};
use crate::relay::{Relay, RelayMode};

/// One region of a drill topology (`[[regions]]` in a topology file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionPlan {
    pub name: String,
    #[serde(default = "three")]
    pub nodes: usize,
    /// A witness region: one node, no data.
    #[serde(default)]
    pub witness: bool,
    /// Zone labels, given to the nodes in turn (`zone-loss` kills one zone's).
    #[serde(default)]
    pub zones: Vec<String>,
}

fn three() -> usize {
    3
}

/// What `--local` starts: the first region that is not a witness is the primary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyPlan {
    pub regions: Vec<RegionPlan>,
}

impl TopologyPlan {
    /// One region, `east`, of three nodes in zones a, b and c.
    pub fn one_region() -> TopologyPlan {
        TopologyPlan {
            regions: vec![RegionPlan {
                name: "east".into(),
                nodes: 3,
                witness: false,
                zones: vec!["a".into(), "b".into(), "c".into()],
            }],
        }
    }

    /// East (three nodes, zones a, b, c), a standby west of three, and a witness: what
    /// the region scenarios need.
    pub fn two_regions() -> TopologyPlan {
        let mut plan = TopologyPlan::one_region();
        plan.regions.push(RegionPlan {
            name: "west".into(),
            nodes: 3,
            witness: false,
            zones: Vec::new(),
        });
        plan.regions.push(RegionPlan {
            name: "witness".into(),
            nodes: 1,
            witness: true,
            zones: Vec::new(),
        });
        plan
    }

    /// Refuses a plan that cannot run, naming the field.
    pub fn check(&self) -> Result<(), String> {
        let data_regions = self.regions.iter().filter(|r| !r.witness).count();
        if data_regions == 0 {
            return Err("regions: at least one region that is not a witness is needed".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, region) in self.regions.iter().enumerate() {
            if region.name.is_empty() || !region.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                return Err(format!(
                    "regions[{i}].name: {:?} is not a region name (letters, digits, -)",
                    region.name
                ));
            }
            if !names.insert(&region.name) {
                return Err(format!("regions[{i}].name: {} appears twice", region.name));
            }
            if region.witness && region.nodes != 1 {
                return Err(format!("regions[{i}].nodes: a witness region has one node"));
            }
            if !(1..=7).contains(&region.nodes) {
                return Err(format!("regions[{i}].nodes: between 1 and 7, not {}", region.nodes));
            }
        }
        if data_regions > 1 && !self.regions.iter().any(|r| r.witness) {
            return Err("regions: several regions need a witness region to fail over by themselves".into());
        }
        Ok(())
    }

    /// The primary region's name.
    pub fn primary(&self) -> &str {
        &self.regions.iter().find(|r| !r.witness).expect("a checked plan").name
    }
}

/// One node of the topology.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    /// `REGION-ID`, e.g. `east-1`.
    pub name: String,
    pub region: String,
    pub id: u64,
    pub zone: Option<String>,
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    /// `rampart` arguments that start it.
    pub args: Vec<String>,
    /// Its process while it runs.
    pub pid: Option<u32>,
}

/// One relay: traffic from `from` (a node's name, or a region's for links between
/// regions) to node `to` enters at `listen`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayRecord {
    pub listen: SocketAddr,
    pub target: SocketAddr,
    pub from_region: String,
    /// The sending node, on a link inside a region.
    pub from_node: Option<String>,
    pub to: String,
    pub to_region: String,
}

/// A running drill topology, as `topology.json` keeps it.
#[derive(Debug, Serialize, Deserialize)]
pub struct LocalTopology {
    pub binary: PathBuf,
    pub dir: PathBuf,
    pub plan: TopologyPlan,
    pub nodes: Vec<NodeRecord>,
    pub relays: Vec<RelayRecord>,
    pub relays_pid: Option<u32>,
    /// Whether the data regions back up (to `backups/` with `backup.key`, both here).
    #[serde(default)]
    pub backups: bool,
    /// The drill's sample service, once started.
    #[serde(default)]
    pub service: Option<ServiceRecord>,
    /// The drill's PostgreSQL, once started.
    #[serde(default)]
    pub postgres: Option<PgRecord>,
    /// The proxy in front of them.
    #[serde(default)]
    pub proxy: Option<ProxyRecord>,
    /// Set once everything was stopped.
    pub stopped: bool,
    /// Processes this process started, to reap them.
    #[serde(skip)]
    children: BTreeMap<u32, Child>,
}

const TOPOLOGY_FILE: &str = "topology.json";
const LINKS_FILE: &str = "links.json";

impl LocalTopology {
    /// Starts `plan` under `dir` (which it creates), relays first, then every node.
    /// With `backups`, every data region's nodes get a `[backup]` table: a local
    /// destination under `dir` and a fresh key.
    pub fn start(binary: &Path, plan: &TopologyPlan, dir: &Path, backups: bool) -> std::io::Result<LocalTopology> {
        plan.check().map_err(std::io::Error::other)?;
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let mut nodes = Vec::new();
        for region in &plan.regions {
            for id in 1..=region.nodes as u64 {
                let name = format!("{}-{id}", region.name);
                nodes.push(NodeRecord {
                    data_dir: dir.join(&name),
                    name,
                    region: region.name.clone(),
                    id,
                    zone: (!region.zones.is_empty())
                        .then(|| region.zones[(id as usize - 1) % region.zones.len()].clone()),
                    addr: free_port()?,
                    args: Vec::new(),
                    pid: None,
                });
            }
        }
        let relays = relay_records(&nodes)?;
        let mut topology = LocalTopology {
            binary: binary.to_path_buf(),
            dir,
            plan: plan.clone(),
            nodes,
            relays,
            relays_pid: None,
            backups,
            service: None,
            postgres: None,
            proxy: None,
            stopped: false,
            children: BTreeMap::new(),
        };
        topology.write_links(&vec![RelayMode::Pass; topology.relays.len()])?;
        for index in 0..topology.nodes.len() {
            topology.nodes[index].args = topology.node_args(index)?;
        }
        topology.save()?;
        let log = topology.dir.join("relays.log");
        let args = vec![
            "drill".to_string(),
            "relays".to_string(),
            topology.dir.display().to_string(),
        ];
        let pid = topology.spawn(&args, &log)?;
        topology.relays_pid = Some(pid);
        topology.save()?;
        let names: Vec<String> = topology.nodes.iter().map(|n| n.name.clone()).collect();
        for name in names {
            topology.start_node(&name)?;
        }
        Ok(topology)
    }

    /// The topology a drill left in `dir`.
    pub fn load(dir: &Path) -> std::io::Result<LocalTopology> {
        let text = std::fs::read(dir.join(TOPOLOGY_FILE))?;
        serde_json::from_slice(&text).map_err(std::io::Error::other)
    }

    fn save(&self) -> std::io::Result<()> {
        write_atomically(
            &self.dir.join(TOPOLOGY_FILE),
            &serde_json::to_vec_pretty(self).expect("a topology encodes"),
        )
    }

    fn node_args(&self, index: usize) -> std::io::Result<Vec<String>> {
        let node = &self.nodes[index];
        let region = self
            .plan
            .regions
            .iter()
            .find(|r| r.name == node.region)
            .expect("its region");
        let mut args = vec![
            "node".to_string(),
            "--id".into(),
            node.id.to_string(),
            "--listen".into(),
            node.addr.to_string(),
            "--data-dir".into(),
            node.data_dir.display().to_string(),
            "--region".into(),
            node.region.clone(),
        ];
        if region.witness {
            args.push("--witness".into());
        } else {
            let initial: Vec<String> = self
                .region_nodes(&node.region)
                .map(|n| format!("{}={}", n.id, n.addr))
                .collect();
            args.extend(["--initial-cluster".into(), initial.join(",")]);
            let via: Vec<String> = self
                .relays
                .iter()
                .filter(|r| r.from_node.as_deref() == Some(node.name.as_str()))
                .map(|r| format!("{}={}", self.node(&r.to).id, r.listen))
                .collect();
            if !via.is_empty() {
                args.extend(["--peer-via".into(), via.join(",")]);
            }
        }
        let mut config_text = String::new();
        if self.backups && !region.witness {
            config_text.push_str(&self.backup_table()?);
        }
        if self.plan.regions.len() > 1 {
            config_text.push_str(&self.regions_table(&node.region));
        }
        if !config_text.is_empty() {
            let config = self.config_path(&node.region);
            std::fs::write(&config, config_text)?;
            args.extend(["--config".into(), config.display().to_string()]);
        }
        Ok(args)
    }

    /// The config file of `region`'s nodes.
    pub fn config_path(&self, region: &str) -> PathBuf {
        self.dir.join(format!("{region}.toml"))
    }

    /// `[backup]`: a local destination and a key, made on first use.
    fn backup_table(&self) -> std::io::Result<String> {
        let key = self.dir.join("backup.key");
        if !key.exists() {
            let mut bytes = [0u8; 32];
            std::io::Read::read_exact(&mut File::open("/dev/urandom")?, &mut bytes)?;
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            std::fs::write(&key, hex)?;
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        }
        Ok(format!(
            "[backup]\ndestination = \"file://{}\"\nkey_file = \"{}\"\n",
            self.dir.join("backups").display(),
            key.display()
        ))
    }

    /// `[regions]` for a node of `own`: the others reached through `own`'s relays.
    fn regions_table(&self, own: &str) -> String {
        let mut text = format!(
            "[regions]\nprimary = \"{}\"\nhealth_check_interval = \"500ms\"\nregion_timeout = \"3s\"\nmax_lag = \"2s\"\n",
            self.plan.primary()
        );
        for region in self.plan.regions.iter().filter(|r| r.name != own) {
            let endpoints: Vec<String> = self
                .relays
                .iter()
                .filter(|r| r.from_node.is_none() && r.from_region == own && r.to_region == region.name)
                .map(|r| format!("\"{}\"", r.listen))
                .collect();
            text.push_str(&format!(
                "[regions.known.{}]\nendpoints = [{}]\nwitness = {}\n",
                region.name,
                endpoints.join(", "),
                region.witness
            ));
        }
        text
    }

    /// Starts the drill's services: `kv`, the sample service (an instance on each node of
    /// the primary region), and `pg`, PostgreSQL (the same), then the proxy with a listener
    /// following each one's primary; returns once each has a primary and every instance is
    /// up (and PostgreSQL has the canary's table).
    pub async fn start_services(&mut self, kv: bool, pg: bool) -> Result<(), String> {
        let primary = self.plan.primary().to_string();
        let client = self.region_client(&primary);
        let endpoints = self.endpoints(&primary).join(",");
        let nodes: Vec<NodeRecord> = self.region_nodes(&primary).cloned().collect();
        let mut listeners = String::new();
        if kv {
            client
                .service_put(SERVICE, &service::policy())
                .await
                .map_err(|e| format!("cannot register service {SERVICE}: {e}"))?;
            let mut instances = Vec::new();
            for node in &nodes {
                instances.push(InstanceRecord {
                    id: format!("s-{}", node.id),
                    node: node.name.clone(),
                    node_id: node.id,
                    addr: free_port().map_err(|e| e.to_string())?,
                    zone: node.zone.clone(),
                    generation: 0,
                });
            }
            for instance in &instances {
                service::register(&client, &self.binary, &endpoints, instance).await?;
            }
            let proxy = free_port().map_err(|e| e.to_string())?;
            listeners.push_str(&format!(
                "[[proxy.listeners]]\nname = \"{SERVICE}\"\nbind = \"{proxy}\"\nmode = \"http\"\nservice = \"{SERVICE}\"\nroute = \"primary\"\n"
            ));
            self.service = Some(ServiceRecord { instances, proxy });
        }
        if pg {
            let dir = PgRecord::make_dir().map_err(|e| format!("cannot make PostgreSQL's directory: {e}"))?;
            let mut instances = Vec::new();
            for node in &nodes {
                instances.push(PgInstance {
                    id: format!("pg-{}", node.id),
                    node_id: node.id,
                    port: free_port().map_err(|e| e.to_string())?.port(),
                });
            }
            let record = PgRecord {
                dir,
                instances,
                proxy: free_port().map_err(|e| e.to_string())?,
            };
            // Recorded first: a drill that fails from here on still removes the directory.
            self.postgres = Some(record.clone());
            self.save().map_err(|e| e.to_string())?;
            client
                .service_put(PG_SERVICE, &record.policy()?)
                .await
                .map_err(|e| format!("cannot register service {PG_SERVICE}: {e}"))?;
            for instance in &record.instances {
                let spec = rampart_core::service::InstanceSpec {
                    endpoint: format!("127.0.0.1:{}", instance.port),
                    node: Some(instance.node_id),
                    ..Default::default()
                };
                client
                    .instance_put(PG_SERVICE, &instance.id, &spec)
                    .await
                    .map_err(|e| format!("cannot register instance {} of {PG_SERVICE}: {e}", instance.id))?;
            }
            listeners.push_str(&format!(
                "[[proxy.listeners]]\nname = \"{PG_SERVICE}\"\nbind = \"{}\"\nmode = \"tcp\"\nservice = \"{PG_SERVICE}\"\nroute = \"primary\"\n",
                record.proxy
            ));
        }
        let config = self.dir.join("proxy.toml");
        std::fs::write(&config, listeners).map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        self.proxy = Some(ProxyRecord {
            args: vec![
                "--endpoints".into(),
                endpoints,
                "proxy".into(),
                "--config".into(),
                config.display().to_string(),
            ],
            pid: None,
            config,
        });
        self.start_proxy().map_err(|e| format!("cannot start the proxy: {e}"))?;
        if kv {
            // Every instance up, then the first made primary.
            let first = format!("s-{}", nodes[0].id);
            wait_serving(&client, SERVICE, Some(&first), Duration::from_secs(60)).await?;
        }
        if let Some(record) = &self.postgres {
            // initdb, then a base backup for each replica.
            wait_serving(&client, PG_SERVICE, None, Duration::from_secs(180)).await?;
            postgres::make_table(record.proxy, std::time::Instant::now() + Duration::from_secs(60)).await?;
        }
        Ok(())
    }

    /// Starts the proxy (again), unless it runs.
    pub fn start_proxy(&mut self) -> std::io::Result<()> {
        let Some(record) = self.proxy.clone() else {
            return Ok(());
        };
        if record.pid.is_some_and(|pid| is_ours(pid, &record.config)) {
            return Ok(());
        }
        let pid = self.spawn(&record.args, &self.dir.join("proxy.log"))?;
        if let Some(proxy) = self.proxy.as_mut() {
            proxy.pid = Some(pid);
        }
        self.save()
    }

    /// Starts instance `id` of the drill's service again (registered anew with the next
    /// generation: its node restarts it).
    pub async fn restart_instance(&mut self, id: &str) -> Result<(), String> {
        let primary = self.plan.primary().to_string();
        let endpoints = self.endpoints(&primary).join(",");
        let client = self.client();
        let binary = self.binary.clone();
        let Some(instance) = self
            .service
            .as_mut()
            .and_then(|s| s.instances.iter_mut().find(|i| i.id == id))
        else {
            return Err(format!("no instance {id} of {SERVICE}"));
        };
        instance.generation += 1;
        let instance = instance.clone();
        self.save().map_err(|e| e.to_string())?;
        service::register(&client, &binary, &endpoints, &instance).await
    }

    pub(crate) fn spawn(&mut self, args: &[String], log: &Path) -> std::io::Result<u32> {
        use std::os::unix::process::CommandExt;
        let log = File::options().create(true).append(true).open(log)?;
        // A session of its own: a Ctrl-C meant for the drill does not reach it (the drill
        // undoes its faults and stops it instead), and a drill that dies while it is
        // SIGSTOPped does not orphan its process group, which would have the kernel send it
        // SIGHUP (and end it) instead of leaving it paused for `drill cleanup`.
        let mut command = Command::new(&self.binary);
        command
            .args(args)
            .env_remove("RAMPART_ENDPOINTS")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // SAFETY: setsid(2) is async-signal-safe, and nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = command.spawn()?;
        let pid = child.id();
        self.children.insert(pid, child);
        Ok(pid)
    }

    pub fn node(&self, name: &str) -> &NodeRecord {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn node_mut(&mut self, name: &str) -> &mut NodeRecord {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn region_nodes<'a>(&'a self, region: &'a str) -> impl Iterator<Item = &'a NodeRecord> + 'a {
        self.nodes.iter().filter(move |n| n.region == region)
    }

    /// The regions that hold data, the primary first.
    pub fn data_regions(&self) -> Vec<String> {
        self.plan
            .regions
            .iter()
            .filter(|r| !r.witness)
            .map(|r| r.name.clone())
            .collect()
    }

    pub fn endpoints(&self, region: &str) -> Vec<String> {
        self.region_nodes(region).map(|n| n.addr.to_string()).collect()
    }

    /// A client over every data region's nodes, the primary's first: writes find the
    /// primary region among them.
    pub fn client(&self) -> Client {
        let endpoints: Vec<String> = self.data_regions().iter().flat_map(|r| self.endpoints(r)).collect();
        Client::new(&endpoints).expect("loopback endpoints are valid")
    }

    pub fn region_client(&self, region: &str) -> Client {
        Client::new(&self.endpoints(region)).expect("loopback endpoints are valid")
    }

    /// Starts node `name` (again) from its recorded command line.
    pub fn start_node(&mut self, name: &str) -> std::io::Result<()> {
        let node = self.node(name).clone();
        if node.pid.is_some_and(|pid| is_ours(pid, &node.data_dir)) {
            return Ok(());
        }
        std::fs::create_dir_all(&node.data_dir)?;
        let pid = self.spawn(&node.args, &node.data_dir.join("node.log"))?;
        self.node_mut(name).pid = Some(pid);
        self.save()
    }

    /// SIGKILLs node `name` (if it is still the process this topology started).
    pub fn kill_node(&mut self, name: &str) -> std::io::Result<()> {
        let node = self.node(name).clone();
        if let Some(pid) = node.pid {
            if is_ours(pid, &node.data_dir) {
                signal(pid, libc::SIGCONT);
                signal(pid, libc::SIGKILL);
            }
            if let Some(mut child) = self.children.remove(&pid) {
                let _ = child.wait();
            }
        }
        self.node_mut(name).pid = None;
        self.save()
    }

    /// SIGSTOPs node `name`; returns its PID for the undo.
    pub fn pause_node(&self, name: &str) -> Option<u32> {
        let node = self.node(name);
        let pid = node.pid.filter(|pid| is_ours(*pid, &node.data_dir))?;
        signal(pid, libc::SIGSTOP);
        Some(pid)
    }

    /// SIGCONTs `pid` if it is still node `name`'s process.
    pub fn resume_node(&self, name: &str, pid: u32) {
        let node = self.node(name);
        if node.pid == Some(pid) && is_ours(pid, &node.data_dir) {
            signal(pid, libc::SIGCONT);
        }
    }

    /// Whether node `name` runs (not killed, not exited).
    pub fn is_running(&self, name: &str) -> bool {
        let node = self.node(name);
        node.pid.is_some_and(|pid| is_ours(pid, &node.data_dir))
    }

    /// The relays that match `which`, by index.
    pub fn relays_where(&self, which: impl Fn(&RelayRecord) -> bool) -> Vec<usize> {
        (0..self.relays.len()).filter(|i| which(&self.relays[*i])).collect()
    }

    /// Sets what relays `indexes` do with traffic (the relay process reads the file).
    pub fn set_links(&self, indexes: &[usize], mode: RelayMode) -> std::io::Result<()> {
        let mut modes = self.read_links();
        for i in indexes {
            modes[*i] = mode;
        }
        self.write_links(&modes)
    }

    fn read_links(&self) -> Vec<RelayMode> {
        read_links(&self.dir).unwrap_or_else(|| vec![RelayMode::Pass; self.relays.len()])
    }

    fn write_links(&self, modes: &[RelayMode]) -> std::io::Result<()> {
        write_atomically(
            &self.dir.join(LINKS_FILE),
            &serde_json::to_vec(modes).expect("modes encode"),
        )
    }

    /// A node's own view of its region, if it answers within half a second.
    pub async fn status_of(&self, name: &str) -> Option<ClusterStatus> {
        let node = self.node(name);
        let client = Client::new(&[node.addr.to_string()])
            .ok()?
            .with_deadline(Duration::from_millis(500));
        client.cluster().await.ok()
    }

    async fn running_statuses(&self, region: &str) -> Option<Vec<(String, ClusterStatus)>> {
        let mut statuses = Vec::new();
        for node in self.region_nodes(region).filter(|n| self.is_running(&n.name)) {
            statuses.push((node.name.clone(), self.status_of(&node.name).await?));
        }
        Some(statuses)
    }

    /// The leader every running node of `region` agrees on (by name), when they do.
    pub async fn leader(&self, region: &str) -> Option<String> {
        let statuses = self.running_statuses(region).await?;
        let only: Vec<ClusterStatus> = statuses.into_iter().map(|(_, s)| s).collect();
        let id = agreed_leader(&only)?;
        let name = format!("{region}-{id}");
        self.is_running(&name).then_some(name)
    }

    /// Whether every running node of `region` has applied the same state.
    pub async fn converged(&self, region: &str) -> Option<(u64, String)> {
        let statuses = self.running_statuses(region).await?;
        let only: Vec<ClusterStatus> = statuses.into_iter().map(|(_, s)| s).collect();
        converged(&only)
    }

    /// Healthy: every node runs, every link passes, each data region has one agreed
    /// leader and has converged.
    pub async fn healthy(&self) -> Result<(), String> {
        if let Some(node) = self.nodes.iter().find(|n| !self.is_running(&n.name)) {
            return Err(format!("node {} is not running", node.name));
        }
        if let Some(i) = self.read_links().iter().position(|m| *m != RelayMode::Pass) {
            let relay = &self.relays[i];
            return Err(format!(
                "the link from {} to {} is not healed",
                relay.from_region, relay.to
            ));
        }
        for region in self.data_regions() {
            self.leader(&region)
                .await
                .ok_or_else(|| format!("region {region} has no agreed leader"))?;
            self.converged(&region)
                .await
                .ok_or_else(|| format!("region {region}'s nodes have not converged"))?;
        }
        if self.plan.regions.len() > 1 {
            let clients = self.data_regions().into_iter().map(|r| {
                let client = self.region_client(&r);
                (r, client)
            });
            super::target::agree_on_primary(clients.collect()).await?;
        }
        if let Some(record) = &self.proxy {
            if !record.pid.is_some_and(|pid| is_ours(pid, &record.config)) {
                return Err("the proxy is not running".into());
            }
        }
        let client = self.client().with_deadline(Duration::from_millis(500));
        if self.service.is_some() {
            service::serving(&client, SERVICE).await?;
        }
        if self.postgres.is_some() {
            service::serving(&client, PG_SERVICE).await?;
        }
        Ok(())
    }

    /// Polls [`LocalTopology::healthy`] until it holds or `timeout` passes.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let last = self.healthy().await;
            if last.is_ok() || tokio::time::Instant::now() >= deadline {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops every process (SIGKILL, after SIGCONT), the relays last.
    pub fn stop(&mut self) -> std::io::Result<()> {
        let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
        for name in names {
            self.kill_node(&name)?;
        }
        if let Some(record) = self.proxy.as_mut() {
            if let Some(pid) = record.pid.take() {
                if is_ours(pid, &record.config) {
                    signal(pid, libc::SIGKILL);
                }
                if let Some(mut child) = self.children.remove(&pid) {
                    let _ = child.wait();
                }
            }
        }
        if let Some(record) = &self.postgres {
            // PostgreSQL outlives a killed node: its postmasters go with the directory.
            for pid in processes_under(&record.dir) {
                signal(pid, libc::SIGKILL);
            }
            let _ = std::fs::remove_dir_all(&record.dir);
        }
        if let Some(pid) = self.relays_pid.take() {
            if is_ours(pid, &self.dir) {
                signal(pid, libc::SIGKILL);
            }
            if let Some(mut child) = self.children.remove(&pid) {
                let _ = child.wait();
            }
        }
        self.stopped = true;
        self.save()
    }
}

/// The proxy a drill's services sit behind.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyRecord {
    pub args: Vec<String>,
    pub pid: Option<u32>,
    /// Its config file: also how its process is recognised.
    pub config: PathBuf,
}

/// Waits until every instance of `name` is up and one is its primary; with `first`, asks
/// for a switchover to it once, when all are up and none is primary yet.
async fn wait_serving(client: &Client, name: &str, first: Option<&str>, within: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + within;
    let mut asked = first.is_none();
    loop {
        match service::serving(client, name).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(e) if !asked && e.ends_with("has no primary") => {
                asked = client.switchover(name, first.expect("asked above")).await.is_ok();
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// A relay for each ordered pair of nodes of a region, and for each node of another region
/// from each region.
fn relay_records(nodes: &[NodeRecord]) -> std::io::Result<Vec<RelayRecord>> {
    let mut relays = Vec::new();
    let regions: std::collections::BTreeSet<&str> = nodes.iter().map(|n| n.region.as_str()).collect();
    for to in nodes {
        for from in nodes.iter().filter(|f| f.region == to.region && f.name != to.name) {
            relays.push(RelayRecord {
                listen: free_port()?,
                target: to.addr,
                from_region: from.region.clone(),
                from_node: Some(from.name.clone()),
                to: to.name.clone(),
                to_region: to.region.clone(),
            });
        }
        for from in regions.iter().filter(|r| **r != to.region) {
            relays.push(RelayRecord {
                listen: free_port()?,
                target: to.addr,
                from_region: from.to_string(),
                from_node: None,
                to: to.name.clone(),
                to_region: to.region.clone(),
            });
        }
    }
    Ok(relays)
}

fn read_links(dir: &Path) -> Option<Vec<RelayMode>> {
    serde_json::from_slice(&std::fs::read(dir.join(LINKS_FILE)).ok()?).ok()
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, bytes)?;
    File::open(&temp)?.sync_all()?;
    std::fs::rename(&temp, path)
}

/// Whether `pid` is alive, not a zombie, and runs with `marker` (a data dir, a config
/// file, an address) as one of its arguments: a PID reused by another process is never signalled.
pub(crate) fn is_ours(pid: u32, marker: impl AsRef<std::ffi::OsStr>) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rsplit(')').next().and_then(|rest| rest.split_whitespace().next());
    if stat.is_empty() || state == Some("Z") {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let marker = marker.as_ref().as_encoded_bytes();
    cmdline.split(|b| *b == 0).any(|arg| arg == marker)
}

/// The processes with an argument under `dir` (a scratch region's data dirs), found in
/// `/proc`: the drill started them, and nothing else names that directory.
pub(crate) fn processes_under(dir: &Path) -> Vec<u32> {
    let prefix = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            cmdline.split(|b| *b == 0).any(|arg| arg.starts_with(prefix.as_bytes()))
        })
        .collect()
}

pub(crate) fn signal(pid: u32, signal: i32) {
    // SAFETY: kill(2) on a PID checked to be one of this topology's processes.
    unsafe {
        libc::kill(pid as i32, signal);
    }
}

/// `rampart drill relays DIR`: runs the relays of the topology in `DIR`, following the
/// modes in its `links.json`, until killed (or the directory goes).
pub async fn run_relays(dir: &Path) -> std::io::Result<()> {
    let topology = LocalTopology::load(dir)?;
    let mut relays = Vec::new();
    for record in &topology.relays {
        relays.push(Relay::start_on(record.listen, record.target).await?);
    }
    let mut applied: Option<Vec<RelayMode>> = None;
    loop {
        if !dir.join(TOPOLOGY_FILE).exists() {
            return Ok(());
        }
        if let Some(modes) = read_links(dir).filter(|m| m.len() == relays.len()) {
            if applied.as_ref() != Some(&modes) {
                for (relay, mode) in relays.iter().zip(&modes) {
                    if relay.mode() != *mode {
                        relay.set_mode(*mode);
                    }
                }
                applied = Some(modes);
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
