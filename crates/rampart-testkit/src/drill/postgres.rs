//! The PostgreSQL service `postgres-primary-kill` breaks: `drill-db`, `kind = "postgres"`
//! in synchronous mode (a commit waits for a standby, so no acknowledged row may be lost),
//! an instance on each node of the primary region, run by that node, behind a TCP listener
//! of the drill's proxy that follows its primary. The SQL canary inserts unique keys
//! through that listener.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::history::{History, OpOutcome};
use crate::workload::Writers;

/// The drill's PostgreSQL service.
pub const PG_SERVICE: &str = "drill-db";
/// The superuser's password the drill gives its PostgreSQL.
const PASSWORD: &str = "drill-super";

/// One PostgreSQL instance of the drill.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PgInstance {
    pub id: String,
    pub node_id: u64,
    pub port: u16,
}

/// The drill's PostgreSQL service, as `topology.json` keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PgRecord {
    /// Data dirs and password files: a directory PostgreSQL's user can reach (outside the
    /// drill's directory, which may not be), removed when the topology stops.
    pub dir: PathBuf,
    pub instances: Vec<PgInstance>,
    /// The proxy's TCP listener for the primary.
    pub proxy: SocketAddr,
}

impl PgRecord {
    /// A directory for the instances, readable by PostgreSQL's user, with the password
    /// files.
    pub fn make_dir() -> std::io::Result<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new().prefix("rampart-drill-pg-").tempdir()?.keep();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(dir.join("super.pw"), format!("{PASSWORD}\n"))?;
        std::fs::write(dir.join("repl.pw"), "drill-replication\n")?;
        Ok(dir)
    }

    /// The service's policy: synchronous, with fsync off (a drill measures failover, not
    /// disks).
    pub fn policy(&self) -> Result<rampart_core::service::PolicySpec, String> {
        let policy = serde_json::json!({
            "kind": "postgres",
            "postgres": {
                "bin_dir": crate::postgres::bin_dir()?,
                "data_dir": self.dir.join("{instance}"),
                "superuser": {"password_file": self.dir.join("super.pw")},
                "replication_user": {"password_file": self.dir.join("repl.pw")},
                "synchronous": "on",
                "parameters": {"fsync": "off", "shared_buffers": "16MB"},
            },
        });
        serde_json::from_value(policy).map_err(|e| format!("the drill's PostgreSQL policy: {e}"))
    }

    /// The postmaster's PID of instance `id`, from its `postmaster.pid`.
    pub fn postmaster_pid(&self, id: &str) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.join(id).join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The data dir of instance `id`.
    pub fn data_dir(&self, id: &str) -> PathBuf {
        self.dir.join(id)
    }
}

/// A connection to `addr` as the drill's superuser.
pub async fn connect(addr: SocketAddr) -> Option<tokio_postgres::Client> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(addr.ip().to_string())
        .port(addr.port())
        .user("postgres")
        .password(PASSWORD)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2));
    let connecting = config.connect(tokio_postgres::NoTls);
    let (client, connection) = tokio::time::timeout(Duration::from_secs(3), connecting)
        .await
        .ok()?
        .ok()?;
    tokio::spawn(connection);
    Some(client)
}

/// Makes the canary's table through `addr`, retrying until `deadline`.
pub async fn make_table(addr: SocketAddr, deadline: Instant) -> Result<(), String> {
    let mut last = String::from("no connection");
    while Instant::now() < deadline {
        if let Some(sql) = connect(addr).await {
            match sql
                .batch_execute("CREATE TABLE IF NOT EXISTS drill_canary (k text PRIMARY KEY)")
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) => last = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(format!("cannot make the canary's table: {last}"))
}

/// Writers inserting unique keys through the proxy, until stopped.
pub struct SqlCanary {
    writers: Writers,
    pub history: Arc<History>,
}

impl SqlCanary {
    /// Starts `writers` writers inserting `PREFIX.wN.SEQ` through `proxy`.
    pub fn start(proxy: SocketAddr, writers: usize, prefix: &str) -> SqlCanary {
        let prefix = prefix.replace('/', ".");
        let history = Arc::new(History::default());
        let sink = history.clone();
        let writers = Writers::start(writers, move |writer, stop| {
            let (history, prefix) = (sink.clone(), prefix.clone());
            async move {
                let mut seq = 0u64;
                let mut sql: Option<tokio_postgres::Client> = None;
                while !stop.load(Ordering::Relaxed) {
                    if sql.as_ref().is_none_or(|c| c.is_closed()) {
                        sql = connect(proxy).await;
                        if sql.is_none() {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    }
                    seq += 1;
                    let key = format!("{prefix}.w{writer}.{seq:07}");
                    let sent = Instant::now();
                    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key];
                    let insert = sql
                        .as_ref()
                        .expect("connected")
                        .execute("INSERT INTO drill_canary (k) VALUES ($1)", &params);
                    let outcome = match tokio::time::timeout(Duration::from_secs(5), insert).await {
                        Ok(Ok(_)) => OpOutcome::Acknowledged { revision: seq },
                        // A read-only server refused it: not applied.
                        Ok(Err(e)) if e.code() == Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION) => {
                            OpOutcome::Failed
                        }
                        _ => {
                            sql = None;
                            OpOutcome::Unknown
                        }
                    };
                    history.record_sent(writer, &key, &key, outcome, sent);
                }
            }
        });
        SqlCanary { writers, history }
    }

    pub async fn stop(mut self) -> Arc<History> {
        self.writers.stop().await;
        self.history
    }
}

/// The canary's keys under `prefix` the PostgreSQL at `addr` holds (each its own value).
pub async fn final_state(addr: SocketAddr, prefix: &str) -> Result<BTreeMap<String, String>, String> {
    let prefix = prefix.replace('/', ".");
    let sql = connect(addr)
        .await
        .ok_or(format!("cannot connect to the primary at {addr}"))?;
    let rows = sql
        .query("SELECT k FROM drill_canary WHERE starts_with(k, $1)", &[&prefix])
        .await
        .map_err(|e| format!("cannot read the canary's rows: {e}"))?;
    Ok(rows
        .iter()
        .map(|row| {
            let key: String = row.get(0);
            (key.clone(), key)
        })
        .collect())
}

/// Whether `pid` is a process with an argument under `dir` (a postmaster of that data dir).
pub fn is_postmaster_of(pid: u32, dir: &Path) -> bool {
    super::local::processes_under(dir).contains(&pid)
}
