//! Planned switchover (`POST /v1/services/{name}/switchover`, `rampart switchover`), run
//! by the leader: refuse with the reasons when the target may not be promoted (or, for a
//! PostgreSQL service, when it does not stream from the primary within 5 s); ask the old
//! primary to step down and wait for its node's `on_demote` to succeed (only then is the
//! role released); wait for the target's reported lag to reach 0; promote it with a new
//! fencing token. At no point are there two primaries: the role moves only after the old
//! holder's hook confirmed it let go. An old primary without a hosting node (an external
//! instance, nothing to run its hook) is released at once: the operator asked for it.
//!
//! Also the leader's side of hook reports: it records each run as an event and commits
//! what `rampart_core::failover::episode::on_hook_report` says the run means (release the
//! role after a successful `on_demote`, call a demotion off when it failed, give the role
//! back when `on_promote` failed).

use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use rampart_core::api::{Event, HookReport, SwitchoverRequest, SwitchoverResponse};
use rampart_core::failover::episode::{on_hook_report, HookAction};
use rampart_core::failover::switchover_blockers;
use rampart_core::service::Mode;
use rampart_store::{Op, Outcome};

use crate::auth::Caller;
use crate::error::{parse_body, unexpected, ApiError};
use crate::events::{audit, record};
use crate::forward::{call, To};
use crate::node::Shared;

/// How long a switchover waits for the target to catch up once the old primary let go.
const CATCH_UP_MS_MAX: u64 = 30_000;
/// How long a switchover of a PostgreSQL service waits for the target to stream from the
/// primary before anything moves.
const STREAMING_MS_MAX: u64 = 5_000;
const POLL: Duration = Duration::from_millis(50);

fn conflict(code: &'static str, message: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, code, message)
}

/// Sends a hook report to the leader (or handles it here on the leader); true if taken.
pub async fn hook_reported(node: &Shared, service: &str, instance: &str, report: &HookReport) -> bool {
    if node.known_leader() == Some(node.id) {
        return take_report(node, service, instance, report.clone()).await.is_ok();
    }
    let path = format!("/v1/services/{service}/instances/{instance}/hooks");
    call(node, To::Leader, &path, report, None).await.is_ok()
}

/// `POST /v1/services/{name}/instances/{id}/hooks` (node to leader).
pub async fn hook_report(
    State(node): State<Shared>,
    Path((service, id)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let report: HookReport = parse_body(body)?;
    take_report(&node, &service, &id, report).await?;
    Ok(Json(serde_json::json!({})))
}

async fn take_report(node: &Shared, service: &str, id: &str, report: HookReport) -> Result<(), ApiError> {
    if node.known_leader() != Some(node.id) {
        return Err(ApiError::not_leader());
    }
    let ok = report.outcome == "ok";
    let event = Event {
        id: 0,
        at_ms: 0,
        kind: "hook".to_string(),
        action: report.hook.clone(),
        actor: "-".to_string(),
        source: format!("node {}", report.node),
        outcome: report.outcome.clone(),
        detail: format!(
            "service={service} instance={id} token={} exit={} duration_ms={} output={:?}",
            report.token,
            report.exit_code.map_or("-".to_string(), |c| c.to_string()),
            report.duration_ms,
            report.output.chars().take(512).collect::<String>()
        ),
    };
    let seen = (
        service.to_string(),
        id.to_string(),
        report.hook.clone(),
        report.token,
        report.outcome.clone(),
    );
    let first = {
        let mut soft = node.soft.lock().expect("soft state lock");
        if soft.hook_events.len() >= crate::soft::HOOK_EVENTS_KEPT {
            soft.hook_events.clear();
        }
        soft.hook_events.insert(seen)
    };
    if first {
        record(node, event).await;
    }
    let (still_primary, demoting) = {
        let applied = node.applied.read().expect("state lock");
        applied.state.shipped.services.get(service).map_or((false, false), |s| {
            (s.primary.as_deref() == Some(id) && s.token == report.token, s.demoting)
        })
    };
    let (service, id) = (service.to_string(), id.to_string());
    let op = match on_hook_report(&report.hook, ok, still_primary, demoting) {
        None => None,
        Some(HookAction::Release) => Some(Op::Release { service, id }),
        Some(HookAction::CancelDemote) => Some(Op::CancelDemote { service, id }),
        Some(HookAction::GiveBack) => Some(Op::PromotionFailed {
            service,
            id,
            token: report.token,
        }),
    };
    if let Some(op) = op {
        node.propose(op).await?;
    }
    Ok(())
}

pub async fn switchover(
    State(node): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(service): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<SwitchoverResponse>, ApiError> {
    let request: SwitchoverRequest = parse_body(body)?;
    let started = Instant::now();
    let result = match InProgress::start(&node, &service) {
        Some(_guard) => run(&node, &service, &request.to, started).await,
        None => Err(conflict(
            "switchover_in_progress",
            format!("a switchover of {service:?} is already running; retry when it is done"),
        )),
    };
    let detail = format!("service={service} to={}", request.to);
    audit(&node, &caller, "service.switchover", detail.clone(), &result).await;
    if let Ok(answer) = &result {
        let event = Event {
            id: 0,
            at_ms: 0,
            kind: "switchover".to_string(),
            action: "primary.switchover".to_string(),
            actor: caller.name.clone(),
            source: caller.source.clone(),
            outcome: "ok".to_string(),
            detail: format!(
                "{detail} previous={} token={} duration_ms={}",
                answer.previous.as_deref().unwrap_or("-"),
                answer.token,
                answer.duration_ms
            ),
        };
        record(&node, event).await;
    }
    result.map(Json)
}

/// Marks a service as being switched over for as long as it lives: the failover controller
/// must not promote anyone while the role is between its old and new holder.
pub(crate) struct InProgress {
    node: Shared,
    service: String,
}

impl InProgress {
    pub(crate) fn start(node: &Shared, service: &str) -> Option<InProgress> {
        let fresh = node
            .switchovers
            .lock()
            .expect("switchovers lock")
            .insert(service.to_string());
        fresh.then(|| InProgress {
            node: node.clone(),
            service: service.to_string(),
        })
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        self.node
            .switchovers
            .lock()
            .expect("switchovers lock")
            .remove(&self.service);
    }
}

async fn run(node: &Shared, service: &str, to: &str, started: Instant) -> Result<SwitchoverResponse, ApiError> {
    if node.known_leader() != Some(node.id) {
        return Err(ApiError::not_leader());
    }
    let (previous, hooks_timeout_ms, previous_hosted, postgres_primary_up) = {
        let applied = node.applied.read().expect("state lock");
        let s = applied
            .state
            .shipped
            .services
            .get(service)
            .ok_or_else(|| ApiError::not_found("service_not_found", format!("no service named {service:?}")))?;
        if s.policy.mode != Mode::ActivePassive {
            return Err(conflict(
                "not_active_passive",
                format!("service {service:?} is active-active: every healthy instance serves, there is no primary"),
            ));
        }
        if !s.instances.contains_key(to) {
            return Err(ApiError::not_found(
                "instance_not_found",
                format!("service {service:?} has no instance {to:?}"),
            ));
        }
        if s.demoting {
            return Err(conflict(
                "switchover_in_progress",
                "the primary is already stepping down; retry when it is done".into(),
            ));
        }
        let hosted = s.primary_record().is_some_and(|(_, r)| r.instance.node.is_some());
        let postgres_primary_up = s.kind.postgres().is_some()
            && s.primary
                .as_deref()
                .is_some_and(|p| applied.state.local.verdict(service, p).health == rampart_core::health::Health::Up);
        (
            s.primary.clone(),
            s.policy.hooks.timeout_ms,
            hosted,
            postgres_primary_up,
        )
    };
    if previous.as_deref() == Some(to) {
        let token = node.applied.read().expect("state lock").state.shipped.services[service].token;
        return Ok(SwitchoverResponse {
            primary: to.to_string(),
            token,
            previous,
            duration_ms: started.elapsed().as_millis() as u64,
        });
    }
    let target = crate::services::eligibility_of(node, service, to)?;
    // Lag is waited for below; everything else refuses now, with every reason.
    let hard = switchover_blockers(&target.reasons);
    if !hard.is_empty() {
        let reasons = serde_json::to_value(&hard).unwrap_or_default();
        return Err(conflict(
            "target_not_eligible",
            format!("{to:?} cannot be promoted now: {reasons}"),
        )
        .with_current(serde_json::json!({ "reasons": reasons })));
    }

    // 0. A PostgreSQL target streams from the running primary first: the primary's fast
    //    shutdown (its on_demote) then hands it every last WAL record. One that does not
    //    would lack what the primary wrote since, and nobody else has it.
    if postgres_primary_up {
        let deadline = Instant::now() + Duration::from_millis(STREAMING_MS_MAX);
        while !node.soft.lock().expect("soft state lock").streaming(service, to) {
            if Instant::now() >= deadline {
                return Err(conflict(
                    "target_not_streaming",
                    format!(
                        "{to:?} has not streamed WAL from the primary within {STREAMING_MS_MAX}ms; the primary stays: \
                         retry once it streams (rampart service show {service})"
                    ),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    // 1. The old primary lets go: its node runs on_demote, then the leader releases it.
    if let Some(old) = &previous {
        let_go(node, service, old, previous_hosted, hooks_timeout_ms).await?;
    }

    // 2. The target catches up (its reported lag reaches 0).
    let deadline = Instant::now() + Duration::from_millis(CATCH_UP_MS_MAX);
    loop {
        let lag = node
            .soft
            .lock()
            .expect("soft state lock")
            .lag_revisions(service, to)
            .unwrap_or(0);
        if lag == 0 {
            break;
        }
        if Instant::now() >= deadline {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "target_lagging",
                format!(
                    "{to:?} still reports {lag} revisions of lag after {CATCH_UP_MS_MAX}ms; the old primary stepped down, \
                     nobody is primary: retry the switchover or pick another target"
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }

    // 3. Promote.
    let op = Op::Promote {
        service: service.to_string(),
        id: to.to_string(),
    };
    match node.propose(op).await? {
        Outcome::Promoted { token } => Ok(SwitchoverResponse {
            primary: to.to_string(),
            token,
            previous,
            duration_ms: started.elapsed().as_millis() as u64,
        }),
        Outcome::NotPromotable { health } => Err(conflict(
            "target_not_eligible",
            format!("{to:?} is no longer up ({health:?}); nobody is primary now"),
        )),
        Outcome::PrimaryHeld { primary } => Err(conflict(
            "primary_held",
            format!("{primary:?} became primary meanwhile"),
        )),
        other => Err(unexpected(other)),
    }
}

/// The primary `old` of `service` lets go, on the leader: its node runs `on_demote` and the
/// role is released on its report (at once for an instance no node hosts, `hosted` false).
/// Called off (the demotion cancelled, `old` still primary) when the hook fails or is not
/// confirmed within the hooks' timeout and 5 s. A planned switchover's first step, and a
/// planned region failover's for each primary of the region it leaves.
pub(crate) async fn let_go(
    node: &Shared,
    service: &str,
    old: &str,
    hosted: bool,
    hooks_timeout_ms: u64,
) -> Result<(), ApiError> {
    let op = if hosted {
        Op::Demote {
            service: service.to_string(),
            id: old.to_string(),
        }
    } else {
        Op::Release {
            service: service.to_string(),
            id: old.to_string(),
        }
    };
    match node.propose(op).await? {
        Outcome::Demoting | Outcome::Released => {}
        other => return Err(unexpected(other)),
    }
    let deadline = Instant::now() + Duration::from_millis(hooks_timeout_ms) + Duration::from_secs(5);
    loop {
        let (primary, demoting) = {
            let applied = node.applied.read().expect("state lock");
            let s = &applied.state.shipped.services[service];
            (s.primary.clone(), s.demoting)
        };
        if primary.is_none() {
            return Ok(());
        }
        if !demoting {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "demotion_failed",
                format!("{old:?}'s on_demote hook failed; it stays primary (see rampart events --kind hook)"),
            ));
        }
        if Instant::now() >= deadline {
            // Call the demotion off, so the service is not left half-way and a later
            // switchover can ask again.
            let cancel = Op::CancelDemote {
                service: service.to_string(),
                id: old.to_string(),
            };
            if let Err(e) = node.propose(cancel).await {
                tracing::warn!(%service, "could not call off an unconfirmed demotion: {}", e.message);
            }
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "demotion_unconfirmed",
                format!(
                    "{old:?}'s node did not confirm on_demote within {}ms; it stays primary and nothing was promoted",
                    hooks_timeout_ms + 5000
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}
