//! The proxy's Prometheus metrics (`GET /metrics` on `[proxy] admin`), all named
//! `rampart_proxy_*`.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub listener: String,
    /// The status the client got (`http`).
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub listener: String,
    pub upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuotaLabels {
    pub listener: String,
    pub tier: String,
    /// `rate`, `daily` or `clients`.
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    pub listener: String,
    pub priority: String,
}

pub struct Metrics {
    registry: Registry,
    /// HTTP requests answered, by status (including the proxy's own 502/503/504).
    pub requests: Family<StatusLabels, Counter>,
    /// TCP connections accepted.
    pub connections: Family<ListenerLabels, Counter>,
    /// Client connections (tcp) or requests (http) in flight.
    pub active: Family<ListenerLabels, Gauge>,
    /// Time from sending a request to an upstream to its response head.
    pub upstream_seconds: Family<ListenerLabels, Histogram>,
    pub ejections: Family<UpstreamLabels, Counter>,
    /// 0 closed, 1 open, 2 half-open.
    pub breaker_state: Family<UpstreamLabels, Gauge>,
    /// The active check's verdict: 1 up, 0 down (set once a verdict is reached).
    pub check_up: Family<UpstreamLabels, Gauge>,
    pub retries: Family<ListenerLabels, Counter>,
    pub shed: Family<ShedLabels, Counter>,
    pub faults: Family<ListenerLabels, Counter>,
    pub quota_rejections: Family<QuotaLabels, Counter>,
    /// Requests of a cluster-scope quota counted locally: the control plane did not answer.
    pub quota_fallbacks: Family<ListenerLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("rampart_proxy");
        let requests = Family::<StatusLabels, Counter>::default();
        registry.register("requests", "HTTP requests answered, by status", requests.clone());
        let connections = Family::<ListenerLabels, Counter>::default();
        registry.register("connections", "TCP connections accepted", connections.clone());
        let active = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "active",
            "Connections (tcp) or requests (http) in flight",
            active.clone(),
        );
        let upstream_seconds = Family::<ListenerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        });
        registry.register(
            "upstream_seconds",
            "Time from a request sent to an upstream to its response head",
            upstream_seconds.clone(),
        );
        let ejections = Family::<UpstreamLabels, Counter>::default();
        registry.register("ejections", "Upstreams taken out of rotation", ejections.clone());
        let breaker_state = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "breaker_state",
            "Circuit breaker per upstream: 0 closed, 1 open, 2 half-open",
            breaker_state.clone(),
        );
        let check_up = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "check_up",
            "Active check verdict per upstream: 1 up, 0 down",
            check_up.clone(),
        );
        let retries = Family::<ListenerLabels, Counter>::default();
        registry.register("retries", "Idempotent requests sent again", retries.clone());
        let shed = Family::<ShedLabels, Counter>::default();
        registry.register("shed", "Requests shed under overload, by priority", shed.clone());
        let faults = Family::<ListenerLabels, Counter>::default();
        registry.register("faults", "Requests aborted by fault injection", faults.clone());
        let quota_rejections = Family::<QuotaLabels, Counter>::default();
        registry.register(
            "quota_rejections",
            "Requests refused for being over a client's quota",
            quota_rejections.clone(),
        );
        let quota_fallbacks = Family::<ListenerLabels, Counter>::default();
        registry.register(
            "quota_fallbacks",
            "Requests of a cluster-scope quota counted locally because the control plane did not answer",
            quota_fallbacks.clone(),
        );
        Metrics {
            registry,
            requests,
            connections,
            active,
            upstream_seconds,
            ejections,
            breaker_state,
            check_up,
            retries,
            shed,
            faults,
            quota_rejections,
            quota_fallbacks,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    pub fn listener(name: &str) -> ListenerLabels {
        ListenerLabels {
            listener: name.to_string(),
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
