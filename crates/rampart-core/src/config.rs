//! The node's configuration schema and its validation.
//!
//! Flags, `RAMPART_*` environment variables and the `--config` TOML file all arrive here as
//! one map of setting name to text, so every bad value is reported the same way: the
//! setting's name, the value, and what is allowed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::duration::parse_duration;
use crate::limits::Limits;

/// A setting that cannot be used; the binary prints it and exits 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid --{setting} {value:?}: {allowed}")]
pub struct ConfigError {
    pub setting: String,
    pub value: String,
    pub allowed: String,
}

impl ConfigError {
    fn new(setting: &str, value: &str, allowed: impl Into<String>) -> Self {
        ConfigError {
            setting: setting.to_string(),
            value: value.to_string(),
            allowed: allowed.into(),
        }
    }
}

/// `max-retained-log-bytes` when not set: 1 GiB.
pub const MAX_RETAINED_LOG_BYTES_DEFAULT: u64 = 1 << 30;

/// Every setting `rampart node` accepts, by its flag name. The TOML file uses the same
/// names with `_` or `-`.
pub const NODE_SETTINGS: &[&str] = &[
    "id",
    "region",
    "listen",
    "advertise",
    "data-dir",
    "initial-cluster",
    "peer-via",
    "heartbeat-interval",
    "election-timeout",
    "request-timeout",
    "snapshot-logs",
    "max-retained-log-bytes",
    "watch-history",
    "key-bytes-max",
    "value-bytes-max",
    "request-body-bytes-max",
    "watchers-max",
    "tls-cert",
    "tls-key",
    "tls-ca",
    "insecure",
    "witness",
    "alert-webhooks",
    "alert-slack-webhooks",
];

/// The PEM files that turn on TLS for the API and peer links (see `rampart certs init`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// This node's certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The cluster CA: peers and client certificates must chain to it.
    pub ca: PathBuf,
}

/// How a node guards its API and peer links.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// TLS on every connection, mutual TLS between peers, tokens on the API.
    Tls,
    /// Plaintext without tokens, reachable only from this machine.
    Loopback,
    /// Plaintext without tokens on a reachable address: `--insecure`.
    Insecure,
}

impl Security {
    pub fn as_str(self) -> &'static str {
        match self {
            Security::Tls => "tls",
            Security::Loopback => "loopback",
            Security::Insecure => "insecure",
        }
    }
}

/// A validated node configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub id: u64,
    pub region: String,
    pub listen: SocketAddr,
    /// Address other nodes and clients use to reach this one (defaults to `listen`).
    pub advertise: SocketAddr,
    pub data_dir: PathBuf,
    /// Members that bootstrap the region together; empty for a node that waits to be added.
    pub initial_cluster: BTreeMap<u64, SocketAddr>,
    /// Local override of the address used to dial a peer (relays, NAT); never replicated.
    pub peer_via: BTreeMap<u64, SocketAddr>,
    pub heartbeat_interval: Duration,
    /// Lower bound of the randomised election timeout; the upper bound is twice this.
    pub election_timeout: Duration,
    /// How long a write or linearizable read may wait for the cluster before failing.
    pub request_timeout: Duration,
    /// Take a snapshot (and compact the log) every this many applied entries.
    pub snapshot_logs: u64,
    /// Log kept past compaction for readers that have not read it yet (the backup
    /// archiver, region links), at most; past it they are overtaken (`core::compaction`).
    pub max_retained_log_bytes: u64,
    /// Changes kept in memory for watches that resume from an older revision.
    pub watch_history: usize,
    pub limits: Limits,
    /// `Some`: TLS and tokens required on every connection.
    pub tls: Option<TlsFiles>,
    /// Plaintext on a non-loopback address was asked for explicitly.
    pub insecure: bool,
    /// A witness: a one-node region that keeps no data (`--witness`).
    pub witness: bool,
    /// Services declared in the config file (`[services.NAME]`), registered by the leader.
    pub services: BTreeMap<String, crate::service::Definition>,
    /// URLs that receive alerts as JSON (the event), from the leader.
    pub alert_webhooks: Vec<String>,
    /// Slack incoming-webhook URLs that receive alerts as `{"text": ...}`.
    pub alert_slack_webhooks: Vec<String>,
    /// `[backup]`: where backups go, their key, schedules and retention.
    pub backup: Option<crate::backup::Backup>,
    /// The regions: this one alone, unless `[regions]` or `--known-region` name others.
    pub regions: crate::region::Regions,
}

impl NodeConfig {
    /// Builds a configuration from settings by flag name; unknown names and bad values are
    /// refused with the setting's name and what is allowed.
    pub fn from_settings(settings: &BTreeMap<String, String>) -> Result<NodeConfig, ConfigError> {
        for name in settings.keys() {
            if !NODE_SETTINGS.contains(&name.as_str()) {
                return Err(ConfigError::new(
                    name,
                    &settings[name],
                    format!("unknown setting; known settings are {}", NODE_SETTINGS.join(", ")),
                ));
            }
        }
        let get = |name: &str| settings.get(name).map(String::as_str);
        let required = |name: &str| get(name).ok_or_else(|| ConfigError::new(name, "", "this setting is required"));

        let id = parse_node_id("id", required("id")?)?;
        let region = get("region").unwrap_or("local").to_string();
        crate::region::check_region_name("region", &region)
            .map_err(|e| ConfigError::new("region", &region, e.allowed))?;
        let listen = parse_addr("listen", required("listen")?)?;
        let advertise = match get("advertise") {
            Some(text) => parse_addr("advertise", text)?,
            None => listen,
        };
        let data_dir = PathBuf::from(required("data-dir")?);
        let initial_cluster = match get("initial-cluster") {
            Some(text) => parse_members("initial-cluster", text)?,
            None => BTreeMap::new(),
        };
        if !initial_cluster.is_empty() && !initial_cluster.contains_key(&id) {
            return Err(ConfigError::new(
                "initial-cluster",
                get("initial-cluster").unwrap_or_default(),
                format!("must include this node's own --id {id} (leave it out to join an existing region)"),
            ));
        }
        let peer_via = match get("peer-via") {
            Some(text) => parse_members("peer-via", text)?,
            None => BTreeMap::new(),
        };
        let heartbeat_interval = parse_duration_setting("heartbeat-interval", get("heartbeat-interval"), 50)?;
        let election_timeout = parse_duration_setting("election-timeout", get("election-timeout"), 250)?;
        if heartbeat_interval.is_zero() {
            return Err(ConfigError::new(
                "heartbeat-interval",
                get("heartbeat-interval").unwrap_or_default(),
                "must be above 0ms",
            ));
        }
        if election_timeout < heartbeat_interval * 3 {
            return Err(ConfigError::new(
                "election-timeout",
                get("election-timeout").unwrap_or("250ms"),
                format!(
                    "must be at least 3 x --heartbeat-interval ({}ms)",
                    heartbeat_interval.as_millis() * 3
                ),
            ));
        }
        let request_timeout = parse_duration_setting("request-timeout", get("request-timeout"), 5000)?;
        if request_timeout < election_timeout {
            return Err(ConfigError::new(
                "request-timeout",
                get("request-timeout").unwrap_or_default(),
                "must be at least --election-timeout, or writes fail during every election",
            ));
        }
        let snapshot_logs = parse_number("snapshot-logs", get("snapshot-logs"), 10_000, 10, 10_000_000)?;
        let watch_history = parse_number("watch-history", get("watch-history"), 10_000, 1, 10_000_000)? as usize;
        let max_retained_log_bytes = parse_number(
            "max-retained-log-bytes",
            get("max-retained-log-bytes"),
            MAX_RETAINED_LOG_BYTES_DEFAULT,
            0,
            1 << 40,
        )?;
        let defaults = Limits::default();
        let limits = Limits {
            key_bytes_max: parse_number(
                "key-bytes-max",
                get("key-bytes-max"),
                defaults.key_bytes_max as u64,
                1,
                65_536,
            )? as usize,
            value_bytes_max: parse_number(
                "value-bytes-max",
                get("value-bytes-max"),
                defaults.value_bytes_max as u64,
                1,
                crate::limits::VALUE_BYTES_CEILING as u64,
            )? as usize,
            request_body_bytes_max: parse_number(
                "request-body-bytes-max",
                get("request-body-bytes-max"),
                defaults.request_body_bytes_max as u64,
                1024,
                128 << 20,
            )? as usize,
            watchers_max: parse_number(
                "watchers-max",
                get("watchers-max"),
                defaults.watchers_max as u64,
                0,
                1_000_000,
            )? as usize,
        };
        let tls = match (get("tls-cert"), get("tls-key"), get("tls-ca")) {
            (None, None, None) => None,
            (Some(cert), Some(key), Some(ca)) => Some(TlsFiles {
                cert: PathBuf::from(cert),
                key: PathBuf::from(key),
                ca: PathBuf::from(ca),
            }),
            _ => {
                let missing = ["tls-cert", "tls-key", "tls-ca"]
                    .into_iter()
                    .find(|name| get(name).is_none())
                    .expect("one is missing");
                return Err(ConfigError::new(
                    missing,
                    "",
                    "TLS needs all three of --tls-cert, --tls-key and --tls-ca (see `rampart certs init`)",
                ));
            }
        };
        let insecure = match get("insecure") {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => return Err(ConfigError::new("insecure", other, "expected true or false")),
        };
        if insecure && tls.is_some() {
            return Err(ConfigError::new(
                "insecure",
                "true",
                "cannot be combined with --tls-cert/--tls-key/--tls-ca; drop one or the other",
            ));
        }
        if tls.is_none() && !insecure && !listen.ip().is_loopback() {
            return Err(ConfigError::new(
                "listen",
                &listen.to_string(),
                "a non-loopback address without TLS would expose the API to anyone on the network \
                 with no authentication: give --tls-cert, --tls-key and --tls-ca (create them with \
                 `rampart certs init`), or accept the risk with --insecure",
            ));
        }
        let witness = match get("witness") {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => return Err(ConfigError::new("witness", other, "expected true or false")),
        };
        if witness && !initial_cluster.is_empty() {
            return Err(ConfigError::new(
                "initial-cluster",
                get("initial-cluster").unwrap_or_default(),
                "a witness is a one-node region that keeps no data: leave out --initial-cluster",
            ));
        }
        let regions = crate::region::RegionsSpec::default()
            .validate(&region, &[listen, advertise])
            .expect("a region alone is a valid topology");
        Ok(NodeConfig {
            id,
            region,
            listen,
            advertise,
            data_dir,
            initial_cluster,
            peer_via,
            heartbeat_interval,
            election_timeout,
            request_timeout,
            snapshot_logs,
            max_retained_log_bytes,
            watch_history,
            limits,
            tls,
            insecure,
            witness,
            services: BTreeMap::new(),
            alert_webhooks: parse_urls("alert-webhooks", get("alert-webhooks"))?,
            alert_slack_webhooks: parse_urls("alert-slack-webhooks", get("alert-slack-webhooks"))?,
            backup: None,
            regions,
        })
    }

    pub fn security(&self) -> Security {
        match (&self.tls, self.insecure) {
            (Some(_), _) => Security::Tls,
            (None, true) => Security::Insecure,
            (None, false) => Security::Loopback,
        }
    }
}

/// A comma-separated list of http(s) URLs.
fn parse_urls(setting: &str, text: Option<&str>) -> Result<Vec<String>, ConfigError> {
    let Some(text) = text else { return Ok(Vec::new()) };
    text.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|url| {
            if (url.starts_with("http://") || url.starts_with("https://")) && url.len() <= 2048 {
                Ok(url.to_string())
            } else {
                Err(ConfigError::new(
                    setting,
                    url,
                    "comma-separated http:// or https:// URLs",
                ))
            }
        })
        .collect()
}

fn parse_node_id(setting: &str, text: &str) -> Result<u64, ConfigError> {
    match text.trim().parse::<u64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(ConfigError::new(
            setting,
            text,
            "expected a node id: a whole number from 1",
        )),
    }
}

fn parse_addr(setting: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.trim().parse().map_err(|_| {
        ConfigError::new(
            setting,
            text,
            "expected HOST:PORT with an IP address, e.g. 127.0.0.1:7001",
        )
    })
}

/// Parses `1=127.0.0.1:7001,2=127.0.0.1:7002`.
pub fn parse_members(setting: &str, text: &str) -> Result<BTreeMap<u64, SocketAddr>, ConfigError> {
    let mut members = BTreeMap::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let bad = || ConfigError::new(setting, entry, "expected ID=HOST:PORT, e.g. 2=127.0.0.1:7002");
        let (id, addr) = entry.split_once('=').ok_or_else(bad)?;
        let id: u64 = id.trim().parse().ok().filter(|id| *id > 0).ok_or_else(bad)?;
        let addr: SocketAddr = addr.trim().parse().map_err(|_| bad())?;
        if members.insert(id, addr).is_some() {
            return Err(ConfigError::new(setting, text, format!("node id {id} is listed twice")));
        }
    }
    if members.is_empty() {
        return Err(ConfigError::new(
            setting,
            text,
            "expected at least one ID=HOST:PORT entry",
        ));
    }
    Ok(members)
}

fn parse_duration_setting(setting: &str, text: Option<&str>, default_ms: u64) -> Result<Duration, ConfigError> {
    match text {
        None => Ok(Duration::from_millis(default_ms)),
        Some(text) => parse_duration(text)
            .map_err(|_| ConfigError::new(setting, text, "expected a duration such as 50ms, 5s or 1m")),
    }
}

fn parse_number(setting: &str, text: Option<&str>, default: u64, min: u64, max: u64) -> Result<u64, ConfigError> {
    let Some(text) = text else { return Ok(default) };
    match text.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ConfigError::new(
            setting,
            text,
            format!("expected a whole number from {min} to {max}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn minimal() -> Vec<(&'static str, &'static str)> {
        vec![("id", "1"), ("listen", "127.0.0.1:7001"), ("data-dir", "/tmp/n1")]
    }

    #[test]
    fn defaults_match_the_design() {
        let config = NodeConfig::from_settings(&settings(&minimal())).unwrap();
        assert_eq!(config.heartbeat_interval, Duration::from_millis(50));
        assert_eq!(config.election_timeout, Duration::from_millis(250));
        assert_eq!(config.advertise, config.listen);
    }

    #[test]
    fn bad_cluster_entry_names_setting_value_and_form() {
        let mut pairs = minimal();
        pairs.push(("initial-cluster", "1=127.0.0.1:7001,2=127.0.0.1"));
        let err = NodeConfig::from_settings(&settings(&pairs)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid --initial-cluster \"2=127.0.0.1\": expected ID=HOST:PORT, e.g. 2=127.0.0.1:7002"
        );
    }

    #[test]
    fn election_timeout_must_leave_room_for_heartbeats() {
        let mut pairs = minimal();
        pairs.push(("heartbeat-interval", "100ms"));
        pairs.push(("election-timeout", "200ms"));
        let err = NodeConfig::from_settings(&settings(&pairs)).unwrap_err();
        assert_eq!(err.setting, "election-timeout");
    }

    #[test]
    fn unknown_setting_is_refused() {
        let mut pairs = minimal();
        pairs.push(("heartbeat", "50ms"));
        let err = NodeConfig::from_settings(&settings(&pairs)).unwrap_err();
        assert_eq!(err.setting, "heartbeat");
        assert!(err.allowed.contains("heartbeat-interval"));
    }

    #[test]
    fn reachable_plaintext_needs_tls_or_insecure() {
        let pairs = vec![("id", "1"), ("listen", "0.0.0.0:7001"), ("data-dir", "/tmp/n1")];
        let err = NodeConfig::from_settings(&settings(&pairs)).unwrap_err();
        assert_eq!(err.setting, "listen");
        assert!(err.allowed.contains("--tls-cert") && err.allowed.contains("--insecure"));
        let mut insecure = pairs.clone();
        insecure.push(("insecure", "true"));
        let config = NodeConfig::from_settings(&settings(&insecure)).unwrap();
        assert_eq!(config.security(), Security::Insecure);
        let mut tls = pairs;
        tls.extend([("tls-cert", "c.pem"), ("tls-key", "k.pem"), ("tls-ca", "ca.pem")]);
        assert_eq!(
            NodeConfig::from_settings(&settings(&tls)).unwrap().security(),
            Security::Tls
        );
        assert_eq!(
            NodeConfig::from_settings(&settings(&minimal())).unwrap().security(),
            Security::Loopback
        );
    }

    #[test]
    fn tls_needs_all_three_files() {
        let mut pairs = minimal();
        pairs.push(("tls-cert", "c.pem"));
        let err = NodeConfig::from_settings(&settings(&pairs)).unwrap_err();
        assert_eq!(err.setting, "tls-key");
    }

    #[test]
    fn initial_cluster_must_contain_self() {
        let mut pairs = minimal();
        pairs.push(("initial-cluster", "2=127.0.0.1:7002"));
        assert_eq!(
            NodeConfig::from_settings(&settings(&pairs)).unwrap_err().setting,
            "initial-cluster"
        );
    }
}
