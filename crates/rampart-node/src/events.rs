//! The region's event log (`GET /v1/events`, newest last) and how events enter it: every
//! failover, verdict, hook run, backup and audited operator action is committed as an
//! `Event` by the leader (`record`), which also raises the alerts an event calls for.
//! Events are region-local state: they say what happened here.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Query, State};
use axum::Json;
use rampart_core::api::{Event, EventsResponse};
use rampart_store::Op;
use serde::Deserialize;

use crate::auth::Caller;
use crate::error::{parse_body, ApiError};
use crate::forward::{call, To};
use crate::node::Shared;

/// Commits an audit event for an operator or admin action, after it ran. If no leader can
/// take it, the action's own answer stands and the miss is logged (without secrets).
pub async fn audit<T>(node: &Shared, caller: &Caller, action: &str, detail: String, result: &Result<T, ApiError>) {
    let outcome = match result {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("failed: {}: {}", e.code, e.message),
    };
    record(node, audit_event(action, &caller.name, &caller.source, outcome, detail)).await;
}

pub fn audit_event(action: &str, actor: &str, source: &str, outcome: String, detail: String) -> Event {
    Event {
        id: 0,
        at_ms: 0,
        kind: "audit".to_string(),
        action: action.to_string(),
        actor: actor.to_string(),
        source: source.to_string(),
        outcome,
        detail,
    }
}

pub async fn record(node: &Shared, event: Event) {
    let action = event.action.clone();
    match node.propose(Op::Record { event: event.clone() }).await {
        // Committed events that call for an alert get one, from the leader that made them.
        Ok(_) => crate::alerts::raise(node, &event),
        Err(e) => tracing::warn!(action, "could not commit the event: {}", e.message),
    }
}

/// Commits an event raised on any node (supervision): here on the leader, else through
/// it, best effort.
pub async fn record_anywhere(node: &Shared, event: Event) {
    if node.known_leader() == Some(node.id) {
        return record(node, event).await;
    }
    if let Err(e) = call(node, To::Leader, "/v1/events", &event, None).await {
        tracing::warn!(action = %event.action, "event not recorded: {e}");
    }
}

/// `POST /v1/events` (internal, node to leader; operator role): commits an event a node
/// raised, such as a supervised instance's restart.
pub async fn post_event(
    State(node): State<Shared>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let event: Event = parse_body(body)?;
    if node.known_leader() != Some(node.id) {
        return Err(ApiError::not_leader());
    }
    if event.kind.len() > 64 || event.action.len() > 128 || event.detail.len() > 4096 || event.outcome.len() > 1024 {
        return Err(ApiError::bad_request(
            "bad_event",
            "event fields are over their size limits",
        ));
    }
    record(&node, event).await;
    Ok(Json(serde_json::json!({})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    kind: Option<String>,
    limit: Option<usize>,
    /// `stale` answers from this node (forwarding reads it); otherwise from the leader.
    #[allow(dead_code)]
    consistency: Option<String>,
}

/// The newest events, oldest first (as DESIGN says: newest last).
pub async fn events(
    State(node): State<Shared>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<EventsResponse>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let limit = query.limit.unwrap_or(rampart_store::state::EVENTS_MAX);
    let applied = node.applied.read().expect("state lock");
    let matching: Vec<&Event> = applied
        .state
        .local
        .events
        .iter()
        .filter(|e| query.kind.as_deref().is_none_or(|k| e.kind == k))
        .collect();
    let skip = matching.len().saturating_sub(limit);
    Ok(Json(EventsResponse {
        events: matching.into_iter().skip(skip).cloned().collect(),
    }))
}
