//! Backups as data and policy: the `[backup]` settings of a node (validated by field
//! path), the manifest that describes one backup, the encryption key's text form, and
//! retention (which backups may go). Moving bytes is `rampart-node`'s job.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::field::{duration_ms, field_error, FieldError};

/// The manifest format this build writes; it reads formats 1 and 2 too. It follows the data
/// dir's format: 3 holds the state with the region epoch history and promise; format 2
/// records the shipped and the local part of the state with a checksum each (`checksum`,
/// `local_checksum`, split at `shipped_bytes`); format 1 held the state before the split.
/// A restore migrates an older state as a node migrates its data dir.
pub const FORMAT_VERSION: u32 = 4;
/// Bytes of state per chunk before compression: memory per chunk in flight.
pub const CHUNK_BYTES: usize = 8 << 20;

/// `[backup]` as written in a node's config file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSpec {
    /// `file:///absolute/path` or `s3://bucket/prefix`.
    pub destination: Option<String>,
    /// A file holding the AES-256 key as 64 hex digits.
    pub key_file: Option<PathBuf>,
    /// An environment variable holding the key as 64 hex digits.
    pub key_env: Option<String>,
    /// Cron expression (`0 */6 * * *`, UTC) for backups, run by the leader.
    pub schedule: Option<String>,
    /// Cron expression for verifying the newest backup, run by the leader.
    pub verify_schedule: Option<String>,
    /// Keep at least this many of the newest backups.
    pub keep_last: Option<u32>,
    /// Backups older than this may go, e.g. `30d`.
    pub max_age: Option<String>,
    /// Archive committed log entries beside the backups for point-in-time restores
    /// (default true).
    pub archive: Option<bool>,
    /// How often the leader archives new log entries (default 1s).
    pub archive_interval: Option<String>,
    pub s3: Option<S3Spec>,
}

/// Settings of an S3-compatible store; credentials come from `AWS_ACCESS_KEY_ID` and
/// `AWS_SECRET_ACCESS_KEY`, never from the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Spec {
    /// e.g. `http://127.0.0.1:9000`; AWS when absent.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Plain HTTP to the endpoint (a store on loopback).
    #[serde(default)]
    pub allow_http: bool,
}

/// Where the key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    Env(String),
}

/// A node's validated backup settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    pub destination: String,
    /// `None`: backups are compressed but not encrypted.
    pub key: Option<KeySource>,
    pub schedule: Option<String>,
    pub verify_schedule: Option<String>,
    pub retention: Retention,
    /// `Some(ms)`: archive the log every this often; `None`: no archiving.
    pub archive_interval_ms: Option<u64>,
    pub s3: S3Spec,
}

/// How many backups to keep, and for how long. Neither set: keep everything.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    pub keep_last: Option<u32>,
    pub max_age_ms: Option<u64>,
}

impl BackupSpec {
    /// Validates the settings; errors name the field as `backup.FIELD`. Cron expressions
    /// are checked by the node, which owns the calendar.
    pub fn validate(&self) -> Result<Backup, FieldError> {
        let destination = self.destination.clone().ok_or_else(|| {
            field_error(
                "backup.destination",
                "",
                "required: file:///absolute/path or s3://bucket/prefix",
            )
        })?;
        check_destination("backup.destination", &destination)?;
        let key = match (&self.key_file, &self.key_env) {
            (Some(_), Some(_)) => {
                return Err(field_error(
                    "backup.key_env",
                    self.key_env.clone().unwrap_or_default(),
                    "key_file or key_env, not both",
                ))
            }
            (Some(file), None) => Some(KeySource::File(file.clone())),
            (None, Some(var)) if var.is_empty() => return Err(field_error("backup.key_env", "", "a variable name")),
            (None, Some(var)) => Some(KeySource::Env(var.clone())),
            (None, None) => None,
        };
        if self.keep_last == Some(0) {
            return Err(field_error(
                "backup.keep_last",
                "0",
                "1 or more (leave it out to keep every backup)",
            ));
        }
        let max_age_ms = match &self.max_age {
            None => None,
            Some(text) => Some(duration_ms(
                "backup.max_age",
                Some(text),
                0,
                60_000,
                100 * 365 * 86_400_000,
            )?),
        };
        let archive_interval_ms = match self.archive {
            Some(false) => None,
            _ => Some(duration_ms(
                "backup.archive_interval",
                self.archive_interval.as_deref(),
                1000,
                100,
                3_600_000,
            )?),
        };
        Ok(Backup {
            destination,
            key,
            archive_interval_ms,
            schedule: self.schedule.clone(),
            verify_schedule: self.verify_schedule.clone(),
            retention: Retention {
                keep_last: self.keep_last,
                max_age_ms,
            },
            s3: self.s3.clone().unwrap_or_default(),
        })
    }
}

/// `file:///absolute/path` or `s3://bucket[/prefix]`.
pub fn check_destination(field: &str, destination: &str) -> Result<(), FieldError> {
    let allowed = "file:///absolute/path or s3://bucket/prefix";
    let ok = match destination.split_once("://") {
        Some(("file", path)) => path.starts_with('/') && path.len() > 1,
        Some(("s3", rest)) => rest.split('/').next().is_some_and(|bucket| !bucket.is_empty()),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(field_error(field, destination, allowed))
    }
}

/// A key as kept in its file or variable: 64 hex digits (surrounding whitespace ignored).
/// The error never repeats the text: it may be most of a key.
pub fn parse_key(text: &str) -> Result<[u8; 32], String> {
    let text = text.trim();
    if text.len() != 64 {
        return Err(format!(
            "a backup key is 32 bytes written as 64 hex digits (make one with `openssl rand -hex 32`); found {} characters",
            text.len()
        ));
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .map_err(|_| "a backup key is 64 hex digits (0-9, a-f); it holds other characters".to_string())?;
    }
    Ok(key)
}

/// One backup, as described by its `manifest.json` (written after every chunk, so a backup
/// without one never finished).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub id: String,
    pub region: String,
    /// The region's epoch: 1 until region failover moves it.
    pub epoch: u64,
    /// The store revision the state is at.
    pub revision: u64,
    /// The Raft log index the snapshot covers; archived log segments continue after it.
    pub log_index: u64,
    /// Wall clock of the backing-up node when the snapshot was taken, ms since the epoch.
    pub created_ms: u64,
    /// The shipped state's checksum as `GET /v1/cluster` reports it (XXH3-64, hex). In a
    /// format-1 manifest, the checksum of the whole state as format 1 encoded it.
    pub checksum: String,
    /// The region-local revision the state is at (format 2 on; 0 in format 1).
    #[serde(default)]
    pub local_revision: u64,
    /// The region-local state's checksum as `GET /v1/cluster` reports it (format 2 on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_checksum: Option<String>,
    /// Where the encoded state's shipped part ends and its local part starts (format 2 on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipped_bytes: Option<u64>,
    /// Encoded state bytes (before compression).
    pub state_bytes: u64,
    /// `zstd`.
    pub compression: String,
    /// `aes-256-gcm` or `none`.
    pub encryption: String,
    /// Names the key without revealing it: the first 8 bytes of its SHA-256, hex.
    pub key_id: Option<String>,
    pub chunks: Vec<Chunk>,
    /// Service data streamed from the services' own backup commands.
    #[serde(default)]
    pub services: Vec<ServicePart>,
}

/// One stored chunk: its size and the SHA-256 of its stored (compressed, encrypted) bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub bytes: u64,
    pub sha256: String,
}

/// A service's data in the backup: the output of its `backup.command` on the primary's
/// node, in chunks of its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePart {
    pub service: String,
    /// The instance that was primary, whose node ran the command.
    pub instance: String,
    pub bytes: u64,
    /// Checksum of the plain output (XXH3-64, hex).
    pub checksum: String,
    /// The policy's `backup.restore` when the backup was taken.
    pub restore: Option<String>,
    pub chunks: Vec<Chunk>,
    /// A `postgres` service's part: a base backup (`pg_basebackup`'s tar), which the
    /// service's archived WAL continues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postgres: Option<PgBase>,
}

/// What a restore of a PostgreSQL base backup needs to know beside its tar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgBase {
    /// The policy's `bin_dir` when it was taken: where a restore looks for PostgreSQL.
    pub bin_dir: String,
    /// The superuser's name (a restore logs in as it to watch the recovery).
    pub superuser: String,
    /// The WAL segment the primary wrote when the backup started: archived WAL from this
    /// segment on continues the base backup.
    pub start_wal: String,
    /// The primary's WAL position once the backup had finished: a restore to a later
    /// position can start from this backup.
    pub end_lsn: String,
    /// When the backup had finished (ms since the epoch): likewise for a restore to a time.
    pub end_ms: u64,
}

impl Manifest {
    /// Bytes stored for this backup.
    pub fn stored_bytes(&self) -> u64 {
        self.chunks.iter().map(|c| c.bytes).sum::<u64>()
            + self
                .services
                .iter()
                .flat_map(|s| &s.chunks)
                .map(|c| c.bytes)
                .sum::<u64>()
    }
}

/// One backup as listed: its manifest, and when a verification last restored it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listed {
    pub manifest: Manifest,
    /// ms since the epoch; `None`: never verified.
    pub verified_ms: Option<u64>,
}

/// `GET /v1/backups`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupsResponse {
    pub destination: String,
    /// Oldest first.
    pub backups: Vec<Listed>,
}

/// `POST /v1/backups/verify`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// The backup to verify; the newest when absent.
    pub id: Option<String>,
}

/// Where a point-in-time restore stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// The state right after the write that made this revision.
    Revision(u64),
    /// The state with every write committed at or before this time (ms since the epoch).
    Time(u64),
}

/// An archived log segment's object name: `log/FIRST-LAST`, zero-padded so names sort.
pub fn segment_name(first: u64, last: u64) -> String {
    format!("{first:020}-{last:020}")
}

/// The index range of a segment name, if it is one.
pub fn segment_range(name: &str) -> Option<(u64, u64)> {
    let (first, last) = name.split_once('-')?;
    let (first, last) = (first.parse().ok()?, last.parse().ok()?);
    (first <= last).then_some((first, last))
}

/// A backup's id: sortable by time, and names the revision, e.g. `20261123T061500123Z-r4711`.
pub fn backup_id(created: &str, revision: u64) -> String {
    format!("{created}-r{revision}")
}

/// What retention knows of one backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub id: String,
    pub created_ms: u64,
    /// A verification restored it and found its checksum.
    pub verified: bool,
}

/// The backups retention deletes: beyond `keep_last` newest, or older than `max_age`, but
/// only those older than the newest verified backup; with no verified backup, none.
pub fn doomed(backups: &[Kept], retention: Retention, now_ms: u64) -> Vec<String> {
    if retention.keep_last.is_none() && retention.max_age_ms.is_none() {
        return Vec::new();
    }
    let mut newest_first: Vec<&Kept> = backups.iter().collect();
    newest_first.sort_by(|a, b| b.created_ms.cmp(&a.created_ms).then(b.id.cmp(&a.id)));
    let Some(verified_at) = newest_first.iter().position(|b| b.verified) else {
        return Vec::new();
    };
    newest_first
        .iter()
        .enumerate()
        .filter(|(rank, backup)| {
            let surplus = retention.keep_last.is_some_and(|n| *rank >= n as usize);
            let old = retention
                .max_age_ms
                .is_some_and(|age| now_ms.saturating_sub(backup.created_ms) > age);
            *rank > verified_at && (surplus || old)
        })
        .map(|(_, backup)| backup.id.clone())
        .collect()
}

/// Whether backups are overdue: no success within twice the schedule's period.
pub fn stale(last_success_ms: Option<u64>, since_ms: u64, period_ms: u64, now_ms: u64) -> bool {
    let reference = last_success_ms.unwrap_or(since_ms);
    now_ms.saturating_sub(reference) > period_ms.saturating_mul(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(id: &str, created_ms: u64, verified: bool) -> Kept {
        Kept {
            id: id.into(),
            created_ms,
            verified,
        }
    }

    #[test]
    fn retention_deletes_only_behind_a_newer_verified_backup() {
        let keep_two = Retention {
            keep_last: Some(2),
            max_age_ms: None,
        };
        let unverified = [kept("a", 1, false), kept("b", 2, false), kept("c", 3, false)];
        assert!(
            doomed(&unverified, keep_two, 10).is_empty(),
            "nothing goes without a verified backup"
        );
        let backups = [
            kept("a", 1, false),
            kept("b", 2, true),
            kept("c", 3, false),
            kept("d", 4, false),
        ];
        // Keep two newest (d, c); a and b are surplus, but b is the newest verified one.
        assert_eq!(doomed(&backups, keep_two, 10), vec!["a".to_string()]);
        let by_age = Retention {
            keep_last: None,
            max_age_ms: Some(5),
        };
        let backups = [kept("a", 1, true), kept("b", 2, false), kept("c", 9, true)];
        assert_eq!(doomed(&backups, by_age, 10), vec!["b".to_string(), "a".to_string()]);
        assert!(doomed(&backups, Retention::default(), 10).is_empty());
    }

    #[test]
    fn keys_are_64_hex_digits_and_errors_do_not_echo_them() {
        let hex = "00112233445566778899aabbccddeeff00112233445566778899AABBCCDDEEFF\n";
        assert_eq!(parse_key(hex).expect("key")[1], 0x11);
        let err = parse_key("secretsecret").expect_err("short");
        assert!(err.contains("64 hex digits") && !err.contains("secret"), "{err}");
        let err = parse_key(&"zz".repeat(32)).expect_err("not hex");
        assert!(!err.contains("zz"), "{err}");
    }

    #[test]
    fn settings_are_checked_by_field() {
        let spec = |f: fn(&mut BackupSpec)| {
            let mut spec = BackupSpec {
                destination: Some("file:///var/backups".into()),
                ..BackupSpec::default()
            };
            f(&mut spec);
            spec.validate()
        };
        assert!(spec(|_| {}).is_ok());
        assert_eq!(
            spec(|s| s.destination = Some("/tmp/x".into())).unwrap_err().field,
            "backup.destination"
        );
        assert_eq!(spec(|s| s.destination = None).unwrap_err().field, "backup.destination");
        assert!(spec(|s| s.destination = Some("s3://bucket/prefix".into())).is_ok());
        assert_eq!(spec(|s| s.keep_last = Some(0)).unwrap_err().field, "backup.keep_last");
        assert_eq!(
            spec(|s| s.max_age = Some("soon".into())).unwrap_err().field,
            "backup.max_age"
        );
        let both = spec(|s| {
            s.key_file = Some("/k".into());
            s.key_env = Some("K".into());
        });
        assert_eq!(both.unwrap_err().field, "backup.key_env");
    }

    #[test]
    fn segment_names_sort_and_parse_back() {
        assert!(segment_name(9, 10) < segment_name(11, 200));
        assert_eq!(segment_range(&segment_name(9, 10)), Some((9, 10)));
        assert_eq!(segment_range("x-1"), None);
        assert_eq!(segment_range("5-4"), None);
    }

    #[test]
    fn staleness_is_twice_the_period() {
        assert!(!stale(Some(100), 0, 50, 200));
        assert!(stale(Some(100), 0, 50, 201));
        assert!(stale(None, 0, 50, 101), "never succeeded counts from the start");
    }
}
