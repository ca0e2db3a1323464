//! A worker's kept HTTP/1.1 connections to upstreams, spoken to by the request's own task:
//! the request goes out in one write(2), its response head is read and parsed in place
//! (`h1`), and the body is read by the client's response as hyper sends it on
//! ([`UpstreamBody`]). There is no connection task and no channel between the two, which
//! hyper's client needs for every exchange. A body that is already whole when its head
//! arrives (most small responses) hands its connection back at once; any other gives it
//! back when read to its end, and closes it if dropped before.
//!
//! A kept connection the upstream has closed is noticed before it is used, from the
//! readiness the runtime already has (no system call). If the upstream closes it in the
//! instant between, an idempotent request goes again on a new connection; any other fails
//! as an exchange, as it may have been acted on.

use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hyper::body::{Frame, SizeHint};
use hyper::http::uri::Authority;
use hyper::Response;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::h1::{self, Chunked, Decoded, Framing};

/// Why a response body broke off: its upstream failed, or left the pool (a demoted primary
/// at once, others after their drain).
pub(crate) type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Idle connections kept per upstream (more are closed when their response ends).
const IDLE_PER_UPSTREAM_MAX: usize = 256;
/// An idle connection older than this is closed rather than kept, so one to a quiet
/// upstream does not linger (nginx closes its side after 75 s).
const IDLE_MS_MAX: u64 = 60_000;
/// Bytes read from an upstream at a time.
const READ_BYTES: usize = 8 * 1024;

/// Why an exchange failed.
pub enum Failed {
    /// The connection could not be made: the request never left, any method may go again.
    Connect(String),
    /// It failed after the request may have been sent.
    Exchange(String),
}

/// How one exchange on a connection failed.
enum Broke {
    /// Before any of the response arrived: on a kept connection, the upstream had closed it.
    Unanswered(String),
    /// Mid-response, or the response was not HTTP.
    Midway(String),
}

/// A connection to an upstream and the bytes read from it and not yet used.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

impl Conn {
    /// Whether the upstream has left it open with nothing unasked-for to read. Uses the
    /// readiness the runtime already knows of; only if that says readable, one read.
    fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match self.stream.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

pub struct Conns {
    /// By upstream address, the most recently used last. A B-tree: a few string
    /// comparisons cost less than hashing the address twice per request.
    idle: Mutex<BTreeMap<String, Vec<Idle>>>,
    connect_timeout: Duration,
}

impl Conns {
    pub fn new(connect_timeout: Duration) -> Conns {
        Conns {
            idle: Mutex::new(BTreeMap::new()),
            connect_timeout,
        }
    }

    fn checkout(&self, authority: &str) -> Option<Conn> {
        let mut idle = self.idle.lock().expect("idle lock");
        let list = idle.get_mut(authority)?;
        while let Some(Idle { mut conn, .. }) = list.pop() {
            if conn.is_open() {
                return Some(conn);
            }
        }
        None
    }

    /// Back to the idle connections, unless bytes are left over (the upstream sent more
    /// than its response: the connection cannot be trusted) or there are enough.
    fn give_back(&self, authority: &str, conn: Conn) {
        if !conn.buf.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().expect("idle lock");
        let list = match idle.get_mut(authority) {
            Some(list) => list,
            None => idle.entry(authority.to_string()).or_default(),
        };
        let stale = list
            .iter()
            .take_while(|i| now.duration_since(i.since) > Duration::from_millis(IDLE_MS_MAX))
            .count();
        list.drain(..stale);
        if list.len() < IDLE_PER_UPSTREAM_MAX {
            list.push(Idle { conn, since: now });
        }
    }

    /// Sends `request` (bytes from `h1::encode_request`) to `authority`. `head_request`:
    /// the response has no body whatever its head says.
    pub async fn send(
        self: &Arc<Self>,
        authority: &Authority,
        request: &[u8],
        head_request: bool,
        idempotent: bool,
    ) -> Result<Response<UpstreamBody>, Failed> {
        while let Some(conn) = self.checkout(authority.as_str()) {
            match self.exchange(conn, authority, request, head_request).await {
                Ok(response) => return Ok(response),
                Err(Broke::Unanswered(_)) if idempotent => continue,
                Err(Broke::Unanswered(e) | Broke::Midway(e)) => return Err(Failed::Exchange(e)),
            }
        }
        // Opening a connection is the rare path: boxed, so the future of every request
        // does not carry (and move) its state.
        let conn = Box::pin(self.connect(authority)).await?;
        match self.exchange(conn, authority, request, head_request).await {
            Ok(response) => Ok(response),
            Err(Broke::Unanswered(e) | Broke::Midway(e)) => Err(Failed::Exchange(e)),
        }
    }

    /// One request and its response head on `conn`.
    async fn exchange(
        self: &Arc<Self>,
        mut conn: Conn,
        authority: &Authority,
        request: &[u8],
        head_request: bool,
    ) -> Result<Response<UpstreamBody>, Broke> {
        if let Err(e) = conn.stream.write_all(request).await {
            return Err(Broke::Unanswered(format!("cannot send the request: {e}")));
        }
        let mut answered = false;
        let head = loop {
            match h1::take_head(&mut conn.buf, head_request) {
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(e) => return Err(Broke::Midway(e)),
            }
            conn.buf.reserve(READ_BYTES);
            match conn.stream.read_buf(&mut conn.buf).await {
                Ok(0) if !answered => return Err(Broke::Unanswered("closed the connection without answering".into())),
                Ok(0) => {
                    return Err(Broke::Midway(
                        "closed the connection in the middle of a response head".into(),
                    ))
                }
                Ok(_) => answered = true,
                Err(e) if !answered => return Err(Broke::Unanswered(format!("connection failed: {e}"))),
                Err(e) => return Err(Broke::Midway(format!("connection failed mid-response: {e}"))),
            }
        };
        let body = match head.framing {
            Framing::Empty => {
                if head.keep_alive {
                    self.give_back(authority.as_str(), conn);
                }
                UpstreamBody::Whole(None)
            }
            Framing::Length(length) if conn.buf.len() as u64 >= length => {
                let data = conn.buf.split_to(length as usize).freeze();
                if head.keep_alive {
                    self.give_back(authority.as_str(), conn);
                }
                UpstreamBody::Whole((length > 0).then_some(data))
            }
            framing => UpstreamBody::Reading(Box::new(Reading {
                conn: Some(conn),
                framing: match framing {
                    Framing::Length(length) => Left::Length(length),
                    Framing::Chunked => Left::Chunked(Chunked::default()),
                    _ => Left::UntilClose,
                },
                keep_alive: head.keep_alive,
                conns: self.clone(),
                authority: authority.clone(),
            })),
        };
        let mut response = Response::new(body);
        *response.status_mut() = head.status;
        *response.headers_mut() = head.headers;
        Ok(response)
    }

    /// A new connection to `authority`.
    async fn connect(&self, authority: &Authority) -> Result<Conn, Failed> {
        let connect = TcpStream::connect(authority.as_str());
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(Failed::Connect(e.to_string())),
            Err(_) => {
                return Err(Failed::Connect(format!(
                    "no connection within {:?}",
                    self.connect_timeout
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(Conn {
            stream,
            buf: BytesMut::new(),
        })
    }
}

/// A response body from an upstream: whole already, or still being read.
pub enum UpstreamBody {
    Whole(Option<Bytes>),
    Reading(Box<Reading>),
}

impl UpstreamBody {
    /// Whether the body is still to be read from its upstream.
    pub fn is_reading(&self) -> bool {
        matches!(self, UpstreamBody::Reading(_))
    }
}

/// A body being read off its connection, which goes back to the idle ones at the end.
pub struct Reading {
    /// `None` once the body has ended.
    conn: Option<Conn>,
    framing: Left,
    keep_alive: bool,
    conns: Arc<Conns>,
    authority: Authority,
}

/// What is left of a body.
enum Left {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

impl Reading {
    /// The body has ended: the connection goes back if it can carry another request.
    fn end(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep_alive && !matches!(self.framing, Left::UntilClose) {
                self.conns.give_back(self.authority.as_str(), conn);
            }
        }
    }

    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // What the bytes read so far give.
            match &mut self.framing {
                Left::Length(left) if !conn.buf.is_empty() || *left == 0 => {
                    let take = usize::try_from(*left).unwrap_or(usize::MAX).min(conn.buf.len());
                    let data = conn.buf.split_to(take).freeze();
                    *left -= take as u64;
                    if *left == 0 {
                        self.end();
                    }
                    if data.is_empty() {
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Left::Chunked(decoder) => match decoder.decode(&mut conn.buf) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::End) => {
                        self.end();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::More) => {}
                    Err(e) => return Poll::Ready(Some(Err(self.broken(&e)))),
                },
                Left::UntilClose if !conn.buf.is_empty() => {
                    let data = conn.buf.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Left::Length(_) | Left::UntilClose => {}
            }
            conn.buf.reserve(READ_BYTES);
            match tokio_util::io::poll_read_buf(Pin::new(&mut conn.stream), cx, &mut conn.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if matches!(self.framing, Left::UntilClose) => {
                    self.conn = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Some(Err(self.broken("closed the connection before the body's end"))))
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    return Poll::Ready(Some(Err(self.broken(&format!("connection failed mid-body: {e}")))))
                }
            }
        }
    }

    /// The body cannot go on: its connection is closed, and the client's response cut.
    fn broken(&mut self, why: &str) -> BodyError {
        self.conn = None;
        format!("upstream {}: {why}", self.authority).into()
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::Whole(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            UpstreamBody::Reading(reading) => reading.poll_next(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Whole(data) => data.is_none(),
            UpstreamBody::Reading(reading) => reading.conn.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Whole(data) => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
            UpstreamBody::Reading(reading) => match reading.framing {
                Left::Length(left) => SizeHint::with_exact(left),
                _ => SizeHint::default(),
            },
        }
    }
}
