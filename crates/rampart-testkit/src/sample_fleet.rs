//! Sample-service instances run by a local region's nodes: shared by `rampart demo`,
//! `rampart bench --service-failover` and the drills.

use std::time::Duration;

use rampart_client::Client;
use rampart_core::service::InstanceSpec;

/// How the instances of a fleet run.
#[derive(Debug, Clone, Default)]
pub struct Mode {
    /// `sample-service --synchronous`: a write is acknowledged once a synchronous replica
    /// has it.
    pub synchronous: bool,
    /// This instance is registered as the synchronous standby.
    pub standby: bool,
    /// Its zone label.
    pub zone: Option<String>,
}

/// Registers instance `id` of `service`, run by node `node` (supervised) and serving on
/// `addr`. A different `generation` changes the command, so registering again restarts
/// an instance that was killed.
#[allow(clippy::too_many_arguments)]
pub async fn register(
    client: &Client,
    binary: &std::path::Path,
    endpoints: &str,
    service: &str,
    id: &str,
    node: u64,
    addr: &str,
    generation: usize,
    mode: Mode,
) -> Result<(), String> {
    let synchronous = if mode.synchronous { " --synchronous" } else { "" };
    let command = format!(
        "exec {} --endpoints {endpoints} sample-service --listen {addr} --service {service} --instance {id} --heartbeat 100ms{synchronous} # {generation}",
        binary.display()
    );
    let spec = InstanceSpec {
        endpoint: addr.to_string(),
        node: Some(node),
        command: Some(command),
        synchronous: mode.standby.then_some(true),
        zone: mode.zone.clone(),
        ..InstanceSpec::default()
    };
    client
        .instance_put(service, id, &spec)
        .await
        .map_err(|e| format!("cannot register instance {id} of {service}: {e}"))?;
    Ok(())
}

/// Waits until every instance of `service` is up.
pub async fn wait_all_up(client: &Client, service: &str, timeout: Duration) {
    crate::eventually(timeout, "every instance up", || async {
        let view = client.service(service).await.ok()?;
        view.instances
            .iter()
            .all(|i| i.health == rampart_core::health::Health::Up)
            .then_some(())
    })
    .await
}

/// GET on a sample service, as JSON.
pub async fn json(http: &reqwest::Client, addr: &str, path: &str) -> Option<serde_json::Value> {
    http.get(format!("http://{addr}{path}"))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()
}
