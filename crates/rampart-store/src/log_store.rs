//! The durable Raft log and vote, in redb, with group commit.
//!
//! One writer thread owns every change to the log. `append` only queues its entries and
//! puts them in an in-memory overlay (`Pending`), so they are readable at once and
//! openraft's core never waits for a disk; the writer drains everything queued into one
//! redb transaction, commits it with one fsync, and only then tells openraft the entries
//! are persisted. Proposals that arrive while one fsync runs share the next one: one
//! fsync for many writes, and no write acknowledged before its fsync.
//!
//! Openraft 0.9 appends each client write on its own, so a writer that took redb's write
//! lock per append would run the whole Raft core in lock-step with the disk (one fsync per
//! entry). That is why appends never touch redb from the caller's task.
//!
//! Votes, truncation and purges are rare: they go through the same queue, in order with
//! the appends before them, and their caller waits until they are on disk.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageIOError, Vote};
use rampart_core::compaction::{self, Reader};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::{NodeId, StorageError, TypeConfig};

pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");
/// Where the data dir's format version is recorded (`META`, little-endian u32).
const FORMAT_KEY: &str = "format_version";

/// The layout of a node's data dir that this binary reads and writes: the redb tables and
/// the encoding of the Raft log's entries (`Batch` in postcard) and of the snapshot beside
/// it. A data dir records the version that wrote it, and a node refuses one it cannot read:
/// it would misread the log. A change to any of these layouts takes a new version and a
/// migration. Version 2 split the state into its shipped and local parts; a version-1 data
/// dir is migrated when it is opened ([`crate::v1`]). Version 3 added the region epoch
/// history to the shipped part and the region's lease promise to the local part
/// ([`crate::v2`]). Version 4 added each service's kind (`Service::kind`, [`crate::v3`]).
pub const FORMAT_VERSION: u32 = 4;

/// The oldest format version this binary migrates from.
pub const FORMAT_VERSION_MIGRATED: u32 = 1;

/// Why a data dir could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "it is in format version {found}, and this rampart reads format version {supported} \
         (and migrates format versions 1 and 2): run the rampart release that wrote it, or restore \
         the region from a backup into new data dirs"
    )]
    Format { found: u32, supported: u32 },
    #[error(transparent)]
    Storage(Box<StorageError>),
}

impl From<StorageError> for OpenError {
    fn from(e: StorageError) -> OpenError {
        OpenError::Storage(Box::new(e))
    }
}

impl From<StorageIOError<u64>> for OpenError {
    fn from(e: StorageIOError<u64>) -> OpenError {
        OpenError::Storage(Box::new(e.into()))
    }
}

const VOTE: &str = "vote";
const REDB_CACHE_BYTES: usize = 16 << 20;
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";
/// Log operations queued for the writer at most; a full queue makes `append` wait, which
/// slows proposals down instead of growing memory without bound.
const QUEUE_OPS_MAX: usize = 8192;
/// Operations the writer puts in one transaction at most.
const BATCH_OPS_MAX: usize = 4096;

/// Hears the duration of every durable log commit.
pub type FsyncObserver = Arc<dyn Fn(Duration) + Send + Sync>;

/// Opens the node's single redb file, creating it and its tables if needed; returns it and
/// the format version its data dir is in (this build's for a new one; an older one the
/// caller migrates).
pub fn open_database(path: &Path) -> Result<(Database, u32), OpenError> {
    let existed = path.exists();
    // The state lives in memory; redb's cache only speeds up log reads by lagging
    // followers, so a small one keeps a node's memory bounded.
    let db = Database::builder()
        .set_cache_size(REDB_CACHE_BYTES)
        .create(path)
        .map_err(|e| StorageIOError::write(&e))?;
    let txn = db.begin_write().map_err(|e| StorageIOError::write(&e))?;
    let found = {
        txn.open_table(LOG).map_err(|e| StorageIOError::write(&e))?;
        let mut meta = txn.open_table(META).map_err(|e| StorageIOError::write(&e))?;
        let recorded = meta
            .get(FORMAT_KEY)
            .map_err(|e| StorageIOError::read(&e))?
            .map(|v| v.value().to_vec());
        match recorded {
            // A data dir from before versions were recorded: the layout of version 1.
            None if existed => 1,
            // A new data dir (or a restored one: a snapshot in this build's layout).
            None => {
                meta.insert(FORMAT_KEY, FORMAT_VERSION.to_le_bytes().as_slice())
                    .map_err(|e| StorageIOError::write(&e))?;
                FORMAT_VERSION
            }
            Some(bytes) => {
                let found = <[u8; 4]>::try_from(bytes.as_slice()).map_or(u32::MAX, u32::from_le_bytes);
                if !(FORMAT_VERSION_MIGRATED..=FORMAT_VERSION).contains(&found) {
                    return Err(OpenError::Format {
                        found,
                        supported: FORMAT_VERSION,
                    });
                }
                found
            }
        }
    };
    txn.commit().map_err(|e| StorageIOError::write(&e))?;
    Ok((db, found))
}

/// Records this build's format version in `db` (a migration's last step).
pub(crate) fn record_format_version(db: &Database) -> Result<(), StorageError> {
    let txn = db.begin_write().map_err(|e| StorageIOError::write(&e))?;
    {
        let mut meta = txn.open_table(META).map_err(|e| StorageIOError::write(&e))?;
        meta.insert(FORMAT_KEY, FORMAT_VERSION.to_le_bytes().as_slice())
            .map_err(|e| StorageIOError::write(&e))?;
    }
    txn.commit().map_err(|e| StorageIOError::write(&e))?;
    Ok(())
}

/// Records `version` as the format of the data dir at `path` (a migration's last step;
/// tests use it to stand for a data dir another release wrote).
pub fn stamp_format_version(path: &Path, version: u32) -> Result<(), StorageError> {
    let db = Database::create(path).map_err(|e| StorageIOError::write(&e))?;
    let txn = db.begin_write().map_err(|e| StorageIOError::write(&e))?;
    {
        let mut meta = txn.open_table(META).map_err(|e| StorageIOError::write(&e))?;
        meta.insert(FORMAT_KEY, version.to_le_bytes().as_slice())
            .map_err(|e| StorageIOError::write(&e))?;
    }
    txn.commit().map_err(|e| StorageIOError::write(&e))?;
    Ok(())
}

/// Encoded entries appended but not yet committed to redb, with the sequence number of the
/// append that queued each, so the writer removes exactly what it wrote.
#[derive(Default)]
struct Pending {
    entries: BTreeMap<u64, (u64, Arc<[u8]>)>,
    next_seq: u64,
}

/// One change for the writer thread.
enum LogOp {
    Append {
        seq: u64,
        entries: Vec<(u64, Arc<[u8]>)>,
        callback: LogFlushed<TypeConfig>,
    },
    /// Metadata write; `done` hears when it is on disk, if the caller waits.
    Meta {
        name: &'static str,
        bytes: Vec<u8>,
        done: Option<oneshot::Sender<Result<(), String>>>,
    },
    Truncate {
        from: u64,
        done: oneshot::Sender<Result<(), String>>,
    },
    Purge {
        upto: u64,
        log_id_bytes: Vec<u8>,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// Log and vote storage of one node. Cloning shares the database and the writer.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    pending: Arc<Mutex<Pending>>,
    writer: mpsc::Sender<LogOp>,
    readers: Arc<Mutex<Readers>>,
}

/// Readers of the committed log besides Raft (the backup archiver; region links next):
/// compaction keeps what they have not read, within a bound (`rampart_core::compaction`).
#[derive(Debug)]
struct Readers {
    next_index: BTreeMap<String, u64>,
    /// Readers a cut went past, and the entries they lost (first, last).
    overtaken: BTreeMap<String, (u64, u64)>,
    max_retained_bytes: u64,
    /// Woken when a reader is overtaken.
    notice: Arc<tokio::sync::Notify>,
}

impl LogStore {
    pub fn new(db: Arc<Database>, on_fsync: Option<FsyncObserver>) -> Result<LogStore, StorageError> {
        let (writer, queue) = mpsc::channel(QUEUE_OPS_MAX);
        let pending = Arc::new(Mutex::new(Pending::default()));
        let readers = Arc::new(Mutex::new(Readers {
            next_index: BTreeMap::new(),
            overtaken: BTreeMap::new(),
            max_retained_bytes: rampart_core::config::MAX_RETAINED_LOG_BYTES_DEFAULT,
            notice: Arc::new(tokio::sync::Notify::new()),
        }));
        let (writer_db, writer_pending, writer_readers) = (db.clone(), pending.clone(), readers.clone());
        std::thread::Builder::new()
            .name("rampart-log-writer".into())
            .spawn(move || write_loop(&writer_db, &writer_pending, &writer_readers, queue, on_fsync))
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(LogStore {
            db,
            pending,
            writer,
            readers,
        })
    }

    /// How much log compaction may keep for readers that are behind (`max-retained-log-bytes`).
    pub fn set_max_retained_bytes(&self, bytes: u64) {
        self.readers.lock().expect("readers lock").max_retained_bytes = bytes;
    }

    /// Registers `reader`, or moves it on: it needs the entries from `next_index` on, and
    /// compaction keeps them (within the bound).
    pub fn reader_at(&self, reader: &str, next_index: u64) {
        let mut readers = self.readers.lock().expect("readers lock");
        readers.next_index.insert(reader.to_string(), next_index);
    }

    /// The registered readers and the next index each needs.
    pub fn readers(&self) -> BTreeMap<String, u64> {
        self.readers.lock().expect("readers lock").next_index.clone()
    }

    /// `reader` reads no more (for now): compaction no longer waits for it.
    pub fn forget_reader(&self, reader: &str) {
        self.readers.lock().expect("readers lock").next_index.remove(reader);
    }

    /// Woken (one permit kept if nobody waits) whenever a cut overtakes a reader.
    pub fn overtaken_notice(&self) -> Arc<tokio::sync::Notify> {
        self.readers.lock().expect("readers lock").notice.clone()
    }

    /// The entries a cut removed before `reader` read them, once: it must start again from a
    /// snapshot.
    pub fn take_overtaken(&self, reader: &str) -> Option<(u64, u64)> {
        self.readers.lock().expect("readers lock").overtaken.remove(reader)
    }

    /// The first log index this node still holds (compaction keeps what readers have not
    /// read, so it can be below the purge point Raft knows); `None` with an empty log.
    pub fn first_index(&self) -> Result<Option<u64>, StorageError> {
        let read = || -> Result<Option<u64>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(LOG)?;
            let first = table.first()?.map(|(index, _)| index.value());
            Ok(first)
        };
        let stored = read().map_err(|e| StorageIOError::read_logs(&e))?;
        let pending = self
            .pending
            .lock()
            .expect("pending log lock")
            .entries
            .keys()
            .next()
            .copied();
        Ok(match (stored, pending) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    fn meta<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>, StorageError> {
        let read = || -> Result<Option<Vec<u8>>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(META)?;
            Ok(table.get(name)?.map(|v| v.value().to_vec()))
        };
        match read().map_err(|e| StorageIOError::read(&e))? {
            None => Ok(None),
            Some(bytes) => Ok(Some(
                postcard::from_bytes(&bytes).map_err(|e| StorageIOError::read(&e))?,
            )),
        }
    }

    async fn send(&self, op: LogOp) -> Result<(), StorageError> {
        self.writer
            .send(op)
            .await
            .map_err(|_| StorageIOError::write_logs(&std::io::Error::other("log writer stopped")).into())
    }

    /// Queues `op` (built around a completion channel) and waits until it is on disk.
    async fn send_and_wait(
        &self,
        op: impl FnOnce(oneshot::Sender<Result<(), String>>) -> LogOp,
    ) -> Result<(), StorageError> {
        let (done, written) = oneshot::channel();
        self.send(op(done)).await?;
        let result = written.await.unwrap_or_else(|_| Err("log writer stopped".to_string()));
        result.map_err(|message| StorageIOError::write_logs(&std::io::Error::other(message)).into())
    }
}

/// Commits everything queued in batches, one durable transaction each, then reports.
fn write_loop(
    db: &Database,
    pending: &Mutex<Pending>,
    readers: &Mutex<Readers>,
    mut queue: mpsc::Receiver<LogOp>,
    on_fsync: Option<FsyncObserver>,
) {
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH_OPS_MAX {
            match queue.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let outcome = commit_batch(db, readers, &batch).map_err(|e| e.to_string());
        if let (Some(observe), Ok(true)) = (&on_fsync, &outcome) {
            observe(started.elapsed());
        }
        let outcome = outcome.map(|_durable| ());
        let written_seq = batch
            .iter()
            .filter_map(|op| match op {
                LogOp::Append { seq, .. } => Some(*seq),
                _ => None,
            })
            .max();
        if let (Some(written_seq), Ok(())) = (written_seq, &outcome) {
            // Now in redb: readers find them there. Later appends to the same index keep
            // their newer overlay entry.
            pending
                .lock()
                .expect("pending log lock")
                .entries
                .retain(|_, (seq, _)| *seq > written_seq);
        }
        for op in batch {
            let result = outcome.clone();
            match op {
                LogOp::Append { callback, .. } => {
                    callback.log_io_completed(result.map_err(std::io::Error::other));
                }
                LogOp::Meta { done, .. } => {
                    if let Some(done) = done {
                        let _ = done.send(result);
                    }
                }
                LogOp::Truncate { done, .. } | LogOp::Purge { done, .. } => {
                    let _ = done.send(result);
                }
            }
        }
    }
}

/// Applies a batch in order in one transaction and makes it durable (one fsync); answers
/// whether it synced.
fn commit_batch(db: &Database, readers: &Mutex<Readers>, batch: &[LogOp]) -> Result<bool, redb::Error> {
    // A batch of nothing but committed-index hints needs no fsync of its own: the hint is
    // only an optimisation for restarts, and the next durable commit carries it to disk.
    let hints_only = batch.iter().all(|op| matches!(op, LogOp::Meta { done: None, .. }));
    let mut txn = db.begin_write()?;
    let durability = if hints_only {
        Durability::None
    } else {
        Durability::Immediate
    };
    txn.set_durability(durability)
        .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
    {
        let mut log = txn.open_table(LOG)?;
        let mut meta = txn.open_table(META)?;
        for op in batch {
            match op {
                LogOp::Append { entries, .. } => {
                    for (index, bytes) in entries {
                        log.insert(*index, &bytes[..])?;
                    }
                }
                LogOp::Meta { name, bytes, .. } => {
                    meta.insert(*name, bytes.as_slice())?;
                }
                LogOp::Truncate { from, .. } => {
                    log.retain_in(*from.., |_, _| false)?;
                }
                LogOp::Purge { upto, log_id_bytes, .. } => {
                    // Raft's purge point is what Raft asked; the entries go only as far as
                    // the readers behind allow.
                    meta.insert(LAST_PURGED, log_id_bytes.as_slice())?;
                    let cut_upto = cut_for_readers(&log, readers, *upto)?;
                    log.retain_in(..=cut_upto, |_, _| false)?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(!hints_only)
}

/// How far a purge up to `upto` may remove entries, given the readers behind; notes the
/// readers it overtakes.
fn cut_for_readers(log: &redb::Table<u64, &[u8]>, readers: &Mutex<Readers>, upto: u64) -> Result<u64, redb::Error> {
    let (behind, max_retained_bytes) = {
        let readers = readers.lock().expect("readers lock");
        let behind: Vec<Reader> = readers
            .next_index
            .iter()
            .map(|(name, next_index)| Reader {
                name: name.clone(),
                next_index: *next_index,
            })
            .collect();
        (behind, readers.max_retained_bytes)
    };
    let Some(floor) = compaction::floor(upto, &behind) else {
        return Ok(upto);
    };
    // What keeping them retains, counted until it is past the bound.
    let mut retained_bytes: u64 = 0;
    for entry in log.range(floor..=upto)? {
        let (_, bytes) = entry?;
        retained_bytes += bytes.value().len() as u64;
        if retained_bytes > max_retained_bytes {
            break;
        }
    }
    let cut = compaction::cut(upto, &behind, retained_bytes, max_retained_bytes);
    if !cut.overtaken.is_empty() {
        let mut readers = readers.lock().expect("readers lock");
        for name in &cut.overtaken {
            let from = readers.next_index.get(name).copied().unwrap_or(floor);
            tracing::warn!(
                reader = %name,
                from,
                to = cut.upto_index,
                max_retained_bytes,
                "log entries compacted before this reader read them: over max-retained-log-bytes"
            );
            readers.overtaken.insert(name.clone(), (from, cut.upto_index));
        }
        readers.notice.notify_one();
    }
    Ok(cut.upto_index)
}

fn decode_entry(bytes: &[u8]) -> Result<Entry<TypeConfig>, StorageError> {
    postcard::from_bytes(bytes).map_err(|e| StorageIOError::read_logs(&e).into())
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    postcard::to_allocvec(value).map_err(|e| StorageIOError::write(&e).into())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        // The overlay first, redb second: the writer removes an entry from the overlay only
        // after committing it, so an entry missing from the overlay is already in redb.
        let mut found: BTreeMap<u64, Arc<[u8]>> = {
            let pending = self.pending.lock().expect("pending log lock");
            pending
                .entries
                .range(range.clone())
                .map(|(index, (_, bytes))| (*index, bytes.clone()))
                .collect()
        };
        let read = || -> Result<Vec<(u64, Vec<u8>)>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(LOG)?;
            let mut out = Vec::new();
            for item in table.range(range)? {
                let (k, v) = item?;
                out.push((k.value(), v.value().to_vec()));
            }
            Ok(out)
        };
        for (index, bytes) in read().map_err(|e| StorageIOError::read_logs(&e))? {
            found.entry(index).or_insert_with(|| bytes.into());
        }
        found.values().map(|b| decode_entry(b)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.meta(LAST_PURGED)?;
        let pending_last = self
            .pending
            .lock()
            .expect("pending log lock")
            .entries
            .last_key_value()
            .map(|(_, (_, bytes))| bytes.clone());
        let last = match pending_last {
            Some(bytes) => Some(bytes.to_vec()),
            None => {
                let read = || -> Result<Option<Vec<u8>>, redb::Error> {
                    let txn = self.db.begin_read()?;
                    let table = txn.open_table(LOG)?;
                    let last = table.last()?.map(|(_, v)| v.value().to_vec());
                    Ok(last)
                };
                read().map_err(|e| StorageIOError::read_logs(&e))?
            }
        };
        let last_log_id = match last {
            Some(bytes) => Some(decode_entry(&bytes)?.log_id),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        // A vote must be on disk before it is answered: wait for the writer.
        let bytes = encode(vote)?;
        self.send_and_wait(|done| LogOp::Meta {
            name: VOTE,
            bytes,
            done: Some(done),
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError> {
        // Only a hint for re-applying after a restart; it rides with the next batch.
        let bytes = encode(&committed)?;
        self.send(LogOp::Meta {
            name: COMMITTED,
            bytes,
            done: None,
        })
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError> {
        Ok(self.meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes = postcard::to_allocvec(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            encoded.push((entry.log_id.index, Arc::<[u8]>::from(bytes)));
        }
        let seq = {
            let mut pending = self.pending.lock().expect("pending log lock");
            pending.next_seq += 1;
            let seq = pending.next_seq;
            for (index, bytes) in &encoded {
                pending.entries.insert(*index, (seq, bytes.clone()));
            }
            seq
        };
        self.send(LogOp::Append {
            seq,
            entries: encoded,
            callback,
        })
        .await
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let from = log_id.index;
        self.pending
            .lock()
            .expect("pending log lock")
            .entries
            .retain(|index, _| *index < from);
        self.send_and_wait(|done| LogOp::Truncate { from, done }).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let upto = log_id.index;
        let log_id_bytes = encode(&log_id)?;
        self.pending
            .lock()
            .expect("pending log lock")
            .entries
            .retain(|index, _| *index > upto);
        self.send_and_wait(|done| LogOp::Purge {
            upto,
            log_id_bytes,
            done,
        })
        .await
    }
}
