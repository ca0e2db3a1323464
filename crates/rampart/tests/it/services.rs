//! The service registry: policies and instances through the API, validation that names
//! the field, and the eligibility report.

use rampart_client::ClientError;
use rampart_core::failover::Refusal;
use rampart_core::health::Health;
use rampart_core::service::{InstanceSpec, PolicySpec};

use crate::{cluster, DEADLINE};

fn policy(json: &str) -> PolicySpec {
    serde_json::from_str(json).expect("policy shape")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_register_on_every_node_and_explain_their_eligibility() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let orders = policy(
        r#"{"checks": [{"kind": "tcp", "interval": "1s", "rise": 2, "fall": 3}],
            "max_lag_on_failover": 0, "hooks": {"on_promote": "promote.sh"}}"#,
    );
    assert!(
        client
            .service_put("orders-db", &orders)
            .await
            .expect("register")
            .created
    );
    assert!(!client.service_put("orders-db", &orders).await.expect("again").created);

    // Bad input: 400 naming the field, nothing stored.
    let bad = policy(r#"{"checks": [{"kind": "http", "interval": "soon"}]}"#);
    match client.service_put("broken", &bad).await {
        Err(ClientError::Api {
            status: 400,
            code,
            message,
            ..
        }) => {
            assert_eq!(code, "bad_policy");
            assert!(message.contains("checks[0].interval"), "{message}");
        }
        other => panic!("expected 400, got {other:?}"),
    }
    let missing = InstanceSpec {
        endpoint: "127.0.0.1:5432".into(),
        ..InstanceSpec::default()
    };
    match client.instance_put("no-such-service", "pg-1", &missing).await {
        Err(e) => assert_eq!(e.code(), Some("service_not_found")),
        Ok(_) => panic!("an instance of a missing service was stored"),
    }
    match client
        .instance_put(
            "orders-db",
            "pg-1",
            &InstanceSpec {
                endpoint: "nowhere".into(),
                ..InstanceSpec::default()
            },
        )
        .await
    {
        Err(ClientError::Api {
            status: 400, message, ..
        }) => assert!(message.contains("endpoint"), "{message}"),
        other => panic!("expected 400, got {other:?}"),
    }

    for (id, priority) in [("pg-1", 100), ("pg-2", 50), ("pg-3", 0)] {
        let spec = InstanceSpec {
            endpoint: format!("127.0.0.1:{}", 15_000 + priority),
            priority: Some(priority),
            ..InstanceSpec::default()
        };
        assert!(
            client
                .instance_put("orders-db", id, &spec)
                .await
                .expect("instance")
                .created
        );
    }
    // Every node serves the same registry.
    for id in cluster.nodes.keys().copied() {
        let node = cluster.client_of(id);
        rampart_testkit::eventually(DEADLINE, &format!("node {id} to list 3 instances"), || async {
            let view = node.service("orders-db").await.ok()?;
            (view.instances.len() == 3).then_some(())
        })
        .await;
    }
    let view = client.service("orders-db").await.expect("show");
    assert_eq!(view.primary, None);
    assert!(view.instances.iter().all(|i| i.health == Health::Unknown));

    // Nothing has been checked yet: nobody is promotable, and each says why.
    let report = client.eligibility("orders-db").await.expect("eligibility");
    assert_eq!(report.instances.len(), 3);
    for entry in &report.instances {
        assert_eq!(entry.rank, None, "{entry:?}");
        assert!(entry.reasons.contains(&Refusal::Unhealthy {
            health: Health::Unknown
        }));
    }
    let pg3 = report.instances.iter().find(|e| e.id == "pg-3").expect("pg-3");
    assert!(pg3.reasons.contains(&Refusal::NeverPromote), "priority 0 says so");

    let services = client.services().await.expect("list");
    assert_eq!(services.services.len(), 1, "the bad policy stored nothing");
    let events = client.events(Some("audit"), None).await.expect("events");
    assert!(events
        .events
        .iter()
        .any(|e| e.action == "service.put" && e.outcome == "ok"));
    assert!(events
        .events
        .iter()
        .any(|e| e.action == "instance.put" && e.outcome == "ok"));
}

/// Waits until `service`'s instance `id` has this committed health on every node.
async fn wait_health(cluster: &rampart_testkit::Cluster, service: &str, id: &str, health: Health) {
    for node in cluster.nodes.keys().copied() {
        let client = cluster.client_of(node);
        rampart_testkit::eventually(
            DEADLINE,
            &format!("{service}/{id} {health:?} on node {node}"),
            || async {
                let view = client.service(service).await.ok()?;
                let instance = view.instances.iter().find(|i| i.id == id)?;
                (instance.health == health).then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_node_seeing_an_instance_down_fails_it_only_under_confirm_any_or_as_its_only_prober() {
    let cluster = cluster(3).await;
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    // The check fails on a node when a marker file for that node exists: a stand-in for
    // one node losing its route to the instance.
    let dir = tempfile::tempdir().expect("temp dir");
    let check = format!(
        r#"test ! -e {dir}/down-$RAMPART_NODE_ID && test ! -e {dir}/down-all"#,
        dir = dir.path().display()
    );
    // One node (not the leader, which would see its own report at once) will see it down.
    let lonely = cluster
        .nodes
        .keys()
        .copied()
        .find(|id| *id != leader)
        .expect("a follower");
    // "by-one" is probed by the lonely node alone: its view is the majority of its probers.
    for (name, rule, probers) in [
        ("by-majority", "majority", None),
        ("by-any", "any", None),
        ("by-one", "majority", Some(vec![lonely])),
    ] {
        let spec = serde_json::json!({
            "confirm": rule,
            "probers": probers,
            "checks": [{"kind": "exec", "command": check, "interval": "100ms", "rise": 1, "fall": 2}],
        });
        let spec: PolicySpec = serde_json::from_value(spec).expect("policy");
        client.service_put(name, &spec).await.expect("service");
        let instance = InstanceSpec {
            endpoint: "127.0.0.1:1".into(),
            ..InstanceSpec::default()
        };
        client.instance_put(name, "i-1", &instance).await.expect("instance");
    }
    for name in ["by-majority", "by-any", "by-one"] {
        wait_health(&cluster, name, "i-1", Health::Up).await;
    }
    let on_leader = cluster.client_of(leader);
    let by_one = on_leader.service("by-one").await.expect("view");
    assert_eq!(
        by_one.instances[0].reports.keys().copied().collect::<Vec<_>>(),
        vec![lonely],
        "only the listed prober checks"
    );

    std::fs::write(dir.path().join(format!("down-{lonely}")), b"").expect("marker");
    wait_health(&cluster, "by-any", "i-1", Health::Down).await;
    wait_health(&cluster, "by-one", "i-1", Health::Down).await;
    rampart_testkit::eventually(DEADLINE, "the leader to hear the lonely node's report", || async {
        let view = on_leader.service("by-majority").await.ok()?;
        let reports = &view.instances.first()?.reports;
        (reports.get(&lonely) == Some(&Health::Down)).then_some(())
    })
    .await;
    let view = on_leader.service("by-majority").await.expect("view");
    assert_eq!(
        view.instances[0].health,
        Health::Up,
        "one node's view failed an instance under confirm = majority: {:?}",
        view.instances[0].reports
    );

    // Every node sees it down: now the majority agrees.
    std::fs::write(dir.path().join("down-all"), b"").expect("marker");
    wait_health(&cluster, "by-majority", "i-1", Health::Down).await;
    rampart_testkit::eventually(DEADLINE, "a health event for by-majority", || async {
        let events = client.events(Some("health"), None).await.ok()?;
        events
            .events
            .iter()
            .any(|e| e.action == "instance.down" && e.detail.contains("service=by-majority"))
            .then_some(())
    })
    .await;

    // And back.
    std::fs::remove_file(dir.path().join("down-all")).expect("marker");
    std::fs::remove_file(dir.path().join(format!("down-{lonely}"))).expect("marker");
    wait_health(&cluster, "by-majority", "i-1", Health::Up).await;
    wait_health(&cluster, "by-any", "i-1", Health::Up).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_from_node_config_are_registered_and_bad_ones_refused_at_start() {
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("rampart.toml");
    std::fs::write(
        &config,
        r#"
[services.orders-db]
mode = "active-passive"
checks = [{ kind = "tcp", target = "127.0.0.1:1", interval = "1s", timeout = "500ms", rise = 2, fall = 3 }]
confirm = "majority"
max_lag_on_failover = 0
hooks = { on_promote = "echo promote", on_demote = "echo demote" }
"#,
    )
    .expect("config");
    let cluster = rampart_testkit::Cluster::start(
        crate::binary(),
        rampart_testkit::ClusterOptions {
            nodes: 3,
            node_args: vec!["--config".into(), config.display().to_string()],
            ..rampart_testkit::ClusterOptions::default()
        },
    )
    .await
    .expect("cluster");
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let view = rampart_testkit::eventually(DEADLINE, "the configured service", || async {
        client.service("orders-db").await.ok()
    })
    .await;
    assert_eq!(view.policy.checks[0].interval_ms, 1000);
    assert_eq!(view.policy.hooks.on_promote.as_deref(), Some("echo promote"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[services.broken]\nchecks = [{ kind = \"http\", interval = \"often\" }]\n",
    )
    .expect("bad config");
    let out = std::process::Command::new(crate::binary())
        .args(["node", "--id", "1", "--listen", "127.0.0.1:1", "--data-dir"])
        .arg(dir.path().join("unused"))
        .arg("--config")
        .arg(&bad)
        .output()
        .expect("run node");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("services.broken.checks[0].interval"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeats_keep_an_instance_up_and_report_its_lag() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let spec: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "heartbeat", "ttl": "2s"}],
        "max_lag_on_failover": 2,
    }))
    .expect("policy");
    client.service_put("beats", &spec).await.expect("service");
    for id in ["a", "b"] {
        let instance = InstanceSpec {
            endpoint: "127.0.0.1:1".into(),
            ..InstanceSpec::default()
        };
        client.instance_put("beats", id, &instance).await.expect("instance");
    }
    // Both beat; "b" reports a lag over the policy's maximum. Beats go through any node.
    let beat = |lag_b: u64| {
        let client = cluster.client();
        async move {
            let answer = client.heartbeat("beats", "a", Some(0)).await.expect("beat");
            assert_eq!(answer.role, rampart_core::service::InstanceRole::Replica);
            client.heartbeat("beats", "b", Some(lag_b)).await.expect("beat");
        }
    };
    rampart_testkit::eventually(DEADLINE, "both up while they beat", || async {
        beat(7).await;
        let view = client.service("beats").await.ok()?;
        view.instances.iter().all(|i| i.health == Health::Up).then_some(())
    })
    .await;
    let report = client.eligibility("beats").await.expect("eligibility");
    let b = report.instances.iter().find(|e| e.id == "b").expect("b");
    assert_eq!(
        b.reasons,
        vec![Refusal::Lagging {
            lag_revisions: 7,
            lag_revisions_max: 2
        }]
    );
    let a = report.instances.iter().find(|e| e.id == "a").expect("a");
    assert_eq!(a.rank, Some(1));

    // "a" falls silent: down after its TTL, while "b" keeps beating.
    rampart_testkit::eventually(DEADLINE, "a down once it stops beating", || async {
        client.heartbeat("beats", "b", Some(0)).await.ok()?;
        let view = client.service("beats").await.ok()?;
        let health = |id: &str| view.instances.iter().find(|i| i.id == id).map(|i| i.health);
        (health("a") == Some(Health::Down) && health("b") == Some(Health::Up)).then_some(())
    })
    .await;
    // The event is committed right after the verdict.
    rampart_testkit::eventually(DEADLINE, "a health event for a", || async {
        let events = client.events(Some("health"), None).await.ok()?;
        events
            .events
            .iter()
            .any(|e| e.action == "instance.down" && e.detail.contains("instance=a"))
            .then_some(())
    })
    .await;
    let url = format!("http://{}/metrics", cluster.endpoints()[0]);
    rampart_testkit::eventually(DEADLINE, "the health gauge to show a down", || async {
        let metrics = reqwest::get(&url).await.ok()?.text().await.ok()?;
        metrics
            .contains(r#"rampart_service_instance_health{service="beats",instance="a"} 0"#)
            .then_some(())
    })
    .await;
}

/// Waits until `service` has a primary that `wanted` accepts; returns the view.
async fn wait_primary(
    client: &rampart_client::Client,
    service: &str,
    wanted: impl Fn(&str) -> bool,
) -> rampart_core::api::ServiceView {
    rampart_testkit::eventually(DEADLINE, &format!("a wanted primary of {service}"), || async {
        let view = client.service(service).await.ok()?;
        view.primary.as_deref().is_some_and(&wanted).then_some(view)
    })
    .await
}

/// A hook command appending `NAME instance role token` to `log`.
fn hook_command(log: &std::path::Path, name: &str) -> String {
    format!(
        r#"echo "{name} $RAMPART_INSTANCE $RAMPART_ROLE $RAMPART_FENCING_TOKEN" >> {}"#,
        log.display()
    )
}

/// Registers one [`FakeInstance`] per `(id, hosting node, priority)` in `service`, and
/// waits until every node sees each one up.
async fn fake_fleet(
    cluster: &rampart_testkit::Cluster,
    client: &rampart_client::Client,
    service: &str,
    members: &[(&str, Option<u64>, Option<u32>)],
) -> std::collections::BTreeMap<String, FakeInstance> {
    let mut instances = std::collections::BTreeMap::new();
    for (id, node, priority) in members {
        let fake = FakeInstance::start().await;
        let instance = InstanceSpec {
            endpoint: fake.addr.to_string(),
            node: *node,
            priority: *priority,
            ..InstanceSpec::default()
        };
        client.instance_put(service, id, &instance).await.expect("instance");
        instances.insert(id.to_string(), fake);
    }
    for (id, _, _) in members {
        wait_health(cluster, service, id, Health::Up).await;
    }
    instances
}

/// Service `db` with `spec`, a fake fleet of `members` (all up on every node), and the
/// first member made primary by a switchover, whose answer (with the token) is returned.
async fn db_with_primary(
    cluster: &rampart_testkit::Cluster,
    client: &rampart_client::Client,
    spec: &PolicySpec,
    members: &[(&str, Option<u64>, Option<u32>)],
) -> (
    std::collections::BTreeMap<String, FakeInstance>,
    rampart_core::api::SwitchoverResponse,
) {
    client.service_put("db", spec).await.expect("service");
    let instances = fake_fleet(cluster, client, "db", members).await;
    let first = client.switchover("db", members[0].0).await.expect("first primary");
    (instances, first)
}

/// Lines `hook instance role token` appended by every hook run, in order.
fn hook_log(path: &std::path::Path) -> Vec<(String, String, String, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let hook = parts.next()?.to_string();
            let instance = parts.next()?.to_string();
            let role = parts.next()?.to_string();
            let token = parts.next()?.parse().ok()?;
            Some((hook, instance, role, token))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn switchover_demotes_before_it_promotes_and_refuses_an_unfit_target() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("hooks.log");
    let hook = |name: &str| hook_command(&log, name);
    let spec: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "exec", "command": format!("test ! -e {}/down-$RAMPART_INSTANCE", dir.path().display()),
                    "interval": "100ms", "rise": 1, "fall": 1}],
        "hooks": {"on_promote": hook("promote"), "on_demote": hook("demote"), "on_role_change": hook("role_change")},
    }))
    .expect("policy");
    client.service_put("db", &spec).await.expect("service");
    for (id, node) in [("pg-1", 1), ("pg-2", 2), ("pg-3", 3)] {
        let instance = InstanceSpec {
            endpoint: format!("127.0.0.1:{}", 5430 + node),
            node: Some(node),
            ..InstanceSpec::default()
        };
        client.instance_put("db", id, &instance).await.expect("instance");
    }
    std::fs::write(dir.path().join("down-pg-3"), b"").expect("marker");
    for id in ["pg-1", "pg-2"] {
        wait_health(&cluster, "db", id, Health::Up).await;
    }
    wait_health(&cluster, "db", "pg-3", Health::Down).await;

    // The first primary.
    let first = client.switchover("db", "pg-1").await.expect("first switchover");
    assert_eq!((first.primary.as_str(), first.previous.as_deref()), ("pg-1", None));
    rampart_testkit::eventually(DEADLINE, "pg-1's promote hook", || async {
        hook_log(&log)
            .iter()
            .any(|(hook, instance, role, token)| {
                hook == "promote" && instance == "pg-1" && role == "primary" && *token == first.token
            })
            .then_some(())
    })
    .await;
    // Then a planned move; through another node, which forwards it to the leader.
    let second = cluster.client_of(3).switchover("db", "pg-2").await.expect("switchover");
    assert_eq!(second.previous.as_deref(), Some("pg-1"));
    assert!(second.token > first.token, "fencing tokens increase");
    let view = client.service("db").await.expect("view");
    assert_eq!(view.primary.as_deref(), Some("pg-2"));

    rampart_testkit::eventually(DEADLINE, "pg-2's promote and pg-1's role change hooks", || async {
        let log = hook_log(&log);
        let changed = log
            .iter()
            .any(|(hook, instance, _, token)| hook == "role_change" && instance == "pg-1" && *token == second.token);
        let promoted = log
            .iter()
            .any(|(hook, instance, _, token)| hook == "promote" && instance == "pg-2" && *token == second.token);
        (changed && promoted).then_some(log)
    })
    .await;
    let log = hook_log(&log);
    let position = |hook: &str, instance: &str, token: u64| {
        log.iter()
            .position(|(h, i, _, t)| h == hook && i == instance && *t == token)
            .unwrap_or_else(|| panic!("{hook} of {instance} for token {token} missing from {log:?}"))
    };
    assert!(position("promote", "pg-1", first.token) < position("demote", "pg-1", first.token));
    assert!(
        position("demote", "pg-1", first.token) < position("promote", "pg-2", second.token),
        "the old primary let go before the new one took over: {log:?}"
    );

    // An unhealthy target is refused with the reason, and nothing moves.
    match client.switchover("db", "pg-3").await {
        Err(ClientError::Api {
            status: 409,
            code,
            message,
            ..
        }) => {
            assert_eq!(code, "target_not_eligible");
            assert!(message.contains("unhealthy"), "{message}");
        }
        other => panic!("expected 409, got {other:?}"),
    }
    assert_eq!(
        client.service("db").await.expect("view").primary.as_deref(),
        Some("pg-2")
    );
}

/// A TCP endpoint a test can take down: a listener accepting until dropped.
struct FakeInstance {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl FakeInstance {
    async fn start() -> FakeInstance {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        FakeInstance { addr, task }
    }

    /// Like SIGKILL of the instance: the port stops answering.
    fn kill(self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_primary_is_replaced_by_the_best_replica_after_it_let_go() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("hooks.log");
    let hook = |name: &str| hook_command(&log, name);
    let spec: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "tcp", "interval": "100ms", "timeout": "100ms", "rise": 1, "fall": 2}],
        "hooks": {"on_promote": hook("promote"), "on_demote": hook("demote"), "on_role_change": hook("role_change")},
    }))
    .expect("policy");
    client.service_put("db", &spec).await.expect("service");
    let mut instances = fake_fleet(
        &cluster,
        &client,
        "db",
        &[
            ("pg-1", Some(1), Some(100)),
            ("pg-2", Some(2), Some(100)),
            ("pg-3", Some(3), Some(50)),
        ],
    )
    .await;
    let health_ha = format!("http://{}/health/ha", cluster.endpoints()[1]);
    let before = reqwest::get(&health_ha).await.expect("health/ha");
    assert_eq!(before.status(), 503, "no primary yet");
    assert!(before.text().await.expect("body").contains("db: no primary"));
    let first = client.switchover("db", "pg-1").await.expect("first primary");

    instances.remove("pg-1").expect("pg-1").kill();
    let view = wait_primary(&client, "db", |p| p != "pg-1").await;
    assert_eq!(
        view.primary.as_deref(),
        Some("pg-2"),
        "the highest priority, then the id"
    );
    assert!(view.token > first.token, "a new fencing token");
    let pg1 = view.instances.iter().find(|i| i.id == "pg-1").expect("pg-1");
    assert_eq!(pg1.role, rampart_core::service::InstanceRole::Replica);

    rampart_testkit::eventually(DEADLINE, "pg-2's promote hook", || async {
        hook_log(&log)
            .iter()
            .any(|(hook, instance, _, token)| hook == "promote" && instance == "pg-2" && *token == view.token)
            .then_some(())
    })
    .await;
    let log = hook_log(&log);
    let demoted = log
        .iter()
        .position(|(h, i, _, t)| h == "demote" && i == "pg-1" && *t == first.token)
        .unwrap_or_else(|| panic!("pg-1 never ran on_demote: {log:?}"));
    let promoted = log
        .iter()
        .position(|(h, i, _, t)| h == "promote" && i == "pg-2" && *t == view.token)
        .expect("promote");
    assert!(
        demoted < promoted,
        "the dead primary let go before the new one took over: {log:?}"
    );
    let promotions: Vec<_> = log
        .iter()
        .filter(|(h, _, _, t)| h == "promote" && *t == view.token)
        .collect();
    assert_eq!(promotions.len(), 1, "exactly one new primary: {log:?}");

    rampart_testkit::eventually(DEADLINE, "/health/ha ok again", || async {
        let status = reqwest::get(&health_ha).await.ok()?.status();
        (status == 200).then_some(())
    })
    .await;
    let metrics_url = format!("http://{}/metrics", cluster.endpoints()[0]);
    rampart_testkit::eventually(DEADLINE, "two promotions counted", || async {
        let metrics = reqwest::get(&metrics_url).await.ok()?.text().await.ok()?;
        metrics
            .contains(r#"rampart_service_primary_changes{service="db"} 2"#)
            .then_some(())
    })
    .await;
    rampart_testkit::eventually(DEADLINE, "a failover event", || async {
        let events = client.events(Some("failover"), None).await.ok()?;
        events
            .events
            .iter()
            .find(|e| e.action == "failover.promote" && e.detail.contains("to=pg-2"))
            .map(|e| assert!(e.detail.contains("from=pg-1") && e.detail.contains("detection_to_promotion_ms=")))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_primary_fences_itself_before_another_is_promoted() {
    let cluster = crate::cluster_with_relays(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("hooks.log");
    let hook = |name: &str| hook_command(&log, name);
    let spec: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "tcp", "interval": "100ms", "timeout": "100ms", "rise": 1, "fall": 2}],
        "hooks": {"on_promote": hook("promote"), "on_demote": hook("demote")},
    }))
    .expect("policy");
    let (mut instances, first) = db_with_primary(
        &cluster,
        &client,
        &spec,
        &[
            ("pg-1", Some(1), None),
            ("pg-2", Some(2), None),
            ("pg-3", Some(3), None),
        ],
    )
    .await;
    rampart_testkit::eventually(DEADLINE, "pg-1 promoted", || async {
        hook_log(&log)
            .iter()
            .any(|(h, i, _, t)| h == "promote" && i == "pg-1" && *t == first.token)
            .then_some(())
    })
    .await;

    // Node 1, which hosts the primary, is cut off from the others, and the instance dies.
    cluster.isolate(1, rampart_testkit::RelayMode::Drop);
    instances.remove("pg-1").expect("pg-1").kill();
    let majority: Vec<String> = [2u64, 3].iter().map(|id| cluster.nodes[id].endpoint()).collect();
    let on_majority = cluster.client_with_token(&majority, None);
    let view = wait_primary(&on_majority, "db", |p| p != "pg-1").await;
    assert!(view.token > first.token);
    let new_primary = view.primary.clone().expect("primary");
    rampart_testkit::eventually(DEADLINE, "the new primary's promote hook", || async {
        hook_log(&log)
            .iter()
            .any(|(h, i, _, t)| h == "promote" && *i == new_primary && *t == view.token)
            .then_some(())
    })
    .await;
    let log = hook_log(&log);
    let fenced = log
        .iter()
        .position(|(h, i, _, t)| h == "demote" && i == "pg-1" && *t == first.token)
        .unwrap_or_else(|| panic!("the cut-off node never fenced pg-1: {log:?}"));
    let promoted = log
        .iter()
        .position(|(h, i, _, t)| h == "promote" && *i == new_primary && *t == view.token)
        .expect("promote");
    assert!(
        fenced < promoted,
        "the cut-off primary was still primary when another was promoted: {log:?}"
    );
    cluster.heal();
}

/// A webhook receiver: answers 500 to its first `failures` requests, then 200, and keeps
/// every body it was sent.
async fn webhook_receiver(failures: usize) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}/alerts", listener.local_addr().expect("addr"));
    let bodies = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = bodies.clone();
    tokio::spawn(async move {
        let mut served = 0usize;
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then as many body bytes as Content-Length says.
            let body = loop {
                let Ok(n) = stream.read(&mut buf).await else { break None };
                if n == 0 {
                    break None;
                }
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).to_string();
                let Some(end) = text.find("\r\n\r\n") else { continue };
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        l.to_ascii_lowercase()
                            .strip_prefix("content-length:")
                            .map(|v| v.trim().to_string())
                    })
                    .and_then(|v| v.parse::<usize>().ok())
                    .unwrap_or(0);
                if request.len() >= end + 4 + length {
                    break Some(String::from_utf8_lossy(&request[end + 4..end + 4 + length]).to_string());
                }
            };
            let Some(body) = body else { continue };
            served += 1;
            let status = if served <= failures {
                "500 Internal Server Error"
            } else {
                "200 OK"
            };
            if served > failures {
                seen.lock().expect("bodies").push(body);
            }
            let answer = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            let _ = stream.write_all(answer.as_bytes()).await;
        }
    });
    (url, bodies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alerts_reach_a_flaky_webhook_without_holding_up_failover() {
    let (url, bodies) = webhook_receiver(3).await;
    let cluster = rampart_testkit::Cluster::start(
        crate::binary(),
        rampart_testkit::ClusterOptions {
            nodes: 3,
            node_args: vec!["--alert-webhooks".into(), url],
            ..rampart_testkit::ClusterOptions::default()
        },
    )
    .await
    .expect("cluster");
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let spec: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "tcp", "interval": "100ms", "timeout": "100ms", "rise": 1, "fall": 2}],
    }))
    .expect("policy");
    let (mut instances, _) =
        db_with_primary(&cluster, &client, &spec, &[("a", Some(1), None), ("b", Some(2), None)]).await;
    instances.remove("a").expect("a").kill();
    // The receiver fails its first three requests: failover does not wait for it.
    wait_primary(&client, "db", |p| p == "b").await;
    rampart_testkit::eventually(DEADLINE, "the alerts, after retries", || async {
        let bodies = bodies.lock().expect("bodies").clone();
        let has = |needle: &str| bodies.iter().any(|b| b.contains(needle));
        (has(r#""action":"instance.down""#) && has(r#""action":"failover.promote""#)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn active_active_serves_every_healthy_instance() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let spec: PolicySpec = serde_json::from_value(serde_json::json!({
        "mode": "active-active",
        "checks": [{"kind": "tcp", "interval": "100ms", "timeout": "100ms", "rise": 1, "fall": 2}],
    }))
    .expect("policy");
    client.service_put("api", &spec).await.expect("service");
    let mut instances = std::collections::BTreeMap::new();
    for id in ["a", "b"] {
        let fake = FakeInstance::start().await;
        let instance = InstanceSpec {
            endpoint: fake.addr.to_string(),
            ..InstanceSpec::default()
        };
        client.instance_put("api", id, &instance).await.expect("instance");
        instances.insert(id, fake);
    }
    let serving = |want: Vec<&'static str>| {
        let client = cluster.client();
        async move {
            rampart_testkit::eventually(DEADLINE, &format!("serving {want:?}"), || async {
                let view = client.service("api").await.ok()?;
                (view.serving == want).then_some(view)
            })
            .await
        }
    };
    let view = serving(vec!["a", "b"]).await;
    assert_eq!(view.primary, None, "active-active has no primary");
    instances.remove("a").expect("a").kill();
    serving(vec!["b"]).await;
    match client.switchover("api", "b").await {
        Err(e) => assert_eq!(e.code(), Some("not_active_passive")),
        Ok(_) => panic!("an active-active service got a primary"),
    }
}

/// The pids a test instance appended to `path`, one per start.
fn pids_in(path: &std::path::Path) -> Vec<i32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_supervised_instance_is_restarted_within_its_budget_then_left_down() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().expect("temp dir");
    let pids = dir.path().join("pids");
    let spec: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "exec", "command": format!("kill -0 $(tail -n1 {})", pids.display()),
                    "interval": "100ms", "rise": 1, "fall": 3}],
        "recovery": {"action": "restart", "max_retries": 2, "window": "1m"},
    }))
    .expect("policy");
    client.service_put("worker", &spec).await.expect("service");
    let instance = InstanceSpec {
        endpoint: "127.0.0.1:1".into(),
        node: Some(1),
        command: Some(format!("echo $$ >> {}; exec sleep 600", pids.display())),
        ..InstanceSpec::default()
    };
    client.instance_put("worker", "w-1", &instance).await.expect("instance");
    let read_pids = || pids_in(&pids);
    // SAFETY: signal 0 only checks that the process exists.
    let alive = |pid: i32| unsafe { libc::kill(pid, 0) } == 0;
    wait_health(&cluster, "worker", "w-1", Health::Up).await;

    // Two crashes are repaired; the third exhausts the budget of 2.
    for crash in 1..=3usize {
        let pid = *read_pids().last().expect("a started instance");
        // SAFETY: the instance's own process, started for this test by its node.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
        if crash <= 2 {
            rampart_testkit::eventually(DEADLINE, &format!("restart {crash}"), || async {
                let pids = read_pids();
                (pids.len() == crash + 1 && alive(*pids.last()?)).then_some(())
            })
            .await;
        }
    }
    wait_health(&cluster, "worker", "w-1", Health::Down).await;
    assert_eq!(read_pids().len(), 3, "no start beyond the budget");
    rampart_testkit::eventually(DEADLINE, "supervision events", || async {
        let events = client.events(Some("supervision"), None).await.ok()?;
        let count = |action: &str| events.events.iter().filter(|e| e.action == action).count();
        (count("instance.restart") == 2 && count("instance.gave_up") == 1).then_some(())
    })
    .await;

    // Registered again with another command, it starts afresh; deregistered, it is stopped.
    let fresh = InstanceSpec {
        command: Some(format!("echo $$ >> {}; exec sleep 601", pids.display())),
        ..instance
    };
    client.instance_put("worker", "w-1", &fresh).await.expect("instance");
    rampart_testkit::eventually(DEADLINE, "a fresh start", || async {
        let pids = read_pids();
        (pids.len() == 4 && alive(*pids.last()?)).then_some(())
    })
    .await;
    let last = *read_pids().last().expect("pid");
    let deleted: serde_json::Value = reqwest::Client::new()
        .delete(format!(
            "http://{}/v1/services/worker/instances/w-1",
            cluster.nodes[&1].endpoint()
        ))
        .send()
        .await
        .expect("delete")
        .json()
        .await
        .expect("json");
    assert_eq!(deleted["deleted"], "w-1");
    rampart_testkit::eventually(DEADLINE, "the deregistered instance stopped", || async {
        (!alive(last)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crashed_primary_is_restarted_in_place_before_it_is_failed_over() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().expect("temp dir");
    // Each instance writes its pid only once it is "up", 1.5 s after a start: far longer
    // than its checks take to call it down (2 failures 200 ms apart).
    let spec: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "exec",
                    "command": format!("kill -0 $(tail -n1 {}/$RAMPART_INSTANCE)", dir.path().display()),
                    "interval": "200ms", "timeout": "150ms", "rise": 1, "fall": 2}],
        "recovery": {"action": "restart", "max_retries": 1, "window": "1m", "start_timeout": "20s"},
    }))
    .expect("policy");
    client.service_put("db", &spec).await.expect("service");
    for (id, node) in [("w-1", 1), ("w-2", 2)] {
        let instance = InstanceSpec {
            endpoint: "127.0.0.1:1".into(),
            node: Some(node),
            command: Some(format!(
                "sleep 1.5; echo $$ >> {}/{id}; exec sleep 600",
                dir.path().display()
            )),
            ..InstanceSpec::default()
        };
        client.instance_put("db", id, &instance).await.expect("instance");
    }
    let pids = |id: &str| pids_in(&dir.path().join(id));
    let crash = |id: &str| {
        let pid = *pids(id).last().expect("a started instance");
        // SAFETY: the instance's own process, started for this test by its node.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    };
    wait_health(&cluster, "db", "w-1", Health::Up).await;
    wait_health(&cluster, "db", "w-2", Health::Up).await;
    client.switchover("db", "w-1").await.expect("first primary");
    let token = wait_primary(&client, "db", |p| p == "w-1").await.token;
    let failover_events = |action: &'static str| {
        let client = &client;
        async move {
            let events = client.events(Some("failover"), None).await.expect("events");
            events.events.iter().filter(|e| e.action == action).count()
        }
    };

    // Within the budget: called down, restarted in place, back up, still the primary.
    crash("w-1");
    wait_health(&cluster, "db", "w-1", Health::Down).await;
    rampart_testkit::eventually(DEADLINE, "the restarted w-1 up again", || async {
        (pids("w-1").len() == 2).then_some(())
    })
    .await;
    wait_health(&cluster, "db", "w-1", Health::Up).await;
    let view = client.service("db").await.expect("view");
    assert_eq!(view.primary.as_deref(), Some("w-1"), "restarted, not failed over");
    assert_eq!(view.token, token, "the same term");
    assert_eq!(failover_events("failover.promote").await, 0);
    assert_eq!(failover_events("failover.deferred").await, 1, "the wait is explained");

    // Past the budget: the node gives up and says so; failover follows.
    crash("w-1");
    let view = wait_primary(&client, "db", |p| p == "w-2").await;
    assert!(view.token > token, "a new term");
    assert_eq!(pids("w-1").len(), 2, "no restart beyond the budget");
    // The event follows the promotion's commit.
    rampart_testkit::eventually(DEADLINE, "the failover event", || async {
        (failover_events("failover.promote").await == 1).then_some(())
    })
    .await;
}

/// GET on a sample service, as JSON.
async fn sample_json(addr: &str, path: &str) -> Option<serde_json::Value> {
    reqwest::get(format!("http://{addr}{path}"))
        .await
        .ok()?
        .json()
        .await
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sample_service_switchover_and_failover_keep_acknowledged_writes() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let spec: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "heartbeat", "ttl": "1s"}],
        "max_lag_on_failover": 0,
    }))
    .expect("policy");
    client.service_put("kv", &spec).await.expect("service");
    let endpoints = cluster.endpoints().join(",");
    let mut addrs = std::collections::BTreeMap::new();
    for node in 1..=3u64 {
        let id = format!("s-{node}");
        let addr = rampart_testkit::cluster::free_port().expect("port").to_string();
        let command = format!(
            "exec {} --endpoints {endpoints} sample-service --listen {addr} --service kv --instance {id} --heartbeat 100ms",
            crate::binary()
        );
        let instance = InstanceSpec {
            endpoint: addr.clone(),
            node: Some(node),
            command: Some(command),
            ..InstanceSpec::default()
        };
        client.instance_put("kv", &id, &instance).await.expect("instance");
        addrs.insert(id, addr);
    }
    for id in addrs.keys() {
        wait_health(&cluster, "kv", id, Health::Up).await;
    }
    let writable = |id: &str| {
        let addr = addrs[id].clone();
        async move {
            rampart_testkit::eventually(DEADLINE, "a writable primary", || async {
                let health = sample_json(&addr, "/health").await?;
                (health["writable"] == true).then_some(health)
            })
            .await
        }
    };
    let write = |id: &str, key: String| {
        let addr = addrs[id].clone();
        async move {
            let response = reqwest::Client::new()
                .put(format!("http://{addr}/kv/{key}"))
                .body(format!("value of {key}"))
                .send()
                .await
                .expect("write");
            response.status().is_success()
        }
    };
    let caught_up = |ids: Vec<&'static str>, seq: u64| {
        let addrs = addrs.clone();
        async move {
            for id in ids {
                let addr = addrs[id].clone();
                rampart_testkit::eventually(DEADLINE, &format!("{id} at seq {seq}"), || async {
                    let health = sample_json(&addr, "/health").await?;
                    (health["seq"].as_u64()? >= seq).then_some(())
                })
                .await;
            }
        }
    };

    client.switchover("kv", "s-1").await.expect("first primary");
    writable("s-1").await;
    let mut acknowledged = Vec::new();
    for i in 0..50 {
        let key = format!("k{i}");
        assert!(write("s-1", key.clone()).await, "the primary takes writes");
        acknowledged.push(key);
    }
    assert!(!write("s-2", "nope".into()).await, "a replica refuses writes");
    caught_up(vec!["s-2", "s-3"], 50).await;

    // Planned: every acknowledged write is on the new primary.
    client.switchover("kv", "s-2").await.expect("switchover");
    writable("s-2").await;
    for key in &acknowledged {
        let value = reqwest::get(format!("http://{}/kv/{key}", addrs["s-2"]))
            .await
            .expect("read")
            .text()
            .await
            .expect("text");
        assert_eq!(value, format!("value of {key}"), "{key} lost in the switchover");
    }
    for i in 50..80 {
        let key = format!("k{i}");
        assert!(write("s-2", key.clone()).await);
        acknowledged.push(key);
    }
    caught_up(vec!["s-1", "s-3"], 80).await;

    // Unplanned: the primary's process dies; a caught-up replica takes over.
    let pid = sample_json(&addrs["s-2"], "/health").await.expect("health")["pid"]
        .as_i64()
        .expect("pid") as i32;
    // SAFETY: the sample service process this test registered, started by its node.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let view = wait_primary(&client, "kv", |p| p != "s-2").await;
    let new_primary = view.primary.expect("primary");
    writable(&new_primary).await;
    for key in &acknowledged {
        let value = reqwest::get(format!("http://{}/kv/{key}", addrs[&new_primary]))
            .await
            .expect("read")
            .text()
            .await
            .expect("text");
        assert_eq!(value, format!("value of {key}"), "{key} lost in the failover");
    }
    assert!(
        write(&new_primary, "after".into()).await,
        "the new primary takes writes"
    );
}

impl FakeInstance {
    /// Brings an instance back on the same address.
    async fn restart_at(addr: std::net::SocketAddr) -> FakeInstance {
        let listener = rampart_testkit::eventually(DEADLINE, "the port to be free again", || async {
            tokio::net::TcpListener::bind(addr).await.ok()
        })
        .await;
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        FakeInstance { addr, task }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ten_primary_kills_never_leave_two_primaries_at_once() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("hooks.log");
    let hook = |name: &str| {
        format!(
            r#"echo "{name} $RAMPART_INSTANCE $RAMPART_FENCING_TOKEN $(date +%s%N)" >> {}"#,
            log.display()
        )
    };
    let spec: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "tcp", "interval": "100ms", "timeout": "100ms", "rise": 1, "fall": 2}],
        "hooks": {"on_promote": hook("promote"), "on_demote": hook("demote")},
        // Ten kills among three instances: damping would (rightly) stop the experiment.
        "flap_damping": {"max_losses": 0, "window": "1m"},
    }))
    .expect("policy");
    let (mut instances, first) = db_with_primary(
        &cluster,
        &client,
        &spec,
        &[
            ("pg-1", Some(1), None),
            ("pg-2", Some(2), None),
            ("pg-3", Some(3), None),
        ],
    )
    .await;
    let mut token = first.token;
    let mut primary = "pg-1".to_string();
    for round in 1..=10 {
        let fake = instances.remove(&primary).expect("the primary's instance");
        let addr = fake.addr;
        fake.kill();
        let view = wait_primary(&client, "db", |p| p != primary).await;
        assert!(
            view.token > token,
            "round {round}: the token went from {token} to {}",
            view.token
        );
        token = view.token;
        let old = std::mem::replace(&mut primary, view.primary.expect("primary"));
        instances.insert(old.clone(), FakeInstance::restart_at(addr).await);
        wait_health(&cluster, "db", &old, Health::Up).await;
    }

    // The history: each token's primary term runs from its on_promote to its on_demote.
    let final_token = token;
    rampart_testkit::eventually(DEADLINE, "the last promote hook", || async {
        std::fs::read_to_string(&log)
            .ok()?
            .contains(&format!(" {final_token} "))
            .then_some(())
    })
    .await;
    let text = std::fs::read_to_string(&log).expect("hook log");
    let mut terms: std::collections::BTreeMap<u64, (Option<u128>, Option<u128>)> = Default::default();
    for line in text.lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [hook, _instance, token, at] = parts[..] else {
            continue;
        };
        let (Ok(token), Ok(at)) = (token.parse::<u64>(), at.parse::<u128>()) else {
            continue;
        };
        let term = terms.entry(token).or_default();
        match hook {
            "promote" => term.0 = Some(at),
            "demote" => term.1 = Some(term.1.map_or(at, |t: u128| t.min(at))),
            _ => {}
        }
    }
    assert_eq!(terms.len(), 11, "eleven primary terms: {text}");
    let ordered: Vec<(u64, u128, Option<u128>)> = terms
        .iter()
        .map(|(token, (start, end))| {
            (
                *token,
                start.unwrap_or_else(|| panic!("no promote for {token}: {text}")),
                *end,
            )
        })
        .collect();
    for pair in ordered.windows(2) {
        let (token, _, end) = pair[0];
        let (next, next_start, _) = pair[1];
        let end = end.unwrap_or_else(|| panic!("term {token} never ended before {next}: {text}"));
        assert!(end <= next_start, "terms {token} and {next} overlap: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_promotion_whose_hook_times_out_passes_to_the_next_candidate() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    // pg-2 comes first by priority, but its on_promote hangs past the hook timeout.
    let spec: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "tcp", "interval": "100ms", "timeout": "100ms", "rise": 1, "fall": 2}],
        "hooks": {"on_promote": r#"if [ "$RAMPART_INSTANCE" = pg-2 ]; then sleep 5; fi"#, "timeout": "300ms"},
    }))
    .expect("policy");
    let (mut instances, _) = db_with_primary(
        &cluster,
        &client,
        &spec,
        &[
            ("pg-1", Some(1), Some(100)),
            ("pg-2", Some(2), Some(90)),
            ("pg-3", Some(3), Some(80)),
        ],
    )
    .await;
    instances.remove("pg-1").expect("pg-1").kill();
    // pg-2's hook timed out: pg-3 is next.
    wait_primary(&client, "db", |p| p == "pg-3").await;
    rampart_testkit::eventually(DEADLINE, "the failed hook event", || async {
        let events = client.events(Some("hook"), None).await.ok()?;
        events
            .events
            .iter()
            .any(|e| e.action == "on_promote" && e.outcome.contains("timed out") && e.detail.contains("instance=pg-2"))
            .then_some(())
    })
    .await;
    let report = client.eligibility("db").await.expect("eligibility");
    let pg2 = report.instances.iter().find(|e| e.id == "pg-2").expect("pg-2");
    assert!(pg2.reasons.contains(&Refusal::Fenced), "{pg2:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_instance_that_just_lost_the_role_is_not_promoted_again_while_damped() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let spec: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "tcp", "interval": "100ms", "timeout": "100ms", "rise": 1, "fall": 2}],
        "flap_damping": {"max_losses": 1, "window": "10m"},
    }))
    .expect("policy");
    let (mut instances, _) = db_with_primary(
        &cluster,
        &client,
        &spec,
        &[
            ("pg-1", Some(1), Some(100)),
            ("pg-2", Some(2), Some(90)),
            ("pg-3", Some(3), Some(80)),
        ],
    )
    .await;
    let client_ref = &client;
    let primary_is = |want: &'static str| wait_primary(client_ref, "db", move |p| p == want);
    // pg-1 dies and comes back: it lost the role once, its whole allowance in the window.
    let fake = instances.remove("pg-1").expect("pg-1");
    let addr = fake.addr;
    fake.kill();
    primary_is("pg-2").await;
    instances.insert("pg-1".into(), FakeInstance::restart_at(addr).await);
    wait_health(&cluster, "db", "pg-1", Health::Up).await;
    // pg-2 dies: pg-1 has the highest priority but is damped, so pg-3 takes over.
    instances.remove("pg-2").expect("pg-2").kill();
    primary_is("pg-3").await;
    let report = client.eligibility("db").await.expect("eligibility");
    let pg1 = report.instances.iter().find(|e| e.id == "pg-1").expect("pg-1");
    assert!(pg1.reasons.contains(&Refusal::Damped), "{pg1:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_that_is_not_ready_leaves_traffic_but_keeps_its_role() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let dir = tempfile::tempdir().expect("temp dir");
    let spec: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [
            {"kind": "tcp", "interval": "100ms", "timeout": "100ms", "rise": 1, "fall": 2, "purpose": "liveness"},
            {"kind": "exec", "command": format!("test ! -e {}/unready-$RAMPART_INSTANCE", dir.path().display()),
             "interval": "100ms", "rise": 1, "fall": 2, "purpose": "readiness"},
        ],
    }))
    .expect("policy");
    let (_instances, _) = db_with_primary(
        &cluster,
        &client,
        &spec,
        &[("pg-1", Some(1), None), ("pg-2", Some(2), None)],
    )
    .await;
    let serving = |want: Vec<&'static str>| {
        let client = cluster.client();
        async move {
            rampart_testkit::eventually(DEADLINE, &format!("serving {want:?}"), || async {
                let view = client.service("db").await.ok()?;
                (view.serving == want).then_some(view)
            })
            .await
        }
    };
    serving(vec!["pg-1", "pg-2"]).await;
    std::fs::write(dir.path().join("unready-pg-1"), b"").expect("marker");
    let view = serving(vec!["pg-2"]).await;
    assert_eq!(
        view.primary.as_deref(),
        Some("pg-1"),
        "readiness alone never fails a primary over"
    );
    let pg1 = view.instances.iter().find(|i| i.id == "pg-1").expect("pg-1");
    assert_eq!((pg1.health, pg1.ready), (Health::Up, Health::Down));
    std::fs::remove_file(dir.path().join("unready-pg-1")).expect("marker");
    serving(vec!["pg-1", "pg-2"]).await;
}

/// A registration is a shipped write (the revision moves, the local part does not); an
/// instance's health verdict is region-local (the local revision moves, the shipped
/// revision and checksum do not); both are equal on every node.
#[tokio::test]
async fn registrations_move_the_shipped_revision_and_verdicts_the_local_one() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    cluster.wait_converged(DEADLINE).await;
    let client = cluster.client();
    let before = client.cluster().await.expect("status");

    let quick = policy(r#"{"checks": [{"kind": "tcp", "interval": "100ms", "rise": 1, "fall": 1}]}"#);
    client.service_put("split", &quick).await.expect("register");
    let closed = rampart_testkit::free_port().expect("a port nobody serves");
    let instance = InstanceSpec {
        endpoint: closed.to_string(),
        ..InstanceSpec::default()
    };
    client.instance_put("split", "i-1", &instance).await.expect("register");
    let registered = client.cluster().await.expect("status");
    assert_eq!(registered.revision, before.revision + 2, "two registry writes");
    assert_ne!(registered.checksum, before.checksum);

    rampart_testkit::eventually(DEADLINE, "the instance's verdict: down", || async {
        let view = client.service("split").await.ok()?;
        (view.instances[0].health == Health::Down).then_some(())
    })
    .await;
    let judged = client.cluster().await.expect("status");
    assert_eq!(
        (judged.revision, &judged.checksum),
        (registered.revision, &registered.checksum),
        "a verdict is not a shipped write"
    );
    assert!(judged.local_revision > registered.local_revision);
    assert_ne!(judged.local_checksum, registered.local_checksum);
    cluster.wait_converged(DEADLINE).await;
}
