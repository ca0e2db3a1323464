//! The admin listener (`[proxy] admin`): `GET /metrics` (Prometheus text) and, per
//! listener, the health-oracle endpoints an external load balancer checks, as HAProxy
//! checks Patroni's `/primary` and `/replica`:
//!
//! - `/listeners/{name}/primary`: 200 when the listener's service has a serving primary
//!   (with `?instance=ID`: when that instance is it), else 503.
//! - `/listeners/{name}/replica`: 200 when the service has a serving replica (with
//!   `?instance=ID`: when that instance is one), else 503.
//! - `/listeners/{name}/health`: 200 when the listener can pass traffic now (an upstream in
//!   rotation, or replicas for reads in read-only mode), else 503; the body lists each
//!   upstream's standing.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rampart_core::proxy::{route, serving_replicas, Route};
use serde_json::json;
use tokio::net::TcpListener;

use crate::http::{error, json, Body};
use crate::metrics::Metrics;
use crate::target::Target;

pub async fn serve_admin(
    socket: TcpListener,
    metrics: Arc<Metrics>,
    targets: BTreeMap<String, Arc<Target>>,
) -> io::Result<()> {
    let targets = Arc::new(targets);
    loop {
        let (stream, _) = crate::accept(&socket, "admin").await;
        let metrics = metrics.clone();
        let targets = targets.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let answer = answer(&request, &metrics, &targets);
                async move { Ok::<_, Infallible>(answer) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(request: &Request<Incoming>, metrics: &Metrics, targets: &BTreeMap<String, Arc<Target>>) -> Response<Body> {
    let path = request.uri().path();
    if path == "/metrics" {
        let body = Full::new(Bytes::from(metrics.encode())).map_err(|never| match never {});
        let mut response = Response::new(body.boxed_unsync());
        response.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        return response;
    }
    let Some((name, check)) = path.strip_prefix("/listeners/").and_then(|rest| rest.split_once('/')) else {
        return not_found(path);
    };
    let Some(target) = targets.get(name) else {
        return error(
            StatusCode::NOT_FOUND,
            "listener_not_found",
            &format!("no listener named {name:?}"),
        );
    };
    let instance = request
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|pair| pair.strip_prefix("instance="));
    match check {
        "health" => health(name, target),
        "primary" | "replica" => oracle(name, target, check == "primary", instance),
        _ => not_found(path),
    }
}

fn not_found(path: &str) -> Response<Body> {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        &format!("no {path}: try /metrics or /listeners/NAME/primary, /replica or /health"),
    )
}

fn status(ok: bool) -> StatusCode {
    if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

fn health(name: &str, target: &Target) -> Response<Body> {
    let read_only = target.read_only();
    let pool = if read_only { &target.readers } else { &target.pool };
    let upstreams = pool.standings();
    let in_rotation = upstreams.iter().filter(|u| u.in_rotation).count();
    json(
        status(in_rotation > 0),
        &json!({
            "listener": name,
            "in_rotation": in_rotation,
            "read_only": read_only,
            "upstreams": upstreams,
        }),
    )
}

fn oracle(name: &str, target: &Target, primary: bool, instance: Option<&str>) -> Response<Body> {
    let Some((service, _)) = &target.service else {
        return error(
            StatusCode::NOT_FOUND,
            "static_listener",
            &format!("listener {name} has static upstreams: it has no primary or replicas"),
        );
    };
    let Some(view) = target.view() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_view",
            &Target::no_view(name, service),
        );
    };
    let replicas: Vec<&String> = serving_replicas(&view).collect();
    let serving_primary = route(&view, Route::Primary).primary;
    let ok = match (primary, instance) {
        (true, None) => serving_primary.is_some(),
        (true, Some(id)) => serving_primary.as_deref() == Some(id),
        (false, None) => !replicas.is_empty(),
        (false, Some(id)) => replicas.iter().any(|r| *r == id),
    };
    json(
        status(ok),
        &json!({
            "service": service,
            "primary": serving_primary,
            "token": view.token,
            "replicas": replicas,
            "instance": instance,
        }),
    )
}
