//! Where a listener sends traffic: its pool of upstreams and, for a listener of a
//! registry service, the replicas that take reads while the service has no primary
//! (read-only mode), kept up to date by following the registry with blocking reads.
//!
//! The registry is followed with `Client::service_watch` (one watch per service, shared by
//! its listeners). While the control plane cannot be reached the last view stays in force:
//! a proxy that lost its control plane keeps routing as it last knew. Given several
//! regions' endpoints, it follows the region that answers, and never goes back to a view
//! of an older region epoch than one it has applied; a primary region that may be losing
//! its lease refuses to answer (`region_lease_lost`), so the proxy moves on to the region
//! that takes over.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rampart_client::Client;
use rampart_core::api::ServiceView;
use rampart_core::proxy::{route, Listener, Route, Upstreams};

use crate::metrics::Metrics;
use crate::pool::Pool;

/// How long one blocking read of the registry waits for a change.
const WATCH_WAIT: Duration = Duration::from_secs(10);
/// Pause after a failed read, doubling up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often a service the registry does not have is looked for again.
const NOT_FOUND_PAUSE: Duration = Duration::from_secs(1);

pub struct Target {
    pub pool: Arc<Pool>,
    /// Replicas for reads while a `route = primary` service has no primary.
    pub readers: Arc<Pool>,
    /// The registry service and route, for listeners that follow one.
    pub service: Option<(String, Route)>,
    /// The latest view of the service (none yet, or a static listener).
    view: Mutex<Option<ServiceView>>,
    drain: Duration,
}

impl Target {
    pub fn new(listener: &Listener, metrics: Arc<Metrics>) -> Target {
        let (upstreams, service) = match &listener.upstreams {
            Upstreams::Static(list) => (list.as_slice(), None),
            Upstreams::Service { name, route } => (&[][..], Some((name.clone(), *route))),
        };
        Target {
            pool: Arc::new(Pool::new(listener, upstreams, metrics.clone())),
            readers: Arc::new(Pool::new(listener, &[], metrics)),
            service,
            view: Mutex::new(None),
            drain: Duration::from_millis(listener.drain_timeout_ms),
        }
    }

    /// The latest view of the listener's service, if it follows one and has seen it.
    pub fn view(&self) -> Option<ServiceView> {
        self.view.lock().expect("view lock").clone()
    }

    /// Why a listener of `service` cannot answer yet: it has had no view of it.
    pub fn no_view(listener: &str, service: &str) -> String {
        format!("listener {listener} has not yet read service {service} from the control plane")
    }

    /// Whether a view of the service has arrived (without copying it: asked per request).
    pub fn has_view(&self) -> bool {
        self.view.lock().expect("view lock").is_some()
    }

    /// Whether the service is known to have no primary now (read-only mode).
    pub fn read_only(&self) -> bool {
        matches!(self.service, Some((_, Route::Primary))) && self.pool.is_empty() && self.has_view()
    }

    /// Applies a new view (or `None`: the service no longer exists). Connections to a
    /// primary that lost its role end at once, since writes must not reach it; to other
    /// upstreams that left, after the drain timeout.
    fn apply(&self, view: Option<ServiceView>) {
        let Some((_, route_to)) = &self.service else { return };
        let routing = view.as_ref().map(|v| route(v, *route_to)).unwrap_or_default();
        let leave = if *route_to == Route::Primary {
            Duration::ZERO
        } else {
            self.drain
        };
        self.pool.replace(&routing.upstreams, leave);
        self.readers.replace(&routing.read_only, self.drain);
        *self.view.lock().expect("view lock") = view;
    }
}

/// Follows every service the targets route to, one watch per service, until dropped.
pub async fn follow_all(client: Arc<Client>, targets: Vec<Arc<Target>>) {
    let mut by_service: BTreeMap<String, Vec<Arc<Target>>> = BTreeMap::new();
    for target in targets {
        if let Some((name, _)) = &target.service {
            by_service.entry(name.clone()).or_default().push(target.clone());
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for (name, targets) in by_service {
        tasks.spawn(follow(client.clone(), name, targets));
    }
    while tasks.join_next().await.is_some() {}
}

async fn follow(client: Arc<Client>, service: String, targets: Vec<Arc<Target>>) {
    let mut index = 0;
    let mut pause = RETRY_FIRST;
    // The newest region epoch a view came from: a region that lost a failover may still
    // answer for a while, and its view must not send traffic back to its fenced primary.
    let mut newest_epoch = 0;
    loop {
        match client.service_watch(&service, index, WATCH_WAIT).await {
            Ok(view) if view.epoch < newest_epoch => {
                tracing::warn!(%service, epoch = view.epoch, newest_epoch, "ignoring a view from an older region epoch (keeping the last view)");
                index = 0;
            }
            Ok(view) => {
                newest_epoch = view.epoch;
                if index == 0 || view.index != index {
                    tracing::debug!(%service, primary = ?view.primary, serving = ?view.serving, "registry view");
                }
                index = view.index;
                pause = RETRY_FIRST;
                for target in &targets {
                    target.apply(Some(view.clone()));
                }
                continue;
            }
            Err(e) if e.code() == Some("service_not_found") => {
                tracing::warn!(%service, "the registry has no such service; no upstreams until it does");
                for target in &targets {
                    target.apply(None);
                }
                index = 0;
                tokio::time::sleep(NOT_FOUND_PAUSE).await;
                continue;
            }
            Err(e) => {
                tracing::warn!(%service, "cannot read the registry (keeping the last view): {e}");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RETRY_MAX);
    }
}
