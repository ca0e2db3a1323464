//! The node's one listening port. Without TLS, peer connections (which open with
//! `PEER_MAGIC`) go to the Raft transport and everything else is HTTP/1.1 for the API. With
//! TLS, every connection starts with a handshake; the negotiated ALPN protocol tells a peer
//! link or a region link from an API call, and both are served only with a node
//! certificate.

use std::net::SocketAddr;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;

use crate::auth::Connection;
use crate::node::Shared;
use crate::peer::{serve_peer, PeerTiming, PEER_MAGIC};
use crate::tls::{is_node_certificate, PEER_ALPN, REGION_ALPN};

/// How long a new connection may take to send its first bytes or finish its handshake.
pub(crate) const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
/// Open connections a node serves at once (API clients, watches and peer links). Beyond
/// it a new connection is closed at once: a flood of connections, or of TLS handshakes,
/// cannot take the node's memory and CPU from the region.
pub const CONNECTIONS_MAX: usize = 4096;

pub async fn serve(listener: TcpListener, node: Shared) {
    let router = crate::api::router(node.clone());
    let metrics = node.metrics.clone();
    accept_each(listener, &metrics, move |stream, source| {
        let (router, node) = (router.clone(), node.clone());
        async move {
            if node.tls.is_some() {
                serve_tls(stream, source, node, router).await;
            } else {
                serve_plain(stream, source, node, router).await;
            }
        }
    })
    .await
}

/// Accepts connections forever and serves each with `handle` on a task of its own, at
/// most [`CONNECTIONS_MAX`] at once (beyond it a new one is closed at once and counted).
pub(crate) async fn accept_each<F, Fut>(listener: TcpListener, metrics: &crate::metrics::Metrics, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let (stream, source) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.refused("connection_limit");
            tracing::debug!(%source, "refused a connection: {CONNECTIONS_MAX} already open");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let serving = handle(stream, source);
        tokio::spawn(async move {
            let _slot = slot;
            serving.await;
        });
    }
}

fn timing(node: &Shared) -> PeerTiming {
    PeerTiming {
        election_timeout: node.config.election_timeout,
        heartbeat: node.config.heartbeat_interval,
    }
}

async fn serve_plain(stream: TcpStream, source: SocketAddr, node: Shared, router: axum::Router) {
    match tokio::time::timeout(FIRST_BYTES_TIMEOUT, is_peer(&stream)).await {
        Ok(Ok(true)) => {
            if let Err(e) = serve_peer(stream, node.raft.clone(), node.links.clone(), timing(&node)).await {
                tracing::debug!("peer connection ended: {e}");
            }
        }
        Ok(Ok(false)) => {
            let connection = Connection {
                source,
                from_node: false,
                region_link: false,
            };
            serve_http(stream, connection, router).await;
        }
        _ => {}
    }
}

async fn serve_tls(stream: TcpStream, source: SocketAddr, node: Shared, router: axum::Router) {
    let acceptor = node.tls.as_ref().expect("TLS node").acceptor.clone();
    let stream = match tokio::time::timeout(FIRST_BYTES_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            // A client with the wrong CA, a certificate from another cluster, plaintext on
            // the TLS port: counted, logged without detail from the client's bytes.
            node.metrics.refused("tls_handshake");
            tracing::debug!(%source, "TLS handshake failed: {e}");
            return;
        }
        Err(_) => return,
    };
    let (_, session) = stream.get_ref();
    let from_node = is_node_certificate(session.peer_certificates());
    if session.alpn_protocol() == Some(PEER_ALPN) {
        if !from_node {
            node.metrics.refused("peer_without_node_certificate");
            tracing::warn!(%source, "refused a peer connection without a node certificate of the cluster CA");
            return;
        }
        if let Err(e) = serve_peer(stream, node.raft.clone(), node.links.clone(), timing(&node)).await {
            tracing::debug!("peer connection ended: {e}");
        }
        return;
    }
    let region_link = session.alpn_protocol() == Some(REGION_ALPN);
    if region_link && !from_node {
        node.metrics.refused("region_link_without_node_certificate");
        tracing::warn!(%source, "refused a region link without a node certificate of the cluster CA");
        return;
    }
    let connection = Connection {
        source,
        from_node,
        region_link,
    };
    serve_http(stream, connection, router).await;
}

pub(crate) async fn serve_http<S>(stream: S, connection: Connection, router: axum::Router)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = router.map_request(move |mut request: axum::http::Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(connection);
        request
    });
    let _ = auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
        .await;
}

/// Peeks at the first bytes without consuming them.
async fn is_peer(stream: &TcpStream) -> std::io::Result<bool> {
    let mut buf = [0u8; 8];
    loop {
        let n = stream.peek(&mut buf).await?;
        if n == 0 {
            return Ok(false);
        }
        if buf[..n] != PEER_MAGIC[..n] {
            return Ok(false);
        }
        if n == PEER_MAGIC.len() {
            return Ok(true);
        }
        // A prefix of the magic arrived; wait for the rest.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
