//! Bad input gets a clear error with a stable code and changes nothing.

use rampart_client::PutOptions;

use crate::{cluster, DEADLINE};

/// (what, method, url, body, expected status, expected code)
type Case = (&'static str, reqwest::Method, String, Vec<u8>, u16, &'static str);

async fn send(method: reqwest::Method, url: String, body: Vec<u8>) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .request(method, url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("send");
    let status = response.status().as_u16();
    let body = response.json().await.expect("every error is JSON");
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_and_oversized_requests_are_refused_without_change() {
    let cluster = cluster(3).await;
    cluster.wait_for_leader(DEADLINE).await;
    let client = cluster.client();
    client
        .put("input/k", "original", PutOptions::default())
        .await
        .expect("put");
    let (revision_before, checksum_before) = cluster.wait_converged(DEADLINE).await;
    let base = format!("http://{}", cluster.endpoints()[0]);
    let put = reqwest::Method::PUT;

    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            put.clone(),
            format!("{base}/v1/kv/input/k"),
            b"{\"value\": ".to_vec(),
            400,
            "bad_json",
        ),
        (
            "unknown field",
            put.clone(),
            format!("{base}/v1/kv/input/k"),
            br#"{"value":"x","ttl":3}"#.to_vec(),
            400,
            "bad_json",
        ),
        (
            "value of wrong type",
            put.clone(),
            format!("{base}/v1/kv/input/k"),
            br#"{"value":7}"#.to_vec(),
            400,
            "bad_json",
        ),
        (
            "key over 1 KiB",
            put.clone(),
            format!("{base}/v1/kv/{}", "k".repeat(1025)),
            br#"{"value":"x"}"#.to_vec(),
            400,
            "key_too_long",
        ),
        (
            "value over 1 MiB",
            put.clone(),
            format!("{base}/v1/kv/input/k"),
            format!("{{\"value\":\"{}\"}}", "v".repeat(1024 * 1024 + 1)).into_bytes(),
            413,
            "value_too_large",
        ),
        (
            "body over the limit",
            put.clone(),
            format!("{base}/v1/kv/input/k"),
            format!("{{\"value\":\"{}\"}}", "v".repeat(3 * 1024 * 1024)).into_bytes(),
            413,
            "body_too_large",
        ),
        (
            "lease TTL of zero",
            reqwest::Method::POST,
            format!("{base}/v1/leases"),
            br#"{"ttl_ms":0}"#.to_vec(),
            400,
            "bad_ttl",
        ),
        (
            "bad consistency",
            reqwest::Method::GET,
            format!("{base}/v1/kv/input/k?consistency=sometimes"),
            Vec::new(),
            400,
            "bad_consistency",
        ),
        (
            "missing lease",
            put.clone(),
            format!("{base}/v1/kv/input/k"),
            br#"{"value":"x","lease":999}"#.to_vec(),
            404,
            "lease_not_found",
        ),
        (
            "stale compare-and-set",
            put.clone(),
            format!("{base}/v1/kv/input/k"),
            br#"{"value":"x","if_revision":0}"#.to_vec(),
            409,
            "revision_mismatch",
        ),
    ];
    for (what, method, url, body, status, code) in cases {
        let (got_status, body) = send(method, url, body).await;
        assert_eq!(got_status, status, "{what}: {body}");
        assert_eq!(body["error"]["code"], code, "{what}: {body}");
        assert!(
            !body["error"]["message"].as_str().unwrap_or_default().is_empty(),
            "{what}: empty message"
        );
    }

    let kv = client
        .get_key("input/k", false)
        .await
        .expect("get")
        .expect("key still there");
    assert_eq!(kv.value, "original");
    let (revision_after, checksum_after) = cluster.wait_converged(DEADLINE).await;
    assert_eq!(
        (revision_after, checksum_after),
        (revision_before, checksum_before),
        "refused requests changed state"
    );
}
