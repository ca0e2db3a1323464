//! The node's part in backups: `POST /v1/backups` takes one on the leader (the API forwards
//! it there), `GET /v1/backups` lists the destination, `POST /v1/backups/verify` restores
//! one into a temporary directory and checks it. The leader also runs `schedule` and
//! `verify_schedule` (cron, UTC), applies retention after each verification, and raises
//! a `backup.stale` event when no backup succeeded within twice the schedule's period.
//!
//! A backup is a copy of the applied state, taken under the state lock as a Raft snapshot
//! takes it, then encoded as it streams to the store (never whole in memory). Every run is
//! an event (`kind = backup`) and shows in the `rampart_backup_*` metrics; failures raise
//! alerts.

use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use chrono::{DateTime, Utc};
use croner::Cron;
use openraft::ServerState;
use rampart_core::api::Event;
use rampart_core::backup::{Backup, BackupsResponse, Kept, Manifest, ServicePart, VerifyRequest};
use rampart_core::postgres::Postgres;
use rampart_core::service::ServiceBackup;

use crate::error::ApiError;
use crate::node::{now_ms, Shared};
use crate::vault::{Archived, BackupError, Backups};

/// The right to run a backup or a verification: one at a time per node.
fn one_at_a_time(backups: &Backups) -> Result<tokio::sync::MutexGuard<'_, ()>, ApiError> {
    backups.try_run().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "backup_running",
            "a backup or verification is already running on this node",
        )
    })
}

/// Checks the cron expressions of `[backup]`; the error names the field.
pub fn check_schedules(backup: &Backup) -> Result<(), String> {
    for (field, text) in [
        ("schedule", &backup.schedule),
        ("verify_schedule", &backup.verify_schedule),
    ] {
        if let Some(text) = text {
            parse_cron(text).map_err(|e| format!("invalid backup.{field} {text:?}: {e}"))?;
        }
    }
    Ok(())
}

fn parse_cron(text: &str) -> Result<Cron, String> {
    Cron::new(text).with_seconds_optional().parse().map_err(|e| {
        format!("{e}; expected cron fields minute hour day month weekday, in UTC (e.g. \"0 */6 * * *\"), optionally with seconds first")
    })
}

fn configured(node: &Shared) -> Result<&Backups, ApiError> {
    node.backups.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "backup_not_configured",
            "this node has no [backup] section in its config: no destination to write to",
        )
    })
}

fn api_error(e: BackupError) -> ApiError {
    match e {
        BackupError::NotFound(_) | BackupError::Empty => ApiError::not_found("backup_not_found", e.to_string()),
        BackupError::Corrupt { .. }
        | BackupError::Checksum { .. }
        | BackupError::Unsealable { .. }
        | BackupError::Invalid { .. }
        | BackupError::WrongKey { .. }
        | BackupError::KeyNeeded { .. } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "backup_invalid", e.to_string())
        }
        _ => ApiError::new(StatusCode::BAD_GATEWAY, "backup_failed", e.to_string()),
    }
}

pub(crate) async fn create(State(node): State<Shared>) -> Result<Json<Manifest>, ApiError> {
    let backups = configured(&node)?;
    take(&node, backups, "api").await.map(Json)
}

pub(crate) async fn list(State(node): State<Shared>) -> Result<Json<BackupsResponse>, ApiError> {
    let backups = configured(&node)?;
    Ok(Json(BackupsResponse {
        destination: backups.backup.destination.clone(),
        backups: backups.vault.list().await.map_err(api_error)?,
    }))
}

pub(crate) async fn verify(
    State(node): State<Shared>,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<Manifest>, ApiError> {
    let backups = configured(&node)?;
    let request: VerifyRequest = crate::error::parse_body(body)?;
    check(&node, backups, request.id.as_deref(), "api").await.map(Json)
}

/// Takes a backup of the applied state; records the outcome.
async fn take(node: &Shared, backups: &Backups, actor: &str) -> Result<Manifest, ApiError> {
    let _one = one_at_a_time(backups)?;
    let started = Instant::now();
    // A copy of the applied state (as a Raft snapshot takes it), encoded as it streams.
    let (state, log_index) = {
        let applied = node.applied.read().expect("state lock");
        (applied.state.clone(), applied.last_applied.map_or(0, |id| id.index))
    };
    let copy_seconds = started.elapsed().as_secs_f64();
    let created_ms = now_ms();
    let id = crate::vault::new_id(created_ms, state.revision());
    let taken = async {
        let services = service_parts(node, backups, &id, &state).await?;
        backups
            .vault
            .create(&id, &node.config.region, state, log_index, created_ms, services)
            .await
            .map_err(api_error)
    }
    .await;
    let seconds = started.elapsed().as_secs_f64();
    let metrics = &node.metrics.backup;
    let event = match &taken {
        Ok(manifest) => {
            metrics.last_success.set(now_ms() as f64 / 1000.0);
            metrics.duration.set(seconds);
            metrics.size.set(manifest.stored_bytes() as i64);
            backup_event(
                "backup.create",
                actor,
                "ok".into(),
                format!(
                    "{} at revision {}: {} chunks, {} bytes stored of {} state bytes, {seconds:.2}s ({copy_seconds:.2}s of it copying the state)",
                    manifest.id,
                    manifest.revision,
                    manifest.chunks.len(),
                    manifest.stored_bytes(),
                    manifest.state_bytes
                ),
            )
        }
        Err(e) => {
            metrics.failures.inc();
            backup_event("backup.create", actor, format!("failed: {}", e.message), String::new())
        }
    };
    crate::events::record(node, event).await;
    taken
}

/// How a service's data goes into a backup.
#[derive(Clone)]
enum PartSource {
    /// Its policy's `backup = {...}` command.
    Command(ServiceBackup),
    /// A `postgres` service: a base backup of its primary.
    Postgres(Box<Postgres>),
}

/// How long a base backup of PostgreSQL may take.
const BASE_BACKUP_TIMEOUT_MS: u64 = 24 * 3_600_000;

impl PartSource {
    fn of(service: &rampart_store::shipped::Service) -> Option<PartSource> {
        match (service.kind.postgres(), &service.policy.backup) {
            (Some(pg), _) => Some(PartSource::Postgres(Box::new(pg.clone()))),
            (None, Some(backup)) => Some(PartSource::Command(backup.clone())),
            (None, None) => None,
        }
    }

    fn timeout_ms(&self) -> u64 {
        match self {
            PartSource::Command(backup) => backup.timeout_ms,
            PartSource::Postgres(_) => BASE_BACKUP_TIMEOUT_MS,
        }
    }

    /// Runs here, on the node of `instance` (at `endpoint`), into backup `id`.
    async fn run(
        &self,
        backups: &Backups,
        id: &str,
        service: &str,
        instance: &str,
        endpoint: &str,
    ) -> Result<ServicePart, ApiError> {
        let part = match self {
            PartSource::Command(backup) => backups.vault.back_up_service(id, service, instance, backup).await,
            PartSource::Postgres(pg) => {
                crate::pg_backup::base_backup(&backups.vault, id, service, instance, pg, endpoint).await
            }
        };
        part.map_err(api_error)
    }
}

/// The data of every service whose policy has `backup = {...}`, and of every `postgres`
/// service: it runs on the node of the primary (or, active-active, of a ready instance):
/// here, or asked of that node.
async fn service_parts(
    node: &Shared,
    backups: &Backups,
    id: &str,
    state: &rampart_store::State,
) -> Result<Vec<ServicePart>, ApiError> {
    let mut parts = Vec::new();
    for (name, service) in &state.shipped.services {
        let Some(source) = PartSource::of(service) else {
            continue;
        };
        let Some((instance, record)) = state.backup_source(name) else {
            let wanted = match service.policy.mode {
                rampart_core::service::Mode::ActiveActive => "no instance up and ready on a node",
                rampart_core::service::Mode::ActivePassive => "no primary",
            };
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "backup_no_primary",
                format!("service {name} is backed up but has {wanted} to back it up from"),
            ));
        };
        let host = record.instance.node.ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "backup_no_node",
                format!("service {name}: its primary {instance} names no node to run the backup on"),
            )
        })?;
        let part = if host == node.id {
            source
                .run(backups, id, name, instance, &record.instance.endpoint)
                .await?
        } else {
            ask_node(node, host, id, name, source.timeout_ms()).await?
        };
        parts.push(part);
    }
    Ok(parts)
}

/// Asks node `host` to back up a service's data into backup `id`.
async fn ask_node(node: &Shared, host: u64, id: &str, service: &str, timeout_ms: u64) -> Result<ServicePart, ApiError> {
    let path = format!("/v1/backups/{id}/services/{service}");
    let timeout = Duration::from_millis(timeout_ms) + Duration::from_secs(60);
    // Served where it lands, not forwarded back to the leader.
    let bytes = crate::forward::call(node, crate::forward::To::Node(host), &path, &(), Some(timeout))
        .await
        .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "backup_failed", e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| ApiError::internal(format!("node {host}: undecodable answer: {e}")))
}

/// `POST /v1/backups/{id}/services/{name}`: the leader asks the node hosting a service's
/// backup source (its primary, or an active-active service's ready instance) to back its
/// data up into backup `id` (its backup command, or a PostgreSQL base backup).
pub(crate) async fn service_part(
    State(node): State<Shared>,
    axum::extract::Path((id, name)): axum::extract::Path<(String, String)>,
) -> Result<Json<ServicePart>, ApiError> {
    let backups = configured(&node)?;
    let (instance, endpoint, source) = {
        let applied = node.applied.read().expect("state lock");
        let service = applied
            .state
            .shipped
            .services
            .get(&name)
            .ok_or_else(|| ApiError::not_found("service_not_found", format!("no service {name}")))?;
        let source = PartSource::of(service).ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "backup_not_configured",
                format!("service {name} has no backup command"),
            )
        })?;
        let hosted = applied
            .state
            .backup_source(&name)
            .filter(|(_, record)| node.hosts(&record.instance))
            .map(|(instance, record)| (instance.to_string(), record.instance.endpoint.clone()));
        let (instance, endpoint) = hosted.ok_or_else(|| {
            ApiError::new(
                StatusCode::CONFLICT,
                "not_hosted",
                format!(
                    "service {name}'s backup source (its primary or a ready instance) is not on node {}",
                    node.id
                ),
            )
        })?;
        (instance, endpoint, source)
    };
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(ApiError::bad_request("bad_id", format!("{id:?} is not a backup id")));
    }
    source.run(backups, &id, &name, &instance, &endpoint).await.map(Json)
}

/// Verifies a backup (the newest by default), then applies retention; records the outcome.
async fn check(node: &Shared, backups: &Backups, id: Option<&str>, actor: &str) -> Result<Manifest, ApiError> {
    let _one = one_at_a_time(backups)?;
    let verified = crate::pg_backup::verify(&backups.vault, id, now_ms())
        .await
        .map_err(api_error);
    let metrics = &node.metrics.backup;
    let event = match &verified {
        Ok((manifest, databases)) => {
            metrics.verify_last_success.set(now_ms() as f64 / 1000.0);
            let databases: String = databases
                .iter()
                .map(|r| {
                    format!(
                        "; PostgreSQL {} restored and recovered through {} archived WAL files",
                        r.service, r.wal_files
                    )
                })
                .collect();
            backup_event(
                "backup.verify",
                actor,
                "ok".into(),
                format!(
                    "{} restored at revision {}, checksum {}{databases}",
                    manifest.id, manifest.revision, manifest.checksum
                ),
            )
        }
        Err(e) => {
            metrics.verify_failures.inc();
            backup_event(
                "backup.verify",
                actor,
                format!("failed: {}", e.message),
                id.unwrap_or("newest").to_string(),
            )
        }
    };
    crate::events::record(node, event).await;
    if verified.is_ok() {
        prune(node, backups).await;
    }
    verified.map(|(manifest, _)| manifest)
}

/// Deletes what retention lets go (only behind a newer verified backup).
async fn prune(node: &Shared, backups: &Backups) {
    let listed = match backups.vault.list().await {
        Ok(listed) => listed,
        Err(e) => {
            tracing::warn!("retention: cannot list backups: {e}");
            return;
        }
    };
    let kept: Vec<Kept> = listed
        .iter()
        .map(|l| Kept {
            id: l.manifest.id.clone(),
            created_ms: l.manifest.created_ms,
            verified: l.verified_ms.is_some(),
        })
        .collect();
    let doomed = rampart_core::backup::doomed(&kept, backups.backup.retention, now_ms());
    for id in &doomed {
        let outcome = match backups.vault.delete(id).await {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("failed: {e}"),
        };
        crate::events::record(node, backup_event("backup.delete", "retention", outcome, id.clone())).await;
    }
    // Archived log older than the oldest backup kept can never be replayed.
    let oldest = listed.iter().map(|l| &l.manifest).find(|m| !doomed.contains(&m.id));
    if let Some(oldest) = oldest {
        if let Err(e) = backups.vault.prune_log(oldest.log_index + 1).await {
            tracing::warn!("retention: cannot prune the log archive: {e}");
        }
    }
    // Likewise PostgreSQL's archived WAL older than the oldest base backup kept.
    let kept: Vec<&Manifest> = listed
        .iter()
        .map(|l| &l.manifest)
        .filter(|m| !doomed.contains(&m.id))
        .collect();
    if let Err(e) = crate::pg_backup::prune_archive(&backups.vault, &kept).await {
        tracing::warn!("retention: cannot prune PostgreSQL's WAL archive: {e}");
    }
}

/// Leader only: archives committed log entries beside the backups every
/// `archive_interval`, in segments of up to [`SEGMENT_ENTRIES_MAX`] entries, so a restore can
/// replay to any revision or time after a backup. A gap (entries compacted away before the
/// archiver read them) is an event and an alert: point-in-time restores across it need a
/// backup taken after it.
pub(crate) async fn archive(node: Shared) {
    let Some(backups) = node.backups.as_ref() else { return };
    let Some(interval_ms) = backups.backup.archive_interval_ms else {
        return;
    };
    let interval = Duration::from_millis(interval_ms);
    // The highest archived index, learnt from the destination on becoming leader.
    let mut archived: Option<u64> = None;
    let mut next_run = tokio::time::Instant::now() + interval;
    let overtaken = node.log.overtaken_notice();
    let mut raft_metrics = node.raft.metrics();
    loop {
        let leading = node.raft.metrics().borrow().state == ServerState::Leader;
        if !leading {
            // Only the leader archives: another node's log is not held back for it.
            archived = None;
            node.log.forget_reader(ARCHIVER);
        } else if let Some(from) = archive_start(backups, archived).await {
            // Compaction keeps what the archive has yet to read (within max-retained-log-bytes).
            node.log.reader_at(ARCHIVER, from);
            archived = Some(from - 1);
            if tokio::time::Instant::now() >= next_run {
                next_run = tokio::time::Instant::now() + interval;
                match archive_from(&node, backups, from).await {
                    Ok(last) => {
                        node.log.reader_at(ARCHIVER, last + 1);
                        archived = Some(last);
                        node.metrics.backup.archived_index.set(last as i64);
                    }
                    Err(e) => tracing::warn!("log archive: {e}"),
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            // Becoming leader registers the archiver at once; losing it, forgets it.
            _ = role_change(&mut raft_metrics, leading) => {}
            _ = overtaken.notified() => {
                if let Some((first, last)) = node.log.take_overtaken(ARCHIVER) {
                    gap(&node, first, last, true).await;
                    archived = Some(archived.unwrap_or(0).max(last));
                }
            }
        }
    }
}

/// The next index to archive: after the last archived, or, on becoming leader, after the
/// destination's last segment.
async fn archive_start(backups: &Backups, archived: Option<u64>) -> Option<u64> {
    match archived {
        Some(index) => Some(index + 1),
        None => match backups.vault.segments().await {
            Ok(segments) => Some(segments.last().map_or(1, |(_, last)| last + 1)),
            Err(e) => {
                tracing::warn!("log archive: cannot list segments: {e}");
                None
            }
        },
    }
}

/// Waits until this node's role differs from `leading` (for ever if the engine stops).
async fn role_change(
    metrics: &mut tokio::sync::watch::Receiver<openraft::RaftMetrics<u64, openraft::BasicNode>>,
    leading: bool,
) {
    loop {
        if (metrics.borrow_and_update().state == ServerState::Leader) != leading {
            return;
        }
        if metrics.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// Records that log entries `first..=last` were compacted before the archive had them.
async fn gap(node: &Shared, first: u64, last: u64, over_bound: bool) {
    let why = if over_bound {
        format!(
            " (keeping them would have held more than max-retained-log-bytes = {})",
            node.config.max_retained_log_bytes
        )
    } else {
        String::new()
    };
    let detail = format!(
        "log entries {first}..{last} were compacted before they were archived{why}; \
         point-in-time restores need a backup taken after index {last} (rampart backup create)"
    );
    crate::events::record(
        node,
        backup_event("backup.archive_gap", "archive", "failed: gap".into(), detail),
    )
    .await;
}

/// The archiver's name as a reader of the log.
const ARCHIVER: &str = "archiver";

/// Most entries in one archived segment.
const SEGMENT_ENTRIES_MAX: u64 = 10_000;

/// Archives applied entries from `from` on; returns the last index archived.
async fn archive_from(node: &Shared, backups: &Backups, from: u64) -> Result<u64, String> {
    use openraft::storage::{RaftLogReader, RaftLogStorage};
    let applied = node
        .applied
        .read()
        .expect("state lock")
        .last_applied
        .map_or(0, |id| id.index);
    let mut from = from;
    while from <= applied {
        let to = applied.min(from + SEGMENT_ENTRIES_MAX - 1);
        let mut log = node.log.clone();
        let entries = log.try_get_log_entries(from..=to).await.map_err(|e| e.to_string())?;
        if entries.first().map(|e| e.log_id.index) != Some(from) {
            // Compacted before it was archived: go on from what the log still has.
            let first_kept = match node.log.first_index().map_err(|e| e.to_string())? {
                Some(index) => index,
                None => log
                    .get_log_state()
                    .await
                    .map_err(|e| e.to_string())?
                    .last_purged_log_id
                    .map_or(1, |id| id.index + 1),
            };
            if first_kept <= from {
                return Err(format!("log entry {from} is neither in the log nor compacted"));
            }
            let over_bound = node.log.take_overtaken(ARCHIVER).is_some();
            gap(node, from, first_kept - 1, over_bound).await;
            from = first_kept;
            continue;
        }
        let archived: Vec<Archived> = entries
            .into_iter()
            .map(|entry| Archived {
                index: entry.log_id.index,
                commands: match entry.payload {
                    openraft::EntryPayload::Normal(batch) => batch.commands,
                    _ => Vec::new(),
                },
            })
            .collect();
        let last = archived.last().map_or(from, |a| a.index);
        backups.vault.archive(&archived).await.map_err(|e| e.to_string())?;
        from = last + 1;
    }
    Ok(from - 1)
}

fn backup_event(action: &str, actor: &str, outcome: String, detail: String) -> Event {
    Event {
        id: 0,
        at_ms: 0,
        kind: "backup".to_string(),
        action: action.to_string(),
        actor: actor.to_string(),
        source: "-".to_string(),
        outcome,
        detail,
    }
}

/// Leader only: runs the backup and verification schedules, and watches for staleness.
pub(crate) async fn run(node: Shared) {
    let Some(backups) = node.backups.as_ref() else { return };
    let backup = parse_schedule(&backups.backup.schedule);
    let verify = parse_schedule(&backups.backup.verify_schedule);
    if backup.is_none() && verify.is_none() {
        return;
    }
    let started_ms = now_ms();
    let mut stale_reported = false;
    let mut next_backup = backup.as_ref().and_then(|c| next_after(c, Utc::now()));
    let mut next_verify = verify.as_ref().and_then(|c| next_after(c, Utc::now()));
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = Utc::now();
        let leader = node.raft.metrics().borrow().state == ServerState::Leader;
        if let (Some(cron), Some(at)) = (&backup, next_backup) {
            if now >= at {
                next_backup = next_after(cron, now);
                if leader {
                    let _ = take(&node, backups, "schedule").await;
                }
            }
        }
        if let (Some(cron), Some(at)) = (&verify, next_verify) {
            if now >= at {
                next_verify = next_after(cron, now);
                // Nothing to verify before the first backup: that is staleness's to report.
                let any = matches!(backups.vault.list().await, Ok(listed) if !listed.is_empty());
                if leader && any {
                    let _ = check(&node, backups, None, "schedule").await;
                }
            }
        }
        // Stale: no success within twice the schedule's period (measured between two runs).
        if let Some(cron) = &backup {
            let period_ms = period_ms(cron, now);
            let last = node.metrics.backup.last_success.get();
            let last_ms = (last > 0.0).then_some((last * 1000.0) as u64);
            let stale = rampart_core::backup::stale(last_ms, started_ms, period_ms, now_ms());
            node.metrics.backup.stale.set(i64::from(stale));
            if stale && !stale_reported && leader {
                let detail = format!(
                    "no backup succeeded in twice the schedule's period ({}s)",
                    period_ms / 1000
                );
                crate::events::record(
                    &node,
                    backup_event("backup.stale", "schedule", "failed: stale".into(), detail),
                )
                .await;
            }
            stale_reported = stale;
        }
    }
}

fn parse_schedule(text: &Option<String>) -> Option<Cron> {
    text.as_deref().and_then(|t| parse_cron(t).ok())
}

fn next_after(cron: &Cron, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    cron.find_next_occurrence(&now, false).ok()
}

/// The schedule's period around `now`: the time between its next two runs.
fn period_ms(cron: &Cron, now: DateTime<Utc>) -> u64 {
    let Some(first) = next_after(cron, now) else {
        return u64::MAX / 4;
    };
    let Some(second) = next_after(cron, first) else {
        return u64::MAX / 4;
    };
    (second - first).num_milliseconds().max(0) as u64
}
