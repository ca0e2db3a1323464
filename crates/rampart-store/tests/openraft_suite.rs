//! Runs openraft's own storage test suite against the real redb-backed store.

use openraft::testing::{StoreBuilder, Suite};
use rampart_store::{LogStore, StateMachineStore, StorageError, TypeConfig};
use tempfile::TempDir;

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, TempDir> for RedbBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = TempDir::new().expect("temp dir");
        let (log, sm) = rampart_store::open(&dir.path().join("node.redb"), 100, None).expect("open a new store");
        Ok((dir, log, sm))
    }
}

#[test]
fn redb_store_passes_openraft_storage_suite() {
    if let Err(e) = Suite::test_all(RedbBuilder) {
        panic!("openraft storage suite failed: {e}");
    }
}
