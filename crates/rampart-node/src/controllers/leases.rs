//! The leader-only lease-expiry controller.
//!
//! Keepalives only touch the leader's [`LeaseClock`]; this loop commits the verdict: every
//! lease past its deadline is revoked through the log, which deletes its keys and frees
//! its elections on every node. On a new term the clock restarts every deadline from now
//! (rule 8 of DESIGN.md, as etcd does).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use openraft::ServerState;
use rampart_store::Op;

use crate::node::Shared;

pub async fn run_expiry(node: Shared) {
    // The term and region epoch this node last led the leases in.
    let mut led: Option<(u64, u64)> = None;
    let mut tick = tokio::time::interval(node.config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let metrics = node.raft.metrics().borrow().clone();
        let now = Instant::now();
        // A standby region's shipped state comes from the primary region alone; a region
        // that takes over starts every deadline over, as a new leader does.
        let (primary, epoch) = node.primary_and_epoch();
        if metrics.state != ServerState::Leader || primary != node.config.region {
            if led.take().is_some() {
                node.leases.lock().expect("lease lock").restart_all(now, []);
            }
            continue;
        }
        let due = {
            let live = live_leases(&node);
            let mut clock = node.leases.lock().expect("lease lock");
            if led != Some((metrics.current_term, epoch)) {
                clock.restart_all(now, live);
                led = Some((metrics.current_term, epoch));
            } else {
                sync(&mut clock, now, live);
            }
            clock.due(now)
        };
        for id in due {
            let node = node.clone();
            tokio::spawn(async move {
                match node.propose(Op::LeaseRevoke { id }).await {
                    Ok(_) => tracing::info!(lease = id, "lease expired and revoked"),
                    Err(e) => tracing::warn!(lease = id, "lease expiry not committed yet: {}", e.message),
                }
            });
        }
    }
}

/// Leases in the applied state, with their TTLs.
pub fn live_leases(node: &Shared) -> Vec<(u64, Duration)> {
    let applied = node.applied.read().expect("state lock");
    applied
        .state
        .shipped
        .leases
        .iter()
        .map(|(id, l)| (*id, Duration::from_millis(l.ttl_ms)))
        .collect()
}

/// Adds leases granted since the last tick (their deadline starts now) and forgets revoked ones.
pub fn sync(clock: &mut rampart_core::lease::LeaseClock, now: Instant, live: Vec<(u64, Duration)>) {
    let ids: BTreeSet<u64> = live.iter().map(|(id, _)| *id).collect();
    for (id, ttl) in live {
        if clock.remaining(now, id).is_none() {
            clock.granted(now, id, ttl);
        }
    }
    for id in clock.ids() {
        if !ids.contains(&id) {
            clock.revoked(id);
        }
    }
}
