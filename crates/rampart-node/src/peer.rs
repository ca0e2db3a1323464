//! Raft traffic between the nodes of a region: postcard frames over persistent TCP
//! connections with TCP_NODELAY, inside mutual TLS when the node has TLS settings (see
//! `tls.rs`: a peer must present a node certificate of the cluster CA).
//!
//! A peer connection opens with [`PEER_MAGIC`] so it can share the node's one `--listen`
//! port with HTTP (see `server.rs`). After that it is a plain request/response stream: a
//! frame is a 4-byte big-endian length and a postcard body. Connections are pooled per
//! target and reused; a connection that fails is dropped, never reused, so a late answer
//! can never be read as the answer to a newer request.
//!
//! A call whose caller stops waiting (openraft gives an append one heartbeat interval) does
//! not close its connection: the exchange finishes in its own task and the connection goes
//! back to the pool (at most [`EXCHANGES_MAX`] at once per target; pools are per peer,
//! shared by all of openraft's clients of it, see [`PeerLinks`]). A follower reads a
//! closed link from its leader as a sign that the
//! leader's process died (the crash fast path of `rampart_core::election`); closing on
//! every slow answer made a busy machine look like a dead leader and started elections
//! that deposed a healthy one.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use rampart_core::election::{grant_pre_vote, lease_for, LeaderContact, LogPosition};
use rampart_store::{NodeId, Raft, TypeConfig};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// First bytes of every peer connection.
pub const PEER_MAGIC: &[u8; 8] = b"RMPTPEER";
/// Largest frame either side accepts: snapshot chunks are far smaller.
const FRAME_BYTES_MAX: usize = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// Exchanges with one target at once, those whose callers stopped waiting included; a new
/// call waits (within its own timeout) for one to finish. Failing it at once instead would
/// make openraft retry at once, in a busy loop, while the target is slow. As many idle
/// connections are kept, so a finished exchange never has to close its connection.
const EXCHANGES_MAX: usize = 8;
/// How long a call may go on after its caller stopped waiting before its connection is
/// closed after all.
const LATE_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Serialize, Deserialize)]
enum PeerRequest {
    Append(AppendEntriesRequest<TypeConfig>),
    Snapshot(InstallSnapshotRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    /// "Would you vote for me?" (see `rampart_core::election`); changes nothing.
    PreVote {
        candidate: NodeId,
        last_log: Option<LogPosition>,
    },
}

/// Remote failures travel as text: the caller only needs to know the call failed.
#[derive(Serialize, Deserialize)]
enum PeerResponse {
    Append(Result<AppendEntriesResponse<NodeId>, String>),
    Snapshot(Result<InstallSnapshotResponse<NodeId>, String>),
    Vote(Result<VoteResponse<NodeId>, String>),
    PreVote(bool),
}

/// A peer connection: plain TCP, or TLS over TCP.
pub trait PeerIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> PeerIo for T {}
type PeerStream = Box<dyn PeerIo>;

async fn write_frame<T: Serialize>(stream: &mut (impl AsyncWrite + Unpin), value: &T) -> io::Result<()> {
    let body = postcard::to_allocvec(value).map_err(io::Error::other)?;
    if body.len() > FRAME_BYTES_MAX {
        return Err(io::Error::other(format!(
            "frame of {} bytes is over the {FRAME_BYTES_MAX}-byte limit",
            body.len()
        )));
    }
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    stream.write_all(&frame).await?;
    // TLS buffers records; plain TCP's flush is free.
    stream.flush().await
}

async fn read_frame<T: DeserializeOwned>(stream: &mut (impl AsyncRead + Unpin)) -> io::Result<T> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > FRAME_BYTES_MAX {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("peer frame of {len} bytes is over the limit"),
        ));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    postcard::from_bytes(&body).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// When each peer's connections to this node last closed (a leader whose links all closed
/// and that has been silent since has most likely crashed), and when each peer last
/// answered a call of this node (until when a primary's node was surely in touch).
///
/// Also this node's connections to each peer, shared by every client of that peer: openraft
/// makes a client per replication stream, but also one per leadership check (every
/// linearizable read) and drops it after one call. A pool per client would open a
/// connection for that call and close it after, and the follower would read the close as
/// its leader dying.
#[derive(Default)]
pub struct PeerLinks {
    closed_at: Mutex<BTreeMap<NodeId, Instant>>,
    answered_at: Mutex<BTreeMap<NodeId, Instant>>,
    pools: Mutex<BTreeMap<(NodeId, String), Arc<Pool>>>,
}

impl std::fmt::Debug for PeerLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerLinks").finish_non_exhaustive()
    }
}

/// The connections to one peer at one address: idle ones, and permits for exchanges.
struct Pool {
    idle: Mutex<Vec<PeerStream>>,
    exchanges: Arc<tokio::sync::Semaphore>,
}

impl PeerLinks {
    fn pool(&self, peer: NodeId, addr: &str) -> Arc<Pool> {
        let mut pools = self.pools.lock().expect("links lock");
        pools
            .entry((peer, addr.to_string()))
            .or_insert_with(|| {
                Arc::new(Pool {
                    idle: Mutex::new(Vec::new()),
                    exchanges: Arc::new(tokio::sync::Semaphore::new(EXCHANGES_MAX)),
                })
            })
            .clone()
    }

    fn answered(&self, peer: NodeId) {
        self.answered_at
            .lock()
            .expect("links lock")
            .insert(peer, Instant::now());
    }

    /// When an answer from `peer` last arrived here. Later than anything the peer heard
    /// from this node before answering, so a hold the peer measures from its last contact
    /// ends no later than the same hold measured from here.
    pub fn answered_at(&self, peer: NodeId) -> Option<Instant> {
        self.answered_at.lock().expect("links lock").get(&peer).copied()
    }

    fn closed(&self, peer: NodeId) {
        self.closed_at.lock().expect("links lock").insert(peer, Instant::now());
    }

    pub fn closed_at(&self, peer: NodeId) -> Option<Instant> {
        self.closed_at.lock().expect("links lock").get(&peer).copied()
    }
}

/// What this node knows of its current leader's liveness.
pub async fn leader_contact(raft: &Raft, links: &PeerLinks) -> Option<LeaderContact> {
    let leader = raft.metrics().borrow().current_leader;
    let last = raft
        .with_raft_state(|s| s.vote_last_modified().map(|i| i.into_std()))
        .await
        .ok()?;
    Some(LeaderContact {
        last,
        link_closed: leader.and_then(|l| links.closed_at(l)),
    })
}

/// Timing a peer connection needs to answer pre-votes.
#[derive(Debug, Clone, Copy)]
pub struct PeerTiming {
    pub election_timeout: Duration,
    pub heartbeat: Duration,
}

/// This node's answer to a pre-vote.
async fn answer_pre_vote(
    raft: &Raft,
    links: &PeerLinks,
    timing: PeerTiming,
    candidate_log: Option<LogPosition>,
) -> bool {
    let is_leader = raft.metrics().borrow().state == openraft::ServerState::Leader;
    let own_log = raft.data_metrics().borrow().last_log.as_ref().map(log_position);
    let Some(contact) = leader_contact(raft, links).await else {
        return false;
    };
    let lease = lease_for(timing.election_timeout);
    grant_pre_vote(
        Instant::now(),
        is_leader,
        contact,
        lease,
        timing.heartbeat,
        candidate_log,
        own_log,
    )
}

pub fn log_position(id: &openraft::LogId<NodeId>) -> LogPosition {
    (id.leader_id.term, id.index)
}

/// Serves one accepted peer connection (magic already peeked, not yet read), noting in
/// `links` when a connection that carried a leader's appends closes.
pub async fn serve_peer(stream: impl PeerIo, raft: Raft, links: Arc<PeerLinks>, timing: PeerTiming) -> io::Result<()> {
    let mut sender = None;
    let result = serve_frames(stream, &raft, &links, timing, &mut sender).await;
    if let Some(leader) = sender {
        links.closed(leader);
    }
    result
}

async fn serve_frames(
    mut stream: impl PeerIo,
    raft: &Raft,
    links: &PeerLinks,
    timing: PeerTiming,
    sender: &mut Option<NodeId>,
) -> io::Result<()> {
    let mut magic = [0u8; 8];
    stream.read_exact(&mut magic).await?;
    loop {
        let request: PeerRequest = match read_frame(&mut stream).await {
            Ok(request) => request,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        let response = match request {
            PeerRequest::Append(rpc) => {
                *sender = Some(rpc.vote.leader_id().voted_for().unwrap_or_default());
                PeerResponse::Append(raft.append_entries(rpc).await.map_err(|e| e.to_string()))
            }
            PeerRequest::Snapshot(rpc) => {
                PeerResponse::Snapshot(raft.install_snapshot(rpc).await.map_err(|e| e.to_string()))
            }
            PeerRequest::Vote(rpc) => PeerResponse::Vote(raft.vote(rpc).await.map_err(|e| e.to_string())),
            PeerRequest::PreVote { candidate, last_log } => {
                let granted = answer_pre_vote(raft, links, timing, last_log).await;
                tracing::debug!(candidate, granted, "pre-vote");
                PeerResponse::PreVote(granted)
            }
        };
        write_frame(&mut stream, &response).await?;
    }
}

/// Builds a [`PeerClient`] per target. `peer_via` overrides where a peer is dialled
/// (relays in tests, NAT in the field); otherwise the address in the membership is used.
#[derive(Clone)]
pub struct PeerNetwork {
    pub peer_via: Arc<BTreeMap<NodeId, SocketAddr>>,
    /// `Some` on a TLS node: every link is mutual TLS.
    pub tls: Option<TlsConnector>,
    pub links: Arc<PeerLinks>,
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerClient {
        let addr = match self.peer_via.get(&target) {
            Some(via) => via.to_string(),
            None => node.addr.clone(),
        };
        PeerClient::new(target, addr, self.tls.clone(), self.links.clone())
    }
}

pub struct PeerClient {
    target: NodeId,
    addr: String,
    tls: Option<TlsConnector>,
    links: Arc<PeerLinks>,
    /// Shared with every other client of this peer (see [`PeerLinks`]).
    pool: Arc<Pool>,
}

enum CallError {
    Connect(io::Error),
    Io(io::Error),
    Remote(String),
}

impl PeerClient {
    pub fn new(target: NodeId, addr: String, tls: Option<TlsConnector>, links: Arc<PeerLinks>) -> PeerClient {
        let pool = links.pool(target, &addr);
        PeerClient {
            target,
            addr,
            tls,
            links,
            pool,
        }
    }

    /// Asks the target for a pre-vote; any failure counts as "no".
    pub async fn pre_vote(&self, candidate: NodeId, last_log: Option<LogPosition>, ttl: Duration) -> bool {
        matches!(
            self.call(PeerRequest::PreVote { candidate, last_log }, ttl).await,
            Ok(PeerResponse::PreVote(true))
        )
    }

    async fn connect(&self) -> Result<PeerStream, io::Error> {
        let pooled = self.pool.idle.lock().expect("pool lock").pop();
        if let Some(stream) = pooled {
            return Ok(stream);
        }
        let timed_out = || io::Error::new(io::ErrorKind::TimedOut, format!("connect to {} timed out", self.addr));
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| timed_out())??;
        tcp.set_nodelay(true)?;
        let mut stream: PeerStream = match &self.tls {
            None => Box::new(tcp),
            Some(connector) => Box::new(
                tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(crate::tls::node_server_name(), tcp))
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake with {} failed: {e}", self.addr)))?,
            ),
        };
        stream.write_all(PEER_MAGIC).await?;
        Ok(stream)
    }

    /// One request and its answer, waited for at most `ttl`. The exchange runs in a task
    /// of its own, so a caller that stops waiting (or is dropped by openraft) leaves it to
    /// finish and pool the connection instead of closing it (see the module's opening).
    async fn call(&self, request: PeerRequest, ttl: Duration) -> Result<PeerResponse, CallError> {
        let timed_out = || CallError::Io(io::Error::new(io::ErrorKind::TimedOut, "peer call timed out"));
        let started = Instant::now();
        let permit = tokio::time::timeout(ttl, self.pool.exchanges.clone().acquire_owned())
            .await
            .map_err(|_| timed_out())?
            .expect("the semaphore is never closed");
        let mut stream = self.connect().await.map_err(CallError::Connect)?;
        let pool = self.pool.clone();
        let links = self.links.clone();
        let target = self.target;
        let exchange = tokio::spawn(async move {
            let exchange = async {
                write_frame(&mut stream, &request).await?;
                read_frame::<PeerResponse>(&mut stream).await
            };
            let answer = match tokio::time::timeout(ttl.max(LATE_ANSWER_TIMEOUT), exchange).await {
                Ok(answer) => answer,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "peer call unanswered")),
            };
            if answer.is_ok() {
                links.answered(target);
                let mut idle = pool.idle.lock().expect("pool lock");
                if idle.len() < EXCHANGES_MAX {
                    idle.push(stream);
                }
            }
            drop(permit);
            answer
        });
        match tokio::time::timeout(ttl.saturating_sub(started.elapsed()), exchange).await {
            Err(_) => Err(timed_out()),
            Ok(Err(join)) => Err(CallError::Io(io::Error::other(join))),
            Ok(Ok(answer)) => answer.map_err(CallError::Io),
        }
    }

    fn rpc_error<E: std::error::Error>(&self, error: CallError) -> RPCError<NodeId, BasicNode, E> {
        match error {
            CallError::Connect(e) => RPCError::Unreachable(Unreachable::new(&e)),
            CallError::Io(e) => RPCError::Network(NetworkError::new(&e)),
            CallError::Remote(message) => RPCError::Network(NetworkError::new(&io::Error::other(format!(
                "node {}: {message}",
                self.target
            )))),
        }
    }
}

fn unexpected() -> CallError {
    CallError::Io(io::Error::new(
        io::ErrorKind::InvalidData,
        "peer answered a different request kind",
    ))
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.call(PeerRequest::Append(rpc), option.hard_ttl()).await {
            Ok(PeerResponse::Append(Ok(response))) => Ok(response),
            Ok(PeerResponse::Append(Err(message))) => Err(self.rpc_error(CallError::Remote(message))),
            Ok(_) => Err(self.rpc_error(unexpected())),
            Err(e) => Err(self.rpc_error(e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        match self.call(PeerRequest::Snapshot(rpc), option.hard_ttl()).await {
            Ok(PeerResponse::Snapshot(Ok(response))) => Ok(response),
            Ok(PeerResponse::Snapshot(Err(message))) => Err(self.rpc_error(CallError::Remote(message))),
            Ok(_) => Err(self.rpc_error(unexpected())),
            Err(e) => Err(self.rpc_error(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.call(PeerRequest::Vote(rpc), option.hard_ttl()).await {
            Ok(PeerResponse::Vote(Ok(response))) => Ok(response),
            Ok(PeerResponse::Vote(Err(message))) => Err(self.rpc_error(CallError::Remote(message))),
            Ok(_) => Err(self.rpc_error(unexpected())),
            Err(e) => Err(self.rpc_error(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    /// A peer that accepts one connection only and answers pre-votes on it; the first
    /// answer waits until `release` is notified.
    async fn one_connection_peer(release: Arc<Notify>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut magic = [0u8; 8];
            stream.read_exact(&mut magic).await.expect("magic");
            let mut first = true;
            while let Ok(PeerRequest::PreVote { .. }) = read_frame::<PeerRequest>(&mut stream).await {
                if first {
                    release.notified().await;
                    first = false;
                }
                write_frame(&mut stream, &PeerResponse::PreVote(true))
                    .await
                    .expect("answer");
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_call_its_caller_gave_up_on_keeps_its_connection_for_the_next_call() {
        let release = Arc::new(Notify::new());
        let addr = one_connection_peer(release.clone()).await;
        let client = PeerClient::new(2, addr.to_string(), None, Arc::new(PeerLinks::default()));
        // The caller stops waiting long before the peer answers.
        assert!(!client.pre_vote(1, None, Duration::from_millis(20)).await);
        release.notify_one();
        // The late answer is read in the background and the connection pooled...
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.pool.idle.lock().expect("pool lock").is_empty() {
            assert!(Instant::now() < deadline, "the late answer never came back to the pool");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // ...so the next call is answered on the same connection (the peer accepts no other):
        // the peer never saw the link close.
        assert!(client.pre_vote(1, None, Duration::from_secs(30)).await);
        assert!(client.links.answered_at(2).is_some());
    }

    #[tokio::test]
    async fn a_client_dropped_after_one_call_leaves_its_connection_to_the_next() {
        let release = Arc::new(Notify::new());
        release.notify_one();
        let addr = one_connection_peer(release).await;
        let links = Arc::new(PeerLinks::default());
        // As openraft does for each leadership check: a client for one call, then dropped.
        let once = PeerClient::new(2, addr.to_string(), None, links.clone());
        assert!(once.pre_vote(1, None, Duration::from_secs(30)).await);
        drop(once);
        // The peer accepts one connection only: the next client must find it open.
        let next = PeerClient::new(2, addr.to_string(), None, links);
        assert!(next.pre_vote(1, None, Duration::from_secs(30)).await);
    }
}
