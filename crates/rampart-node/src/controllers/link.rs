//! The region link, standby side: the leader of a standby region follows the primary
//! region's `GET /v1/regions/log` from its own shipped revision + 1 and proposes each write
//! through its own Raft as `Op::Replicate`, so the standby keeps the primary's revisions.
//! It resumes from its applied revision after anything breaks the stream (a leader change
//! on either side, a silent link, a gap), trying the primary's endpoints in turn.
//!
//! When the primary no longer keeps the writes the standby lacks (410 `compacted`: its
//! history moved past them while the link was down), the leader installs the primary's
//! shipped state instead: it reads `GET /v1/regions/snapshot` and proposes each step as
//! `Op::Seed`; at the end the standby's shipped state is the primary's at that revision,
//! checked at once against the primary's checksum, and the log goes on from there.

use std::time::Duration;

use rampart_store::{Op, Outcome, SeedStep, ShippedWrite};

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
        .region_http
        .get(url)
        // The stream runs until it breaks; silence is caught below.
        .timeout(Duration::from_secs(86_400))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if response.status() == reqwest::StatusCode::GONE {
        drop(response);
        return install(node, addr).await;
    }
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        return Err(format!("answered {status}: {body}"));
    }
    let mut lines = Lines::default();
    while let Some(line) = lines.next(&mut response).await? {
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
    Ok(())
}

/// Installs the primary's shipped state from `addr`'s `GET /v1/regions/snapshot`, step by
/// step through this region's log, then checks it against the primary's checksum.
async fn install(node: &Shared, addr: &str) -> Result<(), String> {
    let url = crate::forward::url(node, addr, "/v1/regions/snapshot");
    let mut response = node
        .region_http
        .get(url)
        .timeout(Duration::from_secs(86_400))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        return Err(format!("snapshot answered {status}: {body}"));
    }
    let mut lines = Lines::default();
    while let Some(line) = lines.next(&mut response).await? {
        let step: SeedStep = serde_json::from_slice(&line).map_err(|e| format!("undecodable install step: {e}"))?;
        if node.known_leader() != Some(node.id) {
            return Ok(());
        }
        if let SeedStep::Begin { revision, .. } = &step {
            tracing::info!(revision, "region link: installing the primary region's shipped state");
        }
        match node.propose(step.to_op()).await.map_err(|e| e.message)? {
            Outcome::Seeding { .. } => {}
            Outcome::Seeded { revision, checksum } => {
                check_install(node, revision, checksum).await;
                return Ok(());
            }
            Outcome::SeedRefused { reason } => return Err(format!("install refused: {reason}")),
            other => return Err(format!("unexpected outcome {other:?}")),
        }
    }
    Err("the snapshot ended before its last step".to_string())
}

/// Compares the standby's shipped state just installed at `revision` with the primary's
/// `checksum` there, and records the result as a verification (a mismatch alerts).
async fn check_install(node: &Shared, revision: u64, checksum: String) {
    let shipped = node.applied.read().expect("state lock").state.shipped.clone();
    if shipped.revision != revision {
        return; // Moved on already; the regular verification will compare.
    }
    let Ok(own) = tokio::task::spawn_blocking(move || rampart_store::shipped_checksum(&shipped)).await else {
        return;
    };
    let own_checksum = rampart_store::checksum_text(own);
    tracing::info!(revision, matched = own_checksum == checksum, "region link: installed");
    let primary = node.config.regions.primary.clone();
    let verified = crate::soft::Verified {
        revision,
        at_ms: crate::node::now_ms(),
        matched: own_checksum == checksum,
        own_checksum,
        primary_checksum: checksum,
    };
    super::regions::record_verification(node, &primary, verified).await;
}

/// Lines of a newline-delimited stream, skipping the empty keep-alive ones; a stream
/// silent for [`SILENCE_MAX`] is dead.
#[derive(Default)]
struct Lines {
    buffer: Vec<u8>,
}

impl Lines {
    async fn next(&mut self, response: &mut reqwest::Response) -> Result<Option<Vec<u8>>, String> {
        loop {
            while let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                if line.len() > 1 {
                    return Ok(Some(line));
                }
            }
            let chunk = tokio::time::timeout(SILENCE_MAX, response.chunk())
                .await
                .map_err(|_| format!("silent for {SILENCE_MAX:?}"))?
                .map_err(|e| e.to_string())?;
            match chunk {
                Some(chunk) => self.buffer.extend_from_slice(&chunk),
                None => return Ok(None),
            }
        }
    }
}
