//! Alert webhooks, sent by the leader: primary changes (failover, switchover), instances
//! confirmed down, failed hooks, blocked failovers, and failed or stale backups. Generic receivers get the event as
//! JSON; Slack incoming webhooks get `{"text": ...}`. Alerts wait in a bounded queue and
//! are retried with backoff within a budget; a full queue or a dead receiver costs alerts
//! (counted), never a failover.

use std::time::Duration;

use rampart_core::api::Event;
use tokio::sync::mpsc;

use crate::node::Shared;

/// Alerts waiting to be sent; beyond this they are dropped (and counted).
pub const QUEUE_MAX: usize = 1024;
/// Attempts per alert and receiver, with doubling pauses from 200 ms.
const ATTEMPTS_MAX: u32 = 5;
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Whether an event is worth waking someone for.
pub fn alerting(event: &Event) -> bool {
    match event.kind.as_str() {
        "failover" | "switchover" | "region" => true,
        "health" => event.action == "instance.down",
        "hook" | "backup" => event.outcome != "ok",
        // A rebuild, a failure, or no synchronous replica (writes wait or go unreplicated).
        "postgres" => event.outcome != "ok" || event.action == "postgres.rebuild",
        _ => false,
    }
}

/// Queues an alert if the event calls for one and any receiver is configured.
pub fn raise(node: &Shared, event: &Event) {
    if !alerting(event) || (node.config.alert_webhooks.is_empty() && node.config.alert_slack_webhooks.is_empty()) {
        return;
    }
    if node.alerts.try_send(event.clone()).is_err() {
        node.metrics.alerts_dropped.inc();
        tracing::warn!(action = %event.action, "alert queue full: alert dropped");
    }
}

fn slack_text(node: &Shared, event: &Event) -> String {
    format!(
        "[rampart {}] {} {}: {} ({})",
        node.config.region, event.kind, event.action, event.outcome, event.detail
    )
}

pub async fn run(node: Shared, mut queue: mpsc::Receiver<Event>) {
    let client = match reqwest::Client::builder().timeout(ATTEMPT_TIMEOUT).build() {
        Ok(client) => client,
        Err(e) => {
            tracing::error!("alerts disabled: {e}");
            return;
        }
    };
    while let Some(event) = queue.recv().await {
        let generic = serde_json::json!({ "region": node.config.region, "event": event });
        let slack = serde_json::json!({ "text": slack_text(&node, &event) });
        let targets = node
            .config
            .alert_webhooks
            .iter()
            .map(|url| (url, &generic))
            .chain(node.config.alert_slack_webhooks.iter().map(|url| (url, &slack)));
        for (url, body) in targets {
            let mut pause = Duration::from_millis(200);
            let mut delivered = false;
            for attempt in 1..=ATTEMPTS_MAX {
                match client.post(url).json(body).send().await {
                    Ok(r) if r.status().is_success() => {
                        delivered = true;
                        break;
                    }
                    Ok(r) => tracing::debug!(%url, attempt, status = %r.status(), "alert refused"),
                    Err(e) => tracing::debug!(%url, attempt, "alert not delivered: {e}"),
                }
                if attempt < ATTEMPTS_MAX {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
            if delivered {
                node.metrics.alerts_sent.inc();
            } else {
                node.metrics.alerts_failed.inc();
                tracing::warn!(%url, action = %event.action, "alert given up after {ATTEMPTS_MAX} attempts");
            }
        }
    }
}
