//! Automatic region failover, on a standby region's leader (the decisions are
//! `core::region::takeover`'s and `core::region::lease`'s).
//!
//! Every `health_check_interval`: when the primary region has been silent for the
//! failover's silence (`region_timeout`, longer after recent failovers) and no reachable
//! standby is further ahead, this region asks every region to promise it the next epoch
//! (`POST /v1/regions/vote`, its own through its own log). With a majority's promises it
//! waits until the old lease has run out everywhere it may have been granted, commits the
//! new epoch (`Op::RegionEpoch`: from that write on it is the primary), renews its own
//! lease at once, and records the failover as an event with its cause, timings and the
//! data it may have lost (the RPO as known plus what cannot be). A leader that dies midway
//! leaves durable promises behind: the next leader asks again and gets them again.

use std::time::{Duration, Instant};

use rampart_core::api::Event;
use rampart_core::region::lease::{forced_needs, majority, VoteAnswer, VoteKind, VoteRequest};
use rampart_core::region::takeover::{required_silence_ms, Campaign, Rpo, Step};
use rampart_store::{Op, Outcome};

use super::region_lease::{ask, grant, recent_failovers, vote_facts};
use crate::node::Shared;

/// How long one campaign may gather promises before it gives up (and starts over at the
/// next check if still needed).
const CAMPAIGN_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn run(node: Shared) {
    let regions = node.config.regions.clone();
    if regions.known.is_empty() || !regions.auto_failover {
        return;
    }
    let interval = Duration::from_millis(regions.health_check_interval_ms);
    loop {
        tokio::time::sleep(interval).await;
        let Some(cause) = primary_lost(&node) else { continue };
        // Only the standby the voters would choose: another further ahead takes over.
        let revision = node.applied.read().expect("state lock").state.revision();
        if let Some(better) = better_standby(&node, &cause.primary, cause.epoch, revision) {
            tracing::debug!(better, "region failover: another standby is further ahead");
            continue;
        }
        if let Err(e) = take_over(&node, &cause, VoteKind::Lost).await {
            tracing::warn!("region failover: {e}");
        }
    }
}

/// A reachable standby further ahead than this region (at `revision`), as this node sees.
fn better_standby(node: &Shared, primary: &str, epoch: u64, revision: u64) -> Option<String> {
    let own = node.config.region.clone();
    let request = VoteRequest {
        epoch: epoch + 1,
        candidate: own.clone(),
        revision,
        kind: VoteKind::Lost,
    };
    let seen = node.regions.lock().expect("regions lock").clone();
    vote_facts(
        &node.config.regions,
        &seen,
        Some(primary),
        Some(&(own, revision)),
        &request,
        0,
    )
    .better
}

/// The primary region as a failover's cause, if this node leads a standby region that has
/// not heard from it for the failover's silence (since it last answered, or since this node
/// started asking).
fn primary_lost(node: &Shared) -> Option<Cause> {
    if node.known_leader() != Some(node.id) {
        return None;
    }
    let (primary, epoch) = node.primary_and_epoch();
    if primary == node.config.region {
        return None;
    }
    let regions = &node.config.regions;
    let silence = Duration::from_millis(required_silence_ms(regions.region_timeout_ms, recent_failovers(node)));
    // A newer epoch elsewhere: this region has not caught up with a failover yet.
    if super::regions::newest_primary(node).1 > epoch {
        return None;
    }
    let now = Instant::now();
    let contact = node.regions.lock().expect("regions lock").get(&primary)?.contact;
    if contact.reachable(now, silence) {
        return None;
    }
    let since = contact.last_answer().unwrap_or(now - silence);
    Some(Cause {
        description: format!(
            "{primary} did not answer for {} ms",
            now.duration_since(since).as_millis()
        ),
        primary,
        epoch,
        since,
    })
}

/// Why a region takes over: the primary it replaces at its epoch, since when (the failure
/// was last heard of, or the operator asked), and in words.
pub struct Cause {
    pub primary: String,
    pub epoch: u64,
    pub since: Instant,
    pub description: String,
}

/// A region failover done: the new epoch, its timings and what it may have lost.
#[derive(Debug, Clone)]
pub struct TakenOver {
    pub epoch: u64,
    pub rpo: Rpo,
    pub detection: Duration,
    pub decision: Duration,
    pub promotion: Duration,
}

/// One campaign for the epoch after `cause.epoch`, then the promotion.
pub async fn take_over(node: &Shared, cause: &Cause, kind: VoteKind) -> Result<TakenOver, String> {
    let regions = &node.config.regions;
    let own = node.config.region.clone();
    let revision = node.applied.read().expect("state lock").state.revision();
    let request = VoteRequest {
        epoch: cause.epoch + 1,
        candidate: own.clone(),
        revision,
        kind,
    };
    let started = Instant::now();
    let needed = match request.kind {
        VoteKind::Forced => forced_needs(regions.count(), replaced_quorum(node, cause.epoch)),
        _ => majority(regions.count()),
    };
    let mut campaign = Campaign::new(
        request.epoch,
        needed,
        node.mono_ms(),
        CAMPAIGN_TIMEOUT.as_millis() as u64,
    );
    let interval = Duration::from_millis(regions.health_check_interval_ms);
    let mut decided: Option<Instant> = None;
    loop {
        match campaign.step(node.mono_ms(), revision) {
            Step::Gathering { .. } => ask_votes(node, &request, &mut campaign, interval).await,
            Step::WaitingOutLease { until_ms } => {
                decided.get_or_insert_with(Instant::now);
                let wait = until_ms.saturating_sub(node.mono_ms());
                tracing::info!(
                    epoch = request.epoch,
                    wait_ms = wait,
                    "region failover: promised; waiting out the old lease"
                );
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            Step::Promote { rpo } => {
                let decided = *decided.get_or_insert_with(Instant::now);
                let forced = request.kind == VoteKind::Forced;
                return promote(node, cause, request.epoch, forced, rpo, started, decided).await;
            }
            Step::Superseded { promise } => {
                return Err(format!(
                    "epoch {} is promised to {}: not taking over",
                    promise.epoch, promise.region
                ))
            }
            Step::GaveUp { refusals } => {
                let why: Vec<String> = refusals.iter().map(|(r, why)| format!("{r}: {why}")).collect();
                return Err(format!(
                    "no majority for epoch {} within {CAMPAIGN_TIMEOUT:?} ({})",
                    request.epoch,
                    why.join("; ")
                ));
            }
        }
    }
}

/// The lease quorum of epoch `epoch` (the one a failover replaces), as far as this region
/// knows how it was won: from its shipped history (the first epoch: a majority), else the
/// worst (a forced win's blocking set), so a forced failover never needs too few promises.
fn replaced_quorum(node: &Shared, epoch: u64) -> usize {
    let count = node.config.regions.count();
    let applied = node.applied.read().expect("state lock");
    match applied.state.shipped.epochs.iter().find(|e| e.epoch == epoch) {
        Some(start) => start.lease_quorum(count),
        None if epoch == rampart_core::region::FIRST_EPOCH => majority(count),
        None => rampart_core::region::lease::blocking(count),
    }
}

/// Asks every region that has not promised yet, at once (this one through its own
/// grantor), and hands the answers to the campaign.
async fn ask_votes(node: &Shared, request: &VoteRequest, campaign: &mut Campaign, timeout: Duration) {
    let regions = &node.config.regions;
    let own = &node.config.region;
    let mut asks = Vec::new();
    for (name, region) in regions.known.iter().filter(|(n, _)| !campaign.has_promised(n)) {
        asks.push(async move {
            let answer = ask::<_, VoteAnswer>(node, region, "/v1/regions/vote", request, timeout).await;
            (name.clone(), answer)
        });
    }
    let mine = async {
        if campaign.has_promised(own) {
            return None;
        }
        let revision = request.revision;
        let seen = node.regions.lock().expect("regions lock").clone();
        let recent = recent_failovers(node);
        let answer = grant(node, |grantor, now| {
            let holder = grantor.promise().map(|p| p.region.clone());
            let own = (own.clone(), revision);
            let facts = vote_facts(regions, &seen, holder.as_deref(), Some(&own), request, recent);
            grantor.vote(now, request, facts.as_facts())
        })
        .await;
        Some(answer)
    };
    let (others, mine) = tokio::join!(futures_util::future::join_all(asks), mine);
    let now = node.mono_ms();
    if let Some(answer) = mine {
        match answer {
            Ok(answer) => campaign.answered(now, own, &answer),
            Err(e) => tracing::warn!("region failover: this region's own vote: {}", e.message),
        }
    }
    for (region, answer) in others {
        if let Some(answer) = answer {
            campaign.answered(now, &region, &answer);
        }
    }
    if matches!(campaign.step(now, request.revision), Step::Gathering { .. }) {
        tokio::time::sleep(timeout).await;
    }
}

/// Commits epoch `epoch` with this region as the primary, takes the lease at once, and
/// records the failover.
async fn promote(
    node: &Shared,
    cause: &Cause,
    epoch: u64,
    forced: bool,
    rpo: Rpo,
    started: Instant,
    decided: Instant,
) -> Result<TakenOver, String> {
    let own = &node.config.region;
    let outcome = node
        .propose(Op::RegionEpoch {
            epoch,
            region: own.clone(),
            forced,
        })
        .await
        .map_err(|e| e.message)?;
    let Outcome::EpochStarted { started: true, .. } = outcome else {
        return Err(format!("epoch {epoch} not started: {outcome:?}"));
    };
    let promoted = Instant::now();
    super::region_lease::renew_round(node).await;
    let revision = node.applied.read().expect("state lock").state.revision();
    let taken = TakenOver {
        epoch,
        rpo,
        detection: started.duration_since(cause.since),
        decision: decided.duration_since(started),
        promotion: promoted.duration_since(decided),
    };
    let detail = format!(
        "{own} is the primary region at epoch {epoch} (was {} at epoch {}). Cause: {}. \
         Detection {} ms, decision {} ms, promotion {} ms. RPO: {}",
        cause.primary,
        cause.epoch,
        cause.description,
        taken.detection.as_millis(),
        taken.decision.as_millis(),
        taken.promotion.as_millis(),
        describe_rpo(&rpo, revision.saturating_sub(1)),
    );
    let detail = match node.config.regions.max_rpo_lag {
        Some(bound) => format!("{detail}; the bound regions.max_rpo_lag ({bound}) held: no write was acknowledged while every standby was further behind"),
        None => detail,
    };
    tracing::warn!(epoch, "region.failover: {detail}");
    let event = Event {
        id: 0,
        at_ms: 0,
        kind: "region".into(),
        action: "region.failover".into(),
        actor: format!("node {}", node.id),
        source: own.clone(),
        outcome: "promoted".into(),
        detail,
    };
    crate::events::record(node, event).await;
    Ok(taken)
}

/// The RPO as known plus what cannot be, for a region that had revision `had`.
pub fn describe_rpo(rpo: &Rpo, had: u64) -> String {
    match rpo.reported_revision {
        Some(reported) => format!(
            "at least {} revisions (the old primary last reported revision {reported}; this region had {had}), and any committed in the last {} ms before contact was lost",
            rpo.revisions, rpo.window_ms
        ),
        None => format!(
            "unknown: no region heard the old primary's last revision (this region had {had}); any committed in its last {} ms are lost",
            rpo.window_ms
        ),
    }
}
