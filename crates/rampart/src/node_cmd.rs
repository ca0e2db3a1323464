//! `rampart node`: gathers settings from `--config` TOML, `RAMPART_*` variables and flags
//! (in rising precedence) and hands the validated configuration to `rampart-node`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use rampart_core::config::{NodeConfig, NODE_SETTINGS};

use crate::outcome::Failure;

/// Settings of `rampart node`. Every flag also reads `RAMPART_<NAME>` (e.g.
/// `RAMPART_HEARTBEAT_INTERVAL=50ms`); durations are written like `100ms`, `5s`, `1m`.
#[derive(Args, Debug)]
pub struct NodeArgs {
    /// TOML file with the same settings (`heartbeat_interval = "50ms"`); flags override it
    #[arg(long, env = "RAMPART_CONFIG")]
    config: Option<PathBuf>,
    /// This node's id, a whole number from 1, unique in its region
    #[arg(long, env = "RAMPART_ID")]
    id: Option<String>,
    /// Region name [default: local]
    #[arg(long, env = "RAMPART_REGION")]
    region: Option<String>,
    /// Address for the HTTP API and peer traffic, e.g. 127.0.0.1:7001
    #[arg(long, env = "RAMPART_LISTEN")]
    listen: Option<String>,
    /// Address other nodes use to reach this one [default: --listen]
    #[arg(long, env = "RAMPART_ADVERTISE")]
    advertise: Option<String>,
    /// Directory for the Raft log, vote and snapshots
    #[arg(long, env = "RAMPART_DATA_DIR")]
    data_dir: Option<String>,
    /// Bootstrap members ID=HOST:PORT,...; leave out on a node that joins with `members add`
    #[arg(long, env = "RAMPART_INITIAL_CLUSTER")]
    initial_cluster: Option<String>,
    /// Dial these peers through another address (relay, NAT): ID=HOST:PORT,...
    #[arg(long, env = "RAMPART_PEER_VIA")]
    peer_via: Option<String>,
    /// Leader heartbeat period [default: 50ms]
    #[arg(long, env = "RAMPART_HEARTBEAT_INTERVAL")]
    heartbeat_interval: Option<String>,
    /// Election timeout, randomised between this and twice this [default: 250ms]
    #[arg(long, env = "RAMPART_ELECTION_TIMEOUT")]
    election_timeout: Option<String>,
    /// How long a write or linearizable read waits for a majority [default: 5s]
    #[arg(long, env = "RAMPART_REQUEST_TIMEOUT")]
    request_timeout: Option<String>,
    /// Snapshot and compact the log every this many entries [default: 10000]
    #[arg(long, env = "RAMPART_SNAPSHOT_LOGS")]
    snapshot_logs: Option<String>,
    /// Log kept past compaction for readers that have not read it yet (the backup log
    /// archiver), at most; past it they are told to start from a snapshot [default: 1073741824]
    #[arg(long, env = "RAMPART_MAX_RETAINED_LOG_BYTES")]
    max_retained_log_bytes: Option<String>,
    /// Changes kept for watches that resume from the past [default: 10000]
    #[arg(long, env = "RAMPART_WATCH_HISTORY")]
    watch_history: Option<String>,
    /// Largest key in bytes [default: 1024]
    #[arg(long, env = "RAMPART_KEY_BYTES_MAX")]
    key_bytes_max: Option<String>,
    /// Largest value in bytes [default: 1048576]
    #[arg(long, env = "RAMPART_VALUE_BYTES_MAX")]
    value_bytes_max: Option<String>,
    /// Largest request body in bytes [default: 2097152]
    #[arg(long, env = "RAMPART_REQUEST_BODY_BYTES_MAX")]
    request_body_bytes_max: Option<String>,
    /// Most watch streams one node serves [default: 1024]
    #[arg(long, env = "RAMPART_WATCHERS_MAX")]
    watchers_max: Option<String>,
    /// This node's certificate (PEM); with --tls-key and --tls-ca turns on TLS and tokens
    #[arg(long, env = "RAMPART_TLS_CERT")]
    tls_cert: Option<String>,
    /// This node's private key (PEM)
    #[arg(long, env = "RAMPART_TLS_KEY")]
    tls_key: Option<String>,
    /// The cluster CA (PEM): peers and client certificates must chain to it
    #[arg(long, env = "RAMPART_TLS_CA")]
    tls_ca: Option<String>,
    /// Serve plaintext without tokens on a non-loopback --listen (anyone who can connect can
    /// read, write and join the region); without TLS a node otherwise binds loopback only
    #[arg(long, env = "RAMPART_INSECURE")]
    insecure: bool,
    /// Run as a witness: a one-node region that keeps no data, answers region health and
    /// votes in region failover (give it --region, --primary-region and the other regions)
    #[arg(long, env = "RAMPART_WITNESS")]
    pub witness: bool,
    /// Send alerts (primary changes, instances down, failed hooks) as JSON to these URLs
    #[arg(long, env = "RAMPART_ALERT_WEBHOOKS")]
    alert_webhooks: Option<String>,
    /// Send alerts to these Slack incoming-webhook URLs
    #[arg(long, env = "RAMPART_ALERT_SLACK_WEBHOOKS")]
    alert_slack_webhooks: Option<String>,
    /// The primary region of a new deployment (afterwards the replicated region epoch
    /// decides) [default: this node's region]
    #[arg(long, env = "RAMPART_PRIMARY_REGION")]
    primary_region: Option<String>,
    /// Another region and its nodes, NAME=HOST:PORT,HOST:PORT; repeat for each (never this
    /// node's own region). The variable holds them all: NAME=EP,EP;NAME=EP
    #[arg(long = "known-region", env = "RAMPART_KNOWN_REGIONS", value_delimiter = ';')]
    known_regions: Vec<String>,
}

impl NodeArgs {
    fn flags(&self) -> Vec<(&'static str, Option<String>)> {
        let flags = [
            ("id", &self.id),
            ("region", &self.region),
            ("listen", &self.listen),
            ("advertise", &self.advertise),
            ("data-dir", &self.data_dir),
            ("initial-cluster", &self.initial_cluster),
            ("peer-via", &self.peer_via),
            ("heartbeat-interval", &self.heartbeat_interval),
            ("election-timeout", &self.election_timeout),
            ("request-timeout", &self.request_timeout),
            ("snapshot-logs", &self.snapshot_logs),
            ("max-retained-log-bytes", &self.max_retained_log_bytes),
            ("watch-history", &self.watch_history),
            ("key-bytes-max", &self.key_bytes_max),
            ("value-bytes-max", &self.value_bytes_max),
            ("request-body-bytes-max", &self.request_body_bytes_max),
            ("watchers-max", &self.watchers_max),
            ("tls-cert", &self.tls_cert),
            ("tls-key", &self.tls_key),
            ("tls-ca", &self.tls_ca),
            ("alert-webhooks", &self.alert_webhooks),
            ("alert-slack-webhooks", &self.alert_slack_webhooks),
        ];
        let mut flags: Vec<_> = flags.into_iter().map(|(name, value)| (name, value.clone())).collect();
        if self.insecure {
            flags.push(("insecure", Some("true".to_string())));
        }
        if self.witness {
            flags.push(("witness", Some("true".to_string())));
        }
        flags
    }
}

/// Services declared in the config file (`[services.NAME]` tables), validated.
type ConfiguredServices = BTreeMap<String, rampart_core::service::Definition>;

/// Reads `[services.NAME]` tables; a bad one is refused naming `services.NAME.FIELD`.
fn file_services(path: &std::path::Path, value: toml::Value) -> Result<ConfiguredServices, Failure> {
    let bad = |message: String| Failure::usage(anyhow::anyhow!("invalid --config {}: {message}", path.display()));
    let toml::Value::Table(table) = value else {
        return Err(bad("services must be tables: [services.NAME]".into()));
    };
    let mut services = BTreeMap::new();
    for (name, body) in table {
        rampart_core::service::check_name(&format!("services.{name}"), &name).map_err(|e| bad(e.to_string()))?;
        let spec: rampart_core::service::PolicySpec =
            body.try_into().map_err(|e| bad(format!("[services.{name}]: {e}")))?;
        let definition = spec.define().map_err(|e| {
            bad(rampart_core::service::FieldError {
                field: format!("services.{name}.{}", e.field),
                ..e
            }
            .to_string())
        })?;
        services.insert(name, definition);
    }
    Ok(services)
}

/// Proxy listeners run inside the node (`[[proxy.listeners]]`), with their admin address.
pub struct NodeProxy {
    pub listeners: Vec<rampart_core::proxy::Listener>,
    pub admin: Option<std::net::SocketAddr>,
}

/// Reads `[proxy]` as `rampart proxy --config` does; a bad one is refused naming the field.
fn file_proxy(path: &std::path::Path, value: toml::Value) -> Result<NodeProxy, Failure> {
    let bad = |message: String| Failure::usage(anyhow::anyhow!("invalid --config {}: {message}", path.display()));
    let spec: rampart_core::proxy::ProxySpec = value.try_into().map_err(|e| bad(format!("[proxy]: {e}")))?;
    Ok(NodeProxy {
        listeners: spec.validate().map_err(|e| bad(e.to_string()))?,
        admin: spec.admin().map_err(|e| bad(e.to_string()))?,
    })
}

/// Reads `[backup]`; a bad one is refused naming the field (`backup.keep_last`).
pub fn file_backup(path: &std::path::Path, value: toml::Value) -> Result<rampart_core::backup::Backup, Failure> {
    let bad = |message: String| Failure::usage(anyhow::anyhow!("invalid --config {}: {message}", path.display()));
    let spec: rampart_core::backup::BackupSpec = value.try_into().map_err(|e| bad(format!("[backup]: {e}")))?;
    let backup = spec.validate().map_err(|e| bad(e.to_string()))?;
    rampart_node::check_backup_schedules(&backup).map_err(bad)?;
    Ok(backup)
}

/// What a node's config file holds besides its settings.
#[derive(Default)]
struct FileTables {
    services: ConfiguredServices,
    proxy: Option<NodeProxy>,
    backup: Option<rampart_core::backup::Backup>,
    regions: rampart_core::region::RegionsSpec,
}

/// Reads `[regions]` and its `[regions.known.NAME]` tables; checked with the flags later.
fn file_regions(path: &std::path::Path, value: toml::Value) -> Result<rampart_core::region::RegionsSpec, Failure> {
    value
        .try_into()
        .map_err(|e| Failure::usage(anyhow::anyhow!("invalid --config {}: [regions]: {e}", path.display())))
}

/// Reads the TOML file into settings by flag name (`heartbeat_interval` = `heartbeat-interval`),
/// its `[services.NAME]` tables and its `[proxy]` table.
fn file_settings(path: &PathBuf) -> Result<(BTreeMap<String, String>, FileTables), Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(anyhow::anyhow!("cannot read --config {}: {e}", path.display())))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e| Failure::usage(anyhow::anyhow!("invalid --config {}: {e}", path.display())))?;
    let mut settings = BTreeMap::new();
    let mut tables = FileTables::default();
    for (key, value) in table {
        if key == "services" {
            tables.services = file_services(path, value)?;
            continue;
        }
        if key == "proxy" {
            tables.proxy = Some(file_proxy(path, value)?);
            continue;
        }
        if key == "backup" {
            tables.backup = Some(file_backup(path, value)?);
            continue;
        }
        if key == "regions" {
            tables.regions = file_regions(path, value)?;
            continue;
        }
        let name = key.replace('_', "-");
        if !NODE_SETTINGS.contains(&name.as_str()) {
            return Err(Failure::usage(anyhow::anyhow!(
                "invalid --config {}: unknown setting {key:?}; known settings are {}",
                path.display(),
                NODE_SETTINGS.join(", ")
            )));
        }
        let text = match value {
            toml::Value::String(s) => s,
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => {
                return Err(Failure::usage(anyhow::anyhow!(
                    "invalid --config {}: setting {key:?} has unsupported value {other}",
                    path.display()
                )))
            }
        };
        settings.insert(name, text);
    }
    Ok((settings, tables))
}

pub fn config(args: &NodeArgs) -> Result<(NodeConfig, Option<NodeProxy>), Failure> {
    let (mut settings, tables) = match &args.config {
        Some(path) => file_settings(path)?,
        None => (BTreeMap::new(), FileTables::default()),
    };
    for (name, value) in args.flags() {
        if let Some(value) = value {
            settings.insert(name.to_string(), value);
        }
    }
    let mut config = NodeConfig::from_settings(&settings).map_err(|e| Failure::usage(e.into()))?;
    config.services = tables.services;
    config.backup = tables.backup;
    // The flags (and their variables) replace the file's primary and known regions.
    let mut regions = tables.regions;
    if let Some(primary) = &args.primary_region {
        regions.primary = Some(primary.clone());
    }
    if !args.known_regions.is_empty() {
        regions
            .set_known_from_flags(&args.known_regions)
            .map_err(|e| Failure::usage(e.into()))?;
    }
    config.regions = regions
        .validate(&config.region, &[config.listen, config.advertise])
        .map_err(|e| Failure::usage(e.into()))?;
    if config.witness && config.regions.primary == config.region {
        return Err(Failure::usage(anyhow::anyhow!(
            "invalid regions.primary {:?}: a witness's own region cannot be the primary; give --primary-region",
            config.regions.primary
        )));
    }
    Ok((config, tables.proxy))
}

pub async fn run(args: NodeArgs) -> Result<(), Failure> {
    let (config, proxy) = config(&args)?;
    let Some(proxy) = proxy else {
        return rampart_node::run(config).await.map_err(node_failure);
    };
    // The listeners follow the registry through this node itself.
    let registry = std::sync::Arc::new(own_client(&config)?);
    tokio::select! {
        done = rampart_node::run(config) => done.map_err(node_failure),
        done = rampart_proxy::run(proxy.listeners, proxy.admin, Some(registry)) => {
            done.map_err(|e| Failure::failed(anyhow::anyhow!("proxy: {e}")))
        }
    }
}

/// A backup key that cannot be used, or a data dir of another format, is a configuration
/// error (exit 2), like a bad setting.
fn node_failure(e: rampart_node::NodeError) -> Failure {
    match e {
        rampart_node::NodeError::Backup(_) | rampart_node::NodeError::Format { .. } => Failure::usage(e.into()),
        e => Failure::failed(e.into()),
    }
}

/// A client of the node's own API for its proxy listeners. With TLS it trusts the cluster
/// CA and sends the token of `RAMPART_TOKEN_FILE`, else of the data dir's `admin.token`.
fn own_client(config: &NodeConfig) -> Result<rampart_client::Client, Failure> {
    let endpoint = [config.advertise.to_string()];
    let client = match &config.tls {
        None => rampart_client::Client::new(&endpoint)?,
        Some(files) => {
            let token_file = std::env::var_os("RAMPART_TOKEN_FILE")
                .map(PathBuf::from)
                .unwrap_or_else(|| config.data_dir.join("admin.token"));
            let token = std::fs::read_to_string(&token_file).map_err(|e| {
                Failure::usage(anyhow::anyhow!(
                    "[[proxy.listeners]] in a TLS node need a token to read the registry: cannot read {} ({e}); set RAMPART_TOKEN_FILE",
                    token_file.display()
                ))
            })?;
            let tls = rampart_client::TlsOptions {
                ca: files.ca.clone(),
                cert: None,
                key: None,
            };
            rampart_client::Client::secured(&endpoint, Some(&tls), Some(token.trim()))?
        }
    };
    Ok(client.with_deadline(std::time::Duration::from_secs(2)))
}
