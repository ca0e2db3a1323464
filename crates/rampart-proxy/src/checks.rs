//! Active checks of a listener's static upstreams (`check = {...}`), as HAProxy's
//! `check inter 2s rise 2 fall 3`: every interval each upstream is probed at once — a
//! connect, or an HTTP GET answered 2xx or 3xx — within the timeout, and its verdict
//! (`rampart_core::health::CheckState`) takes it out of rotation or back. A service's
//! instances need none: the region checks them and the registry says who serves.

use std::sync::Arc;
use std::time::Duration;

use rampart_core::proxy::{ActiveCheck, Probe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::pool::Pool;

/// The most of an answer read to find its status line.
const STATUS_LINE_BYTES_MAX: usize = 1024;

/// Probes `pool`'s upstreams every `check.interval_ms` until dropped.
pub async fn run(pool: Arc<Pool>, check: ActiveCheck) {
    let mut tick = tokio::time::interval(Duration::from_millis(check.interval_ms));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut probes = tokio::task::JoinSet::new();
        for address in pool.addresses() {
            let check = check.clone();
            probes.spawn(async move {
                let ok = tokio::time::timeout(Duration::from_millis(check.timeout_ms), probe(&address, &check.probe))
                    .await
                    .is_ok_and(|answered| answered.is_ok_and(|ok| ok));
                (address, ok)
            });
        }
        while let Some(done) = probes.join_next().await {
            if let Ok((address, ok)) = done {
                pool.observe(&address, ok, check.thresholds());
            }
        }
    }
}

/// One probe: whether the upstream connected (and answered the GET with 2xx or 3xx).
async fn probe(address: &str, probe: &Probe) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect(address).await?;
    let Probe::Http { path } = probe else {
        return Ok(true);
    };
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: rampart-check\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    let mut chunk = [0u8; 512];
    while !answer.windows(2).any(|w| w == b"\r\n") && answer.len() < STATUS_LINE_BYTES_MAX {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&chunk[..n]);
    }
    Ok(status_ok(&answer))
}

/// Whether an answer starts `HTTP/1.x 2xx` or `3xx`.
fn status_ok(answer: &[u8]) -> bool {
    let line = String::from_utf8_lossy(&answer[..answer.len().min(64)]);
    let mut words = line.split_ascii_whitespace();
    let version_ok = words.next().is_some_and(|v| v.starts_with("HTTP/1."));
    let code = words.next().and_then(|c| c.parse::<u16>().ok());
    version_ok && code.is_some_and(|c| (200..400).contains(&c))
}

#[cfg(test)]
mod tests {
    use super::status_ok;

    #[test]
    fn only_2xx_and_3xx_answers_pass() {
        assert!(status_ok(b"HTTP/1.1 200 OK\r\n"));
        assert!(status_ok(b"HTTP/1.0 302 Found\r\n"));
        assert!(!status_ok(b"HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(!status_ok(b"SSH-2.0-OpenSSH\r\n"));
        assert!(!status_ok(b""));
    }
}
