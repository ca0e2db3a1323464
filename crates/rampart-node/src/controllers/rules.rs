//! The leader's adoption of this build's apply rules.
//!
//! A region whose data dirs were migrated from format 1 applies rules 1 (see
//! `rampart_store::RULES`) until its leader commits `AdoptRules`: from that entry of the
//! log on, every node counts revisions under the current rules. Every node runs the loop;
//! it ends once the applied state has the current rules, at once in a new region.

use rampart_store::{Op, RULES};

use crate::node::Shared;

pub async fn run(node: Shared) {
    let mut tick = tokio::time::interval(node.config.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let rules = node.applied.read().expect("state lock").state.shipped.rules;
        if rules >= RULES {
            return;
        }
        if node.known_leader() != Some(node.id) {
            continue;
        }
        match node.propose(Op::AdoptRules { rules: RULES }).await {
            Ok(_) => tracing::info!(from = rules, to = RULES, "the region applies the current rules"),
            Err(e) => tracing::warn!("adopting apply rules {RULES} not committed yet: {}", e.message),
        }
    }
}
