//! The API reference, `docs/api/openapi.yaml`, is valid OpenAPI 3 to a strict parser and
//! documents exactly the routes the node serves: every route of the router is documented,
//! and every documented operation reaches a handler on a running node.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{cluster, DEADLINE};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// (path, method) pairs, methods lowercase.
type Operations = BTreeSet<(String, String)>;

/// The documented operations, after `scripts/check-openapi` accepted the file (duplicate
/// keys refused, OpenAPI 3.0 schema validated).
fn documented() -> Operations {
    let python = std::env::var("RAMPART_TEST_PYTHON").unwrap_or_else(|_| {
        let default = repo_root().join("target/tools/venv/bin/python");
        assert!(
            default.exists(),
            "the OpenAPI check needs the test tools: run scripts/test (or scripts/install-test-tools) first"
        );
        default.display().to_string()
    });
    let root = repo_root();
    let output = Command::new(python)
        .arg(root.join("scripts/check-openapi"))
        .arg(root.join("docs/api/openapi.yaml"))
        .output()
        .expect("run scripts/check-openapi");
    assert!(
        output.status.success(),
        "docs/api/openapi.yaml is not valid OpenAPI 3: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let paths: BTreeMap<String, Vec<String>> = serde_json::from_slice(&output.stdout).expect("the checker prints JSON");
    paths
        .into_iter()
        .flat_map(|(path, methods)| methods.into_iter().map(move |m| (path.clone(), m)))
        .collect()
}

/// The routes the node's router declares, read from its source: each `.route("PATH", ...)`
/// with the methods its handlers are registered for.
fn routed() -> Operations {
    let source = std::fs::read_to_string(repo_root().join(ROUTER_SOURCE)).expect("read the router's source");
    let mut operations = Operations::new();
    let mut rest = source.as_str();
    while let Some(at) = rest.find(".route(") {
        rest = &rest[at + ".route(".len()..];
        let call = &rest[..closing_paren(rest)];
        let path = call.split('"').nth(1).expect("a route's path is a string literal");
        // axum writes a catch-all segment `{*key}`; OpenAPI names it `{key}`.
        let path = path.replace("{*", "{");
        for method in ["get", "put", "post", "delete", "patch"] {
            let called = call.match_indices(&format!("{method}(")).any(|(i, _)| {
                i == 0 || !call.as_bytes()[i - 1].is_ascii_alphanumeric() && call.as_bytes()[i - 1] != b'_'
            });
            if called {
                operations.insert((path.clone(), method.to_string()));
            }
        }
    }
    assert!(
        operations.len() > 20,
        "found too few routes in {ROUTER_SOURCE}: {operations:?}"
    );
    operations
}

/// Where `router()` is written.
const ROUTER_SOURCE: &str = "crates/rampart-node/src/api.rs";

/// The index of the parenthesis that closes the call whose arguments start `text`.
fn closing_paren(text: &str) -> usize {
    let mut depth = 1;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    panic!("unbalanced .route( call in {ROUTER_SOURCE}");
}

#[test]
fn the_api_reference_is_valid_and_documents_every_route() {
    let documented = documented();
    let routed = routed();
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from docs/api/openapi.yaml: {undocumented:?}"
    );
    assert!(
        unrouted.is_empty(),
        "documented operations the router lacks: {unrouted:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_documented_operation_reaches_a_handler() {
    let cluster = cluster(1).await;
    cluster.wait_for_leader(DEADLINE).await;
    let base = format!("http://{}", cluster.endpoints()[0]);
    let http = reqwest::Client::new();
    for (path, method) in documented() {
        // Sample values: numeric ids parse for leases and members; names are plain.
        let url = format!(
            "{base}{}",
            path.replace("{key}", "probe/k")
                .replace("{id}", "7")
                .replace("{name}", "probe")
        );
        let method = reqwest::Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let answer = http
            .request(method.clone(), &url)
            .header("content-type", "application/json")
            .body("{}")
            .timeout(std::time::Duration::from_secs(10))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = answer.status().as_u16();
        assert_ne!(
            status, 405,
            "{method} {path} is documented but not routed for that method"
        );
        if status == 404 {
            // A handler's 404 names what is missing; only the fallback says no_route.
            let body: serde_json::Value = answer.json().await.unwrap_or_default();
            assert_ne!(
                body["error"]["code"], "no_route",
                "{method} {path} is documented but not routed"
            );
        }
    }
}
