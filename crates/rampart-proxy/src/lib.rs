//! `rampart-proxy` is Rampart's traffic plane: listeners that take client connections and
//! pass them to healthy upstreams picked by `rampart_core::proxy::Balancer`. Every decision
//! (which upstream, whether one is out of rotation) is a policy of `rampart-core`; this
//! crate does the I/O. Built so far: TCP and HTTP/1.1 listeners over static upstreams,
//! with a failed connect moving on to the next upstream at once, passive ejection and a
//! circuit breaker per upstream, and retries of idempotent HTTP requests under a budget.

mod http;
mod pool;
mod tcp;

use std::io;

use rampart_core::proxy::{Listener, Mode, Upstreams};

pub use pool::Pool;

/// Binds every listener, then serves them until the task is dropped. Fails at once, naming
/// the listener, if an address cannot be bound or a listener asks for what is not built.
pub async fn run(listeners: Vec<Listener>) -> io::Result<()> {
    let mut bound = Vec::new();
    for listener in listeners {
        let Upstreams::Static(upstreams) = &listener.upstreams else {
            return Err(io::Error::other(format!(
                "listener {}: upstreams from the service registry are not built yet; list static upstreams",
                listener.name
            )));
        };
        let socket = tokio::net::TcpListener::bind(listener.bind).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("listener {}: cannot bind {}: {e}", listener.name, listener.bind),
            )
        })?;
        tracing::info!(listener = %listener.name, bind = %listener.bind, upstreams = upstreams.len(), "listening");
        let pool = Pool::new(upstreams, listener.algorithm);
        bound.push((listener, socket, pool));
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (listener, socket, pool) in bound {
        match listener.mode {
            Mode::Tcp => tasks.spawn(tcp::serve(listener, socket, pool)),
            Mode::Http => tasks.spawn(http::serve(listener, socket, pool)),
        };
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(io::Error::other)??;
    }
    Ok(())
}
