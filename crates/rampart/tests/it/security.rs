//! Security: TLS everywhere, peers authenticated by the cluster CA, tokens with roles, and
//! safe defaults. Every test runs a real TLS region and ends by checking that no token or
//! key material reached a node log or the event log.

use std::sync::Arc;

use rampart_client::{ClientError, PutOptions, TlsOptions};
use rampart_core::api::TokenCreateRequest;
use rampart_core::auth::Role;
use rampart_testkit::{eventually, final_state, Cluster, ClusterOptions, Workload};

use crate::{binary, DEADLINE};

async fn tls_cluster(nodes: usize) -> Cluster {
    let cluster = Cluster::start(
        binary(),
        ClusterOptions {
            nodes,
            tls: true,
            ..ClusterOptions::default()
        },
    )
    .await
    .expect("start TLS cluster");
    // The token file first: status polls without a token would be refused and counted
    // against 127.0.0.1 by the failure limiter.
    eventually(DEADLINE, "the bootstrap admin token", || async {
        cluster.admin_token()
    })
    .await;
    cluster.wait_for_leader(DEADLINE).await;
    cluster
}

async fn create_token(cluster: &Cluster, name: &str, role: Role, prefixes: &[&str]) -> String {
    let request = TokenCreateRequest {
        name: name.to_string(),
        role,
        prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
    };
    cluster
        .client()
        .token_create(&request)
        .await
        .expect("create token")
        .token
}

fn secret_of(token: &str) -> String {
    token.split_once('.').expect("NAME.SECRET").1.to_string()
}

/// Refused for want of a valid token: 401, or 429 once this source (every test runs on
/// 127.0.0.1) has failed too often.
fn unauthenticated(error: &ClientError) -> bool {
    matches!(status_of(error), Some(401)) || error.code() == Some("too_many_auth_failures")
}

fn status_of(error: &ClientError) -> Option<u16> {
    match error {
        ClientError::Api { status, .. } => Some(*status),
        _ => None,
    }
}

/// A scrape of node `id`'s `/metrics` over TLS.
pub(crate) async fn metrics_of(cluster: &Cluster, id: u64) -> String {
    let ca = std::fs::read(cluster.certs_dir().join("ca.pem")).expect("ca.pem");
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).expect("CA"))
        .build()
        .expect("client");
    let url = format!("https://{}/metrics", cluster.nodes[&id].endpoint());
    http.get(url).send().await.expect("scrape").text().await.expect("text")
}

pub(crate) fn counter(metrics: &str, reason: &str) -> u64 {
    let needle = format!("rampart_auth_failures_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_need_the_right_role_and_a_revoke_reaches_every_node() {
    let mut cluster = tls_cluster(3).await;
    let endpoints = cluster.endpoints();
    let admin = cluster.client();
    admin
        .put("app/a", "1", PutOptions::default())
        .await
        .expect("admin writes");

    // Owner-only files: every data dir, and the bootstrap token.
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &std::path::Path| std::fs::metadata(path).expect("exists").permissions().mode() & 0o777;
    for node in cluster.nodes.values() {
        assert_eq!(mode(&node.data_dir), 0o700, "{}", node.data_dir.display());
        let token_file = node.data_dir.join("admin.token");
        if token_file.exists() {
            assert_eq!(mode(&token_file), 0o600);
        }
    }

    // No token: 401, on a follower as on the leader.
    for (id, node) in &cluster.nodes {
        let anonymous = cluster.client_with_token(&[node.endpoint()], None);
        let error = anonymous.get_key("app/a", true).await.expect_err("no token");
        assert_eq!(status_of(&error), Some(401), "node {id}: {error}");
    }

    // A read token: reads pass, writes get 403 naming the role needed, and its prefix holds.
    let reader = create_token(&cluster, "reader", Role::Read, &["app/"]).await;
    let as_reader = cluster.client_with_token(&endpoints, Some(&reader));
    assert_eq!(
        as_reader.get_key("app/a", false).await.expect("read").unwrap().value,
        "1"
    );
    let error = as_reader
        .put("app/a", "2", PutOptions::default())
        .await
        .expect_err("a reader cannot write");
    assert_eq!(status_of(&error), Some(403));
    assert!(error.to_string().contains("role write"), "{error}");
    let error = as_reader.range("", false).await.expect_err("outside the prefix");
    assert_eq!(status_of(&error), Some(403));
    let error = as_reader.tokens().await.expect_err("tokens need admin");
    assert!(error.to_string().contains("role admin"), "{error}");

    // A write token survives the leader's death: it lives in the replicated state.
    let writer = create_token(&cluster, "writer", Role::Write, &[]).await;
    let leader = cluster.wait_for_leader(DEADLINE).await;
    cluster.kill(leader);
    let new_leader = cluster.wait_for_leader(DEADLINE).await;
    assert_ne!(new_leader, leader);
    let survivors: Vec<String> = cluster
        .nodes
        .values()
        .filter(|n| n.is_running())
        .map(|n| n.endpoint())
        .collect();
    let as_writer = cluster.client_with_token(&survivors, Some(&writer));
    as_writer
        .put("app/b", "after the kill", PutOptions::default())
        .await
        .expect("the write token works under the new leader");

    // Revoked: refused by every node, each answering from its own state.
    cluster.restart(leader).expect("restart");
    cluster.wait_converged(DEADLINE).await;
    let mut watch = cluster
        .client_with_token(&cluster.endpoints(), Some(&writer))
        .watch("app/", None);
    cluster.client().token_revoke("writer").await.expect("revoke");
    for (id, node) in &cluster.nodes {
        let only_this = cluster.client_with_token(&[node.endpoint()], Some(&writer));
        eventually(DEADLINE, &format!("node {id} to refuse the revoked token"), || async {
            let answer = only_this.get_key("app/b", true).await;
            matches!(answer, Err(ref e) if unauthenticated(e)).then_some(())
        })
        .await;
    }

    // A watch opened before the revoke ends instead of delivering new changes.
    cluster
        .client()
        .put("app/c", "after the revoke", PutOptions::default())
        .await
        .expect("admin writes");
    let ended = tokio::time::timeout(DEADLINE, watch.next())
        .await
        .expect("the watch ends");
    match ended {
        Some(Err(e)) => assert!(unauthenticated(&e), "{e}"),
        other => panic!("a revoked token's watch delivered {other:?}"),
    }

    // The audit trail names who did what, from where.
    let events = cluster.client().events(Some("audit"), None).await.expect("events");
    let actions: Vec<(&str, &str, &str)> = events
        .events
        .iter()
        .map(|e| (e.action.as_str(), e.actor.as_str(), e.outcome.as_str()))
        .collect();
    for expected in [
        ("token.bootstrap", "-", "ok"),
        ("token.create", "admin", "ok"),
        ("token.revoke", "admin", "ok"),
    ] {
        assert!(actions.contains(&expected), "{expected:?} missing from {actions:?}");
    }
    assert!(events
        .events
        .iter()
        .filter(|e| e.action == "token.create")
        .all(|e| e.source.starts_with("127.0.0.1:")));

    // Break glass: a node certificate without a token acts as admin; a client certificate
    // does not.
    let with_cert = |stem: &str| TlsOptions {
        ca: cluster.certs_dir().join("ca.pem"),
        cert: Some(cluster.certs_dir().join(format!("{stem}.pem"))),
        key: Some(cluster.certs_dir().join(format!("{stem}-key.pem"))),
    };
    let as_node = rampart_client::Client::secured(&endpoints, Some(&with_cert("node-1")), None).expect("client");
    let rescue = as_node
        .token_create(&TokenCreateRequest {
            name: "rescue".into(),
            role: Role::Admin,
            prefixes: vec![],
        })
        .await
        .expect("a node certificate may mint an admin token");
    let as_client = rampart_client::Client::secured(&endpoints, Some(&with_cert("client")), None).expect("client");
    let error = as_client
        .tokens()
        .await
        .expect_err("a client certificate is not a token");
    assert!(unauthenticated(&error), "{error}");

    // Refusals are counted, by reason, on the node that refused (counters restart with the
    // process, so measure around one refusal).
    let (first_id, first_node) = cluster.nodes.iter().next().expect("a node");
    // All of this test's calls come from 127.0.0.1: a refusal may be the rate limiter's.
    let refusals = |m: &str| counter(m, "missing_token") + counter(m, "rate_limited");
    let before = refusals(&metrics_of(&cluster, *first_id).await);
    let anonymous = cluster.client_with_token(&[first_node.endpoint()], None);
    let _ = anonymous.get_key("app/a", true).await.expect_err("no token");
    let after = refusals(&metrics_of(&cluster, *first_id).await);
    assert_eq!(after, before + 1, "rampart_auth_failures_total counts the refusal");
    cluster
        .assert_no_secrets_leaked(&[secret_of(&reader), secret_of(&writer), secret_of(&rescue.token)])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_without_a_node_certificate_cannot_join_or_disturb_the_region() {
    let cluster = tls_cluster(3).await;
    let before = cluster.client().cluster().await.expect("status");

    // Outsider 1: a whole other CA. Outsider 2: our CA's *client* certificate, which may
    // call the API but must not speak Raft.
    let rogue_dir = cluster.base_dir().join("rogue-certs");
    let out = std::process::Command::new(binary())
        .args(["certs", "init", "--nodes", "4", "--dir"])
        .arg(&rogue_dir)
        .output()
        .expect("certs init");
    assert!(out.status.success());
    let certs = cluster.certs_dir();
    let foreign = cluster
        .start_outsider(
            4,
            [
                &rogue_dir.join("node-4.pem"),
                &rogue_dir.join("node-4-key.pem"),
                &rogue_dir.join("ca.pem"),
            ],
        )
        .expect("start foreign outsider");
    let client_cert = cluster
        .start_outsider(
            5,
            [
                &certs.join("client.pem"),
                &certs.join("client-key.pem"),
                &certs.join("ca.pem"),
            ],
        )
        .expect("start client-cert outsider");

    // Both try to campaign (they believe they are members); every real node must refuse
    // them, and count it.
    eventually(DEADLINE, "the region to refuse both outsiders", || async {
        let mut handshakes = 0;
        let mut peers = 0;
        for id in cluster.nodes.keys().copied() {
            let metrics = metrics_of(&cluster, id).await;
            handshakes += counter(&metrics, "tls_handshake");
            peers += counter(&metrics, "peer_without_node_certificate");
        }
        (handshakes > 0 && peers > 0).then_some(())
    })
    .await;
    let writes = cluster.client();
    for i in 0..20 {
        writes
            .put(&format!("steady/{i}"), "v", PutOptions::default())
            .await
            .expect("writes go on");
    }
    let after = cluster.client().cluster().await.expect("status");
    assert_eq!(after.term, before.term, "an outsider raised the term");
    assert_eq!(after.leader, before.leader);
    assert_eq!(after.members.len(), 3, "an outsider joined: {:?}", after.members);
    drop((foreign, client_cert));

    // Clients with the wrong CA fail the handshake at once, with a reason.
    let wrong_ca = TlsOptions {
        ca: rogue_dir.join("ca.pem"),
        cert: None,
        key: None,
    };
    let client =
        rampart_client::Client::secured(&cluster.endpoints(), Some(&wrong_ca), cluster.admin_token().as_deref())
            .expect("client");
    match client.cluster().await {
        Err(ClientError::Tls(message)) => assert!(message.contains("not signed by --cacert"), "{message}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    let plaintext = rampart_client::Client::new(&cluster.endpoints()).expect("client");
    match plaintext.cluster().await {
        Err(ClientError::Tls(message)) => assert!(message.contains("speaks TLS"), "{message}"),
        other => panic!("expected a TLS error, got {other:?}"),
    }
    cluster.assert_no_secrets_leaked(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn certificates_rotate_node_by_node_while_writes_continue() {
    let mut cluster = tls_cluster(3).await;
    let old_cert = std::fs::read(cluster.certs_dir().join("node-1.pem")).expect("cert");
    let ca = std::fs::read(cluster.certs_dir().join("ca.pem")).expect("ca");
    let client = Arc::new(cluster.client());
    let workload = Workload::start(client.clone(), 4, "rotation");
    workload.wait_progress(50, DEADLINE).await;

    cluster.issue_certificates("1,2,3").expect("reissue from the same CA");
    assert_ne!(std::fs::read(cluster.certs_dir().join("node-1.pem")).unwrap(), old_cert);
    assert_eq!(std::fs::read(cluster.certs_dir().join("ca.pem")).unwrap(), ca);
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    for id in ids {
        cluster.kill(id);
        let reached = workload.history.acknowledged() as u64;
        cluster.restart(id).expect("restart on the new certificate");
        // Back in: it follows a leader over the new certificate and catches up on writes
        // acknowledged while it was down.
        eventually(DEADLINE, &format!("node {id} to rejoin"), || async {
            let status = cluster.status_of(id).await?;
            (status.leader.is_some() && status.revision >= reached).then_some(())
        })
        .await;
        workload.wait_progress(50, DEADLINE).await;
    }
    let history = workload.stop().await;
    cluster.wait_converged(DEADLINE).await;
    let state = final_state(&client, "rotation/").await;
    let lost = history.lost_acknowledged_writes(&state);
    assert!(lost.is_empty(), "{} acknowledged writes lost", lost.len());
    cluster.assert_no_secrets_leaked(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reachable_plaintext_bind_refuses_to_start_and_names_the_fix() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = rampart_testkit::cluster::free_port().expect("port").port();
    let out = std::process::Command::new(binary())
        .args(["node", "--id", "1", "--listen", &format!("0.0.0.0:{port}")])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .expect("run node");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for fix in ["--tls-cert", "rampart certs init", "--insecure"] {
        assert!(stderr.contains(fix), "{fix} not named in: {stderr}");
    }
}
