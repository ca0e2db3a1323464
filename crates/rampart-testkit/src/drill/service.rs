//! The service a drill's service scenarios break: `drill-kv`, a sample service with an
//! instance on each node of the primary region (in that node's zone, run and supervised by
//! that node), behind a `rampart proxy` HTTP listener that follows its primary. The
//! proxy canary writes through that listener and records, with each write, the instance
//! and fencing token that acknowledged it, for the two-primaries check.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rampart_client::Client;
use rampart_core::health::Health;
use serde::{Deserialize, Serialize};

use crate::history::{History, OpOutcome, PrimaryAck};
use crate::workload::Writers;

/// The drill's service.
pub const SERVICE: &str = "drill-kv";

/// One instance of the drill's service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceRecord {
    pub id: String,
    /// The node that runs it (its name, e.g. `east-1`) and that node's id in its region.
    pub node: String,
    pub node_id: u64,
    pub addr: SocketAddr,
    pub zone: Option<String>,
    /// Bumped to start it again after a kill (a changed command restarts it).
    pub generation: usize,
}

/// The drill's service, as `topology.json` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub instances: Vec<InstanceRecord>,
    /// The proxy's listener for the service's primary.
    pub proxy: SocketAddr,
}

/// The policy of the drill's service: heartbeats, an instance that loses the role may take
/// it again at once (a drill kills primaries in a row), asynchronous replication.
pub fn policy() -> rampart_core::service::PolicySpec {
    serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "heartbeat", "ttl": "1s"}],
        "flap_damping": {"max_losses": 0, "window": "1m"},
    }))
    .expect("a valid policy")
}

/// Registers instance `instance` (again, with its generation) through `client`.
pub async fn register(
    client: &Client,
    binary: &std::path::Path,
    endpoints: &str,
    instance: &InstanceRecord,
) -> Result<(), String> {
    let mode = crate::sample_fleet::Mode {
        zone: instance.zone.clone(),
        ..Default::default()
    };
    crate::sample_fleet::register(
        client,
        binary,
        endpoints,
        SERVICE,
        &instance.id,
        instance.node_id,
        &instance.addr.to_string(),
        instance.generation,
        mode,
    )
    .await
}

/// Service `name`'s primary, when every instance is up and one is the primary.
pub async fn serving(client: &Client, name: &str) -> Result<String, String> {
    let view = client
        .service(name)
        .await
        .map_err(|e| format!("cannot read service {name}: {e}"))?;
    if let Some(down) = view.instances.iter().find(|i| i.health != Health::Up) {
        return Err(format!("instance {} of {name} is {:?}", down.id, down.health));
    }
    view.primary.ok_or_else(|| format!("service {name} has no primary"))
}

/// The PID instance `addr` reports (`GET /health`).
pub async fn instance_pid(addr: SocketAddr) -> Option<u32> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()
        .ok()?;
    let health = crate::sample_fleet::json(&http, &addr.to_string(), "/health").await?;
    health["pid"].as_u64().map(|pid| pid as u32)
}

/// Writers putting fresh keys through the proxy, until stopped.
pub struct ServiceCanary {
    writers: Writers,
    pub history: Arc<History>,
    pub acks: Arc<Mutex<Vec<PrimaryAck>>>,
}

impl ServiceCanary {
    /// Starts `writers` writers putting `PREFIX.wN.SEQ` (one path segment: `/` in the
    /// prefix becomes `.`) through the proxy at `proxy`.
    pub fn start(proxy: SocketAddr, writers: usize, prefix: &str) -> ServiceCanary {
        let prefix = prefix.replace('/', ".");
        let history = Arc::new(History::default());
        let acks = Arc::new(Mutex::new(Vec::new()));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .expect("an HTTP client");
        let (sink, tokens) = (history.clone(), acks.clone());
        let writers = Writers::start(writers, move |writer, stop| {
            let (history, acks, http, prefix) = (sink.clone(), tokens.clone(), http.clone(), prefix.clone());
            async move {
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    seq += 1;
                    let key = format!("{prefix}.w{writer}.{seq:07}");
                    let value = format!("{writer}-{seq}");
                    let sent = Instant::now();
                    let answer = http
                        .put(format!("http://{proxy}/kv/{key}"))
                        .body(value.clone())
                        .send()
                        .await;
                    let outcome = outcome(answer, &acks, sent).await;
                    let refused = outcome == OpOutcome::Failed;
                    history.record_sent(writer, &key, &value, outcome, sent);
                    if refused {
                        // No primary yet: do not spin.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        });
        ServiceCanary { writers, history, acks }
    }

    /// Stops every writer; returns the history and the acknowledgements' tokens.
    pub async fn stop(mut self) -> (Arc<History>, Vec<PrimaryAck>) {
        self.writers.stop().await;
        let acks = self.acks.lock().expect("acks lock").clone();
        (self.history, acks)
    }
}

/// A write's outcome through the proxy: acknowledged (recording who and under which
/// token), refused before it reached a primary (the sample service's `not_primary`, the
/// proxy's `read_only` or no upstream), or unknown.
async fn outcome(
    answer: Result<reqwest::Response, reqwest::Error>,
    acks: &Mutex<Vec<PrimaryAck>>,
    sent: Instant,
) -> OpOutcome {
    let Ok(response) = answer else {
        return OpOutcome::Unknown;
    };
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if status.is_success() {
        let (Some(seq), Some(token), Some(instance)) =
            (body["seq"].as_u64(), body["token"].as_u64(), body["instance"].as_str())
        else {
            return OpOutcome::Unknown;
        };
        acks.lock().expect("acks lock").push(PrimaryAck {
            instance: instance.to_string(),
            token,
            sent,
            answered: Instant::now(),
        });
        return OpOutcome::Acknowledged { revision: seq };
    }
    let code = body["error"]
        .as_str()
        .or_else(|| body["error"]["code"].as_str())
        .unwrap_or_default();
    if matches!(code, "not_primary" | "read_only" | "no_upstream" | "no_view") {
        OpOutcome::Failed
    } else {
        OpOutcome::Unknown
    }
}

/// Every key and value the primary at `addr` holds (its whole log, page by page).
pub async fn final_state(addr: SocketAddr) -> Result<BTreeMap<String, String>, String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let mut state = BTreeMap::new();
    let mut from = 1u64;
    loop {
        let page = crate::sample_fleet::json(&http, &addr.to_string(), &format!("/log?from={from}"))
            .await
            .ok_or_else(|| format!("cannot read the log of {addr}"))?;
        let entries = page["entries"].as_array().cloned().unwrap_or_default();
        if entries.is_empty() {
            return Ok(state);
        }
        for entry in &entries {
            if let (Some(key), Some(value)) = (entry["key"].as_str(), entry["value"].as_str()) {
                state.insert(key.to_string(), value.to_string());
            }
            from = from.max(entry["seq"].as_u64().unwrap_or(0) + 1);
        }
    }
}
