//! The proxy in front of a registry service: a real region, real backends registered as
//! instances, and `rampart proxy` following the registry through `--endpoints`.

use rampart_core::service::{InstanceSpec, PolicySpec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proxy::{answer, ask, backend, http_backend, read_name, start_proxy_with, stop, Backend};
use crate::{cluster, DEADLINE};

/// Registers `service` with fast TCP checks and one instance per `(id, address, priority)`,
/// waits until every instance is up, and makes the first one primary.
async fn register(client: &rampart_client::Client, service: &str, instances: &[(&str, std::net::SocketAddr, u32)]) {
    let spec: PolicySpec = serde_json::from_value(serde_json::json!({
        "checks": [{"kind": "tcp", "interval": "100ms", "timeout": "100ms", "rise": 1, "fall": 1}],
    }))
    .expect("policy");
    client.service_put(service, &spec).await.expect("service");
    for (id, addr, priority) in instances {
        let instance = InstanceSpec {
            endpoint: addr.to_string(),
            priority: Some(*priority),
            ..InstanceSpec::default()
        };
        client.instance_put(service, id, &instance).await.expect("instance");
    }
    rampart_testkit::eventually(DEADLINE, "every instance up", || async {
        let view = client.service(service).await.ok()?;
        (view.serving.len() == instances.len()).then_some(())
    })
    .await;
    client.switchover(service, instances[0].0).await.expect("first primary");
}

/// A proxy with `[proxy] admin` and `listeners` (TOML), following the registry of
/// `cluster`; the admin address comes back with it.
pub(crate) fn registry_proxy(
    cluster: &rampart_testkit::Cluster,
    listeners: &str,
) -> (crate::proxy::ProxyProcess, tempfile::TempDir, std::net::SocketAddr) {
    let admin = rampart_testkit::cluster::free_port().expect("port");
    let (proxy, dir) = start_proxy_with(
        &format!("[proxy]\nadmin = \"{admin}\"\n{listeners}"),
        &["--endpoints".to_string(), cluster.endpoints().join(",")],
    );
    (proxy, dir, admin)
}

/// A connection through the proxy that has read its backend's name.
pub(crate) async fn connect(proxy: &str) -> Option<(String, tokio::net::TcpStream)> {
    let mut stream = tokio::net::TcpStream::connect(proxy).await.ok()?;
    Some((read_name(&mut stream).await?, stream))
}

/// Whether an echo still goes through `stream`.
async fn echoes(stream: &mut tokio::net::TcpStream) -> bool {
    let mut echo = [0u8; 4];
    stream.write_all(b"ping").await.is_ok() && stream.read_exact(&mut echo).await.is_ok() && &echo == b"ping"
}

/// Waits until the proxy ends `stream` (end of file or reset), without sending on it.
pub(crate) async fn wait_closed(stream: &mut tokio::net::TcpStream, what: &str) {
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(DEADLINE, stream.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "{what}: expected the proxy to close the connection, got {read:?}"
    );
}

pub(crate) async fn get_json(url: &str) -> (u16, serde_json::Value) {
    let response = reqwest::get(url).await.expect("answer");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_listeners_follow_a_switchover_closing_the_old_primary_and_draining_the_rest() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let (a, _a_task) = backend("a");
    let (b, _b_task) = backend("b");
    register(&client, "db", &[("a", a, 100), ("b", b, 50)]).await;

    let primary_port = rampart_testkit::cluster::free_port().expect("port");
    let replicas_port = rampart_testkit::cluster::free_port().expect("port");
    let (_proxy, _dir, admin) = registry_proxy(
        &cluster,
        &format!(
            r#"
[[proxy.listeners]]
name = "db"
bind = "{primary_port}"
service = "db"
route = "primary"

[[proxy.listeners]]
name = "db-replicas"
bind = "{replicas_port}"
service = "db"
route = "replicas"
drain_timeout = "5s"
"#
        ),
    );
    let (primary, replicas) = (primary_port.to_string(), replicas_port.to_string());
    rampart_testkit::eventually(DEADLINE, "the primary through the proxy", || async {
        (ask(&primary).await? == "a").then_some(())
    })
    .await;
    assert_eq!(ask(&replicas).await.as_deref(), Some("b"));
    let (name, mut to_old_primary) = connect(&primary).await.expect("a connection to the primary");
    assert_eq!(name, "a");
    let (name, mut to_replica) = connect(&replicas).await.expect("a connection to a replica");
    assert_eq!(name, "b");

    client.switchover("db", "b").await.expect("switchover to b");

    // The demoted primary's connection is closed at once; new ones reach b.
    wait_closed(&mut to_old_primary, "the connection to the demoted primary").await;
    rampart_testkit::eventually(DEADLINE, "the new primary through the proxy", || async {
        (ask(&primary).await? == "b").then_some(())
    })
    .await;

    // b left the replicas: its connection goes on while it drains, then is closed.
    let health = format!("http://{admin}/listeners/db-replicas/health");
    rampart_testkit::eventually(DEADLINE, "the replicas listener to hold only a", || async {
        let (_, body) = get_json(&health).await;
        let upstreams = body["upstreams"].as_array()?.clone();
        (upstreams.len() == 1 && upstreams[0]["address"] == a.to_string()).then_some(())
    })
    .await;
    assert!(echoes(&mut to_replica).await, "a draining connection keeps working");
    assert_eq!(
        ask(&replicas).await.as_deref(),
        Some("a"),
        "new connections go to the replicas now"
    );
    wait_closed(&mut to_replica, "the drained connection").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_primary_reads_go_to_replicas_writes_get_503_and_the_oracle_says_so() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let Backend {
        addr: a, task: a_task, ..
    } = http_backend("a");
    let Backend { addr: b, .. } = http_backend("b");
    // b has priority 0: it is never promoted, so losing a leaves the service without one.
    register(&client, "web", &[("a", a, 100), ("b", b, 0)]).await;

    let http_port = rampart_testkit::cluster::free_port().expect("port");
    let tcp_port = rampart_testkit::cluster::free_port().expect("port");
    let (_proxy, _dir, admin) = registry_proxy(
        &cluster,
        &format!(
            r#"
[[proxy.listeners]]
name = "web"
bind = "{http_port}"
mode = "http"
service = "web"

[[proxy.listeners]]
name = "web-tcp"
bind = "{tcp_port}"
service = "web"
"#
        ),
    );
    let http = reqwest::Client::new();
    let url = format!("http://{http_port}/orders");
    let send = |method: reqwest::Method| answer(http.request(method, &url));
    let oracle = |check: &str| format!("http://{admin}/listeners/web/{check}");
    rampart_testkit::eventually(DEADLINE, "writes to reach the primary", || async {
        (send(reqwest::Method::POST).await? == (200, "a".to_string())).then_some(())
    })
    .await;
    assert_eq!(get_json(&oracle("primary")).await.0, 200);
    assert_eq!(get_json(&oracle("primary?instance=a")).await.0, 200);
    assert_eq!(get_json(&oracle("primary?instance=b")).await.0, 503);
    assert_eq!(get_json(&oracle("replica?instance=b")).await.0, 200);
    assert_eq!(get_json(&oracle("health")).await.0, 200);
    assert_eq!(get_json(&format!("http://{admin}/listeners/nope/health")).await.0, 404);

    stop(a, a_task).await;
    rampart_testkit::eventually(DEADLINE, "the oracle to see no primary", || async {
        let (status, body) = get_json(&oracle("primary")).await;
        (status == 503 && body["primary"].is_null()).then_some(())
    })
    .await;

    // Read-only mode: reads are served by the replica, writes refused with a reason.
    assert_eq!(send(reqwest::Method::GET).await, Some((200, "b".to_string())));
    let (status, body) = send(reqwest::Method::DELETE).await.expect("an answer");
    assert_eq!(status, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["error"]["code"], "read_only");
    let (status, body) = get_json(&oracle("health")).await;
    assert_eq!((status, &body["read_only"]), (200, &serde_json::json!(true)));

    // The TCP listener routed to the primary refuses at once instead of hanging.
    let mut refused = tokio::net::TcpStream::connect(tcp_port)
        .await
        .expect("the listener accepts");
    wait_closed(&mut refused, "a connection with no primary to go to").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_runs_the_proxy_listeners_of_its_config_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = rampart_testkit::cluster::free_port().expect("port");
    let admin = rampart_testkit::cluster::free_port().expect("port");
    let config = dir.path().join("node.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[proxy]
admin = "{admin}"

[[proxy.listeners]]
name = "db"
bind = "{port}"
service = "db"
"#
        ),
    )
    .expect("config");
    let cluster = rampart_testkit::Cluster::start(
        crate::binary(),
        rampart_testkit::ClusterOptions {
            nodes: 1,
            node_args: vec!["--config".into(), config.display().to_string()],
            ..Default::default()
        },
    )
    .await
    .expect("start the node");
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let (a, _a_task) = backend("a");
    register(&client, "db", &[("a", a, 100)]).await;
    rampart_testkit::eventually(DEADLINE, "the primary through the node's listener", || async {
        (ask(&port.to_string()).await? == "a").then_some(())
    })
    .await;
    let (status, body) = get_json(&format!("http://{admin}/listeners/db/primary")).await;
    assert_eq!((status, &body["primary"]), (200, &serde_json::json!("a")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_quotas_hold_exactly_across_two_proxies_and_a_leader_loss() {
    let mut cluster = cluster(3).await;
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let backend = http_backend("ok").addr;
    let listeners = |port: std::net::SocketAddr| {
        format!(
            r#"
[proxy.quota_tiers]
free = {{ daily = 6 }}
pro = {{ daily = 9 }}

[proxy.quota_clients]
key-pro = "pro"

[[proxy.listeners]]
name = "api"
bind = "{port}"
mode = "http"
upstreams = ["{backend}"]
quota = {{ key = "header:X-Api-Key", default_tier = "free", scope = "cluster" }}
"#
        )
    };
    let ports = [
        rampart_testkit::cluster::free_port().expect("port"),
        rampart_testkit::cluster::free_port().expect("port"),
    ];
    let (_a, _dir_a, admin_a) = registry_proxy(&cluster, &listeners(ports[0]));
    let (_b, _dir_b, admin_b) = registry_proxy(&cluster, &listeners(ports[1]));
    for port in ports {
        rampart_testkit::eventually(DEADLINE, "the proxy to listen", || async {
            tokio::net::TcpStream::connect(port).await.ok()
        })
        .await;
    }
    let http = reqwest::Client::new();
    // `count` requests at once, alternately through each proxy: how many were let through,
    // and one refusal's body.
    let burst = |key: &'static str, count: usize| {
        let http = http.clone();
        async move {
            let mut requests = tokio::task::JoinSet::new();
            for i in 0..count {
                let request = http.get(format!("http://{}/", ports[i % 2])).header("x-api-key", key);
                requests.spawn(async move {
                    let response = request.send().await.expect("an answer");
                    let status = response.status().as_u16();
                    (status, response.json::<serde_json::Value>().await.unwrap_or_default())
                });
            }
            let (mut ok, mut refusal) = (0, None);
            while let Some(done) = requests.join_next().await {
                match done.expect("request task") {
                    (200, _) => ok += 1,
                    (429, body) => refusal = Some(body),
                    (status, body) => panic!("unexpected {status}: {body}"),
                }
            }
            (ok, refusal)
        }
    };
    assert_eq!(burst("key-free", 4).await.0, 4);
    assert_eq!(burst("key-pro", 14).await.0, 9, "pro: 9 a day across both proxies");
    // The standings are replicated: the leader's loss forgets nothing.
    cluster.kill(leader);
    let leader = cluster.wait_for_leader(DEADLINE).await;
    let (ok, refusal) = burst("key-free", 8).await;
    assert_eq!(
        ok, 2,
        "free: 6 a day across both proxies, 4 of them before the leader died"
    );
    let refusal = refusal.expect("a refusal");
    assert_eq!(
        (
            refusal["error"]["code"].as_str(),
            refusal["tier"].as_str(),
            refusal["limit"].as_str()
        ),
        (Some("quota_exceeded"), Some("free"), Some("daily"))
    );
    assert_eq!(burst("key-other", 10).await.0, 6, "each key has its own");
    // Bad limits are refused naming the field, and count nothing.
    let endpoint = cluster.nodes[&leader].endpoint();
    let bad = http
        .post(format!("http://{endpoint}/v1/quotas/api/take"))
        .json(&serde_json::json!({"client": "key-other", "rate": 0}))
        .send()
        .await
        .expect("an answer");
    assert_eq!(bad.status().as_u16(), 400);
    let body: serde_json::Value = bad.json().await.expect("JSON");
    assert!(
        body["error"]["message"].as_str().is_some_and(|m| m.contains("rate")),
        "{body}"
    );
    // Every request was counted by the control plane, none locally.
    for admin in [admin_a, admin_b] {
        let text = crate::proxy::metrics(admin).await;
        assert_eq!(
            crate::proxy::metrics_count(&text, "rampart_proxy_quota_fallbacks_total", "api"),
            0.0
        );
    }
}

/// An HTTP backend whose every response sends `name` as its first chunk and then streams
/// on without end (a long download, an event stream).
fn streaming_backend(name: &'static str) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            connections.spawn(async move {
                let mut head = Vec::new();
                let mut chunk = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&chunk[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{name}\r\n",
                    name.len()
                );
                if stream.write_all(answer.as_bytes()).await.is_ok() {
                    std::future::pending::<()>().await;
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_http_response_from_a_demoted_primary_is_cut_and_new_requests_reach_the_new_one() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    let (a, _a_task) = streaming_backend("a");
    let (b, _b_task) = streaming_backend("b");
    register(&client, "web", &[("a", a, 100), ("b", b, 90)]).await;
    let port = rampart_testkit::cluster::free_port().expect("port");
    let (_proxy, _dir, _admin) = registry_proxy(
        &cluster,
        &format!("[[proxy.listeners]]\nname = \"web\"\nbind = \"{port}\"\nmode = \"http\"\nservice = \"web\"\n"),
    );
    // The first chunk names the backend that answers.
    let first_chunk = || async {
        let mut response = reqwest::get(format!("http://{port}/stream")).await.ok()?;
        let chunk = response.chunk().await.ok()??;
        Some((String::from_utf8_lossy(&chunk).to_string(), response))
    };
    let mut streaming = rampart_testkit::eventually(DEADLINE, "a response streaming from a", || async {
        let (name, response) = first_chunk().await?;
        (name == "a").then_some(response)
    })
    .await;
    client.switchover("web", "b").await.expect("switchover");
    let next = tokio::time::timeout(DEADLINE, streaming.chunk())
        .await
        .expect("the response from the demoted primary ends within the deadline");
    assert!(
        next.is_err(),
        "expected the response cut off, not ended cleanly: {next:?}"
    );
    rampart_testkit::eventually(DEADLINE, "new requests reach b", || async {
        (first_chunk().await?.0 == "b").then_some(())
    })
    .await;
}
