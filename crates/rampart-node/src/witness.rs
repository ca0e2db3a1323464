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

use crate::auth::Connection;
use crate::controllers::regions;
use crate::metrics::Metrics;
use crate::start::{self, NodeError};
use crate::tls::NodeTls;

struct Witness {
    config: NodeConfig,
    seen: regions::Seen,
    metrics: Metrics,
}

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
        "witness started: keeps no data, answers region health"
    );
    let witness = Arc::new(Witness {
        config,
        seen: Default::default(),
        metrics: Metrics::new(),
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
        epoch: rampart_core::region::FIRST_EPOCH,
    })
}

/// The regions as this witness sees them: itself, then each other one as last heard.
fn view(witness: &Witness) -> RegionsResponse {
    let config = &witness.config;
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
        .map(|(name, region)| regions::seen_as(&config.regions, name, region, seen.get(name), now));
    RegionsResponse {
        region: config.region.clone(),
        primary: config.regions.primary.clone(),
        regions: std::iter::once(own).chain(others).collect(),
    }
}

async fn list(State(witness): State<Shared>) -> Json<RegionsResponse> {
    Json(view(&witness))
}

async fn health(State(witness): State<Shared>) -> Response {
    regions::health_answer(&view(&witness), witness.config.regions.max_lag_ms)
}

async fn metrics(State(witness): State<Shared>) -> Response {
    witness.metrics.set_regions(&view(&witness));
    (
        [("content-type", "text/plain; version=0.0.4")],
        witness.metrics.render(),
    )
        .into_response()
}

async fn metrics_regions(State(witness): State<Shared>) -> Response {
    witness.metrics.set_regions(&view(&witness));
    let text = witness.metrics.render_only(crate::metrics::REGION_FAMILIES);
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}
