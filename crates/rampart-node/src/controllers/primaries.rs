//! Automatic failover (leader only).
//!
//! A primary may act as primary only while its **hold** lasts (`rampart_core::failover::Hold`,
//! `Node::hold`): for an instance hosted by
//! a node, while that node is in touch with the region's majority. A node cut off for
//! three quarters of the hold runs the instance's `on_demote` by itself (`hooks.rs`), and the
//! leader never releases the role of an unreachable primary before `hold` has passed since
//! that node last answered it (or since the leader took office, if it never did). Since the
//! node's own clock starts earlier than the leader's, the old primary has let go before a
//! new one is promoted: safety rule 4, with clocks that only need to run at the same rate.
//!
//! The controller, each tick, for every active-passive service:
//! - primary confirmed down while its node restarts it (supervision, within the restart
//!   budget and `recovery.start_timeout` of the last restart): wait, once saying so in a
//!   `failover.deferred` event;
//! - primary confirmed down otherwise: if its node answers, ask it to step down (`Demote`: the node
//!   runs `on_demote`, the leader then releases the role); if not, release the role once
//!   the hold has run out; an instance no node hosts is released a hold after its verdict;
//! - no primary, but it had one: promote eligibility's first instance, and record a
//!   `failover` event with the detection, decision and promotion times; if nobody is
//!   eligible, record why, once.
//!
//! A service that never had a primary gets its first one from an operator's switchover.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rampart_core::api::Event;
use rampart_core::health::Health;
use rampart_core::service::Mode;
use rampart_store::{Op, Outcome};

use crate::events::record;
use crate::node::{now_ms, Shared};

const TICK: Duration = Duration::from_millis(100);
/// How soon a demotion whose hook failed is asked for again.
const DEMOTE_RETRY: Duration = Duration::from_secs(5);

/// The controller's memory of one episode: a primary that went down.
#[derive(Debug, Default)]
struct Episode {
    demote_asked: Option<Instant>,
    released_ms: Option<u64>,
    detected_ms: u64,
    previous: Option<String>,
    how: &'static str,
    no_candidate_reported: bool,
    deferral_reported: bool,
}

pub async fn run(node: Shared) {
    let mut tick = tokio::time::interval(TICK);
    let mut leader_since: Option<Instant> = None;
    let mut episodes: HashMap<String, Episode> = HashMap::new();
    loop {
        tick.tick().await;
        if node.known_leader() != Some(node.id) {
            leader_since = None;
            episodes.clear();
            continue;
        }
        let since = *leader_since.get_or_insert_with(Instant::now);
        let names: Vec<String> = node
            .applied
            .read()
            .expect("state lock")
            .state
            .services
            .keys()
            .cloned()
            .collect();
        for name in names {
            if node.switchovers.lock().expect("switchovers lock").contains(&name) {
                // A planned switchover moves the role; it is not a failure.
                continue;
            }
            let episode = episodes.entry(name.clone()).or_default();
            if let Err(e) = step(&node, &name, since, episode).await {
                tracing::warn!(service = %name, "failover step failed: {}", e.message);
            }
        }
    }
}

/// One look at one service.
async fn step(
    node: &Shared,
    name: &str,
    leader_since: Instant,
    episode: &mut Episode,
) -> Result<(), crate::error::ApiError> {
    let hold = node.hold();
    let (mode, primary, token, demoting, start_timeout) = {
        let applied = node.applied.read().expect("state lock");
        let Some(s) = applied.state.services.get(name) else {
            return Ok(());
        };
        let primary = s
            .primary_record()
            .map(|(p, r)| (p.to_string(), r.health, r.health_since_ms, r.instance.node));
        let start_timeout = Duration::from_millis(s.policy.recovery.start_timeout_ms);
        (s.policy.mode, primary, s.token, s.demoting, start_timeout)
    };
    if mode != Mode::ActivePassive {
        return Ok(());
    }
    match primary {
        Some((id, Health::Down, down_since_ms, hosted_by)) => {
            episode.detected_ms = down_since_ms;
            episode.previous = Some(id.clone());
            let key = (name.to_string(), id.clone());
            if node
                .soft
                .lock()
                .expect("soft state lock")
                .restarting(&key, start_timeout)
            {
                // Its node is restarting it within the budget: give it `start_timeout`.
                if !episode.deferral_reported {
                    episode.deferral_reported = true;
                    let detail = format!(
                        "service={name} primary={id} reason=restarting start_timeout_ms={}",
                        start_timeout.as_millis()
                    );
                    record(node, failover_event(name, "failover.deferred", "ok", detail)).await;
                }
                return Ok(());
            }
            let release = match hosted_by {
                None => {
                    episode.how = "hold_lapsed";
                    hold.lapsed(Duration::from_millis(now_ms().saturating_sub(down_since_ms)))
                }
                Some(host) => {
                    let last = if host == node.id {
                        Some(Instant::now())
                    } else {
                        node.links.answered_at(host)
                    };
                    let last = last.map_or(leader_since, |at| at.max(leader_since));
                    if !hold.lapsed(last.elapsed()) {
                        // Its node answers: it runs on_demote, and the hook's report releases.
                        episode.how = "demoted";
                        let due = episode.demote_asked.is_none_or(|at| at.elapsed() >= DEMOTE_RETRY);
                        if !demoting && due {
                            episode.demote_asked = Some(Instant::now());
                            node.propose(Op::Demote {
                                service: name.to_string(),
                                id: id.clone(),
                            })
                            .await?;
                        }
                        false
                    } else {
                        episode.how = "hold_lapsed";
                        true
                    }
                }
            };
            if release {
                match node
                    .propose(Op::Release {
                        service: name.to_string(),
                        id: id.clone(),
                    })
                    .await?
                {
                    Outcome::Released => episode.released_ms = Some(now_ms()),
                    Outcome::NotPrimary { .. } => {}
                    other => return Err(crate::error::unexpected(other)),
                }
            }
        }
        Some(_) => {
            // A healthy primary: nothing to do; forget any finished episode.
            *episode = Episode::default();
        }
        None if token > 0 => promote_best(node, name, episode).await?,
        None => {}
    }
    Ok(())
}

async fn promote_best(node: &Shared, name: &str, episode: &mut Episode) -> Result<(), crate::error::ApiError> {
    let report = crate::services::report(node, name)?;
    let Some(best) = report.instances.iter().find(|e| e.rank == Some(1)) else {
        if !episode.no_candidate_reported {
            episode.no_candidate_reported = true;
            let reasons = serde_json::to_string(&report.instances).unwrap_or_default();
            tracing::warn!(service = %name, "no instance can be promoted: {reasons}");
            record(
                node,
                failover_event(name, "failover.blocked", "failed: no eligible instance", reasons),
            )
            .await;
        }
        return Ok(());
    };
    let decided_ms = now_ms();
    let outcome = node
        .propose(Op::Promote {
            service: name.to_string(),
            id: best.id.clone(),
        })
        .await?;
    if let Outcome::Promoted { token } = outcome {
        let promoted_ms = now_ms();
        let detail = format!(
            "service={name} from={} to={} token={token} how={} detected_ms={} released_ms={} decided_ms={decided_ms} promoted_ms={promoted_ms} detection_to_promotion_ms={}",
            episode.previous.as_deref().unwrap_or("-"),
            best.id,
            if episode.how.is_empty() { "-" } else { episode.how },
            episode.detected_ms,
            episode.released_ms.unwrap_or(0),
            promoted_ms.saturating_sub(episode.detected_ms),
        );
        tracing::info!(service = %name, to = %best.id, token, "failover: promoted");
        if episode.detected_ms > 0 {
            node.metrics
                .failover_seconds
                .observe(promoted_ms.saturating_sub(episode.detected_ms) as f64 / 1000.0);
        }
        record(node, failover_event(name, "failover.promote", "ok", detail)).await;
        *episode = Episode::default();
    }
    Ok(())
}

fn failover_event(name: &str, action: &str, outcome: &str, detail: String) -> Event {
    Event {
        id: 0,
        at_ms: 0,
        kind: "failover".to_string(),
        action: action.to_string(),
        actor: "-".to_string(),
        source: format!("service {name}"),
        outcome: outcome.to_string(),
        detail,
    }
}
