//! Upgrades from data dir format 1, on what the last format-1 release really wrote
//! (`tests/fixtures/format-1`, made by `scripts/make-format-1-fixture`): its data dir is
//! migrated when a node opens it and the region then adopts the current apply rules; its
//! backup verifies and restores into a region of the current format.

use std::path::{Path, PathBuf};

use rampart_core::api::ClusterStatus;
use rampart_testkit::{eventually, free_port, Cluster, ClusterOptions};

use crate::cli::run as rampart;
use crate::{binary, DEADLINE};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/format-1")
}

/// What the format-1 node reported last, after its last write.
fn old_status() -> ClusterStatus {
    let text = std::fs::read_to_string(fixture().join("status.json")).expect("the fixture's status");
    serde_json::from_str(&text).expect("a status")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read the fixture") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A one-node region on the data dir(s) under `base` (`n1`).
async fn start_on(base: &Path) -> Cluster {
    let options = ClusterOptions {
        nodes: 1,
        base_dir: Some(base.to_path_buf()),
        addresses: vec![free_port().expect("port")],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(binary(), options).await.expect("start");
    cluster.wait_for_leader(DEADLINE).await;
    cluster
}

/// The keys the fixture wrote before its backup, and the one after it.
async fn assert_keys(cluster: &Cluster, after_backup: bool) {
    let client = cluster.client();
    for i in 1..=35 {
        let kv = client.get_key(&format!("fixture/k{i}"), false).await.expect("get");
        assert_eq!(kv.map(|kv| kv.value), Some(format!("v{i}")), "fixture/k{i}");
    }
    let last = client.get_key("fixture/after-backup", false).await.expect("get");
    assert_eq!(last.is_some(), after_backup);
}

/// Waits for the leader's `AdoptRules` (one shipped revision past `revision`), then checks
/// that a lease grant moves the revision (under format 1's rules it did not).
async fn assert_current_rules(cluster: &Cluster, revision: u64) {
    let client = cluster.client();
    eventually(DEADLINE, "the region to adopt the current rules", || async {
        let status = client.cluster().await.ok()?;
        (status.revision == revision + 1).then_some(())
    })
    .await;
    client
        .lease_grant(std::time::Duration::from_secs(60))
        .await
        .expect("grant");
    let status = client.cluster().await.expect("status");
    assert_eq!(status.revision, revision + 2, "a lease grant is a shipped write now");
}

#[tokio::test]
async fn a_format_1_data_dir_is_migrated_and_its_region_adopts_the_current_rules() {
    let old = old_status();
    let base = tempfile::tempdir().expect("tempdir");
    copy_dir(&fixture().join("data"), &base.path().join("n1"));
    let mut cluster = start_on(base.path()).await;
    assert_keys(&cluster, true).await;
    // The instance and its verdict (now in the local part) are there.
    let db = cluster.client().service("db").await.expect("service db");
    assert_eq!(db.instances[0].health, rampart_core::health::Health::Down);
    assert_current_rules(&cluster, old.revision).await;

    // Migrated once: the data dir now records the current format.
    let data_dir = cluster.nodes[&1].data_dir.clone();
    cluster.kill(1);
    let stamped = eventually(DEADLINE, "the killed node's data dir to open", || async {
        rampart_store::log_store::open_database(&data_dir.join("rampart.redb"))
            .ok()
            .map(|(_, version)| version)
    })
    .await;
    assert_eq!(stamped, rampart_store::FORMAT_VERSION);
}

#[tokio::test]
async fn a_format_1_backup_verifies_and_restores_into_the_current_format() {
    let old = old_status();
    let store = tempfile::tempdir().expect("tempdir");
    copy_dir(&fixture().join("backups"), store.path());
    let destination = format!("file://{}", store.path().display());
    let (code, out, err) = rampart(&["backup", "verify", "--destination", &destination]);
    assert_eq!(code, 0, "{out}{err}");

    let base = tempfile::tempdir().expect("tempdir");
    let dir = base.path().join("n1");
    let addr = free_port().expect("port");
    let initial = format!("1={addr}");
    let (code, out, err) = rampart(&[
        "backup",
        "restore",
        "--destination",
        &destination,
        "--data-dir",
        dir.to_str().expect("utf-8"),
        "--initial-cluster",
        &initial,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let options = ClusterOptions {
        nodes: 1,
        base_dir: Some(base.path().to_path_buf()),
        addresses: vec![addr],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(binary(), options)
        .await
        .expect("start the restored region");
    cluster.wait_for_leader(DEADLINE).await;
    assert_keys(&cluster, false).await;
    // The backup came before the fixture's last write: one revision before its status.
    assert_current_rules(&cluster, old.revision - 1).await;
}
