//! `rampart backup create|list|verify|restore`. `create` asks the region's leader; `list`
//! and `verify` read the destination directly when one is given (`--config` with a
//! `[backup]` table, or `--destination`), else ask the region; `restore` always reads the
//! destination: it must work with the region gone.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use rampart_client::Client;
use rampart_core::backup::{Backup, BackupSpec, BackupsResponse, Listed, Manifest, Point, S3Spec};
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
    /// Feed a service's data from a backup (the newest by default) to its restore command
    /// on stdin, here: run it on the machine of the service's new primary
    RestoreService {
        /// The service
        service: String,
        /// Backup id (see `backup list`)
        id: Option<String>,
        #[command(flatten)]
        destination: DestinationArgs,
        /// Run this instead of the restore command the policy had when the backup was taken
        #[arg(long)]
        command: Option<String>,
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
            let manifest = match destination.vault()? {
                Some(vault) => vault.verify(id.as_deref(), now_ms()).await.map_err(failed)?,
                None => client()?.backup_verify(id.as_deref(), wait).await?,
            };
            print(output, &manifest, |m| format!("verified {}", summary(m)));
        }
        BackupCommand::RestoreService {
            service,
            id,
            destination,
            command,
        } => {
            let vault = destination.required_vault("restore-service")?;
            let manifest = vault.manifest(id.as_deref()).await.map_err(failed)?;
            let part = manifest.services.iter().find(|p| p.service == service).ok_or_else(|| {
                Failure::failed(anyhow::anyhow!(
                    "backup {} holds no data of service {service}",
                    manifest.id
                ))
            })?;
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
