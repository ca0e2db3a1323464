//! Several regions of real `rampart node` processes, with a relay on every link between two
//! regions: each node of region A reaches region B's nodes through relays of A's own (one per
//! node of B), so a test can cut, blackhole or delay the traffic from A to B, and B to A,
//! apart from everything else. On TLS, every region's certificates come from one CA.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rampart_client::Client;

use crate::cluster::{free_port, Cluster, ClusterOptions};
use crate::relay::{Relay, RelayMode};

/// One region to start.
#[derive(Debug, Clone)]
pub struct RegionSpec {
    pub name: String,
    pub nodes: usize,
    /// Extra `rampart node` flags for this region's nodes.
    pub node_args: Vec<String>,
    /// A witness (`rampart node --witness`, one node).
    pub witness: bool,
    /// Where its data dirs go (a temp dir inside it), e.g. a tmpfs standing in for another
    /// machine's disk in a benchmark; with the other regions' when `None`.
    pub data_root: Option<std::path::PathBuf>,
}

impl RegionSpec {
    pub fn new(name: &str, nodes: usize) -> RegionSpec {
        RegionSpec {
            name: name.to_string(),
            nodes,
            node_args: Vec::new(),
            witness: false,
            data_root: None,
        }
    }

    /// A witness region of one node.
    pub fn witness(name: &str) -> RegionSpec {
        RegionSpec {
            witness: true,
            ..RegionSpec::new(name, 1)
        }
    }
}

/// How to start a set of regions.
#[derive(Debug, Clone)]
pub struct RegionsOptions {
    /// The region that takes writes first (`[regions] primary`).
    pub primary: String,
    pub regions: Vec<RegionSpec>,
    /// More lines under `[regions]` for every node, e.g. `region_timeout = "500ms"`.
    pub settings: Vec<String>,
    pub tls: bool,
}

/// Running regions; dropping them stops every process they started.
pub struct Regions {
    _temp: tempfile::TempDir,
    /// Temp dirs of the regions with a `data_root` of their own.
    _roots: Vec<tempfile::TempDir>,
    pub clusters: BTreeMap<String, Cluster>,
    /// The relays carrying traffic from the first region to the second's nodes.
    links: BTreeMap<(String, String), Vec<Relay>>,
    primary: String,
    tls: bool,
}

impl Regions {
    pub async fn start(binary: impl AsRef<Path>, options: RegionsOptions) -> std::io::Result<Regions> {
        let temp = tempfile::Builder::new().prefix("rampart-regions-").tempdir()?;
        let mut addresses = BTreeMap::new();
        for spec in &options.regions {
            let addrs = (0..spec.nodes)
                .map(|_| free_port())
                .collect::<std::io::Result<Vec<_>>>()?;
            addresses.insert(spec.name.clone(), addrs);
        }
        let mut links = BTreeMap::new();
        for from in addresses.keys() {
            for (to, to_addrs) in &addresses {
                if from != to {
                    let mut relays = Vec::new();
                    for addr in to_addrs {
                        relays.push(Relay::start(*addr).await?);
                    }
                    links.insert((from.clone(), to.clone()), relays);
                }
            }
        }
        if options.tls {
            shared_ca(binary.as_ref(), temp.path(), &options.regions)?;
        }
        let mut clusters = BTreeMap::new();
        let mut roots = Vec::new();
        for spec in &options.regions {
            let base = match &spec.data_root {
                Some(root) => {
                    let dir = tempfile::Builder::new()
                        .prefix(&format!("rampart-{}-", spec.name))
                        .tempdir_in(root)?;
                    let base = dir.path().to_path_buf();
                    roots.push(dir);
                    base
                }
                None => temp.path().join(&spec.name),
            };
            if options.tls && spec.data_root.is_some() {
                // The shared CA was put beside the others: bring it along.
                let certs = base.join("certs");
                std::fs::create_dir_all(&certs)?;
                for file in ["ca.pem", "ca-key.pem"] {
                    std::fs::copy(temp.path().join("ca").join(file), certs.join(file))?;
                }
            }
            let config = base.join("regions.toml");
            std::fs::create_dir_all(&base)?;
            std::fs::write(&config, config_text(&options, &spec.name, &links))?;
            let node_args = ["--region", &spec.name, "--config", &config.display().to_string()]
                .into_iter()
                .map(str::to_string)
                .chain(spec.node_args.iter().cloned())
                .collect();
            let cluster_options = ClusterOptions {
                nodes: spec.nodes,
                addresses: addresses[&spec.name].clone(),
                node_args,
                base_dir: Some(base),
                tls: options.tls,
                witness: spec.witness,
                ..ClusterOptions::default()
            };
            clusters.insert(
                spec.name.clone(),
                Cluster::start(binary.as_ref(), cluster_options).await?,
            );
        }
        Ok(Regions {
            _temp: temp,
            _roots: roots,
            clusters,
            links,
            primary: options.primary,
            tls: options.tls,
        })
    }

    pub fn region(&self, name: &str) -> &Cluster {
        &self.clusters[name]
    }

    pub fn region_mut(&mut self, name: &str) -> &mut Cluster {
        self.clusters.get_mut(name).expect("a region of these")
    }

    /// A client over region `name`'s nodes; on TLS with the primary region's admin token
    /// (tokens are shipped state, so the primary's are every region's).
    pub fn client(&self, name: &str) -> Client {
        let region = self.region(name);
        let token = self.region(&self.primary).admin_token();
        region.client_with_token(&region.endpoints(), token.as_deref())
    }

    /// A client over the endpoints of every region in `names`, in that order (as
    /// [`Regions::client`] for the token): writes find the primary region among them.
    pub fn client_over(&self, names: &[&str]) -> Client {
        let endpoints: Vec<String> = names.iter().flat_map(|n| self.region(n).endpoints()).collect();
        let first = self.region(names[0]);
        let token = self.region(&self.primary).admin_token();
        first.client_with_token(&endpoints, token.as_deref())
    }

    /// Waits until every region has a leader (on TLS, the standbys are asked with the
    /// primary's admin token, once it has one).
    pub async fn wait_for_leaders(&self, timeout: Duration) {
        let primary = self.region(&self.primary);
        primary.wait_for_leader(timeout).await;
        if self.tls {
            let token = crate::eventually(timeout, "the primary region's admin token", || async {
                primary.admin_token()
            })
            .await;
            for cluster in self.clusters.values() {
                cluster.adopt_admin_token(token.clone());
            }
        }
        for cluster in self.clusters.values() {
            cluster.wait_for_leader(timeout).await;
        }
    }

    /// Sets what happens to traffic from region `from` to region `to` (one direction).
    pub fn set_link(&self, from: &str, to: &str, mode: RelayMode) {
        for relay in &self.links[&(from.to_string(), to.to_string())] {
            relay.set_mode(mode);
        }
    }

    /// Cuts the link between `a` and `b` both ways, silently (a blackhole: packets vanish).
    pub fn cut(&self, a: &str, b: &str) {
        self.set_link(a, b, RelayMode::Blackhole);
        self.set_link(b, a, RelayMode::Blackhole);
    }

    /// Heals the link between `a` and `b`.
    pub fn heal(&self, a: &str, b: &str) {
        self.set_link(a, b, RelayMode::Pass);
        self.set_link(b, a, RelayMode::Pass);
    }

    /// Gives the link between `a` and `b` a fixed one-way latency, both ways.
    pub fn delay(&self, a: &str, b: &str, one_way: Duration) {
        self.set_link(a, b, RelayMode::Delay(one_way));
        self.set_link(b, a, RelayMode::Delay(one_way));
    }
}

/// One region's config: the topology, with the other regions reached through its relays.
fn config_text(options: &RegionsOptions, own: &str, links: &BTreeMap<(String, String), Vec<Relay>>) -> String {
    let mut text = format!("[regions]\nprimary = \"{}\"\n", options.primary);
    for line in &options.settings {
        text.push_str(line);
        text.push('\n');
    }
    for spec in options.regions.iter().filter(|r| r.name != own) {
        let relays = &links[&(own.to_string(), spec.name.clone())];
        let endpoints: Vec<String> = relays.iter().map(|r| format!("\"{}\"", r.addr())).collect();
        text.push_str(&format!(
            "[regions.known.{}]\nendpoints = [{}]\nwitness = {}\n",
            spec.name,
            endpoints.join(", "),
            spec.witness
        ));
    }
    text
}

/// Makes one CA and puts it in every region's certificate directory, so the certificates
/// each region then issues (`Cluster` runs `certs init` there) share it.
fn shared_ca(binary: &Path, root: &Path, regions: &[RegionSpec]) -> std::io::Result<()> {
    let ca_dir = root.join("ca");
    crate::cluster::certs_init(binary, &ca_dir, "1")?;
    for spec in regions {
        let certs = root.join(&spec.name).join("certs");
        std::fs::create_dir_all(&certs)?;
        for file in ["ca.pem", "ca-key.pem"] {
            std::fs::copy(ca_dir.join(file), certs.join(file))?;
        }
    }
    Ok(())
}
