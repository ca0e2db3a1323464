//! Region health: every node asks each other region it knows for its `GET /v1/cluster`,
//! every `regions.health_check_interval`, trying its endpoints from the one that answered
//! last. `core::region::Contact` says when a region is lost (no answer for
//! `regions.region_timeout`) and when it is back; the leader records each as an event
//! (kind `region`), which alerts. `GET /v1/regions` shows what this node last heard.
//!
//! `GET /v1/regions/log?from_revision=N` is the source of a region link: the shipped writes
//! from revision N on, as this node applied them (any node serves it, from its own applied
//! state), one JSON object per line, then each new one as it is applied.
//! `GET /v1/regions/snapshot` is where a link starts over when this node no longer keeps
//! the writes it needs: the node's shipped state as the steps of an install.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::Json;
use rampart_core::api::{ClusterStatus, Event, RegionStatus, RegionsResponse};
use rampart_core::region::{Contact, KnownRegion, Reach, Regions};

use crate::node::{now_ms, Shared};
use crate::soft::RegionSeen;

pub async fn run(node: Shared) {
    let regions = node.config.regions.clone();
    if regions.known.is_empty() {
        return;
    }
    let interval = Duration::from_millis(regions.health_check_interval_ms);
    let timeout = Duration::from_millis(regions.region_timeout_ms);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = vec![0usize; regions.known.len()];
    // Standbys this (primary region's) node has seen past `max_lag`.
    let mut over: std::collections::BTreeMap<String, bool> = std::collections::BTreeMap::new();
    // Writes stopped by `max_rpo_lag`, as last reported.
    let mut rpo_stopped_before = false;
    loop {
        tick.tick().await;
        let tls = node.tls.is_some();
        for (name, reach) in poll(&node.region_http, tls, &regions, &node.regions, &mut first).await {
            report(&node, &name, reach, timeout).await;
        }
        let stopped = rpo_stopped(&node);
        if stopped.is_some() != rpo_stopped_before {
            rpo_stopped_before = stopped.is_some();
            let (action, outcome, detail) = match stopped {
                Some(why) => ("region.rpo_bound", "stopped", format!("writes stopped: {why}")),
                None => (
                    "region.rpo_bound",
                    "resumed",
                    "writes resume: a standby is within regions.max_rpo_lag again".to_string(),
                ),
            };
            tracing::warn!(action, "{detail}");
            crate::events::record(&node, region_event(&node, action, outcome, detail)).await;
        }
        if !node.is_standby() {
            for standby in view(&node).regions.into_iter().filter(|r| !r.this_region) {
                let was_over = over.get(&standby.name).copied().unwrap_or(false);
                let Some(now_over) = rampart_core::region::lag_crossed(was_over, standby.lag_ms, regions.max_lag_ms)
                else {
                    continue;
                };
                over.insert(standby.name.clone(), now_over);
                report_lag(&node, &standby, now_over, regions.max_lag_ms).await;
            }
        }
    }
}

/// What a node or a witness last heard from each other region, by name.
pub type Seen = std::sync::Mutex<std::collections::BTreeMap<String, RegionSeen>>;

/// One round of region health: asks every region in `regions` for its status at once
/// (each from the endpoint in `first` that answered last, which it updates), notes the
/// answers in `seen`, and returns the regions lost or regained by this round.
pub async fn poll(
    http: &reqwest::Client,
    tls: bool,
    regions: &Regions,
    seen: &Seen,
    first: &mut [usize],
) -> Vec<(String, Reach)> {
    let interval = Duration::from_millis(regions.health_check_interval_ms);
    let timeout = Duration::from_millis(regions.region_timeout_ms);
    let asks = regions
        .known
        .values()
        .zip(first.iter().copied())
        .map(|(region, start)| ask(http, tls, region, start, interval));
    let answers = futures_util::future::join_all(asks).await;
    let now = Instant::now();
    let mut changes = Vec::new();
    for ((name, answer), first) in regions.known.keys().zip(answers).zip(first.iter_mut()) {
        let mut seen = seen.lock().expect("regions lock");
        let seen = seen.entry(name.clone()).or_insert_with(|| RegionSeen {
            contact: Contact::new(now),
            last_contact_ms: None,
            status: None,
        });
        let reach = match answer {
            Some((index, status)) => {
                *first = index;
                seen.last_contact_ms = Some(now_ms());
                seen.status = Some(status);
                seen.contact.answered(now)
            }
            None => seen.contact.missed(now, timeout),
        };
        changes.extend(reach.map(|r| (name.clone(), r)));
    }
    changes
}

/// The leader records a standby passing `max_lag` or coming back under it.
async fn report_lag(node: &Shared, standby: &RegionStatus, over: bool, max_lag_ms: u64) {
    let lag_ms = standby.lag_ms.unwrap_or(0);
    let (action, outcome, detail) = if over {
        (
            "region.lagging",
            "lagging",
            format!(
                "{}: {lag_ms}ms behind (regions.max_lag {max_lag_ms}ms), {} revisions",
                standby.name,
                standby.lag_revisions.unwrap_or(0)
            ),
        )
    } else {
        (
            "region.caught_up",
            "ok",
            format!(
                "{}: {lag_ms}ms behind, within regions.max_lag {max_lag_ms}ms",
                standby.name
            ),
        )
    };
    tracing::warn!(region = %standby.name, action, "{detail}");
    if node.known_leader() != Some(node.id) {
        return;
    }
    crate::events::record(node, region_event(node, action, outcome, detail)).await;
}

fn region_event(node: &Shared, action: &str, outcome: &str, detail: String) -> Event {
    Event {
        id: 0,
        at_ms: 0,
        kind: "region".into(),
        action: action.into(),
        actor: format!("node {}", node.id),
        source: node.config.region.clone(),
        outcome: outcome.into(),
        detail,
    }
}

/// Region `region`'s status now, from the first endpoint that answers within `timeout`.
pub async fn status_of(node: &Shared, region: &KnownRegion, timeout: Duration) -> Option<ClusterStatus> {
    ask(&node.region_http, node.tls.is_some(), region, 0, timeout)
        .await
        .map(|(_, status)| status)
}

/// The region's status from the first of its endpoints (from `start` on) that answers
/// within `timeout`, with that endpoint's index.
async fn ask(
    http: &reqwest::Client,
    tls: bool,
    region: &KnownRegion,
    start: usize,
    timeout: Duration,
) -> Option<(usize, ClusterStatus)> {
    let count = region.endpoints.len();
    let scheme = if tls { "https" } else { "http" };
    for index in (start..count).chain(0..start) {
        let url = format!("{scheme}://{}/v1/cluster", region.endpoints[index]);
        let answer = http.get(url).timeout(timeout).send().await;
        let Ok(answer) = answer else { continue };
        if let Ok(status) = answer.error_for_status().map(|a| a.json::<ClusterStatus>()) {
            if let Ok(status) = status.await {
                return Some((index, status));
            }
        }
    }
    None
}

/// The leader records a region lost or regained (one event per change in the region).
async fn report(node: &Shared, name: &str, reach: Reach, timeout: Duration) {
    let (action, outcome, detail) = match reach {
        Reach::Lost => (
            "region.unreachable",
            "unreachable",
            format!(
                "{name}: no answer for {}ms (regions.region_timeout)",
                timeout.as_millis()
            ),
        ),
        Reach::Regained => ("region.reachable", "ok", format!("{name} answers again")),
    };
    tracing::warn!(region = name, action, "{detail}");
    if node.known_leader() != Some(node.id) {
        return;
    }
    crate::events::record(node, region_event(node, action, outcome, detail)).await;
}

/// The regions as this node sees them, with the lag it can tell (see `RegionStatus`).
pub fn view(node: &Shared) -> RegionsResponse {
    let regions = &node.config.regions;
    let seen = node.regions.lock().expect("regions lock").clone();
    let applied = node.applied.read().expect("state lock");
    let own_revision = applied.state.revision();
    let now = Instant::now();
    let endpoints = applied
        .membership
        .membership()
        .nodes()
        .map(|(_, member)| member.addr.clone())
        .collect();
    let promise = applied.state.local.promise.clone();
    // Decided here, once: asking the node again would read-lock the state it holds.
    let (own_primary, own_epoch) = node.primary_and_epoch_in(&applied.state.shipped);
    let (primary, epoch) = current_primary(own_primary, own_epoch, &seen);
    let standby = own_primary != node.config.region;
    let mut own = RegionStatus {
        last_contact_ms: Some(now_ms()),
        revision: Some(own_revision),
        checksum: Some(rampart_store::checksum_text(applied.state.checksum())),
        leader: node.known_leader(),
        epoch: own_epoch,
        ..RegionStatus::unheard(
            &node.config.region,
            role(&primary, &node.config.region, false),
            true,
            endpoints,
        )
    };
    drop(applied);
    if let Some(verified) = node.verified.lock().expect("verified lock").as_ref() {
        own.checksum_match = Some(verified.matched);
        own.verified_revision = Some(verified.revision);
        own.verified_ms = Some(verified.at_ms);
    }
    let applied = node.applied.read().expect("state lock");
    let mut others = Vec::new();
    for (name, region) in &regions.known {
        let mut entry = seen_as(regions, &primary, name, region, seen.get(name), now);
        match seen.get(name).and_then(|s| s.status.as_ref()) {
            // This region is the primary: each standby's lag, from the writes kept here.
            // As of its last answer while it answers (what it lacked then, not what was
            // written since), as of now once it stops answering (its lag grows).
            Some(status) if !standby && !region.witness && !status.witness => {
                let now = now_ms();
                let fresh = 2 * regions.health_check_interval_ms;
                let as_of = entry
                    .last_contact_ms
                    .filter(|at| now.saturating_sub(*at) <= fresh)
                    .unwrap_or(now);
                match applied.shipped_from(status.revision + 1) {
                    Ok(unapplied) => {
                        let lacked: Vec<_> = unapplied.iter().take_while(|w| w.command.at_ms <= as_of).collect();
                        entry.lag_revisions = Some(lacked.len() as u64);
                        entry.lag_bytes = Some(lacked.iter().map(|w| w.command.op.approx_bytes() as u64).sum());
                        entry.lag_ms = Some(lacked.first().map_or(0, |w| as_of.saturating_sub(w.command.at_ms)));
                    }
                    // Further behind than this node keeps writes for: only the count is known.
                    Err(_) => entry.lag_revisions = Some(own_revision.saturating_sub(status.revision)),
                }
            }
            // This region is a standby: its own distance from the primary's last revision.
            Some(status) if standby && *name == primary => {
                own.lag_revisions = Some(status.revision.saturating_sub(own_revision));
            }
            _ => {}
        }
        others.push(entry);
    }
    drop(applied);
    RegionsResponse {
        region: node.config.region.clone(),
        primary,
        epoch,
        auto_failover: regions.auto_failover,
        failover_note: failover_note(regions),
        lease: super::region_lease::status(node),
        rpo_bound: rpo_stopped(node),
        divergence: Vec::new(),
        promise,
        regions: std::iter::once(own).chain(others).collect(),
    }
}

/// The region this one follows: the primary at the newest epoch this node knows of (from
/// its own shipped history, or a region that answered at a newer one), unless it is this
/// region. An old primary that comes back finds the new one this way.
pub fn following(node: &Shared) -> Option<String> {
    let (primary, _) = newest_primary(node);
    (primary != node.config.region).then_some(primary)
}

/// [`following`], on this region's leader alone (which runs the link, its acks and its
/// verifications).
pub fn leader_following(node: &Shared) -> Option<String> {
    if node.known_leader() != Some(node.id) {
        return None;
    }
    following(node)
}

/// The primary region and its epoch, the newest this node knows of: from its own shipped
/// history, or a region that answered at a newer epoch (`current_primary`).
pub fn newest_primary(node: &Shared) -> (String, u64) {
    let (primary, epoch) = node.primary_and_epoch();
    let seen = node.regions.lock().expect("regions lock");
    current_primary(&primary, epoch, &seen)
}

/// On the primary region's leader with `max_rpo_lag`: why writes are stopped, if they are.
pub fn rpo_stopped(node: &Shared) -> Option<String> {
    let bounded = node.config.regions.max_rpo_lag.is_some();
    if !bounded || node.known_leader() != Some(node.id) || node.is_standby() {
        return None;
    }
    node.rpo_stop()
}

/// Why the regions do not fail over by themselves, when they do not.
pub fn failover_note(regions: &Regions) -> Option<String> {
    if regions.auto_failover || regions.known.is_empty() {
        return None;
    }
    Some(if regions.count() < 3 {
        "two regions and no witness: region failover is manual (rampart failover --to REGION; with the primary region lost, --allow-data-loss)".to_string()
    } else {
        "regions.auto_failover = false: region failover is manual (rampart failover --to REGION)".to_string()
    })
}

/// The primary region and epoch as the newest word says: this region's own (`primary` at
/// `epoch`, from its shipped history or, for a witness, its promise) or a region that
/// answered at a newer epoch (this one has not caught up with a failover yet).
pub fn current_primary(
    primary: &str,
    epoch: u64,
    seen: &std::collections::BTreeMap<String, RegionSeen>,
) -> (String, u64) {
    // A witness only echoes what it heard: only data regions' word counts.
    let newest = seen
        .values()
        .filter_map(|s| s.status.as_ref().filter(|s| !s.witness))
        .filter_map(|s| s.primary_region.as_ref().map(|p| (s.epoch, p)))
        .max_by_key(|(e, _)| *e);
    match newest {
        Some((newer, region)) if newer > epoch => (region.clone(), newer),
        _ => (primary.to_string(), epoch),
    }
}

/// A region's role, with `primary` the primary region.
pub fn role(primary: &str, name: &str, witness: bool) -> &'static str {
    if witness {
        "witness"
    } else if name == primary {
        "primary"
    } else {
        "standby"
    }
}

/// Another region as last heard (`seen`), without lag or verification.
pub fn seen_as(
    regions: &Regions,
    primary: &str,
    name: &str,
    region: &KnownRegion,
    seen: Option<&RegionSeen>,
    now: Instant,
) -> RegionStatus {
    let timeout = Duration::from_millis(regions.region_timeout_ms);
    let status = seen.and_then(|s| s.status.as_ref());
    // A witness is one by its configuration (`witness = true`) or by its own answer.
    let witness = region.witness || status.is_some_and(|s| s.witness);
    let endpoints = region.endpoints.iter().map(|a| a.to_string()).collect();
    RegionStatus {
        reachable: seen.is_some_and(|s| s.last_contact_ms.is_some() && s.contact.reachable(now, timeout)),
        last_contact_ms: seen.and_then(|s| s.last_contact_ms),
        revision: status.map(|s| s.revision),
        checksum: status.map(|s| s.checksum.clone()),
        leader: status.and_then(|s| s.leader),
        epoch: status.map_or(rampart_core::region::FIRST_EPOCH, |s| s.epoch),
        ..RegionStatus::unheard(name, role(primary, name, witness), false, endpoints)
    }
}

/// `/health/regions`: 200 when every other region answers and no standby is further behind
/// than `regions.max_lag`, as this node sees them; else 503 with each problem.
pub async fn health(State(node): State<Shared>) -> axum::response::Response {
    health_answer(&view(&node), node.config.regions.max_lag_ms)
}

/// `/health/regions` for `view`: 200, or 503 listing why not.
pub fn health_answer(view: &RegionsResponse, max_lag_ms: u64) -> axum::response::Response {
    use axum::response::IntoResponse;
    let mut problems = Vec::new();
    let own = &view.regions[0];
    if own.checksum_match == Some(false) {
        problems.push(format!(
            "{}: shipped checksum differs from the primary region's at revision {}: its reads are suspect",
            own.name,
            own.verified_revision.unwrap_or(0)
        ));
    }
    for region in view.regions.iter().filter(|r| !r.this_region) {
        if !region.reachable {
            problems.push(format!("{}: unreachable", region.name));
        }
        if let Some(ms) = region.lag_ms.filter(|ms| *ms > max_lag_ms) {
            problems.push(format!(
                "{}: {ms}ms behind (regions.max_lag {max_lag_ms}ms)",
                region.name
            ));
        }
    }
    if problems.is_empty() {
        return Json(serde_json::json!({ "status": "ok" })).into_response();
    }
    (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "status": "degraded", "problems": problems })),
    )
        .into_response()
}

/// Longest a region log stream stays silent: then it sends an empty line, so a standby
/// can tell a quiet primary from a dead link.
const LOG_KEEPALIVE: Duration = Duration::from_secs(2);

/// A region log chunk's size at most, in bytes and in replayed writes.
const LOG_CHUNK_BYTES: usize = 256 << 10;
const LOG_CHUNK_WRITES: usize = 1024;

/// One line of a region link (the log or the snapshot): the region epoch its sender knows,
/// beside a shipped write or an install step. The epoch is 1 until a region failover moves
/// it; a standby follows only a primary at the epoch it knows.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct LinkLine<T> {
    pub epoch: u64,
    #[serde(flatten)]
    pub body: T,
}

/// Appends `body` as one JSON line of a region link from a sender at `epoch`.
fn push_line<T: serde::Serialize>(chunk: &mut Vec<u8>, epoch: u64, body: &T) {
    let line = LinkLine { epoch, body };
    serde_json::to_writer(&mut *chunk, &line).expect("a line encodes");
    chunk.push(b'\n');
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    from_revision: u64,
    /// The region epoch the follower knows: its history is checked against this node's.
    epoch: Option<u64>,
}

/// `GET /v1/regions/log?from_revision=N` (admin): the shipped writes from revision N on,
/// as newline-delimited JSON (`{"revision", "command"}`), then live. 410 `compacted` when
/// this node no longer keeps revision N: the standby starts from a snapshot.
/// On a TLS node the region log and snapshot go only to a region link: a node certificate
/// of the cluster CA on the region ALPN (`server.rs` refuses the ALPN without one); and
/// only from a region that applies the current rules.
fn link_refusal(
    node: &Shared,
    connection: Option<axum::Extension<crate::auth::Connection>>,
) -> Option<axum::response::Response> {
    use axum::response::IntoResponse;
    if let Err(refused) =
        super::region_lease::refuse_unless(node, connection, super::region_lease::LinkCaller::RegionLink)
    {
        return Some(refused.into_response());
    }
    // Under the rules of data dir format 1 some shipped changes move no revision, so no
    // standby could follow them one by one: wait until the region's leader adopts the
    // current rules (it does so as soon as it leads).
    let rules = node.applied.read().expect("state lock").state.shipped.rules;
    (rules < rampart_store::RULES).then(|| {
        crate::error::ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "rules_not_adopted",
            format!(
                "this region still applies the rules of data dir format 1 ({rules}) until its leader adopts rules {}: try again shortly",
                rampart_store::RULES
            ),
        )
        .into_response()
    })
}

pub async fn log(
    State(node): State<Shared>,
    connection: Option<axum::Extension<crate::auth::Connection>>,
    axum::extract::Query(query): axum::extract::Query<LogQuery>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    use futures_util::StreamExt;
    if let Some(refused) = link_refusal(&node, connection) {
        return refused;
    }
    let from = query.from_revision.max(1);
    let (missed, feed, epoch) = {
        let applied = node.applied.read().expect("state lock");
        let shipped = &applied.state.shipped;
        let epoch = shipped.epoch();
        if let Some(refused) = query
            .epoch
            .and_then(|known| follower_refused(&shipped.epochs, epoch, known, from))
        {
            return refused.into_response();
        }
        match applied.shipped_from(from) {
            Ok(missed) => (missed, node.sm.subscribe_shipped(), epoch),
            Err(compacted) => {
                return crate::error::ApiError::new(
                    axum::http::StatusCode::GONE,
                    "compacted",
                    format!(
                        "revision {from} is no longer kept here; the oldest a region link can resume from is {}: start from GET /v1/regions/snapshot",
                        compacted + 1
                    ),
                )
                .with_current(serde_json::json!({ "compact_revision": compacted }))
                .into_response();
            }
        }
    };
    let next = missed.last().map_or(from, |w| w.revision + 1);
    // Lines go out in chunks of up to LOG_CHUNK_BYTES: one wakeup and one write for every
    // write the feed holds at the time, not one each.
    let batches: Vec<Vec<_>> = missed.chunks(LOG_CHUNK_WRITES).map(<[_]>::to_vec).collect();
    let replay = futures_util::stream::iter(batches).map(move |writes| {
        let mut chunk = Vec::new();
        for write in &writes {
            push_line(&mut chunk, epoch, write);
        }
        Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(chunk))
    });
    let live = futures_util::stream::unfold((feed, next, false), move |(mut feed, mut next, done)| async move {
        if done {
            return None;
        }
        let mut chunk = Vec::new();
        loop {
            let received = if chunk.is_empty() {
                match tokio::time::timeout(LOG_KEEPALIVE, feed.recv()).await {
                    Err(_) => return Some((Ok(axum::body::Bytes::from_static(b"\n")), (feed, next, false))),
                    Ok(received) => received,
                }
            } else {
                match feed.try_recv() {
                    Err(tokio::sync::broadcast::error::TryRecvError::Empty) => break,
                    Err(_) => Err(tokio::sync::broadcast::error::RecvError::Closed),
                    Ok(write) => Ok(write),
                }
            };
            match received {
                Ok(write) if write.revision < next => continue,
                Ok(write) => {
                    next = write.revision + 1;
                    push_line(&mut chunk, epoch, &write);
                    if chunk.len() >= LOG_CHUNK_BYTES {
                        break;
                    }
                }
                // Fallen behind the feed (or a snapshot replaced the state): the stream
                // ends after what it has, and the standby resumes from its own revision.
                Err(_) if chunk.is_empty() => return None,
                Err(_) => return Some((Ok(axum::body::Bytes::from(chunk)), (feed, next, true))),
            }
        }
        Some((Ok(axum::body::Bytes::from(chunk)), (feed, next, false)))
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(replay.chain(live)),
    )
        .into_response()
}

/// Why a follower that knows epoch `known` and asks from revision `from` may not follow
/// this node's history (`epochs`, this node at `epoch`): 409 `stale_epoch` when it knows a
/// newer epoch than this node (this one is a deposed primary), 409 `diverged` when it holds
/// writes past this history's next failover after its epoch (`current.divergence_revision`:
/// it sets them aside and installs this node's state).
fn follower_refused(
    epochs: &[rampart_core::region::EpochStart],
    epoch: u64,
    known: u64,
    from: u64,
) -> Option<crate::error::ApiError> {
    use axum::http::StatusCode;
    if known > epoch {
        return Some(crate::error::ApiError::new(
            StatusCode::CONFLICT,
            "stale_epoch",
            format!(
                "this region is at region epoch {epoch} and the follower knows epoch {known}: follow the newer primary"
            ),
        ));
    }
    let at = rampart_core::region::divergence(epochs, known, from.saturating_sub(1))?;
    Some(
        crate::error::ApiError::new(
            StatusCode::CONFLICT,
            "diverged",
            format!(
                "the follower holds writes from revision {at} on that this region never had (a region failover started epoch {} there): set them aside and install this region's state",
                epochs.iter().find(|e| e.revision == at).map_or(0, |e| e.epoch)
            ),
        )
        .with_current(serde_json::json!({ "divergence_revision": at })),
    )
}

/// How long an on-demand verification may wait for the standby to reach the primary's
/// last reported revision.
const VERIFY_NOW_TIMEOUT: Duration = Duration::from_secs(10);

/// `POST /v1/regions/verify`: on a standby (its leader: the call is forwarded there), one
/// verification now, recorded as the periodic ones are; on a primary region's node, the
/// same asked of every standby region, through its region link.
pub async fn verify(
    State(node): State<Shared>,
) -> Result<Json<rampart_core::api::VerifyResponse>, crate::error::ApiError> {
    use rampart_core::api::{Verification, VerifyResponse};
    let regions = &node.config.regions;
    if let Some(primary) = following(&node) {
        let region = &node.config.region;
        let deadline = Instant::now() + VERIFY_NOW_TIMEOUT;
        let retry = Duration::from_millis(regions.health_check_interval_ms);
        let verification = match verify_within(&node, &primary, deadline, retry).await {
            Some(verified) => {
                record_verification(&node, &primary, verified.clone()).await;
                Verification {
                    region: region.clone(),
                    revision: Some(verified.revision),
                    matched: Some(verified.matched),
                    standby_checksum: Some(verified.own_checksum),
                    primary_checksum: Some(verified.primary_checksum),
                    at_ms: Some(verified.at_ms),
                    error: None,
                }
            }
            None => Verification::failed(
                region,
                format!(
                    "no comparison within {VERIFY_NOW_TIMEOUT:?}: the primary region {primary} has not answered, or this standby did not reach its last reported revision"
                ),
            ),
        };
        return Ok(Json(VerifyResponse {
            verifications: vec![verification],
        }));
    }
    // The standbys as this node sees them (a witness, configured or answering as one, has
    // nothing to verify).
    let standbys: Vec<String> = view(&node)
        .regions
        .into_iter()
        .filter(|r| !r.this_region && r.role == "standby")
        .map(|r| r.name)
        .collect();
    let asks = standbys
        .iter()
        .map(|name| ask_verify(&node, name, &regions.known[name]));
    let verifications = futures_util::future::join_all(asks).await;
    Ok(Json(VerifyResponse { verifications }))
}

/// Asks standby region `name` for a verification now, trying its endpoints in turn.
async fn ask_verify(node: &Shared, name: &str, region: &KnownRegion) -> rampart_core::api::Verification {
    let mut last_error = String::from("no endpoint");
    for endpoint in &region.endpoints {
        let url = crate::forward::url(node, &endpoint.to_string(), "/v1/regions/verify");
        let answer = node
            .region_http
            .post(url)
            .timeout(VERIFY_NOW_TIMEOUT + Duration::from_secs(5))
            .send()
            .await;
        match answer {
            Ok(answer) if answer.status().is_success() => {
                match answer.json::<rampart_core::api::VerifyResponse>().await {
                    Ok(mut response) if !response.verifications.is_empty() => {
                        return response.verifications.remove(0);
                    }
                    Ok(_) => last_error = format!("{endpoint}: an empty answer"),
                    Err(e) => last_error = format!("{endpoint}: {e}"),
                }
            }
            Ok(answer) => last_error = format!("{endpoint}: answered {}", answer.status()),
            Err(e) => last_error = format!("{endpoint}: {e}"),
        }
    }
    rampart_core::api::Verification::failed(name, last_error)
}

/// Keys per install step: about this many bytes of keys and values.
const SEED_CHUNK_BYTES: usize = 1 << 20;

/// `GET /v1/regions/snapshot`: this node's shipped state as the steps of an install
/// (`rampart_store::SeedStep`, one JSON object per line): everything but the keys, at its
/// revision; the keys in order, about [`SEED_CHUNK_BYTES`] a step; the end, with the
/// checksum. Taken from an O(1) copy of the applied state, encoded on a blocking thread as the
/// standby reads it (never the whole state encoded in memory).
pub async fn snapshot(
    State(node): State<Shared>,
    connection: Option<axum::Extension<crate::auth::Connection>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if let Some(refused) = link_refusal(&node, connection) {
        return refused;
    }
    let shipped = std::sync::Arc::new(node.applied.read().expect("state lock").state.shipped.clone());
    let (revision, epoch) = (shipped.revision, shipped.epoch());
    let (lines, receiver) = tokio::sync::mpsc::channel::<axum::body::Bytes>(4);
    // The checksum is computed beside the keys' encoding, and an empty line goes out every
    // LOG_KEEPALIVE while it is not done: a large state never leaves the stream silent.
    let summed = shipped.clone();
    let mut checksum = tokio::task::spawn_blocking(move || rampart_store::shipped_checksum(&summed));
    let keys = lines.clone();
    let keys = tokio::task::spawn_blocking(move || seed_steps(&shipped, |step| keys.blocking_send(step).is_ok()));
    tokio::spawn(async move {
        if !keys.await.unwrap_or(false) {
            return;
        }
        let checksum = loop {
            match tokio::time::timeout(LOG_KEEPALIVE, &mut checksum).await {
                Ok(Ok(checksum)) => break checksum,
                Ok(Err(_)) => return,
                Err(_) if lines.send(axum::body::Bytes::from_static(b"\n")).await.is_err() => return,
                Err(_) => {}
            }
        };
        let end = rampart_store::SeedStep::End {
            revision,
            checksum: rampart_store::checksum_text(checksum),
        };
        let mut line = Vec::new();
        push_line(&mut line, epoch, &end);
        let _ = lines.send(axum::body::Bytes::from(line)).await;
    });
    let body = futures_util::stream::unfold(receiver, |mut receiver| async move {
        let line = receiver.recv().await?;
        Some((Ok::<_, std::convert::Infallible>(line), receiver))
    });
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// Hands `send` the first steps of an install of `shipped` (all but the end), each encoded
/// as a line, until it says stop; false if it did.
fn seed_steps(shipped: &rampart_store::Shipped, mut send: impl FnMut(axum::body::Bytes) -> bool) -> bool {
    use rampart_store::SeedStep;
    let epoch = shipped.epoch();
    let line = |step: &SeedStep| {
        let mut line = Vec::new();
        push_line(&mut line, epoch, step);
        axum::body::Bytes::from(line)
    };
    let revision = shipped.revision;
    let mut rest = shipped.clone();
    rest.kv = Default::default();
    let begin = SeedStep::Begin {
        revision,
        rest: Box::new(rest),
    };
    if !send(line(&begin)) {
        return false;
    }
    let mut entries = Vec::new();
    let mut bytes = 0;
    for (key, record) in shipped.kv.iter() {
        bytes += key.len() + record.value.len() + 32;
        entries.push((key.clone(), record.clone()));
        if bytes >= SEED_CHUNK_BYTES {
            let keys = SeedStep::Keys {
                revision,
                entries: std::mem::take(&mut entries),
            };
            if !send(line(&keys)) {
                return false;
            }
            bytes = 0;
        }
    }
    entries.is_empty() || send(line(&SeedStep::Keys { revision, entries }))
}

/// Consistency verification, standby side: every `regions.verify_interval` the standby's
/// leader takes the primary region's last reported revision and checksum, and compares them
/// with its own shipped checksum at that same revision (now if it is there, else when it
/// applies it: the state machine keeps a copy of the shipped part at that revision).
pub async fn run_verify(node: Shared) {
    let regions = node.config.regions.clone();
    if regions.known.is_empty() {
        return;
    }
    let interval = Duration::from_millis(regions.verify_interval_ms);
    let retry = Duration::from_millis(regions.health_check_interval_ms);
    loop {
        tokio::time::sleep(interval).await;
        // The region this one follows now: a failover changes it.
        let Some(primary) = leader_following(&node) else {
            continue;
        };
        // Within the interval: a primary ahead of this standby's last poll is asked again.
        if let Some(verified) = verify_within(&node, &primary, Instant::now() + interval, retry).await {
            record_verification(&node, &primary, verified).await;
        }
    }
}

/// [`verify_once`] until it compares, trying again every `retry` (a primary's reported
/// revision older than this standby's is asked again at the next poll), until `deadline`.
async fn verify_within(
    node: &Shared,
    primary: &str,
    deadline: Instant,
    retry: Duration,
) -> Option<crate::soft::Verified> {
    while Instant::now() < deadline {
        if let Some(verified) = verify_once(node, primary, deadline).await {
            return Some(verified);
        }
        tokio::time::sleep(retry).await;
    }
    None
}

async fn verify_once(node: &Shared, primary: &str, deadline: Instant) -> Option<crate::soft::Verified> {
    let (revision, primary_checksum) = {
        let seen = node.regions.lock().expect("regions lock");
        let status = seen.get(primary)?.status.as_ref()?;
        (status.revision, status.checksum.clone())
    };
    let shipped = {
        let mut applied = node.applied.write().expect("state lock");
        let own = applied.state.revision();
        if own > revision {
            // The primary's figure is older than this standby: ask again.
            return None;
        }
        if own == revision {
            Some(std::sync::Arc::new(applied.state.shipped.clone()))
        } else {
            applied.captured = None;
            applied.capture_at = Some(revision);
            None
        }
    };
    let shipped = match shipped {
        Some(shipped) => shipped,
        None => loop {
            if let Some(captured) = node.applied.write().expect("state lock").captured.take() {
                break captured;
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        },
    };
    compare(shipped, primary_checksum).await
}

/// This standby's shipped state (a copy, at the primary's revision) checked against the
/// primary's `primary_checksum` there, off the async workers.
pub async fn compare(
    shipped: std::sync::Arc<rampart_store::Shipped>,
    primary_checksum: String,
) -> Option<crate::soft::Verified> {
    let revision = shipped.revision;
    let own = tokio::task::spawn_blocking(move || rampart_store::shipped_checksum(&shipped))
        .await
        .ok()?;
    let own_checksum = rampart_store::checksum_text(own);
    Some(crate::soft::Verified {
        revision,
        at_ms: now_ms(),
        matched: own_checksum == primary_checksum,
        primary_checksum,
        own_checksum,
    })
}

/// Keeps the verification; a new mismatch is an event (which alerts) and a metric.
pub async fn record_verification(node: &Shared, primary: &str, verified: crate::soft::Verified) {
    let was = node.verified.lock().expect("verified lock").replace(verified.clone());
    if verified.matched || was.is_some_and(|w| !w.matched) {
        return;
    }
    let labels = crate::metrics::RegionLabels {
        region: node.config.region.clone(),
    };
    node.metrics.region_checksum_mismatches.get_or_create(&labels).inc();
    let detail = format!(
        "at revision {}: this standby's shipped checksum {} differs from primary region {primary}'s {}: its reads are suspect",
        verified.revision, verified.own_checksum, verified.primary_checksum
    );
    tracing::error!(revision = verified.revision, "{detail}");
    let event = region_event(node, "region.checksum_mismatch", "mismatch", detail);
    crate::events::record(node, event).await;
}
