//! The region link, standby side: the leader of a standby region follows the primary
//! region's `GET /v1/regions/log` from its own shipped revision + 1 and proposes each write
//! through its own Raft as `Op::Replicate`, so the standby keeps the primary's revisions.
//! Writes are submitted without waiting for each (up to [`IN_FLIGHT_WRITES_MAX`]): the
//! standby's group commit puts many in one entry, and apply refuses any gap among them.
//! It resumes from its applied revision after anything breaks the stream (a leader change
//! on either side, a silent link, a gap), trying the primary's endpoints in turn.
//!
//! When the primary no longer keeps the writes the standby lacks (410 `compacted`: its
//! history moved past them while the link was down), the leader installs the primary's
//! shipped state instead: it reads `GET /v1/regions/snapshot` and proposes each step as
//! `Op::Seed`; at the end the standby's shipped state is the primary's at that revision,
//! checked at once against the primary's checksum, and the log goes on from there.

use std::time::Duration;

use rampart_store::{Outcome, SeedStep, ShippedWrite};

use super::regions::LinkLine;
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
    tracing::debug!(endpoint = %addr, from, "region link: following");
    let mut response = open(node, addr, &format!("/v1/regions/log?from_revision={from}")).await?;
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
    let mut in_flight = InFlight::default();
    while let Some(line) = lines.next(&mut response).await? {
        if node.known_leader() != Some(node.id) {
            return Ok(());
        }
        if line.is_empty() {
            // A quiet primary: look at what came of the writes in flight, so a failed one
            // (this node just lost or won leadership) restarts the link now, not at the
            // primary's next write.
            if !in_flight.settle(false).await? {
                return Ok(());
            }
            continue;
        }
        let write: ShippedWrite = received(&line)?;
        let bytes = write.command.op.approx_bytes();
        let pending = node
            .submit_replicated(write.revision, write.command)
            .await
            .map_err(|e| e.message)?;
        in_flight.push(pending, bytes);
        if !in_flight.settle(false).await? {
            return Ok(());
        }
    }
    in_flight.settle(true).await?;
    Ok(())
}

/// Replicated writes most in flight at once, and their bytes: enough to fill several Raft
/// entries while the earlier ones commit (group commit on the standby).
const IN_FLIGHT_WRITES_MAX: usize = 4096;
const IN_FLIGHT_BYTES_MAX: usize = 16 << 20;

/// The link's submitted writes whose outcomes have not been looked at, oldest first.
#[derive(Default)]
struct InFlight {
    pending: std::collections::VecDeque<(crate::proposer::Pending, usize)>,
    bytes: usize,
}

impl InFlight {
    fn push(&mut self, pending: crate::proposer::Pending, bytes: usize) {
        self.bytes += bytes;
        self.pending.push_back((pending, bytes));
    }

    /// Looks at the outcomes that are in (all of them with `all`, and as many as it takes
    /// to get under the bounds): `Ok(false)` when one was a gap (the link resumes from what
    /// is applied here), `Err` on a failed write.
    async fn settle(&mut self, all: bool) -> Result<bool, String> {
        while let Some((mut pending, bytes)) = self.pending.pop_front() {
            let full = self.pending.len() >= IN_FLIGHT_WRITES_MAX || self.bytes > IN_FLIGHT_BYTES_MAX;
            let outcome = match pending.ready() {
                Some(outcome) => outcome,
                None if all || full => pending.outcome().await,
                None => {
                    self.pending.push_front((pending, bytes));
                    return Ok(true);
                }
            };
            self.bytes -= bytes;
            match outcome.map_err(|e| e.message)? {
                Outcome::Replicated { .. } => {}
                Outcome::ReplicationGap { .. } => return Ok(false),
                other => return Err(format!("unexpected outcome {other:?}")),
            }
        }
        Ok(true)
    }
}

/// Decodes one line of the link, from a primary at the region epoch this region knows.
fn received<T: serde::de::DeserializeOwned>(line: &[u8]) -> Result<T, String> {
    let line: LinkLine<T> = serde_json::from_slice(line).map_err(|e| format!("undecodable line: {e}"))?;
    let known = rampart_core::region::FIRST_EPOCH;
    if line.epoch != known {
        return Err(format!(
            "the primary region sends at region epoch {}, and this region knows epoch {known}",
            line.epoch
        ));
    }
    Ok(line.body)
}

/// Opens a stream from the primary's `addr` on the region link. It runs until it breaks;
/// silence is caught as it is read ([`Lines`]).
async fn open(node: &Shared, addr: &str, path: &str) -> Result<reqwest::Response, String> {
    node.region_http
        .get(crate::forward::url(node, addr, path))
        .timeout(Duration::from_secs(86_400))
        .send()
        .await
        .map_err(|e| e.to_string())
}

/// Installs the primary's shipped state from `addr`'s `GET /v1/regions/snapshot`, step by
/// step through this region's log, then checks it against the primary's checksum.
async fn install(node: &Shared, addr: &str) -> Result<(), String> {
    let mut response = open(node, addr, "/v1/regions/snapshot").await?;
    if !response.status().is_success() {
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        return Err(format!("snapshot answered {status}: {body}"));
    }
    let mut lines = Lines::default();
    while let Some(line) = lines.next(&mut response).await? {
        if line.is_empty() {
            continue;
        }
        let step: SeedStep = received(&line)?;
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
    let shipped = std::sync::Arc::new(node.applied.read().expect("state lock").state.shipped.clone());
    if shipped.revision != revision {
        return; // Moved on already; the regular verification will compare.
    }
    let Some(verified) = super::regions::compare(shipped, checksum).await else {
        return;
    };
    tracing::info!(revision, matched = verified.matched, "region link: installed");
    let primary = &node.config.regions.primary;
    super::regions::record_verification(node, primary, verified).await;
}

/// Lines of a newline-delimited stream; a keep-alive (an empty line) comes out empty. A
/// stream silent for [`SILENCE_MAX`] is dead.
#[derive(Default)]
struct Lines {
    buffer: Vec<u8>,
    /// Where the next line starts in `buffer`: the lines before it are dropped once per
    /// chunk read, not one by one (a chunk holds many).
    start: usize,
    /// How far `buffer` is known to hold no line end: a long line arriving in many chunks
    /// is searched once.
    searched: usize,
}

impl Lines {
    async fn next(&mut self, response: &mut reqwest::Response) -> Result<Option<Vec<u8>>, String> {
        loop {
            let from = self.searched.max(self.start);
            if let Some(at) = self.buffer[from..].iter().position(|b| *b == b'\n') {
                let end = from + at;
                let line = self.buffer[self.start..end].to_vec();
                self.start = end + 1;
                return Ok(Some(line));
            }
            self.searched = self.buffer.len();
            let chunk = tokio::time::timeout(SILENCE_MAX, response.chunk())
                .await
                .map_err(|_| format!("silent for {SILENCE_MAX:?}"))?
                .map_err(|e| e.to_string())?;
            match chunk {
                Some(chunk) => {
                    self.buffer.drain(..self.start);
                    self.searched -= self.start;
                    self.start = 0;
                    self.buffer.extend_from_slice(&chunk);
                }
                None => return Ok(None),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_from_another_region_epoch_is_refused_naming_both() {
        let write = r#"{"revision":7,"command":{"at_ms":1,"op":{"Delete":{"key":"k"}}}}"#;
        let at = |epoch: u64| format!(r#"{{"epoch":{epoch},{}"#, &write[1..]);
        let ok: ShippedWrite = received(at(1).as_bytes()).expect("the known epoch");
        assert_eq!(ok.revision, 7);
        let refused = received::<ShippedWrite>(at(2).as_bytes()).expect_err("another epoch");
        assert!(
            refused.contains("epoch 2") && refused.contains("knows epoch 1"),
            "{refused}"
        );
        assert!(
            received::<ShippedWrite>(write.as_bytes()).is_err(),
            "a line without an epoch"
        );
    }
}
