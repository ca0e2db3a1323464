//! `rampart-proxy` is Rampart's traffic plane: listeners that take client connections and
//! pass them to healthy upstreams picked by `rampart_core::proxy::Balancer`. Every decision
//! (which upstream, whether one is out of rotation) is a policy of `rampart-core`; this
//! crate does the I/O: TCP and HTTP listeners over static upstreams or a registry service
//! (followed by blocking reads; `target`), with a failed connect moving on to the next
//! upstream at once, active checks of static upstreams, passive ejection and a circuit
//! breaker per upstream, retries of idempotent HTTP requests under a budget, quotas,
//! shedding, read-only mode and fault injection.

mod admin;
mod checks;
mod h1;
mod http;
mod metrics;
mod pool;
mod quota;
mod target;
mod tcp;
mod upstream;
mod workers;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use rampart_client::Client;
use rampart_core::proxy::{Listener, Mode};

pub use metrics::Metrics;
pub use pool::Pool;
pub use target::Target;

/// Binds every listener (and the admin address serving `/metrics` and the health
/// endpoints), then serves them until the task is dropped. Listeners of a registry
/// service follow it through `client`. Fails at once, naming the listener, if an address
/// cannot be bound or a service listener has no control plane to ask.
pub async fn run(listeners: Vec<Listener>, admin: Option<SocketAddr>, client: Option<Arc<Client>>) -> io::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let mut bound = Vec::new();
    for listener in listeners {
        if let (Some(what), None) = (listener.needs_control_plane(), &client) {
            return Err(io::Error::other(format!(
                "listener {}: {what} needs the control plane's --endpoints",
                listener.name
            )));
        }
        let socket = tokio::net::TcpListener::bind(listener.bind).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("listener {}: cannot bind {}: {e}", listener.name, listener.bind),
            )
        })?;
        tracing::info!(listener = %listener.name, bind = %listener.bind, upstreams = ?listener.upstreams, "listening");
        let target = Arc::new(Target::new(&listener, metrics.clone()));
        bound.push((listener, socket, target));
    }
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(client) = client.clone() {
        let targets = bound.iter().map(|(_, _, t)| t.clone()).collect();
        tasks.spawn(async move {
            target::follow_all(client, targets).await;
            Ok(())
        });
    }
    if let Some(admin) = admin {
        let socket = tokio::net::TcpListener::bind(admin)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("proxy.admin: cannot bind {admin}: {e}")))?;
        let targets = bound.iter().map(|(l, _, t)| (l.name.clone(), t.clone())).collect();
        tasks.spawn(admin::serve_admin(socket, metrics.clone(), targets));
    }
    for (listener, socket, target) in bound {
        if let Some(check) = listener.check.clone() {
            let pool = target.pool.clone();
            tasks.spawn(async move {
                checks::run(pool, check).await;
                Ok(())
            });
        }
        match listener.mode {
            Mode::Tcp => tasks.spawn(tcp::serve(listener, socket, target, metrics.clone())),
            Mode::Http => tasks.spawn(http::serve(listener, socket, target, metrics.clone(), client.clone())),
        };
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(io::Error::other)??;
    }
    Ok(())
}

/// The next connection on `socket`. An accept error (out of descriptors and the like) is
/// logged and retried after a short wait rather than spun on.
async fn accept(socket: &tokio::net::TcpListener, name: &str) -> (tokio::net::TcpStream, SocketAddr) {
    loop {
        match socket.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                return (stream, peer);
            }
            Err(e) => {
                tracing::warn!(listener = %name, "accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Wall-clock milliseconds, the `now` the policies of `rampart_core::proxy` take.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
