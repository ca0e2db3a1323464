//! `GET /v1/watch`: changes as server-sent events, in revision order, from any node.
//!
//! History and live feed are joined under the state lock, so a watch sees every change
//! once: first what it missed (from the bounded history), then what is applied next. A
//! watch that falls too far behind is closed with an `error` event; the client resumes from
//! its last revision + 1, on this node or any other, since every node applies the same log.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, StreamExt};
use rampart_core::api::WatchEvent;
use serde::Deserialize;
use tokio::sync::broadcast::error::RecvError;

use crate::auth::Caller;
use crate::error::ApiError;
use crate::node::Shared;
use axum::Extension;
use rampart_core::auth::{Role, Scope};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchQuery {
    #[serde(default)]
    prefix: String,
    from_revision: Option<u64>,
}

/// Releases the watcher slot when the stream is dropped.
struct Slot(Shared);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.watchers.fetch_sub(1, Ordering::SeqCst);
        self.0.metrics.watchers.dec();
    }
}

fn sse_event(event: &WatchEvent) -> Event {
    Event::default()
        .id(event.revision.to_string())
        .event(event.kind.clone())
        .data(serde_json::to_string(event).expect("event encodes"))
}

pub async fn watch(
    State(node): State<Shared>,
    Extension(caller): Extension<Caller>,
    Query(query): Query<WatchQuery>,
) -> Response {
    if let Err(denied) = caller.check(Role::Read, Scope::Prefix(&query.prefix)) {
        return denied.into_response();
    }
    let max = node.config.limits.watchers_max;
    if node.watchers.fetch_add(1, Ordering::SeqCst) >= max {
        node.watchers.fetch_sub(1, Ordering::SeqCst);
        return ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_watchers",
            format!("this node already serves {max} watches (--watchers-max); use another node or close some"),
        )
        .into_response();
    }
    node.metrics.watchers.inc();
    let slot = Slot(node.clone());

    let (from, missed, feed) = {
        let applied = node.applied.read().expect("state lock");
        let from = query.from_revision.unwrap_or(applied.state.revision() + 1);
        match applied.history_from(from) {
            Ok(missed) => (from, missed, node.sm.subscribe()),
            Err(compacted) => {
                return ApiError::new(
                    StatusCode::GONE,
                    "compacted",
                    format!(
                        "revision {from} is compacted; the oldest revision a watch can resume from is {}",
                        compacted + 1
                    ),
                )
                .with_current(serde_json::json!({ "compact_revision": compacted }))
                .into_response();
            }
        }
    };
    let prefix = query.prefix;
    // Live events start after the replayed ones and never before `from`.
    let live_floor = missed.last().map_or(from, |e| e.revision + 1).max(from);
    let replay = stream::iter(missed.into_iter().filter({
        let prefix = prefix.clone();
        move |e| e.key.starts_with(&prefix)
    }))
    .map(|e| Ok::<_, Infallible>(sse_event(&e)));
    let live = stream::unfold((feed, slot, false), move |(mut feed, slot, done)| {
        let prefix = prefix.clone();
        let caller = caller.clone();
        async move {
            if done {
                return None;
            }
            loop {
                match feed.recv().await {
                    Ok(event) if event.kind == rampart_store::state_machine::RESET_KIND => {
                        let message = format!(
                            "this node's state was replaced by a snapshot at revision {}: read again, then watch from there",
                            event.revision
                        );
                        let data = serde_json::json!({ "code": "compacted", "message": message });
                        let event = Event::default().event("error").data(data.to_string());
                        return Some((Ok(event), (feed, slot, true)));
                    }
                    Ok(event) if event.revision >= live_floor && event.key.starts_with(&prefix) => {
                        if !caller.still_valid(&slot.0) {
                            let event = Event::default()
                                .event("error")
                                .data(r#"{"code":"unauthenticated","message":"this watch's token was revoked"}"#);
                            return Some((Ok(event), (feed, slot, true)));
                        }
                        return Some((Ok::<_, Infallible>(sse_event(&event)), (feed, slot, false)));
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(_)) => {
                        let event = Event::default().event("error").data(
                            r#"{"code":"lagged","message":"watch fell behind; resume from your last revision + 1"}"#,
                        );
                        return Some((Ok(event), (feed, slot, true)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        }
    });
    Sse::new(replay.chain(live))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
