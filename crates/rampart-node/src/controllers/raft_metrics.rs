//! Follows the Raft engine's own metrics into the node's gauges (term, leadership, snapshot
//! and purge points) and counts and logs every change of leader.

use openraft::ServerState;

use crate::node::Shared;

/// Mirrors openraft's metrics into ours and counts leader changes.
pub async fn run(node: Shared) {
    let mut rx = node.raft.metrics();
    let mut last_leader = None;
    loop {
        let m = rx.borrow_and_update().clone();
        node.metrics.term.set(m.current_term as i64);
        node.metrics.is_leader.set(i64::from(m.state == ServerState::Leader));
        node.metrics
            .snapshot_index
            .set(m.snapshot.map_or(0, |l| l.index) as i64);
        node.metrics.purged_index.set(m.purged.map_or(0, |l| l.index) as i64);
        if m.current_leader.is_some() && m.current_leader != last_leader {
            if last_leader.is_some() {
                node.metrics.leader_changes.inc();
            }
            tracing::info!(leader = ?m.current_leader, term = m.current_term, "leader known");
            last_leader = m.current_leader;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}
