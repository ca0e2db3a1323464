//! A real PostgreSQL server for tests: `initdb` into a temporary directory, started with
//! `pg_ctl` on a free loopback port, stopped (immediate shutdown) when dropped. Its
//! programs are Debian's, installed by `scripts/install-test-tools`, which `scripts/test`
//! names in `RAMPART_TEST_PG_BIN`. PostgreSQL refuses to run as root: as root, every
//! program runs as the `postgres` user the package creates (`runuser`).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The directory of PostgreSQL's programs: `RAMPART_TEST_PG_BIN`, else the newest
/// `/usr/lib/postgresql/*/bin` with `initdb`.
pub fn bin_dir() -> Result<PathBuf, String> {
    if let Ok(dir) = std::env::var("RAMPART_TEST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("no PostgreSQL: run scripts/test (or scripts/install-test-tools) first ({e})"))?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, bin)| bin)
        .ok_or_else(|| "no PostgreSQL: run scripts/test (or scripts/install-test-tools) first".to_string())
}

/// Runs `sql` with `psql` over the connection string `conninfo` (as this process's user:
/// a client may be root) and gives its unaligned, tuples-only output, trimmed.
pub fn psql(conninfo: &str, sql: &str) -> Result<String, String> {
    let program = bin_dir()?.join("psql");
    let output = Command::new(&program)
        .args(["-X", "-v", "ON_ERROR_STOP=1", "-d", conninfo, "-Atc", sql])
        .output()
        .map_err(|e| format!("{}: {e}", program.display()))?;
    if !output.status.success() {
        return Err(format!(
            "psql {sql:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// One running PostgreSQL server.
pub struct Postgres {
    bin: PathBuf,
    // Holds the data dir until the server is stopped.
    dir: tempfile::TempDir,
    pub port: u16,
}

fn as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// `program` with `args`, as the `postgres` user when this process is root.
fn command(program: &Path, args: &[&str]) -> Command {
    if as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program).args(args);
        command
    } else {
        let mut command = Command::new(program);
        command.args(args);
        command
    }
}

/// Runs PostgreSQL's `program` (from [`bin_dir`], as the `postgres` user when root) with
/// `args` to its end; its output, or why it failed.
pub fn program(program: &str, args: &[&str]) -> Result<String, String> {
    let output = run(&bin_dir()?.join(program), args)?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn run(program: &Path, args: &[&str]) -> Result<Output, String> {
    let output = command(program, args)
        .output()
        .map_err(|e| format!("{}: {e}", program.display()))?;
    if !output.status.success() {
        return Err(format!(
            "{} {args:?}: {}{}",
            program.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    Ok(output)
}

impl Postgres {
    /// A new cluster (`initdb`, trust authentication on loopback, superuser `postgres`),
    /// started on a free port; returns once it accepts connections.
    pub fn start() -> Result<Postgres, String> {
        let bin = bin_dir()?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data).map_err(|e| e.to_string())?;
        if as_root() {
            // The postgres user must reach its data dir and own it.
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&data)
                .status()
                .map_err(|e| e.to_string())?;
            if !status.success() {
                return Err(format!("chown postgres {}: {status}", data.display()));
            }
        }
        let data_text = data.to_str().ok_or("a temporary path that is not UTF-8")?.to_string();
        run(
            &bin.join("initdb"),
            &[
                "-D",
                &data_text,
                "-U",
                "postgres",
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        let port = crate::free_port().map_err(|e| e.to_string())?.port();
        let options = format!("-p {port} -c listen_addresses=127.0.0.1 -k {data_text} -c fsync=off");
        let log = format!("{data_text}/server.log");
        let server = Postgres { bin, dir, port };
        run(
            &server.bin.join("pg_ctl"),
            &["-D", &data_text, "-o", &options, "-l", &log, "-w", "-t", "60", "start"],
        )?;
        Ok(server)
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs `sql` with `psql` over the connection string `conninfo` and gives its
    /// unaligned, tuples-only output, trimmed.
    pub fn psql(&self, conninfo: &str, sql: &str) -> Result<String, String> {
        let output = run(
            &self.bin.join("psql"),
            &["-X", "-v", "ON_ERROR_STOP=1", "-d", conninfo, "-Atc", sql],
        )?;
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(data) = self.data_dir().to_str() {
            let _ = run(&self.bin.join("pg_ctl"), &["-D", data, "-m", "immediate", "-w", "stop"]);
        }
    }
}
