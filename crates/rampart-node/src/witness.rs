//! `rampart node --witness`: a one-node region that keeps no replicated data. It answers
//! region health as every node does (`GET /v1/cluster`, saying it is a witness), watches
//! the other regions as every node does (`GET /v1/regions`, `/health/regions`,
//! `/metrics/regions`), and is the tie-breaking vote of region failover (the region lease,
//! built on this). No Raft, no store, no tokens: a few MiB.
//!
//! On TLS it serves `/v1` only to node certificates of the cluster CA (other regions'
//! nodes, and an operator with a node certificate): it holds no tokens to check.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Json;
use rampart_core::api::{ClusterStatus, Member, RegionStatus, RegionsResponse};
use rampart_core::config::NodeConfig;

use rampart_core::region::lease::{Decided, Grantor, Promise, RenewAnswer, Renewal, VoteAnswer, VoteRequest};

use crate::auth::Connection;
use crate::controllers::{region_lease, regions};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::start::{self, NodeError};
use crate::tls::NodeTls;

struct Witness {
    config: NodeConfig,
    seen: regions::Seen,
    metrics: Metrics,
    /// Its side of the region lease; the promise is kept in `PROMISE_FILE` before any
    /// answer that depends on it goes out. Locked across the write: one decision at a time.
    grantor: tokio::sync::Mutex<Grantor>,
    clock: Instant,
}

/// The witness's promise in the region lease, in its data dir (JSON).
const PROMISE_FILE: &str = "region-promise.json";

type Shared = Arc<Witness>;

pub async fn run(config: NodeConfig) -> Result<(), NodeError> {
    start::owner_only_data_dir(&config.data_dir)?;
    let tls = config.tls.as_ref().map(NodeTls::load).transpose()?;
    start::log_security(&config);
    let listener = start::bind(&config).await?;
    let http = start::region_client(tls.as_ref())?;
    tracing::info!(
        id = config.id,
        listen = %config.listen,
        region = %config.region,
        primary = %config.regions.primary,
        "witness started: keeps no data, answers region health and grants the region lease"
    );
    let promise = read_promise(&config.data_dir)?;
    let clock = Instant::now();
    // Like a region's new leader: a grant it may have given before it stopped runs a whole
    // lease from now.
    let grantor = Grantor::new(0, promise, config.regions.region_lease_ms);
    let witness = Arc::new(Witness {
        config,
        seen: Default::default(),
        metrics: Metrics::new(),
        grantor: tokio::sync::Mutex::new(grantor),
        clock,
    });
    tokio::spawn(watch_regions(witness.clone(), http, tls.is_some()));
    let router = router(witness.clone());
    let serve = crate::server::accept_each(listener, &witness.metrics, move |stream, source| {
        let (router, tls) = (router.clone(), tls.clone());
        async move {
            let Some(tls) = tls else {
                let connection = Connection {
                    source,
                    from_node: false,
                    region_link: false,
                };
                return crate::server::serve_http(stream, connection, router).await;
            };
            let accepted = tokio::time::timeout(crate::server::FIRST_BYTES_TIMEOUT, tls.acceptor.accept(stream));
            let Ok(Ok(stream)) = accepted.await else { return };
            let (_, session) = stream.get_ref();
            let connection = Connection {
                source,
                from_node: crate::tls::is_node_certificate(session.peer_certificates()),
                region_link: session.alpn_protocol() == Some(crate::tls::REGION_ALPN),
            };
            crate::server::serve_http(stream, connection, router).await;
        }
    });
    tokio::select! {
        _ = serve => Ok(()),
        _ = start::shutdown_signal() => {
            tracing::info!("witness stopping");
            Ok(())
        }
    }
}

/// Asks every other region for its status each `health_check_interval`, as nodes do.
async fn watch_regions(witness: Shared, http: reqwest::Client, tls: bool) {
    let regions = witness.config.regions.clone();
    let mut tick = tokio::time::interval(Duration::from_millis(regions.health_check_interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = vec![0usize; regions.known.len()];
    loop {
        tick.tick().await;
        for (name, reach) in regions::poll(&http, tls, &regions, &witness.seen, &mut first).await {
            tracing::warn!(region = %name, "region {name}: {reach:?}");
        }
    }
}

fn router(witness: Shared) -> axum::Router {
    let ok = || async { Json(serde_json::json!({ "status": "ok" })) };
    axum::Router::new()
        .route("/v1/cluster", get(cluster))
        .route("/v1/regions", get(list))
        .route("/v1/regions/lease", axum::routing::post(renew))
        .route("/v1/regions/vote", axum::routing::post(vote))
        .route("/health/live", get(ok))
        .route("/health/ready", get(ok))
        .route("/health/regions", get(health))
        .route("/metrics", get(metrics))
        .route("/metrics/regions", get(metrics_regions))
        .layer(axum::middleware::from_fn_with_state(
            witness.clone(),
            node_certificates_only,
        ))
        .with_state(witness)
}

/// On TLS, `/v1` is for node certificates only: a witness holds no tokens.
async fn node_certificates_only(
    State(witness): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let from_node = request.extensions().get::<Connection>().is_some_and(|c| c.from_node);
    if witness.config.tls.is_some() && request.uri().path().starts_with("/v1") && !from_node {
        return crate::error::ApiError::new(
            axum::http::StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "a witness holds no tokens: call it with a node certificate of the cluster CA",
        )
        .into_response();
    }
    next.run(request).await
}

async fn cluster(State(witness): State<Shared>) -> Json<ClusterStatus> {
    let config = &witness.config;
    let (primary_region, epoch) = primary_and_epoch(&witness).await;
    Json(ClusterStatus {
        region: config.region.clone(),
        node_id: config.id,
        leader: Some(config.id),
        term: 0,
        revision: 0,
        checksum: String::new(),
        local_revision: 0,
        local_checksum: String::new(),
        commit_index: 0,
        applied_index: 0,
        snapshot_index: 0,
        purged_index: 0,
        first_log_index: 0,
        log_readers: Default::default(),
        members: vec![Member {
            id: config.id,
            addr: config.advertise.to_string(),
            role: "witness".into(),
        }],
        security: config.security().as_str().to_string(),
        witness: true,
        epoch,
        primary_region: Some(primary_region),
    })
}

/// The primary region and epoch as the witness last heard them from the data regions (the
/// configured primary at the first epoch until one says otherwise). Never its own promise:
/// a promise is not a promotion.
async fn primary_and_epoch(witness: &Witness) -> (String, u64) {
    let seen = witness.seen.lock().expect("regions lock").clone();
    let first = rampart_core::region::FIRST_EPOCH;
    regions::current_primary(&witness.config.regions.primary, first, &seen)
}

/// The promise kept in `data_dir`, if any.
fn read_promise(data_dir: &std::path::Path) -> Result<Option<Promise>, NodeError> {
    let path = data_dir.join(PROMISE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| NodeError::Store {
            path: path.display().to_string(),
            message: format!("not a region promise: {e}"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(NodeError::Store {
            path: path.display().to_string(),
            message: e.to_string(),
        }),
    }
}

/// Keeps `promise` durably: a temporary file, fsync, rename, fsync of the directory.
fn keep_promise(data_dir: &std::path::Path, promise: &Promise) -> std::io::Result<()> {
    use std::io::Write;
    let path = data_dir.join(PROMISE_FILE);
    let temp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temp)?;
    file.write_all(&serde_json::to_vec(promise).expect("a promise encodes"))?;
    file.sync_all()?;
    std::fs::rename(&temp, &path)?;
    std::fs::File::open(data_dir)?.sync_all()
}

/// The witness decides, keeps a new promise, then answers.
async fn grant<A>(witness: &Witness, decide: impl FnOnce(&mut Grantor, u64) -> Decided<A>) -> Result<A, ApiError> {
    let mut grantor = witness.grantor.lock().await;
    let before = grantor.clone();
    let now = witness.clock.elapsed().as_millis() as u64;
    let decided = decide(&mut grantor, now);
    if let Some(promise) = &decided.persist {
        let data_dir = witness.config.data_dir.clone();
        let promise = promise.clone();
        let kept = tokio::task::spawn_blocking(move || keep_promise(&data_dir, &promise)).await;
        if let Err(e) = kept.map_err(std::io::Error::other).and_then(|kept| kept) {
            *grantor = before;
            tracing::error!("cannot keep the region promise: {e}");
            return Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "promise_not_kept",
                format!("the witness could not keep its promise in {PROMISE_FILE}: {e}"),
            ));
        }
    }
    Ok(decided.answer)
}

/// `POST /v1/regions/lease`: the primary's renewal.
async fn renew(State(witness): State<Shared>, Json(renewal): Json<Renewal>) -> Result<Json<RenewAnswer>, ApiError> {
    grant(&witness, |grantor, now| grantor.renew(now, &renewal))
        .await
        .map(Json)
}

/// `POST /v1/regions/vote`: a standby asks for the next epoch.
async fn vote(State(witness): State<Shared>, Json(request): Json<VoteRequest>) -> Result<Json<VoteAnswer>, ApiError> {
    let regions = &witness.config.regions;
    let seen = witness.seen.lock().expect("regions lock").clone();
    grant(&witness, |grantor, now| {
        let holder = grantor.promise().map(|p| p.region.clone());
        let facts = region_lease::vote_facts(regions, &seen, holder.as_deref(), None, &request, 0);
        grantor.vote(now, &request, facts.as_facts())
    })
    .await
    .map(Json)
}

/// The regions as this witness sees them: itself, then each other one as last heard.
async fn view(witness: &Witness) -> RegionsResponse {
    let config = &witness.config;
    let (primary, epoch) = primary_and_epoch(witness).await;
    let now = Instant::now();
    let seen = witness.seen.lock().expect("regions lock").clone();
    let own = RegionStatus {
        last_contact_ms: Some(crate::node::now_ms()),
        leader: Some(config.id),
        ..RegionStatus::unheard(&config.region, "witness", true, vec![config.advertise.to_string()])
    };
    let others = config
        .regions
        .known
        .iter()
        .map(|(name, region)| regions::seen_as(&config.regions, &primary, name, region, seen.get(name), now))
        .collect::<Vec<_>>();
    RegionsResponse {
        region: config.region.clone(),
        primary,
        epoch,
        auto_failover: config.regions.auto_failover,
        failover_note: regions::failover_note(&config.regions),
        lease: None,
        rpo_bound: None,
        divergence: Vec::new(),
        promise: witness.grantor.lock().await.promise().cloned(),
        regions: std::iter::once(own).chain(others).collect(),
    }
}

async fn list(State(witness): State<Shared>) -> Json<RegionsResponse> {
    Json(view(&witness).await)
}

async fn health(State(witness): State<Shared>) -> Response {
    regions::health_answer(&view(&witness).await, witness.config.regions.max_lag_ms)
}

async fn metrics(State(witness): State<Shared>) -> Response {
    witness.metrics.set_regions(&view(&witness).await);
    (
        [("content-type", "text/plain; version=0.0.4")],
        witness.metrics.render(),
    )
        .into_response()
}

async fn metrics_regions(State(witness): State<Shared>) -> Response {
    witness.metrics.set_regions(&view(&witness).await);
    let text = witness.metrics.render_only(crate::metrics::REGION_FAMILIES);
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}
