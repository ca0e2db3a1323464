//! `rampart sample-service`: a small replicated key-value service that makes failover,
//! lag, eligibility and switchover real in tests and in the demo.
//!
//! - `PUT /kv/{key}` (body: the value) is accepted only by the primary, and only while its
//!   latest heartbeat to Rampart, younger than half the heartbeat TTL, said so: a primary
//!   cut off from Rampart stops taking writes by itself (it fences on its own token).
//! - Replicas pull the primary's log (`GET /log?from=N`) and report their lag with every
//!   heartbeat, honestly: the primary's head minus what they applied.
//!   Its answer names the sequence, the fencing token it wrote under and the instance.
//! - `GET /kv/{key}`, `GET /health` (role, token, applied sequence, lag).
//!
//! - `--synchronous`: a write is acknowledged only once a replica that Rampart would promote
//!   (registered `synchronous = true`, in a policy with `synchronous = true`) has pulled it;
//!   otherwise, after [`SYNC_WAIT`], it answers 503 `not_replicated` (the write stays in the
//!   log, unacknowledged, as PostgreSQL's does when a synchronous wait is cancelled).
//!
//! Its role comes from the heartbeat answers (`POST /v1/services/.../heartbeat`), so it
//! needs no hooks; the log lives in memory (a restarted instance pulls it again).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use rampart_core::api::{HeartbeatRequest, HeartbeatResponse, ServiceView};
use rampart_core::service::InstanceRole;
use serde::{Deserialize, Serialize};

/// Entries one `/log` answer carries at most.
const LOG_PAGE_MAX: usize = 1000;
/// A value's largest size.
const VALUE_BYTES_MAX: usize = 64 * 1024;
/// How long a synchronous write waits for a synchronous replica to have it.
pub const SYNC_WAIT: Duration = Duration::from_secs(5);

/// Where the sample service serves and whom it reports to.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub listen: SocketAddr,
    pub service: String,
    pub instance: String,
    /// Rampart nodes (`http://HOST:PORT`), tried in turn.
    pub endpoints: Vec<String>,
    pub token: Option<String>,
    /// How often it heartbeats; writes stop once the last good one is older than 3 of these.
    pub heartbeat: Duration,
    /// Acknowledge a write only once a synchronous replica has it.
    pub synchronous: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    pub key: String,
    pub value: String,
}

#[derive(Debug, Default)]
struct Replica {
    log: Vec<Entry>,
    kv: BTreeMap<String, String>,
    role: Option<InstanceRole>,
    token: u64,
    /// When Rampart last confirmed this role.
    confirmed: Option<Instant>,
    primary: Option<String>,
    primary_head: u64,
    /// On a primary: how far each replica has pulled, by instance id.
    pulled: BTreeMap<String, u64>,
    /// The instances registered synchronous (read from the registry by the puller loop).
    synchronous: Vec<String>,
}

impl Replica {
    fn head(&self) -> u64 {
        self.log.last().map_or(0, |e| e.seq)
    }

    /// Drops what the new primary never had (writes an old primary took but did not
    /// ship: the failover's data loss, which Rampart reports as RPO).
    fn truncate(&mut self, head: u64) {
        self.log.truncate(head as usize);
        self.kv.clear();
        for entry in &self.log {
            self.kv.insert(entry.key.clone(), entry.value.clone());
        }
    }

    fn apply(&mut self, entry: Entry) {
        if entry.seq == self.head() + 1 {
            self.kv.insert(entry.key.clone(), entry.value.clone());
            self.log.push(entry);
        }
    }
}

type Shared = Arc<(SampleOptions, Mutex<Replica>, reqwest::Client, tokio::sync::Notify)>;

/// Runs the sample service until the process is stopped.
pub async fn run(options: SampleOptions) -> std::io::Result<()> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = &options.token {
        if let Ok(value) = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}")) {
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .default_headers(headers)
        .build()
        .map_err(std::io::Error::other)?;
    let listener = tokio::net::TcpListener::bind(options.listen).await?;
    let shared: Shared = Arc::new((
        options,
        Mutex::new(Replica::default()),
        http,
        tokio::sync::Notify::new(),
    ));
    tokio::spawn(heartbeat_loop(shared.clone()));
    tokio::spawn(pull_loop(shared.clone()));
    let router = Router::new()
        .route("/health", get(health))
        .route("/kv/{key}", get(read).put(write))
        .route("/log", get(log))
        .with_state(shared);
    axum::serve(listener, router).await
}

fn may_write(shared: &Shared, replica: &Replica) -> bool {
    replica.role == Some(InstanceRole::Primary)
        && replica
            .confirmed
            .is_some_and(|at| at.elapsed() < shared.0.heartbeat * 3)
}

async fn health(State(shared): State<Shared>) -> Json<serde_json::Value> {
    let replica = shared.1.lock().expect("replica lock");
    Json(serde_json::json!({
        "role": replica.role,
        "token": replica.token,
        "seq": replica.head(),
        "lag": replica.primary_head.saturating_sub(replica.head()),
        "writable": may_write(&shared, &replica),
        "pid": std::process::id(),
    }))
}

async fn read(State(shared): State<Shared>, Path(key): Path<String>) -> Response {
    let replica = shared.1.lock().expect("replica lock");
    match replica.kv.get(&key) {
        Some(value) => value.clone().into_response(),
        None => (StatusCode::NOT_FOUND, "not found").into_response(),
    }
}

async fn write(State(shared): State<Shared>, Path(key): Path<String>, value: String) -> Response {
    if value.len() > VALUE_BYTES_MAX {
        return (StatusCode::PAYLOAD_TOO_LARGE, "value over 64 KiB").into_response();
    }
    let (seq, token) = {
        let mut replica = shared.1.lock().expect("replica lock");
        if !may_write(&shared, &replica) {
            let body = serde_json::json!({"error": "not_primary", "primary": replica.primary});
            return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
        }
        let seq = replica.head() + 1;
        replica.apply(Entry { seq, key, value });
        replica.primary_head = seq;
        (seq, replica.token)
    };
    if shared.0.synchronous && !replicated(&shared, seq).await {
        let body = serde_json::json!({
            "error": "not_replicated",
            "message": format!("no synchronous replica had seq {seq} within {}ms: not acknowledged", SYNC_WAIT.as_millis()),
        });
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    Json(serde_json::json!({ "seq": seq, "token": token, "instance": shared.0.instance })).into_response()
}

/// Waits until a synchronous replica has pulled `seq`, at most [`SYNC_WAIT`].
async fn replicated(shared: &Shared, seq: u64) -> bool {
    let deadline = tokio::time::Instant::now() + SYNC_WAIT;
    loop {
        let notified = shared.3.notified();
        {
            let replica = shared.1.lock().expect("replica lock");
            let has = |id: &String| replica.pulled.get(id).is_some_and(|pulled| *pulled >= seq);
            if replica.synchronous.iter().any(has) {
                return true;
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return false;
        }
    }
}

#[derive(Deserialize)]
struct LogQuery {
    from: u64,
    /// The replica pulling, which has every entry before `from`.
    instance: Option<String>,
}

async fn log(State(shared): State<Shared>, Query(query): Query<LogQuery>) -> Json<serde_json::Value> {
    let mut replica = shared.1.lock().expect("replica lock");
    if let Some(instance) = &query.instance {
        replica.pulled.insert(instance.clone(), query.from.saturating_sub(1));
        shared.3.notify_waiters();
    }
    let start = query.from.saturating_sub(1) as usize;
    let entries: Vec<&Entry> = replica.log.iter().skip(start).take(LOG_PAGE_MAX).collect();
    Json(serde_json::json!({ "head": replica.head(), "entries": entries }))
}

/// Heartbeats with the honest lag; the answer sets the role.
async fn heartbeat_loop(shared: Shared) {
    let (options, _, http, _) = &*shared;
    let mut tick = tokio::time::interval(options.heartbeat);
    let mut next = 0usize;
    loop {
        tick.tick().await;
        let lag = {
            let replica = shared.1.lock().expect("replica lock");
            match replica.role {
                Some(InstanceRole::Primary) => 0,
                _ => replica.primary_head.saturating_sub(replica.head()),
            }
        };
        for _ in 0..options.endpoints.len() {
            let endpoint = &options.endpoints[next % options.endpoints.len()];
            let url = format!(
                "{endpoint}/v1/services/{}/instances/{}/heartbeat",
                options.service, options.instance
            );
            let sent = http.post(&url).json(&HeartbeatRequest { lag: Some(lag) }).send().await;
            let Ok(answer) = sent else {
                next += 1;
                continue;
            };
            let Ok(answer) = answer.json::<HeartbeatResponse>().await else {
                next += 1;
                continue;
            };
            let mut replica = shared.1.lock().expect("replica lock");
            replica.role = Some(answer.role);
            replica.token = answer.token;
            // With no primary named (a switchover between the release and the promotion),
            // a replica goes on pulling from the last one: the target of a switchover
            // catches up from the old primary, which is what the switchover waits for.
            if answer.primary.is_some() {
                replica.primary = answer.primary;
            }
            replica.confirmed = Some(Instant::now());
            break;
        }
    }
}

/// A replica pulls the primary's log (at once again while there is more; a primary learns
/// from the registry which replicas are synchronous).
async fn pull_loop(shared: Shared) {
    let (options, _, http, _) = &*shared;
    let mut endpoints: BTreeMap<String, String> = BTreeMap::new();
    let mut tick = tokio::time::interval(options.heartbeat / 2);
    let mut more = false;
    loop {
        if !more {
            tick.tick().await;
        }
        more = false;
        let (primary, from, is_primary) = {
            let replica = shared.1.lock().expect("replica lock");
            let is_primary = replica.role == Some(InstanceRole::Primary);
            (replica.primary.clone(), replica.head() + 1, is_primary)
        };
        if is_primary && !options.synchronous {
            continue;
        }
        let Some(primary) = primary else { continue };
        if is_primary || !endpoints.contains_key(&primary) {
            for endpoint in &options.endpoints {
                let url = format!("{endpoint}/v1/services/{}", options.service);
                if let Ok(view) = async { http.get(&url).send().await?.json::<ServiceView>().await }.await {
                    let synchronous = view
                        .instances
                        .iter()
                        .filter(|i| i.synchronous)
                        .map(|i| i.id.clone())
                        .collect();
                    shared.1.lock().expect("replica lock").synchronous = synchronous;
                    for instance in view.instances {
                        endpoints.insert(instance.id, instance.endpoint);
                    }
                    break;
                }
            }
        }
        if is_primary {
            continue;
        }
        let Some(address) = endpoints.get(&primary) else {
            continue;
        };
        let url = format!("http://{address}/log?from={from}&instance={}", options.instance);
        let Ok(page) = async { http.get(&url).send().await?.json::<serde_json::Value>().await }.await else {
            continue;
        };
        let entries: Vec<Entry> = serde_json::from_value(page["entries"].clone()).unwrap_or_default();
        let mut replica = shared.1.lock().expect("replica lock");
        let head = page["head"].as_u64().unwrap_or(0);
        if head < replica.head() {
            replica.truncate(head);
        }
        replica.primary_head = head;
        more = !entries.is_empty() && options.synchronous;
        for entry in entries {
            replica.apply(entry);
        }
    }
}
