//! The state machine openraft applies committed entries to, its snapshots, and the feed of
//! changes that watches read.
//!
//! The state lives in memory and reaches disk as snapshots, in a file of their own beside
//! the log's redb file (written to a temporary name, fsync'd, then renamed over the old
//! one): a restarted node loads its last snapshot and openraft re-applies the committed log
//! after it. Serialising and writing a snapshot happen on a blocking thread, never on the
//! async workers, and never under redb's write lock: a snapshot of a large state must not
//! stall heartbeats or log appends, or every node (they snapshot at the same index) would
//! go quiet at once and call an election. A snapshot is encoded straight into its file,
//! sent to a follower from that file in chunks, received into a file and decoded as it is
//! read: never a second copy of the state in memory. Recent changes are kept in a bounded history so
//! a watch can resume from an older revision; a watch from before the history answers
//! "compacted".

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, CommittedLeaderId, Entry, EntryPayload, LogId, Membership, OptionalSend, RaftSnapshotBuilder,
    SnapshotMeta, StorageIOError, StoredMembership,
};
use rampart_core::api::WatchEvent;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};

use crate::command::{Outcome, Outcomes};
use crate::state::State;
use crate::{NodeId, StorageError, TypeConfig};

/// The snapshot file's name, beside the redb file.
pub const SNAPSHOT_FILE: &str = "snapshot.bin";

/// Where a snapshot sent by the leader is written as it arrives, beside the redb file.
const RECEIVING_FILE: &str = "snapshot.receiving";

/// Where a snapshot migrated from an older format waits, beside the redb file, until the
/// data dir records the new format; then it replaces the old one.
const MIGRATED_FILE: &str = "snapshot.migrated";

/// Room for the largest string a state holds (a value), for decoding a state as it
/// streams from a file. Allocated zeroed, so only what a value uses is ever resident.
pub const DECODE_SCRATCH_BYTES: usize = rampart_core::limits::VALUE_BYTES_CEILING + (64 << 10);

/// How many changes a slow watcher may fall behind before it is cut off (it then resumes
/// from its last revision, out of the history).
const FEED_CAPACITY: usize = 4096;

/// The kind of the feed's message that the state was replaced wholesale: a live watch
/// ends, and its client reads again (the history starts at the new revision).
pub const RESET_KIND: &str = "reset";

/// Bytes of recent shipped writes kept for region links that resume (besides the count,
/// the watch history's): a link further behind starts from a snapshot.
pub const SHIPPED_HISTORY_BYTES_MAX: usize = 64 << 20;

/// One write of the shipped state as this region applied it, at its revision: what a
/// standby region replays (as `Op::Replicate`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShippedWrite {
    pub revision: u64,
    pub command: crate::command::Command,
}

/// What has been applied so far; shared with the HTTP layer for reads.
#[derive(Debug, Default)]
pub struct Applied {
    pub state: State,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, BasicNode>,
    /// Recent changes, oldest first, for watches that start in the past.
    pub history: VecDeque<WatchEvent>,
    /// Changes at or below this revision are no longer in `history`.
    pub compacted_revision: u64,
    /// Bumped whenever the service registry may have changed (a service command applied, a
    /// snapshot installed): loops that derive work from the registry rebuild only then.
    /// Local to this node, not replicated.
    pub services_version: u64,
    history_max: usize,
    /// Recent shipped writes, oldest first, for region links that resume.
    pub shipped: VecDeque<Arc<ShippedWrite>>,
    /// Shipped writes at or below this revision are no longer in `shipped`.
    pub shipped_compacted: u64,
    shipped_bytes: usize,
    /// A standby's verification asks for its shipped state at this revision (ahead of it).
    pub capture_at: Option<u64>,
    /// The shipped state when it reached `capture_at` (a copy: O(1) for the keys), for the
    /// verification to checksum outside the lock.
    pub captured: Option<Arc<crate::shipped::Shipped>>,
}

impl Applied {
    /// Events with revision >= `from`, or `Err(compacted_revision)` if some are gone.
    pub fn history_from(&self, from: u64) -> Result<Vec<WatchEvent>, u64> {
        if from <= self.compacted_revision && from <= self.state.revision() {
            return Err(self.compacted_revision);
        }
        let start = self.history.partition_point(|e| e.revision < from);
        Ok(self.history.iter().skip(start).cloned().collect())
    }

    /// The shipped write at `revision`, if this node still keeps it.
    pub fn shipped_write(&self, revision: u64) -> Option<Arc<ShippedWrite>> {
        let at = self.shipped.partition_point(|w| w.revision < revision);
        self.shipped.get(at).filter(|w| w.revision == revision).cloned()
    }

    /// Shipped writes with revision >= `from`, or `Err(shipped_compacted)` if some are gone.
    pub fn shipped_from(&self, from: u64) -> Result<Vec<Arc<ShippedWrite>>, u64> {
        if from <= self.shipped_compacted && from <= self.state.revision() {
            return Err(self.shipped_compacted);
        }
        let start = self.shipped.partition_point(|w| w.revision < from);
        Ok(self.shipped.iter().skip(start).cloned().collect())
    }

    fn record_shipped(&mut self, write: Arc<ShippedWrite>) {
        self.shipped_bytes += write.command.op.approx_bytes();
        self.shipped.push_back(write);
        while self.shipped.len() > self.history_max || self.shipped_bytes > SHIPPED_HISTORY_BYTES_MAX {
            let Some(old) = self.shipped.pop_front() else { break };
            self.shipped_bytes -= old.command.op.approx_bytes();
            self.shipped_compacted = old.revision;
        }
    }

    fn record(&mut self, event: WatchEvent) {
        if self.history.len() >= self.history_max {
            if let Some(old) = self.history.pop_front() {
                self.compacted_revision = old.revision;
                // Never split one revision: drop its siblings too.
                while self.history.front().is_some_and(|e| e.revision == old.revision) {
                    self.history.pop_front();
                }
            }
        }
        self.history.push_back(event);
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, BasicNode>,
    state: State,
}

/// A snapshot as an older data dir format wrote it: the state in that format's layout
/// (`S`), then (formats 2 and 3) an install under way if any.
#[derive(Deserialize)]
struct StoredSnapshotOf<S> {
    meta: SnapshotMeta<NodeId, BasicNode>,
    state: S,
}

/// Writes the snapshot of data dir format `from` at `path` (if there is one) in the
/// current layout beside it, durably; [`StateMachineStore::new`] puts it in place once the
/// data dir records the new format.
pub(crate) fn migrate_snapshot(path: &std::path::Path, from: u32) -> Result<(), StorageError> {
    let failed = |e: std::io::Error| -> StorageError { StorageIOError::read_snapshot(None, &e).into() };
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(failed(e)),
    };
    let undecodable = |e: postcard::Error| {
        failed(std::io::Error::other(format!(
            "the format-{from} snapshot does not decode: {e}"
        )))
    };
    let mut scratch = vec![0u8; DECODE_SCRATCH_BYTES];
    let reader = std::io::BufReader::new(file);
    let stored = match from {
        1 => {
            let (old, _): (StoredSnapshotOf<crate::v1::StateV1>, _) =
                postcard::from_io((reader, &mut scratch)).map_err(undecodable)?;
            StoredSnapshot {
                meta: old.meta,
                state: old.state.migrate(),
            }
        }
        2 => with_seeding::<crate::v2::StateV2, crate::v2::SeedingV2>(reader, &mut scratch, failed, undecodable)?,
        _ => with_seeding::<crate::v3::StateV3, crate::v3::SeedingV3>(reader, &mut scratch, failed, undecodable)?,
    };
    let migrated = path.with_file_name(MIGRATED_FILE);
    let write = || -> std::io::Result<()> {
        let mut writer = std::io::BufWriter::new(std::fs::File::create(&migrated)?);
        postcard::to_io(&stored, &mut writer).map_err(std::io::Error::other)?;
        if let Some(seeding) = &stored.state.seeding {
            postcard::to_io(seeding, &mut writer).map_err(std::io::Error::other)?;
        }
        writer.flush()?;
        writer.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    write().map_err(|e| StorageIOError::write_snapshot(None, &e).into())
}

/// An older format's snapshot whose state (`S`) may be followed by an install under way
/// (`D`), both migrated.
fn with_seeding<S, D>(
    reader: impl std::io::Read,
    scratch: &mut [u8],
    failed: impl Fn(std::io::Error) -> StorageError,
    undecodable: impl Fn(postcard::Error) -> StorageError,
) -> Result<StoredSnapshot, StorageError>
where
    S: serde::de::DeserializeOwned + Into<State>,
    D: serde::de::DeserializeOwned + Into<crate::seed::Seeding>,
{
    use std::io::Read;
    let (old, (mut rest, scratch)): (StoredSnapshotOf<S>, _) =
        postcard::from_io((reader, scratch)).map_err(&undecodable)?;
    let mut state: State = old.state.into();
    let mut first = [0u8; 1];
    if rest.read(&mut first).map_err(failed)? == 1 {
        let (seeding, _): (D, _) =
            postcard::from_io((std::io::Cursor::new(first).chain(rest), scratch)).map_err(undecodable)?;
        state.seeding = Some(Box::new(seeding.into()));
    }
    Ok(StoredSnapshot { meta: old.meta, state })
}

/// The opening bytes of a snapshot file for a region restored from a backup: its members
/// and a log position at `log_index` (term 0, so any elected leader's entries follow it).
/// The encoded state follows them.
pub fn restored_snapshot_head(log_index: u64, members: &BTreeMap<NodeId, BasicNode>) -> Vec<u8> {
    let log_id = LogId::new(CommittedLeaderId::new(0, 0), log_index);
    let voters = members.keys().copied().collect::<BTreeSet<_>>();
    let meta = SnapshotMeta {
        last_log_id: Some(log_id),
        last_membership: StoredMembership::new(Some(log_id), Membership::new(vec![voters], members.clone())),
        snapshot_id: format!("restored-{log_index}"),
    };
    postcard::to_allocvec(&meta).expect("meta always encodes")
}

/// Openraft's view of the state machine. Cloning shares it.
#[derive(Clone)]
pub struct StateMachineStore {
    snapshot_path: Arc<PathBuf>,
    applied: Arc<RwLock<Applied>>,
    feed: broadcast::Sender<WatchEvent>,
    /// Shipped writes as they are applied, for region links.
    shipped_feed: broadcast::Sender<Arc<ShippedWrite>>,
    /// `Applied::services_version`, published after each change, for waiters.
    services: Arc<watch::Sender<u64>>,
}

impl StateMachineStore {
    /// Opens the state machine whose snapshot lives at `snapshot_path`.
    pub fn new(snapshot_path: PathBuf, history_max: usize) -> Result<StateMachineStore, StorageError> {
        let migrated = snapshot_path.with_file_name(MIGRATED_FILE);
        if migrated.exists() {
            place(&migrated, &snapshot_path).map_err(|e| StorageIOError::write_snapshot(None, &e))?;
        }
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let (shipped_feed, _) = broadcast::channel(FEED_CAPACITY);
        let store = StateMachineStore {
            snapshot_path: Arc::new(snapshot_path),
            shipped_feed,
            applied: Arc::new(RwLock::new(Applied {
                history_max: history_max.max(1),
                ..Applied::default()
            })),
            feed,
            services: Arc::new(watch::channel(0).0),
        };
        if let Some(snapshot) = store.load_snapshot()? {
            store.replace(snapshot);
        }
        Ok(store)
    }

    /// The applied state, for reads.
    pub fn applied(&self) -> Arc<RwLock<Applied>> {
        self.applied.clone()
    }

    /// Subscribes to changes as they are applied. Take the subscription while holding the
    /// `applied` read lock to join history and feed without a gap.
    pub fn subscribe(&self) -> broadcast::Receiver<WatchEvent> {
        self.feed.subscribe()
    }

    /// Subscribes to shipped writes as they are applied. Take the subscription while
    /// holding the `applied` read lock to join `Applied::shipped` and the feed without a gap.
    pub fn subscribe_shipped(&self) -> broadcast::Receiver<Arc<ShippedWrite>> {
        self.shipped_feed.subscribe()
    }

    /// Wakes on every change of `Applied::services_version` (the value is that version):
    /// for blocking reads of the registry, such as a proxy's watch of a service.
    pub fn services_changes(&self) -> watch::Receiver<u64> {
        self.services.subscribe()
    }

    fn publish_services(&self, version: u64) {
        self.services
            .send_if_modified(|seen| std::mem::replace(seen, version) != version);
    }

    fn replace(&self, snapshot: StoredSnapshot) {
        let mut applied = self.applied.write().expect("state lock poisoned");
        applied.state = snapshot.state;
        applied.last_applied = snapshot.meta.last_log_id;
        applied.membership = snapshot.meta.last_membership;
        self.installed(&mut applied);
        self.publish_services(applied.services_version);
    }

    /// After the state was replaced wholesale (a snapshot from the leader, or a standby's
    /// install of the primary's state): the histories start over at its revision, and live
    /// watches are told to read again ([`RESET_KIND`]), since the changes between are not
    /// theirs to see one by one.
    fn installed(&self, applied: &mut Applied) {
        let revision = applied.state.revision();
        applied.compacted_revision = revision;
        applied.history.clear();
        applied.shipped_compacted = revision;
        applied.shipped.clear();
        applied.shipped_bytes = 0;
        applied.services_version += 1;
        let _ = self.feed.send(WatchEvent {
            revision,
            kind: RESET_KIND.to_string(),
            key: String::new(),
            value: None,
        });
    }

    fn load_snapshot(&self) -> Result<Option<StoredSnapshot>, StorageError> {
        read_snapshot(&self.snapshot_path)
    }

    /// Encodes `stored` and writes it durably, on a blocking thread, as it encodes (never
    /// a second copy of the state in memory): temporary file, fsync, rename, fsync of the
    /// directory, so a crash leaves either the old snapshot or the new one.
    async fn persist(&self, stored: StoredSnapshot) -> Result<StoredSnapshot, StorageError> {
        let path = self.snapshot_path.clone();
        let signature = stored.meta.signature();
        let write = move || -> std::io::Result<StoredSnapshot> {
            let temp = path.with_extension("tmp");
            let mut writer = std::io::BufWriter::new(std::fs::File::create(&temp)?);
            postcard::to_io(&stored, &mut writer).map_err(std::io::Error::other)?;
            if let Some(seeding) = &stored.state.seeding {
                // After the state, only while an install is under way: a file without one
                // is what it always was.
                postcard::to_io(seeding, &mut writer).map_err(std::io::Error::other)?;
            }
            writer.flush()?;
            writer.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            place(&temp, &path)?;
            Ok(stored)
        };
        tokio::task::spawn_blocking(write)
            .await
            .map_err(std::io::Error::other)
            .and_then(|written| written)
            .map_err(|e| StorageIOError::write_snapshot(Some(signature), &e).into())
    }

    /// The snapshot file, open for reading from its start.
    async fn open_snapshot(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
    ) -> Result<Box<tokio::fs::File>, StorageError> {
        tokio::fs::File::open(self.snapshot_path.as_ref())
            .await
            .map(Box::new)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e).into())
    }
}

/// Decodes the snapshot file at `path` as it reads it; `None` if there is none.
fn read_snapshot(path: &std::path::Path) -> Result<Option<StoredSnapshot>, StorageError> {
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(StorageIOError::read_snapshot(None, &e).into()),
    };
    decode_snapshot(file).map(Some).map_err(|e| {
        let e = std::io::Error::other(format!(
            "{} does not decode as data dir format {}: {e}",
            path.display(),
            crate::FORMAT_VERSION
        ));
        StorageIOError::read_snapshot(None, &e).into()
    })
}

/// Decodes a snapshot from `file`, from where it stands, as it reads it: the stored
/// snapshot, then the install under way, if the file goes on.
fn decode_snapshot(file: std::fs::File) -> std::io::Result<StoredSnapshot> {
    use std::io::Read;
    let mut scratch = vec![0u8; DECODE_SCRATCH_BYTES];
    let (mut stored, (mut rest, scratch)): (StoredSnapshot, _) =
        postcard::from_io((std::io::BufReader::new(file), &mut scratch)).map_err(std::io::Error::other)?;
    let mut first = [0u8; 1];
    if rest.read(&mut first)? == 1 {
        let (seeding, _) = postcard::from_io((std::io::Cursor::new(first).chain(rest), scratch))
            .map_err(|e| std::io::Error::other(format!("the install under way after the state: {e}")))?;
        stored.state.seeding = Some(seeding);
    }
    Ok(stored)
}

/// Renames `temp` over `path` and makes the rename durable.
fn place(temp: &std::path::Path, path: &std::path::Path) -> std::io::Result<()> {
    std::fs::rename(temp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachineStore {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let stored = {
            let applied = self.applied.read().expect("state lock poisoned");
            let last = applied.last_applied;
            let snapshot_id = match last {
                Some(id) => format!("{}-{}-{}", id.leader_id.term, id.index, applied.state.revision()),
                None => "empty".to_string(),
            };
            let meta = SnapshotMeta {
                last_log_id: last,
                last_membership: applied.membership.clone(),
                snapshot_id,
            };
            StoredSnapshot {
                meta,
                state: applied.state.clone(),
            }
        };
        let stored = self.persist(stored).await?;
        // The file, not the state: openraft reads it in chunks to send to a follower.
        let snapshot = self.open_snapshot(&stored.meta).await?;
        Ok(Snapshot {
            meta: stored.meta,
            snapshot,
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = StateMachineStore;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>), StorageError> {
        let applied = self.applied.read().expect("state lock poisoned");
        Ok((applied.last_applied, applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcomes>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut outcomes = Vec::new();
        let mut applied = self.applied.write().expect("state lock poisoned");
        for entry in entries {
            applied.last_applied = Some(entry.log_id);
            let mut answers = Outcomes::new();
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Membership(membership) => {
                    applied.membership = StoredMembership::new(Some(entry.log_id), membership);
                }
                EntryPayload::Normal(batch) => {
                    for command in batch.commands {
                        if command.op.touches_services() {
                            applied.services_version += 1;
                        }
                        let before = applied.state.revision();
                        let (outcome, events) = applied.state.apply(&command);
                        if let Outcome::Seeded { .. } = &outcome {
                            self.installed(&mut applied);
                            answers.push(outcome);
                            continue;
                        }
                        for event in events {
                            // No receiver is fine: nobody is watching.
                            let _ = self.feed.send(event.clone());
                            applied.record(event);
                        }
                        answers.push(outcome);
                        let revision = applied.state.revision();
                        if applied.capture_at == Some(revision) {
                            applied.captured = Some(Arc::new(applied.state.shipped.clone()));
                            applied.capture_at = None;
                        }
                        if revision != before {
                            // What moved the shipped revision, as a standby replays it.
                            let command = match command.op {
                                crate::command::Op::Replicate { command, .. } => *command,
                                _ => command,
                            };
                            let write = Arc::new(ShippedWrite { revision, command });
                            let _ = self.shipped_feed.send(write.clone());
                            applied.record_shipped(write);
                        }
                    }
                }
            }
            outcomes.push(answers);
        }
        self.publish_services(applied.services_version);
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<tokio::fs::File>, StorageError> {
        // Read back when it is complete: written and read through the same handle.
        tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.snapshot_path.with_file_name(RECEIVING_FILE))
            .await
            .map(Box::new)
            .map_err(|e| StorageIOError::write_snapshot(None, &e).into())
    }

    /// A snapshot from the leader: decoded as it is read from its file, written durably as
    /// this node's own; the state becomes its state.
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        mut snapshot: Box<tokio::fs::File>,
    ) -> Result<(), StorageError> {
        use std::io::Seek;
        use tokio::io::AsyncWriteExt;
        let failed =
            |e: std::io::Error| -> StorageError { StorageIOError::read_snapshot(Some(meta.signature()), &e).into() };
        snapshot.flush().await.map_err(failed)?;
        let mut file = snapshot.into_std().await;
        let decode = move || -> std::io::Result<StoredSnapshot> {
            file.rewind()?;
            decode_snapshot(file)
        };
        let mut stored = tokio::task::spawn_blocking(decode)
            .await
            .map_err(std::io::Error::other)
            .and_then(|decoded| decoded)
            .map_err(failed)?;
        stored.meta = meta.clone();
        let stored = self.persist(stored).await?;
        let _ = tokio::fs::remove_file(self.snapshot_path.with_file_name(RECEIVING_FILE)).await;
        self.replace(stored);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        // The meta is the file's first part: read it alone, not the state after it.
        let path = self.snapshot_path.clone();
        let meta = tokio::task::spawn_blocking(move || -> Option<SnapshotMeta<NodeId, BasicNode>> {
            let file = std::fs::File::open(path.as_ref()).ok()?;
            let mut scratch = vec![0u8; 64 << 10];
            let (meta, _) = postcard::from_io((std::io::BufReader::new(file), &mut scratch)).ok()?;
            Some(meta)
        })
        .await
        .ok()
        .flatten();
        let Some(meta) = meta else { return Ok(None) };
        let snapshot = self.open_snapshot(&meta).await?;
        Ok(Some(Snapshot { meta, snapshot }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Batch, Command, Op, Outcome};

    fn put(key: &str) -> Command {
        Command {
            at_ms: 1,
            op: Op::Put {
                key: key.into(),
                value: "v".into(),
                lease: None,
                if_revision: Some(0),
            },
        }
    }

    #[tokio::test]
    async fn a_batch_applies_in_order_with_one_revision_and_outcome_per_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_log, mut sm) = crate::open(&dir.path().join("n.redb"), 100, None).expect("open");
        let mut feed = sm.subscribe();
        // The second write of "a" must see the first: it fails its must-not-exist check.
        let batch = Batch {
            commands: vec![put("a"), put("b"), put("a")],
        };
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(batch),
        };
        let outcomes = sm.apply([entry]).await.expect("apply");
        assert_eq!(
            outcomes,
            vec![vec![
                Outcome::Put { revision: 1 },
                Outcome::Put { revision: 2 },
                Outcome::RevisionMismatch { current: 1 },
            ]]
        );
        let events: Vec<u64> = [feed.try_recv(), feed.try_recv()]
            .into_iter()
            .map(|e| e.expect("event").revision)
            .collect();
        assert_eq!(events, vec![1, 2]);
        assert!(feed.try_recv().is_err(), "a failed write makes no event");
    }

    fn entry(index: u64, commands: Vec<Command>) -> Entry<TypeConfig> {
        Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Batch { commands }),
        }
    }

    #[tokio::test]
    async fn an_install_under_way_survives_a_snapshot_and_its_end_starts_the_histories_over() {
        use crate::seed::SeedStep;
        let dir = tempfile::tempdir().expect("tempdir");
        let redb = dir.path().join("n.redb");
        let (_log, mut sm) = crate::open(&redb, 100, None).expect("open");
        // The primary's shipped state, at revision 9: three keys.
        let mut source = crate::shipped::Shipped::default();
        for (i, key) in ["p/a", "p/b", "p/c"].into_iter().enumerate() {
            source.apply(&put(key));
            assert_eq!(source.revision, i as u64 + 1);
        }
        source.revision = 9;
        let seed = |step: SeedStep| Command {
            at_ms: 1,
            op: step.to_op(),
        };
        let keys = |range| crate::seed::tests::keys(&source, range);
        let begin = crate::seed::tests::begin(&source);
        sm.apply([entry(1, vec![put("mine"), seed(begin), seed(keys(0..2))])])
            .await
            .expect("apply");
        let mut builder = sm.get_snapshot_builder().await;
        builder.build_snapshot().await.expect("snapshot");

        // A node that restarts from that snapshot has the install where it was.
        let reopened = StateMachineStore::new(redb.with_file_name(SNAPSHOT_FILE), 100).expect("reopen");
        let (before, after) = {
            let (a, b) = (sm.applied(), reopened.applied());
            let (a, b) = (a.read().expect("lock"), b.read().expect("lock"));
            (a.state.clone(), b.state.clone())
        };
        assert!(after.seeding.is_some());
        assert_eq!(after, before, "the state and the install under way, as they were");
        assert_eq!(after.revision(), 1, "reads still see this region's own state");

        let mut feed = sm.subscribe();
        let outcomes = sm
            .apply([entry(
                2,
                vec![
                    seed(keys(2..3)),
                    seed(SeedStep::End {
                        revision: 9,
                        checksum: crate::checksum_text(crate::shipped_checksum(&source)),
                    }),
                ],
            )])
            .await
            .expect("apply");
        assert!(
            matches!(outcomes[0][1], Outcome::Seeded { revision: 9, .. }),
            "{outcomes:?}"
        );
        let applied = sm.applied();
        let applied = applied.read().expect("lock");
        assert_eq!(applied.state.shipped, source);
        assert_eq!(
            applied.history_from(1).unwrap_err(),
            9,
            "watches from before read again"
        );
        assert_eq!(applied.shipped_from(1).unwrap_err(), 9, "links from before start over");
        assert_eq!(applied.shipped_from(10).map(|w| w.len()), Ok(0));
        assert_eq!(feed.try_recv().expect("a reset").kind, RESET_KIND);
    }

    /// A data dir as format 1 left it: the version recorded, a snapshot in its layout.
    fn format_1_data_dir(redb: &std::path::Path) -> State {
        let old = crate::v1::tests::a_format_1_state();
        crate::stamp_format_version(redb, 1).expect("stamp format 1");
        #[derive(Serialize)]
        struct SnapshotV1<'a> {
            meta: SnapshotMeta<NodeId, BasicNode>,
            state: &'a crate::v1::StateV1,
        }
        let meta = SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 11)),
            last_membership: StoredMembership::default(),
            snapshot_id: "2-11-7".into(),
        };
        let bytes = postcard::to_allocvec(&SnapshotV1 { meta, state: &old }).expect("encode");
        std::fs::write(redb.with_file_name(SNAPSHOT_FILE), bytes).expect("write the snapshot");
        let bytes = postcard::to_allocvec(&old).expect("encode");
        postcard::from_bytes::<crate::v1::StateV1>(&bytes)
            .expect("decode")
            .migrate()
    }

    /// A data dir of format 2 at `redb` whose snapshot holds an install under way after the
    /// state; returns the state it holds.
    fn format_2_data_dir(redb: &std::path::Path) -> State {
        let mut state = crate::v1::tests::a_format_1_state().migrate();
        state.apply(&Command {
            at_ms: 9,
            op: Op::AdoptRules { rules: crate::RULES },
        });
        state.seeding = Some(Box::new(crate::seed::Seeding {
            revision: 40,
            shipped: crate::shipped::Shipped::default(),
            last_key: Some("k".into()),
        }));
        crate::stamp_format_version(redb, 2).expect("stamp format 2");
        #[derive(Serialize)]
        struct SnapshotV2<'a> {
            meta: SnapshotMeta<NodeId, BasicNode>,
            state: &'a crate::v2::StateV2,
        }
        let meta = SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 11)),
            last_membership: StoredMembership::default(),
            snapshot_id: "2-11-7".into(),
        };
        let (old, seeding) = crate::v2::tests::state_v2(&state.shipped, &state.local, state.seeding.as_deref());
        let mut bytes = postcard::to_allocvec(&SnapshotV2 { meta, state: &old }).expect("encode");
        bytes.extend(postcard::to_allocvec(&seeding.expect("an install")).expect("encode"));
        std::fs::write(redb.with_file_name(SNAPSHOT_FILE), bytes).expect("write the snapshot");
        state
    }

    #[tokio::test]
    async fn a_format_2_data_dir_is_migrated_with_its_install_under_way() {
        let dir = tempfile::tempdir().expect("tempdir");
        let redb = dir.path().join("n.redb");
        let expected = format_2_data_dir(&redb);
        {
            let (_log, sm) = crate::open(&redb, 100, None).expect("open and migrate");
            let state = sm.applied.read().unwrap().state.clone();
            assert_eq!(state, expected);
            assert!(state.seeding.is_some(), "the install under way is kept");
        }
        assert_eq!(format_of(&redb), crate::FORMAT_VERSION);
    }

    #[tokio::test]
    async fn a_format_3_data_dir_is_migrated_with_its_services_generic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let redb = dir.path().join("n.redb");
        let mut expected = State {
            shipped: crate::v3::tests::with_a_service(),
            local: crate::local::Local::default(),
            seeding: None,
        };
        expected.seeding = Some(Box::new(crate::seed::Seeding {
            revision: 40,
            shipped: crate::v3::tests::with_a_service(),
            last_key: Some("k".into()),
        }));
        crate::stamp_format_version(&redb, 3).expect("stamp format 3");
        #[derive(Serialize)]
        struct SnapshotV3<'a> {
            meta: SnapshotMeta<NodeId, BasicNode>,
            state: &'a crate::v3::StateV3,
        }
        let meta = SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(2, 1), 11)),
            last_membership: StoredMembership::default(),
            snapshot_id: "2-11-7".into(),
        };
        let (old, seeding) =
            crate::v3::tests::state_v3(&expected.shipped, &expected.local, expected.seeding.as_deref());
        let mut bytes = postcard::to_allocvec(&SnapshotV3 { meta, state: &old }).expect("encode");
        bytes.extend(postcard::to_allocvec(&seeding.expect("an install")).expect("encode"));
        std::fs::write(redb.with_file_name(SNAPSHOT_FILE), bytes).expect("write the snapshot");
        {
            let (_log, sm) = crate::open(&redb, 100, None).expect("open and migrate");
            let state = sm.applied.read().unwrap().state.clone();
            assert_eq!(state, expected);
            assert_eq!(state.shipped.services["db"].kind, rampart_core::service::Kind::Generic);
        }
        assert_eq!(format_of(&redb), crate::FORMAT_VERSION);
    }

    /// The format recorded in `redb`, once the store that had it open let go of it (its
    /// log writer thread ends soon after the store is dropped).
    fn format_of(redb: &std::path::Path) -> u32 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match crate::log_store::open_database(redb) {
                Ok((_, found)) => return found,
                Err(e) if std::time::Instant::now() > deadline => panic!("reopen: {e}"),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    }

    #[tokio::test]
    async fn a_format_1_data_dir_is_migrated_when_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let redb = dir.path().join("n.redb");
        let expected = format_1_data_dir(&redb);
        {
            let (_log, sm) = crate::open(&redb, 100, None).expect("open and migrate");
            let applied = sm.applied.read().unwrap();
            assert_eq!(applied.state, expected);
            assert_eq!(applied.last_applied.map(|id| id.index), Some(11));
        }
        assert_eq!(format_of(&redb), crate::FORMAT_VERSION);
        assert!(!dir.path().join(MIGRATED_FILE).exists());
        let (_log, sm) = crate::open(&redb, 100, None).expect("open again");
        assert_eq!(
            sm.applied.read().unwrap().state,
            expected,
            "migrated once, read as it is"
        );
    }

    #[tokio::test]
    async fn a_migration_cut_short_is_finished_at_the_next_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let redb = dir.path().join("n.redb");
        let expected = format_1_data_dir(&redb);
        // Cut after the migrated snapshot was written: format 1 still recorded.
        migrate_snapshot(&dir.path().join(SNAPSHOT_FILE), 1).expect("migrate");
        {
            let (_log, sm) = crate::open(&redb, 100, None).expect("migrate again");
            assert_eq!(sm.applied.read().unwrap().state, expected);
        }
        // Cut after the new format was recorded, before the snapshot was put in place.
        let dir = tempfile::tempdir().expect("tempdir");
        let redb = dir.path().join("n.redb");
        let expected = format_1_data_dir(&redb);
        migrate_snapshot(&dir.path().join(SNAPSHOT_FILE), 1).expect("migrate");
        crate::stamp_format_version(&redb, crate::FORMAT_VERSION).expect("stamp");
        let (_log, sm) = crate::open(&redb, 100, None).expect("finish the migration");
        assert_eq!(sm.applied.read().unwrap().state, expected);
        assert!(!dir.path().join(MIGRATED_FILE).exists());
    }

    #[test]
    fn a_snapshot_that_does_not_decode_is_named_with_the_format_it_was_read_as() {
        let dir = tempfile::tempdir().expect("tempdir");
        let redb = dir.path().join("n.redb");
        // A data dir without its redb file reads as a restored one: a snapshot in this
        // format. One in another layout must say so, not decode as something else.
        std::fs::write(dir.path().join(SNAPSHOT_FILE), [0xff; 64]).expect("write");
        let Err(error) = crate::open(&redb, 100, None) else {
            panic!("garbage must not open")
        };
        let message = error.to_string();
        assert!(message.contains(SNAPSHOT_FILE), "{message}");
        assert!(
            message.contains(&format!("does not decode as data dir format {}", crate::FORMAT_VERSION)),
            "{message}"
        );
    }

    #[test]
    fn a_data_dir_of_a_newer_format_is_refused_naming_both_versions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let redb = dir.path().join("n.redb");
        crate::stamp_format_version(&redb, crate::FORMAT_VERSION + 1).expect("stamp");
        let Err(error) = crate::open(&redb, 100, None) else {
            panic!("a newer format must be refused")
        };
        let message = error.to_string();
        assert!(
            message.contains(&format!("format version {}", crate::FORMAT_VERSION + 1)),
            "{message}"
        );
        assert!(
            message.contains(&format!("format version {}", crate::FORMAT_VERSION)),
            "{message}"
        );
    }

    #[tokio::test]
    async fn shipped_writes_are_kept_for_region_links_and_fed_live() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_log, mut sm) = crate::open(&dir.path().join("n.redb"), 2, None).expect("open");
        let mut feed = sm.subscribe_shipped();
        let event = Command {
            at_ms: 1,
            op: Op::Record {
                event: rampart_core::api::Event {
                    id: 0,
                    at_ms: 0,
                    kind: "k".into(),
                    action: "a".into(),
                    actor: String::new(),
                    source: String::new(),
                    outcome: String::new(),
                    detail: String::new(),
                },
            },
        };
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 1),
            payload: EntryPayload::Normal(Batch {
                commands: vec![put("a"), event, put("b"), put("a")],
            }),
        };
        sm.apply([entry]).await.expect("apply");
        let live: Vec<u64> = [feed.try_recv(), feed.try_recv()]
            .into_iter()
            .map(|w| w.expect("a shipped write").revision)
            .collect();
        assert_eq!(live, vec![1, 2], "the event is local and the failed put moved nothing");
        assert!(feed.try_recv().is_err());
        {
            let applied = sm.applied.read().unwrap();
            let kept: Vec<u64> = applied
                .shipped_from(1)
                .expect("kept")
                .iter()
                .map(|w| w.revision)
                .collect();
            assert_eq!(kept, vec![1, 2]);
            assert_eq!(applied.shipped_from(2).expect("kept")[0].command, put("b"));
        }

        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), 2),
            payload: EntryPayload::Normal(Batch {
                commands: vec![put("c")],
            }),
        };
        sm.apply([entry]).await.expect("apply");
        let applied = sm.applied.read().unwrap();
        assert_eq!(applied.shipped_from(1), Err(1), "two kept: the oldest went");
        assert_eq!(applied.shipped_from(2).expect("kept").len(), 2);
    }

    #[tokio::test]
    async fn a_restored_snapshot_is_its_head_then_the_encoded_state() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_log, mut sm) = crate::open(&dir.path().join("n.redb"), 100, None).expect("open");
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(3, 1), 7),
            payload: EntryPayload::Normal(Batch {
                commands: vec![put("a"), put("b")],
            }),
        };
        sm.apply([entry]).await.expect("apply");
        let expected = sm.applied.read().unwrap().state.clone();
        let members = BTreeMap::from([(
            4,
            BasicNode {
                addr: "127.0.0.1:1".into(),
            },
        )]);
        let mut file = restored_snapshot_head(7, &members);
        file.extend_from_slice(&postcard::to_allocvec(&expected).expect("encode"));
        std::fs::write(dir.path().join(SNAPSHOT_FILE), &file).expect("write");
        let restored = StateMachineStore::new(dir.path().join(SNAPSHOT_FILE), 100).expect("load");
        let applied = restored.applied.read().unwrap();
        assert_eq!(applied.state, expected);
        assert_eq!(applied.last_applied.map(|id| id.index), Some(7));
        assert_eq!(applied.membership.membership().voter_ids().collect::<Vec<_>>(), vec![4]);
    }

    #[tokio::test]
    async fn a_snapshot_received_in_pieces_is_installed_from_its_file() {
        use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
        let dirs = [
            tempfile::tempdir().expect("tempdir"),
            tempfile::tempdir().expect("tempdir"),
        ];
        let (_log, mut leader) = crate::open(&dirs[0].path().join("n.redb"), 100, None).expect("open");
        let entry = Entry::<TypeConfig> {
            log_id: LogId::new(CommittedLeaderId::new(2, 1), 5),
            payload: EntryPayload::Normal(Batch {
                commands: vec![put("a"), put("b")],
            }),
        };
        leader.apply([entry]).await.expect("apply");
        let mut built = leader.build_snapshot().await.expect("build");
        let mut bytes = Vec::new();
        built
            .snapshot
            .read_to_end(&mut bytes)
            .await
            .expect("read the snapshot file");

        let (_log, mut follower) = crate::open(&dirs[1].path().join("n.redb"), 100, None).expect("open");
        let mut receiving = follower.begin_receiving_snapshot().await.expect("begin");
        let half = bytes.len() / 2;
        for (offset, piece) in [(half, &bytes[half..]), (0, &bytes[..half])] {
            receiving
                .seek(std::io::SeekFrom::Start(offset as u64))
                .await
                .expect("seek");
            receiving.write_all(piece).await.expect("write");
        }
        follower
            .install_snapshot(&built.meta, receiving)
            .await
            .expect("install");
        let expected = leader.applied.read().unwrap().state.clone();
        assert_eq!(follower.applied.read().unwrap().state, expected);
        assert_eq!(
            follower.applied.read().unwrap().last_applied.map(|id| id.index),
            Some(5)
        );
        assert!(
            dirs[1].path().join(SNAPSHOT_FILE).exists(),
            "installed as the node's own"
        );
        assert!(
            !dirs[1].path().join(RECEIVING_FILE).exists(),
            "the received file is gone"
        );
        let current = follower
            .get_current_snapshot()
            .await
            .expect("current")
            .expect("a snapshot");
        assert_eq!(current.meta, built.meta);
    }
}
