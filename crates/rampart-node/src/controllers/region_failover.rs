//! Region failover asked by an operator: `POST /v1/regions/failover` (`rampart failover
//! --to REGION`) and `POST /v1/regions/failback`, run by the target region's leader (a node
//! of another region passes the request on over the region link).
//!
//! With the primary region reachable it is *planned* (RPO 0): the primary's leader first
//! has each service primary of its region let go (`on_demote`, then the role released, as
//! a switchover's first step), then stops acknowledging (it releases its lease: `Holder::release`, and renews no more), waits
//! until the target has applied its last revision, compares their checksums there, and
//! answers with the last renewal it released (`POST /v1/regions/handover`); the target
//! then gathers planned promises (voters count no released grant, so nothing is waited
//! out) and commits the next epoch. A step that times out calls the handover off: the
//! primary renews again and takes writes. With the primary unreachable it is *forced*: it
//! refuses unless `allow_data_loss`, says what it would lose (`dry_run` says only that),
//! and needs promises from enough regions that the old primary cannot renew without one of
//! them (with two regions, the target alone), after their last grants ran out.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use rampart_core::api::{ClusterStatus, FailoverRequest, FailoverResponse};
use rampart_core::region::lease::VoteKind;
use rampart_core::region::takeover::Rpo;
use serde::{Deserialize, Serialize};

use super::takeover::{describe_rpo, take_over, Cause};
use crate::error::{parse_body, ApiError};
use crate::node::Shared;

/// How long the primary waits for the target to catch up before it calls a handover off,
/// and how long it renews no lease after answering (the target promotes within it).
const HANDOVER_CATCH_UP: Duration = Duration::from_secs(10);
const HANDOVER_PROMOTION: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(10);

/// The primary's part of a planned failover.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandoverRequest {
    pub to: String,
    /// The epoch the target knows: the primary hands over only that one.
    pub epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandoverAnswer {
    /// Grants asked for up to this renewal no longer count.
    pub released_seq: u64,
    /// The target had this revision, with the primary's checksum there.
    pub revision: u64,
}

type Body = Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>;

/// `POST /v1/regions/failover` (operator).
pub async fn failover(
    State(node): State<Shared>,
    connection: Option<axum::Extension<crate::auth::Connection>>,
    body: Body,
) -> Result<Json<FailoverResponse>, ApiError> {
    let request: FailoverRequest = parse_body(body)?;
    run(&node, connection, request, "/v1/regions/failover", false)
        .await
        .map(Json)
}

/// `POST /v1/regions/failback` (operator): a planned failover back; refused when the
/// primary region does not answer.
pub async fn failback(
    State(node): State<Shared>,
    connection: Option<axum::Extension<crate::auth::Connection>>,
    body: Body,
) -> Result<Json<FailoverResponse>, ApiError> {
    let request: FailoverRequest = parse_body(body)?;
    run(&node, connection, request, "/v1/regions/failback", true)
        .await
        .map(Json)
}

async fn run(
    node: &Shared,
    connection: Option<axum::Extension<crate::auth::Connection>>,
    request: FailoverRequest,
    path: &str,
    failback: bool,
) -> Result<FailoverResponse, ApiError> {
    let regions = &node.config.regions;
    let own = node.config.region.clone();
    let to = request.to.clone();
    let data_region = to == own || regions.known.get(&to).is_some_and(|r| !r.witness);
    if !data_region {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("invalid to {to:?}: one of this deployment's regions that keep data"),
        ));
    }
    if to != own {
        // The target region runs it; a request passed on once is not passed again.
        if connection.is_some_and(|c| c.region_link) {
            return Err(ApiError::bad_request(
                "misdirected",
                format!("this is region {own}, not {to}"),
            ));
        }
        return pass_on(node, &to, path, &request).await;
    }
    let (primary, epoch) = super::regions::newest_primary(node);
    if primary == own {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_primary",
            format!("{own} is already the primary region (epoch {epoch})"),
        ));
    }
    let timeout = Duration::from_millis(regions.region_timeout_ms);
    let reachable = node
        .regions
        .lock()
        .expect("regions lock")
        .get(&primary)
        .is_some_and(|s| s.last_contact_ms.is_some() && s.contact.reachable(Instant::now(), timeout));
    if reachable {
        return planned(node, &primary, epoch, request.dry_run).await;
    }
    if failback {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "primary_unreachable",
            format!(
                "the primary region {primary} does not answer: a fail-back is planned and loses nothing, so it needs it; \
                 to take over without it, `rampart failover --to {own} --allow-data-loss`"
            ),
        ));
    }
    forced(node, &primary, epoch, &request).await
}

/// A planned failover from `primary` (at `epoch`) to this region.
async fn planned(node: &Shared, primary: &str, epoch: u64, dry_run: bool) -> Result<FailoverResponse, ApiError> {
    let own = node.config.region.clone();
    let revision = node.applied.read().expect("state lock").state.revision();
    let plan = format!(
        "planned: {primary} stops acknowledging writes, {own} catches up with its last revision (it has {revision}), \
         their checksums are compared there, {primary} hands over its lease, {own} becomes the primary at epoch {}; \
         nothing is lost. A step that times out calls it off and {primary} takes writes again.",
        epoch + 1
    );
    let mut answer = FailoverResponse {
        from: primary.to_string(),
        to: own.clone(),
        planned: true,
        dry_run,
        epoch: epoch + 1,
        rpo: Rpo::default(),
        last_shipped_ms: None,
        plan,
        took_ms: 0,
    };
    if dry_run {
        return Ok(answer);
    }
    let started = Instant::now();
    let Some(region) = node.config.regions.known.get(primary) else {
        return Err(unexpected(format!("{primary} is not a known region")));
    };
    let request = HandoverRequest { to: own.clone(), epoch };
    let handed = super::region_lease::ask_answer::<_, HandoverAnswer>(
        node,
        region,
        "/v1/regions/handover",
        &request,
        HANDOVER_CATCH_UP + Duration::from_secs(5),
    )
    .await?;
    let cause = Cause {
        primary: primary.to_string(),
        epoch,
        since: started,
        description: format!(
            "planned failover to {own} asked by an operator; {primary} handed over at revision {}",
            handed.revision
        ),
    };
    let kind = VoteKind::Planned {
        holder: primary.to_string(),
        released_seq: handed.released_seq,
    };
    let taken = take_over(node, &cause, kind).await.map_err(unexpected)?;
    answer.epoch = taken.epoch;
    answer.took_ms = started.elapsed().as_millis() as u64;
    Ok(answer)
}

/// A forced failover from the unreachable `primary` to this region.
async fn forced(
    node: &Shared,
    primary: &str,
    epoch: u64,
    request: &FailoverRequest,
) -> Result<FailoverResponse, ApiError> {
    let own = node.config.region.clone();
    let (revision, last_shipped_ms) = {
        let applied = node.applied.read().expect("state lock");
        let last = applied.shipped_from(applied.state.revision()).ok();
        (
            applied.state.revision(),
            last.and_then(|w| w.last().map(|w| w.command.at_ms)),
        )
    };
    let report = {
        let lease = node.region_lease.lock().expect("region lease lock");
        lease.grantor.as_ref().and_then(|(_, g)| g.report(node.mono_ms()))
    };
    let lease_ms = node.config.regions.region_lease_ms;
    let rpo = Rpo {
        reported_revision: report.map(|r| r.committed_revision),
        revisions: report.map_or(0, |r| r.committed_revision.saturating_sub(revision)),
        window_ms: report.map_or(lease_ms, |r| r.age_ms + lease_ms),
    };
    let plan = format!(
        "forced: {primary} does not answer; {own} takes over at epoch {} once enough regions promised it and the old lease ran out. \
         It would lose {}{}",
        epoch + 1,
        describe_rpo(&rpo, revision),
        last_shipped_ms.map_or(String::new(), |at| format!("; the last write {own} received was committed at {at} ms (the old primary's clock)")),
    );
    let mut answer = FailoverResponse {
        from: primary.to_string(),
        to: own.clone(),
        planned: false,
        dry_run: request.dry_run,
        epoch: epoch + 1,
        rpo,
        last_shipped_ms,
        plan,
        took_ms: 0,
    };
    if request.dry_run {
        return Ok(answer);
    }
    if !request.allow_data_loss {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "data_loss_possible",
            format!(
                "the primary region {primary} does not answer, so a failover may lose writes: {}. Run it again with --allow-data-loss to accept that (--dry-run shows the plan)",
                describe_rpo(&answer.rpo, revision)
            ),
        )
        .with_current(serde_json::to_value(&answer).expect("an answer encodes")));
    }
    let started = Instant::now();
    let cause = Cause {
        primary: primary.to_string(),
        epoch,
        since: started,
        description: format!(
            "forced failover to {own} asked by an operator (--allow-data-loss): {primary} does not answer"
        ),
    };
    let taken = take_over(node, &cause, VoteKind::Forced).await.map_err(unexpected)?;
    answer.epoch = taken.epoch;
    answer.rpo = taken.rpo;
    answer.took_ms = started.elapsed().as_millis() as u64;
    Ok(answer)
}

/// `POST /v1/regions/handover` (region link only): the primary's leader stops acknowledging,
/// waits until region `to` has its last revision with the same checksum, and answers with
/// the last renewal it released; called off (writes resume) if that takes too long.
pub async fn handover(
    State(node): State<Shared>,
    connection: Option<axum::Extension<crate::auth::Connection>>,
    body: Body,
) -> Result<Json<HandoverAnswer>, ApiError> {
    super::region_lease::refuse_unless(&node, connection, super::region_lease::LinkCaller::AnyNode)?;
    let request: HandoverRequest = parse_body(body)?;
    let (primary, epoch) = node.primary_and_epoch();
    if primary != node.config.region || epoch != request.epoch {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not_primary",
            format!(
                "{} is not the primary region at epoch {}",
                node.config.region, request.epoch
            ),
        ));
    }
    let Some(target) = node.config.regions.known.get(&request.to).filter(|r| !r.witness) else {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!(
                "invalid to {:?}: not a region of this deployment that keeps data",
                request.to
            ),
        ));
    };
    if !node.holds_region_lease() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "region_lease_lost",
            "this region does not hold the region lease: nothing to hand over",
        ));
    }
    // Each service primary of this region lets go first, while the lease still holds (its
    // on_demote ran, the role is released), and none is promoted here again until the
    // handover is done: the target promotes its own once it took over.
    let _letting_go = let_go_of_primaries(&node).await?;
    let released_seq = {
        let mut lease = node.region_lease.lock().expect("region lease lock");
        let Some((_, holder)) = lease.holder.as_mut() else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "region_lease_lost",
                "this region does not hold the region lease: nothing to hand over",
            ));
        };
        let released = holder.release();
        lease.handing_over = Some((epoch, Instant::now() + HANDOVER_CATCH_UP + HANDOVER_PROMOTION));
        released
    };
    tracing::info!(to = %request.to, released_seq, "region handover: writes stopped");
    match caught_up(&node, target).await {
        Ok(revision) => {
            tracing::info!(to = %request.to, revision, "region handover: the target has the last revision");
            Ok(Json(HandoverAnswer { released_seq, revision }))
        }
        Err(e) => {
            node.region_lease.lock().expect("region lease lock").handing_over = None;
            tracing::warn!(to = %request.to, "region handover called off, writes resume: {}", e.message);
            Err(e)
        }
    }
}

/// Every service whose primary is in this region lets it go (`switchover::let_go`), one
/// after another; the guards keep this region's failover from promoting them again. A
/// primary that does not let go calls the handover off (those already released are
/// promoted again here once the guards drop).
async fn let_go_of_primaries(node: &Shared) -> Result<Vec<super::switchover::InProgress>, ApiError> {
    let primaries: Vec<(String, String, bool, u64)> = {
        let applied = node.applied.read().expect("state lock");
        applied
            .state
            .shipped
            .services
            .iter()
            .filter_map(|(name, service)| {
                let (id, record) = service.primary_record()?;
                node.config.regions.looks_after(&record.instance.region).then(|| {
                    (
                        name.clone(),
                        id.to_string(),
                        record.instance.node.is_some(),
                        service.policy.hooks.timeout_ms,
                    )
                })
            })
            .collect()
    };
    let mut guards = Vec::new();
    for (service, id, hosted, hooks_timeout_ms) in primaries {
        let guard = super::switchover::InProgress::start(node, &service).ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "switchover_in_progress",
                format!("a switchover of service {service:?} is running: retry the failover when it is done"),
            )
        })?;
        guards.push(guard);
        if let Err(e) = super::switchover::let_go(node, &service, &id, hosted, hooks_timeout_ms).await {
            tracing::warn!(%service, instance = %id, "region handover called off: the primary did not let go: {}", e.message);
            return Err(ApiError::new(
                e.status,
                e.code,
                format!("service {service:?}: {}; the handover is called off", e.message),
            ));
        }
        tracing::info!(%service, instance = %id, "region handover: the primary let go");
    }
    Ok(guards)
}

/// Waits until `target` has applied this region's last revision (which moves no more: it
/// acknowledges nothing now) with the same checksum; that revision.
async fn caught_up(node: &Shared, target: &rampart_core::region::KnownRegion) -> Result<u64, ApiError> {
    let deadline = Instant::now() + HANDOVER_CATCH_UP;
    let mut last = None;
    loop {
        let (revision, checksum) = {
            let applied = node.applied.read().expect("state lock");
            (
                applied.state.revision(),
                rampart_store::checksum_text(applied.state.checksum()),
            )
        };
        let status: Option<ClusterStatus> = super::regions::status_of(node, target, POLL * 50).await;
        if let Some(status) = status {
            // Twice at the same revision: anything proposed before the release has applied.
            if status.revision >= revision && last == Some(revision) {
                if status.revision == revision && status.checksum != checksum {
                    return Err(ApiError::new(
                        StatusCode::CONFLICT,
                        "checksum_mismatch",
                        format!(
                            "at revision {revision} the target's shipped checksum is {} and this region's {checksum}: called off",
                            status.checksum
                        ),
                    ));
                }
                if status.revision == revision {
                    return Ok(revision);
                }
            }
        }
        last = Some(revision);
        if Instant::now() > deadline {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "handover_timeout",
                format!("the target did not reach revision {revision} within {HANDOVER_CATCH_UP:?}: called off, writes resume"),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Passes the request on to region `to`, over the region link, and its answer back.
async fn pass_on(node: &Shared, to: &str, path: &str, request: &FailoverRequest) -> Result<FailoverResponse, ApiError> {
    let region = node.config.regions.known.get(to).expect("checked by the caller");
    super::region_lease::ask_answer(node, region, path, request, Duration::from_secs(60)).await
}

fn unexpected(message: String) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "failover_failed", message)
}
