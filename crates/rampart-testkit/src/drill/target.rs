//! What a drill runs against: its own local topology (`--local`) or a deployment it did
//! not start (`--endpoints`), seen the same way by the steps: clients, regions, leaders,
//! health.

use std::time::Duration;

use rampart_client::Client;
use rampart_core::api::ClusterStatus;

use super::local::LocalTopology;
use super::remote::Remote;
use crate::cluster::{agreed_leader, converged};

pub enum Target {
    Local(LocalTopology),
    Remote(Remote),
}

impl Target {
    pub fn local(&self) -> Option<&LocalTopology> {
        match self {
            Target::Local(t) => Some(t),
            Target::Remote(_) => None,
        }
    }

    pub fn local_mut(&mut self) -> Option<&mut LocalTopology> {
        match self {
            Target::Local(t) => Some(t),
            Target::Remote(_) => None,
        }
    }

    /// A client over every data region's nodes, the first primary's first.
    pub fn client(&self) -> Result<Client, String> {
        match self {
            Target::Local(t) => Ok(t.client()),
            Target::Remote(r) => r.client(),
        }
    }

    pub fn region_client(&self, region: &str) -> Result<Client, String> {
        match self {
            Target::Local(t) => Ok(t.region_client(region)),
            Target::Remote(r) => r.region_client(region),
        }
    }

    pub fn data_regions(&self) -> Vec<String> {
        match self {
            Target::Local(t) => t.data_regions(),
            Target::Remote(r) => r.data_regions(),
        }
    }

    /// The region that was primary when the drill began: where a fail-back goes.
    pub fn first_primary(&self) -> String {
        match self {
            Target::Local(t) => t.plan.primary().to_string(),
            Target::Remote(r) => r.first_primary.clone(),
        }
    }

    /// The leader (by name) every answering node of `region` agrees on.
    pub async fn leader(&self, region: &str) -> Option<String> {
        match self {
            Target::Local(t) => t.leader(region).await,
            Target::Remote(r) => {
                let nodes = node_clients(r, region).ok()?;
                let statuses = statuses(&nodes).await?;
                let id = agreed_leader(&statuses)?;
                Some(format!("{region}-{id}"))
            }
        }
    }

    /// Polls until the target is healthy or `timeout` passes; the last reason otherwise.
    pub async fn wait_healthy(&self, timeout: Duration) -> Result<(), String> {
        match self {
            Target::Local(t) => t.wait_healthy(timeout).await,
            Target::Remote(r) => {
                let deadline = tokio::time::Instant::now() + timeout;
                loop {
                    let last = remote_healthy(r).await;
                    if last.is_ok() || tokio::time::Instant::now() >= deadline {
                        return last;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
}

/// One client per node of `region`, each talking to that node only.
fn node_clients(remote: &Remote, region: &str) -> Result<Vec<(String, Client)>, String> {
    remote
        .region_nodes(region)
        .map(|n| {
            let client = remote.access.client(std::slice::from_ref(&n.address))?;
            Ok((n.name.clone(), client.with_deadline(Duration::from_millis(500))))
        })
        .collect()
}

/// Every node's status, if every one answers.
async fn statuses(nodes: &[(String, Client)]) -> Option<Vec<ClusterStatus>> {
    let mut all = Vec::new();
    for (_, client) in nodes {
        all.push(client.cluster().await.ok()?);
    }
    Some(all)
}

/// Healthy: every node answers, each data region has one agreed leader and has converged,
/// and the regions agree on the primary.
async fn remote_healthy(remote: &Remote) -> Result<(), String> {
    let regions = remote.data_regions();
    for region in &regions {
        let nodes = node_clients(remote, region)?;
        for (name, client) in &nodes {
            client
                .cluster()
                .await
                .map_err(|e| format!("node {name} does not answer: {e}"))?;
        }
        let all = statuses(&nodes)
            .await
            .ok_or(format!("a node of {region} stopped answering"))?;
        agreed_leader(&all).ok_or(format!("region {region} has no agreed leader"))?;
        converged(&all).ok_or(format!("region {region}'s nodes have not converged"))?;
    }
    if regions.len() > 1 {
        let clients = regions
            .iter()
            .map(|r| Ok((r.clone(), remote.region_client(r)?)))
            .collect::<Result<Vec<_>, String>>()?;
        agree_on_primary(clients).await?;
    }
    Ok(())
}

/// Every region (asked through its client) names the same primary region at the same
/// epoch.
pub(crate) async fn agree_on_primary(regions: Vec<(String, Client)>) -> Result<(), String> {
    let mut primaries = std::collections::BTreeSet::new();
    for (region, client) in regions {
        let view = client
            .with_deadline(Duration::from_millis(500))
            .regions()
            .await
            .map_err(|e| format!("region {region} does not say its regions: {e}"))?;
        primaries.insert((view.primary, view.epoch));
    }
    if primaries.len() > 1 {
        return Err(format!("the regions disagree on the primary region: {primaries:?}"));
    }
    Ok(())
}
