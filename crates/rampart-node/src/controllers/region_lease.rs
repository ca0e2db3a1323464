//! The region lease on a node (safety rule 5; the decisions are `core::region::lease`'s).
//!
//! The primary region's leader renews the lease every `regions.health_check_interval` from
//! every region, its own included (`POST /v1/regions/lease`), and `Node::propose` lets a
//! shipped write through, and acknowledges it, only while a majority's grants count. Every
//! region's leader is a grantor: it answers renewals and vote requests
//! (`POST /v1/regions/vote`), making each new promise durable through its own log
//! (`Op::RegionPromise`) before it answers, and confirming its leadership (a read barrier)
//! before any other answer, so a deposed leader never grants. A witness is a grantor too
//! (`witness.rs`), with its promise in a file.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Json;
use rampart_core::api::LeaseLeft;
use rampart_core::region::lease::{Decided, Grantor, Holder, RenewAnswer, Renewal, VoteAnswer, VoteFacts, VoteRequest};
use rampart_core::region::takeover::{better_than, required_silence_ms, Standby, FLAP_WINDOW_MS};
use rampart_core::region::Regions;
use rampart_store::{Op, Outcome};

use crate::error::ApiError;
use crate::node::{now_ms, Shared};
use crate::soft::RegionSeen;

/// The primary region's leader keeps its lease: a renewal round every
/// `health_check_interval`, and one at once when it becomes leader or the region epoch
/// moves (until the first grants it acknowledges nothing).
pub async fn run(node: Shared) {
    let regions = node.config.regions.clone();
    if regions.known.is_empty() {
        return;
    }
    let interval = Duration::from_millis(regions.health_check_interval_ms);
    let mut metrics = node.raft.metrics();
    loop {
        renew_round(&node).await;
        // The next round after the interval, or at once when leadership moves here.
        let (state, term) = leadership(&node);
        let moved = async {
            while metrics.changed().await.is_ok() {
                if leadership(&node) != (state, term) {
                    return;
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = moved => {}
        }
    }
}

fn leadership(node: &Shared) -> (openraft::ServerState, u64) {
    let metrics = node.raft.metrics();
    let metrics = metrics.borrow();
    (metrics.state, metrics.current_term)
}

/// One renewal: sends this leader's renewal to every region at once and counts each grant
/// as it comes (from when it was asked), within half a lease.
pub async fn renew_round(node: &Shared) {
    use futures_util::{FutureExt, StreamExt};
    let Some(renewal) = next_renewal(node) else { return };
    let regions = &node.config.regions;
    let timeout = Duration::from_millis(regions.region_lease_ms / 2);
    let own = async {
        let answer = grant(node, |grantor, now| grantor.renew(now, &renewal)).await;
        (node.config.region.clone(), answer.ok())
    };
    let mut answers: futures_util::stream::FuturesUnordered<_> = regions
        .known
        .iter()
        .map(|(name, region)| {
            let renewal = &renewal;
            async move {
                let answer = ask::<_, RenewAnswer>(node, region, "/v1/regions/lease", renewal, timeout).await;
                (name.clone(), answer)
            }
            .boxed()
        })
        .collect();
    answers.push(own.boxed());
    while let Some((region, answer)) = answers.next().await {
        let mut lease = node.region_lease.lock().expect("region lease lock");
        let Some((_, holder)) = lease.holder.as_mut().filter(|(_, h)| h.epoch() == renewal.epoch) else {
            return;
        };
        match answer {
            Some(RenewAnswer::Granted { seq }) => holder.granted(&region, seq),
            // A newer promise is not a promotion (a campaign may fail): go on renewing
            // from the others; said once per promise.
            Some(RenewAnswer::Refused { promise }) if lease.refused_with.get(&region) != Some(&promise) => {
                tracing::warn!(
                    region,
                    epoch = promise.epoch,
                    holder = %promise.region,
                    "region lease: {region} refuses this region's renewals: it promised epoch {} to {}",
                    promise.epoch,
                    promise.region
                );
                lease.refused_with.insert(region, promise);
            }
            Some(RenewAnswer::Refused { promise }) => {
                tracing::debug!(region, epoch = promise.epoch, holder = %promise.region, "region lease refused");
            }
            None => {}
        }
    }
}

/// This leader's next renewal, making its holder first if it has none for its term and
/// the region's epoch; `None` when it is not the primary region's leader.
fn next_renewal(node: &Shared) -> Option<Renewal> {
    let metrics = node.raft.metrics().borrow().clone();
    let leads = metrics.state == openraft::ServerState::Leader;
    let (primary, epoch) = node.primary_and_epoch();
    let mut lease = node.region_lease.lock().expect("region lease lock");
    if !leads || primary != node.config.region {
        lease.holder = None;
        return None;
    }
    // Handing over: no renewal, but the holder stays, so its numbering goes on above the
    // renewals it released if the handover is called off.
    if lease
        .handing_over
        .is_some_and(|(from, until)| from == epoch && std::time::Instant::now() < until)
    {
        return None;
    }
    let term = metrics.current_term;
    let regions = &node.config.regions;
    if !lease
        .holder
        .as_ref()
        .is_some_and(|(t, h)| *t == term && h.epoch() == epoch)
    {
        let quorum = lease_quorum(node);
        let holder = Holder::new(&node.config.region, epoch, regions.region_lease_ms, quorum, term);
        lease.holder = Some((term, holder));
    }
    let committed = node.applied.read().expect("state lock").state.revision();
    let (_, holder) = lease.holder.as_mut().expect("made above");
    Some(holder.renewal(node.mono_ms(), committed))
}

/// The grants this region's lease needs at its current epoch: a majority, or a blocking
/// set when it won the epoch by a forced failover.
fn lease_quorum(node: &Shared) -> usize {
    let count = node.config.regions.count();
    let applied = node.applied.read().expect("state lock");
    applied
        .state
        .shipped
        .epochs
        .last()
        .map_or(rampart_core::region::lease::majority(count), |e| e.lease_quorum(count))
}

/// POSTs `body` to region `region`'s endpoints in turn until one answers, within `timeout`
/// in all; a refusal counts as no answer (the next endpoint is tried).
pub async fn ask<B: serde::Serialize, A: serde::de::DeserializeOwned>(
    node: &Shared,
    region: &rampart_core::region::KnownRegion,
    path: &str,
    body: &B,
    timeout: Duration,
) -> Option<A> {
    post_each(node, region, path, body, timeout, false).await.ok()
}

/// POSTs `body` to region `region` over the region link (its endpoints in turn, within
/// `timeout` in all) and decodes its answer; its refusal comes back as the same error.
pub async fn ask_answer<B: serde::Serialize, A: serde::de::DeserializeOwned>(
    node: &Shared,
    region: &rampart_core::region::KnownRegion,
    path: &str,
    body: &B,
    timeout: Duration,
) -> Result<A, ApiError> {
    post_each(node, region, path, body, timeout, true).await
}

/// The region-link POST behind [`ask`] and [`ask_answer`]: endpoints in turn until one
/// answers (or, with `refusal_answers`, refuses with an error it explains).
async fn post_each<B: serde::Serialize, A: serde::de::DeserializeOwned>(
    node: &Shared,
    region: &rampart_core::region::KnownRegion,
    path: &str,
    body: &B,
    timeout: Duration,
    refusal_answers: bool,
) -> Result<A, ApiError> {
    let deadline = Instant::now() + timeout;
    let mut last_error = String::from("no endpoint");
    for endpoint in &region.endpoints {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        let sent = node
            .region_http
            .post(crate::forward::url(node, &endpoint.to_string(), path))
            .json(body)
            .timeout(left)
            .send()
            .await;
        let answer = match sent {
            Ok(answer) => answer,
            Err(e) => {
                last_error = format!("{endpoint}: {e}");
                continue;
            }
        };
        let status = answer.status();
        let bytes = answer.bytes().await.unwrap_or_default();
        if status.is_success() {
            match serde_json::from_slice(&bytes) {
                Ok(answer) => return Ok(answer),
                Err(e) if refusal_answers => {
                    return Err(ApiError::new(
                        axum::http::StatusCode::BAD_GATEWAY,
                        "region_call_failed",
                        format!("{endpoint}: {e}"),
                    ))
                }
                Err(e) => {
                    last_error = format!("{endpoint}: {e}");
                    continue;
                }
            }
        }
        let Ok(refused) = serde_json::from_slice::<rampart_core::api::ErrorBody>(&bytes) else {
            last_error = format!("{endpoint}: answered {status}");
            continue;
        };
        if !refusal_answers {
            last_error = format!("{endpoint}: {}", refused.error.message);
            continue;
        }
        let detail = refused.error;
        let mut error = ApiError::new(
            axum::http::StatusCode::from_u16(status.as_u16()).unwrap_or(axum::http::StatusCode::BAD_GATEWAY),
            remote_code(&detail.code),
            detail.message,
        );
        error.current = detail.current;
        return Err(error);
    }
    Err(ApiError::new(
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        "region_unreachable",
        format!("no endpoint of the region answered within {timeout:?}: {last_error}"),
    ))
}

/// Another region's error code, as one of ours.
fn remote_code(code: &str) -> &'static str {
    const KNOWN: &[&str] = &[
        "already_primary",
        "data_loss_possible",
        "primary_unreachable",
        "not_primary",
        "checksum_mismatch",
        "handover_timeout",
        "demotion_failed",
        "demotion_unconfirmed",
        "switchover_in_progress",
        "region_lease_lost",
        "invalid_field",
        "failover_failed",
        "misdirected",
        "not_leader",
        "no_leader",
        "region_link_only",
        "forbidden",
    ];
    KNOWN
        .iter()
        .find(|k| **k == code)
        .copied()
        .unwrap_or("region_call_failed")
}

/// This region's grantor decides (on its leader, made at the start of its term from the
/// promise applied), then the promise it made is kept in the log, or its leadership is
/// confirmed, before the answer goes out.
pub async fn grant<A>(node: &Shared, decide: impl FnOnce(&mut Grantor, u64) -> Decided<A>) -> Result<A, ApiError> {
    let metrics = node.raft.metrics().borrow().clone();
    if metrics.state != openraft::ServerState::Leader {
        return Err(ApiError::not_leader());
    }
    let term = metrics.current_term;
    let decided = {
        let mut lease = node.region_lease.lock().expect("region lease lock");
        let now = node.mono_ms();
        if lease.grantor.as_ref().is_none_or(|(t, _)| *t != term) {
            let promise = node.applied.read().expect("state lock").state.local.promise.clone();
            lease.grantor = Some((term, Grantor::new(now, promise, node.config.regions.region_lease_ms)));
        }
        let (_, grantor) = lease.grantor.as_mut().expect("made above");
        decide(grantor, now)
    };
    let Some(promise) = decided.persist else {
        node.read_barrier().await?;
        return Ok(decided.answer);
    };
    let kept = node
        .propose(Op::RegionPromise {
            promise: promise.clone(),
        })
        .await;
    match kept {
        Ok(Outcome::Promised { promise: kept }) if kept == promise => Ok(decided.answer),
        other => {
            // Not kept (or a newer one was): start over from what the log holds.
            node.region_lease.lock().expect("region lease lock").grantor = None;
            Err(other.err().unwrap_or_else(|| {
                ApiError::new(
                    axum::http::StatusCode::CONFLICT,
                    "promised_elsewhere",
                    "this region promised a newer region epoch meanwhile: ask again",
                )
            }))
        }
    }
}

/// `POST /v1/regions/lease` (region link only): the primary's renewal, answered by this
/// region's leader.
pub async fn renew(
    State(node): State<Shared>,
    connection: Option<axum::Extension<crate::auth::Connection>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<RenewAnswer>, ApiError> {
    refuse_unless(&node, connection, LinkCaller::AnyNode)?;
    let renewal: Renewal = crate::error::parse_body(body)?;
    check_region(&node.config.regions, &node.config.region, "holder", &renewal.holder)?;
    grant(&node, |grantor, now| grantor.renew(now, &renewal))
        .await
        .map(Json)
}

/// A standby region's word on what it applied, for the bounded RPO.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub region: String,
    pub revision: u64,
}

/// `POST /v1/regions/ack` (region link only; on the primary's leader): a standby says which
/// shipped revision it applied.
pub async fn ack(
    State(node): State<Shared>,
    connection: Option<axum::Extension<crate::auth::Connection>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    refuse_unless(&node, connection, LinkCaller::AnyNode)?;
    let ack: Ack = crate::error::parse_body(body)?;
    check_region(&node.config.regions, &node.config.region, "region", &ack.region)?;
    let mut lease = node.region_lease.lock().expect("region lease lock");
    let had = lease.acked.entry(ack.region).or_insert(0);
    *had = (*had).max(ack.revision);
    Ok(Json(serde_json::json!({})))
}

/// `POST /v1/regions/vote` (region link only): a standby asks this region to promise it
/// the next region epoch.
pub async fn vote(
    State(node): State<Shared>,
    connection: Option<axum::Extension<crate::auth::Connection>>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<VoteAnswer>, ApiError> {
    refuse_unless(&node, connection, LinkCaller::AnyNode)?;
    let request: VoteRequest = crate::error::parse_body(body)?;
    let regions = &node.config.regions;
    check_region(regions, &node.config.region, "candidate", &request.candidate)?;
    let own = (
        node.config.region.clone(),
        node.applied.read().expect("state lock").state.revision(),
    );
    let recent = recent_failovers(&node);
    let seen = node.regions.lock().expect("regions lock").clone();
    let answer = grant(&node, |grantor, now| {
        let holder = grantor.promise().map(|p| p.region.clone());
        let facts = vote_facts(regions, &seen, holder.as_deref(), Some(&own), &request, recent);
        grantor.vote(now, &request, facts.as_facts())
    })
    .await?;
    Ok(Json(answer))
}

/// The region failovers in the last `FLAP_WINDOW_MS`, by this region's shipped history.
pub fn recent_failovers(node: &Shared) -> usize {
    let since = now_ms().saturating_sub(FLAP_WINDOW_MS);
    let applied = node.applied.read().expect("state lock");
    applied.state.shipped.epochs.iter().filter(|e| e.at_ms >= since).count()
}

/// What a voting region sees, owned.
pub struct Facts {
    pub primary_lost: bool,
    pub better: Option<String>,
}

impl Facts {
    pub fn as_facts(&self) -> VoteFacts<'_> {
        VoteFacts {
            primary_lost: self.primary_lost,
            better: self.better.as_deref(),
        }
    }
}

/// Whether this region lost the lease holder `holder` (for the silence a failover needs
/// after `recent` failovers) and which reachable standby, if any, is ahead of the
/// candidate, from what it last heard of each region (`seen`) and its own standby
/// (`own`: name and revision; none for a witness).
pub fn vote_facts(
    regions: &Regions,
    seen: &BTreeMap<String, RegionSeen>,
    holder: Option<&str>,
    own: Option<&(String, u64)>,
    request: &VoteRequest,
    recent: usize,
) -> Facts {
    let now = Instant::now();
    let silence = Duration::from_millis(required_silence_ms(regions.region_timeout_ms, recent));
    let reachable = Duration::from_millis(regions.region_timeout_ms);
    let primary_lost = match holder {
        // This region is (or was) the holder itself: it has not lost itself.
        Some(holder) if own.is_some_and(|(name, _)| name == holder) => false,
        Some(holder) => seen.get(holder).is_none_or(|s| !s.contact.reachable(now, silence)),
        None => true,
    };
    let mut standbys: Vec<(String, u64)> = seen
        .iter()
        .filter(|(name, s)| {
            Some(name.as_str()) != holder
                && !regions.known.get(*name).is_some_and(|r| r.witness)
                && s.status.as_ref().is_some_and(|st| !st.witness)
                && s.contact.reachable(now, reachable)
        })
        .filter_map(|(name, s)| s.status.as_ref().map(|st| (name.clone(), st.revision)))
        .collect();
    if let Some(own) = own.filter(|(name, _)| Some(name.as_str()) != holder) {
        standbys.push(own.clone());
    }
    let others: Vec<Standby<'_>> = standbys
        .iter()
        .map(|(name, revision)| Standby {
            name,
            revision: *revision,
        })
        .collect();
    let candidate = Standby {
        name: &request.candidate,
        revision: request.revision,
    };
    Facts {
        primary_lost,
        better: better_than(&candidate, &others).map(str::to_string),
    }
}

/// A region named in a request must be one of this deployment's, not a witness.
fn check_region(regions: &Regions, own: &str, field: &str, name: &str) -> Result<(), ApiError> {
    let known = name == own || regions.known.get(name).is_some_and(|r| !r.witness);
    if known {
        return Ok(());
    }
    Err(ApiError::new(
        axum::http::StatusCode::BAD_REQUEST,
        "invalid_field",
        format!("invalid {field} {name:?}: not a region of this deployment that keeps data"),
    ))
}

/// Who may call a region-link endpoint on a TLS node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkCaller {
    /// Another region's node on the region ALPN: the log and the snapshot, which any node
    /// serves itself (`server.rs` refuses the ALPN without a node certificate).
    RegionLink,
    /// That, or a node of this region forwarding it to its leader: the lease, votes, acks
    /// and handovers, which the leader answers.
    AnyNode,
}

/// On TLS, 403 `region_link_only` unless the caller is `allowed`; every caller without TLS.
pub fn refuse_unless(
    node: &Shared,
    connection: Option<axum::Extension<crate::auth::Connection>>,
    allowed: LinkCaller,
) -> Result<(), ApiError> {
    let ok = connection.is_some_and(|c| c.region_link || (allowed == LinkCaller::AnyNode && c.from_node));
    if node.tls.is_some() && !ok {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            "region_link_only",
            "this is served only to another region's node: its node certificate of the cluster CA (on the rampart-region ALPN for the log and the snapshot)",
        ));
    }
    Ok(())
}

/// Every node of the primary region keeps the latest end of its leader's lease, on its own
/// clock, asking each `health_check_interval` (the leader reads its own holder): the
/// service primaries it hosts are fenced before that end can pass (`hooks.rs`), and its
/// registry is not served as current meanwhile (`Node::region_fenced`).
pub async fn run_end(node: Shared) {
    let regions = node.config.regions.clone();
    if regions.known.is_empty() {
        return;
    }
    let interval = Duration::from_millis(regions.health_check_interval_ms);
    let timeout = Duration::from_millis(regions.region_lease_ms / 2);
    loop {
        ask_end(&node, timeout).await;
        tokio::time::sleep(interval).await;
    }
}

/// Asks the leader (or reads this leader's holder) how long the lease has left, within
/// `timeout`, and keeps the answer; nothing outside the primary region. Also called by a
/// node about to fence, so that a lease renewed since its last ask is seen first.
pub async fn ask_end(node: &Shared, timeout: Duration) {
    let (primary, epoch) = node.primary_and_epoch();
    if primary != node.config.region {
        return;
    }
    let asked = node.mono_ms();
    let left = if node.known_leader() == Some(node.id) {
        Some(lease_left(node))
    } else {
        let body = serde_json::json!({});
        let answer = crate::forward::call(
            node,
            crate::forward::To::Leader,
            "/v1/regions/lease/left",
            &body,
            Some(timeout),
        )
        .await;
        answer
            .ok()
            .and_then(|bytes| serde_json::from_slice::<LeaseLeft>(&bytes).ok())
    };
    let now = node.mono_ms();
    let mut lease = node.region_lease.lock().expect("region lease lock");
    let end = lease.end_at(epoch, now, node.config.regions.region_lease_ms);
    if let Some(left) = left {
        end.told(left.epoch, asked, left.remaining_ms);
    }
}

/// How long this leader's lease has left now, at the epoch it holds it for.
fn lease_left(node: &Shared) -> LeaseLeft {
    let now = node.mono_ms();
    let lease = node.region_lease.lock().expect("region lease lock");
    match &lease.holder {
        Some((_, holder)) => LeaseLeft {
            epoch: holder.epoch(),
            remaining_ms: holder.valid_for_ms(now),
        },
        None => LeaseLeft {
            epoch: 0,
            remaining_ms: 0,
        },
    }
}

/// `POST /v1/regions/lease/left` (a node of this region to its leader): how long the
/// lease this leader holds has left.
pub async fn left(
    State(node): State<Shared>,
    connection: Option<axum::Extension<crate::auth::Connection>>,
) -> Result<Json<LeaseLeft>, ApiError> {
    refuse_unless(&node, connection, LinkCaller::AnyNode)?;
    if node.raft.metrics().borrow().state != openraft::ServerState::Leader {
        return Err(ApiError::not_leader());
    }
    Ok(Json(lease_left(&node)))
}

/// The lease as this node holds it, for `GET /v1/regions`: on the primary's leader only.
pub fn status(node: &Shared) -> Option<rampart_core::api::LeaseStatus> {
    let lease = node.region_lease.lock().expect("region lease lock");
    let (_, holder) = lease.holder.as_ref()?;
    let now = node.mono_ms();
    Some(rampart_core::api::LeaseStatus {
        held: holder.may_acknowledge(now),
        valid_for_ms: holder.valid_for_ms(now),
        granted_by: holder.granted_by(now),
        lease_ms: node.config.regions.region_lease_ms,
    })
}
