//! PostgreSQL as a node runs it (`kind = "postgres"`): its programs from the policy's
//! `bin_dir` (as the `postgres` user when the node runs as root: PostgreSQL refuses root,
//! and Debian's packages create that user), passwords read where the policy says, the
//! files Rampart writes into a data dir, and SQL over one connection as the superuser.
//! What to do when is `controllers::postgres`'s; this module only carries it out.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use rampart_core::postgres::{host_of, listen_port, Lsn, PasswordSource, Postgres};

use crate::pipe::read_bounded;

/// Output kept from one PostgreSQL program (the rest is read and dropped).
const OUTPUT_BYTES_MAX: usize = 64 * 1024;
/// How long a login may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// A role's password, read where the policy says (a file's first line, or a variable of
/// this node's environment).
pub fn password(source: &PasswordSource) -> Result<String, String> {
    match source {
        PasswordSource::File(path) => std::fs::read_to_string(path)
            .map(|text| text.lines().next().unwrap_or_default().to_string())
            .map_err(|e| format!("cannot read the password file {path}: {e}")),
        PasswordSource::Env(name) => {
            std::env::var(name).map_err(|_| format!("the password variable {name} is not set on this node"))
        }
    }
}

/// The uid and gid PostgreSQL runs as: the `postgres` user's when this node is root,
/// else none (the node's own).
pub fn os_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").expect("no NUL");
    // SAFETY: getpwnam reads the user database; the pointer it returns is read at once,
    // before any other call that could reuse its buffer.
    let entry = unsafe { libc::getpwnam(name.as_ptr()) };
    if entry.is_null() {
        return None;
    }
    // SAFETY: not null, checked above.
    let entry = unsafe { &*entry };
    Some((entry.pw_uid, entry.pw_gid))
}

/// Gives `path` to the user PostgreSQL runs as (nothing to do unless the node is root).
pub fn own(path: &Path) -> Result<(), String> {
    let Some((uid, gid)) = os_user() else { return Ok(()) };
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(|e| format!("chown {}: {e}", path.display()))
}

/// Writes `text` to `path` (owned by PostgreSQL's user, `0600`), through a temporary file
/// and a rename, so PostgreSQL never reads half of it.
pub fn write_file(path: &Path, text: &str) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let temporary = path.with_extension("rampart-tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&temporary)?;
        file.write_all(text.as_bytes())?;
        file.sync_all()
    };
    write().map_err(|e| format!("cannot write {}: {e}", temporary.display()))?;
    own(&temporary)?;
    std::fs::rename(&temporary, path).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// `program` from `bin_dir` (the policy's), as PostgreSQL's user.
pub fn command(bin_dir: &str, program: &str) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(PathBuf::from(bin_dir).join(program));
    if let Some((uid, gid)) = os_user() {
        command.uid(uid).gid(gid);
    }
    // Programs look for their files relative to nothing the node's directory could hold.
    command.current_dir("/");
    command
}

/// Runs `program` with `args` (and `stdin`, if any) to its end within `timeout`; its
/// output, or why it failed with the output.
pub async fn run(
    bin_dir: &str,
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&str>,
    timeout: Duration,
) -> Result<String, String> {
    use tokio::io::AsyncWriteExt;
    let mut command = command(bin_dir, program);
    command
        .args(args)
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().map_err(|e| format!("cannot start {program}: {e}"))?;
    if let (Some(text), Some(mut input)) = (stdin, child.stdin.take()) {
        let text = text.to_string();
        tokio::spawn(async move {
            let _ = input.write_all(text.as_bytes()).await;
        });
    }
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let collect = async {
        let mut out = Vec::new();
        let mut err = Vec::new();
        let _ = tokio::join!(
            read_bounded(&mut stdout, &mut out, OUTPUT_BYTES_MAX),
            read_bounded(&mut stderr, &mut err, OUTPUT_BYTES_MAX)
        );
        out.extend_from_slice(&err);
        String::from_utf8_lossy(&out).trim().to_string()
    };
    match tokio::time::timeout(timeout, async { tokio::join!(child.wait(), collect) }).await {
        Err(_) => Err(format!("{program} timed out after {}s", timeout.as_secs())),
        Ok((Ok(status), output)) if status.success() => Ok(output),
        Ok((Ok(status), output)) => Err(format!("{program} failed ({status}): {output}")),
        Ok((Err(e), output)) => Err(format!("{program}: {e}: {output}")),
    }
}

/// A connection string to the instance at `endpoint` as `user` (for `primary_conninfo`,
/// `pg_basebackup` and `pg_rewind`); without a password (`""`), the program takes it from
/// `PGPASSWORD`.
pub fn conninfo_to(pg: &Postgres, endpoint: &str, user: &str, password: &str, application_name: &str) -> String {
    let port = listen_port(pg, endpoint).to_string();
    let mut pairs = vec![
        ("host", host_of(endpoint)),
        ("port", port.as_str()),
        ("user", user),
        ("dbname", "postgres"),
        ("application_name", application_name),
        ("connect_timeout", "2"),
    ];
    if !password.is_empty() {
        pairs.push(("password", password));
    }
    rampart_core::postgres::conninfo(&pairs)
}

/// Logs in to the instance at `endpoint` as the superuser.
pub async fn connect(pg: &Postgres, endpoint: &str) -> Result<tokio_postgres::Client, String> {
    connect_database(pg, endpoint, "postgres").await
}

/// Logs in to `database` of the instance at `endpoint` as the superuser.
pub async fn connect_database(pg: &Postgres, endpoint: &str, database: &str) -> Result<tokio_postgres::Client, String> {
    let password = password(&pg.superuser.password)?;
    let mut config = tokio_postgres::Config::new();
    config
        .host(host_of(endpoint))
        .port(listen_port(pg, endpoint))
        .user(&pg.superuser.name)
        .password(password)
        .dbname(database)
        .application_name("rampart")
        .connect_timeout(CONNECT_TIMEOUT);
    let connect = config.connect(tokio_postgres::NoTls);
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
        .await
        .map_err(|_| format!("no answer from {endpoint} within {}s", CONNECT_TIMEOUT.as_secs()))?
        .map_err(|e| format!("cannot log in to {endpoint}: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// What an instance says of itself: in recovery (a replica) or not (a primary), and how far
/// its WAL goes (a primary's current position, a replica's received, else replayed, one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub in_recovery: bool,
    pub lsn: Lsn,
    /// A replica's WAL receiver streams from its primary now (a primary: always).
    pub streaming: bool,
}

pub async fn status(client: &tokio_postgres::Client) -> Result<Status, String> {
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), (CASE WHEN pg_is_in_recovery() \
             THEN coalesce(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()) \
             ELSE pg_current_wal_lsn() END)::text, \
             NOT pg_is_in_recovery() OR coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false)",
            &[],
        )
        .await
        .map_err(|e| e.to_string())?;
    let in_recovery: bool = row.try_get(0).map_err(|e| e.to_string())?;
    let lsn: Option<String> = row.try_get(1).map_err(|e| e.to_string())?;
    let lsn = match lsn {
        Some(text) => text.parse()?,
        None => Lsn::default(),
    };
    let streaming: bool = row.try_get(2).map_err(|e| e.to_string())?;
    Ok(Status {
        in_recovery,
        lsn,
        streaming,
    })
}
