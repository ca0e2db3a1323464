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
    if regions.known.is_empty() {
        return;
    }
    let pause = Duration::from_millis(regions.health_check_interval_ms);
    let mut endpoint = 0;
    loop {
        let Some(primary) = super::regions::leader_following(&node) else {
            tokio::time::sleep(pause).await;
            continue;
        };
        let Some(known) = regions.known.get(&primary) else {
            tokio::time::sleep(pause).await;
            continue;
        };
        let addr = known.endpoints[endpoint % known.endpoints.len()].to_string();
        if let Err(e) = follow(&node, &primary, &addr).await {
            tracing::warn!(primary = %primary, endpoint = %addr, "region link: {e}");
            endpoint += 1;
            tokio::time::sleep(pause).await;
        }
    }
}

/// Follows one endpoint's log until the stream ends (`Ok`: resume at once) or fails.
async fn follow(node: &Shared, primary: &str, addr: &str) -> Result<(), String> {
    let (from, epoch) = {
        let applied = node.applied.read().expect("state lock");
        (applied.state.revision() + 1, applied.state.shipped.epoch())
    };
    tracing::debug!(endpoint = %addr, from, epoch, "region link: following");
    let path = format!("/v1/regions/log?from_revision={from}&epoch={epoch}");
    let mut response = open(node, addr, &path).await?;
    if response.status() == reqwest::StatusCode::GONE {
        drop(response);
        return install(node, primary, addr).await;
    }
    if response.status() == reqwest::StatusCode::CONFLICT {
        let body: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
        let Some(at) = body["error"]["current"]["divergence_revision"].as_u64() else {
            return Err(format!("the primary refused to be followed: {body}"));
        };
        set_aside(node, primary, epoch, at).await?;
        return install(node, primary, addr).await;
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
        let write: ShippedWrite = received(&line, epoch)?;
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

/// How often a standby's leader tells the primary what it applied (for the bounded RPO).
const ACK_INTERVAL: Duration = Duration::from_millis(20);

/// A standby's leader tells the primary region which shipped revision it applied, whenever
/// that moved (`POST /v1/regions/ack`), so a primary with `max_rpo_lag` knows how far
/// behind it is.
pub async fn run_acks(node: Shared) {
    let regions = node.config.regions.clone();
    // Only a deployment with a bound needs them (every region's nodes share `[regions]`).
    if regions.known.is_empty() || regions.max_rpo_lag.is_none() {
        return;
    }
    let mut told: Option<(String, u64)> = None;
    loop {
        tokio::time::sleep(ACK_INTERVAL).await;
        let Some(primary) = super::regions::leader_following(&node) else {
            continue;
        };
        let revision = node.applied.read().expect("state lock").state.revision();
        if told.as_ref() == Some(&(primary.clone(), revision)) {
            continue;
        }
        let Some(known) = regions.known.get(&primary) else {
            continue;
        };
        let ack = super::region_lease::Ack {
            region: node.config.region.clone(),
            revision,
        };
        let answer: Option<serde_json::Value> =
            super::region_lease::ask(&node, known, "/v1/regions/ack", &ack, Duration::from_millis(500)).await;
        if answer.is_some() {
            told = Some((primary, revision));
        }
    }
}

/// Where a region's divergence files go, in a node's data dir.
pub const DIVERGENCE_DIR: &str = "divergence";

/// This region holds shipped writes from revision `at` on that `primary` never had: it was
/// the primary at `epoch` and had not shipped them when another region took over (or it
/// took them from such a primary). Before the install replaces them they go to a
/// divergence file in this node's data dir, one JSON object per line (`revision`,
/// `time_ms`, `operation`, `key`, `value`, and `command` for what is not a key write), and a
/// `region.divergence` event says how many, where, and how many were no longer kept here.
async fn set_aside(node: &Shared, primary: &str, epoch: u64, at: u64) -> Result<(), String> {
    // Each write as applied while this node still keeps it; before that, each key those
    // writes changed with its last value, from the state itself (its record's revision is
    // past the divergence point): nothing it holds is dropped, though earlier values of a
    // key written twice, and deletions, are only in the writes still kept.
    let (kept, changed, revision) = {
        let applied = node.applied.read().expect("state lock");
        let revision = applied.state.revision();
        // Past what this node keeps from `at`: from the oldest write it still keeps.
        let kept = applied
            .shipped_from(at)
            .or_else(|compacted| applied.shipped_from(compacted + 1))
            .unwrap_or_default();
        let oldest_kept = kept.first().map_or(revision + 1, |w| w.revision);
        let changed: Vec<serde_json::Value> = if oldest_kept > at {
            let mut changed: Vec<(u64, serde_json::Value)> = applied
                .state
                .shipped
                .kv
                .iter()
                .filter(|(_, record)| record.revision >= at && record.revision < oldest_kept)
                .map(|(key, record)| {
                    let line = serde_json::json!({
                        "revision": record.revision,
                        "time_ms": null,
                        "operation": "put",
                        "key": key,
                        "value": &*record.value,
                        "last_value": true,
                    });
                    (record.revision, line)
                })
                .collect();
            changed.sort_by_key(|(revision, _)| *revision);
            changed.into_iter().map(|(_, line)| line).collect()
        } else {
            Vec::new()
        };
        (kept, changed, revision)
    };
    let count = revision.saturating_sub(at) + 1;
    let missing = count.saturating_sub(kept.len() as u64);
    let mut text = Vec::new();
    for line in &changed {
        serde_json::to_writer(&mut text, line).expect("a line encodes");
        text.push(b'\n');
    }
    for write in &kept {
        serde_json::to_writer(&mut text, &divergent_line(write)).expect("a line encodes");
        text.push(b'\n');
    }
    let dir = node.config.data_dir.join(DIVERGENCE_DIR);
    let path = dir.join(format!("epoch-{epoch}-from-{at}-to-{revision}.jsonl"));
    if path.exists() {
        return Ok(()); // Set aside by an earlier try: the install goes on.
    }
    let written = {
        let path = path.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            use std::io::Write;
            std::fs::create_dir_all(&dir)?;
            let mut file = std::fs::File::create(&path)?;
            file.write_all(&text)?;
            file.sync_all()?;
            std::fs::File::open(&dir)?.sync_all()
        })
        .await
        .map_err(|e| e.to_string())?
    };
    written.map_err(|e| format!("cannot write the divergence file {}: {e}", path.display()))?;
    let detail = format!(
        "{count} shipped writes (revisions {at} to {revision}, epoch {epoch}) were never received by the primary region {primary}: saved to {} on node {}{}; this region now resyncs from {primary}",
        path.display(),
        node.id,
        if missing > 0 {
            format!(
                " ({} kept one by one; the {missing} before them no longer are: the {} keys they wrote are saved with their last value, deletions among them are counted, not saved)",
                kept.len(),
                changed.len()
            )
        } else {
            String::new()
        }
    );
    tracing::warn!(primary, at, revision, "region.divergence: {detail}");
    let event = rampart_core::api::Event {
        id: 0,
        at_ms: 0,
        kind: "region".into(),
        action: "region.divergence".into(),
        actor: format!("node {}", node.id),
        source: node.config.region.clone(),
        outcome: "set_aside".into(),
        detail,
    };
    crate::events::record(node, event).await;
    Ok(())
}

/// The divergence files in this node's data dir.
pub fn divergence_files(node: &Shared) -> Vec<rampart_core::api::DivergenceFile> {
    let dir = node.config.data_dir.join(DIVERGENCE_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<rampart_core::api::DivergenceFile> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let numbers: Vec<u64> = {
                let parts: Vec<&str> = name.trim_end_matches(".jsonl").split('-').collect();
                let [_, epoch, _, from, _, to] = parts.as_slice() else {
                    return None;
                };
                vec![epoch.parse().ok()?, from.parse().ok()?, to.parse().ok()?]
            };
            let text = std::fs::read_to_string(e.path()).ok()?;
            Some(rampart_core::api::DivergenceFile {
                name,
                node_id: node.id,
                epoch: numbers[0],
                from_revision: numbers[1],
                to_revision: numbers[2],
                writes: text.lines().count() as u64,
            })
        })
        .collect();
    files.sort_by_key(|f| (f.epoch, f.from_revision));
    files
}

/// `GET /v1/regions/divergence` (operator: the writes are user data): the divergence files
/// on this node and the region's `region.divergence` events, which name the node of each.
pub async fn divergence(
    axum::extract::State(node): axum::extract::State<Shared>,
) -> axum::Json<rampart_core::api::DivergenceResponse> {
    let events = {
        let applied = node.applied.read().expect("state lock");
        applied
            .state
            .local
            .events
            .iter()
            .filter(|e| e.action == "region.divergence")
            .cloned()
            .collect()
    };
    axum::Json(rampart_core::api::DivergenceResponse {
        files: divergence_files(&node),
        events,
    })
}

/// `GET /v1/regions/divergence/{name}` (operator): one divergence file of this node, its
/// lines as `writes`, to replay what an operator chooses.
pub async fn divergence_export(
    axum::extract::State(node): axum::extract::State<Shared>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> Result<axum::Json<serde_json::Value>, crate::error::ApiError> {
    let known = divergence_files(&node).into_iter().any(|f| f.name == name);
    if !known {
        return Err(crate::error::ApiError::not_found(
            "divergence_not_found",
            format!(
                "no divergence file {name:?} on node {}: GET /v1/regions/divergence lists this node's files and, in its events, the node that saved each",
                node.id
            ),
        ));
    }
    let path = node.config.data_dir.join(DIVERGENCE_DIR).join(&name);
    let text = tokio::fs::read_to_string(&path)
        .await
        .map_err(|e| crate::error::ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "io", e.to_string()))?;
    let writes: Vec<serde_json::Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    Ok(axum::Json(
        serde_json::json!({ "name": name, "node_id": node.id, "writes": writes }),
    ))
}

/// One line of a divergence file.
fn divergent_line(write: &ShippedWrite) -> serde_json::Value {
    use rampart_store::Op;
    let (operation, key, value) = match &write.command.op {
        Op::Put { key, value, .. } => ("put", Some(key.as_str()), Some(value.as_str())),
        Op::Delete { key } => ("delete", Some(key.as_str()), None),
        _ => ("other", None, None),
    };
    let mut line = serde_json::json!({
        "revision": write.revision,
        "time_ms": write.command.at_ms,
        "operation": operation,
        "key": key,
        "value": value,
    });
    if operation == "other" {
        line["command"] = serde_json::to_value(&write.command.op).expect("a command encodes");
    }
    line
}

/// Decodes one line of the link, from a primary at the region epoch this region knows or a
/// newer one (a region promoted since: the write that says so is in its stream); a line
/// from an older epoch is a deposed primary's, and refused.
fn received<T: serde::de::DeserializeOwned>(line: &[u8], known: u64) -> Result<T, String> {
    let line: LinkLine<T> = serde_json::from_slice(line).map_err(|e| format!("undecodable line: {e}"))?;
    if line.epoch < known {
        return Err(format!(
            "the region sends at region epoch {}, and this region knows epoch {known}: it is no longer the primary",
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
async fn install(node: &Shared, primary: &str, addr: &str) -> Result<(), String> {
    let epoch = node.applied.read().expect("state lock").state.shipped.epoch();
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
        let step: SeedStep = received(&line, epoch)?;
        if node.known_leader() != Some(node.id) {
            return Ok(());
        }
        if let SeedStep::Begin { revision, .. } = &step {
            tracing::info!(revision, "region link: installing the primary region's shipped state");
        }
        match node.propose(step.to_op()).await.map_err(|e| e.message)? {
            Outcome::Seeding { .. } => {}
            Outcome::Seeded { revision, checksum } => {
                check_install(node, primary, revision, checksum).await;
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
async fn check_install(node: &Shared, primary: &str, revision: u64, checksum: String) {
    let shipped = std::sync::Arc::new(node.applied.read().expect("state lock").state.shipped.clone());
    if shipped.revision != revision {
        return; // Moved on already; the regular verification will compare.
    }
    let Some(verified) = super::regions::compare(shipped, checksum).await else {
        return;
    };
    tracing::info!(revision, matched = verified.matched, "region link: installed");
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
    fn a_line_from_an_older_region_epoch_is_refused_naming_both() {
        let write = r#"{"revision":7,"command":{"at_ms":1,"op":{"Delete":{"key":"k"}}}}"#;
        let at = |epoch: u64| format!(r#"{{"epoch":{epoch},{}"#, &write[1..]);
        let ok: ShippedWrite = received(at(2).as_bytes(), 2).expect("the known epoch");
        assert_eq!(ok.revision, 7);
        received::<ShippedWrite>(at(3).as_bytes(), 2).expect("a newer primary's");
        let refused = received::<ShippedWrite>(at(1).as_bytes(), 2).expect_err("a deposed primary's");
        assert!(
            refused.contains("epoch 1") && refused.contains("knows epoch 2"),
            "{refused}"
        );
        assert!(
            received::<ShippedWrite>(write.as_bytes(), 1).is_err(),
            "a line without an epoch"
        );
    }
}
