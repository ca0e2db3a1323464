//! A worker's kept HTTP/1.1 connections to upstreams (`hyper::client::conn::http1`). A
//! request takes an idle connection to its upstream, or opens one; the connection comes
//! back when its response body has been read to the end ([`Kept`]), with no task per
//! request. A request that an idle connection could not take (the upstream closed it) goes
//! to the next one, or to a new connection: it was never sent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::http::uri::Authority;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// Idle connections kept per upstream (more are closed when their response ends).
const IDLE_PER_UPSTREAM_MAX: usize = 256;

/// Why an exchange failed.
pub enum Failed {
    /// The connection could not be made: the request never left, any method may go again.
    Connect(String),
    /// It failed after the request may have been sent.
    Exchange(String),
}

pub struct Conns {
    /// By upstream address. A B-tree: a few string comparisons cost less than hashing the
    /// address twice per request.
    idle: Mutex<BTreeMap<String, Vec<SendRequest<Full<Bytes>>>>>,
    connect_timeout: Duration,
}

/// A connection lent to one exchange, given back when its response has been read.
pub struct Kept {
    sender: SendRequest<Full<Bytes>>,
    conns: Arc<Conns>,
    authority: Authority,
}

impl Kept {
    /// Back to the idle connections, if the upstream kept it open.
    pub fn give_back(self) {
        if self.sender.is_closed() {
            return;
        }
        let mut idle = self.conns.idle.lock().expect("idle lock");
        match idle.get_mut(self.authority.as_str()) {
            Some(list) if list.len() >= IDLE_PER_UPSTREAM_MAX => {}
            Some(list) => list.push(self.sender),
            None => {
                idle.insert(self.authority.to_string(), vec![self.sender]);
            }
        }
    }
}

impl Conns {
    pub fn new(connect_timeout: Duration) -> Conns {
        Conns {
            idle: Mutex::new(BTreeMap::new()),
            connect_timeout,
        }
    }

    fn checkout(&self, authority: &Authority) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().expect("idle lock");
        let list = idle.get_mut(authority.as_str())?;
        while let Some(sender) = list.pop() {
            if !sender.is_closed() {
                return Some(sender);
            }
        }
        None
    }

    /// Sends `request` (origin-form URI, Host set) to `authority`.
    pub async fn send(
        self: &Arc<Self>,
        authority: &Authority,
        mut request: Request<Full<Bytes>>,
    ) -> Result<(Response<Incoming>, Kept), Failed> {
        let kept = |sender| Kept {
            sender,
            conns: self.clone(),
            authority: authority.clone(),
        };
        while let Some(mut sender) = self.checkout(authority) {
            if sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, kept(sender))),
                Err(mut e) => match e.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(Failed::Exchange(e.into_error().to_string())),
                },
            }
        }
        // Opening a connection is the rare path: boxed, so the future of every request
        // does not carry (and move) its state.
        let mut sender = Box::pin(self.connect(authority)).await?;
        match sender.send_request(request).await {
            Ok(response) => Ok((response, kept(sender))),
            Err(e) => Err(Failed::Exchange(e.to_string())),
        }
    }

    /// A new connection to `authority`, ready for a request.
    async fn connect(&self, authority: &Authority) -> Result<SendRequest<Full<Bytes>>, Failed> {
        let connect = tokio::net::TcpStream::connect(authority.as_str());
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
        // One buffer, one write(2) per request, rather than writev(2) of head and body.
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| Failed::Connect(e.to_string()))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }
}
