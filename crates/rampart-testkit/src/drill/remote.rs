//! `rampart drill run --endpoints`: drilling a deployment the drill did not start. It
//! learns the regions and their nodes through the API, and breaks and mends them only
//! through the operator's commands (`kill`, `start`, `pause`, `resume`, `cut`, `heal`:
//! shell templates, run with `sh -c`; ssh, systemctl, kubectl, whatever the site uses),
//! never assuming a local process. Each fault's rendered undo commands go to the journal
//! before the fault's own run, so `drill cleanup` can mend what a killed drill left.

use std::collections::BTreeMap;
use std::time::Duration;

use rampart_client::{Client, TlsOptions};
use rampart_core::drill::Scenario;
use serde::{Deserialize, Serialize};

use super::journal::Fault;

/// How long one operator command may run.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The operator's commands: templates with `{region}`, `{node}` (its id in its region),
/// `{name}` (`REGION-ID`), `{address}`, `{host}` and `{port}`; `cut` and `heal` also with
/// `{peer_region}`, `{peer_node}`, `{peer_name}`, `{peer_address}`, `{peer_host}` and
/// `{peer_port}` (one run per pair: cut both ways between the two).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Templates {
    pub kill: Option<String>,
    /// Starts a killed node again; without it, a kill is left to the site's supervisor
    /// (systemd, Kubernetes) to undo.
    pub start: Option<String>,
    pub pause: Option<String>,
    pub resume: Option<String>,
    pub cut: Option<String>,
    pub heal: Option<String>,
}

/// A commands file: templates for every node, and per node (by `REGION-ID`) overrides.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Commands {
    #[serde(flatten)]
    pub all: Templates,
    #[serde(default)]
    pub nodes: BTreeMap<String, Templates>,
}

impl Commands {
    /// Refuses a template naming a placeholder it cannot have, naming the field.
    pub fn check(&self) -> Result<(), String> {
        let own = ["region", "node", "name", "address", "host", "port"];
        let pair: Vec<String> = own.iter().map(|p| format!("peer_{p}")).collect();
        let mut all: Vec<(String, &Templates)> = vec![(String::new(), &self.all)];
        all.extend(self.nodes.iter().map(|(name, t)| (format!("nodes.{name}."), t)));
        for (prefix, templates) in all {
            for (field, template, pairs) in [
                ("kill", &templates.kill, false),
                ("start", &templates.start, false),
                ("pause", &templates.pause, false),
                ("resume", &templates.resume, false),
                ("cut", &templates.cut, true),
                ("heal", &templates.heal, true),
            ] {
                let Some(template) = template else { continue };
                for name in placeholders(template) {
                    let known = own.contains(&name.as_str()) || (pairs && pair.contains(&name));
                    if !known {
                        return Err(format!("{prefix}{field}: unknown placeholder {{{name}}}"));
                    }
                }
            }
        }
        Ok(())
    }

    fn template(&self, node: &str, pick: impl Fn(&Templates) -> &Option<String>) -> Option<String> {
        self.nodes
            .get(node)
            .and_then(|t| pick(t).clone())
            .or_else(|| pick(&self.all).clone())
    }
}

/// The `{name}`s in `template`.
fn placeholders(template: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else { break };
        out.push(rest[open + 1..open + close].to_string());
        rest = &rest[open + close + 1..];
    }
    out
}

/// One node of the deployment, as the API told it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteNode {
    pub name: String,
    pub region: String,
    pub id: u64,
    pub address: String,
}

impl RemoteNode {
    fn fill(&self, template: &str, peer: Option<&RemoteNode>) -> String {
        let mut text = template.to_string();
        let mut put = |prefix: &str, node: &RemoteNode| {
            let (host, port) = node.address.rsplit_once(':').unwrap_or((node.address.as_str(), ""));
            for (key, value) in [
                ("region", node.region.as_str()),
                ("node", &node.id.to_string()),
                ("name", node.name.as_str()),
                ("address", node.address.as_str()),
                ("host", host),
                ("port", port),
            ] {
                text = text.replace(&format!("{{{prefix}{key}}}"), value);
            }
        };
        if let Some(peer) = peer {
            put("peer_", peer);
        }
        put("", self);
        text
    }
}

/// How to reach a deployment.
#[derive(Debug, Clone, Default)]
pub struct Access {
    pub endpoints: Vec<String>,
    pub token: Option<String>,
    pub tls: Option<TlsOptions>,
}

impl Access {
    pub fn client(&self, endpoints: &[String]) -> Result<Client, String> {
        Client::secured(endpoints, self.tls.as_ref(), self.token.as_deref()).map_err(|e| e.to_string())
    }
}

/// A deployment the drill did not start.
pub struct Remote {
    pub access: Access,
    pub commands: Commands,
    pub nodes: Vec<RemoteNode>,
    /// The primary region when the drill began (where `failback` goes back to).
    pub first_primary: String,
}

impl Remote {
    /// Learns the deployment's data regions and their nodes through `access`.
    pub async fn discover(access: Access, commands: Commands) -> Result<Remote, String> {
        commands.check()?;
        let client = access.client(&access.endpoints)?;
        let own = client
            .cluster()
            .await
            .map_err(|e| format!("cannot reach the deployment: {e}"))?;
        let mut regions: Vec<(String, Vec<String>)> = Vec::new();
        let mut primary = own.region.clone();
        match client.regions().await {
            Ok(view) if !view.regions.is_empty() => {
                primary = view.primary.clone();
                for region in view.regions.iter().filter(|r| r.role != "witness") {
                    let endpoints = if region.this_region {
                        access.endpoints.clone()
                    } else {
                        region.endpoints.clone()
                    };
                    regions.push((region.name.clone(), endpoints));
                }
            }
            _ => regions.push((own.region.clone(), access.endpoints.clone())),
        }
        let mut nodes = Vec::new();
        for (region, endpoints) in regions {
            let members = access
                .client(&endpoints)?
                .members()
                .await
                .map_err(|e| format!("cannot list region {region}'s members: {e}"))?;
            for member in members.members {
                nodes.push(RemoteNode {
                    name: format!("{region}-{}", member.id),
                    region: region.clone(),
                    id: member.id,
                    address: member.addr,
                });
            }
        }
        Ok(Remote {
            access,
            commands,
            nodes,
            first_primary: primary,
        })
    }

    pub fn node(&self, name: &str) -> Option<&RemoteNode> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn region_nodes<'a>(&'a self, region: &'a str) -> impl Iterator<Item = &'a RemoteNode> + 'a {
        self.nodes.iter().filter(move |n| n.region == region)
    }

    /// The data regions, the first primary first.
    pub fn data_regions(&self) -> Vec<String> {
        let mut regions: Vec<String> = Vec::new();
        for node in &self.nodes {
            if !regions.contains(&node.region) {
                regions.push(node.region.clone());
            }
        }
        regions.sort_by_key(|r| *r != self.first_primary);
        regions
    }

    pub fn region_client(&self, region: &str) -> Result<Client, String> {
        let endpoints: Vec<String> = self.region_nodes(region).map(|n| n.address.clone()).collect();
        self.access.client(&endpoints)
    }

    /// Every data region's nodes, the current primary's first.
    pub fn client(&self) -> Result<Client, String> {
        let endpoints: Vec<String> = self
            .data_regions()
            .iter()
            .flat_map(|r| self.region_nodes(r).map(|n| n.address.clone()).collect::<Vec<_>>())
            .collect();
        self.access.client(&endpoints)
    }

    /// One command for `node`, rendered; an error names the template missing.
    fn render(
        &self,
        node: &RemoteNode,
        field: &str,
        pick: impl Fn(&Templates) -> &Option<String>,
        peer: Option<&RemoteNode>,
    ) -> Result<String, String> {
        let template = self.commands.template(&node.name, pick).ok_or(format!(
            "no `{field}` command for node {} in the commands file",
            node.name
        ))?;
        Ok(node.fill(&template, peer))
    }

    /// The fault `scenario` injects now, as commands and their undo, given the primary
    /// region and its leader; planned operations go through the API as locally.
    pub fn plan(&self, scenario: Scenario, primary: &str, leader: &str) -> Result<Fault, String> {
        let leader = self.node(leader).ok_or(format!("no node {leader}"))?;
        let standby = self.data_regions().into_iter().find(|r| r != primary);
        let each = |nodes: &[&RemoteNode], field: &str, pick: fn(&Templates) -> &Option<String>| {
            nodes
                .iter()
                .map(|n| self.render(n, field, pick, None))
                .collect::<Result<Vec<String>, String>>()
        };
        let pairs = |a: &[&RemoteNode], b: &[&RemoteNode]| -> Result<(Vec<String>, Vec<String>), String> {
            let mut cut = Vec::new();
            let mut heal = Vec::new();
            for x in a {
                for y in b {
                    cut.push(self.render(x, "cut", |t| &t.cut, Some(y))?);
                    heal.push(self.render(x, "heal", |t| &t.heal, Some(y))?);
                }
            }
            Ok((cut, heal))
        };
        let kill = |nodes: Vec<&RemoteNode>, what: String| -> Result<Fault, String> {
            let run = each(&nodes, "kill", |t| &t.kill)?;
            // Without `start`, the site's supervisor brings the node back.
            let undo = nodes
                .iter()
                .filter_map(|n| self.commands.template(&n.name, |t| &t.start).map(|t| n.fill(&t, None)))
                .collect();
            Ok(Fault::Commands { what, run, undo })
        };
        let region: Vec<&RemoteNode> = self.region_nodes(primary).collect();
        Ok(match scenario {
            Scenario::LeaderKill => kill(vec![leader], format!("kill {}", leader.name))?,
            Scenario::RegionOutage => kill(region.clone(), format!("kill every node of {primary}"))?,
            Scenario::LeaderPause => Fault::Commands {
                what: format!("pause {}", leader.name),
                run: each(&[leader], "pause", |t| &t.pause)?,
                undo: each(&[leader], "resume", |t| &t.resume)?,
            },
            Scenario::PartitionMinority | Scenario::PartitionMajority => {
                let mut side = vec![leader];
                if scenario == Scenario::PartitionMajority {
                    side.extend(region.iter().filter(|n| n.name != leader.name).take(region.len() / 2));
                }
                let rest: Vec<&RemoteNode> = region
                    .iter()
                    .filter(|n| !side.iter().any(|s| s.name == n.name))
                    .copied()
                    .collect();
                let (run, undo) = pairs(&side, &rest)?;
                let names: Vec<&str> = side.iter().map(|n| n.name.as_str()).collect();
                Fault::Commands {
                    what: format!("cut {} off from the rest of {primary}", names.join(", ")),
                    run,
                    undo,
                }
            }
            Scenario::LinkCut => {
                let standby = standby.ok_or("link-cut needs a standby region")?;
                let far: Vec<&RemoteNode> = self.region_nodes(&standby).collect();
                let (run, undo) = pairs(&region, &far)?;
                Fault::Commands {
                    what: format!("cut the link between {primary} and {standby}"),
                    run,
                    undo,
                }
            }
            Scenario::RegionFailover => {
                let standby = standby.ok_or("region-failover needs a standby region")?;
                Fault::Planned {
                    what: format!("planned failover from {primary} to {standby}"),
                    to: standby,
                }
            }
            Scenario::Failback => Fault::Planned {
                what: format!("planned fail-back from {primary} to {}", self.first_primary),
                to: self.first_primary.clone(),
            },
            other => {
                return Err(format!(
                    "scenario {other} is not available with --endpoints (built: {})",
                    REMOTE_SCENARIOS.map(|s| s.name()).join(", ")
                ))
            }
        })
    }
}

/// The scenarios `--endpoints` can run.
pub const REMOTE_SCENARIOS: [Scenario; 8] = [
    Scenario::LeaderKill,
    Scenario::LeaderPause,
    Scenario::PartitionMinority,
    Scenario::PartitionMajority,
    Scenario::RegionOutage,
    Scenario::LinkCut,
    Scenario::RegionFailover,
    Scenario::Failback,
];

/// Runs each command with `sh -c`, in turn, each within [`COMMAND_TIMEOUT`]; the first
/// that fails (or times out) stops the rest.
pub async fn run_commands(commands: &[String]) -> Result<(), String> {
    for command in commands {
        let child = tokio::process::Command::new("sh")
            .args(["-c", command])
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output();
        match tokio::time::timeout(COMMAND_TIMEOUT, child).await {
            Ok(Ok(out)) if out.status.success() => {}
            Ok(Ok(out)) => {
                return Err(format!(
                    "`{command}` failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
            Ok(Err(e)) => return Err(format!("cannot run `{command}`: {e}")),
            Err(_) => return Err(format!("`{command}` did not finish within {COMMAND_TIMEOUT:?}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_their_placeholders_and_unknown_ones_are_refused_by_name() {
        let node = RemoteNode {
            name: "east-2".into(),
            region: "east".into(),
            id: 2,
            address: "10.0.0.2:7001".into(),
        };
        let peer = RemoteNode {
            name: "east-3".into(),
            region: "east".into(),
            id: 3,
            address: "10.0.0.3:7001".into(),
        };
        assert_eq!(
            node.fill("ssh {host} sudo systemctl kill -s KILL rampart@{node}", None),
            "ssh 10.0.0.2 sudo systemctl kill -s KILL rampart@2"
        );
        assert_eq!(
            node.fill(
                "ssh {host} iptables -A INPUT -s {peer_host} -j DROP # {name}/{peer_name}",
                Some(&peer)
            ),
            "ssh 10.0.0.2 iptables -A INPUT -s 10.0.0.3 -j DROP # east-2/east-3"
        );
        let commands: Commands = toml::from_str(
            "kill = \"kill {node}\"\ncut = \"cut {peer_host}\"\n[nodes.east-2]\nkill = \"kill-two {port}\"\n",
        )
        .expect("commands");
        assert_eq!(commands.check(), Ok(()));
        assert_eq!(
            commands.template("east-2", |t| &t.kill).as_deref(),
            Some("kill-two {port}")
        );
        assert_eq!(commands.template("east-1", |t| &t.kill).as_deref(), Some("kill {node}"));
        let bad: Commands = toml::from_str("kill = \"kill {peer_host}\"\n").expect("commands");
        assert_eq!(bad.check(), Err("kill: unknown placeholder {peer_host}".into()));
        let bad: Commands = toml::from_str("[nodes.east-1]\npause = \"stop {nod}\"\n").expect("commands");
        assert_eq!(bad.check(), Err("nodes.east-1.pause: unknown placeholder {nod}".into()));
    }
}
