//! The node's one listening port: peer connections (which open with `PEER_MAGIC`) go to
//! the Raft transport, everything else is HTTP/1.1 for the API.

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};

use crate::peer::{serve_peer, PeerTiming, PEER_MAGIC};
use crate::Shared;

/// How long a new connection may take to send its first bytes.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn serve(listener: TcpListener, node: Shared) {
    let router = crate::api::router(node.clone());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let raft = node.raft.clone();
        let links = node.links.clone();
        let timing = PeerTiming {
            election_timeout: node.config.election_timeout,
            heartbeat: node.config.heartbeat_interval,
        };
        tokio::spawn(async move {
            match tokio::time::timeout(FIRST_BYTES_TIMEOUT, is_peer(&stream)).await {
                Ok(Ok(true)) => {
                    if let Err(e) = serve_peer(stream, raft, links, timing).await {
                        tracing::debug!("peer connection ended: {e}");
                    }
                }
                Ok(Ok(false)) => {
                    let service = TowerToHyperService::new(router);
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                }
                _ => {}
            }
        });
    }
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
