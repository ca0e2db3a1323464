//! Starts Raft elections, with pre-vote.
//!
//! Openraft's own election timer is switched off; this loop runs the follower's
//! [`ElectionTimer`] and, when it fires, asks the other voters for a pre-vote. Only when a
//! majority would vote does it tell openraft to campaign. The decisions are in
//! `rampart_core::election`; this file gathers their inputs and carries them out.

use std::time::{Duration, Instant};

use futures_util::future::join_all;
use openraft::ServerState;
use rampart_core::election::{is_majority, may_campaign, ElectionTimer};

use crate::node::Shared;
use crate::peer::{leader_contact, log_position, PeerClient};

pub async fn run(node: Shared) {
    let base = node.config.election_timeout;
    let started = Instant::now();
    let mut timer = ElectionTimer::new(base, rand::random());
    // Check often enough that the timer fires within a tenth of its base, and the crash
    // fast path within a quarter heartbeat.
    let period = (base / 10)
        .min(node.config.heartbeat_interval / 4)
        .max(Duration::from_millis(2));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let metrics = node.raft.metrics().borrow().clone();
        if metrics.state == ServerState::Leader || metrics.state == ServerState::Shutdown {
            continue;
        }
        let voters: Vec<u64> = metrics.membership_config.membership().voter_ids().collect();
        if !voters.contains(&node.id) {
            continue;
        }
        let last_log = node.raft.data_metrics().borrow().last_log.as_ref().map(log_position);
        let Some(contact) = leader_contact(&node.raft, &node.links).await else {
            return;
        };
        let now = Instant::now();
        let quiet = node.config.heartbeat_interval * 2;
        let crashed = contact.gone(now, quiet) && timer.rested(now, quiet);
        if !crashed && !timer.due(now, started, contact.last) {
            continue;
        }
        timer.attempted(now, rand::random());
        let me = node.id;
        let asks = voters.iter().filter(|id| **id != me).filter_map(|id| {
            let client = PeerClient::new(
                *id,
                node.address_of(*id)?,
                node.tls.as_ref().map(|t| t.peer_connector.clone()),
                node.links.clone(),
            );
            Some(async move { client.pre_vote(me, last_log, base / 2).await })
        });
        let granted = 1 + join_all(asks).await.into_iter().filter(|granted| *granted).count();
        let Some(contact) = leader_contact(&node.raft, &node.links).await else {
            return;
        };
        if is_majority(granted, voters.len()) && !may_campaign(now, contact) {
            tracing::info!(
                granted,
                "pre-vote won, but the leader was heard meanwhile; staying a follower"
            );
            node.metrics.pre_votes_lost.inc();
        } else if is_majority(granted, voters.len()) {
            tracing::info!(granted, voters = voters.len(), "pre-vote won; campaigning");
            node.metrics.pre_votes_won.inc();
            if node.raft.trigger().elect().await.is_err() {
                return;
            }
        } else {
            tracing::debug!(granted, voters = voters.len(), "pre-vote lost; staying a follower");
            node.metrics.pre_votes_lost.inc();
        }
    }
}
