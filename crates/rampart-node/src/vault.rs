//! A backup destination: chunks and manifests in an object store (`file://` or `s3://`
//! through object_store), compressed with zstd and sealed with AES-256-GCM. Used by the
//! node (create, scheduled verification, retention) and by the CLI (list, verify, restore,
//! which work with the region gone).
//!
//! Layout under the destination: `backups/ID/chunks/N` (state), `backups/ID/services/NAME/N`
//! (service data), then `backups/ID/manifest.json`, written last: a backup without its
//! manifest never finished and is never listed. `backups/ID/verified.json` records a
//! verification that restored it. A stored chunk is `nonce (12) | ciphertext | tag (16)`,
//! its associated data `ID/KIND/N`, so a chunk moved to another place or backup does not
//! open; the manifest holds each chunk's SHA-256, checked before anything is decrypted.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use openraft::BasicNode;
use rampart_core::backup::{
    segment_name, segment_range, Backup, Chunk, KeySource, Listed, Manifest, Point, ServicePart, CHUNK_BYTES,
    FORMAT_VERSION,
};
use rampart_store::{Checksum, NodeId, State};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// zstd level: the CLI's default, the bound `tar | zstd` is measured at.
const ZSTD_LEVEL: i32 = 3;
/// Chunks read ahead of the sealers: with them, bounds memory to a few chunks.
const CHUNKS_AHEAD: usize = 2;
/// Chunks sealed (or opened) at once, on blocking threads: the machine's cores at work.
const SEALERS: usize = 2;
/// How much of a failed service backup command's stderr its error keeps.
const COMMAND_ERROR_BYTES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("backup key: {0}")]
    Key(String),
    #[error("backup destination {destination}: {message}")]
    Store { destination: String, message: String },
    #[error("no backup {0} at this destination (an unfinished upload has no manifest and is not a backup)")]
    NotFound(String),
    #[error("no backup at this destination yet")]
    Empty,
    #[error("backup {id}: chunk {chunk} is corrupted: SHA-256 {found}, the manifest says {expected}")]
    Corrupt {
        id: String,
        chunk: String,
        expected: String,
        found: String,
    },
    #[error("backup {id} was encrypted with key {expected}, not with the key given ({given})")]
    WrongKey {
        id: String,
        expected: String,
        given: String,
    },
    #[error("backup {id} is encrypted: give its key (backup.key_file or key_env, or --key-file)")]
    KeyNeeded { id: String },
    #[error("backup {id}: chunk {chunk} does not open with this key (tampered after its hash was taken)")]
    Unsealable { id: String, chunk: String },
    #[error("backup {id}: {message}")]
    Invalid { id: String, message: String },
    #[error("backup {id}: restored state has checksum {found}, the manifest says {expected}")]
    Checksum {
        id: String,
        expected: String,
        found: String,
    },
    #[error("this data dir was restored from backup {backup} of {destination}, where this node is set to back up: a restored region needs its own destination or prefix (sharing one, its log archive and retention would mix with the source region's); set [backup] destination to a new prefix")]
    SourceDestination { backup: String, destination: String },
    #[error("{0}")]
    Io(String),
}

fn io_error(context: &str) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |e| BackupError::Io(format!("{context}: {e}"))
}

/// The AES-256-GCM key and its public name.
struct Key {
    aead: Arc<LessSafeKey>,
    id: String,
}

impl Key {
    /// Reads the key from its file or variable. The error says where it looked and what
    /// was wrong, never what it found.
    fn load(source: &KeySource) -> Result<Key, BackupError> {
        let where_ = match source {
            KeySource::File(path) => format!("key_file {}", path.display()),
            KeySource::Env(name) => format!("key_env {name}"),
        };
        let text = match source {
            KeySource::File(path) => {
                std::fs::read_to_string(path).map_err(|e| BackupError::Key(format!("cannot read {where_}: {e}")))?
            }
            KeySource::Env(name) => {
                std::env::var(name).map_err(|_| BackupError::Key(format!("{where_} is not set (or not UTF-8)")))?
            }
        };
        let bytes = rampart_core::backup::parse_key(&text).map_err(|e| BackupError::Key(format!("{where_}: {e}")))?;
        Ok(Key::from_bytes(&bytes))
    }

    fn from_bytes(bytes: &[u8; 32]) -> Key {
        let digest = Sha256::digest(bytes);
        Key {
            aead: Arc::new(LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, bytes).expect("32 bytes is an AES-256 key"),
            )),
            id: crate::secret::hex(&digest[..8]),
        }
    }
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.id)
    }
}

/// A fresh key, as a key file holds it: 256 random bits as 64 hex digits (what
/// `openssl rand -hex 32` prints; the same shape as a token secret).
pub fn new_key_text() -> String {
    crate::secret::new_secret()
}

#[derive(Serialize, Deserialize)]
struct Verification {
    verified_ms: u64,
    checksum: String,
}

/// A destination with its key.
pub struct Vault {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    destination: String,
    /// The destination's identity, however it is spelt: the resolved directory, or the
    /// bucket, prefix and endpoint.
    place: String,
    key: Option<Key>,
}

/// The file a restore leaves in each data dir it writes: where the region came from.
pub const ORIGIN_FILE: &str = "restored.json";

/// What [`ORIGIN_FILE`] holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Origin {
    pub backup: String,
    pub destination: String,
    pub place: String,
    pub log_index: u64,
    pub revision: u64,
}

impl Vault {
    /// Opens the destination of `backup` (creating a `file://` directory) and loads its key.
    pub fn open(backup: &Backup) -> Result<Vault, BackupError> {
        let key = backup.key.as_ref().map(Key::load).transpose()?;
        let destination = backup.destination.clone();
        let store_error = |message: String| BackupError::Store {
            destination: destination.clone(),
            message,
        };
        let (store, prefix, place): (Arc<dyn ObjectStore>, Path, String) = match destination.split_once("://") {
            Some(("file", dir)) => {
                std::fs::create_dir_all(dir).map_err(|e| store_error(format!("cannot create {dir}: {e}")))?;
                let resolved =
                    std::fs::canonicalize(dir).map_err(|e| store_error(format!("cannot resolve {dir}: {e}")))?;
                let local = object_store::local::LocalFileSystem::new_with_prefix(dir)
                    .map_err(|e| store_error(e.to_string()))?
                    // A deleted backup leaves no empty directories behind.
                    .with_automatic_cleanup(true);
                (
                    Arc::new(local),
                    Path::default(),
                    format!("file://{}", resolved.display()),
                )
            }
            Some(("s3", rest)) => {
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                let mut builder = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_client_options(
                        object_store::ClientOptions::new()
                            .with_connect_timeout(Duration::from_secs(5))
                            .with_timeout(Duration::from_secs(60))
                            .with_allow_http(backup.s3.allow_http),
                    )
                    .with_retry(object_store::RetryConfig {
                        max_retries: 5,
                        retry_timeout: Duration::from_secs(120),
                        ..Default::default()
                    });
                if let Some(endpoint) = &backup.s3.endpoint {
                    builder = builder.with_endpoint(endpoint);
                }
                if let Some(region) = &backup.s3.region {
                    builder = builder.with_region(region);
                }
                let s3 = builder.build().map_err(|e| store_error(e.to_string()))?;
                let endpoint = backup.s3.endpoint.as_deref().unwrap_or("AWS");
                let place = format!("s3://{bucket}/{} at {endpoint}", Path::from(prefix));
                (Arc::new(s3), Path::from(prefix), place)
            }
            _ => {
                return Err(store_error(
                    "expected file:///absolute/path or s3://bucket/prefix".into(),
                ))
            }
        };
        Ok(Vault {
            store,
            prefix,
            destination,
            place,
            key,
        })
    }

    /// Refuses a data dir restored from a backup of this very destination: the restored
    /// region would write its own history into the source region's log archive (the same
    /// log indices, other writes) and its backups would count in the same retention.
    pub fn refuse_restored_from_here(&self, data_dir: &FsPath) -> Result<(), BackupError> {
        let path = data_dir.join(ORIGIN_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            // Unreadable is not absent: the check is not skipped.
            Err(e) => return Err(BackupError::Io(format!("{}: {e}", path.display()))),
        };
        let origin: Origin =
            serde_json::from_slice(&bytes).map_err(|e| BackupError::Io(format!("{}: {e}", path.display())))?;
        if origin.place == self.place {
            return Err(BackupError::SourceDestination {
                backup: origin.backup,
                destination: origin.destination,
            });
        }
        Ok(())
    }

    fn path(&self, tail: &str) -> Path {
        let mut path = self.prefix.clone();
        for part in tail.split('/') {
            path = path.child(part);
        }
        path
    }

    /// Seals and opens the chunks of `place` with this destination's key.
    fn sealer(&self, place: String) -> Sealer {
        Sealer {
            key: self.key.as_ref().map(|k| k.aead.clone()),
            place,
        }
    }

    fn store_error(&self, e: object_store::Error) -> BackupError {
        BackupError::Store {
            destination: self.destination.clone(),
            message: e.to_string(),
        }
    }

    async fn put(&self, tail: &str, bytes: Bytes) -> Result<(), BackupError> {
        self.store
            .put(&self.path(tail), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.store_error(e))
    }

    async fn get(&self, tail: &str) -> Result<Option<Bytes>, BackupError> {
        match self.store.get(&self.path(tail)).await {
            Ok(answer) => answer.bytes().await.map(Some).map_err(|e| self.store_error(e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.store_error(e)),
        }
    }

    /// Writes backup `id` (made by [`new_id`]) of `state` (a copy of the applied state at
    /// `log_index`) with the `services` parts already stored: chunks first (encoded as they
    /// stream, sealed on blocking threads while earlier ones upload), the manifest last.
    pub async fn create(
        &self,
        id: &str,
        region: &str,
        state: State,
        log_index: u64,
        created_ms: u64,
        services: Vec<ServicePart>,
    ) -> Result<Manifest, BackupError> {
        let (revision, local_revision, epoch) = (state.revision(), state.local.revision, state.shipped.epoch());
        // The shipped part, then the local part: the encoding of the whole state, with the
        // checksum of each part as the API reports it.
        let encode = move |out: &mut ChunkWriter| {
            postcard::to_io(&state.shipped, &mut *out).map_err(std::io::Error::other)?;
            out.mark();
            postcard::to_io(&state.local, out)
                .map(|_| ())
                .map_err(std::io::Error::other)
        };
        let uploaded = self.upload(id, "chunks", encode).await?;
        let (shipped_bytes, shipped_checksum) = uploaded.marks[0];
        let manifest = Manifest {
            format: FORMAT_VERSION,
            id: id.to_string(),
            region: region.to_string(),
            epoch,
            revision,
            log_index,
            created_ms,
            checksum: rampart_store::checksum_text(shipped_checksum),
            local_revision,
            local_checksum: Some(rampart_store::checksum_text(uploaded.checksum)),
            shipped_bytes: Some(shipped_bytes),
            state_bytes: uploaded.bytes,
            compression: "zstd".into(),
            encryption: if self.key.is_some() { "aes-256-gcm" } else { "none" }.into(),
            key_id: self.key.as_ref().map(|k| k.id.clone()),
            chunks: uploaded.chunks,
            services,
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest encodes");
        self.put(&format!("backups/{id}/manifest.json"), Bytes::from(json))
            .await?;
        Ok(manifest)
    }

    /// Runs a service's backup command (`sh -c`, within `timeout`) and stores its output as
    /// the service's part of backup `id`.
    pub async fn back_up_service(
        &self,
        id: &str,
        service: &str,
        instance: &str,
        backup: &rampart_core::service::ServiceBackup,
    ) -> Result<ServicePart, BackupError> {
        let mut command = tokio::process::Command::new("sh");
        command
            .args(["-c", &backup.command])
            .env("RAMPART_SERVICE", service)
            .env("RAMPART_INSTANCE", instance);
        let source = ServiceSource {
            command,
            what: "backup command".to_string(),
            timeout: Duration::from_millis(backup.timeout_ms),
            restore: backup.restore.clone(),
        };
        self.stream_service(id, service, instance, source).await
    }

    /// Runs `source`'s program to its end (within its timeout) and stores its output as the
    /// part of `service` (whose `instance` it reads) in backup `id`.
    pub async fn stream_service(
        &self,
        id: &str,
        service: &str,
        instance: &str,
        source: ServiceSource,
    ) -> Result<ServicePart, BackupError> {
        let ServiceSource {
            mut command,
            what,
            timeout,
            restore,
        } = source;
        let failed = |message: String| BackupError::Io(format!("service {service}: {what}: {message}"));
        let mut child = command
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| failed(format!("cannot start: {e}")))?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let runtime = tokio::runtime::Handle::current();
        let copy = move |out: &mut ChunkWriter| {
            let mut reader = blocking_reader(runtime, stdout);
            std::io::copy(&mut reader, out).map(|_| ())
        };
        let kind = format!("services/{service}");
        let uploaded = tokio::time::timeout(timeout, async {
            // stderr is drained while stdout streams: a chatty command must not block on it.
            let mut message = Vec::new();
            let (uploaded, _) = tokio::join!(
                self.upload(id, &kind, copy),
                crate::pipe::read_bounded(&mut stderr, &mut message, COMMAND_ERROR_BYTES)
            );
            let status = child.wait().await.map_err(|e| failed(e.to_string()))?;
            if !status.success() {
                return Err(failed(format!(
                    "{status}: {}",
                    String::from_utf8_lossy(&message).trim()
                )));
            }
            uploaded
        })
        .await
        .map_err(|_| failed(format!("no end within {timeout:?}")))??;
        Ok(ServicePart {
            service: service.to_string(),
            instance: instance.to_string(),
            bytes: uploaded.bytes,
            checksum: rampart_store::checksum_text(uploaded.checksum),
            restore,
            chunks: uploaded.chunks,
            postgres: None,
        })
    }

    /// Stores everything `produce` writes as chunks under `backups/ID/KIND/`: it runs on a
    /// blocking thread that cuts and hashes the plain bytes in order; chunks are sealed on up
    /// to [`SEALERS`] blocking threads at once and stored in order.
    async fn upload(
        &self,
        id: &str,
        kind: &str,
        produce: impl FnOnce(&mut ChunkWriter) -> std::io::Result<()> + Send + 'static,
    ) -> Result<Uploaded, BackupError> {
        let (sender, plain) = tokio::sync::mpsc::channel::<std::io::Result<Vec<u8>>>(CHUNKS_AHEAD);
        let producer = tokio::task::spawn_blocking(move || {
            let mut writer = ChunkWriter {
                buffer: Vec::with_capacity(CHUNK_BYTES),
                checksum: Checksum::default(),
                bytes: 0,
                marks: Vec::new(),
                sender,
            };
            let produced = produce(&mut writer).and_then(|()| writer.send_buffer());
            if let Err(e) = produced {
                let _ = writer.sender.blocking_send(Err(e));
            }
            (writer.checksum.value(), writer.bytes, writer.marks)
        });
        let sealer = Arc::new(self.sealer(format!("{id}/{kind}")));
        let mut sealed = tokio_stream::wrappers::ReceiverStream::new(plain)
            .enumerate()
            .map(|(index, plain)| {
                let sealer = sealer.clone();
                tokio::task::spawn_blocking(move || {
                    let stored = sealer.seal(index, &plain?);
                    let chunk = Chunk {
                        bytes: stored.len() as u64,
                        sha256: crate::secret::hex(&Sha256::digest(&stored)),
                    };
                    Ok::<_, std::io::Error>((Bytes::from(stored), chunk))
                })
            })
            .buffered(SEALERS);
        let mut chunks = Vec::new();
        while let Some(next) = sealed.next().await {
            let (bytes, chunk) = next
                .map_err(|e| BackupError::Io(format!("sealing chunks: {e}")))?
                .map_err(io_error("encoding the data"))?;
            self.put(&format!("backups/{id}/{kind}/{}", chunks.len()), bytes)
                .await?;
            chunks.push(chunk);
        }
        let (checksum, bytes, marks) = producer
            .await
            .map_err(|e| BackupError::Io(format!("encoding the data: {e}")))?;
        Ok(Uploaded {
            chunks,
            checksum,
            bytes,
            marks,
        })
    }

    /// Every finished backup, oldest first.
    pub async fn list(&self) -> Result<Vec<Listed>, BackupError> {
        let listing = self
            .store
            .list_with_delimiter(Some(&self.path("backups")))
            .await
            .map_err(|e| self.store_error(e))?;
        let mut listed = Vec::new();
        for dir in listing.common_prefixes {
            let Some(id) = dir.filename().map(str::to_string) else {
                continue;
            };
            let Some(manifest) = self.stored_manifest(&id).await? else {
                continue;
            };
            let verified_ms = match self.get(&format!("backups/{id}/verified.json")).await? {
                Some(bytes) => serde_json::from_slice::<Verification>(&bytes)
                    .ok()
                    .map(|v| v.verified_ms),
                None => None,
            };
            listed.push(Listed { manifest, verified_ms });
        }
        listed.sort_by(|a, b| a.manifest.id.cmp(&b.manifest.id));
        Ok(listed)
    }

    /// The manifest of backup `id`, or of the newest backup.
    pub async fn manifest(&self, id: Option<&str>) -> Result<Manifest, BackupError> {
        match id {
            Some(id) => self
                .stored_manifest(id)
                .await?
                .ok_or_else(|| BackupError::NotFound(id.to_string())),
            None => self.list().await?.pop().map(|l| l.manifest).ok_or(BackupError::Empty),
        }
    }

    /// Backup `id`'s manifest; `None` when it has none (never finished, or deleted).
    async fn stored_manifest(&self, id: &str) -> Result<Option<Manifest>, BackupError> {
        let Some(bytes) = self.get(&format!("backups/{id}/manifest.json")).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| BackupError::Invalid {
                id: id.to_string(),
                message: format!("unreadable manifest: {e}"),
            })
    }

    fn opener(&self, manifest: &Manifest, kind: &str) -> Result<Sealer, BackupError> {
        if !(1..=FORMAT_VERSION).contains(&manifest.format) {
            return Err(BackupError::Invalid {
                id: manifest.id.clone(),
                message: format!(
                    "format {} is not one this build reads (1 to {FORMAT_VERSION})",
                    manifest.format
                ),
            });
        }
        let key = match (&manifest.key_id, &self.key) {
            (None, _) => None,
            (Some(_), None) => {
                return Err(BackupError::KeyNeeded {
                    id: manifest.id.clone(),
                })
            }
            (Some(expected), Some(key)) if *expected != key.id => {
                return Err(BackupError::WrongKey {
                    id: manifest.id.clone(),
                    expected: expected.clone(),
                    given: key.id.clone(),
                })
            }
            (Some(_), Some(key)) => Some(key.aead.clone()),
        };
        Ok(Sealer {
            key,
            place: format!("{}/{kind}", manifest.id),
        })
    }

    /// Downloads, checks, opens and decompresses the state of `manifest` chunk by chunk into
    /// `sink`, and checks the checksum of each part (shipped, then local; the whole state in
    /// format 1) against the manifest.
    pub async fn read_state(&self, manifest: &Manifest, sink: impl Write) -> Result<(), BackupError> {
        let parts = match (manifest.shipped_bytes, &manifest.local_checksum) {
            (Some(end), Some(local)) => vec![(end, manifest.checksum.as_str()), (u64::MAX, local.as_str())],
            _ => vec![(u64::MAX, manifest.checksum.as_str())],
        };
        self.read_chunks(manifest, "chunks", &manifest.chunks, &parts, sink)
            .await
    }

    /// Like [`Vault::read_state`], for the data of `service` in the backup.
    pub async fn read_service(&self, manifest: &Manifest, service: &str, sink: impl Write) -> Result<(), BackupError> {
        let part = manifest
            .services
            .iter()
            .find(|p| p.service == service)
            .ok_or_else(|| BackupError::Invalid {
                id: manifest.id.clone(),
                message: format!("it holds no data of service {service}"),
            })?;
        let kind = format!("services/{service}");
        self.read_chunks(manifest, &kind, &part.chunks, &[(u64::MAX, &part.checksum)], sink)
            .await
    }

    async fn read_chunks(
        &self,
        manifest: &Manifest,
        kind: &str,
        chunks: &[Chunk],
        parts: &[(u64, &str)],
        mut sink: impl Write,
    ) -> Result<(), BackupError> {
        let opener = Arc::new(self.opener(manifest, kind)?);
        let id = &manifest.id;
        // Up to SEALERS chunks are fetched, checked and opened at once; their plain bytes
        // are hashed and written in order.
        let mut opened = futures_util::stream::iter(chunks.iter().cloned().enumerate())
            .map(|(index, chunk): (usize, Chunk)| {
                let opener = opener.clone();
                let id = id.clone();
                async move {
                    let name = format!("{index} (backups/{id}/{kind}/{index})");
                    let stored = self
                        .get(&format!("backups/{id}/{kind}/{index}"))
                        .await?
                        .ok_or_else(|| BackupError::Invalid {
                            id: id.clone(),
                            message: format!("chunk {name} is missing"),
                        })?;
                    let expected = chunk.sha256.clone();
                    let checked = tokio::task::spawn_blocking(move || {
                        let found = crate::secret::hex(&Sha256::digest(&stored));
                        if found != expected {
                            return Err(Some(found));
                        }
                        opener.open(index, stored.to_vec()).map_err(|()| None)
                    })
                    .await
                    .map_err(|e| BackupError::Io(e.to_string()))?;
                    checked.map_err(|found| match found {
                        Some(found) => BackupError::Corrupt {
                            id: id.clone(),
                            chunk: name,
                            expected: chunk.sha256.clone(),
                            found,
                        },
                        None => BackupError::Unsealable {
                            id: id.clone(),
                            chunk: name,
                        },
                    })
                }
            })
            .buffered(SEALERS);
        // Each part's checksum over its bytes: parts are (end offset, checksum), in order.
        let mut parts = parts.iter().copied();
        let mut part = parts.next();
        let mut checksum = Checksum::default();
        let mut offset = 0u64;
        let check = |checksum: &Checksum, expected: &str| {
            let found = checksum.text();
            if found == expected {
                return Ok(());
            }
            Err(BackupError::Checksum {
                id: id.clone(),
                expected: expected.to_string(),
                found,
            })
        };
        while let Some(plain) = opened.next().await {
            let plain = plain?;
            let mut rest = &plain[..];
            while let (Some((end, expected)), false) = (part, rest.is_empty()) {
                let taken = rest.len().min(usize::try_from(end - offset).unwrap_or(usize::MAX));
                checksum.update(&rest[..taken]);
                offset += taken as u64;
                rest = &rest[taken..];
                if offset == end {
                    check(&std::mem::take(&mut checksum), expected)?;
                    part = parts.next();
                }
            }
            sink.write_all(&plain).map_err(io_error("writing the restored state"))?;
        }
        match part {
            Some((_, expected)) => check(&checksum, expected),
            None => Ok(()),
        }
    }

    /// Restores backup `id` (or the newest) into a temporary directory, checking every
    /// chunk's hash and the state's checksum as it streams, then decodes the written state
    /// entry by entry (never whole into memory: this runs on the leader); reads every
    /// service part, checking its hashes and checksum. Records nothing: see
    /// [`Vault::record_verified`].
    pub async fn check(&self, id: Option<&str>) -> Result<Manifest, BackupError> {
        let manifest = self.manifest(id).await?;
        let dir = tempfile::tempdir().map_err(io_error("making a temporary directory"))?;
        let path = dir.path().join("state");
        let file = std::fs::File::create(&path).map_err(io_error("creating the temporary state"))?;
        let mut writer = std::io::BufWriter::new(file);
        self.read_state(&manifest, &mut writer).await?;
        writer.flush().map_err(io_error("writing the temporary state"))?;
        drop(writer);
        let format = manifest.format;
        tokio::task::spawn_blocking(move || {
            let file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
            let mut scratch = vec![0u8; rampart_store::state_machine::DECODE_SCRATCH_BYTES];
            if format < FORMAT_VERSION {
                // An older format is only read to be migrated: decoded whole, as a restore does.
                let bytes = std::fs::read(&path).map_err(|e| e.to_string())?;
                return decode_state(format, &bytes).map(|_| ());
            }
            rampart_store::check_encoded(std::io::BufReader::new(file), &mut scratch)
        })
        .await
        .map_err(|e| BackupError::Io(e.to_string()))?
        .map_err(|message| BackupError::Invalid {
            id: manifest.id.clone(),
            message,
        })?;
        for part in &manifest.services {
            self.read_service(&manifest, &part.service, std::io::sink()).await?;
        }
        Ok(manifest)
    }

    /// Records beside `manifest` that it was verified at `now_ms` (retention counts it).
    pub async fn record_verified(&self, manifest: &Manifest, now_ms: u64) -> Result<(), BackupError> {
        let record = Verification {
            verified_ms: now_ms,
            checksum: manifest.checksum.clone(),
        };
        let json = serde_json::to_vec(&record).expect("a verification encodes");
        self.put(&format!("backups/{}/verified.json", manifest.id), Bytes::from(json))
            .await
    }

    /// The state of `manifest`, decoded into memory in this build's layout (a format-1
    /// state migrated, as a node migrates its data dir).
    async fn load_state(&self, manifest: &Manifest) -> Result<State, BackupError> {
        let mut encoded = Vec::with_capacity(manifest.state_bytes as usize);
        self.read_state(manifest, &mut encoded).await?;
        decode_state(manifest.format, &encoded).map_err(|message| BackupError::Invalid {
            id: manifest.id.clone(),
            message,
        })
    }

    /// Writes backup `id` (or the newest) as the snapshot of a new region with `members`
    /// into each of `data_dirs`, which must be new or empty. Nothing is left behind on
    /// failure. A backup of an older format is migrated on the way, in memory.
    pub async fn restore(
        &self,
        id: Option<&str>,
        data_dirs: &[PathBuf],
        members: &BTreeMap<NodeId, String>,
    ) -> Result<Restored, BackupError> {
        let manifest = self.manifest(id).await?;
        if manifest.format < FORMAT_VERSION {
            check_empty(data_dirs)?;
            let state = self.load_state(&manifest).await?;
            let restored = Restored {
                backup: manifest.id.clone(),
                revision: state.revision(),
                checksum: rampart_store::checksum_text(state.checksum()),
                log_index: manifest.log_index,
                last_write_ms: None,
            };
            let encoded = postcard::to_allocvec(&state).expect("a state encodes");
            drop(state);
            self.write_region(data_dirs, members, &restored, StateSource::Encoded(encoded))
                .await?;
            return Ok(restored);
        }
        let restored = Restored {
            backup: manifest.id.clone(),
            revision: manifest.revision,
            checksum: manifest.checksum.clone(),
            log_index: manifest.log_index,
            last_write_ms: None,
        };
        self.write_region(data_dirs, members, &restored, StateSource::Backup(&manifest))
            .await?;
        Ok(restored)
    }

    /// Restores the state at `point`: the newest backup at or before it, then the archived
    /// log after that backup, applied command by command up to the point.
    pub async fn restore_to(
        &self,
        point: Point,
        data_dirs: &[PathBuf],
        members: &BTreeMap<NodeId, String>,
    ) -> Result<Restored, BackupError> {
        let listed = self.list().await?;
        let base = listed
            .iter()
            .rev()
            .map(|l| &l.manifest)
            .find(|m| match point {
                Point::Revision(n) => m.revision <= n,
                Point::Time(ms) => m.created_ms <= ms,
            })
            .ok_or_else(|| {
                BackupError::Io(format!(
                    "no backup at or before {point:?}: the archive starts at the oldest backup"
                ))
            })?
            .clone();
        // Refused before the download and replay, not only when writing.
        check_empty(data_dirs)?;
        let mut state = self.load_state(&base).await?;
        let mut next = base.log_index + 1;
        let mut last_write_ms = None;
        'segments: for (first, last) in self.segments().await? {
            if last < next {
                continue;
            }
            if first > next {
                return Err(BackupError::Io(format!(
                    "the log archive has no entries {next}..{}: it cannot go past revision {} (restore a later backup)",
                    first - 1,
                    state.revision()
                )));
            }
            for entry in self.read_segment(first, last).await? {
                if entry.index < next {
                    continue;
                }
                for command in &entry.commands {
                    let reached = match point {
                        Point::Revision(n) => state.revision() >= n,
                        Point::Time(ms) => command.at_ms > ms,
                    };
                    if reached {
                        break 'segments;
                    }
                    state.apply(command);
                    last_write_ms = Some(command.at_ms);
                }
                next = entry.index + 1;
            }
        }
        if let Point::Revision(n) = point {
            if state.revision() < n {
                return Err(BackupError::Io(format!(
                    "the log archive reaches revision {}; revision {n} is beyond it",
                    state.revision()
                )));
            }
        }
        let encoded = postcard::to_allocvec(&state).expect("a state encodes");
        let restored = Restored {
            backup: base.id.clone(),
            revision: state.revision(),
            checksum: rampart_store::checksum_text(state.checksum()),
            log_index: next - 1,
            last_write_ms,
        };
        drop(state);
        self.write_region(data_dirs, members, &restored, StateSource::Encoded(encoded))
            .await?;
        Ok(restored)
    }

    /// Archives committed log entries (`entries` in index order, none missing) as one segment.
    pub async fn archive(&self, entries: &[Archived]) -> Result<(), BackupError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        let name = segment_name(first.index, last.index);
        let sealer = self.sealer(format!("log/{name}"));
        let encoded = postcard::to_allocvec(entries).expect("log entries encode");
        let sealed = tokio::task::spawn_blocking(move || sealer.seal(0, &encoded))
            .await
            .map_err(|e| BackupError::Io(e.to_string()))?;
        self.put(&format!("log/{name}"), Bytes::from(sealed)).await
    }

    /// The archived segments' index ranges, in order.
    pub async fn segments(&self) -> Result<Vec<(u64, u64)>, BackupError> {
        let mut objects = self.store.list(Some(&self.path("log")));
        let mut ranges = Vec::new();
        while let Some(object) = objects.next().await {
            let object = object.map_err(|e| self.store_error(e))?;
            if let Some(range) = object.location.filename().and_then(segment_range) {
                ranges.push(range);
            }
        }
        ranges.sort_unstable();
        Ok(ranges)
    }

    async fn read_segment(&self, first: u64, last: u64) -> Result<Vec<Archived>, BackupError> {
        let name = segment_name(first, last);
        let stored = self
            .get(&format!("log/{name}"))
            .await?
            .ok_or_else(|| BackupError::Io(format!("log segment {name} vanished while being read")))?;
        let sealer = self.sealer(format!("log/{name}"));
        let unreadable = || BackupError::Io(format!("log segment {name} does not open with this key, or is damaged"));
        let plain = tokio::task::spawn_blocking(move || sealer.open(0, stored.to_vec()))
            .await
            .map_err(|e| BackupError::Io(e.to_string()))?
            .map_err(|()| unreadable())?;
        postcard::from_bytes(&plain).map_err(|_| unreadable())
    }

    /// Deletes the archived segments wholly before `index` (older than every kept backup).
    pub async fn prune_log(&self, index: u64) -> Result<usize, BackupError> {
        let mut deleted = 0;
        for (first, last) in self.segments().await? {
            if last < index {
                let path = self.path(&format!("log/{}", segment_name(first, last)));
                self.store.delete(&path).await.map_err(|e| self.store_error(e))?;
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Stores one file of a PostgreSQL service's WAL archive (a segment, a timeline's
    /// history, ...) under `pg/SERVICE/wal/NAME`, sealed like a chunk.
    pub async fn put_wal(&self, service: &str, name: &str, plain: Vec<u8>) -> Result<(), BackupError> {
        let place = wal_place(service, name);
        let sealer = self.sealer(place.clone());
        let sealed = tokio::task::spawn_blocking(move || sealer.seal(0, &plain))
            .await
            .map_err(|e| BackupError::Io(e.to_string()))?;
        self.put(&place, Bytes::from(sealed)).await
    }

    /// The names of a PostgreSQL service's archived WAL files, sorted.
    pub async fn wal_files(&self, service: &str) -> Result<Vec<String>, BackupError> {
        let mut objects = self.store.list(Some(&self.path(&format!("pg/{service}/wal"))));
        let mut names = Vec::new();
        while let Some(object) = objects.next().await {
            let object = object.map_err(|e| self.store_error(e))?;
            if let Some(name) = object.location.filename() {
                names.push(name.to_string());
            }
        }
        names.sort_unstable();
        Ok(names)
    }

    /// One archived WAL file of a PostgreSQL service, opened.
    pub async fn get_wal(&self, service: &str, name: &str) -> Result<Vec<u8>, BackupError> {
        let place = wal_place(service, name);
        let stored = self
            .get(&place)
            .await?
            .ok_or_else(|| BackupError::Io(format!("the archived WAL file {place} is missing")))?;
        let sealer = self.sealer(place.clone());
        tokio::task::spawn_blocking(move || sealer.open_whole(0, stored.to_vec()))
            .await
            .map_err(|e| BackupError::Io(e.to_string()))?
            .map_err(|()| {
                BackupError::Io(format!(
                    "the archived WAL file {place} does not open with this key, or is damaged"
                ))
            })
    }

    /// Deletes the archived WAL of a PostgreSQL service that lies before `position` (see
    /// [`rampart_core::postgres::wal_position`]); timeline histories stay.
    pub async fn prune_wal(&self, service: &str, position: &str) -> Result<usize, BackupError> {
        let mut deleted = 0;
        for name in self.wal_files(service).await? {
            if rampart_core::postgres::wal_position(&name).is_some_and(|at| at < position) {
                let path = self.path(&wal_place(service, &name));
                match self.store.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => deleted += 1,
                    Err(e) => return Err(self.store_error(e)),
                }
            }
        }
        Ok(deleted)
    }

    /// Writes the snapshot of a new region into the first data dir (head, then the encoded
    /// state), fsyncs and places it, and copies it to the others. Nothing is left behind on
    /// failure.
    async fn write_region(
        &self,
        data_dirs: &[PathBuf],
        members: &BTreeMap<NodeId, String>,
        restored: &Restored,
        state: StateSource<'_>,
    ) -> Result<(), BackupError> {
        check_empty(data_dirs)?;
        let log_index = restored.log_index;
        let origin = serde_json::to_vec_pretty(&Origin {
            backup: restored.backup.clone(),
            destination: self.destination.clone(),
            place: self.place.clone(),
            log_index,
            revision: restored.revision,
        })
        .expect("an origin encodes");
        let members: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
            .collect();
        let first = &data_dirs[0];
        let snapshot = first.join(rampart_store::state_machine::SNAPSHOT_FILE);
        let temp = first.join("snapshot.restoring");
        let written = async {
            // The origin first: no data dir holds a snapshot without it.
            for dir in data_dirs {
                owner_only_dir(dir)?;
                std::fs::write(dir.join(ORIGIN_FILE), &origin).map_err(io_error("writing the restore's origin"))?;
            }
            let file = std::fs::File::create(&temp).map_err(io_error("creating the snapshot"))?;
            let mut writer = std::io::BufWriter::new(Writeback::new(file));
            writer
                .write_all(&rampart_store::restored_snapshot_head(log_index, &members))
                .map_err(io_error("writing the snapshot"))?;
            match state {
                StateSource::Backup(manifest) => self.read_state(manifest, &mut writer).await?,
                StateSource::Encoded(bytes) => writer.write_all(&bytes).map_err(io_error("writing the snapshot"))?,
            }
            let file = writer
                .into_inner()
                .map_err(|e| BackupError::Io(format!("writing the snapshot: {e}")))?
                .file;
            file.sync_all().map_err(io_error("syncing the snapshot"))?;
            std::fs::rename(&temp, &snapshot).map_err(io_error("placing the snapshot"))?;
            for dir in &data_dirs[1..] {
                let copy = dir.join(rampart_store::state_machine::SNAPSHOT_FILE);
                std::fs::copy(&snapshot, &copy).map_err(io_error("copying the snapshot"))?;
                std::fs::File::open(&copy)
                    .and_then(|f| f.sync_all())
                    .map_err(io_error("syncing the snapshot's copy"))?;
            }
            for dir in data_dirs {
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io_error("syncing the data dir"))?;
            }
            Ok::<(), BackupError>(())
        }
        .await;
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
            for dir in data_dirs {
                let _ = std::fs::remove_file(dir.join(rampart_store::state_machine::SNAPSHOT_FILE));
                let _ = std::fs::remove_file(dir.join(ORIGIN_FILE));
            }
        }
        written
    }

    /// Deletes backups: the manifest first (it is no longer listed), then its objects.
    pub async fn delete(&self, id: &str) -> Result<(), BackupError> {
        self.store
            .delete(&self.path(&format!("backups/{id}/manifest.json")))
            .await
            .map_err(|e| self.store_error(e))?;
        let mut objects = self.store.list(Some(&self.path(&format!("backups/{id}"))));
        while let Some(object) = objects.next().await {
            let object = object.map_err(|e| self.store_error(e))?;
            match self.store.delete(&object.location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.store_error(e)),
            }
        }
        Ok(())
    }
}

/// A program whose output becomes a service's part of a backup.
pub struct ServiceSource {
    pub command: tokio::process::Command,
    /// What it is, for errors: `backup command`, `pg_basebackup`.
    pub what: String,
    pub timeout: Duration,
    /// The restore command recorded beside the part.
    pub restore: Option<String>,
}

/// Where one archived WAL file of a PostgreSQL service is stored.
fn wal_place(service: &str, name: &str) -> String {
    format!("pg/{service}/wal/{name}")
}

/// A node's backup machinery: its destination and key, one run at a time.
pub struct Backups {
    pub vault: Vault,
    pub backup: Backup,
    running: tokio::sync::Mutex<()>,
}

impl Backups {
    /// Opens the destination and loads the key: a node whose key is missing or unusable
    /// does not start.
    pub fn open(backup: &Backup) -> Result<Backups, BackupError> {
        Ok(Backups {
            vault: Vault::open(backup)?,
            backup: backup.clone(),
            running: tokio::sync::Mutex::new(()),
        })
    }

    /// The right to run a backup or a verification: one at a time per node (`None` while
    /// one runs).
    pub fn try_run(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        self.running.try_lock().ok()
    }
}

/// A new backup's id: its time (UTC, to the ms) and revision, e.g. `20261123T061500123Z-r4711`.
pub fn new_id(created_ms: u64, revision: u64) -> String {
    let created = chrono::DateTime::from_timestamp_millis(created_ms as i64)
        .unwrap_or_default()
        .format("%Y%m%dT%H%M%S%3fZ")
        .to_string();
    rampart_core::backup::backup_id(&created, revision)
}

/// A child's stdout read from a blocking thread.
fn blocking_reader(runtime: tokio::runtime::Handle, stdout: tokio::process::ChildStdout) -> impl std::io::Read {
    struct Bridge(tokio::runtime::Handle, tokio::process::ChildStdout);
    impl std::io::Read for Bridge {
        fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
            self.0.block_on(tokio::io::AsyncReadExt::read(&mut self.1, buffer))
        }
    }
    Bridge(runtime, stdout)
}

/// What a restore wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Restored {
    /// The backup it started from.
    pub backup: String,
    pub revision: u64,
    pub checksum: String,
    pub log_index: u64,
    /// The time of the last archived write applied after the backup, if any.
    pub last_write_ms: Option<u64>,
}

/// One archived log entry: its index and the writes it carried (none for Raft's own
/// entries).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Archived {
    pub index: u64,
    pub commands: Vec<rampart_store::Command>,
}

fn check_empty(data_dirs: &[PathBuf]) -> Result<(), BackupError> {
    if data_dirs.is_empty() {
        return Err(BackupError::Io("no data dir to restore into".into()));
    }
    for dir in data_dirs {
        if std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(false) {
            return Err(BackupError::Io(format!(
                "data dir {} is not empty: a restore bootstraps a new region into new data dirs",
                dir.display()
            )));
        }
    }
    Ok(())
}

/// How much a restore writes before it hands those pages to the disk.
const WRITEBACK_BYTES: u64 = 32 << 20;

/// A file written front to back whose pages are handed to the disk as it goes
/// (`sync_file_range`, every [`WRITEBACK_BYTES`]), so the closing fsync waits for the tail
/// of the file, not for all of it.
struct Writeback {
    file: std::fs::File,
    written: u64,
    started: u64,
}

impl Writeback {
    fn new(file: std::fs::File) -> Writeback {
        Writeback {
            file,
            written: 0,
            started: 0,
        }
    }
}

impl Write for Writeback {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let n = self.file.write(bytes)?;
        self.written += n as u64;
        if self.written - self.started >= WRITEBACK_BYTES {
            use std::os::fd::AsRawFd;
            // SAFETY: sync_file_range(2) on our own open file; it only starts writeback of
            // the range (a failure shows at the closing fsync).
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.started as libc::off64_t,
                    (self.written - self.started) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.started = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// Where a restored region's state comes from.
enum StateSource<'a> {
    /// Streamed from a backup's chunks.
    Backup(&'a Manifest),
    /// Already encoded (a point-in-time restore).
    Encoded(Vec<u8>),
}

fn owner_only_dir(dir: &FsPath) -> Result<(), BackupError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_error("creating the data dir"))
}

/// Cuts what is written into [`CHUNK_BYTES`] chunks for the sealers, hashing the plain
/// bytes in order.
pub struct ChunkWriter {
    buffer: Vec<u8>,
    /// Of the bytes written since the last mark.
    checksum: Checksum,
    bytes: u64,
    /// At each mark: the bytes written so far and the checksum of the part it ends.
    marks: Vec<(u64, u64)>,
    sender: tokio::sync::mpsc::Sender<std::io::Result<Vec<u8>>>,
}

/// What [`Vault::upload`] stored: the chunks, the checksum of the plain bytes after the
/// last mark (all of them if none), their count, and the marks.
struct Uploaded {
    chunks: Vec<Chunk>,
    checksum: u64,
    bytes: u64,
    marks: Vec<(u64, u64)>,
}

impl ChunkWriter {
    /// Ends a part of the data here: its checksum is kept, the next part's starts.
    fn mark(&mut self) {
        let part = std::mem::take(&mut self.checksum);
        self.marks.push((self.bytes, part.value()));
    }

    fn send_buffer(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK_BYTES));
        self.sender
            .blocking_send(Ok(full))
            .map_err(|_| std::io::Error::other("the upload stopped"))
    }
}

impl Write for ChunkWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let taken = bytes.len().min(CHUNK_BYTES - self.buffer.len());
        self.buffer.extend_from_slice(&bytes[..taken]);
        self.checksum.update(&bytes[..taken]);
        self.bytes += taken as u64;
        if self.buffer.len() == CHUNK_BYTES {
            self.send_buffer()?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Compresses and seals chunks of one place (`ID/KIND`), or opens them.
struct Sealer {
    key: Option<Arc<LessSafeKey>>,
    place: String,
}

impl Sealer {
    fn aad(&self, index: usize) -> String {
        format!("{}/{index}", self.place)
    }

    fn seal(&self, index: usize, plain: &[u8]) -> Vec<u8> {
        let mut data = zstd::bulk::compress(plain, ZSTD_LEVEL).expect("compressing into memory");
        let Some(key) = &self.key else { return data };
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the system's random source");
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(self.aad(index).as_bytes()),
            &mut data,
        )
        .expect("sealing a chunk");
        let mut stored = nonce.to_vec();
        stored.extend_from_slice(&data);
        stored
    }

    /// A chunk (at most [`CHUNK_BYTES`] once opened).
    fn open(&self, index: usize, mut stored: Vec<u8>) -> Result<Vec<u8>, ()> {
        zstd::bulk::decompress(self.unseal(index, &mut stored)?, CHUNK_BYTES).map_err(|_| ())
    }

    /// A sealed object of any size (an archived WAL segment).
    fn open_whole(&self, index: usize, mut stored: Vec<u8>) -> Result<Vec<u8>, ()> {
        zstd::stream::decode_all(self.unseal(index, &mut stored)?).map_err(|_| ())
    }

    /// The compressed bytes inside `stored`, decrypted in place when there is a key.
    fn unseal<'a>(&self, index: usize, stored: &'a mut [u8]) -> Result<&'a [u8], ()> {
        let Some(key) = &self.key else { return Ok(stored) };
        if stored.len() < NONCE_LEN {
            return Err(());
        }
        let (nonce, sealed) = stored.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| ())?;
        key.open_in_place(nonce, Aad::from(self.aad(index).as_bytes()), sealed)
            .map(|plain| &*plain)
            .map_err(|_| ())
    }
}

/// A backup's encoded state of data dir format `format`, in this build's layout (an older
/// one migrated, as a node migrates its data dir).
fn decode_state(format: u32, encoded: &[u8]) -> Result<State, String> {
    let decoded = match format {
        1 => postcard::from_bytes::<rampart_store::v1::StateV1>(encoded).map(rampart_store::v1::StateV1::migrate),
        2 => postcard::from_bytes::<rampart_store::v2::StateV2>(encoded).map(State::from),
        3 => postcard::from_bytes::<rampart_store::v3::StateV3>(encoded).map(State::from),
        _ => postcard::from_bytes::<State>(encoded),
    };
    decoded.map_err(|e| format!("the bytes are not a format-{format} state: {e}"))
}
