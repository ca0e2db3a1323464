//! A fault-injecting TCP relay: placed between two nodes (one relay per direction of each
//! pair), it passes, delays, blackholes or drops their traffic on command.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the relay does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RelayMode {
    Pass,
    /// Pass bytes on `Duration` after they arrived (a fixed one-way latency, each way).
    Delay(Duration),
    /// Accept connections but pass nothing (a silent partition: the sender times out).
    Blackhole,
    /// Close every connection at once (a refused route: the sender sees errors).
    Drop,
}

/// One relay; dropping it stops its accept loop.
pub struct Relay {
    addr: SocketAddr,
    mode: Arc<watch::Sender<RelayMode>>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts a relay on an ephemeral loopback port forwarding to `target`.
    pub async fn start(target: SocketAddr) -> std::io::Result<Relay> {
        Relay::start_on("127.0.0.1:0".parse().expect("an address"), target).await
    }

    /// Starts a relay on `listen` forwarding to `target`.
    pub async fn start_on(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Relay> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(RelayMode::Pass);
        let mode = Arc::new(mode);
        let accept_mode = mode.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let _ = inbound.set_nodelay(true);
                tokio::spawn(relay_connection(inbound, target, accept_mode.subscribe()));
            }
        });
        Ok(Relay { addr, mode, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes the mode; connections opened under another mode are cut, so no byte sent
    /// before a partition is delivered after it.
    pub fn set_mode(&self, mode: RelayMode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> RelayMode {
        *self.mode.borrow()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_connection(inbound: TcpStream, target: SocketAddr, mut mode: watch::Receiver<RelayMode>) {
    let started = *mode.borrow_and_update();
    match started {
        RelayMode::Drop => return,
        RelayMode::Blackhole => {
            // Hold the socket open and silent until the mode changes, then close it.
            let _ = mode.changed().await;
            drop(inbound);
            return;
        }
        _ => {}
    }
    let Ok(outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = outbound.set_nodelay(true);
    let (in_read, in_write) = inbound.into_split();
    let (out_read, out_write) = outbound.into_split();
    let delay = match started {
        RelayMode::Delay(d) => d,
        _ => Duration::ZERO,
    };
    let forward = pump(in_read, out_write, delay);
    let backward = pump(out_read, in_write, delay);
    tokio::select! {
        _ = forward => {}
        _ = backward => {}
        _ = mode.changed() => {}
    }
}

async fn pump(mut from: tokio::net::tcp::OwnedReadHalf, mut to: tokio::net::tcp::OwnedWriteHalf, delay: Duration) {
    let mut buf = vec![0u8; 64 * 1024];
    if delay.is_zero() {
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
    // A fixed one-way latency: every chunk leaves `delay` after it arrived, however many
    // are in flight, so the link keeps its bandwidth (a wire, not a queue of sleeps).
    let (chunks, mut due) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(4096);
    let reader = async move {
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if chunks
                .send((tokio::time::Instant::now() + delay, buf[..n].to_vec()))
                .await
                .is_err()
            {
                return;
            }
        }
    };
    let writer = async move {
        while let Some((at, bytes)) = due.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
    };
    // The writer drains what is in flight after the reader has seen the end.
    let _ = tokio::join!(reader, writer);
}
