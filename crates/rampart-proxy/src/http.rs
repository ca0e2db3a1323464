//! L7: an HTTP/1.1 and HTTP/2 (h2c) reverse proxy. Each request goes to an upstream picked by the balancer,
//! over kept connections per upstream (`upstream::Conns`, one set per worker thread: a
//! connection and its upstream exchanges stay on one thread). A request whose
//! connect fails is sent to the next upstream at once, whatever its method, since it never
//! left; its body is buffered (up to [`BODY_BYTES_MAX`]) so it can be. An idempotent
//! request whose upstream failed or did not answer within the listener's `try_timeout` is
//! tried on another upstream, up to `retries` times and within a retry budget (20% of
//! requests plus 10 a second). The response streams back. When no upstream can be reached
//! the client gets 502 (504 after a timeout) with a JSON reason.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, HOST};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rampart_core::proxy::{admit, client_hash, idempotent, Failure, Listener, Priority, Quota, QuotaKey, RetryBudget};
use tokio::net::TcpListener;

use crate::h1;
use crate::metrics::{ListenerLabels, Metrics, QuotaLabels, ShedLabels, StatusLabels};
use crate::now_ms;
use crate::pool::Pool;
use crate::quota::{Counted, Standings};
use crate::target::Target;
use crate::tcp::Decrement;
use crate::upstream::{BodyError, Conns, Failed, UpstreamBody};

/// Retries may add this share of the requests, plus [`RETRY_FLOOR_PER_S`] a second.
const RETRY_PERCENT: u64 = 20;
const RETRY_FLOOR_PER_S: u64 = 10;

/// The largest request body the proxy buffers to be able to send it again.
pub const BODY_BYTES_MAX: usize = 8 << 20;

pub(crate) type Body = UnsyncBoxBody<Bytes, BodyError>;

/// A listener's state as one worker sees it: its own kept upstream connections, everything else
/// shared by every worker of the listener.
#[derive(Clone)]
struct Shared {
    listener: Listener,
    target: Arc<Target>,
    budget: Arc<Mutex<RetryBudget>>,
    /// Requests being forwarded (until their response head), for shedding.
    in_flight: Arc<AtomicU32>,
    quotas: Arc<Standings>,
    /// This worker's kept upstream connections.
    conns: Arc<Conns>,
    metrics: Arc<Metrics>,
    labels: ListenerLabels,
    /// This listener's series, looked up once instead of per request.
    active: prometheus_client::metrics::gauge::Gauge,
    upstream_seconds: prometheus_client::metrics::histogram::Histogram,
    /// `requests_total` by status code, each made on first use.
    answered: Box<[std::sync::OnceLock<prometheus_client::metrics::counter::Counter>]>,
}

/// Kept HTTP/1.1 connections to upstreams; they live on the runtime that made them.
fn upstream_conns(listener: &Listener) -> Arc<Conns> {
    Arc::new(Conns::new(Duration::from_millis(listener.connect_timeout_ms)))
}

/// Serves the listener's connections on worker threads (`workers`), each with its own kept
/// upstream connections.
pub async fn serve(
    listener: Listener,
    socket: TcpListener,
    target: Arc<Target>,
    metrics: Arc<Metrics>,
    control: Option<Arc<rampart_client::Client>>,
) -> io::Result<()> {
    let labels = Metrics::listener(&listener.name);
    let active = metrics.active.get_or_create(&labels).clone();
    let upstream_seconds = metrics.upstream_seconds.get_or_create(&labels).clone();
    let quotas = Arc::new(Standings::new(&listener.name, control));
    let shared = Shared {
        quotas,
        active,
        upstream_seconds,
        answered: (0..600).map(|_| std::sync::OnceLock::new()).collect(),
        labels,
        metrics,
        conns: upstream_conns(&listener),
        listener,
        target,
        budget: Arc::new(Mutex::new(RetryBudget::new(RETRY_PERCENT, RETRY_FLOOR_PER_S))),
        in_flight: Arc::new(AtomicU32::new(0)),
    };
    let name = shared.listener.name.clone();
    let state = move || Shared {
        conns: upstream_conns(&shared.listener),
        ..shared.clone()
    };
    crate::workers::serve_on_workers(&name, socket, state, serve_connection).await
}

/// Serves one client connection: HTTP/1.1, or HTTP/2 when the client opens with its
/// preface (h2c, prior knowledge); upstreams are spoken to in HTTP/1.1 either way.
async fn serve_connection(shared: Arc<Shared>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    // The client's address as X-Forwarded-For gets it, once per connection.
    let peer_ip = HeaderValue::from_str(&peer.ip().to_string()).expect("an address is a header value");
    let service = hyper::service::service_fn(move |request| {
        let shared = shared.clone();
        let peer_ip = peer_ip.clone();
        async move { Ok::<_, Infallible>(handle(&shared, request, peer, peer_ip).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // One buffer, one write(2) per response, rather than writev(2) of head and body.
    builder.http1().writev(false);
    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
}

/// One request, counted in the metrics.
async fn handle(shared: &Shared, request: Request<Incoming>, peer: SocketAddr, peer_ip: HeaderValue) -> Response<Body> {
    shared.active.inc();
    let _done = Decrement(shared.active.clone());
    let response = admit_and_forward(shared, request, peer, peer_ip).await;
    let code = response.status().as_u16();
    let counter = shared.answered[usize::from(code) % shared.answered.len()].get_or_init(|| {
        let labels = StatusLabels {
            listener: shared.listener.name.clone(),
            code: code.to_string(),
        };
        shared.metrics.requests.get_or_create(&labels).clone()
    });
    counter.inc();
    response
}

/// Admits the request by its priority under the listener's `max_requests`, applies fault
/// injection if the listener has it, then forwards it.
async fn admit_and_forward(
    shared: &Shared,
    request: Request<Incoming>,
    peer: SocketAddr,
    peer_ip: HeaderValue,
) -> Response<Body> {
    if let Some(fault) = shared.listener.fault {
        let injected = fault.decide(rand::random::<u32>() % 100, rand::random::<u32>() % 100);
        if injected.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(injected.delay_ms)).await;
        }
        if let Some(status) = injected.abort_status {
            shared.metrics.faults.get_or_create(&shared.labels).inc();
            return error(
                StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                "fault_injected",
                &format!(
                    "listener {} aborted this request by fault injection",
                    shared.listener.name
                ),
            );
        }
    }
    if let Some(quota) = &shared.listener.quota {
        if let Some(refusal) = charge(shared, quota, &request, peer).await {
            return refusal;
        }
    }
    let Some(max) = shared.listener.max_requests else {
        return forward(shared, request, peer, peer_ip).await;
    };
    let priority = Priority::from_header(request.headers().get("x-priority").and_then(|v| v.to_str().ok()));
    let admitted = shared
        .in_flight
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            admit(priority, n, max).then_some(n + 1)
        })
        .is_ok();
    if !admitted {
        let labels = ShedLabels {
            listener: shared.listener.name.clone(),
            priority: format!("{priority:?}").to_lowercase(),
        };
        shared.metrics.shed.get_or_create(&labels).inc();
        return unavailable(
            "overloaded",
            &format!(
                "listener {} is at its limit of {max} requests in flight; {priority:?} priority requests are shed",
                shared.listener.name
            ),
        );
    }
    // Counted down when done, or when the client goes away and the future is dropped.
    let _in_flight = InFlight(&shared.in_flight);
    forward(shared, request, peer, peer_ip).await
}

/// Charges the request to its client's allowance; the 429 to send if it is over.
async fn charge(
    shared: &Shared,
    quota: &Quota,
    request: &Request<Incoming>,
    peer: SocketAddr,
) -> Option<Response<Body>> {
    let client = match &quota.key {
        QuotaKey::Ip => peer.ip().to_string(),
        QuotaKey::Header(name) => match request.headers().get(name.as_str()).and_then(|v| v.to_str().ok()) {
            Some(value) => value.to_string(),
            // Without its key a client is counted, in the default tier, by its address.
            None => format!("ip:{}", peer.ip()),
        },
    };
    let (tier_name, tier) = quota.tier_of(&client);
    let counted = shared.quotas.take(&client, tier, quota.cluster).await;
    if let Counted::Fallback(_) = counted {
        shared.metrics.quota_fallbacks.get_or_create(&shared.labels).inc();
    }
    let Err(over) = counted.outcome() else { return None };
    let labels = QuotaLabels {
        listener: shared.listener.name.clone(),
        tier: tier_name.to_string(),
        limit: over.limit.to_string(),
    };
    shared.metrics.quota_rejections.get_or_create(&labels).inc();
    let retry_after_s = over.retry_after_ms.div_ceil(1000).max(1);
    let body = serde_json::json!({
        "error": {
            "code": "quota_exceeded",
            "message": format!("over the {} limit of tier {tier_name}", over.limit),
        },
        "tier": tier_name,
        "limit": over.limit,
        "retry_after_s": retry_after_s,
    });
    let mut response = json(StatusCode::TOO_MANY_REQUESTS, &body);
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&retry_after_s.to_string()) {
        headers.insert(hyper::header::RETRY_AFTER, value);
    }
    Some(response)
}

struct InFlight<'a>(&'a AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn forward(
    shared: &Shared,
    request: Request<Incoming>,
    peer: SocketAddr,
    peer_ip: HeaderValue,
) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let body = match Limited::new(body, BODY_BYTES_MAX).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                &format!("request bodies are limited to {BODY_BYTES_MAX} bytes"),
            )
        }
    };
    // HTTP/2 carries the host in the URI (:authority), HTTP/1.1 in the Host header.
    let original_host = parts.headers.get(HOST).cloned().or_else(|| {
        parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    let path = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| hyper::http::uri::PathAndQuery::from_static("/"));
    let key = client_hash(peer.ip());
    let idempotent = idempotent(parts.method.as_str());
    let head_request = parts.method == hyper::Method::HEAD;
    let pool = match choose_pool(shared, parts.method.as_str()) {
        Ok(pool) => pool,
        Err((code, message)) => return unavailable(code, &message),
    };
    let mut retries_left = shared.listener.retries;
    shared.budget.lock().expect("budget lock").deposit();
    // Upstreams that failed this request (filled only on failure: no allocation otherwise).
    let mut tried: Vec<String> = Vec::new();
    for _ in 0..pool.len() {
        let Some(lease) = pool.pick(key, &tried) else {
            break;
        };
        let authority = lease.authority();
        let host = match &original_host {
            Some(host) => host.clone(),
            None => HeaderValue::from_str(authority.as_str()).expect("an authority is a header value"),
        };
        let outgoing = h1::encode_request(&parts.method, path.as_str(), &host, &parts.headers, &peer_ip, &body);
        let try_timeout = Duration::from_millis(shared.listener.try_timeout_ms);
        let sent = std::time::Instant::now();
        let exchange = shared.conns.send(&authority, &outgoing, head_request, idempotent);
        let answer = tokio::select! {
            answer = tokio::time::timeout(try_timeout, exchange) => answer,
            () = lease.closed() => {
                lease.failed(Failure::Error);
                return error(
                    StatusCode::BAD_GATEWAY,
                    "upstream_left",
                    &format!("upstream {} left the listener before it answered", lease.address()),
                );
            }
        };
        let failure = match answer {
            Ok(Ok(response)) => {
                shared.upstream_seconds.observe(sent.elapsed().as_secs_f64());
                if response.status().is_server_error() {
                    lease.failed(Failure::Error);
                } else {
                    lease.succeeded();
                }
                // Its fields of one hop are already left out (`h1::take_head`).
                let (parts, body) = response.into_parts();
                if !body.is_reading() {
                    // Whole already: the upstream is done with this request.
                    return Response::from_parts(parts, body.boxed_unsync());
                }
                // The lease lives as long as the response body streams.
                let body = LeasedBody {
                    body,
                    lease,
                    closing: None,
                };
                return Response::from_parts(parts, body.boxed_unsync());
            }
            Ok(Err(Failed::Connect(e))) => {
                // The request never left: the next upstream, whatever the method.
                tracing::debug!(upstream = %lease.address(), "connect failed: {e}");
                lease.failed(Failure::Connect);
                tried.push(lease.address().to_string());
                continue;
            }
            Ok(Err(Failed::Exchange(e))) => (
                StatusCode::BAD_GATEWAY,
                "upstream_failed",
                format!("upstream {}: {e}", lease.address()),
            ),
            Err(_) => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                format!("upstream {} gave no answer within {try_timeout:?}", lease.address()),
            ),
        };
        // It may have reached the upstream: only an idempotent request goes again, to
        // another upstream, within the listener's retries and the retry budget.
        lease.failed(Failure::Error);
        tried.push(lease.address().to_string());
        tracing::debug!(upstream = %lease.address(), "{}", failure.2);
        let retry = idempotent && retries_left > 0 && shared.budget.lock().expect("budget lock").withdraw(now_ms());
        if !retry {
            return error(failure.0, failure.1, &failure.2);
        }
        retries_left -= 1;
        shared.metrics.retries.get_or_create(&shared.labels).inc();
    }
    error(
        StatusCode::BAD_GATEWAY,
        "no_upstream",
        &format!("no upstream of listener {} could be reached", shared.listener.name),
    )
}

/// The pool a request goes to: the listener's, or in read-only mode (a `route = primary`
/// service with no primary) the replicas for a read; a write then gets 503 `read_only`.
/// A refusal is a 503's code and message.
fn choose_pool<'a>(shared: &'a Shared, method: &str) -> Result<&'a Arc<Pool>, (&'static str, String)> {
    let target = &shared.target;
    let Some((service, _)) = &target.service else {
        return Ok(&target.pool);
    };
    if !target.has_view() {
        return Err(("no_view", Target::no_view(&shared.listener.name, service)));
    }
    if !target.read_only() {
        return Ok(&target.pool);
    }
    if !shared.listener.read_methods.iter().any(|m| m == method) {
        return Err((
            "read_only",
            format!(
                "service {service} has no primary: {method} is refused until one is promoted; reads go to replicas"
            ),
        ));
    }
    Ok(&target.readers)
}

/// 503 with `Retry-After: 1`.
pub(crate) fn unavailable(code: &str, message: &str) -> Response<Body> {
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, code, message);
    response
        .headers_mut()
        .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// A response body that keeps its upstream's lease (connections in flight) until done,
/// and breaks off when the upstream leaves the pool (the client sees the response cut, not
/// complete).
struct LeasedBody {
    body: UpstreamBody,
    lease: crate::pool::Lease,
    /// Made the first time the body has to wait, so a response that streams at once costs
    /// nothing more.
    closing: Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>>,
}

impl hyper::body::Body for LeasedBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BodyError>>> {
        use std::task::Poll;
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        let body = &mut *self;
        let closing = body.closing.get_or_insert_with(|| Box::pin(body.lease.closing()));
        match closing.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                "upstream {} left the listener; its response is cut",
                body.lease.address()
            )
            .into()))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// The proxy's own error, shaped like the API's: `{"error": {"code", "message"}}`.
pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json(
        status,
        &serde_json::json!({ "error": { "code": code, "message": message } }),
    )
}

/// A JSON answer of the proxy's own.
pub(crate) fn json(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let body = Full::new(Bytes::from(body.to_string())).map_err(|never| match never {});
    let mut response = Response::new(body.boxed_unsync());
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
