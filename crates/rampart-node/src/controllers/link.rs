//! The region link, standby side: the leader of a standby region follows the primary
//! region's `GET /v1/regions/log` from its own shipped revision + 1 and proposes each write
//! through its own Raft as `Op::Replicate`, so the standby keeps the primary's revisions.
//! It resumes from its applied revision after anything breaks the stream (a leader change
//! on either side, a silent link, a gap), trying the primary's endpoints in turn.
//!
//! Not built yet: starting from a snapshot when the primary no longer keeps the revision
//! the standby needs (410 `compacted`): the link then waits and says so.

use std::time::Duration;

use rampart_store::{Op, Outcome, ShippedWrite};

use crate::node::Shared;

/// A stream silent this long is dead (the source sends an empty line every 2 s).
const SILENCE_MAX: Duration = Duration::from_secs(6);

pub async fn run(node: Shared) {
    let regions = node.config.regions.clone();
    let Some(primary) = regions.known.get(&regions.primary).filter(|_| node.is_standby()) else {
        return;
    };
    let pause = Duration::from_millis(regions.health_check_interval_ms);
    let mut endpoint = 0;
    loop {
        if node.known_leader() != Some(node.id) {
            tokio::time::sleep(pause).await;
            continue;
        }
        let addr = primary.endpoints[endpoint % primary.endpoints.len()].to_string();
        if let Err(e) = follow(&node, &addr).await {
            tracing::warn!(primary = %regions.primary, endpoint = %addr, "region link: {e}");
            endpoint += 1;
            tokio::time::sleep(pause).await;
        }
    }
}

/// Follows one endpoint's log until the stream ends (`Ok`: resume at once) or fails.
async fn follow(node: &Shared, addr: &str) -> Result<(), String> {
    let from = node.applied.read().expect("state lock").state.revision() + 1;
    let url = crate::forward::url(node, addr, &format!("/v1/regions/log?from_revision={from}"));
    let mut response = node
        .http
        .get(url)
        // The stream runs until it breaks; silence is caught below.
        .timeout(Duration::from_secs(86_400))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        return Err(format!("answered {status}: {body}"));
    }
    let mut buffer = Vec::new();
    loop {
        let chunk = tokio::time::timeout(SILENCE_MAX, response.chunk())
            .await
            .map_err(|_| format!("silent for {SILENCE_MAX:?}"))?
            .map_err(|e| e.to_string())?;
        let Some(chunk) = chunk else { return Ok(()) };
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            if line.len() <= 1 {
                continue;
            }
            let write: ShippedWrite = serde_json::from_slice(&line).map_err(|e| format!("undecodable write: {e}"))?;
            if node.known_leader() != Some(node.id) {
                return Ok(());
            }
            let op = Op::Replicate {
                revision: write.revision,
                command: Box::new(write.command),
            };
            match node.propose(op).await.map_err(|e| e.message)? {
                Outcome::Replicated { .. } => {}
                // Resume from what is applied here.
                Outcome::ReplicationGap { .. } => return Ok(()),
                other => return Err(format!("unexpected outcome {other:?}")),
            }
        }
    }
}
