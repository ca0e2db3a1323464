//! The service policy and instance registration of DESIGN.md ("Service policy"), as they
//! arrive (from `[services.*]` in node config or `PUT /v1/services/...`: text durations,
//! optional fields) and as the region stores them (validated, units in the names).
//!
//! [`PolicySpec::validate`] and [`InstanceSpec::validate`] refuse bad input naming the
//! field by its path (`checks[0].interval`), the value and what is allowed, so the API's
//! 400 and the node's exit 2 say the same thing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::field::FieldError;
use crate::field::{duration_ms, field_error, number_in};
use crate::health::{Confirm, Thresholds};

/// The service policy's rules for automatic promotion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Never promote an instance further behind than this (`max_lag_on_failover`).
    pub lag_revisions_max: u64,
    /// Only the synchronous standby may be promoted.
    pub synchronous_only: bool,
}

/// Flap damping: how many times an instance may lose the primary role within a window and
/// still be promoted automatically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Damping {
    pub losses_max: u32,
    pub window_ms: u64,
}

/// Bounds that keep a policy sane: probes neither hammer an instance nor go blind.
const INTERVAL_MS_MIN: u64 = 50;
const INTERVAL_MS_MAX: u64 = 3_600_000;
const THRESHOLD_MAX: u32 = 100;
const PROBERS_MAX: usize = 100;
const HOOK_TIMEOUT_MS_DEFAULT: u64 = 30_000;
const HOOK_TIMEOUT_MS_MAX: u64 = 3_600_000;
const NAME_BYTES_MAX: usize = 128;

/// A service or instance name: what fits a path segment, a metric label and a file name.
pub fn check_name(field: &str, name: &str) -> Result<(), FieldError> {
    let ok = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(field_error(
            field,
            name,
            format!("1 to {NAME_BYTES_MAX} letters, digits, '-', '_' or '.'"),
        ))
    }
}

/// One service's policy as written by a user.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySpec {
    /// `active-passive` (default) or `active-active`.
    pub mode: Option<String>,
    #[serde(default)]
    pub checks: Vec<CheckSpec>,
    /// `majority` (default) or `any`.
    pub confirm: Option<String>,
    /// The nodes (ids) that probe this service's instances, and among which `confirm`
    /// counts; every member by default.
    pub probers: Option<Vec<u64>>,
    /// Never promote an instance further behind than this many revisions (default 0).
    pub max_lag_on_failover: Option<u64>,
    /// Only the synchronous standby may be promoted (default false).
    pub synchronous: Option<bool>,
    pub recovery: Option<RecoverySpec>,
    pub hooks: Option<HooksSpec>,
    pub flap_damping: Option<DampingSpec>,
    /// The service's own data in the region's backups: `command` runs on the primary's
    /// node and its output is stored beside the state; `restore` reads it back on stdin.
    pub backup: Option<ServiceBackupSpec>,
    /// `generic` (default: any program, checked by `checks`) or `postgres` (the node runs
    /// PostgreSQL itself, see [`crate::postgres`]).
    pub kind: Option<String>,
    /// `[services.NAME.postgres]`: required with `kind = "postgres"`, refused otherwise.
    pub postgres: Option<crate::postgres::PostgresSpec>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceBackupSpec {
    pub command: String,
    pub restore: Option<String>,
    /// How long `command` may run (default 1h).
    pub timeout: Option<String>,
}

/// A validated `backup = {...}` of a service policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceBackup {
    pub command: String,
    pub restore: Option<String>,
    pub timeout_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckSpec {
    /// `http`, `tcp`, `exec` or `heartbeat`.
    pub kind: String,
    /// URL (`http`) or `HOST:PORT` (`tcp`); empty means the instance's endpoint.
    pub target: Option<String>,
    /// `http` without a target: the path asked of each instance's endpoint (default `/`).
    pub path: Option<String>,
    /// Shell command (`exec`); exit status 0 is healthy.
    pub command: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
    pub start_period: Option<String>,
    /// `heartbeat`: the instance must call its heartbeat path at least this often.
    pub ttl: Option<String>,
    /// `http`: accepted statuses, `200-399` by default, or one code such as `204`.
    pub status: Option<String>,
    /// `http`: the body must contain this.
    pub body_contains: Option<String>,
    /// `liveness` (a failing primary is failed over), `readiness` (a failing instance
    /// leaves traffic) or `both` (default).
    pub purpose: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverySpec {
    /// `restart` (supervised instances: restart before failing over) or `none`.
    pub action: String,
    pub max_retries: Option<u32>,
    pub window: Option<String>,
    /// How long a restarted primary has to come back up before it is failed over
    /// (default 30s; `0s` fails over at once, as Patroni's `primary_start_timeout`).
    pub start_timeout: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HooksSpec {
    pub on_promote: Option<String>,
    pub on_demote: Option<String>,
    pub on_role_change: Option<String>,
    pub timeout: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DampingSpec {
    pub max_losses: u32,
    pub window: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// One primary; the others are replicas, one of which is promoted on failure.
    ActivePassive,
    /// Every healthy instance serves.
    ActiveActive,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Purpose {
    Liveness,
    Readiness,
    Both,
}

impl Purpose {
    pub fn liveness(self) -> bool {
        matches!(self, Purpose::Liveness | Purpose::Both)
    }

    pub fn readiness(self) -> bool {
        matches!(self, Purpose::Readiness | Purpose::Both)
    }
}

/// Externally tagged (`{"http": {...}}`): the Raft log's postcard encoding cannot carry
/// internally tagged enums.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Probe {
    Http {
        target: Option<String>,
        /// Used with the instance's endpoint when there is no target.
        path: String,
        status_min: u16,
        status_max: u16,
        body_contains: Option<String>,
    },
    Tcp {
        target: Option<String>,
    },
    Exec {
        command: String,
    },
    Heartbeat {
        ttl_ms: u64,
    },
    /// A `postgres` service's SQL check (added last: no new data dir format): the node
    /// logs in as the superuser and asks `SELECT pg_is_in_recovery()`; healthy when the
    /// answer fits the role the registry gives the instance (a primary not in recovery, a
    /// replica in recovery).
    Postgres,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    pub probe: Probe,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
    pub start_period_ms: u64,
    pub purpose: Purpose,
}

impl Check {
    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            rise: self.rise,
            fall: self.fall,
            start_period_ms: self.start_period_ms,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recovery {
    pub restart: bool,
    pub max_retries: u32,
    pub window_ms: u64,
    /// While its node restarts it within the budget, a primary that is down keeps its role
    /// this long after each restart.
    pub start_timeout_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hooks {
    pub on_promote: Option<String>,
    pub on_demote: Option<String>,
    pub on_role_change: Option<String>,
    pub timeout_ms: u64,
}

/// What a service's instances are, as the region stores it (beside the policy, data dir
/// format 4). Externally tagged: `"generic"` or `{"postgres": {...}}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Any program: Rampart checks it with the policy's `checks` and runs its hooks.
    #[default]
    Generic,
    /// PostgreSQL, run by the nodes that host its instances.
    Postgres(Box<crate::postgres::Postgres>),
}

impl Kind {
    pub fn postgres(&self) -> Option<&crate::postgres::Postgres> {
        match self {
            Kind::Generic => None,
            Kind::Postgres(postgres) => Some(postgres),
        }
    }
}

/// A validated policy, as the region stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub mode: Mode,
    pub checks: Vec<Check>,
    pub confirm: Confirm,
    /// Node ids that probe; empty: every voter of the region.
    pub probers: Vec<u64>,
    pub max_lag_on_failover: u64,
    pub synchronous: bool,
    pub recovery: Recovery,
    pub hooks: Hooks,
    pub damping: Damping,
    pub backup: Option<ServiceBackup>,
}

impl Policy {
    pub fn rules(&self) -> Rules {
        Rules {
            lag_revisions_max: self.max_lag_on_failover,
            synchronous_only: self.synchronous,
        }
    }
}

fn threshold(field: &str, value: Option<u32>, default: u32) -> Result<u32, FieldError> {
    match value.unwrap_or(default) {
        n @ 1..=THRESHOLD_MAX => Ok(n),
        n => Err(field_error(
            field,
            n.to_string(),
            format!("a whole number from 1 to {THRESHOLD_MAX}"),
        )),
    }
}

fn status_range(field: &str, text: Option<&str>) -> Result<(u16, u16), FieldError> {
    let Some(text) = text else { return Ok((200, 399)) };
    let bad = || {
        field_error(
            field,
            text,
            "a status such as 200, or a range such as 200-299, within 100-599",
        )
    };
    let (low, high) = match text.split_once('-') {
        Some((low, high)) => (low.trim().parse::<u16>(), high.trim().parse::<u16>()),
        None => (text.trim().parse::<u16>(), text.trim().parse::<u16>()),
    };
    match (low, high) {
        (Ok(low), Ok(high)) if (100..=599).contains(&low) && (low..=599).contains(&high) => Ok((low, high)),
        _ => Err(bad()),
    }
}

impl CheckSpec {
    fn validate(&self, at: &str) -> Result<Check, FieldError> {
        let f = |name: &str| format!("{at}.{name}");
        let interval_ms = duration_ms(
            &f("interval"),
            self.interval.as_deref(),
            1000,
            INTERVAL_MS_MIN,
            INTERVAL_MS_MAX,
        )?;
        let timeout_ms = duration_ms(
            &f("timeout"),
            self.timeout.as_deref(),
            interval_ms.min(1000) / 2,
            10,
            INTERVAL_MS_MAX,
        )?;
        if timeout_ms > interval_ms {
            return Err(field_error(
                f("timeout"),
                self.timeout.clone().unwrap_or_default(),
                format!("at most the interval ({interval_ms}ms): probes must not overlap"),
            ));
        }
        let text_field = |name: &str, value: &Option<String>| -> Result<String, FieldError> {
            match value.as_deref().map(str::trim) {
                Some(v) if !v.is_empty() => Ok(v.to_string()),
                _ => Err(field_error(f(name), "", format!("required for kind {:?}", self.kind))),
            }
        };
        let probe = match self.kind.as_str() {
            "http" => {
                let (status_min, status_max) = status_range(&f("status"), self.status.as_deref())?;
                if let Some(target) = &self.target {
                    if !(target.starts_with("http://") || target.starts_with("https://")) {
                        return Err(field_error(f("target"), target, "an http:// or https:// URL"));
                    }
                }
                let path = self.path.clone().unwrap_or_else(|| "/".to_string());
                if !path.starts_with('/') {
                    return Err(field_error(f("path"), &path, "a path starting with /, e.g. /health"));
                }
                Probe::Http {
                    target: self.target.clone(),
                    path,
                    status_min,
                    status_max,
                    body_contains: self.body_contains.clone(),
                }
            }
            "tcp" => Probe::Tcp {
                target: self.target.clone(),
            },
            "exec" => Probe::Exec {
                command: text_field("command", &self.command)?,
            },
            "heartbeat" => Probe::Heartbeat {
                ttl_ms: match &self.ttl {
                    Some(ttl) => duration_ms(&f("ttl"), Some(ttl), 0, INTERVAL_MS_MIN, INTERVAL_MS_MAX)?,
                    None => return Err(field_error(f("ttl"), "", "required for kind \"heartbeat\", e.g. 3s")),
                },
            },
            "postgres" => Probe::Postgres,
            other => {
                return Err(field_error(
                    f("kind"),
                    other,
                    "one of http, tcp, exec, heartbeat, postgres",
                ))
            }
        };
        let purpose = match self.purpose.as_deref() {
            None | Some("both") => Purpose::Both,
            Some("liveness") => Purpose::Liveness,
            Some("readiness") => Purpose::Readiness,
            Some(other) => return Err(field_error(f("purpose"), other, "one of liveness, readiness, both")),
        };
        Ok(Check {
            probe,
            interval_ms,
            timeout_ms,
            rise: threshold(&f("rise"), self.rise, 2)?,
            fall: threshold(&f("fall"), self.fall, 3)?,
            start_period_ms: duration_ms(&f("start_period"), self.start_period.as_deref(), 0, 0, INTERVAL_MS_MAX)?,
            purpose,
        })
    }
}

/// A service as declared: its policy and what its instances are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    pub policy: Policy,
    pub kind: Kind,
}

impl PolicySpec {
    /// The policy and the kind, both validated. A `postgres` service without checks gets
    /// the SQL check (`{kind = "postgres"}`, every second, down after 3 failures); only a
    /// `postgres` service may have one.
    pub fn define(&self) -> Result<Definition, FieldError> {
        let mut policy = self.validate()?;
        let kind = self.validate_kind()?;
        let sql_check = policy.checks.iter().position(|c| c.probe == Probe::Postgres);
        match (&kind, sql_check) {
            (Kind::Generic, Some(i)) => {
                return Err(field_error(
                    format!("checks[{i}].kind"),
                    "postgres",
                    "only in a service of kind \"postgres\"",
                ))
            }
            (Kind::Postgres(_), _) if policy.backup.is_some() => {
                return Err(field_error(
                    "backup",
                    "(a table)",
                    "none in a service of kind \"postgres\": pg_basebackup and WAL archiving back it up",
                ))
            }
            (Kind::Postgres(_), None) if policy.checks.is_empty() => {
                let check = CheckSpec {
                    kind: "postgres".into(),
                    ..CheckSpec::default()
                };
                policy.checks.push(check.validate("checks[0]")?);
            }
            _ => {}
        }
        Ok(Definition { policy, kind })
    }

    /// The service's kind: `postgres` needs its `[postgres]` table, and only it may have one.
    pub fn validate_kind(&self) -> Result<Kind, FieldError> {
        match (self.kind.as_deref(), &self.postgres) {
            (None | Some("generic"), None) => Ok(Kind::Generic),
            (None | Some("generic"), Some(_)) => {
                Err(field_error("postgres", "(a table)", "only with kind = \"postgres\""))
            }
            (Some("postgres"), Some(spec)) => Ok(Kind::Postgres(Box::new(spec.validate()?))),
            (Some("postgres"), None) => Err(field_error(
                "postgres",
                "(missing)",
                "a [postgres] table with at least bin_dir and data_dir",
            )),
            (Some(other), _) => Err(field_error("kind", other, "generic or postgres")),
        }
    }

    pub fn validate(&self) -> Result<Policy, FieldError> {
        let mode = match self.mode.as_deref() {
            None | Some("active-passive") => Mode::ActivePassive,
            Some("active-active") => Mode::ActiveActive,
            Some(other) => return Err(field_error("mode", other, "active-passive or active-active")),
        };
        let checks = self
            .checks
            .iter()
            .enumerate()
            .map(|(i, c)| c.validate(&format!("checks[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let confirm = match self.confirm.as_deref() {
            None | Some("majority") => Confirm::Majority,
            Some("any") => Confirm::Any,
            Some(other) => return Err(field_error("confirm", other, "majority or any")),
        };
        let probers = self.probers.clone().unwrap_or_default();
        let mut unique = probers.clone();
        unique.sort_unstable();
        unique.dedup();
        if self.probers.as_ref().is_some_and(|p| p.is_empty())
            || unique.len() != probers.len()
            || probers.contains(&0)
            || probers.len() > PROBERS_MAX
        {
            return Err(field_error(
                "probers",
                format!("{probers:?}"),
                format!("1 to {PROBERS_MAX} distinct node ids (leave it out for every node)"),
            ));
        }
        let recovery = match &self.recovery {
            None => Recovery {
                restart: false,
                max_retries: 0,
                window_ms: 60_000,
                start_timeout_ms: 0,
            },
            Some(spec) => Recovery {
                restart: match spec.action.as_str() {
                    "restart" => true,
                    "none" => false,
                    other => return Err(field_error("recovery.action", other, "restart or none")),
                },
                max_retries: number_in("recovery.max_retries", spec.max_retries.unwrap_or(3), 0..=100)?,
                window_ms: duration_ms("recovery.window", spec.window.as_deref(), 60_000, 1000, 86_400_000)?,
                start_timeout_ms: duration_ms(
                    "recovery.start_timeout",
                    spec.start_timeout.as_deref(),
                    30_000,
                    0,
                    3_600_000,
                )?,
            },
        };
        let hooks = match &self.hooks {
            None => Hooks {
                timeout_ms: HOOK_TIMEOUT_MS_DEFAULT,
                ..Hooks::default()
            },
            Some(spec) => Hooks {
                on_promote: spec.on_promote.clone().filter(|c| !c.trim().is_empty()),
                on_demote: spec.on_demote.clone().filter(|c| !c.trim().is_empty()),
                on_role_change: spec.on_role_change.clone().filter(|c| !c.trim().is_empty()),
                timeout_ms: duration_ms(
                    "hooks.timeout",
                    spec.timeout.as_deref(),
                    HOOK_TIMEOUT_MS_DEFAULT,
                    100,
                    HOOK_TIMEOUT_MS_MAX,
                )?,
            },
        };
        let damping = match &self.flap_damping {
            None => Damping {
                losses_max: 3,
                window_ms: 3_600_000,
            },
            Some(spec) => Damping {
                losses_max: spec.max_losses,
                window_ms: duration_ms("flap_damping.window", Some(&spec.window), 0, 1000, 7 * 86_400_000)?,
            },
        };
        let backup = match &self.backup {
            None => None,
            Some(spec) if spec.command.trim().is_empty() || spec.command.len() > 4096 => {
                return Err(field_error(
                    "backup.command",
                    &spec.command,
                    "a shell command of 1 to 4096 bytes",
                ))
            }
            Some(spec) => Some(ServiceBackup {
                command: spec.command.clone(),
                restore: spec.restore.clone().filter(|c| !c.trim().is_empty()),
                timeout_ms: duration_ms("backup.timeout", spec.timeout.as_deref(), 3_600_000, 1000, 86_400_000)?,
            }),
        };
        Ok(Policy {
            mode,
            checks,
            confirm,
            probers,
            max_lag_on_failover: self.max_lag_on_failover.unwrap_or(0),
            synchronous: self.synchronous.unwrap_or(false),
            recovery,
            hooks,
            damping,
            backup,
        })
    }
}

/// An instance's role in its service (DESIGN: at most one primary per service).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceRole {
    Primary,
    Replica,
    /// In another region: promoted only by a region failover.
    Standby,
}

/// One instance as registered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceSpec {
    /// `HOST:PORT` (or a URL) where the instance serves; checks default to it.
    pub endpoint: String,
    /// Defaults to the registering node's region.
    pub region: Option<String>,
    pub zone: Option<String>,
    /// Higher is preferred for promotion; 0 = never promoted automatically (default 100).
    pub priority: Option<u32>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// The node that runs this instance's hooks (and supervises it, with `command`).
    pub node: Option<u64>,
    /// The synchronous standby of a `synchronous = true` service.
    pub synchronous: Option<bool>,
    /// Supervision: the node runs the instance as a child process.
    pub command: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
}

/// A validated instance registration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub endpoint: String,
    pub region: String,
    pub zone: Option<String>,
    pub priority: u32,
    pub tags: BTreeMap<String, String>,
    pub node: Option<u64>,
    pub synchronous: bool,
    pub command: Option<String>,
    pub env: BTreeMap<String, String>,
    pub workdir: Option<String>,
}

impl InstanceSpec {
    pub fn validate(&self, default_region: &str) -> Result<Instance, FieldError> {
        let endpoint = self.endpoint.trim();
        if endpoint.is_empty() || endpoint.len() > 1024 || !endpoint.contains(':') {
            return Err(field_error(
                "endpoint",
                endpoint,
                "HOST:PORT or a URL, e.g. 127.0.0.1:5432",
            ));
        }
        let region = self.region.clone().unwrap_or_else(|| default_region.to_string());
        check_name("region", &region)?;
        if let Some(zone) = &self.zone {
            check_name("zone", zone)?;
        }
        if self.tags.len() > 64 {
            return Err(field_error("tags", self.tags.len().to_string(), "at most 64 tags"));
        }
        if self.command.is_some() && self.node.is_none() {
            return Err(field_error(
                "node",
                "",
                "required with command: the node that supervises the instance",
            ));
        }
        if self.node == Some(0) {
            return Err(field_error("node", "0", "a node id, a whole number from 1"));
        }
        Ok(Instance {
            endpoint: endpoint.to_string(),
            region,
            zone: self.zone.clone(),
            priority: self.priority.unwrap_or(100),
            tags: self.tags.clone(),
            node: self.node,
            synchronous: self.synchronous.unwrap_or(false),
            command: self.command.clone().filter(|c| !c.trim().is_empty()),
            env: self.env.clone(),
            workdir: self.workdir.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(json: &str) -> Result<Policy, FieldError> {
        serde_json::from_str::<PolicySpec>(json).expect("shape").validate()
    }

    #[test]
    fn the_design_example_validates_with_its_defaults() {
        let p = policy(
            r#"{"mode": "active-passive",
                "checks": [{"kind": "http", "target": "http://127.0.0.1:8081/health",
                            "interval": "1s", "timeout": "500ms", "rise": 2, "fall": 3}],
                "confirm": "majority", "max_lag_on_failover": 0, "synchronous": false,
                "recovery": {"action": "restart", "max_retries": 3, "window": "1m"},
                "hooks": {"on_promote": "promote.sh", "on_demote": "demote.sh"}}"#,
        )
        .unwrap();
        assert_eq!(p.mode, Mode::ActivePassive);
        assert_eq!(p.checks[0].interval_ms, 1000);
        assert_eq!(p.checks[0].timeout_ms, 500);
        assert!(matches!(
            p.checks[0].probe,
            Probe::Http {
                status_min: 200,
                status_max: 399,
                ..
            }
        ));
        assert_eq!(p.confirm, Confirm::Majority);
        assert!(p.recovery.restart && p.recovery.window_ms == 60_000);
        assert_eq!(p.recovery.start_timeout_ms, 30_000);
        assert_eq!(p.hooks.timeout_ms, HOOK_TIMEOUT_MS_DEFAULT);
        assert_eq!(
            policy("{}").unwrap().mode,
            Mode::ActivePassive,
            "every field has a default"
        );
    }

    #[test]
    fn bad_fields_are_named_by_their_path() {
        let cases = [
            (r#"{"mode": "hot-standby"}"#, "mode"),
            (
                r#"{"checks": [{"kind": "tcp"}, {"kind": "http", "interval": "soon"}]}"#,
                "checks[1].interval",
            ),
            (
                r#"{"checks": [{"kind": "tcp", "interval": "1s", "timeout": "2s"}]}"#,
                "checks[0].timeout",
            ),
            (r#"{"checks": [{"kind": "exec"}]}"#, "checks[0].command"),
            (r#"{"checks": [{"kind": "heartbeat"}]}"#, "checks[0].ttl"),
            (r#"{"checks": [{"kind": "ping"}]}"#, "checks[0].kind"),
            (r#"{"checks": [{"kind": "tcp", "fall": 0}]}"#, "checks[0].fall"),
            (r#"{"checks": [{"kind": "http", "status": "700"}]}"#, "checks[0].status"),
            (r#"{"confirm": "most"}"#, "confirm"),
            (r#"{"probers": []}"#, "probers"),
            (r#"{"probers": [1, 1]}"#, "probers"),
            (r#"{"probers": [0]}"#, "probers"),
            (r#"{"recovery": {"action": "reboot"}}"#, "recovery.action"),
            (
                r#"{"recovery": {"action": "restart", "start_timeout": "2h"}}"#,
                "recovery.start_timeout",
            ),
            (r#"{"hooks": {"timeout": "0ms"}}"#, "hooks.timeout"),
        ];
        for (json, field) in cases {
            assert_eq!(policy(json).unwrap_err().field, field, "{json}");
        }
        assert!(serde_json::from_str::<PolicySpec>(r#"{"checkz": []}"#)
            .unwrap_err()
            .to_string()
            .contains("checkz"));
    }

    #[test]
    fn a_kind_needs_its_table_and_only_postgres_has_one() {
        let kind = |json: &str| serde_json::from_str::<PolicySpec>(json).unwrap().validate_kind();
        assert_eq!(kind("{}"), Ok(Kind::Generic));
        assert_eq!(kind(r#"{"kind": "generic"}"#), Ok(Kind::Generic));
        let field = |json: &str| kind(json).unwrap_err().field;
        assert_eq!(field(r#"{"kind": "mysql"}"#), "kind");
        assert_eq!(field(r#"{"kind": "postgres"}"#), "postgres");
        assert_eq!(field(r#"{"postgres": {"bin_dir": "/usr/bin"}}"#), "postgres");
        assert_eq!(
            field(r#"{"kind": "postgres", "postgres": {"data_dir": "/d/{instance}"}}"#),
            "postgres.bin_dir"
        );
        let full = r#"{"kind": "postgres", "postgres": {"bin_dir": "/usr/lib/postgresql/15/bin",
            "data_dir": "/var/lib/rampart/{instance}", "synchronous": "on",
            "superuser": {"password_env": "PGPASS"}, "replication_user": {"password_env": "REPLPASS"}}}"#;
        let Ok(Kind::Postgres(pg)) = kind(full) else {
            panic!("a valid postgres kind")
        };
        assert_eq!(pg.data_dir_of("db-1"), "/var/lib/rampart/db-1");
        assert_eq!(pg.synchronous, crate::postgres::Synchronous::On);
        let bad_sync = full.replace(r#""on""#, r#""always""#);
        assert_eq!(field(&bad_sync), "postgres.synchronous");
        let define = |json: &str| serde_json::from_str::<PolicySpec>(json).unwrap().define();
        let defined = define(full).expect("valid");
        assert_eq!(defined.policy.checks.len(), 1, "the SQL check by default");
        let with_command = full.replacen('{', r#"{"backup": {"command": "pg_dump"}, "#, 1);
        assert_eq!(define(&with_command).unwrap_err().field, "backup");
    }

    #[test]
    fn instances_validate_and_default() {
        let spec: InstanceSpec = serde_json::from_str(r#"{"endpoint": "127.0.0.1:5432"}"#).unwrap();
        let instance = spec.validate("us-east-1").unwrap();
        assert_eq!((instance.region.as_str(), instance.priority), ("us-east-1", 100));
        let supervised: InstanceSpec =
            serde_json::from_str(r#"{"endpoint": "127.0.0.1:1", "command": "run"}"#).unwrap();
        assert_eq!(supervised.validate("r").unwrap_err().field, "node");
        let bad: InstanceSpec = serde_json::from_str(r#"{"endpoint": "nowhere"}"#).unwrap();
        assert_eq!(bad.validate("r").unwrap_err().field, "endpoint");
        assert!(check_name("name", "orders-db").is_ok());
        assert!(check_name("name", "orders db").is_err());
    }
}
