//! A scripted HTTP/1.1 backend for tests: it answers every request head (bodies are not
//! read) as the test says, keeps connections alive unless told otherwise, and counts the
//! connections and requests it took. The proxy's tests put it behind listeners; the
//! node's HTTP health checks probe it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

/// What the backend does with one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Send these bytes and keep the connection for the next request.
    Keep(String),
    /// Send these bytes, then close the connection.
    Close(String),
    /// Close the connection without an answer, as a process killed mid-request does.
    Drop,
}

/// A running backend.
pub struct HttpBackend {
    pub addr: SocketAddr,
    /// Aborting it closes the port and every kept connection.
    pub task: JoinHandle<()>,
    /// Connections accepted.
    pub connections: Arc<AtomicUsize>,
    /// Requests received (counted before any wait or answer).
    pub requests: Arc<AtomicUsize>,
}

impl HttpBackend {
    /// Serves `listener`: the `n`th request (from 0), whose request line is `line`, gets
    /// `answer(n, line)`, each only once `gate` (if given) is true.
    pub fn start(
        listener: TcpListener,
        gate: Option<watch::Receiver<bool>>,
        answer: impl Fn(usize, &str) -> Answer + Send + Sync + 'static,
    ) -> HttpBackend {
        let addr = listener.local_addr().expect("a bound listener has an address");
        let connections = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(AtomicUsize::new(0));
        let answer = Arc::new(answer);
        let (accepted, counted) = (connections.clone(), requests.clone());
        let task = tokio::spawn(async move {
            let mut open = JoinSet::new();
            while let Ok((mut stream, _)) = listener.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                let (counted, answer, mut gate) = (counted.clone(), answer.clone(), gate.clone());
                // Held by this task: aborting the backend closes its kept connections too.
                open.spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Ok(n) = stream.read(&mut chunk).await else { return };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head: Vec<u8> = buf.drain(..end + 4).collect();
                            let head = String::from_utf8_lossy(&head);
                            let line = head.lines().next().unwrap_or("");
                            let n = counted.fetch_add(1, Ordering::SeqCst);
                            if let Some(gate) = &mut gate {
                                let _ = gate.wait_for(|open| *open).await;
                            }
                            let (bytes, keep) = match answer(n, line) {
                                Answer::Keep(bytes) => (bytes, true),
                                Answer::Close(bytes) => (bytes, false),
                                Answer::Drop => return,
                            };
                            if stream.write_all(bytes.as_bytes()).await.is_err() || !keep {
                                return;
                            }
                        }
                    }
                });
            }
        });
        HttpBackend {
            addr,
            task,
            connections,
            requests,
        }
    }
}
