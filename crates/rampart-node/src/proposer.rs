//! Group commit: gathers concurrent client writes into one Raft entry.
//!
//! Openraft 0.9 appends and fsyncs one entry at a time on every node, so one write per
//! entry caps a region at one write per fsync. Here every write goes into a bounded queue;
//! a batcher keeps at most [`IN_FLIGHT_MAX`] proposals in flight and, whenever one slot is
//! free, proposes everything queued so far (up to [`BATCH_COMMANDS_MAX`] writes and
//! [`BATCH_BYTES_MAX`] bytes) as one [`Batch`]. At low load a batch holds one write and adds
//! no wait; under load batches grow, as etcd's raft batches the proposals of one `Ready`.
//! Each write still gets its own revision and outcome, in queue order.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use openraft::error::{ClientWriteError, RaftError};
use rampart_store::{Batch, Command, Outcome, Raft};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// Proposals in flight at once: more than one lets the leader's fsync of one batch overlap
/// the followers' round trip of the previous one.
pub const IN_FLIGHT_MAX: usize = 2;
/// Writes in one batch at most.
pub const BATCH_COMMANDS_MAX: usize = 1024;
/// Encoded size of one batch at most (a single larger write still goes alone); well under
/// the peer transport's frame limit.
pub const BATCH_BYTES_MAX: usize = 4 << 20;
/// Writes waiting for a batch at most; beyond it, proposers wait (backpressure).
const QUEUE_MAX: usize = 16 * 1024;

/// Why a batch failed; every write in it gets the matching API error.
#[derive(Debug, Clone)]
enum BatchError {
    /// Leadership was lost after the batch may have been appended: outcome unknown.
    LeadershipLost,
    /// This leader stopped hearing from a majority (cut off, or the others paused) while
    /// the batch was in flight: outcome unknown, and the writer should try elsewhere now
    /// rather than at its deadline (a new leader is being elected meanwhile).
    CutOff(Duration),
    TimedOut(Duration),
    Failed(String),
}

impl BatchError {
    fn to_api(&self) -> ApiError {
        match self {
            // Openraft also answers ForwardToLeader when leadership is lost after the entry
            // was appended, and a successor may still commit it: the outcome is unknown.
            BatchError::LeadershipLost => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "leadership_lost",
                "this node lost leadership while proposing; the write may or may not take effect",
            ),
            BatchError::CutOff(silence) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "leadership_lost",
                format!(
                    "this leader has not heard from a majority for {} ms while proposing; the write may or may not take effect",
                    silence.as_millis()
                ),
            ),
            BatchError::TimedOut(after) => ApiError::timeout("the write", *after),
            BatchError::Failed(message) => ApiError::internal(format!("write failed: {message}")),
        }
    }
}

struct Proposal {
    command: Command,
    bytes: usize,
    reply: oneshot::Sender<Result<Outcome, BatchError>>,
}

/// The handle every write goes through.
pub struct Proposer {
    queue: mpsc::Sender<Proposal>,
}

impl Proposer {
    /// Starts the batcher for `raft`; each batch's proposal gives up after `timeout`, or
    /// once this leader has not heard from a majority for four `election_timeout`s.
    pub fn start(raft: Raft, metrics: Arc<Metrics>, timeout: Duration, election_timeout: Duration) -> Proposer {
        let (queue, waiting) = mpsc::channel(QUEUE_MAX);
        tokio::spawn(batch_loop(raft, metrics, timeout, election_timeout, waiting));
        Proposer { queue }
    }

    /// Queues one write and waits for its outcome, for at most `timeout`.
    pub async fn propose(&self, command: Command, timeout: Duration) -> Result<Outcome, ApiError> {
        let waited = tokio::time::timeout(timeout, async { self.submit(command).await?.outcome().await }).await;
        waited.unwrap_or_else(|_| Err(ApiError::timeout("the write", timeout)))
    }

    /// Queues one write (waiting for room in the queue) and returns its outcome to come:
    /// writes submitted one after another are applied in that order, so a caller may keep
    /// many in flight (a region link does).
    pub async fn submit(&self, command: Command) -> Result<Pending, ApiError> {
        let bytes = command.op.approx_bytes();
        let (reply, answer) = oneshot::channel();
        let proposal = Proposal { command, bytes, reply };
        self.queue
            .send(proposal)
            .await
            .map_err(|_| ApiError::internal("the proposer stopped"))?;
        Ok(Pending(answer))
    }
}

/// The outcome of a submitted write, to come.
pub struct Pending(oneshot::Receiver<Result<Outcome, BatchError>>);

impl Pending {
    pub async fn outcome(self) -> Result<Outcome, ApiError> {
        self.0
            .await
            .map_err(|_| ApiError::internal("the proposer dropped the write"))?
            .map_err(|e| e.to_api())
    }

    /// The outcome if it is there already.
    pub fn ready(&mut self) -> Option<Result<Outcome, ApiError>> {
        match self.0.try_recv() {
            Ok(answer) => Some(answer.map_err(|e| e.to_api())),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => {
                Some(Err(ApiError::internal("the proposer dropped the write")))
            }
        }
    }
}

async fn batch_loop(
    raft: Raft,
    metrics: Arc<Metrics>,
    timeout: Duration,
    election_timeout: Duration,
    mut waiting: mpsc::Receiver<Proposal>,
) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
    // A proposal that did not fit the previous batch opens the next one.
    let mut carried: Option<Proposal> = None;
    loop {
        let first = match carried.take() {
            Some(proposal) => proposal,
            None => match waiting.recv().await {
                Some(proposal) => proposal,
                None => return,
            },
        };
        // Wait for a free slot before gathering: writes that arrive meanwhile join this batch.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.bytes;
        let mut batch = vec![first];
        while batch.len() < BATCH_COMMANDS_MAX {
            let Ok(next) = waiting.try_recv() else {
                break;
            };
            if bytes + next.bytes > BATCH_BYTES_MAX {
                carried = Some(next);
                break;
            }
            bytes += next.bytes;
            batch.push(next);
        }
        // A writer that timed out and went away was told "may or may not take effect";
        // not proposing its write at all is the better of the two.
        batch.retain(|p| !p.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        metrics.batch_commands.observe(batch.len() as f64);
        let raft = raft.clone();
        tokio::spawn(async move {
            let (commands, replies): (Vec<Command>, Vec<_>) = batch.into_iter().map(|p| (p.command, p.reply)).unzip();
            let write = tokio::time::timeout(timeout, raft.client_write(Batch { commands }));
            let result = tokio::select! {
                written = write => match written {
                    Err(_) => Err(BatchError::TimedOut(timeout)),
                    Ok(Ok(response)) if response.data.len() == replies.len() => Ok(response.data),
                    Ok(Ok(response)) => Err(BatchError::Failed(format!(
                        "{} outcomes for a batch of {} writes",
                        response.data.len(),
                        replies.len()
                    ))),
                    Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => Err(BatchError::LeadershipLost),
                    Ok(Err(e)) => Err(BatchError::Failed(e.to_string())),
                },
                // Its entry stays with Raft (a later leader may still commit it): the
                // writers are told the outcome is unknown, now rather than at a deadline.
                silence = cut_off(&raft, election_timeout) => Err(BatchError::CutOff(silence)),
            };
            drop(slot);
            match result {
                Ok(outcomes) => {
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        // The writer may have timed out and gone: nothing to tell.
                        let _ = reply.send(Ok(outcome));
                    }
                }
                Err(error) => {
                    for reply in replies {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        });
    }
}

/// How often a proposal in flight checks that its leader still hears from a majority.
const CUT_OFF_CHECK: Duration = Duration::from_millis(50);

/// Returns once this node, leading, has not heard from a majority for four election
/// timeouts (twice what makes it stop counting itself leader for new requests: a busy
/// machine's late heartbeats must not fail writes in flight), with how long it has not;
/// never while it hears from one, before a first acknowledgement, or when it is not the
/// leader (openraft answers that proposal itself).
async fn cut_off(raft: &Raft, election_timeout: Duration) -> Duration {
    loop {
        tokio::time::sleep(CUT_OFF_CHECK).await;
        let metrics = raft.metrics().borrow().clone();
        if metrics.state != openraft::ServerState::Leader
            || metrics.membership_config.membership().voter_ids().count() <= 1
        {
            continue;
        }
        if let Some(age) = metrics.millis_since_quorum_ack.map(Duration::from_millis) {
            if age > election_timeout * 4 {
                return age;
            }
        }
    }
}
