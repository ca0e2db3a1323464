//! `rampart-client` is the typed async client of Rampart's HTTP API, used by the CLI, the
//! testkit, benchmarks and users' Rust programs.
//!
//! It tries each endpoint in turn, follows the region through leader changes, and retries
//! within a deadline only what is safe to retry: calls that are idempotent, and any call
//! the cluster refused before applying it (`no_leader`, `not_leader`, `region_lease_lost`, connection refused,
//! and `read_only_region` from a standby region: given endpoints of several regions, a
//! write goes on to the next endpoint until the primary region takes it, and later calls
//! start there; if every endpoint is a standby's, the refusal is returned at once).
//! A write whose outcome is unknown (`timeout`, `leadership_lost`, `outcome_unknown`) is
//! reported, never repeated, even a compare-and-set or a put of the same value: if the first
//! attempt was committed, a repeated compare-and-set would answer `revision_mismatch` about
//! the caller's own write, and a repeated put would be a second revision.

mod tls;
mod watch;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rampart_core::api::*;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use tls::TlsOptions;
pub use watch::WatchStream;

/// Why a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The cluster answered with an error.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
        current: Option<serde_json::Value>,
    },
    /// No endpoint could be reached or none had a leader before the deadline.
    #[error("no endpoint answered within {deadline_ms}ms: {last_error}")]
    Unavailable { deadline_ms: u64, last_error: String },
    /// The request was sent but no answer came: it may or may not have taken effect.
    #[error("outcome unknown: {0}")]
    Unknown(String),
    #[error("bad endpoint {0:?}: expected HOST:PORT, http://HOST:PORT or https://HOST:PORT")]
    BadEndpoint(String),
    /// The TLS handshake failed for a reason a retry cannot fix (wrong CA, wrong name).
    #[error("{0}")]
    Tls(String),
    /// Client settings that cannot work (unreadable certificate files, a bad token).
    #[error("{0}")]
    Settings(String),
}

impl ClientError {
    /// The API error code, if the cluster answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            ClientError::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// True when the request certainly took no effect.
    pub fn is_definite(&self) -> bool {
        match self {
            ClientError::Unknown(_) => false,
            ClientError::Api { code, .. } => !outcome_unknown(code),
            _ => true,
        }
    }
}

/// Options of a put.
#[derive(Debug, Clone, Copy, Default)]
pub struct PutOptions {
    pub lease: Option<u64>,
    pub if_revision: Option<u64>,
}

/// A client of one region.
#[derive(Debug)]
pub struct Client {
    endpoints: Vec<String>,
    http: reqwest::Client,
    deadline: Duration,
    /// Index of the endpoint that answered last; tried first.
    preferred: AtomicUsize,
}

/// `HOST:PORT` gets `https://` when the client has a CA, else `http://`.
fn normalize(endpoint: &str, tls: bool) -> Result<String, ClientError> {
    let trimmed = endpoint.trim().trim_end_matches('/');
    let with_scheme = if trimmed.starts_with("http://") || trimmed.starts_with("https://") {
        trimmed.to_string()
    } else if tls {
        format!("https://{trimmed}")
    } else {
        format!("http://{trimmed}")
    };
    let host = with_scheme.trim_start_matches("https://").trim_start_matches("http://");
    if host.is_empty() || !host.contains(':') {
        return Err(ClientError::BadEndpoint(endpoint.to_string()));
    }
    Ok(with_scheme)
}

/// Codes that mean the request may or may not have taken effect.
fn outcome_unknown(code: &str) -> bool {
    matches!(code, "timeout" | "outcome_unknown" | "leadership_lost")
}

/// Codes that mean the cluster did not apply the request and a retry is safe.
/// `read_only_region`: a standby region refused it; with endpoints of several regions the
/// client goes on to the next, so writes find the primary region by themselves.
/// `region_lease_lost`: the primary region is renewing its lease, or lost it while another
/// region takes over. `rpo_bound`: every standby is further behind than `max_rpo_lag`.
fn retryable(code: &str) -> bool {
    matches!(
        code,
        "no_leader" | "not_leader" | "read_only_region" | "region_lease_lost" | "rpo_bound"
    )
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Retry {
    /// Safe to repeat after any failure.
    Idempotent,
    /// Repeat only when the request certainly did not take effect.
    OnlyIfNotApplied,
}

impl Client {
    /// A client over `endpoints` (`HOST:PORT` or `http://HOST:PORT`) of a region without
    /// TLS, with a 10 s deadline per call.
    pub fn new<S: AsRef<str>>(endpoints: &[S]) -> Result<Client, ClientError> {
        Client::secured(endpoints, None, None)
    }

    /// A client that trusts the cluster CA of `tls` (and presents its client certificate,
    /// if any) and sends `token` (`NAME.SECRET`) with every call.
    pub fn secured<S: AsRef<str>>(
        endpoints: &[S],
        tls: Option<&TlsOptions>,
        token: Option<&str>,
    ) -> Result<Client, ClientError> {
        let endpoints = endpoints
            .iter()
            .map(|e| normalize(e.as_ref(), tls.is_some()))
            .collect::<Result<Vec<_>, _>>()?;
        if endpoints.is_empty() {
            return Err(ClientError::BadEndpoint(String::new()));
        }
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .pool_max_idle_per_host(64);
        if let Some(tls) = tls {
            builder = builder.use_preconfigured_tls(tls.client_config()?);
        }
        if let Some(token) = token {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", token.trim()))
                .map_err(|_| ClientError::Settings("the token holds characters a header cannot carry".into()))?;
            // Keeps the token out of debug output.
            value.set_sensitive(true);
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(reqwest::header::AUTHORIZATION, value);
            builder = builder.default_headers(headers);
        }
        let http = builder.build().map_err(|e| ClientError::Settings(e.to_string()))?;
        Ok(Client {
            endpoints,
            http,
            deadline: Duration::from_secs(10),
            preferred: AtomicUsize::new(0),
        })
    }

    /// Sets the overall deadline of each call, retries included.
    pub fn with_deadline(mut self, deadline: Duration) -> Client {
        self.deadline = deadline;
        self
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        retry: Retry,
    ) -> Result<T, ClientError> {
        self.call_within(self.deadline, method, path, body, retry).await
    }

    async fn call_within<B: Serialize, T: DeserializeOwned>(
        &self,
        deadline: Duration,
        method: Method,
        path: &str,
        body: Option<&B>,
        retry: Retry,
    ) -> Result<T, ClientError> {
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(5);
        let mut last_error = String::from("not tried");
        let mut attempt = 0usize;
        // Refusals by standby regions: once every endpoint refused, no retry will help.
        let mut read_only = 0usize;
        loop {
            let index = (self.preferred.load(Ordering::Relaxed) + attempt) % self.endpoints.len();
            attempt += 1;
            let remaining = deadline.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                // The next call starts with the endpoint this one would have tried next: a
                // hung node must not hold every call until its deadline.
                self.preferred.store(index, Ordering::Relaxed);
                return Err(ClientError::Unavailable {
                    deadline_ms: deadline.as_millis() as u64,
                    last_error,
                });
            }
            let url = format!("{}{}", self.endpoints[index], path);
            let mut request = self.http.request(method.clone(), &url).timeout(remaining);
            if let Some(body) = body {
                request = request.json(body);
            }
            match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    let bytes = match response.bytes().await {
                        Ok(bytes) => bytes,
                        Err(e) if retry == Retry::Idempotent => {
                            last_error = format!("{url}: {e}");
                            continue;
                        }
                        Err(e) => {
                            self.pass_over(index);
                            return Err(ClientError::Unknown(format!("{url}: {e}")));
                        }
                    };
                    if status.is_success() {
                        self.preferred.store(index, Ordering::Relaxed);
                        return serde_json::from_slice(&bytes)
                            .map_err(|e| ClientError::Unknown(format!("{url}: undecodable answer: {e}")));
                    }
                    let error = decode_error(status, &bytes);
                    if matches!(&error, ClientError::Api { code, .. } if code == "read_only_region") {
                        read_only += 1;
                        if read_only >= self.endpoints.len() {
                            return Err(error);
                        }
                    }
                    match &error {
                        ClientError::Api { code, .. } if retryable(code) => last_error = format!("{url}: {error}"),
                        ClientError::Api { code, .. } if outcome_unknown(code) && retry == Retry::Idempotent => {
                            last_error = format!("{url}: {error}")
                        }
                        _ => return Err(error),
                    }
                }
                Err(e) => {
                    let described = tls::describe(&e);
                    if let Some(hint) = tls::handshake_hint(&described) {
                        return Err(ClientError::Tls(format!("{url}: {described}; {hint}")));
                    }
                    if e.is_connect() || retry == Retry::Idempotent {
                        last_error = format!("{url}: {described}");
                    } else {
                        // Its outcome is unknown, but the next call starts elsewhere: a node
                        // that hangs (paused, cut off) must not take every write to it.
                        self.pass_over(index);
                        return Err(ClientError::Unknown(format!("{url}: {described}")));
                    }
                }
            }
            // After a full round of endpoints, pause before the next.
            if attempt.is_multiple_of(self.endpoints.len()) {
                tokio::time::sleep(backoff.min(deadline.saturating_sub(started.elapsed()))).await;
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
        }
    }

    /// The next call starts with the endpoint after `index` (unless another call has
    /// moved on already).
    fn pass_over(&self, index: usize) {
        let next = (index + 1) % self.endpoints.len();
        let _ = self
            .preferred
            .compare_exchange(index, next, Ordering::Relaxed, Ordering::Relaxed);
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None, Retry::Idempotent).await
    }

    pub async fn put(&self, key: &str, value: &str, options: PutOptions) -> Result<PutResponse, ClientError> {
        let body = PutRequest {
            value: value.to_string(),
            lease: options.lease,
            if_revision: options.if_revision,
        };
        self.call(Method::PUT, &kv_path(key), Some(&body), Retry::OnlyIfNotApplied)
            .await
    }

    /// Linearizable get; `None` when the key does not exist.
    pub async fn get_key(&self, key: &str, stale: bool) -> Result<Option<KeyValue>, ClientError> {
        let path = if stale {
            format!("{}?consistency=stale", kv_path(key))
        } else {
            kv_path(key)
        };
        match self.get::<KeyValue>(&path).await {
            Ok(kv) => Ok(Some(kv)),
            Err(e) if e.code() == Some("key_not_found") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Keys under `prefix` (the server answers at most 10,000 unless told otherwise).
    pub async fn range(&self, prefix: &str, stale: bool) -> Result<RangeResponse, ClientError> {
        self.range_limited(prefix, stale, None).await
    }

    /// Keys under `prefix`, at most `limit`.
    pub async fn range_limited(
        &self,
        prefix: &str,
        stale: bool,
        limit: Option<usize>,
    ) -> Result<RangeResponse, ClientError> {
        let mut path = format!("/v1/kv?prefix={}", encode(prefix));
        if let Some(limit) = limit {
            path.push_str(&format!("&limit={limit}"));
        }
        if stale {
            path.push_str("&consistency=stale");
        }
        self.get(&path).await
    }

    pub async fn delete(&self, key: &str) -> Result<DeleteResponse, ClientError> {
        self.call::<(), _>(Method::DELETE, &kv_path(key), None, Retry::OnlyIfNotApplied)
            .await
    }

    /// Changes under `prefix` from `from_revision` (or from now), resuming across nodes.
    pub fn watch(&self, prefix: &str, from_revision: Option<u64>) -> WatchStream {
        watch::start(self, prefix, from_revision)
    }

    pub async fn lease_grant(&self, ttl: Duration) -> Result<LeaseGrantResponse, ClientError> {
        let body = LeaseGrantRequest {
            ttl_ms: ttl.as_millis() as u64,
        };
        self.call(Method::POST, "/v1/leases", Some(&body), Retry::OnlyIfNotApplied)
            .await
    }

    pub async fn lease_keepalive(&self, id: u64) -> Result<LeaseKeepaliveResponse, ClientError> {
        self.call::<(), _>(
            Method::POST,
            &format!("/v1/leases/{id}/keepalive"),
            None,
            Retry::Idempotent,
        )
        .await
    }

    pub async fn lease_revoke(&self, id: u64) -> Result<(), ClientError> {
        self.call::<(), serde_json::Value>(
            Method::DELETE,
            &format!("/v1/leases/{id}"),
            None,
            Retry::OnlyIfNotApplied,
        )
        .await
        .map(|_| ())
    }

    pub async fn campaign(
        &self,
        name: &str,
        candidate: &str,
        lease: u64,
        wait: Option<Duration>,
    ) -> Result<CampaignResponse, ClientError> {
        let body = CampaignRequest {
            candidate: candidate.to_string(),
            lease,
            wait_ms: wait.map(|w| w.as_millis() as u64),
        };
        // Campaigning again with the same candidate and lease is idempotent in the store.
        let path = format!("/v1/elections/{}/campaign", encode(name));
        self.call(Method::POST, &path, Some(&body), Retry::OnlyIfNotApplied)
            .await
    }

    /// The current holder; `None` when nobody holds the election.
    pub async fn observe(&self, name: &str) -> Result<Option<ElectionState>, ClientError> {
        match self
            .get::<ElectionState>(&format!("/v1/elections/{}", encode(name)))
            .await
        {
            Ok(state) => Ok(Some(state)),
            Err(e) if e.code() == Some("no_holder") => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn resign(&self, name: &str, candidate: Option<&str>) -> Result<ElectionState, ClientError> {
        let body = ResignRequest {
            candidate: candidate.map(str::to_string),
        };
        let path = format!("/v1/elections/{}/resign", encode(name));
        self.call(Method::POST, &path, Some(&body), Retry::OnlyIfNotApplied)
            .await
    }

    pub async fn cluster(&self) -> Result<ClusterStatus, ClientError> {
        self.get("/v1/cluster").await
    }

    /// Every region of the deployment, as the answering node sees it.
    pub async fn regions(&self) -> Result<rampart_core::api::RegionsResponse, ClientError> {
        self.get("/v1/regions").await
    }

    /// Asks for a verification now: from a primary region's node, by every standby region;
    /// from a standby's, by that standby. Takes up to about 15 s.
    pub async fn regions_verify(&self) -> Result<rampart_core::api::VerifyResponse, ClientError> {
        self.call_within(
            Duration::from_secs(30),
            Method::POST,
            "/v1/regions/verify",
            None::<&()>,
            Retry::Idempotent,
        )
        .await
    }

    /// Makes `request.to` the primary region (`POST /v1/regions/failover`): planned when
    /// the primary region answers (nothing lost), else refused unless `allow_data_loss`.
    /// Never repeated once sent: a second failover would move the primary again.
    pub async fn regions_failover(
        &self,
        request: &rampart_core::api::FailoverRequest,
    ) -> Result<rampart_core::api::FailoverResponse, ClientError> {
        self.region_move("/v1/regions/failover", request).await
    }

    /// A planned failover back to `request.to` (`POST /v1/regions/failback`).
    pub async fn regions_failback(
        &self,
        request: &rampart_core::api::FailoverRequest,
    ) -> Result<rampart_core::api::FailoverResponse, ClientError> {
        self.region_move("/v1/regions/failback", request).await
    }

    async fn region_move(
        &self,
        path: &str,
        request: &rampart_core::api::FailoverRequest,
    ) -> Result<rampart_core::api::FailoverResponse, ClientError> {
        let deadline = Duration::from_secs(90);
        self.call_within(deadline, Method::POST, path, Some(request), Retry::OnlyIfNotApplied)
            .await
    }

    /// The divergence files on the answering node, and the region's divergence events.
    pub async fn regions_divergence(&self) -> Result<rampart_core::api::DivergenceResponse, ClientError> {
        self.get("/v1/regions/divergence").await
    }

    /// One divergence file of the answering node: `{"name", "node_id", "writes": [...]}`,
    /// each write as the file's line holds it.
    pub async fn regions_divergence_export(&self, name: &str) -> Result<serde_json::Value, ClientError> {
        self.get(&format!("/v1/regions/divergence/{name}")).await
    }

    pub async fn members(&self) -> Result<MembersResponse, ClientError> {
        self.get("/v1/cluster/members").await
    }

    pub async fn add_member(&self, id: u64, addr: &str) -> Result<MembersResponse, ClientError> {
        let body = AddMemberRequest {
            id,
            addr: addr.to_string(),
        };
        self.call(
            Method::POST,
            "/v1/cluster/members",
            Some(&body),
            Retry::OnlyIfNotApplied,
        )
        .await
    }

    pub async fn token_create(&self, request: &TokenCreateRequest) -> Result<TokenCreated, ClientError> {
        self.call(Method::POST, "/v1/tokens", Some(request), Retry::OnlyIfNotApplied)
            .await
    }

    pub async fn tokens(&self) -> Result<TokensResponse, ClientError> {
        self.get("/v1/tokens").await
    }

    pub async fn token_revoke(&self, name: &str) -> Result<(), ClientError> {
        self.call::<(), serde_json::Value>(
            Method::DELETE,
            &format!("/v1/tokens/{}", encode(name)),
            None,
            Retry::OnlyIfNotApplied,
        )
        .await
        .map(|_| ())
    }

    /// The region's newest events (at most `limit`), oldest first; `kind` filters.
    pub async fn events(&self, kind: Option<&str>, limit: Option<usize>) -> Result<EventsResponse, ClientError> {
        let mut query = Vec::new();
        if let Some(kind) = kind {
            query.push(format!("kind={}", encode(kind)));
        }
        if let Some(limit) = limit {
            query.push(format!("limit={limit}"));
        }
        let path = if query.is_empty() {
            "/v1/events".to_string()
        } else {
            format!("/v1/events?{}", query.join("&"))
        };
        self.get(&path).await
    }

    /// Creates a service or replaces its policy.
    pub async fn service_put(
        &self,
        name: &str,
        policy: &rampart_core::service::PolicySpec,
    ) -> Result<Stored, ClientError> {
        let path = format!("/v1/services/{}", encode(name));
        // Putting the same policy twice leaves the same registry (the revision moves once
        // more, as a repeated key write does).
        self.call(Method::PUT, &path, Some(policy), Retry::Idempotent).await
    }

    /// Registers an instance of a service or replaces its registration.
    pub async fn instance_put(
        &self,
        service: &str,
        id: &str,
        instance: &rampart_core::service::InstanceSpec,
    ) -> Result<Stored, ClientError> {
        let path = format!("/v1/services/{}/instances/{}", encode(service), encode(id));
        self.call(Method::PUT, &path, Some(instance), Retry::Idempotent).await
    }

    pub async fn services(&self) -> Result<ServicesResponse, ClientError> {
        self.get("/v1/services").await
    }

    pub async fn service(&self, name: &str) -> Result<ServiceView, ClientError> {
        self.get(&format!("/v1/services/{}", encode(name))).await
    }

    /// A blocking read of a service: answers once its view is no longer the one at `index`
    /// (a `ServiceView::index` from an earlier answer of the same node), or after `wait`
    /// unchanged. A node that does not know `index` (the call moved to another node)
    /// answers at once. How a proxy follows the registry.
    pub async fn service_watch(&self, name: &str, index: u64, wait: Duration) -> Result<ServiceView, ClientError> {
        let path = format!(
            "/v1/services/{}?index={index}&wait={}ms",
            encode(name),
            wait.as_millis()
        );
        let deadline = wait + self.deadline;
        self.call_within::<(), _>(deadline, Method::GET, &path, None, Retry::Idempotent)
            .await
    }

    /// Asks the region's leader to take a backup to its `[backup]` destination; waits up to
    /// `wait` for it to finish. Not repeated once sent.
    pub async fn backup_create(&self, wait: Duration) -> Result<rampart_core::backup::Manifest, ClientError> {
        self.call_within::<(), _>(wait, Method::POST, "/v1/backups", None, Retry::OnlyIfNotApplied)
            .await
    }

    /// The backups at the region's destination, oldest first.
    pub async fn backups(&self) -> Result<rampart_core::backup::BackupsResponse, ClientError> {
        self.get("/v1/backups").await
    }

    /// Asks the leader to verify backup `id` (the newest when `None`) by restoring it into
    /// a temporary directory; waits up to `wait`.
    pub async fn backup_verify(
        &self,
        id: Option<&str>,
        wait: Duration,
    ) -> Result<rampart_core::backup::Manifest, ClientError> {
        let body = rampart_core::backup::VerifyRequest {
            id: id.map(str::to_string),
        };
        self.call_within(wait, Method::POST, "/v1/backups/verify", Some(&body), Retry::Idempotent)
            .await
    }

    /// Takes one request's worth of `client`'s standing in cluster-scope quota `name` under
    /// `limits`: `Ok(Ok(used_today))`, or `Ok(Err(over))` when over a limit. Answered
    /// within `deadline`; not repeated once sent (a repeat could count a request twice).
    pub async fn quota_take(
        &self,
        name: &str,
        client: &str,
        limits: rampart_core::proxy::Tier,
        deadline: Duration,
    ) -> Result<Result<u64, rampart_core::proxy::OverQuota>, ClientError> {
        let path = format!("/v1/quotas/{}/take", encode(name));
        let body = QuotaTakeRequest {
            client: client.to_string(),
            rate: limits.rate,
            burst: limits.rate.map(|_| limits.burst),
            daily: limits.daily,
        };
        let answer = self
            .call_within::<_, QuotaTakeResponse>(deadline, Method::POST, &path, Some(&body), Retry::OnlyIfNotApplied)
            .await;
        match answer {
            Ok(taken) => Ok(Ok(taken.used_today)),
            Err(ClientError::Api {
                status: 429,
                current: Some(current),
                ..
            }) => Ok(Err(rampart_core::proxy::OverQuota::named(
                current["limit"].as_str().unwrap_or("daily"),
                current["retry_after_ms"].as_u64().unwrap_or(1000),
            ))),
            Err(e) => Err(e),
        }
    }

    /// For every instance: whether it could be promoted now and, if not, every reason.
    pub async fn eligibility(&self, name: &str) -> Result<EligibilityResponse, ClientError> {
        self.get(&format!("/v1/services/{}/eligibility", encode(name))).await
    }

    /// An instance's heartbeat (for `heartbeat` checks), with its replication lag if it
    /// has one; answers its role and its service's primary and fencing token.
    pub async fn heartbeat(&self, service: &str, id: &str, lag: Option<u64>) -> Result<HeartbeatResponse, ClientError> {
        let path = format!("/v1/services/{}/instances/{}/heartbeat", encode(service), encode(id));
        self.call(Method::POST, &path, Some(&HeartbeatRequest { lag }), Retry::Idempotent)
            .await
    }

    /// Planned switchover to `to`: the old primary steps down (its `on_demote` hook), the
    /// target catches up, then it is promoted. Not retried once sent: a repeat after an
    /// unknown outcome could move the role twice.
    pub async fn switchover(&self, service: &str, to: &str) -> Result<SwitchoverResponse, ClientError> {
        let path = format!("/v1/services/{}/switchover", encode(service));
        let body = SwitchoverRequest { to: to.to_string() };
        self.call(Method::POST, &path, Some(&body), Retry::OnlyIfNotApplied)
            .await
    }

    pub async fn remove_member(&self, id: u64) -> Result<MembersResponse, ClientError> {
        self.call::<(), _>(
            Method::DELETE,
            &format!("/v1/cluster/members/{id}"),
            None,
            Retry::OnlyIfNotApplied,
        )
        .await
    }
}

fn decode_error(status: StatusCode, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => ClientError::Api {
            status: status.as_u16(),
            code: body.error.code,
            message: body.error.message,
            current: body.error.current,
        },
        Err(_) => ClientError::Api {
            status: status.as_u16(),
            code: "http_error".to_string(),
            message: String::from_utf8_lossy(bytes).chars().take(200).collect(),
            current: None,
        },
    }
}

fn kv_path(key: &str) -> String {
    format!("/v1/kv/{}", encode_path(key))
}

/// Percent-encodes a query value.
pub(crate) fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// Percent-encodes a key for the path, keeping `/` so keys read naturally.
fn encode_path(key: &str) -> String {
    key.split('/').map(encode).collect::<Vec<_>>().join("/")
}
