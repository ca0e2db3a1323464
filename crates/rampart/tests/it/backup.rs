//! Backups through the real CLI and nodes: a backup taken under writes restores a new
//! region with the manifest's revision and checksum; verification names a corrupted
//! chunk; a wrong key is refused before anything is written; an interrupted upload is not
//! listed; retention keeps a verified backup; schedules run and report; a node with an
//! unusable key does not start.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rampart_client::PutOptions;
use rampart_testkit::{eventually, free_port, Cluster, ClusterOptions, Workload};

use crate::{binary, DEADLINE};

const KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
const OTHER_KEY: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

use crate::cli::run as rampart;

fn ok(args: &[&str]) -> String {
    let (code, out, err) = rampart(args);
    assert_eq!(code, 0, "rampart {args:?} failed: {out}{err}");
    out
}

fn json(args: &[&str]) -> serde_json::Value {
    let mut args = args.to_vec();
    args.extend(["--output", "json"]);
    serde_json::from_str(&ok(&args)).expect("json answer")
}

/// A backup destination in `dir`, its key, and a node config file with `[backup]` (plus `extra` lines).
struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Setup {
    fn new(extra: &str) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("backup.key");
        std::fs::write(&key, format!("{KEY}\n")).expect("key");
        let config = dir.path().join("backup.toml");
        let text = format!(
            "[backup]\ndestination = \"file://{}\"\nkey_file = \"{}\"\n{extra}",
            dir.path().join("store").display(),
            key.display()
        );
        std::fs::write(&config, text).expect("config");
        Setup { dir, config }
    }

    fn config(&self) -> &str {
        self.config.to_str().expect("utf-8")
    }

    fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    fn destination(&self) -> String {
        format!("file://{}", self.store().display())
    }

    async fn cluster(&self, nodes: usize) -> Cluster {
        let options = ClusterOptions {
            nodes,
            node_args: vec!["--config".into(), self.config().into()],
            ..ClusterOptions::default()
        };
        Cluster::start(binary(), options).await.expect("start cluster")
    }
}

/// Writes `count` values of 1 MiB under `prefix`.
async fn put_mib(client: &rampart_client::Client, prefix: &str, count: usize) {
    let value = "v".repeat(1 << 20);
    for i in 0..count {
        client
            .put(&format!("{prefix}{i}"), &value, PutOptions::default())
            .await
            .expect("put");
    }
}

fn endpoints(cluster: &Cluster) -> String {
    format!("--endpoints={}", cluster.endpoints().join(","))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_under_writes_restores_a_new_region_with_the_manifests_revision_and_checksum() {
    let setup = Setup::new("");
    let mut cluster = setup.cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = Arc::new(cluster.client());
    let workload = Workload::start(client.clone(), 4, "bk/");
    workload.wait_progress(50, DEADLINE).await;
    let source = endpoints(&cluster);
    let manifest = json(&[&source, "backup", "create"]);
    workload.wait_progress(50, DEADLINE).await;
    let history = workload.stop().await;
    assert!(history.acknowledged() > 100);
    let revision = manifest["revision"].as_u64().expect("revision");
    let checksum = manifest["checksum"].as_str().expect("checksum").to_string();
    // Both parts of the state, each with its checksum, and where they meet.
    assert_eq!(manifest["format"], rampart_store::FORMAT_VERSION);
    assert!(manifest["local_checksum"].is_string(), "{manifest}");
    let shipped_bytes = manifest["shipped_bytes"].as_u64().expect("shipped_bytes");
    assert!(shipped_bytes > 0 && shipped_bytes < manifest["state_bytes"].as_u64().expect("state_bytes"));
    let (now, _) = cluster.wait_converged(DEADLINE).await;
    assert!(
        revision > 0 && revision < now,
        "the backup was taken mid-workload: {revision} of {now}"
    );

    // The region is gone: nodes stopped, data dirs wiped.
    let base = cluster.base_dir().to_path_buf();
    cluster.stop_all();
    drop(cluster);
    assert!(!base.exists() || std::fs::remove_dir_all(&base).is_ok());

    let restored = tempfile::tempdir().expect("tempdir");
    let addresses: Vec<_> = (0..3).map(|_| free_port().expect("port")).collect();
    let initial: Vec<String> = addresses
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect();
    let dirs: Vec<String> = (1..=3)
        .map(|i| restored.path().join(format!("n{i}")).display().to_string())
        .collect();
    let mut args = vec!["backup", "restore", "--config", setup.config(), "--initial-cluster"];
    let initial = initial.join(",");
    args.push(&initial);
    for dir in &dirs {
        args.extend(["--data-dir", dir]);
    }
    ok(&args);

    // Started with the source region's [backup] (here spelt with a trailing slash), a
    // restored node refuses: its archive and retention would mix with the source's.
    let same = setup.dir.path().join("same.toml");
    let text = std::fs::read_to_string(setup.config()).expect("config");
    let destination = setup.destination();
    std::fs::write(&same, text.replace(&destination, &format!("{destination}/"))).expect("config");
    let (code, _, err) = start_node(Path::new(&dirs[0]), &same);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("restored from backup") && err.contains("new prefix"),
        "{err}"
    );

    // With a destination of its own, the restored region runs and backs up.
    let own = setup.dir.path().join("own.toml");
    std::fs::write(&own, text.replace(&destination, &format!("{destination}-restored"))).expect("config");
    let options = ClusterOptions {
        nodes: 3,
        base_dir: Some(restored.path().to_path_buf()),
        addresses,
        node_args: vec!["--config".into(), own.to_str().expect("utf-8").into()],
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(binary(), options)
        .await
        .expect("start the restored region");
    let converged = cluster.wait_converged(DEADLINE).await;
    assert_eq!(
        converged,
        (revision, checksum),
        "the restored region is the backup's state"
    );
    // And it takes writes, and backs up to its own destination.
    cluster
        .client()
        .put("after/restore", "yes", PutOptions::default())
        .await
        .expect("a write to the restored region");
    let restored_endpoints = endpoints(&cluster);
    let own_backup = json(&[&restored_endpoints, "backup", "create"]);
    assert!(own_backup["revision"].as_u64().expect("revision") > revision);
    let listed = json(&["backup", "list", "--destination", &destination]);
    assert_eq!(
        listed["backups"].as_array().expect("backups").len(),
        1,
        "the source destination holds only the source's backup: {listed}"
    );
}

/// Runs node 1 on `data` with `config`, for a node that must refuse to start (it never
/// gets as far as listening); (exit code, stdout, stderr).
fn start_node(data: &Path, config: &Path) -> (i32, String, String) {
    rampart(&[
        "node",
        "--id",
        "1",
        "--listen",
        "127.0.0.1:1",
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--config",
        config.to_str().expect("utf-8"),
    ])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn verify_names_a_corrupted_chunk_and_a_wrong_key_writes_nothing() {
    let setup = Setup::new("");
    let cluster = setup.cluster(1).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    // Over two chunks of state (8 MiB each).
    put_mib(&client, "big/", 18).await;
    let manifest = json(&[&endpoints(&cluster), "backup", "create"]);
    let chunks = manifest["chunks"].as_array().expect("chunks").len();
    assert!(chunks >= 2, "{chunks} chunks");
    let id = manifest["id"].as_str().expect("id").to_string();
    let destination = setup.destination();
    let key_file = setup.dir.path().join("backup.key").display().to_string();
    let verify = [
        "backup",
        "verify",
        "--destination",
        &destination,
        "--key-file",
        &key_file,
    ];
    ok(&verify);

    // A wrong key: a clear error, and no data dir left behind.
    let other = setup.dir.path().join("other.key");
    std::fs::write(&other, OTHER_KEY).expect("key");
    let target = setup.dir.path().join("restored");
    let target_text = target.display().to_string();
    let (code, _, err) = rampart(&[
        "backup",
        "restore",
        "--destination",
        &destination,
        "--key-file",
        other.to_str().expect("utf-8"),
        "--data-dir",
        &target_text,
        "--initial-cluster",
        "1=127.0.0.1:1",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("was encrypted with key") && err.contains("not with the key given"),
        "{err}"
    );
    assert!(
        !target.join("snapshot.bin").exists(),
        "nothing restored with a wrong key"
    );
    // No key at all for an encrypted backup.
    let (code, _, err) = rampart(&["backup", "verify", "--destination", &destination]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is encrypted: give its key"), "{err}");

    // One flipped byte in chunk 1 is found and named.
    let chunk = setup.store().join(format!("backups/{id}/chunks/1"));
    let mut bytes = std::fs::read(&chunk).expect("chunk");
    bytes[100] ^= 0xff;
    std::fs::write(&chunk, bytes).expect("corrupt");
    let (code, _, err) = rampart(&verify);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&format!("backup {id}: chunk 1 ")) && err.contains("is corrupted"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unfinished_uploads_are_not_listed_and_retention_keeps_the_newest_verified() {
    let setup = Setup::new("keep_last = 1\n");
    let cluster = setup.cluster(1).await;
    cluster.wait_for_leader(DEADLINE).await;
    let endpoints = endpoints(&cluster);
    let client = cluster.client();
    let mut ids = Vec::new();
    for i in 0..3 {
        client
            .put(&format!("k{i}"), "v", PutOptions::default())
            .await
            .expect("put");
        ids.push(
            json(&[&endpoints, "backup", "create"])["id"]
                .as_str()
                .expect("id")
                .to_string(),
        );
    }
    // An upload cut off before its manifest: chunks only.
    let partial = setup.store().join("backups/20990101T000000000Z-r9/chunks");
    std::fs::create_dir_all(&partial).expect("dir");
    std::fs::write(partial.join("0"), b"partial").expect("chunk");

    let listed = |args: &[&str]| -> Vec<String> {
        json(args)["backups"]
            .as_array()
            .expect("backups")
            .iter()
            .map(|b| b["manifest"]["id"].as_str().expect("id").to_string())
            .collect()
    };
    let destination = setup.destination();
    assert_eq!(
        listed(&["backup", "list", "--destination", &destination]),
        ids,
        "finished backups only"
    );
    assert_eq!(listed(&[&endpoints, "backup", "list"]), ids);

    // keep_last = 1, but nothing goes before a newer backup is verified.
    let verified = json(&[&endpoints, "backup", "verify", &ids[1]]);
    assert_eq!(verified["id"], ids[1].as_str());
    assert_eq!(
        listed(&[&endpoints, "backup", "list"]),
        vec![ids[1].clone(), ids[2].clone()],
        "only what is older than the verified backup goes"
    );
    json(&[&endpoints, "backup", "verify"]);
    assert_eq!(listed(&[&endpoints, "backup", "list"]), vec![ids[2].clone()]);
    assert!(
        !setup.store().join(format!("backups/{}", ids[0])).exists(),
        "a deleted backup leaves no objects"
    );
    let events = client.events(Some("backup"), None).await.expect("events").events;
    let deletes = events
        .iter()
        .filter(|e| e.action == "backup.delete" && e.outcome == "ok")
        .count();
    assert_eq!(deletes, 2, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scheduled_backups_and_verifications_run_on_the_leader_and_report() {
    let setup = Setup::new("schedule = \"*/2 * * * * *\"\nverify_schedule = \"*/3 * * * * *\"\n");
    let cluster = setup.cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    client.put("k", "v", PutOptions::default()).await.expect("put");
    let events = eventually(DEADLINE, "a scheduled backup and a scheduled verification", || async {
        let events = client.events(Some("backup"), None).await.ok()?.events;
        let ran = |action: &str| {
            events
                .iter()
                .any(|e| e.action == action && e.actor == "schedule" && e.outcome == "ok")
        };
        (ran("backup.create") && ran("backup.verify")).then_some(events)
    })
    .await;
    assert!(events.iter().all(|e| e.outcome == "ok"), "{events:?}");
    // Only the leader ran them: one node's metrics count backups, the others none.
    let mut with_backups = 0;
    for node in cluster.nodes.values() {
        let text = crate::proxy::metrics(node.addr).await;
        let last = metric(&text, "rampart_backup_last_success_timestamp_seconds");
        if last > 0.0 {
            with_backups += 1;
            assert!(metric(&text, "rampart_backup_verify_last_success_timestamp_seconds") > 0.0);
            assert_eq!(metric(&text, "rampart_backup_stale"), 0.0);
        }
    }
    assert_eq!(with_backups, 1, "scheduled backups run on the leader only");
    let listed = json(&["backup", "list", "--config", setup.config()]);
    assert!(!listed["backups"].as_array().expect("backups").is_empty());
}

/// The value of the unlabelled series `name`, 0 if absent.
fn metric(text: &str, name: &str) -> f64 {
    crate::proxy::metrics_count(text, &format!("{name} "), "")
}

#[test]
fn a_node_with_an_unusable_backup_key_does_not_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let config = dir.path().join("n.toml");
    let start = |text: &str| {
        std::fs::write(&config, text).expect("config");
        start_node(&data, &config)
    };
    let store = format!("file://{}", dir.path().join("store").display());
    let missing = dir.path().join("missing.key");
    let (code, _, err) = start(&format!(
        "[backup]\ndestination = \"{store}\"\nkey_file = \"{}\"\n",
        missing.display()
    ));
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("refusing to start") && err.contains("missing.key"),
        "{err}"
    );
    let short = dir.path().join("short.key");
    std::fs::write(&short, "abc123").expect("key");
    let (code, _, err) = start(&format!(
        "[backup]\ndestination = \"{store}\"\nkey_file = \"{}\"\n",
        short.display()
    ));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("64 hex digits") && !err.contains("abc123"), "{err}");
    let (code, _, err) = start("[backup]\ndestination = \"file:///x\"\nkey_env = \"RAMPART_TEST_NO_SUCH_KEY\"\n");
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("RAMPART_TEST_NO_SUCH_KEY is not set"), "{err}");
    let (code, _, err) = start(&format!(
        "[backup]\ndestination = \"{store}\"\nschedule = \"every hour\"\n"
    ));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("backup.schedule"), "{err}");
    assert!(
        !Path::new(&data).join("rampart.redb").exists(),
        "refused before opening the store"
    );
}

/// moto's S3-compatible server, installed by `scripts/install-test-tools` (which
/// `scripts/test` runs and names in `RAMPART_TEST_S3_SERVER`), on a loopback port; killed
/// by its PID when dropped.
pub(crate) struct S3Server {
    child: std::process::Child,
    pub(crate) endpoint: String,
}

impl S3Server {
    pub(crate) async fn start(bucket: &str) -> S3Server {
        let program = std::env::var("RAMPART_TEST_S3_SERVER").unwrap_or_else(|_| {
            let default = concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/tools/venv/bin/moto_server");
            assert!(
                Path::new(default).exists(),
                "the S3 tests need moto's server: run scripts/test (or scripts/install-test-tools) first"
            );
            default.to_string()
        });
        let port = free_port().expect("port").port();
        let child = Command::new(program)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start moto_server");
        let server = S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        };
        let http = reqwest::Client::new();
        let url = format!("{}/{bucket}", server.endpoint);
        eventually(DEADLINE, "the S3 server to create a bucket", || async {
            let answer = http.put(&url).send().await.ok()?;
            answer.status().is_success().then_some(())
        })
        .await;
        server
    }

    pub(crate) fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ACCESS_KEY_ID", "rampart-test"),
            ("AWS_SECRET_ACCESS_KEY", "rampart-test-secret"),
            ("AWS_REGION", "us-east-1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backups_to_an_s3_compatible_store_verify_and_restore() {
    let s3 = S3Server::start("rampart-backups").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("backup.key");
    std::fs::write(&key, KEY).expect("key");
    let config = dir.path().join("backup.toml");
    std::fs::write(
        &config,
        format!(
            "[backup]\ndestination = \"s3://rampart-backups/region-a\"\nkey_file = \"{}\"\n\n[backup.s3]\nendpoint = \"{}\"\nallow_http = true\n",
            key.display(),
            s3.endpoint
        ),
    )
    .expect("config");
    let config = config.to_str().expect("utf-8");
    let options = ClusterOptions {
        nodes: 1,
        node_args: vec!["--config".into(), config.into()],
        env: s3.env(),
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(binary(), options).await.expect("start cluster");
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    put_mib(&client, "s3/", 10).await;
    let manifest = json(&[&endpoints(&cluster), "backup", "create"]);
    let (revision, _) = cluster.wait_converged(DEADLINE).await;
    assert_eq!(
        manifest["revision"].as_u64(),
        Some(revision),
        "every write is in the backup"
    );
    let checksum = manifest["checksum"].as_str().expect("checksum").to_string();

    // The CLI reads the bucket itself, with the credentials from the environment.
    let cli = |args: &[&str]| {
        let mut command = Command::new(binary());
        command
            .args(args)
            .args(["--config", config, "--output", "json"])
            .envs(s3.env());
        let out = command.output().expect("run rampart");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str::<serde_json::Value>(&text).expect("json")
    };
    let listed = cli(&["backup", "list"]);
    assert_eq!(listed["backups"][0]["manifest"]["id"], manifest["id"]);
    assert_eq!(cli(&["backup", "verify"])["id"], manifest["id"]);
    let restored = dir.path().join("restored");
    let restored_text = restored.display().to_string();
    let address = free_port().expect("port");
    let initial = format!("1={address}");
    cli(&[
        "backup",
        "restore",
        "--data-dir",
        &restored_text,
        "--initial-cluster",
        &initial,
    ]);
    let options = ClusterOptions {
        nodes: 1,
        base_dir: Some(dir.path().join("region")),
        addresses: vec![address],
        ..ClusterOptions::default()
    };
    std::fs::create_dir_all(dir.path().join("region")).expect("dir");
    std::fs::rename(&restored, dir.path().join("region/n1")).expect("move the restored dir");
    let restored = Cluster::start(binary(), options)
        .await
        .expect("start the restored region");
    assert_eq!(restored.wait_converged(DEADLINE).await, (revision, checksum));
}

/// Wall-clock ms, for point-in-time restores (the leader stamps writes with its own clock,
/// on this machine).
fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// Waits until the wall clock has moved past `ms`, so writes before and after differ in time.
async fn clock_past(ms: u64) {
    eventually(DEADLINE, "the clock to move on", || async {
        (wall_ms() > ms).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn point_in_time_restores_replay_the_archived_log_to_a_revision_and_to_a_time() {
    let setup = Setup::new("archive_interval = \"100ms\"\n");
    let cluster = setup.cluster(1).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let endpoints = endpoints(&cluster);
    let mut revisions = Vec::new();
    for i in 1..=10 {
        revisions.push(
            client
                .put(&format!("k{i}"), "v", PutOptions::default())
                .await
                .expect("put")
                .revision,
        );
    }
    let backup = json(&[&endpoints, "backup", "create"]);
    assert_eq!(backup["revision"].as_u64(), revisions.last().copied());
    let mut cut = 0;
    for i in 11..=20 {
        let before = wall_ms();
        clock_past(before).await;
        revisions.push(
            client
                .put(&format!("k{i}"), "v", PutOptions::default())
                .await
                .expect("put")
                .revision,
        );
        if i == 17 {
            cut = wall_ms();
            clock_past(cut).await;
        }
    }
    let applied = cluster.status_of(1).await.expect("status").applied_index;
    eventually(DEADLINE, "the log archive to catch up", || async {
        let text = reqwest::get(format!("http://{}/metrics", cluster.nodes[&1].addr))
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (metric(&text, "rampart_backup_archived_log_index") >= applied as f64).then_some(())
    })
    .await;

    let restore_and_read = |point: &'static str, value: String| {
        let config = setup.config().to_string();
        async move {
            let dir = tempfile::tempdir().expect("tempdir");
            let address = free_port().expect("port");
            let data = dir.path().join("n1").display().to_string();
            let initial = format!("1={address}");
            ok(&[
                "backup",
                "restore",
                "--config",
                &config,
                point,
                &value,
                "--data-dir",
                &data,
                "--initial-cluster",
                &initial,
            ]);
            let options = ClusterOptions {
                nodes: 1,
                base_dir: Some(dir.path().to_path_buf()),
                addresses: vec![address],
                ..ClusterOptions::default()
            };
            let region = Cluster::start(binary(), options)
                .await
                .expect("start the restored region");
            region.wait_for_leader(DEADLINE).await;
            let (revision, _) = region.wait_converged(DEADLINE).await;
            let keys = final_keys(&region).await;
            (revision, keys, dir, region)
        }
    };
    let target = revisions[14]; // the write of k15
    let (revision, keys, _dir, _region) = restore_and_read("--to-revision", target.to_string()).await;
    assert_eq!(revision, target);
    assert!(
        keys.contains(&"k15".to_string()) && !keys.contains(&"k16".to_string()),
        "{keys:?}"
    );

    let (revision, keys, _dir2, _region2) = restore_and_read("--to-time", cut.to_string()).await;
    assert_eq!(revision, revisions[16], "every write up to k17, none after");
    assert_eq!(keys.len(), 17, "{keys:?}");

    // Past the archive: a clear error.
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("n1").display().to_string();
    let beyond = (revisions[19] + 100).to_string();
    let (code, _, err) = rampart(&[
        "backup",
        "restore",
        "--config",
        setup.config(),
        "--to-revision",
        &beyond,
        "--data-dir",
        &data,
        "--initial-cluster",
        "1=127.0.0.1:1",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is beyond it"), "{err}");
    assert!(!Path::new(&data).join("snapshot.bin").exists());
}

async fn final_keys(cluster: &Cluster) -> Vec<String> {
    let items = cluster.client().range("k", false).await.expect("range").items;
    items.into_iter().map(|kv| kv.key).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_services_own_data_is_backed_up_on_its_primarys_node_and_restored_through_its_command() {
    let setup = Setup::new("");
    let cluster = setup.cluster(3).await;
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    // The primary on a follower: the leader asks that node to run the command.
    let host = *cluster.nodes.keys().find(|id| **id != leader).expect("a follower");
    let data = setup.dir.path().join("service-data");
    let bytes: Vec<u8> = (0..(9 << 20))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&data, &bytes).expect("data");
    let restored = setup.dir.path().join("service-restored");
    let policy = |command: String| -> rampart_core::service::PolicySpec {
        serde_json::from_value(serde_json::json!({
            "checks": [{"kind": "exec", "command": "true", "interval": "100ms", "rise": 1, "fall": 1}],
            "backup": {"command": command, "restore": format!("cat > {}", restored.display())},
        }))
        .expect("policy")
    };
    client
        .service_put(
            "db",
            &policy(format!("test \"$RAMPART_INSTANCE\" = a && cat {}", data.display())),
        )
        .await
        .expect("service");
    let instance = rampart_core::service::InstanceSpec {
        endpoint: "127.0.0.1:1".into(),
        node: Some(host),
        ..Default::default()
    };
    client.instance_put("db", "a", &instance).await.expect("instance");
    eventually(DEADLINE, "instance a to become primary", || async {
        client.switchover("db", "a").await.ok()
    })
    .await;

    let endpoints = endpoints(&cluster);
    let manifest = json(&[&endpoints, "backup", "create"]);
    let part = &manifest["services"][0];
    assert_eq!(part["service"], "db");
    assert_eq!(part["instance"], "a");
    assert_eq!(part["bytes"].as_u64(), Some(bytes.len() as u64));
    assert!(part["chunks"].as_array().expect("chunks").len() >= 2);
    ok(&["backup", "verify", "--config", setup.config()]);
    ok(&["backup", "restore-service", "db", "--config", setup.config()]);
    assert!(
        std::fs::read(&restored).expect("restored") == bytes,
        "the service's data came back whole"
    );

    // A failing command fails the backup: nothing listed for it, an event says why.
    client
        .service_put("db", &policy("echo broken >&2; exit 3".into()))
        .await
        .expect("service");
    let (code, _, err) = rampart(&[&endpoints, "backup", "create"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("service db: backup command") && err.contains("broken"),
        "{err}"
    );
    let listed = json(&["backup", "list", "--config", setup.config()]);
    assert_eq!(listed["backups"].as_array().expect("backups").len(), 1);
}

/// A region whose archiver has not read its log yet (its interval is an hour): `extra`
/// node flags, `--snapshot-logs 50`, 200 writes; answers once every node has compacted.
async fn region_with_an_unread_archive(setup: &Setup, extra: &[&str]) -> (Cluster, u64) {
    let mut node_args = vec!["--config".to_string(), setup.config().to_string()];
    node_args.extend(["--snapshot-logs", "50"].iter().chain(extra).map(|a| a.to_string()));
    let options = ClusterOptions {
        nodes: 3,
        node_args,
        ..ClusterOptions::default()
    };
    let cluster = Cluster::start(binary(), options).await.expect("start cluster");
    let leader = cluster.wait_for_leader(DEADLINE).await;
    eventually(DEADLINE, "the leader's archiver to register", || async {
        cluster
            .status_of(leader)
            .await?
            .log_readers
            .contains_key("archiver")
            .then_some(())
    })
    .await;
    let client = cluster.client();
    for i in 0..200 {
        client
            .put(&format!("retain/{}", i % 10), "v", PutOptions::default())
            .await
            .expect("put");
    }
    for id in cluster.nodes.keys() {
        eventually(DEADLINE, "every node to compact its log", || async {
            (cluster.status_of(*id).await?.purged_index >= 100).then_some(())
        })
        .await;
    }
    (cluster, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_keeps_the_log_the_archiver_has_not_read_and_only_on_the_leader() {
    let setup = Setup::new("archive_interval = \"1h\"\n");
    let (cluster, leader) = region_with_an_unread_archive(&setup, &[]).await;
    for id in cluster.nodes.keys() {
        let status = cluster.status_of(*id).await.expect("status");
        if *id == leader {
            assert!(
                status.first_log_index <= 1,
                "the leader keeps its whole log for the archiver: {status:?}"
            );
        } else {
            // The purge point moves first, the entries go right after it: wait for both.
            eventually(
                DEADLINE,
                "a follower to archive nothing and compact as usual",
                || async {
                    let status = cluster.status_of(*id).await?;
                    (status.first_log_index == status.purged_index + 1).then_some(())
                },
            )
            .await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_max_retained_log_bytes_the_log_is_compacted_and_an_event_says_the_archive_has_a_gap() {
    let setup = Setup::new("archive_interval = \"1h\"\n");
    let (cluster, leader) = region_with_an_unread_archive(&setup, &["--max-retained-log-bytes", "1000"]).await;
    let status = cluster.status_of(leader).await.expect("status");
    assert_eq!(status.first_log_index, status.purged_index + 1, "{status:?}");
    let event = eventually(DEADLINE, "the archive gap event", || async {
        let events = cluster.client().events(Some("backup"), None).await.ok()?;
        events.events.into_iter().find(|e| e.action == "backup.archive_gap")
    })
    .await;
    assert!(
        event.detail.contains("max-retained-log-bytes = 1000") && event.detail.contains("backup taken after index"),
        "{event:?}"
    );
}
