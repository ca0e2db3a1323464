//! Any node accepts any request: requests that need the leader (writes, linearizable
//! reads, keepalives) are forwarded to it by a follower, once. Only when no leader is known
//! does the client get 503 `no_leader`.
//!
//! Also the one way a node calls another node's internal API itself (`call`): a report to
//! the leader (probe views, hook runs, events) or the leader's request to a node (a service
//! backup). Such a call is marked as forwarded, so it is served where it lands; on a TLS
//! region the node certificate authenticates it.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use std::time::Duration;

use axum::body::Bytes;
use rampart_store::NodeId;
use serde::Serialize;

use crate::auth::{Caller, FORWARDED_FOR_HEADER};
use crate::error::ApiError;
use crate::node::{Node, Shared};

/// How long a forwarded switchover may take (hook timeouts and catch-up included).
const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// How long a forwarded backup or verification may take (a large state streams to the store).
const BACKUP_TIMEOUT: Duration = Duration::from_secs(3600);

/// Marks a request a node forwarded, so it is never forwarded twice.
pub const FORWARDED_HEADER: &str = "x-rampart-forwarded-by";

/// Returns once this node knows a leader other than `leader`.
async fn leader_replaced(node: &Shared, leader: NodeId) {
    let mut metrics = node.raft.metrics();
    loop {
        if metrics.borrow_and_update().current_leader.is_some_and(|l| l != leader) {
            return;
        }
        if metrics.changed().await.is_err() {
            // The Raft instance stopped: nothing will change any more.
            std::future::pending::<()>().await;
        }
    }
}

fn needs_leader(request: &Request) -> bool {
    let path = request.uri().path();
    if !path.starts_with("/v1/") || path.starts_with("/v1/watch") {
        return false;
    }
    if request.method() != Method::GET {
        return true;
    }
    let stale = request
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "consistency=stale"));
    // Eligibility needs the replicas' reported lag, which only the leader holds; events and
    // tokens are read where every acknowledged change is already applied.
    let leader_reads = ["/v1/kv", "/v1/elections", "/v1/events", "/v1/tokens"];
    (leader_reads.iter().any(|p| path.starts_with(p)) || path.ends_with("/eligibility")) && !stale
}

pub async fn to_leader(State(node): State<Shared>, request: Request, next: Next) -> Response {
    if !needs_leader(&request) || request.headers().contains_key(FORWARDED_HEADER) {
        return next.run(request).await;
    }
    match node.known_leader() {
        None => ApiError::no_leader().into_response(),
        Some(leader) if leader == node.id => next.run(request).await,
        Some(leader) => match node.address_of(leader) {
            None => ApiError::no_leader().into_response(),
            Some(addr) => forward(&node, leader, &addr, request)
                .await
                .unwrap_or_else(|e| e.into_response()),
        },
    }
}

async fn forward(node: &Shared, leader: NodeId, addr: &str, request: Request) -> Result<Response, ApiError> {
    node.metrics.forwarded_requests.inc();
    let (parts, body) = request.into_parts();
    let limit = node.config.limits.request_body_bytes_max;
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body is over {limit} bytes"),
        )
    })?;
    let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut outgoing = node
        .http
        .request(parts.method.clone(), url(node, addr, path))
        .body(body);
    if parts.uri.path().ends_with("/switchover") {
        // A switchover waits for hooks and for the target to catch up.
        outgoing = outgoing.timeout(SWITCHOVER_TIMEOUT);
    }
    if parts.uri.path().starts_with("/v1/backups") {
        outgoing = outgoing.timeout(BACKUP_TIMEOUT);
    }
    // The leader checks the caller's token again (it may have been revoked meanwhile) and
    // records the caller's own address, which it trusts from a node certificate only.
    for name in ["content-type", "authorization"] {
        if let Some(value) = parts.headers.get(name) {
            outgoing = outgoing.header(name, value);
        }
    }
    if let Some(caller) = parts.extensions.get::<Caller>() {
        outgoing = outgoing.header(FORWARDED_FOR_HEADER, caller.source.as_str());
    }
    outgoing = outgoing.header(FORWARDED_HEADER, node.id.to_string());
    // A leader replaced while the request is with it (paused, cut off) may never answer:
    // once this node knows another leader, the request is answered here instead.
    let sent = tokio::select! {
        sent = outgoing.send() => sent,
        () = leader_replaced(node, leader) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "leadership_lost",
                format!("the leader this node forwarded to (node {leader}) was replaced while the request was with it; it may or may not have taken effect"),
            ));
        }
    };
    let answer = sent.map_err(|e| {
        if e.is_connect() {
            // Nothing reached the leader: safe for the client to retry.
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_leader", format!("leader at {addr} unreachable: {e}"))
        } else {
            // The leader may have applied it before the connection broke.
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "outcome_unknown",
                format!("lost the connection to the leader at {addr} mid-request; the request may or may not have taken effect: {e}"),
            )
        }
    })?;
    let status = answer.status();
    let content_type = answer.headers().get("content-type").cloned();
    // The revision a read reflects and the epoch that answered travel back as they were.
    let ours: Vec<(HeaderName, HeaderValue)> = answer
        .headers()
        .iter()
        .filter(|(name, _)| name.as_str().starts_with("x-rampart-") && name.as_str() != FORWARDED_HEADER)
        .map(|(name, value)| (name.clone(), value.clone()))
        .collect();
    let bytes = answer
        .bytes()
        .await
        .map_err(|e| ApiError::internal(format!("reading leader answer: {e}")))?;
    let mut response = Response::new(Body::from(bytes));
    *response.status_mut() = status;
    if let Some(content_type) = content_type {
        response.headers_mut().insert("content-type", content_type);
    }
    for (name, value) in ours {
        response.headers_mut().insert(name, value);
    }
    response
        .headers_mut()
        .insert(FORWARDED_HEADER, HeaderValue::from(node.id));
    Ok(response)
}

/// Another node's API: HTTPS on a TLS region.
pub fn url(node: &Node, addr: &str, path: &str) -> String {
    let scheme = if node.tls.is_some() { "https" } else { "http" };
    format!("{scheme}://{addr}{path}")
}

/// Which node an internal call goes to.
#[derive(Debug, Clone, Copy)]
pub enum To {
    /// The leader this node knows now.
    Leader,
    Node(NodeId),
}

/// Why an internal call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("no leader is known")]
    NoLeader,
    #[error("node {0} is not a member")]
    NotMember(NodeId),
    #[error("node {node}: {message}")]
    Send { node: NodeId, message: String },
    #[error("node {node} answered {status}: {body}")]
    Refused {
        node: NodeId,
        status: StatusCode,
        body: String,
    },
}

/// POSTs `body` as JSON to `path` on another node and returns its answer's body. The
/// client's own timeout (the request timeout and a second) applies unless `timeout` is given.
/// The caller handles the case where the target is this node itself.
pub async fn call(
    node: &Node,
    to: To,
    path: &str,
    body: &impl Serialize,
    timeout: Option<Duration>,
) -> Result<Bytes, CallError> {
    let target = match to {
        To::Leader => node.known_leader().ok_or(CallError::NoLeader)?,
        To::Node(id) => id,
    };
    let addr = node.address_of(target).ok_or(CallError::NotMember(target))?;
    let mut request = node
        .http
        .post(url(node, &addr, path))
        .header(FORWARDED_HEADER, node.id.to_string())
        .json(body);
    if let Some(timeout) = timeout {
        request = request.timeout(timeout);
    }
    let send_error = |e: reqwest::Error| CallError::Send {
        node: target,
        message: e.to_string(),
    };
    let answer = request.send().await.map_err(send_error)?;
    let status = answer.status();
    let bytes = answer.bytes().await.map_err(send_error)?;
    if !status.is_success() {
        return Err(CallError::Refused {
            node: target,
            status,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        });
    }
    Ok(bytes)
}
