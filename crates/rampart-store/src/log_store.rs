//! The durable Raft log and vote, in redb, with group commit.
//!
//! Each `append` writes its entries in a redb transaction with `Durability::None`: visible
//! to readers at once, not yet on disk. A flusher thread then makes one durable commit,
//! which fsyncs every append before it, and only then tells openraft the entries are
//! persisted. Concurrent proposals that arrive while one fsync runs share the next one:
//! one fsync for many writes, and no write acknowledged before its fsync.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{mpsc, Arc};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, RaftLogReader, StorageIOError, Vote};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{NodeId, StorageError, TypeConfig};

pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_meta");

const VOTE: &str = "vote";
const REDB_CACHE_BYTES: usize = 16 << 20;
const COMMITTED: &str = "committed";
const LAST_PURGED: &str = "last_purged";

/// Hears the duration of every durable log commit.
pub type FsyncObserver = Arc<dyn Fn(std::time::Duration) + Send + Sync>;

/// Opens the node's single redb file, creating it and its tables if needed.
pub fn open_database(path: &Path) -> Result<Database, StorageError> {
    // The state lives in memory; redb's cache only speeds up log reads by lagging
    // followers, so a small one keeps a node's memory bounded.
    let db = Database::builder()
        .set_cache_size(REDB_CACHE_BYTES)
        .create(path)
        .map_err(|e| StorageIOError::write(&e))?;
    let txn = db.begin_write().map_err(|e| StorageIOError::write(&e))?;
    {
        txn.open_table(LOG).map_err(|e| StorageIOError::write(&e))?;
        txn.open_table(META).map_err(|e| StorageIOError::write(&e))?;
        txn.open_table(crate::state_machine::SNAPSHOT)
            .map_err(|e| StorageIOError::write(&e))?;
    }
    txn.commit().map_err(|e| StorageIOError::write(&e))?;
    Ok(db)
}

/// Log and vote storage of one node. Cloning shares the database.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<Database>,
    flusher: mpsc::Sender<LogFlushed<TypeConfig>>,
}

impl LogStore {
    pub fn new(db: Arc<Database>, on_fsync: Option<FsyncObserver>) -> Result<LogStore, StorageError> {
        let (flusher, pending) = mpsc::channel();
        let flush_db = db.clone();
        std::thread::Builder::new()
            .name("rampart-log-flush".into())
            .spawn(move || flush_loop(&flush_db, &pending, on_fsync))
            .map_err(|e| StorageIOError::write(&e))?;
        Ok(LogStore { db, flusher })
    }

    fn write(
        &self,
        durability: Durability,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<(), redb::Error>,
    ) -> Result<(), StorageError> {
        let run = || -> Result<(), redb::Error> {
            let mut txn = self.db.begin_write()?;
            txn.set_durability(durability)
                .map_err(|e| redb::Error::Corrupted(e.to_string()))?;
            f(&txn)?;
            txn.commit()?;
            Ok(())
        };
        run().map_err(|e| StorageIOError::write_logs(&e).into())
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

    fn put_meta<T: serde::Serialize>(&self, durability: Durability, name: &str, value: &T) -> Result<(), StorageError> {
        let bytes = postcard::to_allocvec(value).map_err(|e| StorageIOError::write(&e))?;
        self.write(durability, |txn| {
            txn.open_table(META)?.insert(name, bytes.as_slice())?;
            Ok(())
        })
    }
}

/// Makes one durable commit for every batch of appends waiting, then acknowledges them.
fn flush_loop(db: &Database, pending: &mpsc::Receiver<LogFlushed<TypeConfig>>, on_fsync: Option<FsyncObserver>) {
    while let Ok(first) = pending.recv() {
        let mut batch = vec![first];
        batch.extend(pending.try_iter());
        let started = std::time::Instant::now();
        // An empty durable commit persists every non-durable commit before it.
        let failure = db
            .begin_write()
            .map_err(redb::Error::from)
            .and_then(|txn| Ok(txn.commit()?))
            .err();
        if let Some(observe) = &on_fsync {
            observe(started.elapsed());
        }
        for callback in batch {
            let result = match &failure {
                None => Ok(()),
                Some(e) => Err(std::io::Error::other(e.to_string())),
            };
            callback.log_io_completed(result);
        }
    }
}

fn decode_entry(bytes: &[u8]) -> Result<Entry<TypeConfig>, StorageError> {
    postcard::from_bytes(bytes).map_err(|e| StorageIOError::read_logs(&e).into())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let read = || -> Result<Vec<Vec<u8>>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(LOG)?;
            let mut out = Vec::new();
            for item in table.range(range)? {
                let (_, v) = item?;
                out.push(v.value().to_vec());
            }
            Ok(out)
        };
        let raw = read().map_err(|e| StorageIOError::read_logs(&e))?;
        raw.iter().map(|b| decode_entry(b)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.meta(LAST_PURGED)?;
        let read = || -> Result<Option<Vec<u8>>, redb::Error> {
            let txn = self.db.begin_read()?;
            let table = txn.open_table(LOG)?;
            let last = table.last()?.map(|(_, v)| v.value().to_vec());
            Ok(last)
        };
        let last = read().map_err(|e| StorageIOError::read_logs(&e))?;
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
        // A vote must be on disk before it is answered: Immediate.
        self.put_meta(Durability::Immediate, VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), StorageError> {
        // Only a hint for re-applying after a restart; losing it in a crash is harmless.
        self.put_meta(Durability::None, COMMITTED, &committed)
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
            encoded.push((entry.log_id.index, bytes));
        }
        self.write(Durability::None, |txn| {
            let mut table = txn.open_table(LOG)?;
            for (index, bytes) in &encoded {
                table.insert(*index, bytes.as_slice())?;
            }
            Ok(())
        })?;
        if let Err(mpsc::SendError(callback)) = self.flusher.send(callback) {
            callback.log_io_completed(Err(std::io::Error::other("log flusher stopped")));
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        self.write(Durability::Immediate, |txn| {
            let mut table = txn.open_table(LOG)?;
            table.retain_in(log_id.index.., |_, _| false)?;
            Ok(())
        })
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError> {
        let bytes = postcard::to_allocvec(&log_id).map_err(|e| StorageIOError::write(&e))?;
        self.write(Durability::Immediate, |txn| {
            txn.open_table(META)?.insert(LAST_PURGED, bytes.as_slice())?;
            let mut table = txn.open_table(LOG)?;
            table.retain_in(..=log_id.index, |_, _| false)?;
            Ok(())
        })
    }
}
