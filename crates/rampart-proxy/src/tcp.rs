//! L4: each client connection is joined to one upstream connection and bytes are copied
//! both ways until either side closes. A connect that fails or times out moves on to the
//! next upstream at once (each tried at most once), so a dead backend costs the client a
//! connect attempt, not an error.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rampart_core::proxy::{client_hash, Failure, Listener};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::Metrics;
use crate::pool::{Lease, Pool};
use crate::target::Target;

/// Counts a gauge down when dropped.
pub struct Decrement(pub prometheus_client::metrics::gauge::Gauge);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What a worker needs to serve a TCP listener's connections.
struct Shared {
    listener: Listener,
    pool: Arc<Pool>,
    connections: prometheus_client::metrics::counter::Counter,
    active: prometheus_client::metrics::gauge::Gauge,
}

/// Serves the listener's connections on worker threads (`workers`).
pub async fn serve(
    listener: Listener,
    socket: TcpListener,
    target: Arc<Target>,
    metrics: Arc<Metrics>,
) -> io::Result<()> {
    let labels = Metrics::listener(&listener.name);
    let name = listener.name.clone();
    let connections = metrics.connections.get_or_create(&labels).clone();
    let active = metrics.active.get_or_create(&labels).clone();
    let state = move || Shared {
        listener: listener.clone(),
        pool: target.pool.clone(),
        connections: connections.clone(),
        active: active.clone(),
    };
    crate::workers::serve_on_workers(&name, socket, state, serve_connection).await
}

/// Joins one client connection to an upstream until either side closes or the upstream
/// leaves the listener.
async fn serve_connection(shared: Arc<Shared>, mut client: TcpStream, peer: SocketAddr) {
    shared.connections.inc();
    shared.active.inc();
    let _done = Decrement(shared.active.clone());
    let key = client_hash(peer.ip());
    // The lease counts the connection against its upstream until both sides close. With
    // no upstream (none reachable, or no primary) the client is refused at once, not left
    // hanging.
    let Some((lease, mut upstream)) = connect(&shared.pool, key, &shared.listener).await else {
        tracing::warn!(listener = %shared.listener.name, client = %peer, "no upstream could be reached");
        return;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        // The upstream left the listener's set: a demoted primary at once, any other after
        // draining. Dropping both sockets closes them.
        _ = lease.closed() => {
            tracing::info!(listener = %shared.listener.name, client = %peer, upstream = %lease.address(), "connection closed: its upstream left");
        }
    }
}

/// Connects to the first upstream that answers, in the balancer's order.
async fn connect(pool: &Arc<Pool>, key: u64, listener: &Listener) -> Option<(Lease, TcpStream)> {
    let timeout = Duration::from_millis(listener.connect_timeout_ms);
    let mut tried = Vec::new();
    while tried.len() < pool.len() {
        let lease = pool.pick(key, &tried)?;
        tried.push(lease.address().to_string());
        match tokio::time::timeout(timeout, TcpStream::connect(lease.address())).await {
            Ok(Ok(stream)) => {
                lease.succeeded();
                let _ = stream.set_nodelay(true);
                return Some((lease, stream));
            }
            Ok(Err(e)) => {
                tracing::debug!(upstream = %lease.address(), "connect failed: {e}");
                lease.failed(Failure::Connect);
            }
            Err(_) => {
                tracing::debug!(upstream = %lease.address(), "connect timed out");
                lease.failed(Failure::Connect);
            }
        }
    }
    None
}
