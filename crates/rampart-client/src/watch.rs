//! A watch that survives node failures: it reads server-sent events and, when a stream
//! ends, reconnects to the next endpoint from its last revision + 1, so the caller sees
//! every change once and in order, across leader changes.

use std::time::Duration;

use futures_util::StreamExt;
use rampart_core::api::WatchEvent;
use tokio::sync::mpsc;

use crate::{encode, Client, ClientError};

/// Events delivered to the caller and not yet read; the watch pauses when it is full.
const BUFFER_EVENTS: usize = 1024;
/// Reconnect attempts in a row without receiving anything before the watch gives up.
const RECONNECTS_MAX: u32 = 50;

/// Receives watch events; dropping it stops the watch.
pub struct WatchStream {
    rx: mpsc::Receiver<Result<WatchEvent, ClientError>>,
}

impl WatchStream {
    /// The next change, or an error after which the watch has stopped, or `None` if it ended.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, ClientError>> {
        self.rx.recv().await
    }
}

pub(crate) fn start(client: &Client, prefix: &str, from_revision: Option<u64>) -> WatchStream {
    let (tx, rx) = mpsc::channel(BUFFER_EVENTS);
    let endpoints = client.endpoints().to_vec();
    let http = client.http().clone();
    let prefix = prefix.to_string();
    tokio::spawn(async move {
        let mut next_revision = from_revision;
        let mut failures = 0u32;
        let mut index = 0usize;
        let mut last_error = String::new();
        while failures < RECONNECTS_MAX {
            let endpoint = &endpoints[index % endpoints.len()];
            index += 1;
            let mut url = format!("{endpoint}/v1/watch?prefix={}", encode(&prefix));
            if let Some(revision) = next_revision {
                url.push_str(&format!("&from_revision={revision}"));
            }
            match http.get(&url).send().await {
                Ok(response) if response.status().is_success() => {
                    let mut body = response.bytes_stream();
                    let mut buffer = String::new();
                    while let Some(chunk) = body.next().await {
                        let Ok(chunk) = chunk else { break };
                        buffer.push_str(&String::from_utf8_lossy(&chunk));
                        while let Some(end) = buffer.find("\n\n") {
                            let frame: String = buffer.drain(..end + 2).collect();
                            let data: String = frame
                                .lines()
                                .filter_map(|l| l.strip_prefix("data:"))
                                .map(str::trim_start)
                                .collect::<Vec<_>>()
                                .join("\n");
                            let is_error = frame
                                .lines()
                                .any(|l| l.trim() == "event: error" || l.trim() == "event:error");
                            if data.is_empty() || is_error {
                                continue;
                            }
                            if let Ok(event) = serde_json::from_str::<WatchEvent>(&data) {
                                failures = 0;
                                next_revision = Some(event.revision + 1);
                                // Several events share a revision (lease revoke): resume at the
                                // revision itself would repeat them, so resume after it.
                                if tx.send(Ok(event)).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    last_error = format!("{endpoint}: stream ended");
                }
                Ok(response) => {
                    let status = response.status();
                    let bytes = response.bytes().await.unwrap_or_default();
                    let error = crate::decode_error(status, &bytes);
                    // Terminal: compacted history, bad input, and authentication refusals
                    // (429 too_many_auth_failures too); a 429 for load is retried.
                    let auth_refused = error.code() == Some("too_many_auth_failures");
                    if error.code() == Some("compacted")
                        || auth_refused
                        || status.is_client_error() && status.as_u16() != 429
                    {
                        let _ = tx.send(Err(error)).await;
                        return;
                    }
                    last_error = format!("{endpoint}: {error}");
                }
                Err(e) => last_error = format!("{endpoint}: {e}"),
            }
            failures += 1;
            if tx.is_closed() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50 * u64::from(failures.min(10)))).await;
        }
        let _ = tx
            .send(Err(ClientError::Unavailable {
                deadline_ms: 0,
                last_error,
            }))
            .await;
    });
    WatchStream { rx }
}
