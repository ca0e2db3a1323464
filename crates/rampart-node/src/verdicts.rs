//! Leader-only: turns every node's observations into the region's verdict on each
//! instance (`rampart_core::health::confirm`, majority or any, per the service's policy)
//! and commits each change, so every node agrees on an instance's health. Observations
//! are leader-local soft state: a new leader starts empty and hears from every node again
//! within a few seconds; until then the committed verdicts stand.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Json;
use rampart_core::api::{Event, ObservationsRequest};
use rampart_core::health::{confirm, Health};
use rampart_core::service::Policy;
use rampart_store::Op;

use crate::api::parse_body;
use crate::error::ApiError;
use crate::Shared;

/// The latest report of each node about each instance.
pub type Reports = HashMap<(String, String), BTreeMap<u64, (Health, Instant)>>;

/// How long a node's report counts: a node that stopped reporting (dead, cut off) is not a
/// vote either way after this.
fn fresh_for(policy: &Policy) -> Duration {
    let slowest_ms = policy.checks.iter().map(|c| c.interval_ms).max().unwrap_or(1000);
    Duration::from_millis(slowest_ms * 2) + Duration::from_secs(10)
}

pub async fn handle(
    State(node): State<Shared>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let request: ObservationsRequest = parse_body(body)?;
    if node.known_leader() != Some(node.id) {
        return Err(ApiError::not_leader());
    }
    receive(&node, request).await;
    Ok(Json(serde_json::json!({})))
}

/// Records a batch and commits every verdict it changes.
pub async fn receive(node: &Shared, request: ObservationsRequest) {
    let now = Instant::now();
    let voters = node
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .count();
    let mut changes = Vec::new();
    {
        let applied = node.applied.read().expect("state lock");
        let mut reports = node.observations.lock().expect("observations lock");
        for observation in request.observations {
            let Some(service) = applied.state.services.get(&observation.service) else {
                continue;
            };
            let Some(record) = service.instances.get(&observation.instance) else {
                continue;
            };
            let key = (observation.service.clone(), observation.instance.clone());
            let seen = reports.entry(key).or_default();
            seen.insert(request.node, (observation.health, now));
            let fresh_for = fresh_for(&service.policy);
            seen.retain(|_, (_, at)| now.duration_since(*at) < fresh_for);
            let fresh: Vec<Health> = seen.values().map(|(h, _)| *h).collect();
            let verdict = confirm(&fresh, voters, service.policy.confirm, record.health);
            if verdict != record.health {
                let detail = seen
                    .iter()
                    .map(|(node, (h, _))| format!("node {node}: {h:?}").to_lowercase())
                    .collect::<Vec<_>>()
                    .join(", ");
                changes.push((observation.service, observation.instance, verdict, detail));
            }
        }
        // Instances that left the registry take their reports with them.
        reports.retain(|(s, i), _| {
            applied
                .state
                .services
                .get(s)
                .is_some_and(|svc| svc.instances.contains_key(i))
        });
    }
    for (service, id, health, detail) in changes {
        let op = Op::InstanceHealth {
            service: service.clone(),
            id: id.clone(),
            health,
        };
        if let Err(e) = node.propose(op).await {
            tracing::warn!(%service, instance = %id, "could not commit a health verdict: {}", e.message);
            continue;
        }
        tracing::info!(%service, instance = %id, ?health, "verdict committed");
        let action = match health {
            Health::Up => "instance.up",
            Health::Down => "instance.down",
            Health::Unknown => "instance.unknown",
        };
        let event = Event {
            id: 0,
            at_ms: 0,
            kind: "health".to_string(),
            action: action.to_string(),
            actor: "-".to_string(),
            source: format!("node {}", node.id),
            outcome: "ok".to_string(),
            detail: format!("service={service} instance={id} reports=[{detail}]"),
        };
        crate::tokens::record(node, event).await;
    }
}
