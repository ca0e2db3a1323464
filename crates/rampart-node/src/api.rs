//! The HTTP API of DESIGN.md (`/v1/...`, `/health/*`, `/metrics`): parses and bounds input,
//! proposes commands or reads the applied state, and maps outcomes to answers.

use std::collections::BTreeSet;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use openraft::{BasicNode, ServerState};
use rampart_core::api::*;
use rampart_store::{Op, Outcome};
use serde::Deserialize;

use crate::auth::Caller;
use crate::controllers::{backups, link, region_failover, region_lease, regions, switchover, verdicts};
use crate::error::{check_name, parse_body, unexpected, ApiError};
use crate::events::audit;
use crate::node::{now_ms, Shared};
use crate::{auth, events, forward, quotas, services, tokens, watch};
use rampart_core::auth::{Role, Scope};

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Lease TTL bounds: below the minimum a lease could expire between two keepalives of a
/// healthy client; above the maximum a crashed holder would block an election for too long.
const LEASE_TTL_MS_MIN: u64 = 100;
const LEASE_TTL_MS_MAX: u64 = 24 * 3600 * 1000;
/// Longest a campaign may wait for a busy election.
const CAMPAIGN_WAIT_MS_MAX: u64 = 60_000;
/// Items a range answers at most when no `limit` is given.
const RANGE_LIMIT_DEFAULT: usize = 10_000;

pub fn router(node: Shared) -> Router {
    let body_limit = node.config.limits.request_body_bytes_max;
    Router::new()
        .route("/v1/kv", get(range))
        .route("/v1/kv/{*key}", put(put_key).get(get_key).delete(delete_key))
        .route("/v1/watch", get(watch::watch))
        .route("/v1/leases", post(grant_lease))
        .route("/v1/leases/{id}", get(lease_status).delete(revoke_lease))
        .route("/v1/leases/{id}/keepalive", post(keepalive))
        .route("/v1/elections/{name}", get(observe))
        .route("/v1/elections/{name}/campaign", post(campaign))
        .route("/v1/elections/{name}/resign", post(resign))
        .route("/v1/quotas/{name}/take", post(quotas::take))
        .route("/v1/backups", get(backups::list).post(backups::create))
        .route("/v1/backups/verify", post(backups::verify))
        .route("/v1/backups/{id}/services/{name}", post(backups::service_part))
        .route("/v1/cluster", get(cluster))
        .route("/v1/cluster/members", get(members).post(add_member))
        .route("/v1/cluster/members/{id}", axum::routing::delete(remove_member))
        .route("/v1/regions", get(regions_list))
        .route("/v1/regions/log", get(regions::log))
        .route("/v1/regions/snapshot", get(regions::snapshot))
        .route("/v1/regions/verify", post(regions::verify))
        .route("/v1/regions/lease", post(region_lease::renew))
        .route("/v1/regions/lease/left", post(region_lease::left))
        .route("/v1/regions/vote", post(region_lease::vote))
        .route("/v1/regions/ack", post(region_lease::ack))
        .route("/v1/regions/divergence", get(link::divergence))
        .route("/v1/regions/divergence/{name}", get(link::divergence_export))
        .route("/v1/regions/failover", post(region_failover::failover))
        .route("/v1/regions/failback", post(region_failover::failback))
        .route("/v1/regions/handover", post(region_failover::handover))
        .route("/v1/tokens", get(tokens::list).post(tokens::create))
        .route("/v1/tokens/{name}", axum::routing::delete(tokens::revoke))
        .route("/v1/events", get(events::events).post(events::post_event))
        .route("/v1/services", get(services::list))
        .route("/v1/observations", post(verdicts::handle))
        .route(
            "/v1/services/{name}",
            get(services::show)
                .put(services::put_service)
                .delete(services::delete_service),
        )
        .route(
            "/v1/services/{name}/instances/{id}",
            put(services::put_instance).delete(services::delete_instance),
        )
        .route("/v1/services/{name}/eligibility", get(services::explain))
        .route(
            "/v1/services/{name}/instances/{id}/heartbeat",
            post(verdicts::heartbeat),
        )
        .route(
            "/v1/services/{name}/instances/{id}/hooks",
            post(switchover::hook_report),
        )
        .route("/v1/services/{name}/switchover", post(switchover::switchover))
        .route(
            "/health/live",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/health/ready", get(ready))
        .route("/health/ha", get(services::health_ha))
        .route("/health/regions", get(regions::health))
        .route("/metrics", get(metrics))
        .route("/metrics/ha", get(metrics_ha))
        .route("/metrics/regions", get(metrics_regions))
        .fallback(|| async { ApiError::not_found("no_route", "no such API path; see docs/api/openapi.yaml") })
        .layer(axum::middleware::from_fn_with_state(node.clone(), epoch_header))
        .layer(axum::middleware::from_fn_with_state(node.clone(), forward::to_leader))
        // Outside forwarding: a follower refuses a bad token itself instead of relaying it.
        .layer(axum::middleware::from_fn_with_state(node.clone(), auth::authenticate))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(node)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReadQuery {
    consistency: Option<String>,
    prefix: Option<String>,
    limit: Option<usize>,
}

impl ReadQuery {
    fn stale(&self) -> Result<bool, ApiError> {
        match self.consistency.as_deref() {
            None | Some("linearizable") => Ok(false),
            Some("stale") => Ok(true),
            Some(other) => Err(ApiError::bad_request(
                "bad_consistency",
                format!("invalid consistency {other:?}: expected linearizable (default) or stale"),
            )),
        }
    }
}

fn parse_query(
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<ReadQuery, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request("bad_query", e.body_text()))
}

fn check_limits(node: &Shared, key: &str, value: Option<&str>) -> Result<(), ApiError> {
    let limits = node.config.limits;
    let key_error = |e: rampart_core::limits::LimitError| match e {
        rampart_core::limits::LimitError::ValueTooLong { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "value_too_large", e.to_string())
        }
        rampart_core::limits::LimitError::KeyTooLong { .. } => ApiError::bad_request("key_too_long", e.to_string()),
        rampart_core::limits::LimitError::EmptyKey => ApiError::bad_request("empty_key", e.to_string()),
    };
    limits.check_key(key).map_err(key_error)?;
    if let Some(value) = value {
        limits.check_value(value).map_err(key_error)?;
    }
    Ok(())
}

fn lease_not_found(id: u64) -> ApiError {
    ApiError::not_found(
        "lease_not_found",
        format!("lease {id} does not exist (expired or revoked)"),
    )
}

async fn put_key(
    State(node): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<PutResponse> {
    caller.check(Role::Write, Scope::Key(&key))?;
    let request: PutRequest = parse_body(body)?;
    check_limits(&node, &key, Some(&request.value))?;
    let op = Op::Put {
        key: key.clone(),
        value: request.value,
        lease: request.lease,
        if_revision: request.if_revision,
    };
    match node.propose(op).await? {
        Outcome::Put { revision } => Ok(Json(PutResponse {
            revision,
            epoch: node.epoch(),
        })),
        Outcome::RevisionMismatch { current } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "revision_mismatch",
            format!(
                "key {key:?} is at revision {current}, not {} (0 = absent)",
                request.if_revision.unwrap_or_default()
            ),
        )
        .with_current(serde_json::json!({ "revision": current }))),
        Outcome::LeaseNotFound { id } => Err(lease_not_found(id)),
        other => Err(unexpected(other)),
    }
}

async fn get_key(
    State(node): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    caller.check(Role::Read, Scope::Key(&key))?;
    let query = parse_query(query)?;
    check_limits(&node, &key, None)?;
    if !query.stale()? {
        node.read_barrier().await?;
    }
    let applied = node.applied.read().expect("state lock");
    let found = applied
        .state
        .get(&key)
        .ok_or_else(|| ApiError::not_found("key_not_found", format!("key {key:?} does not exist")))?;
    Ok((reflects(applied.state.revision()), Json(found)).into_response())
}

/// The header that says which shipped revision a read reflects (on a standby region:
/// how far it has followed the primary).
fn reflects(revision: u64) -> [(&'static str, String); 1] {
    [(REVISION_HEADER, revision.to_string())]
}

/// Response header of key reads: the store revision they reflect.
pub const REVISION_HEADER: &str = "x-rampart-revision";

/// `GET /v1/regions`: every region as this node sees it, and this node's divergence files.
async fn regions_list(State(node): State<Shared>) -> Json<rampart_core::api::RegionsResponse> {
    let mut view = regions::view(&node);
    view.divergence = link::divergence_files(&node);
    Json(view)
}

/// The region epoch of the node that answered (for a write: the epoch that acknowledged
/// it), on every `/v1` answer.
pub const EPOCH_HEADER: &str = "x-rampart-epoch";

async fn epoch_header(
    State(node): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let v1 = request.uri().path().starts_with("/v1/");
    let mut response = next.run(request).await;
    if v1 {
        let epoch = node.epoch();
        response
            .headers_mut()
            .insert(EPOCH_HEADER, axum::http::HeaderValue::from(epoch));
    }
    response
}

async fn range(
    State(node): State<Shared>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let query = parse_query(query)?;
    caller.check(Role::Read, Scope::Prefix(query.prefix.as_deref().unwrap_or_default()))?;
    if !query.stale()? {
        node.read_barrier().await?;
    }
    let limit = query.limit.unwrap_or(RANGE_LIMIT_DEFAULT);
    let prefix = query.prefix.unwrap_or_default();
    let applied = node.applied.read().expect("state lock");
    let mut items = applied.state.range(&prefix, limit.saturating_add(1));
    let more = items.len() > limit;
    items.truncate(limit);
    let revision = applied.state.revision();
    let body = serde_json::json!({ "revision": revision, "items": items, "more": more });
    Ok((reflects(revision), Json(body)).into_response())
}

async fn delete_key(
    State(node): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
) -> ApiResult<DeleteResponse> {
    caller.check(Role::Write, Scope::Key(&key))?;
    check_limits(&node, &key, None)?;
    match node.propose(Op::Delete { key }).await? {
        Outcome::Deleted { revision, deleted } => Ok(Json(DeleteResponse { revision, deleted })),
        other => Err(unexpected(other)),
    }
}

async fn grant_lease(State(node): State<Shared>, body: Result<Bytes, BytesRejection>) -> ApiResult<LeaseGrantResponse> {
    let request: LeaseGrantRequest = parse_body(body)?;
    if !(LEASE_TTL_MS_MIN..=LEASE_TTL_MS_MAX).contains(&request.ttl_ms) {
        return Err(ApiError::bad_request(
            "bad_ttl",
            format!(
                "ttl_ms {} is out of range: expected {LEASE_TTL_MS_MIN} to {LEASE_TTL_MS_MAX}",
                request.ttl_ms
            ),
        ));
    }
    match node.propose(Op::LeaseGrant { ttl_ms: request.ttl_ms }).await? {
        Outcome::LeaseGranted { id, ttl_ms } => {
            node.leases.lock().expect("lease lock").granted(
                std::time::Instant::now(),
                id,
                Duration::from_millis(ttl_ms),
            );
            Ok(Json(LeaseGrantResponse { id, ttl_ms }))
        }
        other => Err(unexpected(other)),
    }
}

fn parse_id(text: &str, what: &str) -> Result<u64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request("bad_id", format!("invalid {what} {text:?}: expected a whole number")))
}

async fn keepalive(State(node): State<Shared>, Path(id): Path<String>) -> ApiResult<LeaseKeepaliveResponse> {
    let id = parse_id(&id, "lease id")?;
    if node.raft.metrics().borrow().state != ServerState::Leader {
        return Err(ApiError::not_leader());
    }
    let live = crate::controllers::leases::live_leases(&node);
    let now = std::time::Instant::now();
    let mut clock = node.leases.lock().expect("lease lock");
    crate::controllers::leases::sync(&mut clock, now, live);
    match clock.keepalive(now, id) {
        Ok(ttl) => Ok(Json(LeaseKeepaliveResponse {
            ttl_ms: ttl.as_millis() as u64,
        })),
        Err(rampart_core::lease::KeepaliveError::NotFound) => Err(lease_not_found(id)),
        Err(rampart_core::lease::KeepaliveError::Expired) => Err(ApiError::not_found(
            "lease_expired",
            format!("lease {id} expired; grant a new one"),
        )),
    }
}

async fn lease_status(State(node): State<Shared>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let id = parse_id(&id, "lease id")?;
    let applied = node.applied.read().expect("state lock");
    let lease = applied
        .state
        .shipped
        .leases
        .get(&id)
        .ok_or_else(|| lease_not_found(id))?;
    let remaining = node
        .leases
        .lock()
        .expect("lease lock")
        .remaining(std::time::Instant::now(), id);
    Ok(Json(serde_json::json!({
        "id": id, "ttl_ms": lease.ttl_ms, "keys": lease.keys, "elections": lease.elections,
        "remaining_ms": remaining.map(|d| d.as_millis() as u64),
    })))
}

async fn revoke_lease(State(node): State<Shared>, Path(id): Path<String>) -> Result<Json<serde_json::Value>, ApiError> {
    let id = parse_id(&id, "lease id")?;
    match node.propose(Op::LeaseRevoke { id }).await? {
        Outcome::LeaseRevoked { found: true } => {
            node.leases.lock().expect("lease lock").revoked(id);
            Ok(Json(serde_json::json!({})))
        }
        Outcome::LeaseRevoked { found: false } => Err(lease_not_found(id)),
        other => Err(unexpected(other)),
    }
}

fn election_state(hold: &rampart_store::state::Hold) -> ElectionState {
    ElectionState {
        leader: hold.candidate.clone(),
        token: hold.token,
        lease: hold.lease,
        since_ms: now_ms().saturating_sub(hold.since_ms),
    }
}

async fn campaign(
    State(node): State<Shared>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<CampaignResponse> {
    let request: CampaignRequest = parse_body(body)?;
    check_name("election name", &name)?;
    check_name("candidate", &request.candidate)?;
    let wait = Duration::from_millis(request.wait_ms.unwrap_or(0).min(CAMPAIGN_WAIT_MS_MAX));
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Wait on the leader's applied state while someone else holds it, instead of
        // filling the log with campaigns that are bound to lose.
        let held_by_other = {
            let applied = node.applied.read().expect("state lock");
            applied
                .state
                .shipped
                .elections
                .get(&name)
                .is_some_and(|h| h.candidate != request.candidate)
        };
        if !held_by_other || tokio::time::Instant::now() >= deadline {
            let op = Op::Campaign {
                name: name.clone(),
                candidate: request.candidate.clone(),
                lease: request.lease,
            };
            match node.propose(op).await? {
                Outcome::Elected { leader, token } => {
                    let epoch = node.epoch();
                    return Ok(Json(CampaignResponse { leader, token, epoch }));
                }
                Outcome::LeaseNotFound { id } => return Err(lease_not_found(id)),
                Outcome::Held { leader, token, lease } if tokio::time::Instant::now() >= deadline => {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "election_held",
                        format!("election {name:?} is held by {leader:?} (token {token})"),
                    )
                    .with_current(serde_json::json!({ "leader": leader, "token": token, "lease": lease })));
                }
                Outcome::Held { .. } => {}
                other => return Err(unexpected(other)),
            }
        }
        tokio::time::sleep(
            node.config
                .heartbeat_interval
                .min(deadline.saturating_duration_since(tokio::time::Instant::now())),
        )
        .await;
    }
}

async fn observe(
    State(node): State<Shared>,
    Path(name): Path<String>,
    query: Result<Query<ReadQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<ElectionState> {
    let query = parse_query(query)?;
    if !query.stale()? {
        node.read_barrier().await?;
    }
    let applied = node.applied.read().expect("state lock");
    applied
        .state
        .shipped
        .elections
        .get(&name)
        .map(|h| Json(election_state(h)))
        .ok_or_else(|| ApiError::not_found("no_holder", format!("election {name:?} has no holder")))
}

async fn resign(
    State(node): State<Shared>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<ElectionState> {
    let request: ResignRequest = parse_body(body)?;
    node.read_barrier().await?;
    let hold = {
        let applied = node.applied.read().expect("state lock");
        applied.state.shipped.elections.get(&name).cloned()
    };
    let hold = hold.ok_or_else(|| ApiError::not_found("no_holder", format!("election {name:?} has no holder")))?;
    match node
        .propose(Op::Resign {
            name: name.clone(),
            candidate: request.candidate.clone(),
        })
        .await?
    {
        Outcome::Resigned { found: true } => Ok(Json(election_state(&hold))),
        Outcome::Resigned { found: false } => Err(ApiError::not_found(
            "not_holder",
            format!(
                "{:?} does not hold election {name:?}",
                request.candidate.unwrap_or_default()
            ),
        )),
        other => Err(unexpected(other)),
    }
}

fn member_list(node: &Shared) -> Vec<Member> {
    let metrics = node.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    membership
        .nodes()
        .map(|(id, n)| Member {
            id: *id,
            addr: n.addr.clone(),
            role: if voters.contains(id) { "voter" } else { "learner" }.to_string(),
        })
        .collect()
}

async fn cluster(State(node): State<Shared>) -> Json<ClusterStatus> {
    let metrics = node.raft.metrics().borrow().clone();
    let commit_index = node
        .raft
        .with_raft_state(|s| s.committed.map_or(0, |l| l.index))
        .await
        .unwrap_or(0);
    let (revision, checksum, local_revision, local_checksum, applied_index) = {
        let applied = node.applied.read().expect("state lock");
        (
            applied.state.revision(),
            applied.state.checksum(),
            applied.state.local.revision,
            applied.state.local_checksum(),
            applied.last_applied.map_or(0, |l| l.index),
        )
    };
    let (primary_region, epoch) = node.primary_and_epoch();
    Json(ClusterStatus {
        region: node.config.region.clone(),
        node_id: node.id,
        leader: node.known_leader(),
        term: metrics.current_term,
        revision,
        checksum: rampart_store::checksum_text(checksum),
        local_revision,
        local_checksum: rampart_store::checksum_text(local_checksum),
        commit_index,
        applied_index,
        snapshot_index: metrics.snapshot.map_or(0, |l| l.index),
        purged_index: metrics.purged.map_or(0, |l| l.index),
        first_log_index: node.log.first_index().ok().flatten().unwrap_or(0),
        log_readers: node.log.readers(),
        members: member_list(&node),
        security: node.config.security().as_str().to_string(),
        witness: false,
        epoch,
        primary_region: Some(primary_region),
    })
}

async fn members(State(node): State<Shared>) -> Json<MembersResponse> {
    Json(MembersResponse {
        members: member_list(&node),
    })
}

async fn add_member(
    State(node): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<MembersResponse> {
    let request: AddMemberRequest = parse_body(body)?;
    let detail = format!("id={} addr={}", request.id, request.addr);
    let result = add_member_to_region(&node, request).await;
    audit(&node, &caller, "member.add", detail, &result).await;
    result
}

async fn add_member_to_region(node: &Shared, request: AddMemberRequest) -> ApiResult<MembersResponse> {
    let addr: std::net::SocketAddr = request.addr.parse().map_err(|_| {
        ApiError::bad_request(
            "bad_addr",
            format!("invalid addr {:?}: expected HOST:PORT", request.addr),
        )
    })?;
    if request.id == 0 {
        return Err(ApiError::bad_request(
            "bad_id",
            "member id must be a whole number from 1",
        ));
    }
    let timeout = node.config.request_timeout * 6;
    let map_err = |e: String| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "membership_change_failed", e);
    // Catch the new node up as a learner first, then make it a voter: a slow joiner never
    // counts toward the quorum before it has the log.
    tokio::time::timeout(
        timeout,
        node.raft
            .add_learner(request.id, BasicNode { addr: addr.to_string() }, true),
    )
    .await
    .map_err(|_| ApiError::timeout("adding the learner", timeout))?
    .map_err(|e| map_err(e.to_string()))?;
    let mut voters: BTreeSet<u64> = node
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .voter_ids()
        .collect();
    voters.insert(request.id);
    tokio::time::timeout(timeout, node.raft.change_membership(voters, false))
        .await
        .map_err(|_| ApiError::timeout("the membership change", timeout))?
        .map_err(|e| map_err(e.to_string()))?;
    Ok(Json(MembersResponse {
        members: member_list(node),
    }))
}

async fn remove_member(
    State(node): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<MembersResponse> {
    let id = parse_id(&id, "member id")?;
    let result = remove_member_from_region(&node, id).await;
    audit(&node, &caller, "member.remove", format!("id={id}"), &result).await;
    result
}

async fn remove_member_from_region(node: &Shared, id: u64) -> ApiResult<MembersResponse> {
    let membership = node.raft.metrics().borrow().membership_config.membership().clone();
    let mut voters: BTreeSet<u64> = membership.voter_ids().collect();
    if membership.get_node(&id).is_none() {
        return Err(ApiError::not_found(
            "member_not_found",
            format!("node {id} is not a member"),
        ));
    }
    voters.remove(&id);
    if voters.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "last_member",
            "cannot remove the last voter of a region",
        ));
    }
    let timeout = node.config.request_timeout * 6;
    // `retain = false`: the removed node is dropped entirely, not kept as a learner.
    tokio::time::timeout(timeout, node.raft.change_membership(voters, false))
        .await
        .map_err(|_| ApiError::timeout("the membership change", timeout))?
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "membership_change_failed",
                e.to_string(),
            )
        })?;
    Ok(Json(MembersResponse {
        members: member_list(node),
    }))
}

async fn ready(State(node): State<Shared>) -> Response {
    let metrics = node.raft.metrics().borrow().clone();
    let leader = node.known_leader();
    let applied = metrics.last_applied.map_or(0, |l| l.index);
    let last_log = metrics.last_log_index.unwrap_or(0);
    // Caught up: everything in the local log is applied, give or take one replication round.
    let lag = last_log.saturating_sub(applied);
    let ready = leader.is_some() && lag <= 100;
    let body = serde_json::json!({ "ready": ready, "leader": leader, "applied_index": applied, "apply_lag": lag });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn metrics(State(node): State<Shared>) -> Response {
    refresh_metrics(&node).await;
    ([("content-type", "text/plain; version=0.0.4")], node.metrics.render()).into_response()
}

/// `GET /metrics/ha`: the HA series of `/metrics` alone (`metrics::HA_FAMILIES`).
async fn metrics_ha(State(node): State<Shared>) -> Response {
    refresh_metrics(&node).await;
    let text = node.metrics.render_only(crate::metrics::HA_FAMILIES);
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

/// `GET /metrics/regions`: the `rampart_region_*` series of `/metrics` alone.
async fn metrics_regions(State(node): State<Shared>) -> Response {
    refresh_metrics(&node).await;
    let text = node.metrics.render_only(crate::metrics::REGION_FAMILIES);
    ([("content-type", "text/plain; version=0.0.4")], text).into_response()
}

/// Sets the gauges read from the state at scrape time.
async fn refresh_metrics(node: &Shared) {
    let commit_index = node
        .raft
        .with_raft_state(|s| s.committed.map_or(0, |l| l.index))
        .await
        .unwrap_or(0);
    node.metrics.commit_index.set(commit_index as i64);
    {
        let applied = node.applied.read().expect("state lock");
        node.metrics
            .apply_index
            .set(applied.last_applied.map_or(0, |l| l.index) as i64);
        node.metrics.revision.set(applied.state.revision() as i64);
        node.metrics.set_instances(&applied.state);
    }
    node.metrics.set_regions(&regions::view(node));
}
