//! `rampart-store` is the replicated state of one region: the commands that go through the
//! Raft log, their deterministic apply, snapshots, and the durable storage openraft needs
//! (log, vote, committed pointer, snapshot) in one redb file. The state has two parts, each
//! with its own revision and checksum: the shipped part a standby region replicates (KV
//! with revisions, leases, elections, services and their roles, tokens: `shipped`) and the
//! region-local part (events, quota standings, instance verdicts: `local`). Apply never
//! reads a clock, draws a random number or does I/O: every node that applies the same log
//! reaches the same state and the same checksums. A data dir of format 1 is migrated when
//! opened (`v1`). A standby region too far behind for the primary's history installs the
//! primary's shipped state in steps through its own log (`seed`).

// openraft's traits fix `StorageError` as the error type; it is large, and boxing it
// here would only add a conversion at every trait boundary.
#![allow(clippy::result_large_err)]

pub mod command;
pub mod local;
pub mod log_store;
pub mod seed;
pub mod shipped;
pub mod state;
pub mod state_machine;
pub mod v1;
pub mod v2;
pub mod v3;

pub use command::{Batch, Command, Op, Outcome, Outcomes};
pub use local::{Local, Verdict};
pub use log_store::{stamp_format_version, LogStore, OpenError, FORMAT_VERSION};
pub use seed::SeedStep;
pub use shipped::{Shipped, RULES};
pub use state::{check_encoded, checksum_text, shipped_checksum, Checksum, State};
pub use state_machine::{restored_snapshot_head, Applied, ShippedWrite, StateMachineStore};

openraft::declare_raft_types!(
    /// Openraft's type configuration for a Rampart region.
    pub TypeConfig:
        D = Batch,
        R = Outcomes,
        NodeId = u64,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = tokio::fs::File,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;

/// Opens (or creates) the redb file of a node (log and vote) and returns its log store and
/// its state machine, whose snapshot file lives beside it.
/// `on_fsync` hears how long each durable log commit took (for metrics).
pub fn open(
    path: &std::path::Path,
    watch_history: usize,
    on_fsync: Option<log_store::FsyncObserver>,
) -> Result<(LogStore, StateMachineStore), OpenError> {
    let (db, found) = log_store::open_database(path)?;
    let snapshot = path.with_file_name(state_machine::SNAPSHOT_FILE);
    if found < FORMAT_VERSION {
        // Migrated beside the old snapshot, then the new version recorded, then put in
        // place: a crash at any point leaves a data dir that opens (and migrates again).
        state_machine::migrate_snapshot(&snapshot, found)?;
        log_store::record_format_version(&db)?;
        tracing::info!(from = found, to = FORMAT_VERSION, "data dir migrated");
    }
    let log = LogStore::new(std::sync::Arc::new(db), on_fsync)?;
    let sm = StateMachineStore::new(snapshot, watch_history)?;
    Ok((log, sm))
}
