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
//! What to do is decided by `rampart_core::failover::episode::Episode` (the story of one
//! failover is told there); this controller, each tick and for every service, gathers the
//! facts (the applied service, how long ago the primary's node last answered, whether its
//! node is restarting it, eligibility's first instance) and carries out the actions: it
//! commits `Demote`, `Release` and `Promote`, and records the `failover.*` events.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rampart_core::api::Event;
use rampart_core::failover::episode::{Action, Episode, Facts, Host, Primary};
use rampart_core::health::Health;
use rampart_core::service::Mode;
use rampart_store::{Op, Outcome};

use crate::events::record;
use crate::node::{now_ms, Shared};

const TICK: Duration = Duration::from_millis(100);

pub async fn run(node: Shared) {
    let mut tick = tokio::time::interval(TICK);
    let mut leader_since: Option<Instant> = None;
    let mut episodes: HashMap<String, Episode> = HashMap::new();
    loop {
        tick.tick().await;
        // A standby region's shipped state comes from the primary region alone; a region
        // that takes over starts its episodes afresh.
        if node.known_leader() != Some(node.id) || node.is_standby() {
            leader_since = None;
            episodes.clear();
            continue;
        }
        // A primary region whose lease may end promotes nobody: its nodes would fence the
        // new primary at once (and another region may be taking over).
        if node.region_fenced() {
            continue;
        }
        let since = *leader_since.get_or_insert_with(Instant::now);
        let names: Vec<String> = node
            .applied
            .read()
            .expect("state lock")
            .state
            .shipped
            .services
            .keys()
            .cloned()
            .collect();
        episodes.retain(|name, _| names.contains(name));
        for name in names {
            let Some(facts) = facts(&node, &name, since) else {
                continue;
            };
            let episode = episodes.entry(name.clone()).or_default();
            let actions = episode.step(Instant::now(), now_ms(), node.hold(), &facts);
            for action in actions {
                if let Err(e) = carry_out(&node, &name, episode, action).await {
                    tracing::warn!(service = %name, "failover step failed: {}", e.message);
                }
            }
        }
    }
}

/// What the leader knows of one service now; `None` once it is gone.
fn facts(node: &Shared, name: &str, leader_since: Instant) -> Option<Facts> {
    let primary_region = node.primary_region();
    let (mut facts, start_timeout) = {
        let applied = node.applied.read().expect("state lock");
        let s = applied.state.shipped.services.get(name)?;
        let primary = s.primary_record().map(|(id, r)| {
            // A primary left in a standby region by a region failover: its own region's
            // nodes demote it as they follow; here it is down and released at once, and
            // the best instance of this region is promoted.
            if node
                .config
                .regions
                .in_standby_region(&primary_region, &node.config.region, &r.instance.region)
            {
                return Primary {
                    id: id.to_string(),
                    health: Health::Down,
                    health_since_ms: 0,
                    host: Host::External,
                    restarting: false,
                };
            }
            let host = match r.instance.node {
                None => Host::External,
                Some(host) => {
                    let answered = if host == node.id {
                        Some(Instant::now())
                    } else {
                        node.links.answered_at(host)
                    };
                    // Never before this leader took office: it cannot know of earlier answers.
                    let answered = answered.map_or(leader_since, |at| at.max(leader_since));
                    Host::Node {
                        since_answer: answered.elapsed(),
                    }
                }
            };
            let verdict = applied.state.local.verdict(name, id);
            Primary {
                id: id.to_string(),
                health: verdict.health,
                health_since_ms: verdict.health_since_ms,
                host,
                restarting: false,
            }
        });
        let facts = Facts {
            active_passive: s.policy.mode == Mode::ActivePassive,
            switchover_running: false,
            primary,
            demoting: s.demoting,
            // A postgres service's first primary is the instance its nodes initialized.
            had_primary: s.token > 0 || s.kind.postgres().is_some(),
            best: None,
        };
        (facts, Duration::from_millis(s.policy.recovery.start_timeout_ms))
    };
    facts.switchover_running = node.switchovers.lock().expect("switchovers lock").contains(name);
    // Only a primary confirmed down can be waiting for its restart (the episode asks no more).
    if let Some(primary) = facts.primary.as_mut().filter(|p| p.health == Health::Down) {
        let key = (name.to_string(), primary.id.clone());
        primary.restarting = node
            .soft
            .lock()
            .expect("soft state lock")
            .restarting(&key, start_timeout);
    }
    if facts.active_passive && facts.primary.is_none() && facts.had_primary {
        // Only then is a candidate needed: the report takes the soft state's lags.
        facts.best = crate::services::report(node, name)
            .ok()?
            .instances
            .into_iter()
            .find(|e| e.rank == Some(1))
            .map(|e| e.id);
    }
    Some(facts)
}

async fn carry_out(
    node: &Shared,
    name: &str,
    episode: &mut Episode,
    action: Action,
) -> Result<(), crate::error::ApiError> {
    match action {
        Action::Defer { primary } => {
            let start_timeout_ms = node
                .applied
                .read()
                .expect("state lock")
                .state
                .shipped
                .services
                .get(name)
                .map_or(0, |s| s.policy.recovery.start_timeout_ms);
            let detail =
                format!("service={name} primary={primary} reason=restarting start_timeout_ms={start_timeout_ms}");
            record(node, failover_event(name, "failover.deferred", "ok", detail)).await;
        }
        Action::AskDemote { primary } => {
            node.propose(Op::Demote {
                service: name.to_string(),
                id: primary,
            })
            .await?;
        }
        Action::Release { primary } => {
            let op = Op::Release {
                service: name.to_string(),
                id: primary,
            };
            match node.propose(op).await? {
                Outcome::Released => episode.released(now_ms()),
                Outcome::NotPrimary { .. } => {}
                other => return Err(crate::error::unexpected(other)),
            }
        }
        Action::Promote { instance } => {
            let op = Op::Promote {
                service: name.to_string(),
                id: instance.clone(),
            };
            if let Outcome::Promoted { token } = node.propose(op).await? {
                let failover = episode.promoted(&instance, now_ms());
                let detail = format!(
                    "service={name} from={} to={instance} token={token} how={} detected_ms={} released_ms={} decided_ms={} promoted_ms={} detection_to_promotion_ms={}",
                    failover.previous.as_deref().unwrap_or("-"),
                    failover.how.label(),
                    failover.detected_ms,
                    failover.released_ms,
                    failover.decided_ms,
                    failover.promoted_ms,
                    failover.promoted_ms.saturating_sub(failover.detected_ms),
                );
                // A postgres service: the WAL the new primary was known to lack, and how long
                // the old one had not been seen (the window it may have written more in).
                let rpo = failover.previous.as_deref().and_then(|previous| {
                    node.soft
                        .lock()
                        .expect("soft state lock")
                        .wal_rpo(name, previous, &instance)
                });
                let detail = match rpo {
                    Some(rpo) => format!(
                        "{detail} rpo_bytes={} primary_lsn={} promoted_lsn={} primary_seen_ms={} rpo_window_ms={}",
                        rpo.bytes,
                        rpo.primary,
                        rpo.promoted,
                        rpo.seen_ms,
                        failover.promoted_ms.saturating_sub(rpo.seen_ms)
                    ),
                    None => detail,
                };
                tracing::info!(service = %name, to = %instance, token, "failover: promoted");
                if let Some(ms) = failover.duration_ms() {
                    node.metrics.failover_seconds.observe(ms as f64 / 1000.0);
                }
                record(node, failover_event(name, "failover.promote", "ok", detail)).await;
            }
        }
        Action::Blocked => {
            let report = crate::services::report(node, name)?;
            let reasons = serde_json::to_string(&report.instances).unwrap_or_default();
            tracing::warn!(service = %name, "no instance can be promoted: {reasons}");
            record(
                node,
                failover_event(name, "failover.blocked", "failed: no eligible instance", reasons),
            )
            .await;
        }
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
