//! PostgreSQL as a service kind (`kind = "postgres"`, `[services.NAME.postgres]`): the
//! settings as written and validated by field path, and the pure pieces a node needs to
//! run an instance: WAL positions and lag in bytes, the `synchronous_standby_names` that
//! synchronous mode asks for, and the connection strings it writes
//! (`primary_conninfo`). No process is started here.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::field::{field_error, FieldError};

/// The PostgreSQL port when none is given.
pub const PORT_DEFAULT: u16 = 5432;

/// Settings Rampart writes itself; a policy's `parameters` may not set them.
pub const MANAGED_PARAMETERS: &[&str] = &[
    "port",
    "listen_addresses",
    "hot_standby",
    "primary_conninfo",
    "primary_slot_name",
    "synchronous_standby_names",
    "synchronous_commit",
    "archive_mode",
    "archive_command",
    "restore_command",
    "recovery_target_time",
    "recovery_target_lsn",
    "data_directory",
];

/// A role and where its password comes from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsSpec {
    pub name: Option<String>,
    /// A file holding the password (its first line).
    pub password_file: Option<String>,
    /// An environment variable of the node holding the password.
    pub password_env: Option<String>,
}

/// `[services.NAME.postgres]` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSpec {
    /// Where PostgreSQL's programs are (`initdb`, `pg_ctl`, `pg_basebackup`, `pg_rewind`).
    pub bin_dir: Option<String>,
    /// Each instance's data directory; `{instance}` is replaced by the instance's id.
    pub data_dir: Option<String>,
    pub port: Option<u16>,
    pub superuser: Option<CredentialsSpec>,
    pub replication_user: Option<CredentialsSpec>,
    /// `off` (default), `on` or `quorum`.
    pub synchronous: Option<String>,
    /// With no healthy synchronous replica: `block` (default) or `async`.
    pub synchronous_fallback: Option<String>,
    /// A replica further behind than this is not promoted.
    pub max_lag_bytes: Option<u64>,
    /// More `postgresql.conf` settings.
    pub parameters: Option<BTreeMap<String, String>>,
}

/// Synchronous replication as Rampart manages it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Commits are acknowledged by the primary alone.
    Off,
    /// A commit waits for the first replica Rampart would promote.
    On,
    /// A commit waits for any one of the replicas Rampart would promote.
    Quorum,
}

/// What a primary does while no replica it may wait for is healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Commits wait (writes stop) until a synchronous replica is back.
    Block,
    /// Commits go on unreplicated, said in an event and `/health/ha`.
    Async,
}

/// A role and where its password comes from, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credentials {
    pub name: String,
    pub password: PasswordSource,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PasswordSource {
    File(String),
    Env(String),
}

/// `[services.NAME.postgres]`, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Postgres {
    pub bin_dir: String,
    pub data_dir: String,
    pub port: u16,
    pub superuser: Credentials,
    pub replication_user: Credentials,
    pub synchronous: Synchronous,
    pub fallback: Fallback,
    pub max_lag_bytes: Option<u64>,
    pub parameters: BTreeMap<String, String>,
}

impl Postgres {
    /// Whether a primary waits for a synchronous standby (`synchronous` is `on` or
    /// `quorum`): only that standby may be promoted.
    pub fn is_synchronous(&self) -> bool {
        self.synchronous != Synchronous::Off
    }

    /// Instance `id`'s data directory.
    pub fn data_dir_of(&self, id: &str) -> String {
        self.data_dir.replace("{instance}", id)
    }
}

fn absolute_path(field: &str, value: Option<&str>) -> Result<String, FieldError> {
    match value {
        None => Err(field_error(field, "(missing)", "an absolute path")),
        Some(path) if !path.starts_with('/') || path.contains('\n') => {
            Err(field_error(field, path, "an absolute path"))
        }
        Some(path) => Ok(path.to_string()),
    }
}

/// A PostgreSQL role name Rampart can quote anywhere: letters, digits, `_`, 1 to 63 bytes.
fn role_name(field: &str, name: &str) -> Result<String, FieldError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && !name.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(name.to_string())
    } else {
        Err(field_error(
            field,
            name,
            "a role name: letters, digits and _, 1 to 63 bytes",
        ))
    }
}

impl CredentialsSpec {
    fn validate(spec: Option<&CredentialsSpec>, at: &str, default_name: &str) -> Result<Credentials, FieldError> {
        let Some(spec) = spec else {
            return Err(field_error(
                at,
                "(missing)",
                "a table with name and one of password_file or password_env",
            ));
        };
        let name = role_name(&format!("{at}.name"), spec.name.as_deref().unwrap_or(default_name))?;
        let password = match (&spec.password_file, &spec.password_env) {
            (Some(file), None) => PasswordSource::File(absolute_path(&format!("{at}.password_file"), Some(file))?),
            (None, Some(env)) if !env.is_empty() && env.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
                PasswordSource::Env(env.clone())
            }
            (None, Some(env)) => {
                return Err(field_error(
                    format!("{at}.password_env"),
                    env,
                    "an environment variable name",
                ))
            }
            _ => {
                return Err(field_error(
                    format!("{at}.password_file"),
                    "(both or neither)",
                    "exactly one of password_file or password_env",
                ))
            }
        };
        Ok(Credentials { name, password })
    }
}

impl PostgresSpec {
    /// Validates the settings; errors name the field under `postgres.`.
    pub fn validate(&self) -> Result<Postgres, FieldError> {
        let bin_dir = absolute_path("postgres.bin_dir", self.bin_dir.as_deref())?;
        let data_dir = absolute_path("postgres.data_dir", self.data_dir.as_deref())?;
        let port = match self.port {
            Some(0) => return Err(field_error("postgres.port", "0", "1 to 65535")),
            Some(port) => port,
            None => PORT_DEFAULT,
        };
        let superuser = CredentialsSpec::validate(self.superuser.as_ref(), "postgres.superuser", "postgres")?;
        let replication_user = CredentialsSpec::validate(
            self.replication_user.as_ref(),
            "postgres.replication_user",
            "replicator",
        )?;
        if superuser.name == replication_user.name {
            return Err(field_error(
                "postgres.replication_user.name",
                &replication_user.name,
                "a role other than the superuser",
            ));
        }
        let synchronous = match self.synchronous.as_deref() {
            None | Some("off") => Synchronous::Off,
            Some("on") => Synchronous::On,
            Some("quorum") => Synchronous::Quorum,
            Some(other) => return Err(field_error("postgres.synchronous", other, "off, on or quorum")),
        };
        let fallback = match self.synchronous_fallback.as_deref() {
            None | Some("block") => Fallback::Block,
            Some("async") if synchronous != Synchronous::Quorum => Fallback::Async,
            Some("async") => {
                return Err(field_error(
                    "postgres.synchronous_fallback",
                    "async",
                    "block with synchronous = \"quorum\" (commits wait for their quorum)",
                ))
            }
            Some(other) => return Err(field_error("postgres.synchronous_fallback", other, "block or async")),
        };
        let parameters = self.parameters.clone().unwrap_or_default();
        for (name, value) in &parameters {
            let field = format!("postgres.parameters.{name}");
            let well_formed = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.');
            if !well_formed {
                return Err(field_error(field, name, "a postgresql.conf setting name"));
            }
            if MANAGED_PARAMETERS.contains(&name.as_str()) {
                return Err(field_error(field, name, "a setting Rampart does not manage itself"));
            }
            if value.contains('\n') || value.contains('\r') {
                return Err(field_error(field, value, "a value on one line"));
            }
        }
        Ok(Postgres {
            bin_dir,
            data_dir,
            port,
            superuser,
            replication_user,
            synchronous,
            fallback,
            max_lag_bytes: self.max_lag_bytes,
            parameters,
        })
    }
}

/// A WAL position (`pg_lsn`), written `X/Y` in hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct Lsn(pub u64);

impl Lsn {
    /// How many bytes of WAL `self` is behind `ahead` (0 when it is not behind).
    pub fn behind(self, ahead: Lsn) -> u64 {
        ahead.0.saturating_sub(self.0)
    }
}

impl FromStr for Lsn {
    type Err = String;

    fn from_str(text: &str) -> Result<Lsn, String> {
        let (high, low) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not a WAL position (X/Y in hex)"))?;
        let part = |p: &str| {
            if p.is_empty() || p.len() > 8 {
                return Err(format!("{text:?} is not a WAL position (X/Y in hex)"));
            }
            u32::from_str_radix(p, 16).map_err(|_| format!("{text:?} is not a WAL position (X/Y in hex)"))
        };
        Ok(Lsn((u64::from(part(high)?) << 32) | u64::from(part(low)?)))
    }
}

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// An identifier quoted for SQL and `synchronous_standby_names`.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A standby name no instance has (ids have no spaces): waiting for it blocks commits.
pub const NO_STANDBY: &str = "rampart: no synchronous replica";

/// The `synchronous_standby_names` a primary gets: the replicas it may wait for, best
/// first (`standbys`: the synchronous standbys Rampart would promote, in its order). `on`
/// waits for the first of them that is connected (`FIRST 1`), `quorum` for any one (`ANY
/// 1`). With none, `block` waits for a name no replica has (commits wait until Rampart
/// names one: a replica that merely connects must not acknowledge what only a promotable
/// one may) and `async` waits for none (empty). `off` never waits.
pub fn synchronous_standby_names(mode: Synchronous, fallback: Fallback, standbys: &[&str]) -> String {
    if mode == Synchronous::Off {
        return String::new();
    }
    if standbys.is_empty() {
        return match fallback {
            Fallback::Block => format!("FIRST 1 ({})", quote_ident(NO_STANDBY)),
            Fallback::Async => String::new(),
        };
    }
    let names: Vec<String> = standbys.iter().map(|s| quote_ident(s)).collect();
    let (how, count) = match mode {
        Synchronous::On => ("FIRST", 1),
        Synchronous::Quorum => ("ANY", quorum_size(standbys.len())),
        Synchronous::Off => unreachable!("returned above"),
    };
    format!("{how} {count} ({})", names.join(", "))
}

/// How many of its `members` replicas a primary in quorum mode waits for with each
/// commit: half, rounded up (1 of 1 or 2, 2 of 3 or 4, 3 of 5).
pub fn quorum_size(members: usize) -> usize {
    members.div_ceil(2).max(1)
}

/// One member of a quorum-mode primary's replicas, as promotion sees it once the primary
/// is gone: its final WAL position when it is up and no longer streams, else none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuorumMember<'a> {
    pub id: &'a str,
    pub settled: Option<Lsn>,
}

/// Quorum mode's promotion rule. The primary waited for any `k = quorum_size(N)` of its N
/// members before it acknowledged a commit, so any `N - k + 1` of them hold every
/// acknowledged commit between them, and the one with the most WAL among those holds all
/// of it. `candidate` may be promoted only when at least `N - k + 1` members are settled
/// and none of them has more WAL than it.
pub fn quorum_promotable(members: &[QuorumMember], candidate: &str) -> bool {
    let n = members.len();
    if n == 0 {
        return false;
    }
    let settled: Vec<(&str, Lsn)> = members.iter().filter_map(|m| Some((m.id, m.settled?))).collect();
    let Some(own) = settled.iter().find(|(id, _)| *id == candidate).map(|(_, lsn)| *lsn) else {
        return false;
    };
    settled.len() > n - quorum_size(n) && settled.iter().all(|(_, lsn)| *lsn <= own)
}

/// A libpq connection string from `(keyword, value)` pairs, every value quoted.
pub fn conninfo(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(key, value)| format!("{key}='{}'", value.replace('\\', "\\\\").replace('\'', "\\'")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where an instance registered at `endpoint` listens: the endpoint's port, or the
/// policy's `port` when it names none.
pub fn listen_port(pg: &Postgres, endpoint: &str) -> u16 {
    endpoint
        .rsplit_once(':')
        .and_then(|(_, port)| port.trim_end_matches('/').parse().ok())
        .unwrap_or(pg.port)
}

/// The host part of `HOST:PORT` (`[::1]:5432` gives `::1`).
pub fn host_of(endpoint: &str) -> &str {
    let host = endpoint.rsplit_once(':').map_or(endpoint, |(host, _)| host);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The physical replication slot a primary keeps for instance `id`: `rampart_` and the id
/// in lowercase, anything but letters, digits and `_` as `_` (PostgreSQL's slot names),
/// at most 63 bytes.
pub fn slot_name(id: &str) -> String {
    let mut name: String = format!("rampart_{id}")
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect();
    name.truncate(63);
    name
}

/// The name of the WAL segment file that holds `lsn` on `timeline`, with segments of
/// `segment_bytes` (16 MiB unless `initdb --wal-segsize` said otherwise).
pub fn wal_file_name(timeline: u32, lsn: Lsn, segment_bytes: u64) -> String {
    let segment = lsn.0 / segment_bytes.max(1);
    let per_id = 0x1_0000_0000 / segment_bytes.max(1);
    format!("{timeline:08X}{:08X}{:08X}", segment / per_id, segment % per_id)
}

/// One transaction in a stretch of WAL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalTransaction {
    pub xid: u64,
    pub records: u64,
    /// `COMMIT <time>` or `ABORT <time>` as `pg_waldump` writes it; none when the WAL ends
    /// before it does (the transaction never finished there).
    pub end: Option<String>,
    /// The relations it changed, as `tablespace/database/relfilenode`.
    pub relations: std::collections::BTreeSet<String>,
}

/// What a stretch of WAL holds, read from `pg_waldump`'s output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WalSummary {
    pub records: u64,
    /// In the order each first appears.
    pub transactions: Vec<WalTransaction>,
}

impl WalSummary {
    /// Reads `pg_waldump`'s lines (`rmgr: Heap len (rec/tot): 59/59, tx: 735, lsn: ...,
    /// desc: INSERT off 2 ..., blkref #0: rel 1663/5/16388 blk 0`); anything else is skipped.
    pub fn read(text: &str) -> WalSummary {
        let mut summary = WalSummary::default();
        for line in text.lines().filter(|l| l.starts_with("rmgr: ")) {
            summary.records += 1;
            let xid = line
                .split_once(" tx: ")
                .and_then(|(_, rest)| rest.split(',').next())
                .and_then(|xid| xid.trim().parse::<u64>().ok())
                .unwrap_or(0);
            if xid == 0 {
                continue;
            }
            let at = match summary.transactions.iter().position(|t| t.xid == xid) {
                Some(at) => at,
                None => {
                    summary.transactions.push(WalTransaction {
                        xid,
                        ..WalTransaction::default()
                    });
                    summary.transactions.len() - 1
                }
            };
            let transaction = &mut summary.transactions[at];
            transaction.records += 1;
            let desc = line.split_once("desc: ").map_or("", |(_, desc)| desc);
            if line.starts_with("rmgr: Transaction") && (desc.starts_with("COMMIT") || desc.starts_with("ABORT")) {
                transaction.end = Some(desc.split(';').next().unwrap_or(desc).trim().to_string());
            }
            for part in desc.split("rel ").skip(1) {
                if let Some(relation) = part.split_whitespace().next() {
                    transaction.relations.insert(relation.trim_end_matches(',').to_string());
                }
            }
        }
        summary
    }

    /// Transactions that committed.
    pub fn committed(&self) -> usize {
        self.transactions
            .iter()
            .filter(|t| t.end.as_deref().is_some_and(|end| end.starts_with("COMMIT")))
            .count()
    }

    /// Every relation changed, once each.
    pub fn relations(&self) -> std::collections::BTreeSet<&str> {
        self.transactions
            .iter()
            .flat_map(|t| t.relations.iter().map(String::as_str))
            .collect()
    }

    /// One line per transaction: its id, how it ended, its records and relations (each
    /// with its name where `names` has one: `public.t (1663/5/16384)`).
    pub fn lines(&self, names: &BTreeMap<String, String>) -> Vec<String> {
        self.transactions
            .iter()
            .map(|t| {
                let relations: Vec<String> = t
                    .relations
                    .iter()
                    .map(|r| match names.get(r) {
                        Some(name) => format!("{name} ({r})"),
                        None => r.clone(),
                    })
                    .collect();
                format!(
                    "xid {}: {}, {} records, relations {}",
                    t.xid,
                    t.end.as_deref().unwrap_or("unfinished"),
                    t.records,
                    relations.join(" ")
                )
            })
            .collect()
    }
}

/// The slot a primary keeps for another region (`rampart_region_` and its name, as
/// [`slot_name`] spells it): whichever instance leads that region streams through it.
pub fn region_slot_name(region: &str) -> String {
    slot_name(&format!("region_{region}"))
}

/// One instance of a `postgres` service, as the choice of whom it streams from sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member<'a> {
    pub id: &'a str,
    pub region: &'a str,
    pub priority: u32,
    /// Healthy by its own region's verdict (another region's verdicts are not known here).
    pub up: bool,
}

/// Whom an instance streams WAL from, and through which of that instance's slots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream<'a> {
    pub id: &'a str,
    pub slot: String,
    /// Another replica (in its own region), not the primary.
    pub cascade: bool,
}

/// Who streams from whom in a `postgres` service: the instances of the primary's region
/// from the primary; in every other region, one *lead* (its healthy instance with the
/// highest priority, then the first id; the first by priority when none is healthy) from
/// the primary, through that region's slot on it, and the region's other instances from
/// the lead (cascading replication): WAL crosses to each region once.
#[derive(Debug, Clone)]
pub struct Topology<'a> {
    pub members: Vec<Member<'a>>,
    pub primary: Option<&'a str>,
}

impl<'a> Topology<'a> {
    fn member(&self, id: &str) -> Option<&Member<'a>> {
        self.members.iter().find(|m| m.id == id)
    }

    fn primary_region(&self) -> Option<&'a str> {
        self.primary.and_then(|id| self.member(id)).map(|m| m.region)
    }

    /// The replicas a quorum-mode `primary` waits for: the instances of `region` (the
    /// primary region) that may be promoted (priority above 0), but itself.
    pub fn quorum_members(&self, region: &str, primary: Option<&str>) -> Vec<&'a str> {
        self.members
            .iter()
            .filter(|m| m.region == region && m.priority > 0 && Some(m.id) != primary)
            .map(|m| m.id)
            .collect()
    }

    /// The instance of `region` that streams from the primary for the whole region.
    pub fn lead(&self, region: &str) -> Option<&'a str> {
        let rank = |m: &&Member<'a>| (m.priority, std::cmp::Reverse(m.id));
        let of_region = || self.members.iter().filter(|m| m.region == region && m.priority > 0);
        of_region()
            .filter(|m| m.up)
            .max_by_key(rank)
            .or_else(|| of_region().max_by_key(rank))
            .map(|m| m.id)
    }

    /// Whom instance `id` streams from: none for the primary, or with no primary.
    pub fn upstream(&self, id: &str) -> Option<Upstream<'a>> {
        let primary = self.primary?;
        let member = self.member(id)?;
        if id == primary {
            return None;
        }
        if Some(member.region) == self.primary_region() {
            return Some(Upstream {
                id: primary,
                slot: slot_name(id),
                cascade: false,
            });
        }
        match self.lead(member.region) {
            Some(lead) if lead != id => Some(Upstream {
                id: lead,
                slot: slot_name(id),
                cascade: true,
            }),
            _ => Some(Upstream {
                id: primary,
                slot: region_slot_name(member.region),
                cascade: false,
            }),
        }
    }

    /// The slots instance `id` keeps for those that stream from it: the primary, one per
    /// instance of its region and one per other region; a region's lead, one per other
    /// instance of its region; anyone else, none. (The primary keeps every region's slot,
    /// not the slot of whichever instance leads it: that region's health is not known here.)
    pub fn slots_kept_by(&self, id: &str) -> Vec<String> {
        let Some(member) = self.member(id) else {
            return Vec::new();
        };
        let mut slots = Vec::new();
        if self.primary == Some(id) {
            for other in &self.members {
                if other.id == id {
                    continue;
                }
                let slot = if other.region == member.region {
                    slot_name(other.id)
                } else {
                    region_slot_name(other.region)
                };
                if !slots.contains(&slot) {
                    slots.push(slot);
                }
            }
        } else {
            for other in &self.members {
                if other.id != id && self.upstream(other.id).is_some_and(|u| u.id == id) {
                    slots.push(slot_name(other.id));
                }
            }
        }
        slots
    }
}

/// A `postgresql.conf` value, quoted.
fn quoted(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// The settings Rampart writes for an instance (`rampart.conf`, included at the end of its
/// `postgresql.conf`): replication-ready defaults, then the policy's `parameters` (which
/// may change the defaults), then what Rampart manages. `upstream` is the
/// `primary_conninfo` and slot of a replica (none for a primary, or a replica with nobody
/// to follow yet); `synchronous_standby_names` is the primary's.
/// Where one instance stands, as `rampart.conf` says beside the policy's settings.
#[derive(Debug, Clone, Copy, Default)]
pub struct Placement<'a> {
    pub port: u16,
    /// The Unix socket's directory (empty: none).
    pub socket_dir: &'a str,
    /// A replica's `primary_conninfo` and slot.
    pub upstream: Option<(&'a str, &'a str)>,
    /// Whom a primary waits for.
    pub synchronous_standby_names: &'a str,
    /// Where finished WAL goes (`archive_mode = on`), when this node backs up.
    pub archive_command: Option<&'a str>,
}

/// How long a WAL segment may stay unarchived while the primary writes little (a
/// point-in-time restore reaches only archived WAL); a policy's `parameters` may say
/// otherwise.
pub const ARCHIVE_TIMEOUT: &str = "60s";

/// The text of `rampart.conf`: the policy's parameters over Rampart's defaults, then the
/// settings Rampart manages (which a policy may not set).
pub fn settings(pg: &Postgres, at: &Placement) -> String {
    let mut lines = vec!["# Written by Rampart for this instance: edits are overwritten.".to_string()];
    let mut defaults = vec![
        ("wal_level", "replica"),
        ("max_wal_senders", "10"),
        ("max_replication_slots", "10"),
        ("wal_log_hints", "on"),
        ("max_slot_wal_keep_size", "1GB"),
        ("wal_keep_size", "128MB"),
        ("unix_socket_directories", at.socket_dir),
    ];
    if at.archive_command.is_some() {
        defaults.push(("archive_timeout", ARCHIVE_TIMEOUT));
    }
    for (name, value) in defaults {
        if !pg.parameters.contains_key(name) {
            lines.push(format!("{name} = {}", quoted(value)));
        }
    }
    for (name, value) in &pg.parameters {
        lines.push(format!("{name} = {}", quoted(value)));
    }
    let port = at.port.to_string();
    let mut managed = vec![
        ("port", port.as_str()),
        ("listen_addresses", "*"),
        ("hot_standby", "on"),
        ("synchronous_standby_names", at.synchronous_standby_names),
    ];
    if let Some(command) = at.archive_command {
        managed.push(("archive_mode", "on"));
        managed.push(("archive_command", command));
    }
    if let Some((conninfo, slot)) = at.upstream {
        managed.push(("primary_conninfo", conninfo));
        managed.push(("primary_slot_name", slot));
    }
    for (name, value) in managed {
        lines.push(format!("{name} = {}", quoted(value)));
    }
    lines.join("\n") + "\n"
}

/// Where a WAL file stands in the WAL, whatever its timeline: the 16 hex digits after the
/// timeline of a segment (`000000020000000A000000FF`), of its `.partial` copy or of a
/// `.backup` label; none for a timeline's `.history` file.
pub fn wal_position(name: &str) -> Option<&str> {
    let head = name.get(..24)?;
    if !head.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(&head[8..])
}

/// Whether `name` is a whole WAL segment (24 hex digits), which recovery replays.
pub fn is_wal_segment(name: &str) -> bool {
    name.len() == 24 && wal_position(name).is_some()
}

/// Whether `name` is a timeline history file (`00000002.history`), which recovery needs
/// to follow a failover.
pub fn is_timeline_history(name: &str) -> bool {
    name.strip_suffix(".history")
        .is_some_and(|t| t.len() == 8 && t.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The `pg_hba.conf` Rampart writes: password (SCRAM) logins for every role from anywhere,
/// replication connections for the replication role.
pub fn hba(pg: &Postgres) -> String {
    let replication = quote_ident(&pg.replication_user.name);
    format!(
        "# Written by Rampart: edits are overwritten.\n\
         local all all scram-sha-256\n\
         host all all 0.0.0.0/0 scram-sha-256\n\
         host all all ::/0 scram-sha-256\n\
         host replication {replication} 0.0.0.0/0 scram-sha-256\n\
         host replication {replication} ::/0 scram-sha-256\n"
    )
}

/// A SQL string literal.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PostgresSpec {
        let credentials = |name: &str| CredentialsSpec {
            name: Some(name.into()),
            password_file: Some(format!("/etc/rampart/{name}.pw")),
            password_env: None,
        };
        PostgresSpec {
            bin_dir: Some("/usr/lib/postgresql/15/bin".into()),
            data_dir: Some("/var/lib/rampart/pg/{instance}".into()),
            superuser: Some(credentials("postgres")),
            replication_user: Some(credentials("replicator")),
            ..PostgresSpec::default()
        }
    }

    fn refused(spec: &PostgresSpec) -> String {
        spec.validate().expect_err("refused").field
    }

    #[test]
    fn defaults_and_the_data_dir_of_each_instance() {
        let pg = spec().validate().expect("valid");
        assert_eq!(pg.port, PORT_DEFAULT);
        assert_eq!((pg.synchronous, pg.fallback), (Synchronous::Off, Fallback::Block));
        assert_eq!(pg.data_dir_of("pg-1"), "/var/lib/rampart/pg/pg-1");
        assert_eq!(
            pg.superuser.password,
            PasswordSource::File("/etc/rampart/postgres.pw".into())
        );
    }

    #[test]
    fn each_bad_setting_is_refused_naming_its_field() {
        let mut s = spec();
        s.bin_dir = None;
        assert_eq!(refused(&s), "postgres.bin_dir");
        let mut s = spec();
        s.data_dir = Some("relative/dir".into());
        assert_eq!(refused(&s), "postgres.data_dir");
        let mut s = spec();
        s.synchronous = Some("always".into());
        assert_eq!(refused(&s), "postgres.synchronous");
        let mut s = spec();
        s.synchronous_fallback = Some("drop".into());
        assert_eq!(refused(&s), "postgres.synchronous_fallback");
        s.synchronous_fallback = Some("async".into());
        s.synchronous = Some("quorum".into());
        assert_eq!(refused(&s), "postgres.synchronous_fallback", "quorum mode blocks");
        let mut s = spec();
        s.port = Some(0);
        assert_eq!(refused(&s), "postgres.port");
        let mut s = spec();
        s.superuser = None;
        assert_eq!(refused(&s), "postgres.superuser");
        let mut s = spec();
        s.replication_user.as_mut().unwrap().password_env = Some("PW".into());
        assert_eq!(refused(&s), "postgres.replication_user.password_file");
        let mut s = spec();
        s.replication_user.as_mut().unwrap().name = Some("postgres".into());
        assert_eq!(refused(&s), "postgres.replication_user.name");
        let mut s = spec();
        s.superuser.as_mut().unwrap().name = Some("bad name".into());
        assert_eq!(refused(&s), "postgres.superuser.name");
        let mut s = spec();
        s.parameters = Some([("port".to_string(), "6000".to_string())].into());
        assert_eq!(refused(&s), "postgres.parameters.port");
        let mut s = spec();
        s.parameters = Some([("work_mem".to_string(), "4MB\nfsync = off".to_string())].into());
        assert_eq!(refused(&s), "postgres.parameters.work_mem");
    }

    #[test]
    fn wal_positions_parse_print_and_give_lag_in_bytes() {
        let lsn: Lsn = "16/B374D848".parse().expect("lsn");
        assert_eq!(lsn, Lsn(0x16_B374_D848));
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>(), Ok(Lsn(0)));
        let behind: Lsn = "16/B3740000".parse().expect("lsn");
        assert_eq!(behind.behind(lsn), 0xD848);
        assert_eq!(lsn.behind(behind), 0, "ahead is not behind");
        for bad in ["", "16", "/1", "1/", "G/1", "1/2/3", "123456789/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn synchronous_standby_names_follow_the_mode_and_the_fallback() {
        use Fallback::*;
        use Synchronous::*;
        assert_eq!(synchronous_standby_names(Off, Block, &["a"]), "");
        assert_eq!(
            synchronous_standby_names(On, Block, &["pg-2", "pg-3"]),
            "FIRST 1 (\"pg-2\", \"pg-3\")"
        );
        assert_eq!(
            synchronous_standby_names(Quorum, Block, &["pg-2", "pg-3"]),
            "ANY 1 (\"pg-2\", \"pg-3\")"
        );
        assert_eq!(
            synchronous_standby_names(Quorum, Block, &["a", "b", "c"]),
            "ANY 2 (\"a\", \"b\", \"c\")"
        );
        assert_eq!(
            [1, 2, 3, 4, 5].map(quorum_size),
            [1, 1, 2, 2, 3],
            "half the replicas, rounded up"
        );
        // No replica to wait for: block waits for one that is not there, async for none.
        assert_eq!(
            synchronous_standby_names(On, Block, &[]),
            "FIRST 1 (\"rampart: no synchronous replica\")"
        );
        assert_eq!(synchronous_standby_names(On, Async, &[]), "");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn quorum_mode_promotes_the_most_wal_among_enough_settled_members() {
        let at = |text: &str| Some(text.parse::<Lsn>().unwrap());
        let member = |id, settled| QuorumMember { id, settled };
        // Two members, any 1 acknowledges: both must be settled, the one with more WAL wins.
        let both = [member("a", at("0/500")), member("b", at("0/400"))];
        assert!(quorum_promotable(&both, "a"));
        assert!(!quorum_promotable(&both, "b"), "b may lack what a acknowledged");
        let one = [member("a", at("0/500")), member("b", None)];
        assert!(!quorum_promotable(&one, "a"), "b may hold a commit a lacks");
        // Three members, any 2 acknowledge: any 2 settled are enough.
        let three = [member("a", None), member("b", at("0/700")), member("c", at("0/700"))];
        assert!(quorum_promotable(&three, "b") && quorum_promotable(&three, "c"));
        assert!(!quorum_promotable(&three, "a"), "not settled");
        let lone = [member("a", None), member("b", at("0/700")), member("c", None)];
        assert!(!quorum_promotable(&lone, "b"));
        assert!(!quorum_promotable(&[], "a"));
        assert!(!quorum_promotable(&both, "z"), "not a member");
    }

    /// Over random histories: a commit acknowledged by any k of N members, then the
    /// primary lost and any N - k + 1 members settled: whoever the rule lets be promoted
    /// holds every acknowledged commit.
    #[test]
    fn a_quorum_promotion_never_loses_an_acknowledged_commit() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |bound: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % bound
        };
        let ids = ["a", "b", "c", "d", "e"];
        for _ in 0..5_000 {
            let n = 1 + next(5) as usize;
            let k = quorum_size(n);
            // Each member's received WAL; the acknowledged end is the k-th highest.
            let received: Vec<u64> = (0..n).map(|_| next(1_000)).collect();
            let mut sorted = received.clone();
            sorted.sort_unstable_by(|a, b| b.cmp(a));
            let acknowledged = sorted[k - 1];
            let members: Vec<QuorumMember> = (0..n)
                .map(|i| QuorumMember {
                    id: ids[i],
                    settled: (next(3) > 0).then_some(Lsn(received[i])),
                })
                .collect();
            for (i, id) in ids.iter().enumerate().take(n) {
                if quorum_promotable(&members, id) {
                    assert!(
                        received[i] >= acknowledged,
                        "{id} promoted with {} of {acknowledged} acknowledged: {members:?}",
                        received[i]
                    );
                }
            }
        }
    }

    #[test]
    fn ports_hosts_and_slot_names_of_instances() {
        let pg = spec().validate().expect("valid");
        assert_eq!(listen_port(&pg, "10.0.0.1:6543"), 6543);
        assert_eq!(listen_port(&pg, "db.example"), PORT_DEFAULT);
        assert_eq!(host_of("10.0.0.1:6543"), "10.0.0.1");
        assert_eq!(host_of("[::1]:5432"), "::1");
        assert_eq!(slot_name("PG-1.east"), "rampart_pg_1_east");
        assert_eq!(slot_name(&"x".repeat(100)).len(), 63);
    }

    #[test]
    fn settings_put_the_managed_ones_last_and_let_parameters_replace_defaults() {
        let mut s = spec();
        s.parameters = Some([("wal_keep_size".to_string(), "1GB".to_string())].into());
        let pg = s.validate().expect("valid");
        let text = settings(
            &pg,
            &Placement {
                port: 6000,
                socket_dir: "/d",
                upstream: Some(("host='p' user='r'", "rampart_b")),
                ..Placement::default()
            },
        );
        assert!(text.contains("wal_keep_size = '1GB'\n"), "{text}");
        assert!(!text.contains("wal_keep_size = '128MB'"), "{text}");
        assert!(text.contains("primary_conninfo = 'host=''p'' user=''r'''\n"), "{text}");
        assert!(text.ends_with("primary_slot_name = 'rampart_b'\n"), "{text}");
        let primary = settings(
            &pg,
            &Placement {
                port: 6000,
                socket_dir: "/d",
                synchronous_standby_names: "FIRST 1 (\"b\")",
                archive_command: Some("rampart backup wal-push %p %f"),
                ..Placement::default()
            },
        );
        assert!(!text.contains("archive"), "{text}");
        assert!(
            primary.contains("archive_mode = 'on'\narchive_command = 'rampart backup wal-push %p %f'\n"),
            "{primary}"
        );
        assert!(primary.contains("archive_timeout = '60s'\n"), "{primary}");
        assert!(!primary.contains("primary_conninfo"), "{primary}");
        assert!(
            primary.contains("synchronous_standby_names = 'FIRST 1 (\"b\")'"),
            "{primary}"
        );
        assert!(hba(&pg).contains("host replication \"replicator\" 0.0.0.0/0 scram-sha-256"));
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn wal_file_names_place_segments_across_timelines() {
        assert_eq!(wal_position("000000020000000A000000FF"), Some("0000000A000000FF"));
        assert_eq!(
            wal_position("000000010000000000000003.partial"),
            Some("0000000000000003")
        );
        assert_eq!(wal_position("00000002.history"), None);
        assert!(is_wal_segment("000000020000000A000000FF"));
        assert!(!is_wal_segment("000000010000000000000003.partial"));
        assert!(!is_wal_segment("000000010000000000000003.00000028.backup"));
        assert!(is_timeline_history("00000002.history"));
        assert!(!is_timeline_history("0002.history"));
        assert!(!is_timeline_history("000000020000000A000000FF"));
    }

    #[test]
    fn each_region_streams_once_from_the_primary_and_cascades_inside() {
        let member = |id, region, priority, up| Member {
            id,
            region,
            priority,
            up,
        };
        let mut topology = Topology {
            members: vec![
                member("a1", "east", 100, true),
                member("a2", "east", 100, true),
                member("b1", "west", 100, false),
                member("b2", "west", 50, true),
                member("b3", "west", 100, true),
                member("c1", "south", 0, true),
            ],
            primary: Some("a1"),
        };
        let up = |t: &Topology, id: &str| t.upstream(id).map(|u| (u.id.to_string(), u.slot, u.cascade));
        assert_eq!(up(&topology, "a1"), None);
        assert_eq!(up(&topology, "a2"), Some(("a1".into(), "rampart_a2".into(), false)));
        // West's lead: the healthy one with the highest priority (b1 is down).
        assert_eq!(topology.lead("west"), Some("b3"));
        assert_eq!(
            up(&topology, "b3"),
            Some(("a1".into(), "rampart_region_west".into(), false))
        );
        assert_eq!(up(&topology, "b1"), Some(("b3".into(), "rampart_b1".into(), true)));
        assert_eq!(up(&topology, "b2"), Some(("b3".into(), "rampart_b2".into(), true)));
        // Priority 0 never leads: south's only instance follows the primary itself.
        assert_eq!(topology.lead("south"), None);
        assert_eq!(
            up(&topology, "c1"),
            Some(("a1".into(), "rampart_region_south".into(), false))
        );
        assert_eq!(
            topology.slots_kept_by("a1"),
            ["rampart_a2", "rampart_region_west", "rampart_region_south"]
        );
        assert_eq!(topology.slots_kept_by("b3"), ["rampart_b1", "rampart_b2"]);
        assert!(topology.slots_kept_by("b1").is_empty());

        // Nobody healthy in west: the first by priority, then id, leads.
        for m in topology.members.iter_mut().filter(|m| m.region == "west") {
            m.up = false;
        }
        assert_eq!(topology.lead("west"), Some("b1"));
        // A region failover: west's instance is the primary, east cascades from its lead.
        topology.primary = Some("b3");
        assert_eq!(up(&topology, "b1"), Some(("b3".into(), "rampart_b1".into(), false)));
        assert_eq!(
            up(&topology, "a1"),
            Some(("b3".into(), "rampart_region_east".into(), false))
        );
        assert_eq!(up(&topology, "a2"), Some(("a1".into(), "rampart_a2".into(), true)));
        topology.primary = None;
        assert_eq!(up(&topology, "a2"), None);
    }

    #[test]
    fn wal_file_names_and_waldump_summaries() {
        let lsn: Lsn = "0/3055100".parse().unwrap();
        assert_eq!(wal_file_name(1, lsn, 16 << 20), "000000010000000000000003");
        let far: Lsn = "1A/FF000000".parse().unwrap();
        assert_eq!(wal_file_name(2, far, 16 << 20), "000000020000001A000000FF");
        assert_eq!(wal_file_name(2, far, 64 << 20), "000000020000001A0000003F");
        let dump = "\
rmgr: Standby     len (rec/tot):     50/    50, tx:          0, lsn: 0/03000028, prev 0/00000000, desc: RUNNING_XACTS
rmgr: Heap        len (rec/tot):     59/    59, tx:        735, lsn: 0/03055000, prev 0/03054FB8, desc: INSERT+INIT off 1 flags 0x00, blkref #0: rel 1663/5/16388 blk 0
rmgr: Btree       len (rec/tot):     64/    64, tx:        735, lsn: 0/030533C8, prev 0/03053380, desc: INSERT_LEAF off 113, blkref #0: rel 1663/5/16391 blk 10
rmgr: Transaction len (rec/tot):     34/    34, tx:        735, lsn: 0/03055080, prev 0/03055040, desc: COMMIT 2026-12-07 21:52:30.009784 UTC
rmgr: Heap        len (rec/tot):     59/    59, tx:        736, lsn: 0/03055100, prev 0/03055080, desc: INSERT off 2 flags 0x00, blkref #0: rel 1663/5/16388 blk 0
rmgr: Transaction len (rec/tot):     70/    70, tx:        736, lsn: 0/03055140, prev 0/03055100, desc: ABORT 2026-12-07 21:52:31.000001 UTC; rels: base/5/16388
rmgr: Heap        len (rec/tot):     59/    59, tx:        737, lsn: 0/03055180, prev 0/03055140, desc: INSERT off 3 flags 0x00, blkref #0: rel 1663/5/16388 blk 0
pg_waldump: error: error in WAL record at 0/30551C0: invalid record length at 0/3055200: wanted 24, got 0
";
        let summary = WalSummary::read(dump);
        assert_eq!(summary.records, 7);
        assert_eq!(summary.transactions.len(), 3);
        assert_eq!(summary.committed(), 1);
        assert_eq!(
            summary.relations().into_iter().collect::<Vec<_>>(),
            ["1663/5/16388", "1663/5/16391"]
        );
        let names = [("1663/5/16391".to_string(), "public.t_pkey".to_string())].into();
        assert_eq!(
            summary.lines(&names),
            [
                "xid 735: COMMIT 2026-12-07 21:52:30.009784 UTC, 3 records, relations 1663/5/16388 public.t_pkey (1663/5/16391)",
                "xid 736: ABORT 2026-12-07 21:52:31.000001 UTC, 2 records, relations 1663/5/16388",
                "xid 737: unfinished, 1 records, relations 1663/5/16388",
            ]
        );
    }

    #[test]
    fn connection_strings_quote_every_value() {
        let info = conninfo(&[
            ("host", "10.0.0.1"),
            ("password", "it's \\ here"),
            ("application_name", "pg-2"),
        ]);
        assert_eq!(
            info,
            "host='10.0.0.1' password='it\\'s \\\\ here' application_name='pg-2'"
        );
    }
}
