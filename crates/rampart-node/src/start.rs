//! What a node or a witness does before it serves, and why it could not: its data dir
//! (owner-only), the start-up word on how it guards its port, its listening socket, the
//! client of its region links, and the signal that stops it.

use rampart_core::config::{NodeConfig, Security};

use crate::tls;

/// Why a node could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot use data dir {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    #[error("cannot open the store in {path}: {message}")]
    Store { path: String, message: String },
    #[error("cannot use data dir {path}: {message}")]
    Format { path: String, message: String },
    #[error("invalid raft settings: {0}")]
    RaftConfig(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("raft engine failed: {0}")]
    Raft(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("refusing to start: {0}")]
    Backup(#[from] crate::vault::BackupError),
}

/// Creates the data dir, owner-only: the log, snapshots and the bootstrap token file live
/// there.
pub fn owner_only_data_dir(data_dir: &std::path::Path) -> Result<(), NodeError> {
    let create = || -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(data_dir)?;
        std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
    };
    create().map_err(|source| NodeError::DataDir {
        path: data_dir.display().to_string(),
        source,
    })
}

/// Says at start how the node guards its port.
pub fn log_security(config: &NodeConfig) {
    match config.security() {
        Security::Tls => tracing::info!("TLS on: mutual TLS between peers, API tokens required"),
        Security::Loopback => tracing::warn!(
            listen = %config.listen,
            "no TLS: serving plaintext without tokens, reachable from this machine only; \
             give --tls-cert/--tls-key/--tls-ca to serve other machines"
        ),
        Security::Insecure => tracing::warn!(
            listen = %config.listen,
            "--insecure: serving plaintext WITHOUT TLS OR TOKENS on a reachable address; anyone who \
             can connect can read and change everything and join the region as a peer"
        ),
    }
}

/// The node's listening socket.
pub async fn bind(config: &NodeConfig) -> Result<tokio::net::TcpListener, NodeError> {
    tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| NodeError::Listen {
            addr: config.listen.to_string(),
            source,
        })
}

/// The client of region links and region health checks: mutual TLS on the region ALPN on a
/// TLS node. Requests set their own timeouts (a link's stream runs until it breaks).
pub fn region_client(tls: Option<&tls::NodeTls>) -> Result<reqwest::Client, NodeError> {
    let builder = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(2))
        .tcp_nodelay(true);
    let builder = match tls {
        Some(tls) => builder.use_preconfigured_tls(tls.region_config.clone()),
        None => builder,
    };
    builder.build().map_err(|e| NodeError::Raft(e.to_string()))
}

pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}
