//! `rampart_core::postgres` against a real PostgreSQL (Debian's, installed by
//! `scripts/install-test-tools`): the connection strings it writes connect with every
//! value as written, the WAL positions PostgreSQL prints parse and give lag in bytes, and
//! every `synchronous_standby_names` it gives is one PostgreSQL accepts as written.

use std::time::Duration;

use rampart_core::postgres::{conninfo, synchronous_standby_names, Fallback, Lsn, Synchronous};
use rampart_core::service::{InstanceSpec, Kind, PolicySpec};
use rampart_testkit::postgres::Postgres;

/// `text` as an SQL string literal.
fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[test]
fn the_core_postgres_pieces_hold_against_a_real_postgresql() {
    let pg = Postgres::start().expect("a PostgreSQL server");
    let port = pg.port.to_string();
    let odd_name = r"pg-'1\x";
    let info = conninfo(&[
        ("host", "127.0.0.1"),
        ("port", &port),
        ("user", "postgres"),
        ("dbname", "postgres"),
        ("application_name", odd_name),
    ]);
    let sql = |text: &str| pg.psql(&info, text).expect(text);
    assert_eq!(sql("SELECT current_setting('application_name')"), odd_name);

    let before_text = sql("SELECT pg_current_wal_lsn()");
    let before: Lsn = before_text.parse().expect("a WAL position");
    assert_eq!(before.to_string(), before_text, "printed as PostgreSQL prints it");
    sql("CREATE TABLE t (v text); INSERT INTO t SELECT repeat('x', 1000) FROM generate_series(1, 200)");
    let after: Lsn = sql("SELECT pg_current_wal_lsn()").parse().expect("a WAL position");
    let bytes = sql(&format!("SELECT pg_wal_lsn_diff('{after}', '{before}')::bigint"));
    assert_eq!(
        before.behind(after).to_string(),
        bytes,
        "lag in bytes as PostgreSQL counts it"
    );
    assert!(before.behind(after) > 100_000);

    let forms = [
        synchronous_standby_names(Synchronous::On, Fallback::Block, &["pg-2", "pg-3"]),
        synchronous_standby_names(Synchronous::Quorum, Fallback::Async, &["pg-2", "pg \"3\""]),
        synchronous_standby_names(Synchronous::On, Fallback::Block, &[]),
        synchronous_standby_names(Synchronous::On, Fallback::Async, &[]),
    ];
    for names in forms {
        sql(&format!(
            "ALTER SYSTEM SET synchronous_standby_names = {}",
            literal(&names)
        ));
        let kept = sql("SELECT setting FROM pg_file_settings WHERE name = 'synchronous_standby_names'");
        assert_eq!(kept, names, "kept as written");
    }
    // And PostgreSQL does refuse a malformed one: the check above can fail.
    let refused = pg.psql(&info, "ALTER SYSTEM SET synchronous_standby_names = 'FIRST 1 ('");
    assert!(refused.is_err(), "{refused:?}");
}

/// A `kind = "postgres"` service of three instances on a three-node region, each node
/// running one (`node = N`), in a temporary directory PostgreSQL's user can reach;
/// `extra` adds to its `[postgres]` settings.
struct PgCluster {
    cluster: rampart_testkit::Cluster,
    client: rampart_client::Client,
    dir: tempfile::TempDir,
    /// (id, port) of each instance.
    instances: Vec<(String, u16)>,
    /// The service's policy as put.
    policy: serde_json::Value,
}

const SUPERUSER_PASSWORD: &str = "it's-super";

/// A `kind = "postgres"` policy whose data dirs and password files are in a temporary
/// directory PostgreSQL's user can reach (kept until the directory is dropped).
fn policy_with_passwords() -> (tempfile::TempDir, serde_json::Value) {
    let dir = tempfile::tempdir().expect("temp dir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::write(dir.path().join("super.pw"), format!("{SUPERUSER_PASSWORD}\n")).expect("password");
    std::fs::write(dir.path().join("repl.pw"), "repl-secret\n").expect("password");
    let policy = serde_json::json!({
        "kind": "postgres",
        "postgres": {
            "bin_dir": rampart_testkit::postgres::bin_dir().expect("PostgreSQL"),
            "data_dir": dir.path().join("{instance}"),
            "superuser": {"password_file": dir.path().join("super.pw")},
            "replication_user": {"password_file": dir.path().join("repl.pw")},
            "parameters": {"fsync": "off", "shared_buffers": "16MB"},
        },
    });
    (dir, policy)
}

impl PgCluster {
    async fn start(extra: serde_json::Value) -> PgCluster {
        PgCluster::start_on(3, extra).await
    }

    /// The same on a region of `nodes` nodes (instances on nodes 1 to 3).
    async fn start_on(nodes: usize, extra: serde_json::Value) -> PgCluster {
        let options = rampart_testkit::ClusterOptions {
            nodes,
            ..rampart_testkit::ClusterOptions::default()
        };
        PgCluster::start_with(options, extra).await
    }

    /// The same on a region started with `options` (instances on nodes 1 to 3).
    async fn start_with(options: rampart_testkit::ClusterOptions, extra: serde_json::Value) -> PgCluster {
        let cluster = rampart_testkit::Cluster::start(crate::binary(), options)
            .await
            .expect("start cluster");
        cluster.wait_for_leader(crate::DEADLINE).await;
        let client = cluster.client();
        let (dir, mut policy) = policy_with_passwords();
        for (key, value) in extra.as_object().cloned().unwrap_or_default() {
            policy["postgres"][key] = value;
        }
        let spec: PolicySpec = serde_json::from_value(policy.clone()).expect("policy");
        client.service_put("db", &spec).await.expect("service");
        let mut instances = Vec::new();
        for node in 1..=3u64 {
            let port = rampart_testkit::free_port().expect("port").port();
            let id = format!("pg-{node}");
            let spec = InstanceSpec {
                endpoint: format!("127.0.0.1:{port}"),
                node: Some(node),
                ..InstanceSpec::default()
            };
            client.instance_put("db", &id, &spec).await.expect("instance");
            instances.push((id, port));
        }
        PgCluster {
            cluster,
            client,
            dir,
            instances,
            policy,
        }
    }

    fn port(&self, id: &str) -> u16 {
        self.instances.iter().find(|(i, _)| i == id).expect("an instance").1
    }

    fn conninfo(&self, id: &str) -> String {
        conninfo_on(self.port(id))
    }

    fn sql(&self, id: &str, sql: &str) -> Result<String, String> {
        rampart_testkit::postgres::psql(&self.conninfo(id), sql)
    }

    /// Waits until `wanted` is the primary, it runs as one, and every other instance runs
    /// as its replica; returns the primary.
    async fn wait_serving(&self, wanted: impl Fn(&str) -> bool) -> String {
        rampart_testkit::eventually(Duration::from_secs(120), "a primary and two replicas", || async {
            let view = self.client.service("db").await.ok()?;
            let primary = view.primary.clone().filter(|p| wanted(p))?;
            for (id, _) in &self.instances {
                let in_recovery = self.sql(id, "SELECT pg_is_in_recovery()").ok()?;
                if in_recovery != if *id == primary { "f" } else { "t" } {
                    return None;
                }
            }
            Some(primary)
        })
        .await
    }

    /// A proxy with a `route = "primary"` listener for the service: its address, and the
    /// proxy (stopped when dropped).
    fn primary_proxy(&self) -> (std::net::SocketAddr, (crate::proxy::ProxyProcess, tempfile::TempDir)) {
        let port = rampart_testkit::free_port().expect("port");
        let (proxy, dir, _admin) = crate::proxy_registry::registry_proxy(
            &self.cluster,
            &format!("[[proxy.listeners]]\nname = \"db\"\nbind = \"{port}\"\nservice = \"db\"\nroute = \"primary\"\n"),
        );
        (port, (proxy, dir))
    }

    /// The acknowledged rows (id, when) that instance `id`'s table `t` lacks.
    fn lost<'a>(&self, id: &str, acknowledged: &'a [(i64, u64)]) -> Vec<&'a (i64, u64)> {
        let rows: std::collections::HashSet<i64> = self
            .sql(id, "SELECT v FROM t")
            .expect("rows")
            .lines()
            .map(|v| v.parse().expect("a row"))
            .collect();
        acknowledged.iter().filter(|(v, _)| !rows.contains(v)).collect()
    }

    /// The postmaster's pid of instance `id`, from its `postmaster.pid`.
    fn postmaster_pid(&self, id: &str) -> i32 {
        let text = std::fs::read_to_string(self.dir.path().join(id).join("postmaster.pid")).expect("postmaster.pid");
        text.lines().next().expect("a pid").trim().parse().expect("a pid")
    }

    /// Waits until `id` holds `value` in `t` (a replica replaying its primary's WAL).
    async fn wait_has(&self, id: &str, value: i64) {
        let sql = format!("SELECT count(*) FROM t WHERE v = {value}");
        rampart_testkit::eventually(Duration::from_secs(60), &format!("{id} has {value}"), || async {
            (self.sql(id, &sql).ok()? == "1").then_some(())
        })
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_service_comes_up_fails_over_and_takes_its_old_primary_back_by_rewind() {
    let pg = PgCluster::start(serde_json::json!({})).await;
    let first = pg.wait_serving(|_| true).await;
    pg.sql(
        &first,
        "CREATE TABLE t (v bigint PRIMARY KEY); INSERT INTO t VALUES (1)",
    )
    .expect("a write on the primary");
    for (id, _) in &pg.instances {
        pg.wait_has(id, 1).await;
    }
    // Replicas report their lag in bytes of WAL (to the leader), and may be promoted.
    let leader = pg.cluster.wait_for_leader(crate::DEADLINE).await;
    let on_leader = pg.cluster.client_of(leader);
    rampart_testkit::eventually(crate::DEADLINE, "lag reported", || async {
        let view = on_leader.service("db").await.ok()?;
        view.instances.iter().all(|i| i.lag == Some(0)).then_some(())
    })
    .await;
    rampart_testkit::eventually(crate::DEADLINE, "both replicas promotable", || async {
        let report = pg.client.eligibility("db").await.ok()?;
        let mut replicas = report.instances.iter().filter(|e| e.id != first);
        replicas.all(|e| e.rank.is_some()).then_some(())
    })
    .await;
    let service = pg.client.service("db").await.expect("view");
    assert!(matches!(service.kind, Kind::Postgres(_)), "{:?}", service.kind);

    // The proxy: reads balanced over the replicas, and the admin oracle HAProxy checks.
    let primary_port = rampart_testkit::free_port().expect("port");
    let replicas_port = rampart_testkit::free_port().expect("port");
    let (_proxy, _dir, admin) = crate::proxy_registry::registry_proxy(
        &pg.cluster,
        &format!(
            "[[proxy.listeners]]\nname = \"db\"\nbind = \"{primary_port}\"\nservice = \"db\"\nroute = \"primary\"\n\
             [[proxy.listeners]]\nname = \"db-ro\"\nbind = \"{replicas_port}\"\nservice = \"db\"\nroute = \"replicas\"\n"
        ),
    );
    let replica_ports: std::collections::HashSet<String> = pg
        .instances
        .iter()
        .filter(|(id, _)| *id != first)
        .map(|(_, port)| port.to_string())
        .collect();
    let mut reached = std::collections::HashSet::new();
    for _ in 0..40 {
        let answer = rampart_testkit::eventually(crate::DEADLINE, "a read through the replicas listener", || async {
            let sql = connect_to(replicas_port).await?;
            let row = sql
                .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
                .await
                .ok()?;
            Some((row.get::<_, i32>(0).to_string(), row.get::<_, bool>(1)))
        })
        .await;
        assert!(answer.1, "a read landed on a writable instance: {answer:?}");
        reached.insert(answer.0);
    }
    assert_eq!(reached, replica_ports, "reads are balanced over both replicas");
    let oracle = |path: String| async move {
        reqwest::get(format!("http://{admin}{path}"))
            .await
            .expect("admin")
            .status()
    };
    let second_id = pg
        .instances
        .iter()
        .map(|(id, _)| id.clone())
        .find(|id| *id != first)
        .expect("a replica");
    assert_eq!(oracle(format!("/listeners/db/primary?instance={first}")).await, 200);
    assert_eq!(oracle(format!("/listeners/db/replica?instance={first}")).await, 503);
    assert_eq!(oracle(format!("/listeners/db/replica?instance={second_id}")).await, 200);
    assert_eq!(oracle(format!("/listeners/db/primary?instance={second_id}")).await, 503);

    // SIGKILL of the primary's postmaster: a replica is promoted, the other follows it.
    let token = service.token;
    // SAFETY: kill(2) of a process this test's region started.
    unsafe {
        libc::kill(pg.postmaster_pid(&first), libc::SIGKILL);
    }
    let second = pg.wait_serving(|p| p != first).await;
    let view = pg.client.service("db").await.expect("view");
    assert!(view.token > token, "a new fencing token");
    pg.sql(&second, "INSERT INTO t VALUES (2)")
        .expect("a write on the new primary");
    // Every instance, the old primary included (rewound), follows the new primary.
    for (id, _) in &pg.instances {
        pg.wait_has(id, 2).await;
    }
    pg.wait_has(&first, 1).await;
    let events = pg.client.events(Some("postgres"), None).await.expect("events").events;
    assert!(
        events
            .iter()
            .any(|e| e.action == "postgres.rewound" && e.detail.contains(&first)),
        "{events:?}"
    );
    drop(pg.cluster);
}

/// Clients inserting unique ids through `proxy` until stopped; each keeps the ids whose
/// INSERT was acknowledged (committed) and those whose outcome is unknown.
struct Inserts {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Each acknowledged id, and when (wall-clock ms).
    acknowledged: std::sync::Arc<std::sync::Mutex<Vec<(i64, u64)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Inserts {
    fn start(proxy: std::net::SocketAddr, clients: i64) -> Inserts {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|client| {
                let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
                tokio::spawn(async move {
                    let mut next = client * 1_000_000;
                    // Bounded: a client never writes more than this many rows.
                    let last = next + 100_000;
                    let mut connection: Option<tokio_postgres::Client> = None;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) && next < last {
                        if connection.as_ref().is_none_or(|c| c.is_closed()) {
                            connection = connect_to(proxy).await;
                            if connection.is_none() {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                                continue;
                            }
                        }
                        let sql = connection.as_ref().expect("connected");
                        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&next];
                        let insert = sql.execute("INSERT INTO t VALUES ($1)", &params);
                        match tokio::time::timeout(Duration::from_secs(5), insert).await {
                            Ok(Ok(_)) => acknowledged.lock().expect("lock").push((next, wall_ms())),
                            // Unknown: neither acknowledged nor reused.
                            _ => connection = None,
                        }
                        next += 1;
                    }
                })
            })
            .collect();
        Inserts {
            stop,
            acknowledged,
            tasks,
        }
    }

    fn count(&self) -> usize {
        self.acknowledged.lock().expect("lock").len()
    }

    async fn wait_more(&self, more: usize) {
        let target = self.count() + more;
        rampart_testkit::eventually(Duration::from_secs(90), "acknowledged inserts", || async {
            (self.count() >= target).then_some(())
        })
        .await
    }

    async fn stop(self) -> Vec<(i64, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for task in self.tasks {
            task.await.expect("client");
        }
        let acknowledged = self.acknowledged.lock().expect("lock").clone();
        acknowledged
    }
}

async fn connect_to(proxy: std::net::SocketAddr) -> Option<tokio_postgres::Client> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(proxy.ip().to_string())
        .port(proxy.port())
        .user("postgres")
        .password(SUPERUSER_PASSWORD)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(2));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.ok()?;
    tokio::spawn(connection);
    Some(client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn synchronous_mode_keeps_every_committed_row_through_five_primary_kills() {
    let pg = PgCluster::start(serde_json::json!({"synchronous": "on"})).await;
    let first = pg.wait_serving(|_| true).await;
    pg.sql(&first, "CREATE TABLE t (v bigint PRIMARY KEY)").expect("table");
    let (port, _proxy) = pg.primary_proxy();
    let inserts = Inserts::start(port, 4);
    let mut primary = first;
    for round in 0..5 {
        // A synchronous standby named, and rows committed through the proxy.
        rampart_testkit::eventually(Duration::from_secs(90), "a synchronous standby", || async {
            let view = pg.client.service("db").await.ok()?;
            (view.primary.as_deref() == Some(primary.as_str()) && view.synchronous_standby.is_some()).then_some(())
        })
        .await;
        inserts.wait_more(50).await;
        let view = pg.client.service("db").await.expect("view");
        let standby = view.synchronous_standby.clone().expect("a standby");
        // SAFETY: kill(2) of a process this test's region started.
        unsafe {
            libc::kill(pg.postmaster_pid(&primary), libc::SIGKILL);
        }
        let old = primary.clone();
        let next = wait_primary_not(&pg, &old).await;
        assert_eq!(next, standby, "round {round}: only the synchronous standby is promoted");
        primary = next;
    }
    inserts.wait_more(50).await;
    let acknowledged = inserts.stop().await;
    let primary = pg.wait_serving(|_| true).await;
    let lost = pg.lost(&primary, &acknowledged);
    assert!(acknowledged.len() >= 300, "{} acknowledged", acknowledged.len());
    assert!(lost.is_empty(), "{} committed rows lost: {lost:?}", lost.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quorum_mode_waits_for_any_of_its_replicas_and_keeps_every_committed_row_through_three_kills() {
    let pg = PgCluster::start(serde_json::json!({"synchronous": "quorum"})).await;
    let first = pg.wait_serving(|_| true).await;
    pg.sql(&first, "CREATE TABLE t (v bigint PRIMARY KEY)").expect("table");
    let (port, _proxy) = pg.primary_proxy();
    let inserts = Inserts::start(port, 4);
    let mut primary = first;
    for round in 0..3 {
        // Every instance back in its role, and the primary waiting for any one of the
        // other two (no standby is named: whichever answers first).
        pg.wait_serving(|p| p == primary).await;
        let others: Vec<String> = pg
            .instances
            .iter()
            .map(|(id, _)| id.clone())
            .filter(|id| *id != primary)
            .collect();
        let wanted = format!("ANY 1 (\"{}\", \"{}\")", others[0], others[1]);
        rampart_testkit::eventually(Duration::from_secs(60), &wanted, || async {
            (pg.sql(&primary, "SHOW synchronous_standby_names").ok()? == wanted).then_some(())
        })
        .await;
        // Both replicas stream (an old primary serves read-only a moment before it is
        // rewound): a failover needs both settled.
        let primary_port = pg.port(&primary).to_string();
        rampart_testkit::eventually(Duration::from_secs(90), "both replicas streaming", || async {
            for id in &others {
                let sender = pg
                    .sql(
                        id,
                        "SELECT coalesce(sender_port, 0) FROM pg_stat_wal_receiver WHERE status = 'streaming'",
                    )
                    .ok()?;
                (sender == primary_port).then_some(())?;
            }
            Some(())
        })
        .await;
        inserts.wait_more(50).await;
        // SAFETY: kill(2) of a process this test's region started.
        unsafe {
            libc::kill(pg.postmaster_pid(&primary), libc::SIGKILL);
        }
        let next = wait_primary_not(&pg, &primary).await;
        assert!(others.contains(&next), "round {round}: {next}");
        primary = next;
    }
    inserts.wait_more(50).await;
    let acknowledged = inserts.stop().await;
    let primary = pg.wait_serving(|_| true).await;
    let lost = pg.lost(&primary, &acknowledged);
    assert!(acknowledged.len() >= 200, "{} acknowledged", acknowledged.len());
    assert!(lost.is_empty(), "{} committed rows lost: {lost:?}", lost.len());
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64
}

/// Waits until the registry names a primary other than `old`.
async fn wait_primary_not(pg: &PgCluster, old: &str) -> String {
    rampart_testkit::eventually(Duration::from_secs(90), "a new primary", || async {
        let view = pg.client.service("db").await.ok()?;
        view.primary.filter(|p| p != old)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_no_synchronous_replica_commits_wait_and_it_is_said_until_async_lets_them_through() {
    // Five nodes: the region keeps its majority with the two replicas' nodes gone.
    let mut pg = PgCluster::start_on(5, serde_json::json!({"synchronous": "on"})).await;
    let primary = pg.wait_serving(|_| true).await;
    pg.sql(&primary, "CREATE TABLE t (v bigint PRIMARY KEY)")
        .expect("table");
    rampart_testkit::eventually(Duration::from_secs(60), "a synchronous standby", || async {
        pg.client.service("db").await.ok()?.synchronous_standby
    })
    .await;
    let health_ha = format!("http://{}/health/ha", pg.cluster.endpoints()[0]);
    for (id, _) in pg.instances.clone() {
        if id != primary {
            let node: u64 = id.trim_start_matches("pg-").parse().expect("node");
            pg.cluster.kill(node);
        }
    }
    // Said: no standby in the registry, an event, and /health/ha.
    rampart_testkit::eventually(Duration::from_secs(60), "no synchronous standby", || async {
        let view = pg.client.service("db").await.ok()?;
        view.synchronous_standby.is_none().then_some(())
    })
    .await;
    rampart_testkit::eventually(crate::DEADLINE, "/health/ha says so", || async {
        let answer = reqwest::get(&health_ha).await.ok()?;
        let body = answer.text().await.ok()?;
        body.contains("db: no synchronous replica: commits wait").then_some(())
    })
    .await;
    let events = pg.client.events(Some("postgres"), None).await.expect("events").events;
    assert!(
        events
            .iter()
            .any(|e| e.action == "postgres.synchronous" && e.outcome.contains("commits wait")),
        "{events:?}"
    );
    // Blocked: a commit is not acknowledged.
    let conninfo = pg.conninfo(&primary);
    let config: tokio_postgres::Config = conninfo.parse().expect("conninfo");
    let (sql, connection) = config.connect(tokio_postgres::NoTls).await.expect("login");
    tokio::spawn(connection);
    let insert = sql.execute("INSERT INTO t VALUES (1)", &[]);
    let blocked = tokio::time::timeout(Duration::from_secs(3), insert).await;
    assert!(
        blocked.is_err(),
        "a commit went through with no synchronous replica: {blocked:?}"
    );
    drop(sql);

    // synchronous_fallback = "async": commits go on, unreplicated, and it is said.
    let mut policy = pg.policy.clone();
    policy["postgres"]["synchronous_fallback"] = "async".into();
    let spec: PolicySpec = serde_json::from_value(policy).expect("policy");
    pg.client.service_put("db", &spec).await.expect("policy");
    rampart_testkit::eventually(crate::DEADLINE, "commits go on", || async {
        pg.sql(&primary, "INSERT INTO t VALUES (2)").ok()
    })
    .await;
    rampart_testkit::eventually(crate::DEADLINE, "/health/ha says so", || async {
        let body = reqwest::get(&health_ha).await.ok()?.text().await.ok()?;
        body.contains("db: no synchronous replica: commits are not replicated")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_takes_its_primary_down_the_proxy_moves_and_the_old_primary_rejoins_by_rewind() {
    let mut pg = PgCluster::start(serde_json::json!({})).await;
    let first = pg.wait_serving(|_| true).await;
    pg.sql(
        &first,
        "CREATE TABLE t (v bigint PRIMARY KEY); INSERT INTO t VALUES (1)",
    )
    .expect("table");
    let (port, _proxy) = pg.primary_proxy();
    // Through the proxy: the primary, writable.
    let served_by = |expected: String| async move {
        let sql = connect_to(port).await?;
        let row = sql
            .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
            .await
            .ok()?;
        let (server_port, in_recovery): (i32, bool) = (row.get(0), row.get(1));
        (server_port.to_string() == expected && !in_recovery).then_some(())
    };
    let first_port = pg.port(&first).to_string();
    rampart_testkit::eventually(crate::DEADLINE, "the proxy reaches the primary", || {
        served_by(first_port.clone())
    })
    .await;

    let node: u64 = first.trim_start_matches("pg-").parse().expect("node");
    pg.cluster.kill(node);
    let second = wait_primary_not(&pg, &first).await;
    let second_port = pg.port(&second).to_string();
    rampart_testkit::eventually(crate::DEADLINE, "the proxy reaches the new primary", || {
        served_by(second_port.clone())
    })
    .await;
    let sql = connect_to(port).await.expect("through the proxy");
    sql.execute("INSERT INTO t VALUES (2)", &[])
        .await
        .expect("a write through the proxy");

    // The old primary's node comes back: its PostgreSQL is rewound and follows.
    pg.cluster.restart(node).expect("restart");
    let serving = pg.wait_serving(|p| p == second).await;
    assert_eq!(serving, second);
    pg.wait_has(&first, 2).await;
    let events = pg.client.events(Some("postgres"), None).await.expect("events").events;
    assert!(
        events
            .iter()
            .any(|e| (e.action == "postgres.rewound" || e.action == "postgres.rebuild") && e.detail.contains(&first)),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switchover_under_load_loses_nothing_and_never_has_two_writable_primaries() {
    let pg = PgCluster::start(serde_json::json!({})).await;
    let first = pg.wait_serving(|_| true).await;
    pg.sql(&first, "CREATE TABLE t (v bigint PRIMARY KEY)").expect("table");
    let (port, _proxy) = pg.primary_proxy();
    // Every instance sampled for pg_is_in_recovery() over and over: the most found
    // writable in one pass.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let conninfos: Vec<String> = pg.instances.iter().map(|(id, _)| pg.conninfo(id)).collect();
        tokio::spawn(async move {
            let mut most = 0;
            let mut passes = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut writable = 0;
                for conninfo in &conninfos {
                    let config: tokio_postgres::Config = conninfo.parse().expect("conninfo");
                    let Ok(Ok((sql, connection))) =
                        tokio::time::timeout(Duration::from_secs(1), config.connect(tokio_postgres::NoTls)).await
                    else {
                        continue;
                    };
                    tokio::spawn(connection);
                    if let Ok(row) = sql.query_one("SELECT pg_is_in_recovery()", &[]).await {
                        writable += usize::from(!row.get::<_, bool>(0));
                    }
                }
                most = most.max(writable);
                passes += 1;
            }
            (most, passes)
        })
    };
    let inserts = Inserts::start(port, 4);
    inserts.wait_more(100).await;
    let mut tokens = vec![pg.client.service("db").await.expect("view").token];
    for target in ["pg-2", "pg-3"] {
        let target = if target == first { "pg-1" } else { target };
        rampart_testkit::eventually(crate::DEADLINE, "the target promotable", || async {
            let report = pg.client.eligibility("db").await.ok()?;
            report
                .instances
                .iter()
                .any(|e| e.id == target && e.rank.is_some())
                .then_some(())
        })
        .await;
        let done = pg.client.switchover("db", target).await.expect("switchover");
        tokens.push(done.token);
        pg.wait_serving(|p| p == target).await;
        inserts.wait_more(100).await;
    }
    let acknowledged = inserts.stop().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (most, passes) = sampler.await.expect("sampler");
    assert!(passes > 10, "{passes} sampling passes");
    assert_eq!(most, 1, "never two writable primaries at once");
    assert!(
        tokens.windows(2).all(|w| w[1] > w[0]),
        "fencing tokens grow: {tokens:?}"
    );
    let primary = pg.client.service("db").await.expect("view").primary.expect("a primary");
    let lost = pg.lost(&primary, &acknowledged);
    assert!(
        lost.is_empty(),
        "{} committed rows lost in a switchover: {lost:?}",
        lost.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn asynchronous_mode_counts_lost_rows_and_the_failover_event_states_what_may_be_lost() {
    let pg = PgCluster::start(serde_json::json!({})).await;
    let first = pg.wait_serving(|_| true).await;
    pg.sql(&first, "CREATE TABLE t (v bigint PRIMARY KEY)").expect("table");
    let (port, _proxy) = pg.primary_proxy();
    let inserts = Inserts::start(port, 4);
    inserts.wait_more(200).await;
    // SAFETY: kill(2) of a process this test's region started.
    unsafe {
        libc::kill(pg.postmaster_pid(&first), libc::SIGKILL);
    }
    let second = wait_primary_not(&pg, &first).await;
    inserts.wait_more(50).await;
    let acknowledged = inserts.stop().await;
    pg.wait_serving(|p| p == second).await;
    let lost = pg.lost(&second, &acknowledged);
    // The failover event states the RPO: the WAL the new primary was known to lack and
    // the window since the old primary's position was last seen.
    let events = pg.client.events(Some("failover"), None).await.expect("events").events;
    let promote = events
        .iter()
        .rev()
        .find(|e| e.action == "failover.promote" && e.detail.contains(&format!("to={second}")))
        .unwrap_or_else(|| panic!("no failover event: {events:?}"));
    let field = |name: &str| -> u64 {
        let at = promote
            .detail
            .find(&format!(" {name}="))
            .unwrap_or_else(|| panic!("{name} in {}", promote.detail));
        let rest = &promote.detail[at + name.len() + 2..];
        rest.split(' ').next().expect("a value").parse().expect("a number")
    };
    let (rpo_bytes, seen_ms, promoted_ms) = (field("rpo_bytes"), field("primary_seen_ms"), field("promoted_ms"));
    assert!(field("rpo_window_ms") == promoted_ms - seen_ms);
    // A row lost though acknowledged before the old primary's last position was seen
    // (with a second for that report to arrive) is within the bytes the event names.
    let before_window = lost.iter().filter(|(_, at)| *at + 1000 < seen_ms).count();
    assert!(
        before_window == 0 || rpo_bytes > 0,
        "{before_window} rows lost before the window, but rpo_bytes = 0: {}",
        promote.detail
    );
    assert!(
        lost.iter().all(|(_, at)| *at <= promoted_ms),
        "lost rows acknowledged after the promotion"
    );
    eprintln!(
        "asynchronous failover: {} acknowledged, {} lost; event: {}",
        acknowledged.len(),
        lost.len(),
        promote.detail
    );
}

#[test]
fn a_bad_postgres_policy_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = |config: &str| {
        let path = dir.path().join("node.toml");
        std::fs::write(&path, config).expect("config");
        let out = std::process::Command::new(crate::binary())
            .args(["node", "--id", "1", "--listen", "127.0.0.1:1", "--data-dir"])
            .arg(dir.path().join("unused"))
            .arg("--config")
            .arg(&path)
            .output()
            .expect("run node");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).to_string())
    };
    let table =
        "[services.db.postgres]\nbin_dir = \"/usr/lib/postgresql/15/bin\"\ndata_dir = \"/var/lib/pg/{instance}\"\n\
                 superuser = { password_env = \"PGPW\" }\nreplication_user = { password_env = \"REPLPW\" }\n";
    let (code, stderr) = node(&format!(
        "[services.db]\nkind = \"postgres\"\n{}synchronous = \"always\"\n",
        table
    ));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("services.db.postgres.synchronous"), "{stderr}");
    let without_bin = table.replace("bin_dir = \"/usr/lib/postgresql/15/bin\"\n", "");
    let (code, stderr) = node(&format!("[services.db]\nkind = \"postgres\"\n{without_bin}"));
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("services.db.postgres.bin_dir"), "{stderr}");
    let (code, stderr) = node("[services.db]\nkind = \"mysql\"\n");
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("services.db.kind"), "{stderr}");
}

/// A backup destination on a real S3-compatible server, and a node config naming it.
struct PgBackups {
    s3: crate::backup::S3Server,
    /// Holds the key and the config until the test ends.
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

impl PgBackups {
    async fn start() -> PgBackups {
        let s3 = crate::backup::S3Server::start("pg-backups").await;
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("backup.key");
        std::fs::write(&key, format!("{}\n", "ab".repeat(32))).expect("key");
        let config = dir.path().join("node.toml");
        let text = format!(
            "[backup]\ndestination = \"s3://pg-backups/east\"\nkey_file = \"{}\"\n\n[backup.s3]\nendpoint = \"{}\"\nallow_http = true\n",
            key.display(),
            s3.endpoint
        );
        std::fs::write(&config, text).expect("config");
        PgBackups { s3, _dir: dir, config }
    }

    fn config(&self) -> String {
        self.config.display().to_string()
    }

    /// `rampart ARGS` with the S3 credentials; its output, or why it failed.
    fn rampart(&self, args: &[&str]) -> Result<String, String> {
        let output = std::process::Command::new(crate::binary())
            .args(args)
            .envs(self.s3.env())
            .output()
            .expect("run rampart");
        let text = String::from_utf8_lossy(&output.stdout).to_string() + &String::from_utf8_lossy(&output.stderr);
        if output.status.success() {
            Ok(text)
        } else {
            Err(text)
        }
    }
}

/// PostgreSQL on a restored data dir, on `port`, its socket in `socket_dir`; stopped
/// (immediate) when dropped.
struct Started(String);

impl Started {
    fn on(data: &std::path::Path, socket_dir: &std::path::Path) -> Started {
        let data = data.display().to_string();
        let options = format!("-k {}", socket_dir.display());
        let log = format!("{data}.log");
        rampart_testkit::postgres::program(
            "pg_ctl",
            &["-D", &data, "-o", &options, "-l", &log, "-w", "-t", "60", "start"],
        )
        .expect("the restored data dir starts");
        Started(data)
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = rampart_testkit::postgres::program("pg_ctl", &["-D", &self.0, "-m", "immediate", "-w", "stop"]);
    }
}

/// The WAL file `lsn` lies in, once the primary `id` has archived it.
async fn wait_archived(pg: &PgCluster, id: &str, lsn: &str) {
    let file = pg
        .sql(id, &format!("SELECT pg_walfile_name('{lsn}')"))
        .expect("a WAL file name");
    let sql = "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver";
    rampart_testkit::eventually(Duration::from_secs(60), &format!("{file} archived"), || async {
        let archived = pg.sql(id, sql).ok()?;
        (archived.as_str() >= file.as_str()).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_point_in_time_restore_to_between_two_inserts_holds_exactly_the_first() {
    let backups = PgBackups::start().await;
    let options = rampart_testkit::ClusterOptions {
        nodes: 3,
        node_args: vec!["--config".into(), backups.config()],
        env: backups.s3.env(),
        ..rampart_testkit::ClusterOptions::default()
    };
    let pg = PgCluster::start_with(options, serde_json::json!({})).await;
    let primary = pg.wait_serving(|_| true).await;
    pg.sql(&primary, "CREATE TABLE t (v bigint PRIMARY KEY)")
        .expect("table");

    // The base backup, taken on the primary's node by the leader's backup.
    let manifest = pg
        .client
        .backup_create(Duration::from_secs(300))
        .await
        .expect("a backup");
    let part = manifest
        .services
        .iter()
        .find(|p| p.service == "db")
        .expect("the service's part");
    let base = part.postgres.as_ref().expect("a PostgreSQL base backup");
    assert_eq!(part.instance, primary);
    assert!(part.bytes > 1 << 20, "a whole data dir: {} bytes", part.bytes);

    // Row 1; a time after its commit (PostgreSQL's clock); row 2 strictly later.
    pg.sql(&primary, "INSERT INTO t VALUES (1)").expect("row 1");
    let between: u64 = pg
        .sql(
            &primary,
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
        )
        .expect("the time")
        .parse()
        .expect("ms");
    rampart_testkit::eventually(Duration::from_secs(10), "the clock to move on", || async {
        let now: u64 = pg
            .sql(
                &primary,
                "SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint",
            )
            .ok()?
            .parse()
            .ok()?;
        (now > between + 1).then_some(())
    })
    .await;
    pg.sql(&primary, "INSERT INTO t VALUES (2)").expect("row 2");
    let after_both = pg.sql(&primary, "SELECT pg_current_wal_lsn()").expect("lsn");
    let switched = pg.sql(&primary, "SELECT pg_switch_wal()").expect("switch");
    wait_archived(&pg, &primary, &switched).await;

    let restore = |dir: &std::path::Path, target: &[&str]| {
        let dir = dir.display().to_string();
        let port = rampart_testkit::free_port().expect("port").port().to_string();
        let config = backups.config();
        let mut args = vec![
            "backup",
            "restore-service",
            "db",
            "--config",
            &config,
            "--data-dir",
            &dir,
            "--port",
            &port,
        ];
        args.extend_from_slice(target);
        (backups.rampart(&args), port)
    };
    let rows_at = |port: &str| {
        let port = port.parse().expect("a port");
        rampart_testkit::postgres::psql(&conninfo_on(port), "SELECT string_agg(v::text, ',' ORDER BY v) FROM t")
    };
    let rows = |port: &str| rows_at(port).expect("rows");
    let scratch = tempfile::tempdir().expect("tempdir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(scratch.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");

    // To the time between the two commits: row 1 alone.
    let to_time = scratch.path().join("to-time");
    let (said, port) = restore(&to_time, &["--to-time", &between.to_string()]);
    let said = said.expect("a restore to a time");
    assert!(said.contains(&manifest.id), "{said}");
    assert!(said.contains("recovery stopping before commit"), "{said}");
    {
        let _server = Started::on(&to_time, scratch.path());
        assert_eq!(rows(&port), "1", "{said}");
    }

    // The restored data dir becomes a service again: its node starts it, the leader
    // promotes it, and a new replica copies from it.
    let mut policy = pg.policy.clone();
    policy["postgres"]["data_dir"] = serde_json::json!(scratch.path().join("{instance}"));
    let spec: PolicySpec = serde_json::from_value(policy).expect("policy");
    pg.client.service_put("db2", &spec).await.expect("service");
    let mut ports = Vec::new();
    // The restored one first (the highest priority): the others copy from it.
    for (id, node, priority) in [("to-time", 1, 200), ("copy", 2, 100)] {
        let port = rampart_testkit::free_port().expect("port").port();
        let spec = InstanceSpec {
            endpoint: format!("127.0.0.1:{port}"),
            node: Some(node),
            priority: Some(priority),
            ..InstanceSpec::default()
        };
        pg.client.instance_put("db2", id, &spec).await.expect("instance");
        ports.push(port.to_string());
    }
    rampart_testkit::eventually(
        Duration::from_secs(120),
        "db2 serving from the restored dir",
        || async {
            let view = pg.client.service("db2").await.ok()?;
            (view.primary.as_deref() == Some("to-time")).then_some(())?;
            (rows_at(&ports[0]).ok()? == "1" && rows_at(&ports[1]).ok()? == "1").then_some(())
        },
    )
    .await;

    // To a WAL position after both: both rows.
    let to_lsn = scratch.path().join("to-lsn");
    let (said, port) = restore(&to_lsn, &["--to-lsn", &after_both]);
    let said = said.expect("a restore to a position");
    {
        let _server = Started::on(&to_lsn, scratch.path());
        assert_eq!(rows(&port), "1,2", "{said}");
    }

    // A time the archive does not reach yet: refused, and nothing is left behind.
    let future = scratch.path().join("future");
    let (refused, _) = restore(&future, &["--to-time", &(between + 3_600_000).to_string()]);
    let refused = refused.expect_err("the archive ends before the target");
    assert!(
        refused.contains("recovery ended before configured recovery target was reached"),
        "{refused}"
    );
    assert!(!future.exists(), "a failed restore leaves nothing");
    // A target before the only backup ended: no backup can reach it.
    let (early, _) = restore(&future, &["--to-time", &(base.end_ms - 60_000).to_string()]);
    assert!(early.expect_err("too early").contains("ended before the target"));

    // Verification restores the base backup and replays the archive in a scratch dir.
    let verified = backups
        .rampart(&["backup", "verify", "--config", &backups.config()])
        .expect("verified");
    assert!(
        verified.contains("PostgreSQL db: restored and recovered through"),
        "{verified}"
    );
}

/// Connection string to the instance on `port` as the superuser.
fn conninfo_on(port: u16) -> String {
    conninfo(&[
        ("host", "127.0.0.1"),
        ("port", &port.to_string()),
        ("user", "postgres"),
        ("password", SUPERUSER_PASSWORD),
        ("dbname", "postgres"),
        ("connect_timeout", "2"),
    ])
}

fn sql_on(port: u16, sql: &str) -> Option<String> {
    rampart_testkit::postgres::psql(&conninfo_on(port), sql).ok()
}

/// Waits until the instance on `port` replays `value` into `t`, streaming from the instance
/// on `from` (a replica's WAL receiver names its sender).
async fn wait_streams(port: u16, from: u16, value: i64) {
    let what = format!("the instance on {port} has {value}, streaming from {from}");
    rampart_testkit::eventually(Duration::from_secs(120), &what, || async {
        let has = sql_on(port, &format!("SELECT count(*) FROM t WHERE v = {value}"))?;
        let sender = sql_on(port, "SELECT coalesce(sender_port, 0) FROM pg_stat_wal_receiver")?;
        (has == "1" && sender == from.to_string()).then_some(())
    })
    .await
}

/// Waits until the registry's primary of "db" (as `client`'s region has it) is one of
/// `ids` (id, port) and it takes writes; writes `value` there; which one it is.
async fn write_on_primary(client: &rampart_client::Client, ids: &[(&str, u16)], value: i64) -> (String, u16) {
    let what = format!("one of {ids:?} primary and writable");
    rampart_testkit::eventually(Duration::from_secs(120), &what, || async {
        let view = client.service("db").await.ok()?;
        let primary = view.primary?;
        let (id, port) = ids.iter().find(|(id, _)| *id == primary)?;
        sql_on(*port, &format!("INSERT INTO t VALUES ({value})"))?;
        Some((id.to_string(), *port))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_standby_region_cascades_from_its_lead_and_takes_over_and_back_by_region_failover() {
    let regions = crate::region_failover::east_west_judge(&[]).await;
    let (east, west) = (regions.client("east"), regions.client("west"));
    let (_dir, policy) = policy_with_passwords();
    let spec: PolicySpec = serde_json::from_value(policy).expect("policy");
    east.service_put("db", &spec).await.expect("service");
    // Two instances per region, each region's on its own (only) node; west's lead is w1.
    let mut ports = std::collections::HashMap::new();
    for (id, region, priority) in [
        ("e1", "east", 100),
        ("e2", "east", 50),
        ("w1", "west", 100),
        ("w2", "west", 50),
    ] {
        let port = rampart_testkit::free_port().expect("port").port();
        let spec = InstanceSpec {
            endpoint: format!("127.0.0.1:{port}"),
            region: Some(region.into()),
            node: Some(1),
            priority: Some(priority),
            ..InstanceSpec::default()
        };
        east.instance_put("db", id, &spec).await.expect("instance");
        ports.insert(id, port);
    }
    let port = |id: &str| ports[id];

    // East's e1 is initialized and promoted; e2 streams from it, west's lead w1 from it
    // too (through west's slot), and w2 cascades from w1.
    rampart_testkit::eventually(Duration::from_secs(120), "e1 writable", || async {
        (sql_on(port("e1"), "SELECT pg_is_in_recovery()")? == "f").then_some(())
    })
    .await;
    sql_on(port("e1"), "CREATE TABLE t (v bigint PRIMARY KEY)").expect("table");
    write_on_primary(&east, &[("e1", port("e1"))], 1).await;
    wait_streams(port("e2"), port("e1"), 1).await;
    wait_streams(port("w1"), port("e1"), 1).await;
    wait_streams(port("w2"), port("w1"), 1).await;
    let slots = sql_on(
        port("e1"),
        "SELECT string_agg(slot_name, ',' ORDER BY slot_name) FROM pg_replication_slots WHERE active",
    )
    .expect("slots");
    assert_eq!(slots, "rampart_e2,rampart_region_west", "one slot per region crossed");

    // A planned region failover: west's best instance is promoted, east follows it (its
    // old primary rewound), e2 cascading from east's new lead.
    west.regions_failover(&crate::region_failover::planned("west"))
        .await
        .expect("planned failover");
    // West's best instance (w1, unless it was not up at that moment).
    let west_pair = [("w1", port("w1")), ("w2", port("w2"))];
    let (west_primary, west_port) = write_on_primary(&west, &west_pair, 2).await;
    let west_other = if west_primary == "w1" { "w2" } else { "w1" };
    wait_streams(port(west_other), west_port, 2).await;
    wait_streams(port("e1"), west_port, 2).await;
    wait_streams(port("e2"), port("e1"), 2).await;
    for id in ["e1", "e2", west_other] {
        assert_eq!(
            sql_on(port(id), "SELECT pg_is_in_recovery()").as_deref(),
            Some("t"),
            "{id}"
        );
    }

    // And back: east's e1 is the primary again, west follows.
    east.regions_failback(&crate::region_failover::planned("east"))
        .await
        .expect("fail-back");
    let east_pair = [("e1", port("e1")), ("e2", port("e2"))];
    let (east_primary, east_port) = write_on_primary(&east, &east_pair, 3).await;
    let east_other = if east_primary == "e1" { "e2" } else { "e1" };
    wait_streams(port(east_other), east_port, 3).await;
    wait_streams(port("w1"), east_port, 3).await;
    wait_streams(port("w2"), port("w1"), 3).await;
    let rows = sql_on(port("w2"), "SELECT string_agg(v::text, ',' ORDER BY v) FROM t");
    assert_eq!(rows.as_deref(), Some("1,2,3"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_primary_keeps_the_wal_it_never_shipped_with_a_summary_of_its_transactions() {
    let pg = PgCluster::start(serde_json::json!({})).await;
    let first = pg.wait_serving(|_| true).await;
    pg.sql(
        &first,
        "CREATE TABLE t (v bigint PRIMARY KEY); INSERT INTO t VALUES (1)",
    )
    .expect("table");
    for (id, _) in &pg.instances {
        pg.wait_has(id, 1).await;
    }
    // Its WAL senders stopped, the primary commits five rows no replica receives.
    let senders: Vec<i32> = pg
        .sql(&first, "SELECT pid FROM pg_stat_replication")
        .expect("senders")
        .lines()
        .map(|pid| pid.parse().expect("a pid"))
        .collect();
    assert_eq!(senders.len(), 2, "both replicas stream");
    for pid in &senders {
        // SAFETY: kill(2) of processes this test's region started.
        unsafe {
            libc::kill(*pid, libc::SIGSTOP);
        }
    }
    for v in 100..105 {
        pg.sql(&first, &format!("INSERT INTO t VALUES ({v})"))
            .expect("committed");
    }
    let postmaster = pg.postmaster_pid(&first);
    for pid in senders.iter().chain([&postmaster]) {
        // SAFETY: as above.
        unsafe {
            libc::kill(*pid, libc::SIGKILL);
        }
    }
    let second = wait_primary_not(&pg, &first).await;
    // The old primary comes back as a replica (rewound), its five commits set aside.
    pg.wait_serving(|p| p == second).await;
    let rows = pg.sql(&second, "SELECT count(*) FROM t WHERE v >= 100").expect("rows");
    assert_eq!(rows, "0", "the five rows never left the old primary");
    // It may serve read-only a moment before it is rewound: the event says when.
    let kept = rampart_testkit::eventually(Duration::from_secs(60), "a postgres.divergence event", || async {
        let events = pg.client.events(Some("postgres"), None).await.ok()?.events;
        events
            .into_iter()
            .find(|e| e.action == "postgres.divergence" && e.detail.contains(&format!("instance={first}")))
    })
    .await;
    let dir = kept
        .outcome
        .split_once(" kept in ")
        .and_then(|(_, rest)| rest.split_once(": "))
        .map(|(dir, _)| std::path::PathBuf::from(dir))
        .expect("the directory in the event");
    let summary = std::fs::read_to_string(dir.join("summary.txt")).expect("summary.txt");
    let commits = summary
        .lines()
        .filter(|l| l.starts_with("xid ") && l.contains(": COMMIT "))
        .count();
    assert!(commits >= 5, "the five committed inserts: {summary}");
    assert!(summary.contains(&format!("diverged from {second}")), "{summary}");
    assert!(
        summary.contains(" t (1663/"),
        "relations named by the new primary: {summary}"
    );
    let wal_files = std::fs::read_dir(dir.join("wal")).expect("wal/").count();
    assert!(wal_files >= 1, "the WAL itself is kept");
    // The kept WAL reads back with pg_waldump, as the summary says.
    let dump = std::fs::read_to_string(dir.join("waldump.txt")).expect("waldump.txt");
    assert!(
        dump.lines().filter(|l| l.contains("desc: COMMIT")).count() >= 5,
        "{dump}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wal_archiving_that_cannot_store_says_so_keeps_the_wal_and_catches_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!("[backup]\ndestination = \"file://{}\"\n", store.display()),
    )
    .expect("config");
    let options = rampart_testkit::ClusterOptions {
        nodes: 3,
        node_args: vec!["--config".into(), config.display().to_string()],
        ..rampart_testkit::ClusterOptions::default()
    };
    let pg = PgCluster::start_with(options, serde_json::json!({})).await;
    let primary = pg.wait_serving(|_| true).await;
    pg.sql(
        &primary,
        "CREATE TABLE t (v bigint PRIMARY KEY); INSERT INTO t VALUES (1)",
    )
    .expect("table");
    let switched = pg.sql(&primary, "SELECT pg_switch_wal()").expect("switch");
    wait_archived(&pg, &primary, &switched).await;

    // The destination breaks: where WAL files go is a file now, not a directory.
    let wal = store.join("pg/db/wal");
    let aside = store.join("pg/db/wal.aside");
    std::fs::rename(&wal, &aside).expect("move the archive aside");
    std::fs::write(&wal, b"in the way").expect("block it");
    pg.sql(&primary, "INSERT INTO t VALUES (2)").expect("row 2");
    let blocked = pg.sql(&primary, "SELECT pg_switch_wal()").expect("switch");
    let file = pg
        .sql(&primary, &format!("SELECT pg_walfile_name('{blocked}')"))
        .expect("name");
    rampart_testkit::eventually(Duration::from_secs(60), "a postgres.archive event", || async {
        let events = pg.client.events(Some("postgres"), None).await.ok()?;
        events
            .events
            .into_iter()
            .find(|e| e.action == "postgres.archive" && e.outcome.starts_with("failed: "))
    })
    .await;
    let archived = pg
        .sql(&primary, "SELECT coalesce(last_archived_wal, '') FROM pg_stat_archiver")
        .expect("archiver");
    assert!(archived < file, "{archived} archived while the destination was broken");
    // The WAL file waits on the primary meanwhile.
    let kept = pg
        .sql(
            &primary,
            &format!("SELECT count(*) FROM pg_ls_waldir() WHERE name = '{file}'"),
        )
        .expect("pg_wal");
    assert_eq!(kept, "1", "{file} kept in pg_wal");

    // Mended: archiving catches up by itself.
    std::fs::remove_file(&wal).expect("unblock");
    std::fs::rename(&aside, &wal).expect("move the archive back");
    wait_archived(&pg, &primary, &blocked).await;
    assert!(wal.join(&file).exists(), "{file} stored at the destination");
}
