//! PostgreSQL in backups (`kind = "postgres"`):
//!
//! - **The base backup**: `pg_basebackup` of the primary as one tar (its WAL included, so
//!   it restores on its own), streamed into the backup as the service's part.
//! - **WAL archiving**: PostgreSQL's `archive_command` is `rampart backup wal-push`, which
//!   hands each finished WAL file to the node through a spool directory beside the data dir
//!   (`DATA.archive`) and waits until the node has stored it under `pg/SERVICE/wal/` of the
//!   backup destination: PostgreSQL recycles a segment only once it is stored.
//! - **The restore**: a base backup into a new data dir, the archived WAL beside it, and
//!   PostgreSQL's own archive recovery to a time, a WAL position or the end of the archive,
//!   watched until it has promoted; then stopped, ready to start.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rampart_core::backup::{Manifest, PgBase, ServicePart};
use rampart_core::postgres::{is_timeline_history, is_wal_segment, wal_position, Lsn, Postgres};
use serde::Serialize;

use crate::node::now_ms;
use crate::vault::{BackupError, ServiceSource, Vault};

/// Beside the data dir: where `wal-push` leaves WAL files for the node.
const SPOOL_SUFFIX: &str = ".archive";
/// A WAL file being copied into the spool.
const PART_SUFFIX: &str = ".rampart-part";
/// Written by the node once it stored the WAL file of the same name.
const DONE_SUFFIX: &str = ".rampart-done";
/// How often `wal-push` looks for the node's answer.
const PUSH_POLL: Duration = Duration::from_millis(20);
/// How long a restore's archive recovery may take.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long PostgreSQL may take to stop after a restore.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The spool directory of the instance whose data dir is `data`.
pub fn spool_dir(data: &Path) -> PathBuf {
    PathBuf::from(format!("{}{SPOOL_SUFFIX}", data.display()))
}

/// The `archive_command` of an instance on a node that backs up: this very program's
/// `backup wal-push` into the instance's spool.
pub fn archive_command(data: &Path) -> Result<String, String> {
    let program = std::env::current_exe().map_err(|e| format!("cannot find this program's path: {e}"))?;
    Ok(format!(
        "{} backup wal-push --spool {} %p %f",
        shell_quote(&program.display().to_string()),
        shell_quote(&spool_dir(data).display().to_string())
    ))
}

/// Makes the spool directory, owned by PostgreSQL's user.
pub fn make_spool(data: &Path) -> Result<(), String> {
    let spool = spool_dir(data);
    std::fs::create_dir_all(&spool).map_err(|e| format!("cannot create {}: {e}", spool.display()))?;
    crate::pg::own(&spool)
}

fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// `rampart backup wal-push` (PostgreSQL's `archive_command`): copies the WAL file at `path`
/// into `spool` as `name`, then waits up to `timeout` until the node has stored it. An
/// error makes PostgreSQL keep the file and try again later.
pub fn push(spool: &Path, path: &Path, name: &str, timeout: Duration) -> Result<(), String> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(format!("{name:?} is not a WAL file name"));
    }
    let done = spool.join(format!("{name}{DONE_SUFFIX}"));
    let part = spool.join(format!("{name}{PART_SUFFIX}"));
    let spooled = spool.join(name);
    // An answer left from an earlier attempt must not answer this one.
    let _ = std::fs::remove_file(&done);
    let copy = || -> std::io::Result<()> {
        std::fs::copy(path, &part)?;
        std::fs::File::open(&part)?.sync_all()?;
        std::fs::rename(&part, &spooled)
    };
    copy().map_err(|e| format!("cannot copy {} into {}: {e}", path.display(), spool.display()))?;
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done.exists() {
            let _ = std::fs::remove_file(&done);
            return Ok(());
        }
        std::thread::sleep(PUSH_POLL);
    }
    Err(format!(
        "{name} was not stored within {}s: does the node hosting this instance run with a [backup] table, and reach its destination?",
        timeout.as_secs()
    ))
}

/// Stores every WAL file waiting in the spool of the instance at `data` (oldest name first),
/// and tells `wal-push` each one is done. The number stored.
pub async fn store_spooled(vault: &Vault, service: &str, data: &Path) -> Result<usize, BackupError> {
    let spool = spool_dir(data);
    let Ok(entries) = std::fs::read_dir(&spool) else {
        return Ok(0);
    };
    let mut names: Vec<String> = entries
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| !name.ends_with(PART_SUFFIX) && !name.ends_with(DONE_SUFFIX))
        .collect();
    names.sort_unstable();
    for name in &names {
        let spooled = spool.join(name);
        let bytes = std::fs::read(&spooled).map_err(|e| BackupError::Io(format!("{}: {e}", spooled.display())))?;
        vault.put_wal(service, name, bytes).await?;
        let done = spool.join(format!("{name}{DONE_SUFFIX}"));
        std::fs::write(&done, b"").map_err(|e| BackupError::Io(format!("{}: {e}", done.display())))?;
        let _ = std::fs::remove_file(&spooled);
    }
    Ok(names.len())
}

/// Streams a base backup of the primary at `endpoint` into backup `id` as the part of
/// `service`.
pub async fn base_backup(
    vault: &Vault,
    id: &str,
    service: &str,
    instance: &str,
    pg: &Postgres,
    endpoint: &str,
) -> Result<ServicePart, BackupError> {
    let failed = |message: String| BackupError::Io(format!("service {service}: {message}"));
    let sql = crate::pg::connect(pg, endpoint).await.map_err(failed)?;
    let start_wal: String = sql
        .query_one("SELECT pg_walfile_name(pg_current_wal_lsn())", &[])
        .await
        .map_err(|e| failed(format!("the primary's WAL position: {e}")))?
        .get(0);
    // As the replication role: the one `pg_hba.conf` lets in for a copy.
    let password = crate::pg::password(&pg.replication_user.password).map_err(failed)?;
    let conninfo = crate::pg::conninfo_to(pg, endpoint, &pg.replication_user.name, "", "rampart-backup");
    let mut command = crate::pg::command(&pg.bin_dir, "pg_basebackup");
    command
        .args([
            "-D",
            "-",
            "-F",
            "tar",
            "-X",
            "fetch",
            "--checkpoint=fast",
            "-d",
            &conninfo,
        ])
        .env("PGPASSWORD", password);
    let source = ServiceSource {
        command,
        what: "pg_basebackup".to_string(),
        timeout: Duration::from_secs(24 * 3600),
        restore: None,
    };
    let mut part = vault.stream_service(id, service, instance, source).await?;
    let end_lsn: String = sql
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(|e| failed(format!("the primary's WAL position: {e}")))?
        .get(0);
    part.postgres = Some(PgBase {
        bin_dir: pg.bin_dir.clone(),
        superuser: pg.superuser.name.clone(),
        start_wal,
        end_lsn,
        end_ms: now_ms(),
    });
    Ok(part)
}

/// A backup's whole verification: the vault's checks (every hash, the state decoded,
/// every service part read), then each PostgreSQL base backup restored into a scratch data
/// dir with the archived WAL after it, replayed by PostgreSQL to the end of the archive;
/// recorded only when all of it passed. The manifest, and each PostgreSQL restore.
pub async fn verify(vault: &Vault, id: Option<&str>, now_ms: u64) -> Result<(Manifest, Vec<Restored>), BackupError> {
    let manifest = vault.check(id).await?;
    let mut restored = Vec::new();
    for part in manifest.services.iter().filter(|p| p.postgres.is_some()) {
        let scratch = std::env::temp_dir().join(format!(
            "rampart-verify-{}-{}-{}",
            std::process::id(),
            now_ms,
            part.service
        ));
        let request = Restore {
            service: &part.service,
            data_dir: &scratch,
            target: Target::End,
            port: rampart_core::postgres::PORT_DEFAULT,
            bin_dir: None,
        };
        let done = restore(vault, &manifest, &request).await;
        let _ = std::fs::remove_dir_all(&scratch);
        restored.push(done.map_err(|e| BackupError::Invalid {
            id: manifest.id.clone(),
            message: format!("service {}: the restore check failed: {e}", part.service),
        })?);
    }
    vault.record_verified(&manifest, now_ms).await?;
    Ok((manifest, restored))
}

/// Deletes each PostgreSQL service's archived WAL from before the start of its oldest base
/// backup among `kept` (no restore can start earlier). A service without a kept base
/// backup keeps its WAL.
pub async fn prune_archive(vault: &Vault, kept: &[&Manifest]) -> Result<usize, BackupError> {
    let mut oldest: std::collections::BTreeMap<&str, &str> = std::collections::BTreeMap::new();
    for part in kept.iter().flat_map(|m| &m.services) {
        let Some(start) = part.postgres.as_ref().and_then(|base| wal_position(&base.start_wal)) else {
            continue;
        };
        let position = oldest.entry(&part.service).or_insert(start);
        *position = (*position).min(start);
    }
    let mut deleted = 0;
    for (service, position) in oldest {
        deleted += vault.prune_wal(service, position).await?;
    }
    Ok(deleted)
}

/// Where an archive recovery stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Every transaction committed at or before this time (ms since the epoch).
    Time(u64),
    /// Every transaction up to this WAL position.
    Lsn(Lsn),
    /// All the archived WAL.
    End,
}

impl Target {
    /// Whether the base backup `base` can reach this target (it ended before it).
    pub fn reachable_from(&self, base: &PgBase) -> bool {
        match self {
            Target::Time(ms) => base.end_ms <= *ms,
            Target::Lsn(lsn) => base.end_lsn.parse::<Lsn>().is_ok_and(|end| end <= *lsn),
            Target::End => true,
        }
    }
}

/// The newest backup with a base backup of `service` that can reach `target`.
pub async fn backup_for(vault: &Vault, service: &str, target: Target) -> Result<Manifest, BackupError> {
    let listed = vault.list().await?;
    listed
        .into_iter()
        .rev()
        .map(|l| l.manifest)
        .find(|m| {
            m.services
                .iter()
                .any(|p| p.service == service && p.postgres.as_ref().is_some_and(|base| target.reachable_from(base)))
        })
        .ok_or_else(|| {
            BackupError::Io(format!(
                "no backup holds a base backup of PostgreSQL service {service} that ended before the target"
            ))
        })
}

/// A PostgreSQL data dir restored from a backup.
#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    pub backup: String,
    pub service: String,
    pub data_dir: String,
    /// The port written into its settings.
    pub port: u16,
    /// Archived WAL files it replayed from.
    pub wal_files: usize,
    /// What PostgreSQL said of where its recovery stopped.
    pub recovery: Vec<String>,
}

/// A restore of one PostgreSQL service's data.
pub struct Restore<'a> {
    pub service: &'a str,
    /// A new (absent or empty) directory.
    pub data_dir: &'a Path,
    pub target: Target,
    /// The port the restored server is to listen on.
    pub port: u16,
    /// Where PostgreSQL's programs are, when not where the backup's policy said.
    pub bin_dir: Option<String>,
}

/// Restores the base backup of `manifest` for `request.service` into `request.data_dir`,
/// replays the archived WAL to the target with PostgreSQL (which then promotes: a new
/// timeline), and stops it. Nothing is left behind on failure.
pub async fn restore(vault: &Vault, manifest: &Manifest, request: &Restore<'_>) -> Result<Restored, BackupError> {
    let service = request.service;
    let base = manifest
        .services
        .iter()
        .find(|p| p.service == service)
        .and_then(|p| p.postgres.clone())
        .ok_or_else(|| BackupError::Invalid {
            id: manifest.id.clone(),
            message: format!("it holds no PostgreSQL base backup of service {service}"),
        })?;
    let bin_dir = request.bin_dir.clone().unwrap_or_else(|| base.bin_dir.clone());
    if !Path::new(&bin_dir).join("postgres").exists() {
        return Err(BackupError::Io(format!(
            "PostgreSQL's programs are not in {bin_dir} on this machine (give --bin-dir)"
        )));
    }
    let data = request.data_dir;
    if std::fs::read_dir(data).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(BackupError::Io(format!(
            "{} is not empty: restore into a new directory",
            data.display()
        )));
    }
    let wal_dir = PathBuf::from(format!("{}.restore-wal", data.display()));
    let run_dir = scratch_dir()?;
    let restored = async {
        make_owned_dir(data)?;
        make_owned_dir(&wal_dir)?;
        extract(vault, manifest, service, data).await?;
        let wal_files = fetch_wal(vault, service, &base, &wal_dir).await?;
        prepare(data, request.port)?;
        let recovery = recover(&bin_dir, &base, data, &wal_dir, &run_dir, request).await?;
        Ok(Restored {
            backup: manifest.id.clone(),
            service: service.to_string(),
            data_dir: data.display().to_string(),
            port: request.port,
            wal_files,
            recovery,
        })
    }
    .await;
    let _ = std::fs::remove_dir_all(&wal_dir);
    let _ = std::fs::remove_dir_all(&run_dir);
    if restored.is_err() {
        let _ = std::fs::remove_dir_all(data);
    }
    restored
}

/// A fresh directory for the recovering server's socket and log (short: a socket's path
/// is limited to 108 bytes), owned by PostgreSQL's user.
fn scratch_dir() -> Result<PathBuf, BackupError> {
    let dir = std::env::temp_dir().join(format!("rampart-pg-{}-{}", std::process::id(), now_ms()));
    make_owned_dir(&dir)?;
    Ok(dir)
}

/// A directory (created if absent) only PostgreSQL's user may enter.
fn make_owned_dir(dir: &Path) -> Result<(), BackupError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e: String| BackupError::Io(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(|e| io(e.to_string()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| io(e.to_string()))?;
    crate::pg::own(dir).map_err(io)
}

/// Unpacks the base backup's tar into `data` (as PostgreSQL's user).
async fn extract(vault: &Vault, manifest: &Manifest, service: &str, data: &Path) -> Result<(), BackupError> {
    let mut command = std::process::Command::new("tar");
    command
        .arg("-x")
        .arg("-C")
        .arg(data)
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some((uid, gid)) = crate::pg::os_user() {
        use std::os::unix::process::CommandExt;
        command.uid(uid).gid(gid);
    }
    let mut tar = command
        .spawn()
        .map_err(|e| BackupError::Io(format!("cannot start tar: {e}")))?;
    let stdin = tar.stdin.take().expect("piped stdin");
    let fed = vault.read_service(manifest, service, stdin).await;
    let output = tar
        .wait_with_output()
        .map_err(|e| BackupError::Io(format!("tar: {e}")))?;
    fed?;
    if !output.status.success() {
        return Err(BackupError::Io(format!(
            "tar could not unpack the base backup ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// Downloads the archived WAL that continues `base` (every segment from its start on, and
/// every timeline's history) into `dir`. The number of files.
async fn fetch_wal(vault: &Vault, service: &str, base: &PgBase, dir: &Path) -> Result<usize, BackupError> {
    let start = wal_position(&base.start_wal).unwrap_or_default().to_string();
    let wanted: Vec<String> = vault
        .wal_files(service)
        .await?
        .into_iter()
        .filter(|name| is_timeline_history(name) || (is_wal_segment(name) && wal_position(name) >= Some(&start)))
        .collect();
    for name in &wanted {
        let bytes = vault.get_wal(service, name).await?;
        let path = dir.join(name);
        std::fs::write(&path, bytes).map_err(|e| BackupError::Io(format!("{}: {e}", path.display())))?;
        crate::pg::own(&path).map_err(BackupError::Io)?;
    }
    Ok(wanted.len())
}

/// Settings Rampart wrote for the instance the backup came from, which a restored server
/// must not keep (where it listened, whom it followed or waited for, where it archived).
const RESTORE_DROPS: &[&str] = &[
    "port",
    "listen_addresses",
    "unix_socket_directories",
    "synchronous_standby_names",
    "archive_mode",
    "archive_command",
    "primary_conninfo",
    "primary_slot_name",
];

/// Readies the unpacked data dir for archive recovery: `recovery.signal`, no marks of its
/// old role, and its settings without those of the old instance (and its new port).
fn prepare(data: &Path, port: u16) -> Result<(), BackupError> {
    let io = |e: String| BackupError::Io(e);
    for mark in ["standby.signal", "rampart.rewind", "postmaster.pid", "postmaster.opts"] {
        let _ = std::fs::remove_file(data.join(mark));
    }
    crate::pg::write_file(&data.join("recovery.signal"), "").map_err(io)?;
    let settings = data.join("rampart.conf");
    let old = std::fs::read_to_string(&settings).unwrap_or_default();
    let mut lines: Vec<String> = old
        .lines()
        .filter(|line| {
            let name = line.split('=').next().unwrap_or_default().trim();
            !RESTORE_DROPS.contains(&name)
        })
        .map(str::to_string)
        .collect();
    lines.push(format!("port = {port}"));
    lines.push("listen_addresses = '*'".to_string());
    crate::pg::write_file(&settings, &(lines.join("\n") + "\n")).map_err(io)
}

/// Runs PostgreSQL's archive recovery on `data` until it has promoted (reaching its target,
/// or the end of the archived WAL), then stops it. What its log said of the stop.
async fn recover(
    bin_dir: &str,
    base: &PgBase,
    data: &Path,
    wal_dir: &Path,
    run_dir: &Path,
    request: &Restore<'_>,
) -> Result<Vec<String>, BackupError> {
    let hba = run_dir.join("hba.conf");
    // Only PostgreSQL's user can reach the socket (its directory is theirs alone).
    crate::pg::write_file(&hba, "local all all trust\n").map_err(BackupError::Io)?;
    let log_path = run_dir.join("recovery.log");
    let log = std::fs::File::create(&log_path).map_err(|e| BackupError::Io(format!("{}: {e}", log_path.display())))?;
    let log_err = log.try_clone().map_err(|e| BackupError::Io(e.to_string()))?;
    let mut settings = vec![
        "listen_addresses=".to_string(),
        format!("unix_socket_directories={}", run_dir.display()),
        format!("hba_file={}", hba.display()),
        "archive_mode=off".to_string(),
        "synchronous_standby_names=".to_string(),
        format!(
            "restore_command=cp {}/%f %p",
            shell_quote(&wal_dir.display().to_string())
        ),
        "recovery_target_action=promote".to_string(),
    ];
    match request.target {
        Target::Time(ms) => settings.push(format!("recovery_target_time={}", pg_time(ms))),
        Target::Lsn(lsn) => settings.push(format!("recovery_target_lsn={lsn}")),
        Target::End => {}
    }
    let mut command = crate::pg::command(bin_dir, "postgres");
    command.arg("-D").arg(data);
    for setting in &settings {
        command.arg("-c").arg(setting);
    }
    let mut child = command
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| BackupError::Io(format!("cannot start postgres: {e}")))?;
    let log_tail = || {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    };
    let deadline = Instant::now() + RECOVERY_TIMEOUT;
    let promoted = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Err(BackupError::Io(format!(
                "PostgreSQL stopped during the recovery ({status}):\n{}",
                log_tail()
            )));
        }
        if Instant::now() >= deadline {
            break Err(BackupError::Io(format!(
                "the recovery did not finish within {}s:\n{}",
                RECOVERY_TIMEOUT.as_secs(),
                log_tail()
            )));
        }
        if in_production(run_dir, request.port, &base.superuser).await {
            break Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop(&mut child).await;
    promoted?;
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    Ok(text
        .lines()
        .filter(|line| {
            [
                "recovery stopping",
                "last completed transaction",
                "selected new timeline",
            ]
            .iter()
            .any(|said| line.contains(said))
        })
        .map(|line| {
            line.split_once("LOG:")
                .map_or(line, |(_, said)| said)
                .trim()
                .to_string()
        })
        .collect())
}

/// Whether the recovering server at `socket_dir` has left recovery.
async fn in_production(socket_dir: &Path, port: u16, user: &str) -> bool {
    let mut config = tokio_postgres::Config::new();
    config
        .host_path(socket_dir)
        .port(port)
        .user(user)
        .dbname("postgres")
        .connect_timeout(crate::pg::CONNECT_TIMEOUT);
    let Ok(Ok((client, connection))) =
        tokio::time::timeout(crate::pg::CONNECT_TIMEOUT, config.connect(tokio_postgres::NoTls)).await
    else {
        return false;
    };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    crate::pg::status(&client).await.is_ok_and(|status| !status.in_recovery)
}

/// A fast shutdown, then an immediate one.
async fn stop(child: &mut tokio::process::Child) {
    for signal in [libc::SIGINT, libc::SIGQUIT] {
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) on our own child, not yet reaped (we hold it).
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
        if tokio::time::timeout(STOP_TIMEOUT, child.wait()).await.is_ok() {
            return;
        }
    }
}

/// A time as PostgreSQL reads `recovery_target_time`.
fn pg_time(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .unwrap_or_default()
        .format("%Y-%m-%d %H:%M:%S%.3f+00")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wal_push_hands_the_file_over_and_waits_for_the_answer() {
        let dir = std::env::temp_dir().join(format!("rampart-push-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("spool")).unwrap();
        let wal = dir.join("000000010000000000000003");
        std::fs::write(&wal, b"wal bytes").unwrap();
        // Nobody answers: an error, and the file waits in the spool for the node.
        let refused = push(
            &dir.join("spool"),
            &wal,
            "000000010000000000000003",
            Duration::from_millis(50),
        );
        assert!(refused.unwrap_err().contains("not stored within"));
        let spooled = dir.join("spool/000000010000000000000003");
        assert_eq!(std::fs::read(&spooled).unwrap(), b"wal bytes");
        // A stale answer of an earlier attempt does not answer a new one.
        std::fs::write(dir.join("spool/000000010000000000000003.rampart-done"), b"").unwrap();
        let answered = std::thread::spawn({
            let spooled = spooled.clone();
            let done = dir.join("spool/000000010000000000000003.rampart-done");
            move || {
                let deadline = Instant::now() + Duration::from_secs(10);
                // The node's side: wait for the stale answer to go, then answer.
                while done.exists() && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(5));
                }
                assert!(spooled.exists());
                std::fs::write(&done, b"").unwrap();
            }
        });
        push(
            &dir.join("spool"),
            &wal,
            "000000010000000000000003",
            Duration::from_secs(10),
        )
        .unwrap();
        answered.join().unwrap();
        assert!(push(&dir.join("spool"), &wal, "../x", Duration::from_millis(1)).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn targets_pick_backups_that_ended_before_them() {
        let base = PgBase {
            bin_dir: "/usr/lib/postgresql/15/bin".into(),
            superuser: "postgres".into(),
            start_wal: "000000010000000000000003".into(),
            end_lsn: "0/3000100".into(),
            end_ms: 1_000,
        };
        assert!(Target::Time(1_000).reachable_from(&base));
        assert!(!Target::Time(999).reachable_from(&base));
        assert!(Target::Lsn("0/3000100".parse().unwrap()).reachable_from(&base));
        assert!(!Target::Lsn("0/30000FF".parse().unwrap()).reachable_from(&base));
        assert!(Target::End.reachable_from(&base));
        assert_eq!(pg_time(1_765_000_000_123), "2025-12-06 05:46:40.123+00");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
