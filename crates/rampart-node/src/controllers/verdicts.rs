//! Leader-only: turns what the region knows of each instance into its committed verdict,
//! so every node agrees on an instance's health.
//!
//! Two inputs, both leader-local soft state (DESIGN rule 8): every node's probe views
//! (confirmed with `rampart_core::health::confirm`, majority or any, per the policy), and
//! the instance's own heartbeats for `heartbeat` checks (down once a heartbeat is older
//! than the check's TTL). The verdict is the worse of the two. A new leader starts with
//! no reports, keeps the committed verdicts until nodes report again (within seconds), and
//! restarts every heartbeat deadline from its own now, as etcd does with lease deadlines.

use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::Json;
use rampart_core::api::{Event, HeartbeatRequest, HeartbeatResponse, ObservationsRequest};
use rampart_core::health::{heartbeat_verdict, worst, Health};
use rampart_core::service::{Probe, Purpose};
use rampart_store::Op;

use crate::error::{parse_body, ApiError};
use crate::node::Shared;
use crate::soft::{Confirmation, Heartbeat, InstanceKey, Restart, Soft};

fn voters(node: &Shared) -> usize {
    node.raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .count()
}

/// `POST /v1/observations` (node to leader).
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

/// Records a batch of one node's views and commits every verdict that changes.
pub async fn receive(node: &Shared, request: ObservationsRequest) {
    let now = Instant::now();
    let keys: Vec<InstanceKey> = {
        let mut soft = node.soft.lock().expect("soft state lock");
        for restart in request.restarts {
            let at = Restart {
                at: now,
                gave_up: restart.gave_up,
            };
            soft.restarts.insert((restart.service, restart.instance), at);
        }
        for position in request.positions {
            let seen = crate::soft::Position {
                lsn: position.lsn,
                at_ms: crate::node::now_ms(),
                streaming: position.streaming,
            };
            soft.positions.insert((position.service, position.instance), seen);
        }
        request
            .observations
            .into_iter()
            .map(|o| {
                let key = (o.service, o.instance);
                soft.live.record(&key, request.node, o.health, now);
                soft.ready.record(&key, request.node, o.ready, now);
                key
            })
            .collect()
    };
    evaluate(node, &keys).await;
}

/// `POST /v1/services/{name}/instances/{id}/heartbeat` (forwarded to the leader): the
/// instance is alive, optionally `{"lag": N}` revisions behind its primary. Answers the
/// instance's current role and the primary's fencing token.
pub async fn heartbeat(
    State(node): State<Shared>,
    Path((service, id)): Path<(String, String)>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let request: HeartbeatRequest = parse_body(body)?;
    let answer = {
        let applied = node.applied.read().expect("state lock");
        let service_state = applied
            .state
            .shipped
            .services
            .get(&service)
            .ok_or_else(|| ApiError::not_found("service_not_found", format!("no service named {service:?}")))?;
        let record = service_state.instances.get(&id).ok_or_else(|| {
            ApiError::not_found(
                "instance_not_found",
                format!("service {service:?} has no instance {id:?}"),
            )
        })?;
        HeartbeatResponse {
            role: record.role,
            primary: service_state.primary.clone(),
            token: service_state.token,
        }
    };
    node.soft.lock().expect("soft state lock").heartbeats.insert(
        (service.clone(), id.clone()),
        Heartbeat {
            at: Instant::now(),
            lag_revisions: request.lag,
        },
    );
    evaluate(&node, &[(service, id)]).await;
    Ok(Json(answer))
}

/// How often the leader re-judges heartbeat deadlines.
const TICK: Duration = Duration::from_millis(200);
/// Every this many ticks it also re-judges every other instance (reports going stale, which
/// takes seconds) and forgets instances that left the registry.
const SWEEP_EVERY: u64 = 5;

/// Leader loop: re-judges heartbeat deadlines and stale reports, and resets soft state on
/// gaining leadership.
pub async fn run(node: Shared) {
    let mut tick = tokio::time::interval(TICK);
    let mut was_leader = false;
    let mut ticks: u64 = 0;
    loop {
        tick.tick().await;
        let leader = node.known_leader() == Some(node.id);
        if leader && !was_leader {
            let mut soft = node.soft.lock().expect("soft state lock");
            *soft = Soft {
                leader_since: Some(Instant::now()),
                ..Soft::default()
            };
        }
        was_leader = leader;
        if !leader {
            continue;
        }
        ticks += 1;
        let sweep = ticks.is_multiple_of(SWEEP_EVERY);
        let keys: Vec<InstanceKey> = {
            let applied = node.applied.read().expect("state lock");
            if sweep {
                forget_unknown(&applied.state, &mut node.soft.lock().expect("soft state lock"));
            }
            applied
                .state
                .shipped
                .services
                .iter()
                .filter(|(_, s)| {
                    sweep
                        || s.policy
                            .checks
                            .iter()
                            .any(|c| matches!(c.probe, Probe::Heartbeat { .. }))
                })
                .flat_map(|(name, s)| s.instances.keys().map(move |id| (name.clone(), id.clone())))
                .collect()
        };
        evaluate(&node, &keys).await;
    }
}

/// Instances that left the registry take their soft state with them.
fn forget_unknown(state: &rampart_store::State, soft: &mut Soft) {
    let known = |(s, i): &InstanceKey| {
        state
            .shipped
            .services
            .get(s)
            .is_some_and(|svc| svc.instances.contains_key(i))
    };
    soft.live.retain(known);
    soft.ready.retain(known);
    soft.heartbeats.retain(|k, _| known(k));
    soft.restarts.retain(|k, _| known(k));
    soft.positions.retain(|k, _| known(k));
}

/// Computes the verdict of each instance in `keys` and commits the ones that changed.
async fn evaluate(node: &Shared, keys: &[InstanceKey]) {
    if node.known_leader() != Some(node.id) {
        return;
    }
    let now = Instant::now();
    let voters = voters(node);
    let mut changes = Vec::new();
    let mut ready_changes = Vec::new();
    {
        let applied = node.applied.read().expect("state lock");
        let mut soft = node.soft.lock().expect("soft state lock");
        let leader_since = *soft.leader_since.get_or_insert(now);
        for key in keys {
            let Some(service) = applied.state.shipped.services.get(&key.0) else {
                continue;
            };
            // Another region's instances are judged by that region (verdicts are local).
            let Some(record) = service.instances.get(&key.1) else {
                continue;
            };
            if !node.config.regions.looks_after(&record.instance.region) {
                continue;
            }
            let committed = applied.state.local.verdict(&key.0, &key.1);
            let last_beat = soft
                .heartbeats
                .get(key)
                .map_or(leader_since, |beat| beat.at.max(leader_since));
            // For one purpose: the probes' confirmed verdict (up if no probe has that
            // purpose), made worse by any heartbeat check of that purpose that is overdue.
            let judge = |confirmation: &mut Confirmation, wanted: fn(Purpose) -> bool, committed: Health| {
                let checks = service.policy.checks.iter().filter(|c| wanted(c.purpose));
                let probed = checks.clone().any(|c| !matches!(c.probe, Probe::Heartbeat { .. }));
                let probes = if probed {
                    confirmation.verdict(key, now, &service.policy, voters, committed)
                } else {
                    Health::Up
                };
                let beats = checks.filter_map(|c| match c.probe {
                    Probe::Heartbeat { ttl_ms } => Some(heartbeat_verdict(
                        now.duration_since(last_beat),
                        Duration::from_millis(ttl_ms),
                    )),
                    _ => None,
                });
                worst(std::iter::once(probes).chain(beats))
            };
            let verdict = judge(&mut soft.live, Purpose::liveness, committed.health);
            let ready = judge(&mut soft.ready, Purpose::readiness, committed.ready);
            if ready != committed.ready {
                ready_changes.push((key.clone(), ready));
            }
            if verdict != committed.health {
                let reports = soft
                    .live
                    .reports
                    .get(key)
                    .map(|seen| {
                        seen.iter()
                            .map(|(node, report)| format!("node {node}: {}", label(report.health)))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                changes.push((key.clone(), verdict, reports));
            }
        }
    }
    for ((service, id), ready) in ready_changes {
        let op = Op::InstanceReadiness {
            service: service.clone(),
            id: id.clone(),
            ready,
        };
        if let Err(e) = node.propose(op).await {
            tracing::warn!(%service, instance = %id, "could not commit a readiness verdict: {}", e.message);
        }
    }
    for ((service, id), health, reports) in changes {
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
        let event = Event {
            id: 0,
            at_ms: 0,
            kind: "health".to_string(),
            action: format!("instance.{}", label(health)),
            actor: "-".to_string(),
            source: format!("node {}", node.id),
            outcome: "ok".to_string(),
            detail: format!("service={service} instance={id} reports=[{reports}]"),
        };
        crate::events::record(node, event).await;
    }
}

fn label(health: Health) -> &'static str {
    match health {
        Health::Up => "up",
        Health::Down => "down",
        Health::Unknown => "unknown",
    }
}
