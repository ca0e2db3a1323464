//! The client behind plain-HTTP checks: each probe keeps one HTTP/1.1 connection of its
//! own (hyper's connection-level client, driven inside the probe's task) and reuses it for
//! every run. A general client (pool, redirects, retries, a connection task per
//! connection) cost three times the CPU per probe; see `bench --check-cost`.
//!
//! A connection the instance closed between runs is replaced at once, within the same run;
//! a connection that failed, timed out or carried an oversized body is dropped. `https://`
//! targets go through the node's general client instead.

use std::future::Future;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::client::conn::http1;
use hyper::header::HOST;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// The largest response body read; a larger one fails a `body_contains` check and closes
/// the connection.
const BODY_BYTES_MAX: usize = 64 * 1024;

/// Where a plain-HTTP check goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `host:port` to connect to.
    addr: String,
    /// The `Host` header.
    host: String,
    /// Path and query asked for.
    path: String,
}

impl Target {
    /// `None` for anything but an absolute `http://` URL (`https://` included).
    pub fn parse(url: &str) -> Option<Target> {
        let uri: Uri = url.parse().ok()?;
        if uri.scheme_str() != Some("http") {
            return None;
        }
        let authority = uri.authority()?;
        let addr = match authority.port_u16() {
            Some(_) => authority.as_str().to_string(),
            None => format!("{}:80", authority.host()),
        };
        Some(Target {
            addr,
            host: authority.as_str().to_string(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        })
    }
}

/// What a healthy answer looks like.
#[derive(Debug, Clone, Copy)]
pub struct Expect<'a> {
    pub status_min: u16,
    pub status_max: u16,
    pub body_contains: Option<&'a str>,
}

type Driver = http1::Connection<TokioIo<TcpStream>, Empty<Bytes>>;

struct Connection {
    sender: http1::SendRequest<Empty<Bytes>>,
    /// Moves the bytes; `None` once the connection has ended.
    driver: Option<Driver>,
}

/// One probe's client: at most one open connection.
#[derive(Default)]
pub struct HttpProbe {
    connection: Option<Box<Connection>>,
}

impl HttpProbe {
    /// Runs one check; true when healthy. The caller bounds it with the check's timeout
    /// (a run cut short drops its connection).
    pub async fn check(&mut self, target: &Target, expect: Expect<'_>) -> bool {
        let reused = self.connection.is_some();
        let mut connection = match self.connection.take() {
            Some(connection) => connection,
            None => match connect(target).await {
                Some(connection) => connection,
                None => return false,
            },
        };
        let mut answer = exchange(&mut connection, target, expect).await;
        if answer.is_none() && reused {
            // A kept connection the instance closed meanwhile says nothing of its health.
            let Some(fresh) = connect(target).await else {
                return false;
            };
            connection = fresh;
            answer = exchange(&mut connection, target, expect).await;
        }
        match answer {
            Some(Judged { healthy, reusable }) => {
                if reusable {
                    self.connection = Some(connection);
                }
                healthy
            }
            None => false,
        }
    }
}

/// The instance answered: judged, and whether the connection can carry the next request.
struct Judged {
    healthy: bool,
    reusable: bool,
}

async fn connect(target: &Target) -> Option<Box<Connection>> {
    let stream = TcpStream::connect(&target.addr).await.ok()?;
    stream.set_nodelay(true).ok()?;
    let (sender, driver) = http1::handshake(TokioIo::new(stream)).await.ok()?;
    Some(Box::new(Connection {
        sender,
        driver: Some(driver),
    }))
}

/// Runs `work` while driving the connection. If the connection ends first it is dropped,
/// which ends whatever still waits on it, and `work` finishes with what was delivered.
async fn driving<F: Future>(driver: &mut Option<Driver>, work: F) -> F::Output {
    let mut work = std::pin::pin!(work);
    if let Some(running) = driver {
        tokio::select! {
            biased;
            out = &mut work => return out,
            _ = running => {}
        }
        *driver = None;
    }
    work.await
}

/// One request and its answer; `None` if the connection ended before an answer.
async fn exchange(connection: &mut Connection, target: &Target, expect: Expect<'_>) -> Option<Judged> {
    let Connection { sender, driver } = connection;
    driving(driver, sender.ready()).await.ok()?;
    let Ok(request) = Request::get(target.path.as_str())
        .header(HOST, target.host.as_str())
        .body(Empty::new())
    else {
        return Some(Judged {
            healthy: false,
            reusable: false,
        });
    };
    let response = driving(driver, sender.send_request(request)).await.ok()?;
    let status = response.status().as_u16();
    let status_ok = (expect.status_min..=expect.status_max).contains(&status);
    // The body is read in full (bounded) so the connection can carry the next request.
    let body = Limited::new(response.into_body(), BODY_BYTES_MAX).collect();
    Some(match driving(driver, body).await {
        Ok(collected) => Judged {
            healthy: status_ok
                && expect.body_contains.is_none_or(|needle| {
                    let bytes = collected.to_bytes();
                    String::from_utf8_lossy(&bytes).contains(needle)
                }),
            reusable: driver.is_some(),
        },
        // Too large, or cut off: judged on the status alone if that is all that is asked.
        Err(_) => Judged {
            healthy: status_ok && expect.body_contains.is_none(),
            reusable: false,
        },
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use rampart_testkit::{Answer, HttpBackend};

    use super::*;

    /// A server answering every request with `response`, closing each connection after one
    /// answer when `close`; counts the connections it accepted.
    async fn server(response: &'static str, close: bool) -> (Target, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = HttpBackend::start(listener, None, move |_, _| match close {
            true => Answer::Close(response.to_string()),
            false => Answer::Keep(response.to_string()),
        });
        let target = Target::parse(&format!("http://{}/health", backend.addr)).unwrap();
        (target, backend.connections)
    }

    const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nhealthy";
    const FAILING: &str = "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\ndown";

    fn expect(body_contains: Option<&str>) -> Expect<'_> {
        Expect {
            status_min: 200,
            status_max: 399,
            body_contains,
        }
    }

    #[tokio::test]
    async fn a_probe_keeps_its_connection_across_runs() {
        let (target, accepted) = server(OK, false).await;
        let mut probe = HttpProbe::default();
        for _ in 0..5 {
            assert!(probe.check(&target, expect(Some("healthy"))).await);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        assert!(!probe.check(&target, expect(Some("ready"))).await, "body must match");
    }

    #[tokio::test]
    async fn a_connection_the_instance_closed_is_replaced_within_the_run() {
        let (target, accepted) = server(OK, true).await;
        let mut probe = HttpProbe::default();
        for i in 0..3 {
            assert!(probe.check(&target, expect(None)).await, "run {i}");
        }
        assert!(accepted.load(Ordering::SeqCst) >= 3);
    }

    #[tokio::test]
    async fn bad_statuses_and_silent_ports_fail() {
        let (target, _) = server(FAILING, false).await;
        let mut probe = HttpProbe::default();
        assert!(!probe.check(&target, expect(None)).await);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let closed = Target::parse(&format!("http://{}/", listener.local_addr().unwrap())).unwrap();
        drop(listener);
        assert!(!HttpProbe::default().check(&closed, expect(None)).await);
    }

    #[test]
    fn targets_are_plain_http_urls() {
        let t = Target::parse("http://127.0.0.1:8081/health?deep=1").unwrap();
        assert_eq!(
            (t.addr.as_str(), t.host.as_str(), t.path.as_str()),
            ("127.0.0.1:8081", "127.0.0.1:8081", "/health?deep=1")
        );
        let t = Target::parse("http://db.internal").unwrap();
        assert_eq!((t.addr.as_str(), t.path.as_str()), ("db.internal:80", "/"));
        assert!(Target::parse("https://127.0.0.1/health").is_none());
        assert!(Target::parse("127.0.0.1:80").is_none());
    }
}
