//! Worker threads for a listener: one per core (`RAMPART_PROXY_WORKERS` sets another count),
//! each a single-threaded tokio runtime. The accept loop hands each connection, in turn,
//! to a worker, which serves it to the end: a connection, its upstream connection and
//! every exchange between them stay on one thread, with no hand-over between threads.
//! The workers stop when the accept loop's future is dropped.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

/// Worker threads per listener: `RAMPART_PROXY_WORKERS`, else one per core.
fn count() -> usize {
    std::env::var("RAMPART_PROXY_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, 256)
}

/// Accepts `socket`'s connections forever, serving each with `serve` on a worker, whose
/// own state `state` makes on the worker's thread.
pub async fn serve_on_workers<S, Fut>(
    name: &str,
    socket: TcpListener,
    state: impl Fn() -> S + Send + Clone + 'static,
    serve: fn(Arc<S>, TcpStream, SocketAddr) -> Fut,
) -> io::Result<()>
where
    S: Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let workers = count();
    let mut hands = Vec::new();
    for i in 0..workers {
        let (hand, mut handed) = tokio::sync::mpsc::unbounded_channel::<(std::net::TcpStream, SocketAddr)>();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let state = state.clone();
        let listener = name.to_string();
        std::thread::Builder::new()
            .name(format!("proxy-{name}-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let state = Arc::new(state());
                    while let Some((stream, peer)) = handed.recv().await {
                        match TcpStream::from_std(stream) {
                            Ok(stream) => {
                                tokio::spawn(serve(state.clone(), stream, peer));
                            }
                            Err(e) => tracing::warn!(%listener, "cannot take a connection: {e}"),
                        }
                    }
                });
            })?;
        hands.push(hand);
    }
    for next in (0..workers).cycle() {
        let (stream, peer) = crate::accept(&socket, name).await;
        if hands[next].send((stream.into_std()?, peer)).is_err() {
            return Err(io::Error::other(format!("listener {name}: a worker stopped")));
        }
    }
    unreachable!("the workers cycle forever")
}
