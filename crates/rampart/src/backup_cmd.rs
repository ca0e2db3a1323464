//! `rampart backup create|list|verify|restore`. `create` asks the region's leader; `list`
//! and `verify` read the destination directly when one is given (`--config` with a
//! `[backup]` table, or `--destination`), else ask the region; `restore` always reads the
//! destination: it must work with the region gone.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use rampart_client::Client;
use rampart_core::backup::{Backup, BackupSpec, BackupsResponse, Listed, Manifest, Point, S3Spec};
use rampart_core::postgres::Lsn;
use rampart_node::pg_backup::{self, Restore, Target};
use rampart_node::vault::Vault;

use crate::outcome::{print, Failure, Output};

#[derive(Subcommand, Debug)]
pub enum BackupCommand {
    /// Take a backup now: the leader copies the region's state and streams it to its [backup] destination
    Create {
        /// How long to wait for it to finish
        #[arg(long, default_value = "30m", value_parser = crate::outcome::duration_arg)]
        wait: Duration,
    },
    /// List finished backups, oldest first (an interrupted upload has no manifest and is not listed)
    List {
        #[command(flatten)]
        destination: DestinationArgs,
    },
    /// Restore a backup (the newest by default) into a temporary directory and check every
    /// chunk's hash and the state's checksum; records the verification beside the backup
    Verify {
        /// Backup id (see `backup list`)
        id: Option<String>,
        #[command(flatten)]
        destination: DestinationArgs,
        /// How long to wait when the region verifies
        #[arg(long, default_value = "30m", value_parser = crate::outcome::duration_arg)]
        wait: Duration,
    },
    /// Bootstrap a new region from a backup: writes its state into new data dirs, then
    /// start each node on its dir with the same --initial-cluster
    Restore {
        /// Backup id (see `backup list`); the newest when left out
        id: Option<String>,
        #[command(flatten)]
        destination: DestinationArgs,
        /// A new (empty) data dir to restore into; repeat for every node of the new region
        #[arg(long = "data-dir", required = true)]
        data_dirs: Vec<PathBuf>,
        /// The new region's members ID=HOST:PORT,..., as its nodes' --initial-cluster
        #[arg(long)]
        initial_cluster: String,
        /// Point-in-time: the state right after the write that made this revision (the
        /// newest backup at or before it, then the archived log)
        #[arg(long, conflicts_with_all = ["id", "to_time"])]
        to_revision: Option<u64>,
        /// Point-in-time: every write committed at or before this time, RFC 3339
        /// (2026-11-23T06:00:00Z) or ms since the epoch
        #[arg(long, conflicts_with = "id", value_parser = time_arg)]
        to_time: Option<u64>,
    },
    /// Restore a service's data from a backup (the newest by default). A PostgreSQL service:
    /// its base backup into --data-dir, then the archived WAL replayed by PostgreSQL to
    /// --to-time, --to-lsn or the end of the archive; the server is stopped after, ready to
    /// start. Any other service: its data fed to its restore command on stdin, here (run it
    /// on the machine of the service's new primary)
    RestoreService {
        /// The service
        service: String,
        /// Backup id (see `backup list`); left out, the newest that can reach the target
        id: Option<String>,
        #[command(flatten)]
        destination: DestinationArgs,
        /// Run this instead of the restore command the policy had when the backup was taken
        #[arg(long)]
        command: Option<String>,
        /// PostgreSQL: the new (absent or empty) data directory to restore into
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// PostgreSQL, point in time: every transaction committed at or before this time,
        /// RFC 3339 (2026-11-23T06:00:00Z) or ms since the epoch
        #[arg(long, value_parser = time_arg, conflicts_with = "to_lsn")]
        to_time: Option<u64>,
        /// PostgreSQL, point in time: every transaction up to this WAL position (0/3000060)
        #[arg(long, value_parser = lsn_arg)]
        to_lsn: Option<Lsn>,
        /// PostgreSQL: the port the restored server is set to listen on
        #[arg(long, default_value_t = rampart_core::postgres::PORT_DEFAULT)]
        port: u16,
        /// PostgreSQL: where its programs are, when not at the backed-up policy's bin_dir
        #[arg(long)]
        bin_dir: Option<String>,
    },
    /// PostgreSQL's archive_command on a node that backs up (Rampart writes it): hands a
    /// finished WAL file to the node through the instance's spool directory and waits
    /// until the node has stored it at the backup destination
    WalPush {
        /// The instance's spool directory (beside its data dir: DATA.archive)
        #[arg(long)]
        spool: PathBuf,
        /// The WAL file (PostgreSQL's %p)
        path: PathBuf,
        /// Its name (PostgreSQL's %f)
        name: String,
        /// How long to wait for the node before failing (PostgreSQL then tries again)
        #[arg(long, default_value = "60s", value_parser = crate::outcome::duration_arg)]
        timeout: Duration,
    },
}

/// Where backups are, when read without the region.
#[derive(Args, Debug, Default)]
pub struct DestinationArgs {
    /// A node's config file: its [backup] table gives destination, key and S3 settings
    #[arg(long, conflicts_with = "destination")]
    config: Option<PathBuf>,
    /// file:///absolute/path or s3://bucket/prefix (S3 credentials from AWS_ACCESS_KEY_ID
    /// and AWS_SECRET_ACCESS_KEY)
    #[arg(long)]
    destination: Option<String>,
    /// File holding the backup key (64 hex digits)
    #[arg(long, conflicts_with = "key_env")]
    key_file: Option<PathBuf>,
    /// Environment variable holding the backup key
    #[arg(long)]
    key_env: Option<String>,
    /// S3-compatible endpoint, e.g. http://127.0.0.1:9000
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// S3 region
    #[arg(long)]
    s3_region: Option<String>,
    /// Allow plain HTTP to the S3 endpoint
    #[arg(long)]
    s3_allow_http: bool,
}

impl DestinationArgs {
    /// The destination's settings, if any were given.
    fn backup(&self) -> Result<Option<Backup>, Failure> {
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Failure::usage(anyhow::anyhow!("cannot read --config {}: {e}", path.display())))?;
            let table: toml::Table = text
                .parse()
                .map_err(|e| Failure::usage(anyhow::anyhow!("invalid --config {}: {e}", path.display())))?;
            let value = table
                .get("backup")
                .cloned()
                .ok_or_else(|| Failure::usage(anyhow::anyhow!("--config {} has no [backup] table", path.display())))?;
            return crate::node_cmd::file_backup(path, value).map(Some);
        }
        let Some(destination) = &self.destination else {
            return Ok(None);
        };
        let spec = BackupSpec {
            destination: Some(destination.clone()),
            key_file: self.key_file.clone(),
            key_env: self.key_env.clone(),
            s3: Some(S3Spec {
                endpoint: self.s3_endpoint.clone(),
                region: self.s3_region.clone(),
                allow_http: self.s3_allow_http,
            }),
            ..BackupSpec::default()
        };
        let backup = spec.validate().map_err(|e| {
            Failure::usage(anyhow::anyhow!(
                "--{}: {e}",
                e.field.trim_start_matches("backup.").replace('_', "-")
            ))
        })?;
        Ok(Some(backup))
    }

    /// The destination, which `command` cannot do without: it must work with the region gone.
    fn required_vault(&self, command: &str) -> Result<Vault, Failure> {
        self.vault()?.ok_or_else(|| {
            Failure::usage(anyhow::anyhow!(
                "{command} reads the backup itself: give --config or --destination"
            ))
        })
    }

    fn vault(&self) -> Result<Option<Vault>, Failure> {
        match self.backup()? {
            None => Ok(None),
            Some(backup) => Vault::open(&backup).map(Some).map_err(|e| Failure::usage(e.into())),
        }
    }
}

pub async fn run(
    client: impl FnOnce() -> Result<Client, Failure>,
    output: Output,
    command: BackupCommand,
) -> Result<(), Failure> {
    match command {
        BackupCommand::Create { wait } => {
            let manifest = client()?.backup_create(wait).await?;
            print(output, &manifest, |m| format!("created {}", summary(m)));
        }
        BackupCommand::List { destination } => {
            let answer = match destination.vault()? {
                Some(vault) => BackupsResponse {
                    destination: destination_label(&destination),
                    backups: vault.list().await.map_err(failed)?,
                },
                None => client()?.backups().await?,
            };
            print(output, &answer, |a| {
                if a.backups.is_empty() {
                    return format!("no backups at {}", a.destination);
                }
                a.backups.iter().map(listed).collect::<Vec<_>>().join("\n")
            });
        }
        BackupCommand::Verify { id, destination, wait } => {
            let (manifest, databases) = match destination.vault()? {
                Some(vault) => pg_backup::verify(&vault, id.as_deref(), now_ms())
                    .await
                    .map_err(failed)?,
                None => (client()?.backup_verify(id.as_deref(), wait).await?, Vec::new()),
            };
            print(output, &manifest, |m| {
                let mut lines = vec![format!("verified {}", summary(m))];
                lines.extend(databases.iter().map(|r| {
                    format!(
                        "PostgreSQL {}: restored and recovered through {} archived WAL files",
                        r.service, r.wal_files
                    )
                }));
                lines.join("\n")
            });
        }
        BackupCommand::WalPush {
            spool,
            path,
            name,
            timeout,
        } => {
            pg_backup::push(&spool, &path, &name, timeout).map_err(|e| Failure::failed(anyhow::anyhow!(e)))?;
        }
        BackupCommand::RestoreService {
            service,
            id,
            destination,
            command,
            data_dir,
            to_time,
            to_lsn,
            port,
            bin_dir,
        } => {
            let vault = destination.required_vault("restore-service")?;
            let target = match (to_time, to_lsn) {
                (Some(ms), _) => Some(Target::Time(ms)),
                (None, Some(lsn)) => Some(Target::Lsn(lsn)),
                (None, None) => None,
            };
            let manifest = match (&id, target) {
                (None, Some(target)) => pg_backup::backup_for(&vault, &service, target).await,
                _ => vault.manifest(id.as_deref()).await,
            }
            .map_err(failed)?;
            let part = manifest.services.iter().find(|p| p.service == service).ok_or_else(|| {
                Failure::failed(anyhow::anyhow!(
                    "backup {} holds no data of service {service}",
                    manifest.id
                ))
            })?;
            if part.postgres.is_some() {
                let data_dir = data_dir.ok_or_else(|| {
                    Failure::usage(anyhow::anyhow!(
                        "service {service} is PostgreSQL: give --data-dir, a new directory to restore into"
                    ))
                })?;
                let request = Restore {
                    service: &service,
                    data_dir: &data_dir,
                    target: target.unwrap_or(Target::End),
                    port,
                    bin_dir,
                };
                let restored = pg_backup::restore(&vault, &manifest, &request).await.map_err(failed)?;
                print(output, &restored, |r| {
                    let mut lines = vec![format!(
                        "restored PostgreSQL {} from backup {} into {} ({} archived WAL files replayed); start it with: pg_ctl -D {} start",
                        r.service, r.backup, r.data_dir, r.wal_files, r.data_dir
                    )];
                    lines.extend(r.recovery.iter().cloned());
                    lines.join("\n")
                });
                return Ok(());
            }
            if target.is_some() || data_dir.is_some() {
                return Err(Failure::usage(anyhow::anyhow!(
                    "--data-dir, --to-time and --to-lsn are for PostgreSQL services; {service} is restored by its restore command"
                )));
            }
            let command = command.or_else(|| part.restore.clone()).ok_or_else(|| {
                Failure::usage(anyhow::anyhow!(
                    "service {service} had no backup.restore command: give --command"
                ))
            })?;
            let mut child = std::process::Command::new("sh")
                .args(["-c", &command])
                .env("RAMPART_SERVICE", &service)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| Failure::failed(anyhow::anyhow!("cannot start {command:?}: {e}")))?;
            let stdin = child.stdin.take().expect("piped stdin");
            let fed = vault.read_service(&manifest, &service, stdin).await;
            let status = child.wait().map_err(|e| Failure::failed(e.into()))?;
            fed.map_err(failed)?;
            if !status.success() {
                return Err(Failure::failed(anyhow::anyhow!(
                    "the restore command {command:?} failed: {status}"
                )));
            }
            print(output, part, |p| {
                format!(
                    "restored {} bytes of service {} from backup {} through {command:?}",
                    p.bytes, p.service, manifest.id
                )
            });
        }
        BackupCommand::Restore {
            id,
            destination,
            data_dirs,
            initial_cluster,
            to_revision,
            to_time,
        } => {
            let vault = destination.required_vault("restore")?;
            let members = rampart_core::config::parse_members("initial-cluster", &initial_cluster)
                .map_err(|e| Failure::usage(e.into()))?;
            let members = members.into_iter().map(|(id, addr)| (id, addr.to_string())).collect();
            let point = match (to_revision, to_time) {
                (Some(revision), _) => Some(Point::Revision(revision)),
                (None, Some(ms)) => Some(Point::Time(ms)),
                (None, None) => None,
            };
            let restored = match point {
                Some(point) => vault.restore_to(point, &data_dirs, &members).await,
                None => vault.restore(id.as_deref(), &data_dirs, &members).await,
            }
            .map_err(failed)?;
            print(output, &restored, |r| {
                let replayed = match r.last_write_ms {
                    Some(ms) => format!(" (archived log replayed up to a write at {ms})"),
                    None => String::new(),
                };
                format!(
                    "restored backup {} at revision {} checksum {}{replayed} into {} data dir(s); start each node on its dir with --initial-cluster {initial_cluster}",
                    r.backup,
                    r.revision,
                    r.checksum,
                    data_dirs.len()
                )
            });
        }
    }
    Ok(())
}

fn failed(e: rampart_node::vault::BackupError) -> Failure {
    Failure::failed(e.into())
}

fn destination_label(args: &DestinationArgs) -> String {
    match (&args.destination, &args.config) {
        (Some(destination), _) => destination.clone(),
        (None, Some(config)) => format!("[backup] of {}", config.display()),
        (None, None) => String::new(),
    }
}

fn summary(m: &Manifest) -> String {
    format!(
        "{}: region {} revision {} checksum {}, {} chunks, {} bytes stored ({} state bytes), {}",
        m.id,
        m.region,
        m.revision,
        m.checksum,
        m.chunks.len(),
        m.stored_bytes(),
        m.state_bytes,
        m.encryption
    )
}

fn listed(l: &Listed) -> String {
    let verified = match l.verified_ms {
        Some(ms) => format!("verified at {ms}"),
        None => "not verified".to_string(),
    };
    format!("{}  {verified}", summary(&l.manifest))
}

/// A WAL position as PostgreSQL writes it (0/3000060).
fn lsn_arg(text: &str) -> Result<Lsn, String> {
    text.parse()
}

/// RFC 3339 or ms since the epoch.
fn time_arg(text: &str) -> Result<u64, String> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis().max(0) as u64)
        .map_err(|e| format!("{e}: expected RFC 3339 (2026-11-23T06:00:00Z) or ms since the epoch"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
