//! `kind = "postgres"`: every node runs the PostgreSQL instances it hosts (`node = N` in
//! their registration), one task each, following the registry:
//!
//! - **The first instance** (nobody was ever primary, and it comes first by priority, then
//!   id): `initdb` with the superuser's password, `pg_hba.conf` and the replication role
//!   written, then started as a replica with nobody to follow (read-only). The leader
//!   promotes it like any failover (`primaries`), and its `on_promote` is `pg_promote()`.
//! - **A replica without data**: `pg_basebackup` from the primary into a new directory,
//!   renamed into place once whole; then started with `standby.signal`, `primary_conninfo`
//!   and the replication slot the primary keeps for it (`rampart.conf`, included by
//!   `postgresql.conf`).
//! - **An old primary**, once another instance is primary: crash recovery in single-user
//!   mode if it stopped uncleanly, `pg_rewind` from the new primary, then started as its
//!   replica; when rewind fails, a fresh `pg_basebackup` (event `postgres.rebuild`). While
//!   nobody is primary it runs read-only with nobody to follow (it may hold the most WAL,
//!   and be promoted again), marked (`rampart.rewind`) to be rewound before it follows.
//! - **Running**: its WAL position is reported to the leader (`positions`: lag in bytes and
//!   the promotion order); a replica is re-pointed to a new primary by rewriting
//!   `rampart.conf` and a reload (no restart); a primary keeps a slot for every other
//!   instance. An instance that runs as a primary while the registry names another is
//!   stopped at once.
//!
//! An instance the registry names primary is never started by its node: a primary that
//! went down is replaced by failover, and comes back as a replica. `on_demote` (from
//! `hooks`, also when fencing) stops PostgreSQL with a fast shutdown. If the node dies,
//! the kernel stops its PostgreSQL too (`PR_SET_PDEATHSIG`, immediate shutdown).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use rampart_core::api::{Event, ObservationsRequest, WalPosition};
use rampart_core::health::Health;
use rampart_core::postgres::{
    hba, is_timeline_history, is_wal_segment, listen_port, quote_ident, quote_literal, settings,
    synchronous_standby_names, wal_file_name, wal_position, Fallback, Lsn, Placement, Postgres, Synchronous,
    WalSummary,
};
use rampart_core::service::InstanceRole;
use rampart_store::command::Op;
use tokio::process::Child;
use tokio::sync::watch;

use crate::node::Shared;
use crate::soft::InstanceKey;
use crate::{pg, pg_backup};

const TICK: Duration = Duration::from_millis(250);
/// How long PostgreSQL may take to stop after a fast shutdown before an immediate one.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long `initdb`, crash recovery or `pg_rewind` may take.
const SETUP_TIMEOUT: Duration = Duration::from_secs(300);
/// How long `pg_basebackup` may take.
const COPY_TIMEOUT: Duration = Duration::from_secs(3600);
/// A WAL position is sent again after this long even when it did not move.
const POSITION_EVERY: Duration = Duration::from_secs(2);
/// A replica that has not streamed from a writable primary this long is rewound (a
/// replica that received more of the old primary's WAL than the one promoted cannot follow
/// it; a rewind that finds nothing to do costs a restart).
const STUCK: Duration = Duration::from_secs(3);
/// A primary checks its replication slots this often (and when the registry changes).
const SLOTS_EVERY: Duration = Duration::from_secs(5);
/// The file of settings Rampart writes into each data dir.
const SETTINGS_FILE: &str = "rampart.conf";
const INCLUDE_LINE: &str = "include_if_exists = 'rampart.conf'";
/// Marks an old primary that runs read-only with nobody primary: it is rewound before it
/// follows another instance.
const REWIND_FILE: &str = "rampart.rewind";

/// The instance a replica streams from.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Follow {
    id: String,
    endpoint: String,
    /// Its slot on that instance.
    slot: String,
    /// Another replica (a region's lead), not the primary: it is ready to copy from once it
    /// streams, not once it is writable.
    cascade: bool,
}

/// What the registry asks of one instance this node hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct View {
    pg: Postgres,
    endpoint: String,
    /// The registry names it primary.
    primary: bool,
    /// Whom it streams from (`core::postgres::Topology`), when it is a replica.
    upstream: Option<Follow>,
    /// Nobody was ever primary and this instance is the one to initialize.
    bootstrap: bool,
    /// The replication slots it keeps for those that stream from it.
    slots: Vec<String>,
    /// The `synchronous_standby_names` a primary gets.
    synchronous_names: String,
}

pub async fn run(node: Shared) {
    let mut tasks: HashMap<InstanceKey, watch::Sender<Option<View>>> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    let mut seen_version = None;
    loop {
        tick.tick().await;
        let version = node.services_version();
        if seen_version == Some(version) {
            continue;
        }
        seen_version = Some(version);
        let mut views = views(&node);
        tasks.retain(|key, sender| match views.remove(key) {
            Some(view) => {
                sender.send_if_modified(|current| {
                    let changed = current.as_ref() != Some(&view);
                    *current = Some(view);
                    changed
                });
                true
            }
            None => {
                // Its task stops PostgreSQL and ends.
                let _ = sender.send(None);
                false
            }
        });
        for (key, view) in views {
            let (sender, receiver) = watch::channel(Some(view));
            tokio::spawn(manage(node.clone(), key.clone(), receiver));
            tasks.insert(key, sender);
        }
    }
}

/// Every `postgres` instance this node hosts, as the registry has it now.
fn views(node: &Shared) -> HashMap<InstanceKey, View> {
    let applied = node.applied.read().expect("state lock");
    let (primary_region, _) = node.primary_and_epoch_in(&applied.state.shipped);
    let mut views = HashMap::new();
    for (name, service) in &applied.state.shipped.services {
        let Some(pg) = service.kind.postgres() else { continue };
        let topology = crate::services::pg_topology(name, service, &applied.state.local);
        let upstream_of = |id: &str| {
            let upstream = topology.upstream(id)?;
            Some(Follow {
                id: upstream.id.to_string(),
                endpoint: service.instances.get(upstream.id)?.instance.endpoint.clone(),
                slot: upstream.slot,
                cascade: upstream.cascade,
            })
        };
        // The first instance: highest priority, then the first id, never a standby's (nor
        // one of a standby region: only a region failover promotes those).
        let first = service
            .instances
            .iter()
            .filter(|(_, r)| {
                r.role != InstanceRole::Standby
                    && r.instance.priority > 0
                    && !node.in_standby_region(primary_region, &r.instance.region)
            })
            .max_by(|a, b| a.1.instance.priority.cmp(&b.1.instance.priority).then(b.0.cmp(a.0)))
            .map(|(id, _)| id.clone());
        // Whom the primary waits for: the committed standby, or in quorum mode enough of
        // the primary region's other instances.
        let synchronous_names = match pg.synchronous {
            Synchronous::Quorum => synchronous_standby_names(
                pg.synchronous,
                pg.fallback,
                &topology.quorum_members(primary_region, service.primary.as_deref()),
            ),
            _ => names_for(pg, applied.state.local.synchronous.get(name).map(String::as_str)),
        };
        for (id, record) in &service.instances {
            if !node.hosts(&record.instance) {
                continue;
            }
            let view = View {
                synchronous_names: synchronous_names.clone(),
                pg: pg.clone(),
                endpoint: record.instance.endpoint.clone(),
                primary: service.primary.as_deref() == Some(id.as_str()),
                upstream: upstream_of(id),
                bootstrap: service.token == 0 && service.primary.is_none() && first.as_deref() == Some(id.as_str()),
                slots: topology.slots_kept_by(id),
            };
            views.insert((name.clone(), id.clone()), view);
        }
    }
    views
}

/// One instance's PostgreSQL as this node runs it.
struct Managed {
    node: Shared,
    key: InstanceKey,
    child: Option<Child>,
    sql: Option<tokio_postgres::Client>,
    /// The `rampart.conf` last written.
    written: Option<String>,
    /// The last status sent, and when.
    sent: Option<(pg::Status, Instant)>,
    /// Since when a replica with a writable primary has not streamed from it.
    not_streaming: Option<Instant>,
    slots_checked: Option<(Vec<String>, Instant)>,
    /// The last reason it waits, said once.
    waiting: Option<&'static str>,
    /// The last failure, said once.
    failed: Option<String>,
}

async fn manage(node: Shared, key: InstanceKey, mut views: watch::Receiver<Option<View>>) {
    let mut managed = Managed {
        node,
        key,
        child: None,
        sql: None,
        written: None,
        sent: None,
        not_streaming: None,
        slots_checked: None,
        waiting: None,
        failed: None,
    };
    let mut tick = tokio::time::interval(TICK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = views.changed() => if changed.is_err() { break },
        }
        let Some(view) = views.borrow_and_update().clone() else {
            break;
        };
        match managed.step(&view).await {
            Ok(()) => managed.failed = None,
            Err(e) => {
                tracing::warn!(service = %managed.key.0, instance = %managed.key.1, "postgres: {e}");
                // Said once while it fails the same way.
                if managed.failed.as_deref() != Some(e.as_str()) {
                    managed.event("postgres.error", &format!("failed: {e}")).await;
                    managed.failed = Some(e);
                }
                // Not at once again: whatever failed gets time to change.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    if let Some(child) = managed.child.take() {
        stop_child(child).await;
    }
}

impl Managed {
    async fn step(&mut self, view: &View) -> Result<(), String> {
        let data = PathBuf::from(view.pg.data_dir_of(&self.key.1));
        let running = match &mut self.child {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        };
        if !running {
            if self.child.take().is_some() {
                self.sql = None;
                self.event("postgres.stopped", "ok: PostgreSQL exited").await;
            }
            return self.start(view, &data).await;
        }
        self.waiting = None;
        if self.sql.as_ref().is_none_or(|c| c.is_closed()) {
            // Still starting, or gone: the next tick tells.
            self.sql = pg::connect(&view.pg, &view.endpoint).await.ok();
        }
        let Some(sql) = &self.sql else { return Ok(()) };
        let status = match pg::status(sql).await {
            Ok(status) => status,
            Err(_) => {
                self.sql = None;
                return Ok(());
            }
        };
        self.report(status).await;
        if view.primary {
            self.write_settings(view, &data, None).await?;
            if !status.in_recovery {
                // Its own history is the service's now: nothing to rewind.
                let _ = std::fs::remove_file(data.join(REWIND_FILE));
                self.keep_slots(view).await?;
            }
            return Ok(());
        }
        if status.in_recovery {
            // A region's lead keeps the slots of the replicas that cascade from it.
            self.keep_slots(view).await?;
        }
        if !status.in_recovery && !self.named_primary() {
            // Writable while another is primary (or nobody is): never let it serve.
            if let Some(child) = self.child.take() {
                stop_child(child).await;
            }
            self.sql = None;
            let outcome = "ok: stopped: it ran as a primary while the registry names another";
            self.event("postgres.fenced", outcome).await;
            return Ok(());
        }
        if let Some(upstream) = &view.upstream {
            if status.streaming {
                self.not_streaming = None;
            } else if self.stuck(view, upstream).await {
                // Following a primary it cannot stream from (a timeline it does not have):
                // stopped, to be rewound from it.
                let outcome = format!(
                    "ok: not streaming from {} for {}s: rewinding",
                    upstream.id,
                    STUCK.as_secs()
                );
                self.event("postgres.stuck", &outcome).await;
                pg::write_file(&data.join(REWIND_FILE), "")?;
                self.not_streaming = None;
            }
            if data.join(REWIND_FILE).exists() {
                // An old primary that waited read-only: stopped, to be rewound first.
                if let Some(child) = self.child.take() {
                    stop_child(child).await;
                }
                self.sql = None;
                return Ok(());
            }
            self.write_settings(view, &data, Some(upstream)).await?;
        }
        Ok(())
    }

    /// Whether this replica has not streamed for [`STUCK`] while its upstream was ready
    /// all along (a replica whose primary is down is never stuck: it is to be promoted).
    async fn stuck(&mut self, view: &View, upstream: &Follow) -> bool {
        if !upstream_ready(&view.pg, upstream).await {
            self.not_streaming = None;
            return false;
        }
        let since = *self.not_streaming.get_or_insert_with(Instant::now);
        since.elapsed() >= STUCK
    }

    /// Whether the registry names this instance primary now (the view may be a tick old,
    /// and its `on_promote` may have run since).
    fn named_primary(&self) -> bool {
        let applied = self.node.applied.read().expect("state lock");
        applied
            .state
            .shipped
            .services
            .get(&self.key.0)
            .is_some_and(|s| s.primary.as_deref() == Some(self.key.1.as_str()))
    }

    /// Brings a stopped instance up as a replica, after whatever it needs first.
    async fn start(&mut self, view: &View, data: &Path) -> Result<(), String> {
        if view.primary {
            return self.wait("named primary while down: failover replaces it, and it comes back as a replica");
        }
        if let Some(upstream) = &view.upstream {
            // Copied or rewound only from a primary that finished its promotion (a source
            // still in recovery has not forked its new timeline yet), or from a region's
            // lead that streams from it.
            if !upstream_ready(&view.pg, upstream).await {
                tracing::debug!(service = %self.key.0, instance = %self.key.1, upstream = %upstream.id, "postgres: the upstream is not ready yet");
                return Ok(());
            }
        }
        if !data.join("PG_VERSION").exists() {
            if let Some(upstream) = &view.upstream {
                self.copy_from(view, data, upstream).await?;
            } else if view.bootstrap {
                self.initialize(view, data).await?;
            } else {
                return self.wait("no data yet: waiting for a primary to copy from");
            }
        } else if !data.join("standby.signal").exists() || data.join(REWIND_FILE).exists() {
            // It ran as a primary: it may follow another only once rewound. With nobody
            // primary, it waits read-only (and may be promoted again: it may hold the most
            // WAL), marked to be rewound before it follows anyone.
            match &view.upstream {
                Some(upstream) => {
                    self.rewind(view, data, upstream).await?;
                    let _ = std::fs::remove_file(data.join(REWIND_FILE));
                }
                None => pg::write_file(&data.join(REWIND_FILE), "")?,
            }
        }
        self.waiting = None;
        pg::write_file(&data.join("pg_hba.conf"), &hba(&view.pg))?;
        pg::write_file(&data.join("standby.signal"), "")?;
        self.written = None;
        self.write_settings(view, data, view.upstream.as_ref()).await?;
        make_socket_dir(data)?;
        pg_backup::make_spool(data)?;
        self.child = Some(self.spawn(view, data)?);
        self.event("postgres.started", "ok: started as a replica").await;
        Ok(())
    }

    fn wait(&mut self, why: &'static str) -> Result<(), String> {
        if self.waiting != Some(why) {
            tracing::info!(service = %self.key.0, instance = %self.key.1, "postgres: {why}");
            self.waiting = Some(why);
        }
        Ok(())
    }

    /// `initdb` into a new directory, the roles and files Rampart needs, then renamed into
    /// place.
    async fn initialize(&mut self, view: &View, data: &Path) -> Result<(), String> {
        let pg = &view.pg;
        let superuser = pg::password(&pg.superuser.password)?;
        let replication = pg::password(&pg.replication_user.password)?;
        let fresh = fresh_dir(data)?;
        let pwfile = fresh.with_extension("pw");
        pg::write_file(&pwfile, &superuser)?;
        let fresh_text = fresh.to_string_lossy().to_string();
        let pwfile_text = format!("--pwfile={}", pwfile.display());
        let result = pg::run(
            &pg.bin_dir,
            "initdb",
            &[
                "-D",
                &fresh_text,
                "-U",
                &pg.superuser.name,
                &pwfile_text,
                "--auth=scram-sha-256",
                "-E",
                "UTF8",
            ],
            &[],
            None,
            SETUP_TIMEOUT,
        )
        .await;
        let _ = std::fs::remove_file(&pwfile);
        result?;
        include_settings(&fresh)?;
        let port = listen_port(pg, &view.endpoint);
        let socket_dir = socket_dir(data);
        let placement = Placement {
            port,
            socket_dir: &socket_dir,
            ..Placement::default()
        };
        pg::write_file(&fresh.join(SETTINGS_FILE), &settings(pg, &placement))?;
        let role = format!(
            "CREATE ROLE {} WITH REPLICATION LOGIN PASSWORD {};\n",
            quote_ident(&pg.replication_user.name),
            quote_literal(&replication)
        );
        pg::run(
            &pg.bin_dir,
            "postgres",
            &["--single", "-D", &fresh_text, "postgres"],
            &[],
            Some(&role),
            SETUP_TIMEOUT,
        )
        .await?;
        std::fs::rename(&fresh, data).map_err(|e| format!("cannot move the new data dir into place: {e}"))?;
        self.event("postgres.initialized", "ok: initdb; the first instance")
            .await;
        Ok(())
    }

    /// `pg_basebackup` from the primary into a new directory, renamed into place once whole.
    async fn copy_from(&mut self, view: &View, data: &Path, upstream: &Follow) -> Result<(), String> {
        let pg = &view.pg;
        let password = pg::password(&pg.replication_user.password)?;
        let fresh = fresh_dir(data)?;
        let conninfo = pg::conninfo_to(pg, &upstream.endpoint, &pg.replication_user.name, "", &self.key.1);
        let fresh_text = fresh.to_string_lossy().to_string();
        pg::run(
            &pg.bin_dir,
            "pg_basebackup",
            &[
                "-D",
                &fresh_text,
                "-d",
                &conninfo,
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-password",
            ],
            &[("PGPASSWORD", &password)],
            None,
            COPY_TIMEOUT,
        )
        .await?;
        std::fs::rename(&fresh, data).map_err(|e| format!("cannot move the copy into place: {e}"))?;
        self.event("postgres.copied", &format!("ok: pg_basebackup from {}", upstream.id))
            .await;
        Ok(())
    }

    /// An old primary made a replica of the new one: crash recovery if it stopped
    /// uncleanly, the WAL the upstream never had set aside (below), then `pg_rewind`; a
    /// fresh copy when that fails.
    async fn rewind(&mut self, view: &View, data: &Path, upstream: &Follow) -> Result<(), String> {
        let pg = &view.pg;
        let data_text = data.to_string_lossy().to_string();
        let password = pg::password(&pg.superuser.password)?;
        let source = pg::conninfo_to(pg, &upstream.endpoint, &pg.superuser.name, "", "rampart");
        let source = format!("--source-server={source}");
        let env = [("PGPASSWORD", password.as_str())];
        let recovered = async {
            let control = pg::run(
                &pg.bin_dir,
                "pg_controldata",
                &["-D", &data_text],
                &[],
                None,
                SETUP_TIMEOUT,
            )
            .await?;
            let clean = control
                .lines()
                .find_map(|line| line.strip_prefix("Database cluster state:"))
                .is_some_and(|state| matches!(state.trim(), "shut down" | "shut down in recovery"));
            if !clean {
                // Single-user mode replays its WAL to a consistent end, then shuts down cleanly.
                pg::run(
                    &pg.bin_dir,
                    "postgres",
                    &["--single", "-D", &data_text, "postgres"],
                    &[],
                    Some(""),
                    SETUP_TIMEOUT,
                )
                .await?;
            }
            // pg_rewind reads the source's timeline from its last checkpoint: a primary
            // just promoted may not have had one on its new timeline yet, and would look
            // like the target's ("no rewind required").
            let source_sql = pg::connect(pg, &upstream.endpoint).await?;
            source_sql
                .batch_execute("CHECKPOINT")
                .await
                .map_err(|e| format!("CHECKPOINT on {}: {e}", upstream.id))?;
            Ok::<String, String>(control)
        }
        .await;
        let rewound = match recovered {
            Ok(control) => {
                // Whatever the rewind does next, the WAL it would drop is kept first; if
                // that fails, nothing is dropped (the next attempt tries again).
                self.set_aside(view, data, upstream, &control, &source, &env).await?;
                pg::run(
                    &pg.bin_dir,
                    "pg_rewind",
                    &["-D", &data_text, &source, "--no-sync"],
                    &env,
                    None,
                    SETUP_TIMEOUT,
                )
                .await
            }
            Err(e) => Err(e),
        };
        match rewound {
            Ok(output) => {
                let said = output.lines().last().unwrap_or_default();
                let outcome = format!("ok: pg_rewind from {}: {said}", upstream.id);
                self.event("postgres.rewound", &outcome).await;
                Ok(())
            }
            Err(e) => {
                let outcome = format!("ok: pg_rewind from {} failed, copying afresh: {e}", upstream.id);
                self.event("postgres.rebuild", &outcome).await;
                let aside = data.with_extension("rampart-old");
                let _ = std::fs::remove_dir_all(&aside);
                std::fs::rename(data, &aside).map_err(|e| format!("cannot move the old data dir aside: {e}"))?;
                self.copy_from(view, data, upstream).await?;
                let _ = std::fs::remove_dir_all(&aside);
                Ok(())
            }
        }
    }

    /// Keeps the WAL this instance has and its upstream never had (an old primary's
    /// unshipped transactions, which `pg_rewind` drops) beside the region's divergence
    /// files, in `divergence/postgres/SERVICE.INSTANCE.MS/`: the WAL files from where the
    /// two diverged (`wal/`, readable with `pg_waldump`), `pg_waldump`'s reading of them
    /// (`waldump.txt`) and a summary, one line per transaction (`summary.txt`); an event
    /// (`postgres.divergence`) says where and how many committed. Nothing when `pg_rewind`
    /// finds nothing to drop.
    async fn set_aside(
        &self,
        view: &View,
        data: &Path,
        upstream: &Follow,
        control: &str,
        source: &str,
        env: &[(&str, &str)],
    ) -> Result<(), String> {
        let pg = &view.pg;
        let data_text = data.to_string_lossy().to_string();
        let dry = pg::run(
            &pg.bin_dir,
            "pg_rewind",
            &["-D", &data_text, source, "--dry-run"],
            env,
            None,
            SETUP_TIMEOUT,
        )
        .await;
        let dry = match dry {
            Ok(output) => output,
            // The upstream did not answer: nothing is dropped now, it is tried again.
            Err(e) if e.contains("connection to server") => return Err(e),
            // Another database altogether, or no common history: nothing to compare, and
            // the rewind that follows fails the same way (a fresh copy then).
            Err(e) => {
                tracing::warn!(service = %self.key.0, instance = %self.key.1, "postgres: no divergence point: {e}");
                return Ok(());
            }
        };
        if dry.contains("no rewind required") {
            return Ok(());
        }
        // "servers diverged at WAL location 0/3055100 on timeline 1"
        let Some((lsn, timeline)) = dry.lines().find_map(|line| {
            let rest = line.split_once("diverged at WAL location ")?.1;
            let (lsn, timeline) = rest.split_once(" on timeline ")?;
            Some((lsn.parse::<Lsn>().ok()?, timeline.trim().parse::<u32>().ok()?))
        }) else {
            return Ok(());
        };
        let segment_bytes = control
            .lines()
            .find_map(|line| line.strip_prefix("Bytes per WAL segment:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(16 << 20);
        let first = wal_file_name(timeline, lsn, segment_bytes);
        let dir = self
            .node
            .config
            .data_dir
            .join(super::link::DIVERGENCE_DIR)
            .join("postgres")
            .join(format!("{}.{}.{}", self.key.0, self.key.1, crate::node::now_ms()));
        let wal_dir = dir.join("wal");
        std::fs::create_dir_all(&wal_dir).map_err(|e| format!("cannot create {}: {e}", wal_dir.display()))?;
        let copy = || -> std::io::Result<usize> {
            let mut copied = 0;
            for entry in std::fs::read_dir(data.join("pg_wal"))? {
                let name = entry?.file_name().to_string_lossy().to_string();
                let diverged = is_wal_segment(&name) && wal_position(&name) >= wal_position(&first);
                if diverged || is_timeline_history(&name) {
                    std::fs::copy(data.join("pg_wal").join(&name), wal_dir.join(&name))?;
                    copied += 1;
                }
            }
            Ok(copied)
        };
        let files = copy().map_err(|e| format!("cannot keep the divergent WAL in {}: {e}", wal_dir.display()))?;
        let dump_path = dir.join("waldump.txt");
        let dump = std::fs::File::create(&dump_path).map_err(|e| format!("{}: {e}", dump_path.display()))?;
        let wal = data.join("pg_wal");
        let start = lsn.to_string();
        let timeline_text = timeline.to_string();
        let mut waldump = pg::command(&pg.bin_dir, "pg_waldump");
        waldump
            .arg("-p")
            .arg(&wal)
            .args(["-t", &timeline_text, "-s", &start])
            .stdin(Stdio::null())
            .stdout(dump)
            .stderr(Stdio::null())
            .kill_on_drop(true);
        // It ends with an error where the WAL ends: its output is what counts.
        let ran = tokio::time::timeout(SETUP_TIMEOUT, waldump.status()).await;
        if !matches!(ran, Ok(Ok(_))) {
            return Err(format!("pg_waldump of {} did not run: {ran:?}", wal.display()));
        }
        let text = std::fs::read_to_string(&dump_path).map_err(|e| format!("{}: {e}", dump_path.display()))?;
        let summary = WalSummary::read(&text);
        if summary.transactions.is_empty() {
            // Only a shutdown checkpoint or the like: no data to keep.
            let _ = std::fs::remove_dir_all(&dir);
            return Ok(());
        }
        let mut lines = vec![
            format!(
                "PostgreSQL instance {} of service {} diverged from {} at {lsn} on timeline {timeline}.",
                self.key.1, self.key.0, upstream.id
            ),
            format!(
                "Its WAL from there ({files} files in wal/; pg_waldump -p wal -t {timeline} -s {lsn}) holds {} records, {} transactions, {} committed; pg_rewind then dropped it.",
                summary.records,
                summary.transactions.len(),
                summary.committed()
            ),
            "Relations are named as the upstream names them now; as tablespace/database/relfilenode where it does not.".to_string(),
        ];
        let names = relation_names(pg, &upstream.endpoint, &summary).await;
        lines.extend(summary.lines(&names));
        let summary_path = dir.join("summary.txt");
        std::fs::write(&summary_path, lines.join("\n") + "\n")
            .map_err(|e| format!("{}: {e}", summary_path.display()))?;
        let outcome = format!(
            "ok: WAL from {lsn} on timeline {timeline} that {} never had kept in {}: {} transactions committed there",
            upstream.id,
            dir.display(),
            summary.committed()
        );
        self.event("postgres.divergence", &outcome).await;
        Ok(())
    }

    /// Writes `rampart.conf` if it changed, and has a running server reload it.
    async fn write_settings(&mut self, view: &View, data: &Path, upstream: Option<&Follow>) -> Result<(), String> {
        let pg = &view.pg;
        let conninfo = match upstream {
            Some(upstream) => {
                let password = pg::password(&pg.replication_user.password)?;
                let conninfo = pg::conninfo_to(
                    pg,
                    &upstream.endpoint,
                    &pg.replication_user.name,
                    &password,
                    &self.key.1,
                );
                Some((conninfo, upstream.slot.as_str()))
            }
            None => None,
        };
        let upstream = conninfo.as_ref().map(|(c, slot)| (c.as_str(), *slot));
        let port = listen_port(pg, &view.endpoint);
        let names = if upstream.is_none() {
            view.synchronous_names.as_str()
        } else {
            ""
        };
        // Only a node that backs up archives WAL: elsewhere PostgreSQL would keep every
        // segment, waiting for a store that never comes.
        let archive_command = match self.node.backups {
            Some(_) => Some(pg_backup::archive_command(data)?),
            None => None,
        };
        let socket_dir = socket_dir(data);
        let text = settings(
            pg,
            &Placement {
                port,
                socket_dir: &socket_dir,
                upstream,
                synchronous_standby_names: names,
                archive_command: archive_command.as_deref(),
            },
        );
        if self.written.as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        pg::write_file(&data.join(SETTINGS_FILE), &text)?;
        self.written = Some(text);
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            // SAFETY: kill(2) on our own child, not yet reaped (we hold it).
            unsafe {
                libc::kill(pid as i32, libc::SIGHUP);
            }
        }
        Ok(())
    }

    /// Keeps a physical replication slot for every other instance, and drops Rampart's
    /// slots of instances that left (unless in use).
    async fn keep_slots(&mut self, view: &View) -> Result<(), String> {
        let fresh = self
            .slots_checked
            .as_ref()
            .is_some_and(|(slots, at)| *slots == view.slots && at.elapsed() < SLOTS_EVERY);
        let Some(sql) = &self.sql else { return Ok(()) };
        if fresh {
            return Ok(());
        }
        let rows = sql
            .query(
                "SELECT slot_name::text, active FROM pg_replication_slots WHERE slot_type = 'physical'",
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        let existing: Vec<(String, bool)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        let wanted = &view.slots;
        for slot in wanted {
            if !existing.iter().any(|(name, _)| name == slot) {
                sql.execute("SELECT pg_create_physical_replication_slot($1, true)", &[slot])
                    .await
                    .map_err(|e| format!("cannot create the replication slot {slot}: {e}"))?;
            }
        }
        for (name, active) in &existing {
            if name.starts_with("rampart_") && !wanted.contains(name) && !active {
                let _ = sql.execute("SELECT pg_drop_replication_slot($1)", &[name]).await;
            }
        }
        self.slots_checked = Some((view.slots.clone(), Instant::now()));
        Ok(())
    }

    /// Sends its WAL position to the leader when it moved, or every [`POSITION_EVERY`].
    async fn report(&mut self, status: pg::Status) {
        if self
            .sent
            .is_some_and(|(sent, at)| sent == status && at.elapsed() < POSITION_EVERY)
        {
            return;
        }
        let body = ObservationsRequest {
            node: self.node.id,
            observations: Vec::new(),
            restarts: Vec::new(),
            positions: vec![WalPosition {
                service: self.key.0.clone(),
                instance: self.key.1.clone(),
                lsn: status.lsn,
                streaming: status.streaming,
            }],
        };
        if super::prober::send(&self.node, body).await {
            self.sent = Some((status, Instant::now()));
        }
    }

    /// Starts the postmaster as this node's child, its output in
    /// `<data-dir>/instances/SERVICE.INSTANCE.log`.
    fn spawn(&self, view: &View, data: &Path) -> Result<Child, String> {
        let log = super::supervisor::log_file(&self.node, &self.key).map_err(|e| format!("the log file: {e}"))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let mut command = pg::command(&view.pg.bin_dir, "postgres");
        command
            .arg("-D")
            .arg(data)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        // SAFETY: prctl(2) is async-signal-safe and touches only the child being exec'd
        // (after its user changed, which would clear it). A node that dies takes its
        // PostgreSQL down at once (immediate shutdown): no primary outlives its node.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| format!("cannot start postgres: {e}"))?;
        tracing::info!(service = %self.key.0, instance = %self.key.1, pid = child.id(), "postgres started");
        Ok(child)
    }

    async fn event(&self, action: &str, outcome: &str) {
        tracing::info!(service = %self.key.0, instance = %self.key.1, action, outcome, "postgres");
        let event = postgres_event(&self.node, &self.key, action, outcome);
        crate::events::record_anywhere(&self.node, event).await;
    }
}

/// On a node that backs up: stores the WAL that the PostgreSQL instances it hosts hand over
/// for archiving (`rampart backup wal-push`, their `archive_command`) under the backup
/// destination, oldest first, and answers each once stored. A failure is an event (and an
/// alert), said once while it fails the same way; PostgreSQL keeps the WAL and tries again.
pub async fn run_archive(node: Shared) {
    let Some(backups) = &node.backups else { return };
    let mut failed: HashMap<InstanceKey, String> = HashMap::new();
    let mut hosted: Vec<(InstanceKey, PathBuf)> = Vec::new();
    let mut seen_version = None;
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        // The data dirs change only with the registry.
        let version = node.services_version();
        if seen_version != Some(version) {
            seen_version = Some(version);
            hosted = views(&node)
                .into_iter()
                .map(|(key, view)| {
                    let data = PathBuf::from(view.pg.data_dir_of(&key.1));
                    (key, data)
                })
                .collect();
        }
        for (key, data) in &hosted {
            match pg_backup::store_spooled(&backups.vault, &key.0, data).await {
                Ok(_) => {
                    failed.remove(key);
                }
                Err(e) => {
                    let message = e.to_string();
                    if failed.get(key) != Some(&message) {
                        tracing::warn!(service = %key.0, instance = %key.1, "postgres: archiving WAL: {message}");
                        let event = postgres_event(&node, key, "postgres.archive", &format!("failed: {message}"));
                        crate::events::record_anywhere(&node, event).await;
                        failed.insert(key.clone(), message);
                    }
                }
            }
        }
    }
}

/// An event of kind `postgres` about one instance this node hosts.
fn postgres_event(node: &Shared, key: &InstanceKey, action: &str, outcome: &str) -> Event {
    super::supervisor::instance_event(node, key, "postgres", action, outcome)
}

/// The names the instance at `endpoint` gives the relations of `summary`
/// (`tablespace/database/relfilenode` to `schema.table`), as far as it knows them (a
/// relation created in the divergent WAL alone it does not).
async fn relation_names(pg: &Postgres, endpoint: &str, summary: &WalSummary) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    let Ok(sql) = pg::connect(pg, endpoint).await else {
        return names;
    };
    let Ok(rows) = sql
        .query("SELECT oid::bigint, datname::text FROM pg_database", &[])
        .await
    else {
        return names;
    };
    let databases: HashMap<String, String> = rows
        .iter()
        .map(|r| (r.get::<_, i64>(0).to_string(), r.get(1)))
        .collect();
    for relation in summary.relations() {
        let mut parts = relation.split('/');
        let (Some(space), Some(database), Some(node)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (Some(datname), Ok(space), Ok(node)) = (databases.get(database), space.parse::<i64>(), node.parse::<i64>())
        else {
            continue;
        };
        let Ok(db) = pg::connect_database(pg, endpoint, datname).await else {
            continue;
        };
        // 1663 is pg_default, which a database's own relations list as 0.
        let space = if space == 1663 { 0 } else { space };
        let named = db
            .query_one(
                "SELECT pg_filenode_relation($1::bigint::oid, $2::bigint::oid)::regclass::text",
                &[&space, &node],
            )
            .await;
        if let Ok(Some(name)) = named.map(|row| row.get::<_, Option<String>>(0)) {
            names.insert(relation.to_string(), name);
        }
    }
    names
}

/// The `synchronous_standby_names` of a primary whose synchronous standby is `standby`.
fn names_for(pg: &Postgres, standby: Option<&str>) -> String {
    synchronous_standby_names(pg.synchronous, pg.fallback, standby.as_slice())
}

/// Leader: keeps the synchronous standby of every `postgres` service in synchronous mode
/// (`Op::SynchronousStandby`): while the service has a primary that is up, its standby
/// stays as long as it is up; one that is not is replaced by the best replica that is up
/// and streams (highest priority, then least lag, then id), or by none (the primary then blocks commits, or
/// goes on alone with `synchronous_fallback = "async"`: an event says which). Without a
/// primary it never changes: the standby is the one to promote.
pub async fn run_synchronous(node: Shared) {
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        if node.known_leader() != Some(node.id) || node.is_standby() {
            continue;
        }
        for (service, standby, fallback) in synchronous_changes(&node) {
            let op = Op::SynchronousStandby {
                service: service.clone(),
                standby: standby.clone(),
            };
            if node.propose(op).await.is_err() {
                continue;
            }
            let (outcome, detail) = match (&standby, fallback) {
                (Some(id), _) => ("ok".to_string(), format!("service={service} standby={id}")),
                (None, Fallback::Block) => (
                    "failed: no synchronous replica is healthy: commits wait until one is (synchronous_fallback = block)"
                        .to_string(),
                    format!("service={service} standby=none"),
                ),
                (None, Fallback::Async) => (
                    "failed: no synchronous replica is healthy: commits go on unreplicated (synchronous_fallback = async)"
                        .to_string(),
                    format!("service={service} standby=none"),
                ),
            };
            let event = Event {
                id: 0,
                at_ms: 0,
                kind: "postgres".to_string(),
                action: "postgres.synchronous".to_string(),
                actor: "-".to_string(),
                source: format!("node {}", node.id),
                outcome,
                detail,
            };
            crate::events::record(&node, event).await;
        }
    }
}

/// The synchronous standbys to commit: (service, new standby, fallback).
fn synchronous_changes(node: &Shared) -> Vec<(String, Option<String>, Fallback)> {
    let applied = node.applied.read().expect("state lock");
    let soft = node.soft.lock().expect("soft state lock");
    let local = &applied.state.local;
    let mut changes = Vec::new();
    for (name, service) in &applied.state.shipped.services {
        let Some(pg) = service.kind.postgres() else { continue };
        // Quorum mode names no standby: the primary waits for enough of its region's
        // replicas, whichever they are.
        if pg.synchronous != Synchronous::On {
            continue;
        }
        // Only while a primary runs: when it is down (or stepping down), its replicas stop
        // streaming, and the standby is the one to promote.
        let Some(primary) = service.primary.as_deref() else {
            continue;
        };
        if service.demoting || local.verdict(name, primary).health != Health::Up {
            continue;
        }
        let up = |id: &str| {
            let verdict = local.verdict(name, id);
            let record = &service.instances[id];
            id != primary
                && verdict.health == Health::Up
                && !verdict.fenced
                && record.role == InstanceRole::Replica
                && record.instance.priority > 0
        };
        // The standby stays while it is up: it stops streaming for a moment whenever the
        // primary does (before the primary is found down); one that cannot stream at all
        // is rewound by its node, and down meanwhile.
        let current = local.synchronous.get(name);
        if current.is_some_and(|id| service.instances.contains_key(id) && up(id)) {
            continue;
        }
        // A new one must stream now: naming a replica that does not would stop commits.
        let best = service
            .instances
            .iter()
            .filter(|(id, _)| up(id) && soft.streaming(name, id))
            .min_by_key(|(id, r)| {
                let lag = soft.lag_revisions(name, id).unwrap_or(u64::MAX);
                (std::cmp::Reverse(r.instance.priority), lag, (*id).clone())
            })
            .map(|(id, _)| id.clone());
        if best.as_ref() != current {
            changes.push((name.clone(), best, pg.fallback));
        }
    }
    changes
}

/// Whether `upstream` can be copied, rewound or streamed from: the primary once writable
/// (out of recovery: a source still in recovery has not forked its new timeline yet), a
/// region's lead once it streams from its own upstream (so it is on the primary's
/// timeline).
async fn upstream_ready(pg: &Postgres, upstream: &Follow) -> bool {
    let Ok(sql) = pg::connect(pg, &upstream.endpoint).await else {
        return false;
    };
    pg::status(&sql).await.is_ok_and(|status| match upstream.cascade {
        false => !status.in_recovery,
        true => status.in_recovery && status.streaming,
    })
}

/// An empty directory beside `data` for a new data dir, owned by PostgreSQL's user.
fn fresh_dir(data: &Path) -> Result<PathBuf, String> {
    let fresh = data.with_extension("rampart-new");
    if let Some(parent) = data.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let _ = std::fs::remove_dir_all(&fresh);
    std::fs::create_dir(&fresh).map_err(|e| format!("cannot create {}: {e}", fresh.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fresh, std::fs::Permissions::from_mode(0o700)).map_err(|e| e.to_string())?;
    pg::own(&fresh)?;
    Ok(fresh)
}

/// Has `postgresql.conf` include Rampart's settings last.
fn include_settings(data: &Path) -> Result<(), String> {
    let path = data.join("postgresql.conf");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if text.lines().any(|line| line.trim() == INCLUDE_LINE) {
        return Ok(());
    }
    pg::write_file(&path, &format!("{text}\n{INCLUDE_LINE}\n"))
}

/// Where the server's Unix socket goes: a directory beside its data dir (`DATA.run`; a
/// socket inside the data dir would be copied by `pg_rewind`, which cannot), when the
/// socket's path fits (108 bytes); else none (TCP only).
fn socket_dir(data: &Path) -> String {
    let text = format!("{}.run", data.display());
    if text.len() + "/.s.PGSQL.65535.lock".len() < 100 {
        text
    } else {
        String::new()
    }
}

/// Creates the socket directory, owned by PostgreSQL's user.
fn make_socket_dir(data: &Path) -> Result<(), String> {
    let dir = socket_dir(data);
    if dir.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {dir}: {e}"))?;
    pg::own(Path::new(&dir))
}

/// A fast shutdown, then an immediate one after [`STOP_GRACE`].
async fn stop_child(mut child: Child) {
    let signal = |child: &Child, signal: i32| {
        if let Some(pid) = child.id() {
            // SAFETY: kill(2) on our own child, not yet reaped (we hold it).
            unsafe {
                libc::kill(pid as i32, signal);
            }
        }
    };
    signal(&child, libc::SIGINT);
    if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
        signal(&child, libc::SIGQUIT);
        let _ = child.wait().await;
    }
}

/// `on_promote` of a `postgres` instance (run by `hooks` before the policy's own hook):
/// `pg_promote()` and wait until it leaves recovery.
pub async fn promote(pg: &Postgres, endpoint: &str, timeout: Duration) -> Result<(), String> {
    let sql = pg::connect(pg, endpoint).await?;
    if !pg::status(&sql).await?.in_recovery {
        return Ok(());
    }
    let seconds = timeout.as_secs().clamp(1, 3600) as i32;
    let promoted: bool = sql
        .query_one("SELECT pg_promote(true, $1)", &[&seconds])
        .await
        .map_err(|e| format!("pg_promote: {e}"))?
        .get(0);
    if promoted {
        // A checkpoint on the new timeline at once: `pg_rewind` of the old primary reads
        // the timeline from it.
        sql.batch_execute("CHECKPOINT")
            .await
            .map_err(|e| format!("CHECKPOINT: {e}"))
    } else {
        Err(format!("pg_promote did not finish within {seconds}s"))
    }
}

/// `on_demote` of a `postgres` instance (run by `hooks` before the policy's own hook, and
/// when fencing): a fast shutdown of its server, immediate if that takes too long; done
/// when no server runs on its data dir.
pub async fn demote(pg: &Postgres, instance: &str) -> Result<(), String> {
    let data = pg.data_dir_of(instance);
    if !postmaster_alive(Path::new(&data)) {
        return Ok(());
    }
    let grace = STOP_GRACE.as_secs().to_string();
    let fast = ["stop", "-D", data.as_str(), "-m", "fast", "-w", "-t", grace.as_str()];
    if pg::run(&pg.bin_dir, "pg_ctl", &fast, &[], None, STOP_GRACE * 2)
        .await
        .is_ok()
    {
        return Ok(());
    }
    let immediate = [
        "stop",
        "-D",
        data.as_str(),
        "-m",
        "immediate",
        "-w",
        "-t",
        grace.as_str(),
    ];
    match pg::run(&pg.bin_dir, "pg_ctl", &immediate, &[], None, STOP_GRACE * 2).await {
        Ok(_) => Ok(()),
        Err(_) if !postmaster_alive(Path::new(&data)) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether the server named by the data dir's `postmaster.pid` still runs (the file stays
/// behind a server that was killed).
fn postmaster_alive(data: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(data.join("postmaster.pid")) else {
        return false;
    };
    let Some(pid) = text.lines().next().and_then(|line| line.trim().parse::<i32>().ok()) else {
        return false;
    };
    // SAFETY: signal 0 only asks whether the process exists.
    let answer = unsafe { libc::kill(pid, 0) };
    answer == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}
