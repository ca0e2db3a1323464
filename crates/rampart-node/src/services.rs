//! The service registry (`/v1/services`): policies and instances as the region stores
//! them, and the eligibility report that says, for every instance, whether it could be
//! promoted now and every reason it could not.
//!
//! Validation is `rampart_core::service`'s; a refusal names the field by its path.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::{Extension, Json};
use rampart_core::api::{EligibilityResponse, InstanceView, ServiceSummary, ServiceView, ServicesResponse, Stored};
use rampart_core::failover::{damped, eligibility, Candidate};
use rampart_core::health::Health;
use rampart_core::postgres::{quorum_promotable, Member, QuorumMember, Synchronous, Topology};
use rampart_core::service::{check_name, FieldError, InstanceRole, InstanceSpec, PolicySpec};
use rampart_store::state::Service;
use rampart_store::Local;
use rampart_store::{Op, Outcome};

use crate::auth::Caller;
use crate::error::{parse_body, unexpected, ApiError};
use crate::events::audit;
use crate::node::{now_ms, Shared};

fn invalid(code: &'static str, error: FieldError) -> ApiError {
    let field = error.field.clone();
    ApiError::bad_request(code, error.to_string()).with_current(serde_json::json!({ "field": field }))
}

fn service_not_found(name: &str) -> ApiError {
    ApiError::not_found("service_not_found", format!("no service named {name:?}"))
}

pub async fn put_service(
    State(node): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Stored>, ApiError> {
    check_name("name", &name).map_err(|e| invalid("bad_name", e))?;
    let spec: PolicySpec = parse_body(body)?;
    let definition = spec.define().map_err(|e| invalid("bad_policy", e))?;
    let result = match node
        .propose(Op::ServiceKindPut {
            name: name.clone(),
            policy: definition.policy,
            kind: definition.kind,
        })
        .await
    {
        Ok(Outcome::ServiceStored { created }) => Ok(Stored { created }),
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(e),
    };
    audit(&node, &caller, "service.put", format!("name={name}"), &result).await;
    result.map(Json)
}

pub async fn delete_service(
    State(node): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let result = match node.propose(Op::ServiceDelete { name: name.clone() }).await {
        Ok(Outcome::ServiceDeleted { found: true }) => Ok(serde_json::json!({ "deleted": name })),
        Ok(Outcome::ServiceDeleted { found: false }) => Err(service_not_found(&name)),
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(e),
    };
    audit(&node, &caller, "service.delete", format!("name={name}"), &result).await;
    result.map(Json)
}

pub async fn put_instance(
    State(node): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path((name, id)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Stored>, ApiError> {
    check_name("instance", &id).map_err(|e| invalid("bad_name", e))?;
    let spec: InstanceSpec = parse_body(body)?;
    let instance = spec
        .validate(&node.config.region)
        .map_err(|e| invalid("bad_instance", e))?;
    let detail = format!("service={name} instance={id} endpoint={}", instance.endpoint);
    let op = Op::InstancePut {
        service: name.clone(),
        id,
        instance,
    };
    let result = match node.propose(op).await {
        Ok(Outcome::InstanceStored { created }) => Ok(Stored { created }),
        Ok(Outcome::ServiceNotFound) => Err(service_not_found(&name)),
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(e),
    };
    audit(&node, &caller, "instance.put", detail, &result).await;
    result.map(Json)
}

pub async fn delete_instance(
    State(node): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let op = Op::InstanceDelete {
        service: name.clone(),
        id: id.clone(),
    };
    let result = match node.propose(op).await {
        Ok(Outcome::InstanceDeleted { found: true }) => Ok(serde_json::json!({ "deleted": id })),
        Ok(Outcome::InstanceDeleted { found: false }) => Err(ApiError::not_found(
            "instance_not_found",
            format!("service {name:?} has no instance {id:?}"),
        )),
        Ok(Outcome::ServiceNotFound) => Err(service_not_found(&name)),
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(e),
    };
    audit(
        &node,
        &caller,
        "instance.delete",
        format!("service={name} instance={id}"),
        &result,
    )
    .await;
    result.map(Json)
}

pub async fn list(State(node): State<Shared>) -> Json<ServicesResponse> {
    let applied = node.applied.read().expect("state lock");
    Json(ServicesResponse {
        services: applied
            .state
            .shipped
            .services
            .iter()
            .map(|(name, s)| ServiceSummary {
                name: name.clone(),
                primary: s.primary.clone(),
                instances: s.instances.len(),
            })
            .collect(),
    })
}

fn view(
    node: &Shared,
    (primary_region, epoch): (&str, u64),
    name: &str,
    service: &Service,
    local: &Local,
    soft: &crate::soft::Soft,
) -> ServiceView {
    ServiceView {
        name: name.to_string(),
        primary: service.primary.clone(),
        token: service.token,
        epoch,
        instances: service
            .instances
            .iter()
            .map(|(id, r)| InstanceView {
                id: id.clone(),
                endpoint: r.instance.endpoint.clone(),
                region: r.instance.region.clone(),
                zone: r.instance.zone.clone(),
                priority: r.instance.priority,
                // An instance of a standby region is a standby, whatever it held before.
                role: if node.in_standby_region(primary_region, &r.instance.region) {
                    InstanceRole::Standby
                } else {
                    r.role
                },
                health: local.verdict(name, id).health,
                ready: local.verdict(name, id).ready,
                node: r.instance.node,
                tags: r.instance.tags.clone(),
                reports: soft
                    .live
                    .reports
                    .get(&(name.to_string(), id.clone()))
                    .map(|seen| seen.iter().map(|(node, report)| (*node, report.health)).collect())
                    .unwrap_or_default(),
                synchronous: r.instance.synchronous,
                lag: soft.lag_revisions(name, id),
            })
            .collect(),
        serving: serving(name, service, local),
        policy: service.policy.clone(),
        kind: service.kind.clone(),
        synchronous_standby: local.synchronous.get(name).cloned(),
        index: 0,
    }
}

/// The instances that should get traffic now: every one that is both live and ready; in
/// active-passive mode the primary first, and a primary that is not is left out like any
/// other (readiness alone never fails a primary over).
fn serving(name: &str, service: &Service, local: &Local) -> Vec<String> {
    let up = |id: &String| {
        service
            .instances
            .get(id)
            .is_some_and(|r| local.verdict(name, id).serves() && r.role != InstanceRole::Standby)
    };
    let mut ids: Vec<String> = service.primary.iter().filter(|p| up(p)).cloned().collect();
    ids.extend(
        service
            .instances
            .keys()
            .filter(|id| up(id) && service.primary.as_ref() != Some(*id))
            .cloned(),
    );
    ids
}

/// `f` of the service and the region's local state (its verdicts).
fn with_service<T>(node: &Shared, name: &str, f: impl FnOnce(&Service, &Local) -> T) -> Result<T, ApiError> {
    let applied = node.applied.read().expect("state lock");
    let state = &applied.state;
    state
        .shipped
        .services
        .get(name)
        .map(|service| f(service, &state.local))
        .ok_or_else(|| service_not_found(name))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShowQuery {
    /// Answer once the view differs from the one read at this index.
    index: Option<u64>,
    /// How long to wait for a change (default 60s, at most 10m).
    wait: Option<String>,
    /// `stale`: answer even from a primary region whose lease may be ending.
    consistency: Option<String>,
}

/// 503 `region_lease_lost` for a registry read on a node of a primary region whose lease
/// may be ending (`Node::region_fenced`): another region may be promoting its own
/// instances, so this view's primary may be fenced. A client given several regions'
/// endpoints (a proxy) goes on to the next.
fn refuse_if_fenced(node: &Shared, stale: bool) -> Result<(), ApiError> {
    if stale || !node.region_fenced() {
        return Ok(());
    }
    Err(ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "region_lease_lost",
        format!(
            "region {} may be losing its region lease (not renewed from a majority of regions): its service primaries are fenced and another region may take over; ask another region, or read with ?consistency=stale",
            node.config.region
        ),
    ))
}

/// How often a blocking read checks that its node may still serve the view.
const FENCED_TICK: std::time::Duration = std::time::Duration::from_millis(100);

/// Longest a blocking read of a service waits before answering an unchanged view.
const WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(600);

/// The service as this node sees it, and the change index it was read at.
fn current(node: &Shared, name: &str) -> Result<ServiceView, ApiError> {
    // Lock order everywhere: the applied state, then the soft state.
    let applied = node.applied.read().expect("state lock");
    let service = applied
        .state
        .shipped
        .services
        .get(name)
        .ok_or_else(|| service_not_found(name))?;
    let mut view = view(
        node,
        node.primary_and_epoch_in(&applied.state.shipped),
        name,
        service,
        &applied.state.local,
        &node.soft.lock().expect("soft state lock"),
    );
    view.index = applied.services_version;
    Ok(view)
}

/// `GET /v1/services/{name}`; with `?index=N`, a blocking read: it answers when the view
/// is no longer the one at index N (at once if this node is past N or behind it, as after
/// the caller moved to another node), or after `wait` with the view unchanged. Registry
/// changes to other services wake it but do not answer it.
pub async fn show(
    State(node): State<Shared>,
    Path(name): Path<String>,
    query: Result<axum::extract::Query<ShowQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ServiceView>, ApiError> {
    let axum::extract::Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let wait = match query.wait.as_deref() {
        None => std::time::Duration::from_secs(60),
        Some(text) => rampart_core::duration::parse_duration(text)
            .map_err(|e| ApiError::bad_request("bad_query", format!("wait={text:?}: {e}")))?
            .min(WAIT_MAX),
    };
    let stale = match query.consistency.as_deref() {
        None => false,
        Some("stale") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "bad_query",
                format!("consistency={other:?}: only \"stale\" is accepted"),
            ))
        }
    };
    refuse_if_fenced(&node, stale)?;
    let mut changes = node.sm.services_changes();
    let first = current(&node, &name)?;
    let Some(index) = query.index else {
        return Ok(Json(first));
    };
    if first.index != index {
        return Ok(Json(first));
    }
    // A node cut off from its leader would hold a watcher on a view nobody updates: it
    // answers no_leader instead, and a node of a region losing its lease region_lease_lost
    // (checked each tick); the caller moves to another node.
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if node.known_leader().is_none() {
            return Err(ApiError::no_leader());
        }
        refuse_if_fenced(&node, stale)?;
        let tick = deadline.min(tokio::time::Instant::now() + FENCED_TICK);
        match tokio::time::timeout_at(tick, changes.changed()).await {
            Ok(Ok(())) => {
                let now = current(&node, &name)?;
                let changed = ServiceView {
                    index: first.index,
                    ..now.clone()
                } != first;
                if changed {
                    return Ok(Json(now));
                }
            }
            Err(_) if tokio::time::Instant::now() < deadline => {}
            // Timed out, or the state machine is gone (shutting down): the view as it is.
            Ok(Err(_)) | Err(_) => return current(&node, &name).map(Json),
        }
    }
}

/// Every instance's eligibility for promotion right now, from the committed verdicts.
pub async fn explain(
    State(node): State<Shared>,
    Path(name): Path<String>,
) -> Result<Json<EligibilityResponse>, ApiError> {
    report(&node, &name).map(Json)
}

/// One instance's eligibility (for switchover).
pub fn eligibility_of(node: &Shared, service: &str, id: &str) -> Result<rampart_core::failover::Eligibility, ApiError> {
    report(node, service)?
        .instances
        .into_iter()
        .find(|e| e.id == id)
        .ok_or_else(|| {
            ApiError::new(
                axum::http::StatusCode::CONFLICT,
                "target_not_eligible",
                format!("{id:?} is a standby in another region: region failover promotes it"),
            )
        })
}

/// Who streams from whom in a `postgres` service (`core::postgres::Topology`), with each
/// instance's health as this region judges it.
pub(crate) fn pg_topology<'a>(name: &str, service: &'a Service, local: &Local) -> Topology<'a> {
    Topology {
        members: service
            .instances
            .iter()
            .map(|(id, r)| Member {
                id,
                region: &r.instance.region,
                priority: r.instance.priority,
                up: local.verdict(name, id).health == Health::Up,
            })
            .collect(),
        primary: service.primary.as_deref(),
    }
}

/// Which instances of a service in quorum mode (`synchronous = "quorum"`) may be
/// promoted: while its primary is up (a switchover, which first stops it), any member of
/// its quorum; once it is gone, only as `core::postgres::quorum_promotable` says, from each
/// member's settled WAL position (up, no longer streaming). None for any other service.
fn quorum_promotable_members(
    name: &str,
    service: &Service,
    local: &Local,
    soft: &crate::soft::Soft,
    primary_region: &str,
) -> Option<Vec<String>> {
    let pg = service.kind.postgres()?;
    if pg.synchronous != Synchronous::Quorum {
        return None;
    }
    // The quorum of the last primary: the one named, or once released the one that lost
    // the role last.
    let last_primary = service.primary.as_deref().or_else(|| {
        service
            .instances
            .iter()
            .filter_map(|(id, r)| r.losses_ms.last().map(|at| (*at, id.as_str())))
            .max()
            .map(|(_, id)| id)
    });
    let members = pg_topology(name, service, local).quorum_members(primary_region, last_primary);
    let primary_up = !service.demoting
        && service
            .primary
            .as_deref()
            .is_some_and(|p| local.verdict(name, p).health == Health::Up);
    if primary_up {
        return Some(members.iter().map(|m| m.to_string()).collect());
    }
    let settled: Vec<QuorumMember> = members
        .iter()
        .map(|id| QuorumMember {
            id,
            settled: (local.verdict(name, id).health == Health::Up && !soft.streaming(name, id))
                .then(|| soft.lsn(name, id))
                .flatten(),
        })
        .collect();
    Some(
        members
            .iter()
            .filter(|id| quorum_promotable(&settled, id))
            .map(|id| id.to_string())
            .collect(),
    )
}

pub(crate) fn report(node: &Shared, name: &str) -> Result<EligibilityResponse, ApiError> {
    let name = name.to_string();
    let now = now_ms();
    // Read before the state's lock is taken below: never twice in one thread.
    let current_primary = node.primary_region();
    with_service(node, &name, |service, local| {
        let soft = node.soft.lock().expect("soft state lock");
        let primary_region = service
            .primary_record()
            .map_or(node.config.region.as_str(), |(_, r)| r.instance.region.as_str());
        let quorum = quorum_promotable_members(&name, service, local, &soft, &current_primary);
        let candidates: Vec<Candidate> = service
            .instances
            .iter()
            .filter(|(_, r)| r.role != InstanceRole::Standby)
            .map(|(id, r)| Candidate {
                id: id.clone(),
                health: local.verdict(&name, id).health,
                priority: r.instance.priority,
                in_primary_region: r.instance.region == primary_region,
                in_standby_region: node.in_standby_region(&current_primary, &r.instance.region),
                // Reported with heartbeats: leader-local soft state (this call is
                // answered by the leader).
                lag_revisions: soft.lag_revisions(&name, id),
                synchronous: match &quorum {
                    Some(promotable) => promotable.contains(id),
                    None => r.instance.synchronous || local.synchronous.get(&name) == Some(id),
                },
                fenced: local.verdict(&name, id).fenced,
                damped: damped(&r.losses_ms, now, service.policy.damping),
                is_primary: service.primary.as_deref() == Some(id.as_str()),
            })
            .collect();
        EligibilityResponse {
            service: name.clone(),
            primary: service.primary.clone(),
            instances: eligibility(&candidates, service.rules()),
        }
    })
}

/// Leader-only: registers the services of this node's config file (`[services.NAME]`)
/// that the region lacks or holds with another policy, then stops. Every node carries the
/// same tables in practice; if they differ, the last leader's config wins.
pub async fn register_configured(node: Shared) {
    if node.config.services.is_empty() {
        return;
    }
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tick.tick().await;
        // A standby region's shipped state comes from the primary region alone (a region
        // that takes over registers them then).
        if node.known_leader() != Some(node.id) || node.is_standby() {
            continue;
        }
        let pending: Vec<(String, rampart_core::service::Definition)> = {
            let applied = node.applied.read().expect("state lock");
            node.config
                .services
                .iter()
                .filter(|(name, declared)| {
                    applied.state.shipped.services.get(*name).map(|s| (&s.policy, &s.kind))
                        != Some((&declared.policy, &declared.kind))
                })
                .map(|(name, declared)| (name.clone(), declared.clone()))
                .collect()
        };
        if pending.is_empty() {
            return;
        }
        for (name, declared) in pending {
            let result = match node
                .propose(Op::ServiceKindPut {
                    name: name.clone(),
                    policy: declared.policy,
                    kind: declared.kind,
                })
                .await
            {
                Ok(Outcome::ServiceStored { created }) => Ok(created),
                Ok(other) => Err(unexpected(other)),
                Err(e) => Err(e),
            };
            let caller = Caller {
                name: "config".to_string(),
                role: rampart_core::auth::Role::Admin,
                prefixes: Vec::new(),
                source: format!("node {}", node.id),
                token_hash: None,
            };
            audit(
                &node,
                &caller,
                "service.put",
                format!("name={name} from=config"),
                &result,
            )
            .await;
        }
    }
}

/// `/health/ha`: 200 when every active-passive service has a primary that is up (and a
/// `postgres` one in synchronous mode its synchronous standby, in quorum mode enough of
/// its quorum up), else 503 with each
/// problem; for load balancers and monitoring (like Patroni's `/health`).
pub async fn health_ha(State(node): State<Shared>) -> axum::response::Response {
    use axum::response::IntoResponse;
    // Read before the state's lock is taken below: never twice in one thread.
    let primary_region = node.primary_region();
    let problems: Vec<String> = {
        let applied = node.applied.read().expect("state lock");
        applied
            .state
            .shipped
            .services
            .iter()
            .filter(|(_, s)| s.policy.mode == rampart_core::service::Mode::ActivePassive)
            .filter_map(|(name, s)| {
                let primary = s
                    .primary_record()
                    .map(|(p, _)| (p, applied.state.local.verdict(name, p).health));
                match primary {
                    None => Some(format!("{name}: no primary")),
                    Some((p, health)) if health != rampart_core::health::Health::Up => {
                        Some(format!("{name}: primary {p} is {health:?}").to_lowercase())
                    }
                    Some(_) if s.demoting => Some(format!("{name}: primary is stepping down")),
                    Some(_) => s.kind.postgres().and_then(|pg| {
                        if pg.synchronous == Synchronous::Quorum {
                            let local = &applied.state.local;
                            let members =
                                pg_topology(name, s, local).quorum_members(&primary_region, s.primary.as_deref());
                            let up = members
                                .iter()
                                .filter(|m| local.verdict(name, m).health == Health::Up)
                                .count();
                            let wanted = rampart_core::postgres::quorum_size(members.len());
                            return (up < wanted).then(|| {
                                format!(
                                    "{name}: {up} of {} quorum replicas up, commits wait for {wanted}: commits wait",
                                    members.len()
                                )
                            });
                        }
                        let standby = applied.state.local.synchronous.get(name);
                        (pg.is_synchronous() && standby.is_none()).then(|| match pg.fallback {
                            rampart_core::postgres::Fallback::Block => {
                                format!("{name}: no synchronous replica: commits wait")
                            }
                            rampart_core::postgres::Fallback::Async => {
                                format!("{name}: no synchronous replica: commits are not replicated")
                            }
                        })
                    }),
                }
            })
            .collect()
    };
    if problems.is_empty() {
        Json(serde_json::json!({ "status": "ok" })).into_response()
    } else {
        (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "degraded", "problems": problems })),
        )
            .into_response()
    }
}
