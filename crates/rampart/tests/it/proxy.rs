//! The proxy as a user runs it: `rampart proxy --config FILE` in front of real backends
//! started by the test, with real connections through it.

use std::process::{Child, Command, Stdio};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use rampart_testkit::Answer;

use crate::DEADLINE;

/// A `rampart proxy` process, stopped when dropped.
pub(crate) struct ProxyProcess(Child);

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_proxy(config: &str) -> (ProxyProcess, tempfile::TempDir) {
    start_proxy_with(config, &[])
}

/// A proxy with extra arguments (such as `--endpoints` for registry listeners).
pub(crate) fn start_proxy_with(config: &str, args: &[String]) -> (ProxyProcess, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config).expect("config");
    let child = Command::new(crate::binary())
        .args(["proxy", "--config"])
        .arg(&path)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start proxy");
    (ProxyProcess(child), dir)
}

/// Stops a backend started by the test, like a SIGKILL: returns once its port refuses.
pub(crate) async fn stop(addr: std::net::SocketAddr, task: tokio::task::JoinHandle<()>) {
    task.abort();
    rampart_testkit::eventually(DEADLINE, &format!("{addr} closed"), || async {
        tokio::net::TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;
}

/// The proxy's `/metrics` text, from its admin address.
pub(crate) async fn metrics(admin: std::net::SocketAddr) -> String {
    reqwest::get(format!("http://{admin}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

/// A TCP backend that answers every connection with its name, then echoes.
pub(crate) fn backend(name: &'static str) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    std_listener.set_nonblocking(true).expect("nonblocking");
    let addr = std_listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("listener");
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = stream.write_all(format!("{name}\n").as_bytes()).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, task)
}

/// Connects through the proxy, reads the backend's name, checks an echo.
/// Sends `request`: its status and body, or `None` if no answer came.
pub(crate) async fn answer(request: reqwest::RequestBuilder) -> Option<(u16, String)> {
    let response = request.send().await.ok()?;
    Some((response.status().as_u16(), response.text().await.ok()?))
}

pub(crate) async fn ask(proxy: &str) -> Option<String> {
    let stream = tokio::net::TcpStream::connect(proxy).await.ok()?;
    ask_on(stream).await
}

/// `ask` from a given loopback source address (the client ip-hash sees).
async fn ask_from(proxy: std::net::SocketAddr, source: std::net::Ipv4Addr) -> Option<String> {
    let socket = tokio::net::TcpSocket::new_v4().ok()?;
    socket.bind((source, 0).into()).ok()?;
    ask_on(socket.connect(proxy).await.ok()?).await
}

/// The name a `backend` greets each connection with.
pub(crate) async fn read_name(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = [0u8; 64];
    let mut got = 0;
    while !buf[..got].contains(&b'\n') {
        let n = stream.read(&mut buf[got..]).await.ok()?;
        if n == 0 {
            return None;
        }
        got += n;
    }
    Some(String::from_utf8_lossy(&buf[..got]).trim().to_string())
}

async fn ask_on(mut stream: tokio::net::TcpStream) -> Option<String> {
    let name = read_name(&mut stream).await?;
    stream.write_all(b"ping").await.ok()?;
    let mut echo = [0u8; 4];
    stream.read_exact(&mut echo).await.ok()?;
    (&echo == b"ping").then_some(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_round_robin_skips_a_dead_backend_without_a_failed_connection() {
    let (a, _a_task) = backend("a");
    let (b, b_task) = backend("b");
    let port = rampart_testkit::cluster::free_port().expect("port");
    let (_proxy, _dir) = start_proxy(&format!(
        r#"
[[proxy.listeners]]
name = "echo"
bind = "{port}"
mode = "tcp"
upstreams = ["{a}", "{b}"]
"#
    ));
    let proxy = port.to_string();
    rampart_testkit::eventually(DEADLINE, "the proxy to listen", || async { ask(&proxy).await }).await;
    let mut names = Vec::new();
    for _ in 0..10 {
        names.push(ask(&proxy).await.expect("an answer through the proxy"));
    }
    assert_eq!(names.iter().filter(|n| *n == "a").count(), 5, "{names:?}");
    assert_eq!(names.iter().filter(|n| *n == "b").count(), 5, "{names:?}");

    // Backend b dies: every connection still succeeds, all on a.
    stop(b, b_task).await;
    for i in 0..20 {
        let name = ask(&proxy)
            .await
            .unwrap_or_else(|| panic!("connection {i} failed after b died"));
        assert_eq!(name, "a");
    }
}

#[test]
fn a_bad_proxy_config_names_the_field_the_value_and_what_is_allowed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        r#"
[[proxy.listeners]]
name = "db"
bind = "127.0.0.1:15432"
algorithm = "fastest"
upstreams = ["127.0.0.1:5432"]
"#,
    )
    .expect("config");
    let out = Command::new(crate::binary())
        .args(["proxy", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("proxy.listeners[0].algorithm")
            && stderr.contains("fastest")
            && stderr.contains("round-robin, weighted, least-connections, ip-hash or p2c"),
        "{stderr}"
    );
}

/// How a test backend answers a request.
#[derive(Debug, Clone, Copy)]
enum Reply {
    /// This status, with the backend's name as the body.
    Status(u16),
    /// Close the connection without an answer, as a process killed mid-request does.
    Drop,
}

/// An HTTP/1.1 test backend (keep-alive), started by the test.
pub(crate) type Backend = rampart_testkit::HttpBackend;

/// A backend answering every request with 200 and its name.
pub(crate) fn http_backend(name: &'static str) -> Backend {
    scripted_backend(name, |_, _| Reply::Status(200), None)
}

/// A backend answering its `n`th request (from 0), whose request line is `line`, as
/// `reply(n, line)` says, each only once `release` (if given) turns true.
fn scripted_backend(
    name: &'static str,
    reply: fn(usize, &str) -> Reply,
    release: Option<tokio::sync::watch::Receiver<bool>>,
) -> Backend {
    scripted_backend_at("127.0.0.1:0".parse().expect("address"), name, reply, release)
}

/// `scripted_backend` on a given address (to bring a stopped backend back on its port).
fn scripted_backend_at(
    at: std::net::SocketAddr,
    name: &'static str,
    reply: fn(usize, &str) -> Reply,
    release: Option<tokio::sync::watch::Receiver<bool>>,
) -> Backend {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_reuseaddr(true).expect("reuseaddr");
    socket.bind(at).expect("bind");
    let listener = socket.listen(1024).expect("listen");
    Backend::start(listener, release, move |n, line| match reply(n, line) {
        Reply::Status(code) => Answer::Keep(format!(
            "HTTP/1.1 {code} X\r\ncontent-length: {}\r\n\r\n{name}",
            name.len()
        )),
        Reply::Drop => Answer::Drop,
    })
}

/// A proxy with one `http` listener named web over `upstreams` (plus the listener's
/// `extra` TOML lines), and an admin address:
/// (process, its dir, the listener's address, the admin address).
fn http_proxy(
    upstreams: &[std::net::SocketAddr],
    extra: &str,
) -> (
    ProxyProcess,
    tempfile::TempDir,
    std::net::SocketAddr,
    std::net::SocketAddr,
) {
    let port = rampart_testkit::cluster::free_port().expect("port");
    let admin = rampart_testkit::cluster::free_port().expect("port");
    let list = upstreams
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let (proxy, dir) = start_proxy(&format!(
        r#"
[proxy]
admin = "{admin}"

[[proxy.listeners]]
name = "web"
bind = "{port}"
mode = "http"
upstreams = [{list}]
{extra}
"#
    ));
    (proxy, dir, port, admin)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http_requests_go_round_the_upstreams_and_around_a_dead_one() {
    let Backend {
        addr: a, task: a_task, ..
    } = http_backend("a");
    let Backend {
        addr: b, task: b_task, ..
    } = http_backend("b");
    let (_proxy, _dir, port, admin) = http_proxy(&[a, b], "");
    let http = reqwest::Client::new();
    let get = |path: &'static str| answer(http.get(format!("http://{port}{path}")));
    rampart_testkit::eventually(DEADLINE, "the proxy to listen", || async { get("/").await }).await;
    let mut names = Vec::new();
    for _ in 0..10 {
        let (status, name) = get("/item").await.expect("an answer");
        assert_eq!(status, 200);
        names.push(name);
    }
    assert_eq!(names.iter().filter(|n| *n == "a").count(), 5, "{names:?}");

    stop(b, b_task).await;
    for i in 0..20 {
        let answer = get("/item").await;
        assert_eq!(answer, Some((200, "a".to_string())), "request {i} after b died");
    }

    stop(a, a_task).await;
    let (status, body) = get("/item").await.expect("an answer from the proxy itself");
    assert_eq!(status, 502);
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["error"]["code"], "no_upstream");

    // Every answer is counted by status; b's ejection too.
    let metrics = metrics(admin).await;
    assert!(
        metrics.contains(r#"rampart_proxy_requests_total{listener="web",code="200"} 31"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"rampart_proxy_requests_total{listener="web",code="502"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            r#"rampart_proxy_ejections_total{{listener="web",upstream="{b}"}}"#
        )),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotent_requests_are_retried_elsewhere_and_others_are_not() {
    let good = http_backend("good").addr;
    let Backend {
        addr: bad,
        requests: swallowed,
        ..
    } = scripted_backend("bad", |_, _| Reply::Drop, None);
    let mixed = rampart_testkit::cluster::free_port().expect("port");
    let lonely = rampart_testkit::cluster::free_port().expect("port");
    let (_proxy, _dir) = start_proxy(&format!(
        r#"
[[proxy.listeners]]
name = "mixed"
bind = "{mixed}"
mode = "http"
upstreams = ["{bad}", "{good}"]

[[proxy.listeners]]
name = "lonely"
bind = "{lonely}"
mode = "http"
upstreams = ["{bad}"]
"#
    ));
    let http = reqwest::Client::new();
    let send = |method: reqwest::Method, port: std::net::SocketAddr| {
        answer(http.request(method, format!("http://{port}/item")).body("x"))
    };
    rampart_testkit::eventually(DEADLINE, "the proxy to listen", || async {
        send(reqwest::Method::GET, mixed).await
    })
    .await;
    for i in 0..20 {
        let (status, body) = send(reqwest::Method::GET, mixed).await.expect("an answer");
        assert_eq!((status, body.as_str()), (200, "good"), "GET {i}");
    }
    assert!(
        swallowed.load(std::sync::atomic::Ordering::SeqCst) >= 1,
        "the bad upstream was tried"
    );

    // A POST that may have reached its upstream is not sent again.
    let before = swallowed.load(std::sync::atomic::Ordering::SeqCst);
    let (status, body) = send(reqwest::Method::POST, lonely).await.expect("an answer");
    assert_eq!(status, 502, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["error"]["code"], "upstream_failed");
    assert_eq!(
        swallowed.load(std::sync::atomic::Ordering::SeqCst),
        before + 1,
        "tried once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_upstream_trips_its_breaker_and_gets_no_traffic_while_open() {
    // Every other answer a 500: never five in a row (no ejection), but half fail.
    let flaky = scripted_backend("flaky", |n, _| Reply::Status(if n % 2 == 0 { 500 } else { 200 }), None).addr;
    let good = http_backend("good").addr;
    let (_proxy, _dir, port, _) = http_proxy(&[flaky, good], "");
    let http = reqwest::Client::new();
    let get = || answer(http.get(format!("http://{port}/")));
    rampart_testkit::eventually(DEADLINE, "the proxy to listen", || async { get().await }).await;
    let mut bodies = Vec::new();
    for _ in 0..60 {
        let (_, body) = get().await.expect("an answer");
        bodies.push(body);
    }
    // It opens at 20 outcomes with half failed; nothing reaches it for the next 5 s.
    let flaky_answers = bodies.iter().filter(|b| *b == "flaky").count();
    assert!((19..=20).contains(&flaky_answers), "{bodies:?}");
    assert!(bodies[40..].iter().all(|b| b == "good"), "{bodies:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_overload_low_priority_is_shed_first_then_normal() {
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let Backend {
        addr: backend,
        requests: held,
        ..
    } = scripted_backend("ok", |_, _| Reply::Status(200), Some(release));
    let (_proxy, _dir, port, _) = http_proxy(&[backend], "max_requests = 10");
    rampart_testkit::eventually(DEADLINE, "the proxy to listen", || async {
        tokio::net::TcpStream::connect(port).await.ok()
    })
    .await;
    let send = |priority: &'static str| {
        tokio::spawn(async move {
            let response = reqwest::Client::new()
                .get(format!("http://{port}/"))
                .header("x-priority", priority)
                .send()
                .await
                .expect("an answer");
            let retry_after = response.headers().get("retry-after").is_some();
            (response.status().as_u16(), retry_after)
        })
    };
    let wait_held = |n: usize| {
        let held = held.clone();
        async move {
            rampart_testkit::eventually(DEADLINE, &format!("{n} requests held"), || async {
                (held.load(std::sync::atomic::Ordering::SeqCst) == n).then_some(())
            })
            .await
        }
    };
    // Five in flight: low is shed (its ceiling is half of 10), normal is not.
    let mut admitted: Vec<_> = (0..5).map(|_| send("normal")).collect();
    wait_held(5).await;
    assert_eq!(send("low").await.expect("task"), (503, true));
    admitted.extend((0..4).map(|_| send("normal")));
    wait_held(9).await;
    // Nine in flight: normal is shed too (ceiling 9), high still gets in.
    assert_eq!(send("normal").await.expect("task"), (503, true));
    admitted.push(send("high"));
    wait_held(10).await;
    assert_eq!(send("high").await.expect("task"), (503, true), "the hard limit holds");
    release_tx.send(true).expect("release");
    for request in admitted {
        assert_eq!(request.await.expect("task"), (200, false));
    }
    assert_eq!(send("low").await.expect("task"), (200, false), "room again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fault_injection_aborts_its_share_without_reaching_the_upstream() {
    let Backend {
        addr: backend,
        requests: reached,
        ..
    } = scripted_backend("bad", |_, _| Reply::Drop, None);
    let port = rampart_testkit::cluster::free_port().expect("port");
    let (_proxy, _dir) = start_proxy(&format!(
        r#"
[[proxy.listeners]]
name = "drill"
bind = "{port}"
mode = "http"
upstreams = ["{backend}"]
fault = {{ abort_percent = 100, abort_status = 503 }}
"#
    ));
    let http = reqwest::Client::new();
    let get = || answer(http.get(format!("http://{port}/")));
    rampart_testkit::eventually(DEADLINE, "the proxy to listen", || async { get().await }).await;
    for _ in 0..5 {
        let (status, body) = get().await.expect("an answer");
        assert_eq!(status, 503);
        assert!(body.contains("fault_injected"), "{body}");
    }
    assert_eq!(reached.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quotas_are_exact_per_client_key_and_per_tier() {
    let backend = http_backend("ok").addr;
    let port = rampart_testkit::cluster::free_port().expect("port");
    let (_proxy, _dir) = start_proxy(&format!(
        r#"
[proxy.quota_tiers]
free = {{ daily = 3 }}
pro = {{ daily = 5 }}
burst = {{ rate = 1, burst = 2 }}

[proxy.quota_clients]
key-pro = "pro"
key-burst = "burst"

[[proxy.listeners]]
name = "api"
bind = "{port}"
mode = "http"
upstreams = ["{backend}"]
quota = {{ key = "header:X-Api-Key", default_tier = "free" }}
"#
    ));
    rampart_testkit::eventually(DEADLINE, "the proxy to listen", || async {
        tokio::net::TcpStream::connect(port).await.ok()
    })
    .await;
    let http = reqwest::Client::new();
    let get = |key: &'static str| {
        let http = http.clone();
        async move {
            let response = http
                .get(format!("http://{port}/"))
                .header("x-api-key", key)
                .send()
                .await
                .expect("an answer");
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let status = response.status().as_u16();
            let body: serde_json::Value = response.json().await.unwrap_or_default();
            (status, retry_after, body)
        }
    };
    let admitted = |key: &'static str, tries: usize| {
        let get = &get;
        async move {
            let mut ok = 0;
            let mut last = None;
            for _ in 0..tries {
                let (status, retry_after, body) = get(key).await;
                if status == 200 {
                    ok += 1;
                } else {
                    assert_eq!(status, 429);
                    assert!(retry_after.is_some_and(|s| s >= 1), "Retry-After");
                    last = Some(body);
                }
            }
            (ok, last)
        }
    };
    let (ok, refusal) = admitted("key-free-1", 5).await;
    assert_eq!(ok, 3, "free: 3 a day");
    let refusal = refusal.expect("refused");
    assert_eq!(
        (
            refusal["error"]["code"].as_str(),
            refusal["tier"].as_str(),
            refusal["limit"].as_str()
        ),
        (Some("quota_exceeded"), Some("free"), Some("daily"))
    );
    assert_eq!(admitted("key-free-2", 5).await.0, 3, "each key has its own");
    assert_eq!(admitted("key-pro", 8).await.0, 5, "pro: 5 a day");
    // A burst of 2 at 1 a second: ten quick requests cannot all pass (no timing assumed
    // beyond ten requests taking less than eight seconds).
    let (ok, refusal) = admitted("key-burst", 10).await;
    assert!((2..10).contains(&ok), "{ok} passed");
    assert_eq!(refusal.expect("refused")["limit"], "rate");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_quota_without_its_control_plane_is_held_locally_and_serves_on() {
    let backend = http_backend("ok").addr;
    let (port, admin) = (
        rampart_testkit::cluster::free_port().expect("port"),
        rampart_testkit::cluster::free_port().expect("port"),
    );
    // Nothing listens at the control plane's address.
    let nowhere = rampart_testkit::cluster::free_port().expect("port");
    let (_proxy, _dir) = start_proxy_with(
        &format!(
            r#"
[proxy]
admin = "{admin}"

[proxy.quota_tiers]
free = {{ daily = 3 }}

[[proxy.listeners]]
name = "api"
bind = "{port}"
mode = "http"
upstreams = ["{backend}"]
quota = {{ default_tier = "free", scope = "cluster" }}
"#
        ),
        &["--endpoints".to_string(), nowhere.to_string()],
    );
    rampart_testkit::eventually(DEADLINE, "the proxy to listen", || async {
        tokio::net::TcpStream::connect(port).await.ok()
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..5 {
        let response = reqwest::get(format!("http://{port}/")).await.expect("an answer");
        statuses.push(response.status().as_u16());
    }
    assert_eq!(
        statuses,
        [200, 200, 200, 429, 429],
        "the daily 3 held by this proxy alone"
    );
    let text = metrics(admin).await;
    assert!(metrics_count(&text, "rampart_proxy_quota_fallbacks_total", "api") >= 1.0);
}

/// A backend that frames its answer as the path says: `/length` (1 MiB, content-length,
/// written in pieces), `/chunked` (chunks and a trailer), `/close` (the body ends when the
/// connection does), `/continue` (a 100 Continue first), `/echo` (the request's body
/// back), `/headers` (the request's head, lower case, with fields of one hop in the
/// answer); a HEAD gets a content-length and no body. Counts the connections it took.
fn framing_backend() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("addr");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                    let length: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse().expect("content-length"));
                    while buf.len() < end + 4 + length {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body: Vec<u8> = buf.drain(..end + 4 + length).skip(end + 4).collect();
                    let mut words = head.split_whitespace();
                    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                    let writes: Vec<Vec<u8>> = match (method, path) {
                        ("head", _) => vec![b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n".to_vec()],
                        (_, "/length") => {
                            let mut writes =
                                vec![format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", 1 << 20).into_bytes()];
                            writes.extend(big_body().chunks(64 * 1024).map(<[u8]>::to_vec));
                            writes
                        }
                        (_, "/chunked") => vec![
                            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello".to_vec(),
                            b"\r\n1;ext=x\r\n,\r\n".to_vec(),
                            b"6\r\n world\r\n0\r\nx-trailer: t\r\n\r\n".to_vec(),
                        ],
                        (_, "/continue") => vec![
                            b"HTTP/1.1 100 Continue\r\n\r\n".to_vec(),
                            b"HTTP/1.1 201 Created\r\ncontent-length: 4\r\n\r\ndone".to_vec(),
                        ],
                        (_, "/headers") => {
                            let mut answer = format!(
                                "HTTP/1.1 200 OK\r\nconnection: x-out\r\nx-out: 1\r\nkeep-alive: timeout=5\r\ncontent-length: {}\r\n\r\n",
                                end
                            )
                            .into_bytes();
                            answer.extend_from_slice(head.as_bytes());
                            vec![answer]
                        }
                        (_, "/echo") => {
                            let mut answer =
                                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
                            answer.extend_from_slice(&body);
                            vec![answer]
                        }
                        _ => {
                            let _ = stream
                                .write_all(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil the end")
                                .await;
                            return;
                        }
                    };
                    for piece in writes {
                        if stream.write_all(&piece).await.is_err() {
                            return;
                        }
                        tokio::task::yield_now().await;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// 1 MiB that is not one byte repeated.
fn big_body() -> Vec<u8> {
    (0..1u32 << 20).map(|i| (i % 251) as u8).collect()
}

/// One HTTP/1.1 exchange on `sender`, with `headers` besides `host`: the status, headers
/// and whole body.
async fn exchange(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> (u16, hyper::HeaderMap, bytes::Bytes) {
    use http_body_util::BodyExt;
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "test");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("request");
    sender.ready().await.expect("the connection to the proxy is open");
    let response = sender.send_request(request).await.expect("a response");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("a whole body").to_bytes();
    (parts.status.as_u16(), parts.headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bodies_of_every_framing_pass_through_whole_and_kept_connections_are_reused() {
    let (backend, accepted) = framing_backend();
    let (_proxy, _dir, port, _) = http_proxy(&[backend], "");
    let stream = rampart_testkit::eventually(DEADLINE, "the proxy to listen", || async {
        tokio::net::TcpStream::connect(port).await.ok()
    })
    .await;
    // One client connection (so one proxy worker), one request at a time.
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let upload: Vec<u8> = big_body().into_iter().rev().collect();
    for round in 0..3 {
        let (status, _, body) = exchange(&mut sender, "GET", "/length", &[], vec![]).await;
        assert_eq!(status, 200);
        assert!(
            body == big_body(),
            "round {round}: a content-length body of 1 MiB came back changed"
        );
        let (_, _, body) = exchange(&mut sender, "GET", "/chunked", &[], vec![]).await;
        assert_eq!(&body[..], b"hello, world", "round {round}");
        let (status, headers, body) = exchange(&mut sender, "HEAD", "/anything", &[], vec![]).await;
        assert_eq!((status, body.len()), (200, 0));
        assert_eq!(headers["content-length"], "100", "a HEAD answer keeps its length");
        let (status, _, body) = exchange(&mut sender, "POST", "/continue", &[], b"x".to_vec()).await;
        assert_eq!((status, &body[..]), (201, &b"done"[..]));
        let (_, _, body) = exchange(&mut sender, "POST", "/echo", &[], upload.clone()).await;
        assert!(
            body == upload,
            "round {round}: a request body of 1 MiB came back changed"
        );
    }
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one upstream connection carries every exchange of one client connection"
    );
    // Fields of one hop stay on their hop, both ways; the client joins X-Forwarded-For.
    let sent = [
        ("connection", "x-in"),
        ("x-in", "1"),
        ("te", "trailers"),
        ("x-forwarded-for", "10.9.9.9"),
        ("x-kept", "yes"),
    ];
    let (_, headers, seen) = exchange(&mut sender, "GET", "/headers", &sent, vec![]).await;
    assert!(headers.get("x-out").is_none() && headers.get("keep-alive").is_none());
    let seen = String::from_utf8_lossy(&seen);
    assert!(
        seen.contains("x-forwarded-for: 10.9.9.9, 127.0.0.1") && seen.contains("x-kept: yes"),
        "{seen}"
    );
    assert!(
        !seen.contains("x-in") && !seen.contains("te:") && !seen.contains("connection"),
        "{seen}"
    );
    // A body that ends with its connection comes whole, and that connection is not kept:
    // the first took the kept one, the second needs a new one.
    for _ in 0..2 {
        let (_, _, body) = exchange(&mut sender, "GET", "/close", &[], vec![]).await;
        assert_eq!(&body[..], b"until the end");
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn http2_clients_are_served_over_http1_upstreams() {
    use http_body_util::BodyExt;
    let backend = http_backend("h1-upstream").addr;
    let (_proxy, _dir, port, _) = http_proxy(&[backend], "");
    let stream = rampart_testkit::eventually(DEADLINE, "the proxy to listen", || async {
        tokio::net::TcpStream::connect(port).await.ok()
    })
    .await;
    // HTTP/2 with prior knowledge (h2c), several requests on one connection.
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(connection);
    for i in 0..3 {
        let request = hyper::Request::get(format!("http://{port}/item/{i}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let response = sender.send_request(request).await.expect("h2 response");
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"h1-upstream");
    }
}

/// Whether the backend of `active_checks_...` answers its health check.
static B_HEALTHY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn active_checks_take_an_upstream_out_of_rotation_and_bring_it_back() {
    use std::sync::atomic::Ordering;
    let a = http_backend("a").addr;
    // b serves every request well, but its health check fails until told otherwise.
    let b = scripted_backend(
        "b",
        |_, line| {
            let healthy = !line.contains("/health") || B_HEALTHY.load(Ordering::SeqCst);
            Reply::Status(if healthy { 200 } else { 503 })
        },
        None,
    )
    .addr;
    let (_proxy, _dir, port, admin) = http_proxy(
        &[a, b],
        r#"check = { kind = "http", path = "/health", interval = "100ms", timeout = "100ms", rise = 1, fall = 2 }"#,
    );
    let standing = || async {
        let health: serde_json::Value = reqwest::get(format!("http://{admin}/listeners/web/health"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let upstreams = health["upstreams"].as_array()?.clone();
        let b = upstreams.into_iter().find(|u| u["address"] == b.to_string())?;
        Some((b["check"].as_str()?.to_string(), b["in_rotation"].as_bool()?))
    };
    rampart_testkit::eventually(DEADLINE, "b found down by its check", || async {
        (standing().await? == ("down".to_string(), false)).then_some(())
    })
    .await;
    let http = reqwest::Client::new();
    let get = || async { http.get(format!("http://{port}/")).send().await.ok()?.text().await.ok() };
    for i in 0..10 {
        assert_eq!(get().await.as_deref(), Some("a"), "request {i} while b is down");
    }
    let text = metrics(admin).await;
    let b_series = text
        .lines()
        .find(|l| l.starts_with("rampart_proxy_check_up") && l.contains(&b.to_string()));
    assert!(b_series.is_some_and(|l| l.ends_with(" 0")), "{text}");
    B_HEALTHY.store(true, Ordering::SeqCst);
    rampart_testkit::eventually(DEADLINE, "b back in rotation", || async {
        (standing().await? == ("up".to_string(), true)).then_some(())
    })
    .await;
    let mut answers = std::collections::BTreeSet::new();
    for _ in 0..10 {
        answers.insert(get().await.expect("an answer"));
    }
    assert_eq!(answers, ["a", "b"].map(String::from).into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_zero_ejected_share_keeps_every_upstream_in_rotation() {
    let a = http_backend("a").addr;
    let Backend {
        addr: b, task: b_task, ..
    } = http_backend("b");
    stop(b, b_task).await;
    let (_proxy, _dir, port, admin) = http_proxy(&[a, b], "max_ejected_percent = 0");
    let http = reqwest::Client::new();
    let get = || {
        let http = http.clone();
        async move { http.get(format!("http://{port}/")).send().await.ok()?.text().await.ok() }
    };
    rampart_testkit::eventually(DEADLINE, "the proxy to listen", || async { get().await }).await;
    for i in 0..10 {
        assert_eq!(get().await.as_deref(), Some("a"), "request {i}");
    }
    let metrics = metrics(admin).await;
    assert!(!metrics.contains("rampart_proxy_ejections_total{"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backend_killed_under_load_costs_reads_nothing_and_returns_to_rotation() {
    let Backend { addr: a, .. } = http_backend("a");
    let Backend {
        addr: b, task: b_task, ..
    } = http_backend("b");
    let (_proxy, _dir, port, admin) = http_proxy(&[a, b], "");
    let url = format!("http://{port}/item");
    let http = reqwest::Client::new();
    rampart_testkit::eventually(DEADLINE, "the proxy to answer", || async {
        http.get(&url).send().await.ok()?.status().is_success().then_some(())
    })
    .await;

    // Four readers and one writer send requests back to back until told to stop; each
    // records its outcomes (the backend's name, or the status or error).
    let stop_load = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for worker in 0..5 {
        let (http, url, stop_load) = (http.clone(), url.clone(), stop_load.clone());
        load.spawn(async move {
            let method = if worker == 0 {
                reqwest::Method::POST
            } else {
                reqwest::Method::GET
            };
            let mut outcomes = Vec::new();
            while !stop_load.load(std::sync::atomic::Ordering::SeqCst) {
                let outcome = match http.request(method.clone(), &url).send().await {
                    Ok(r) if r.status().is_success() => r.text().await.unwrap_or_default(),
                    Ok(r) => r.status().to_string(),
                    Err(e) => e.to_string(),
                };
                outcomes.push(outcome);
            }
            (method, outcomes)
        });
    }
    let served = |body: &str| metrics_count(body, "rampart_proxy_requests_total", "code=\"200\"");
    rampart_testkit::eventually(DEADLINE, "load before the kill", || async {
        (served(&metrics(admin).await) >= 200.0).then_some(())
    })
    .await;
    stop(b, b_task).await;
    let before = served(&metrics(admin).await);
    rampart_testkit::eventually(DEADLINE, "load after the kill", || async {
        (served(&metrics(admin).await) >= before + 300.0).then_some(())
    })
    .await;
    let ejections = metrics(admin).await;
    assert!(
        ejections.contains(&format!(
            "rampart_proxy_ejections_total{{listener=\"web\",upstream=\"{b}\"}}"
        )),
        "b ejected: {ejections}"
    );

    // b comes back on its port: it is in rotation again once its ejection ends.
    let Backend { task: _b_again, .. } = scripted_backend_at(b, "b", |_, _| Reply::Status(200), None);
    rampart_testkit::eventually(DEADLINE, "b back in rotation", || async {
        let body = http.get(&url).send().await.ok()?.text().await.ok()?;
        (body == "b").then_some(())
    })
    .await;
    stop_load.store(true, std::sync::atomic::Ordering::SeqCst);
    while let Some(done) = load.join_next().await {
        let (method, outcomes) = done.expect("load task");
        let failed: Vec<&String> = outcomes.iter().filter(|o| *o != "a" && *o != "b").collect();
        if method == reqwest::Method::GET {
            assert!(failed.is_empty(), "GET failures: {failed:?}");
        } else {
            // A POST in flight when b died may have reached it: not retried, at most one.
            assert!(failed.len() <= 1, "POST failures: {failed:?}");
        }
        assert!(outcomes.len() > 10, "{method} sent {}", outcomes.len());
    }
}

/// The value of one series of `name` whose labels contain `label`, 0 if absent.
pub(crate) fn metrics_count(body: &str, name: &str, label: &str) -> f64 {
    body.lines()
        .filter(|line| line.starts_with(name) && line.contains(label))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ip_hash_moves_only_the_clients_of_a_dead_upstream() {
    let backends: Vec<_> = ["a", "b", "c", "d", "e"].into_iter().map(backend).collect();
    let list = backends
        .iter()
        .map(|(addr, _)| format!("\"{addr}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let port = rampart_testkit::cluster::free_port().expect("port");
    let (_proxy, _dir) = start_proxy(&format!(
        r#"
[[proxy.listeners]]
name = "sticky"
bind = "{port}"
algorithm = "ip-hash"
upstreams = [{list}]
"#
    ));
    rampart_testkit::eventually(DEADLINE, "the proxy to listen", || async {
        ask(&port.to_string()).await
    })
    .await;
    // 200 clients, each from its own loopback address.
    let clients: Vec<std::net::Ipv4Addr> = (0..200u32)
        .map(|i| std::net::Ipv4Addr::new(127, 0, 1 + (i / 250) as u8, 2 + (i % 250) as u8))
        .collect();
    let mut first = Vec::new();
    for client in &clients {
        first.push(ask_from(port, *client).await.expect("an answer"));
    }
    for client in clients.iter().take(20) {
        let again = ask_from(port, *client).await.expect("an answer");
        assert_eq!(
            Some(&again),
            first.get(clients.iter().position(|c| c == client).unwrap_or(0)),
            "sticky"
        );
    }
    let mut backends = backends;
    let (c_addr, c_task) = backends.remove(2);
    stop(c_addr, c_task).await;
    let mut moved = 0;
    for (client, before) in clients.iter().zip(&first) {
        let now = ask_from(port, *client).await.expect("an answer after c died");
        if before == "c" {
            assert_ne!(now, "c");
            moved += 1;
        } else {
            assert_eq!(&now, before, "a client of a live upstream must stay on it");
        }
    }
    // About 1/5 of the clients were on c.
    assert!((20..=70).contains(&moved), "moved {moved} of 200");
}
