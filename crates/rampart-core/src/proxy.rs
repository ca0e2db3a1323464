//! The proxy's configuration schema and its load-balancing policy.
//!
//! `[[proxy.listeners]]` tables (in `rampart proxy --config FILE`, or a node's config)
//! validate into [`Listener`]s; a bad field is reported by its path, its value and what is
//! allowed. [`Balancer`] picks an upstream for each new connection or request from the
//! healthy candidates; it is a plain state machine fed with the randomness it needs, so
//! every choice can be tested.

use std::hash::{Hash, Hasher};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::field::{duration_ms, field_error, number_in, FieldError};

const LISTENERS_MAX: usize = 256;
const UPSTREAMS_MAX: usize = 1024;
const WEIGHT_MAX: u32 = 1000;
const CONNECT_TIMEOUT_MS_DEFAULT: u64 = 1000;
const TRY_TIMEOUT_MS_DEFAULT: u64 = 30_000;
const DRAIN_TIMEOUT_MS_DEFAULT: u64 = 30_000;

/// A proxy config file: its `[proxy]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyFile {
    #[serde(default)]
    pub proxy: ProxySpec,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxySpec {
    /// `HOST:PORT` serving `GET /metrics` (optional).
    pub admin: Option<String>,
    /// Quota tiers by name: `[proxy.quota_tiers.free] rate = 5, burst = 10, daily = 1000`.
    #[serde(default)]
    pub quota_tiers: std::collections::BTreeMap<String, TierSpec>,
    /// Client keys (an API key, or an IP address) and their tier.
    #[serde(default)]
    pub quota_clients: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub listeners: Vec<ListenerSpec>,
}

/// One `[[proxy.listeners]]` table as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    pub name: Option<String>,
    /// `HOST:PORT` to listen on.
    pub bind: Option<String>,
    /// `tcp` (default) or `http`.
    pub mode: Option<String>,
    /// Static upstreams: `"HOST:PORT"` or `{ address = "HOST:PORT", weight = N }`.
    pub upstreams: Option<Vec<UpstreamSpec>>,
    /// A service of the registry instead of static upstreams.
    pub service: Option<String>,
    /// With `service`: `primary` (default), `replicas` or `any`.
    pub route: Option<String>,
    /// `round-robin` (default), `weighted`, `least-connections`, `ip-hash` or `p2c`.
    pub algorithm: Option<String>,
    /// How long a connection to an upstream may take before the next one is tried.
    pub connect_timeout: Option<String>,
    /// `http`: how long one try of a request may take to get its response head.
    pub try_timeout: Option<String>,
    /// `http`: further tries of an idempotent request whose upstream failed or timed out
    /// (default 2), within the retry budget.
    pub retries: Option<u32>,
    /// The largest share of upstreams passive ejection may take out at once, in percent
    /// (default 50; 0 never ejects).
    pub max_ejected_percent: Option<u32>,
    /// `http`: at most this many requests in flight; under that load `X-Priority: low`
    /// requests are shed first, then normal ones (default: no limit).
    pub max_requests: Option<u32>,
    /// `http`: fault injection for drills (off unless set).
    pub fault: Option<FaultSpec>,
    /// `http`: quotas per client key (off unless set).
    pub quota: Option<QuotaSpec>,
    /// With `service`: how long connections to an upstream that left the listener's set
    /// may go on before they are closed (default 30s). Connections to a primary that lost
    /// its role are closed at once, whatever this says.
    pub drain_timeout: Option<String>,
    /// Passive ejection: `{ consecutive_errors = 5, base = "1s", max = "30s" }`.
    pub ejection: Option<EjectionSpec>,
    /// Circuit breaker per upstream:
    /// `{ window = "10s", min_requests = 20, failure_percent = 50, open = "5s", probes = 3 }`.
    pub breaker: Option<BreakerSpec>,
    /// `http` with `route = "primary"`: the methods that still go through, to replicas,
    /// while the service has no primary (default GET, HEAD, OPTIONS); others get 503.
    pub read_methods: Option<Vec<String>>,
    /// Active checks of static upstreams (a service's instances are checked by the region).
    pub check: Option<ActiveCheckSpec>,
}

/// `quota = { key = "header:X-Api-Key", default_tier = "free" }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaSpec {
    /// `ip` (default) or `header:NAME`.
    pub key: Option<String>,
    /// The tier of clients not in `quota_clients` (default `default`).
    pub default_tier: Option<String>,
    /// `local` (default): each proxy counts on its own; `cluster`: every proxy of the
    /// region draws on one standing per client, kept by the control plane.
    pub scope: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierSpec {
    /// Requests a second, sustained.
    pub rate: Option<u32>,
    /// Requests allowed at once above the rate (default: the rate).
    pub burst: Option<u32>,
    /// Requests a UTC day.
    pub daily: Option<u64>,
}

impl TierSpec {
    /// The limits a `POST /v1/quotas/{name}/take` request carries.
    pub fn of_request(request: &crate::api::QuotaTakeRequest) -> TierSpec {
        TierSpec {
            rate: request.rate,
            burst: request.burst,
            daily: request.daily,
        }
    }

    /// The tier, or the field under `path` (empty: the fields by themselves, as in an
    /// API request) that is wrong.
    pub fn validate(&self, path: &str) -> Result<Tier, FieldError> {
        let field = |name: &str| {
            if path.is_empty() {
                name.to_string()
            } else {
                format!("{path}.{name}")
            }
        };
        let rate = match self.rate {
            None => None,
            Some(r @ 1..=1_000_000) => Some(r),
            Some(r) => return Err(field_error(field("rate"), r.to_string(), "1 to 1000000 a second")),
        };
        let burst = match self.burst.or(rate) {
            None => 0,
            Some(b) => number_in(&field("burst"), b, 1..=1_000_000)?,
        };
        if rate.is_none() && self.daily.is_none() {
            return Err(field_error(field("rate"), "no limit", "rate, daily or both"));
        }
        Ok(Tier {
            rate,
            burst,
            daily: self.daily,
        })
    }
}

/// A validated tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tier {
    pub rate: Option<u32>,
    pub burst: u32,
    pub daily: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuotaKey {
    Ip,
    /// Lower-case header name.
    Header(String),
}

/// A listener's validated quota, with the tiers and clients it refers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub key: QuotaKey,
    /// Counted by the control plane for every proxy of the region (`scope = "cluster"`).
    pub cluster: bool,
    pub default_tier: String,
    pub tiers: std::collections::BTreeMap<String, Tier>,
    pub clients: std::collections::BTreeMap<String, String>,
}

impl Quota {
    /// The tier a client key belongs to, and its name.
    pub fn tier_of(&self, client: &str) -> (&str, Tier) {
        let name = self
            .clients
            .get(client)
            .map_or(self.default_tier.as_str(), String::as_str);
        (
            name,
            self.tiers.get(name).copied().unwrap_or(Tier {
                rate: None,
                burst: 0,
                daily: None,
            }),
        )
    }
}

/// Why a request is over its quota, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverQuota {
    /// `rate` or `daily` (or `clients`, see [`OverQuota::named`]).
    pub limit: &'static str,
    pub retry_after_ms: u64,
}

impl OverQuota {
    /// The limit as [`OverQuota::limit`] words it: `rate`, `clients` (the region keeps no
    /// more client standings) or `daily` (anything else).
    pub fn named(limit: &str, retry_after_ms: u64) -> OverQuota {
        let limit = match limit {
            "rate" => "rate",
            "clients" => "clients",
            _ => "daily",
        };
        OverQuota { limit, retry_after_ms }
    }
}

/// One client's standing: a token bucket for the rate and a count for the UTC day.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allowance {
    /// Thousandths of a request.
    tokens_milli: u64,
    last_ms: u64,
    started: bool,
    day: u64,
    used_today: u64,
}

const DAY_MS: u64 = 86_400_000;

impl Allowance {
    /// Takes one request's worth, or says which limit refuses it and for how long.
    pub fn take(&mut self, now_ms: u64, tier: Tier) -> Result<(), OverQuota> {
        let day = now_ms / DAY_MS;
        if day != self.day {
            self.day = day;
            self.used_today = 0;
        }
        if let Some(daily) = tier.daily {
            if self.used_today >= daily {
                return Err(OverQuota {
                    limit: "daily",
                    retry_after_ms: (day + 1) * DAY_MS - now_ms,
                });
            }
        }
        if let Some(rate) = tier.rate {
            let capacity = u64::from(tier.burst.max(1)) * 1000;
            if !self.started {
                self.started = true;
                self.tokens_milli = capacity;
            } else {
                let earned = now_ms.saturating_sub(self.last_ms) * u64::from(rate);
                self.tokens_milli = (self.tokens_milli + earned).min(capacity);
            }
            self.last_ms = self.last_ms.max(now_ms);
            if self.tokens_milli < 1000 {
                let missing = 1000 - self.tokens_milli;
                return Err(OverQuota {
                    limit: "rate",
                    retry_after_ms: missing.div_ceil(u64::from(rate.max(1))),
                });
            }
            self.tokens_milli -= 1000;
        }
        self.used_today += 1;
        Ok(())
    }

    /// Requests counted today (as of the last one taken).
    pub fn used_today(&self) -> u64 {
        self.used_today
    }

    /// Whether forgetting this standing changes nothing: nothing counted today against a
    /// daily limit, and the bucket full again by `now_ms`.
    pub fn forgettable(&self, now_ms: u64, tier: Tier) -> bool {
        let day_clear = tier.daily.is_none() || self.used_today == 0 || now_ms / DAY_MS != self.day;
        let bucket_full = match tier.rate {
            None => true,
            Some(rate) => {
                let capacity = u64::from(tier.burst.max(1)) * 1000;
                let earned = now_ms.saturating_sub(self.last_ms).saturating_mul(u64::from(rate));
                !self.started || self.tokens_milli.saturating_add(earned) >= capacity
            }
        };
        day_clear && bucket_full
    }
}

/// `fault = { delay = "200ms", delay_percent = 10, abort_status = 503, abort_percent = 5 }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    pub delay: Option<String>,
    pub delay_percent: Option<u32>,
    pub abort_status: Option<u16>,
    pub abort_percent: Option<u32>,
}

/// Validated fault injection, as Envoy's fault filter: a share of requests is delayed, a
/// share answered at once with an error status instead of being forwarded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    pub delay_ms: u64,
    pub delay_percent: u32,
    pub abort_status: u16,
    pub abort_percent: u32,
}

/// What fault injection does to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injected {
    pub delay_ms: u64,
    pub abort_status: Option<u16>,
}

impl Fault {
    /// `delay_roll` and `abort_roll` are uniform in 0..100, drawn per request.
    pub fn decide(&self, delay_roll: u32, abort_roll: u32) -> Injected {
        Injected {
            delay_ms: if delay_roll < self.delay_percent {
                self.delay_ms
            } else {
                0
            },
            abort_status: (abort_roll < self.abort_percent).then_some(self.abort_status),
        }
    }
}

impl QuotaSpec {
    fn validate(
        &self,
        path: &str,
        tiers: &std::collections::BTreeMap<String, TierSpec>,
        clients: &std::collections::BTreeMap<String, String>,
    ) -> Result<Quota, FieldError> {
        let key = match self.key.as_deref() {
            None | Some("ip") => QuotaKey::Ip,
            Some(k) if k.starts_with("header:") && k.len() > "header:".len() => {
                QuotaKey::Header(k["header:".len()..].trim().to_ascii_lowercase())
            }
            Some(other) => return Err(field_error(format!("{path}.key"), other, "ip or header:NAME")),
        };
        let cluster = match self.scope.as_deref() {
            None | Some("local") => false,
            Some("cluster") => true,
            Some(other) => return Err(field_error(format!("{path}.scope"), other, "local or cluster")),
        };
        let mut validated = std::collections::BTreeMap::new();
        for (name, spec) in tiers {
            validated.insert(name.clone(), spec.validate(&format!("proxy.quota_tiers.{name}"))?);
        }
        let default_tier = self.default_tier.clone().unwrap_or_else(|| "default".to_string());
        if !validated.contains_key(&default_tier) {
            return Err(field_error(
                format!("{path}.default_tier"),
                default_tier,
                format!(
                    "one of the [proxy.quota_tiers]: {:?}",
                    validated.keys().collect::<Vec<_>>()
                ),
            ));
        }
        for (client, tier) in clients {
            if !validated.contains_key(tier) {
                return Err(field_error(
                    format!("proxy.quota_clients.{client}"),
                    tier,
                    format!(
                        "one of the [proxy.quota_tiers]: {:?}",
                        validated.keys().collect::<Vec<_>>()
                    ),
                ));
            }
        }
        Ok(Quota {
            key,
            cluster,
            default_tier,
            tiers: validated,
            clients: clients.clone(),
        })
    }
}

impl FaultSpec {
    fn validate(&self, path: &str) -> Result<Fault, FieldError> {
        let percent =
            |name: &str, value: Option<u32>| number_in(&format!("{path}.{name}"), value.unwrap_or(0), 0..=100);
        let delay_ms = duration_ms(&format!("{path}.delay"), self.delay.as_deref(), 0, 0, 600_000)?;
        let abort_status = number_in(
            &format!("{path}.abort_status"),
            self.abort_status.unwrap_or(503),
            400..=599,
        )?;
        Ok(Fault {
            delay_ms,
            delay_percent: percent("delay_percent", self.delay_percent)?,
            abort_status,
            abort_percent: percent("abort_percent", self.abort_percent)?,
        })
    }
}

/// `check = { kind = "http", path = "/health", interval = "2s", timeout = "1s", rise = 2, fall = 3 }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveCheckSpec {
    /// `tcp` (a connect; the default) or `http` (a GET of `path` answered 2xx or 3xx).
    pub kind: Option<String>,
    pub path: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub rise: Option<u32>,
    pub fall: Option<u32>,
}

/// How a static upstream is probed: a connect, or an HTTP GET of this path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Probe {
    Tcp,
    Http { path: String },
}

/// A validated active check; its verdicts follow [`crate::health::CheckState`] (an
/// upstream starts in rotation and leaves it after `fall` failed probes in a row, as
/// HAProxy's `check inter 2s rise 2 fall 3`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveCheck {
    pub probe: Probe,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub rise: u32,
    pub fall: u32,
}

impl ActiveCheck {
    pub fn thresholds(&self) -> crate::health::Thresholds {
        crate::health::Thresholds {
            rise: self.rise,
            fall: self.fall,
            start_period_ms: 0,
        }
    }
}

impl ActiveCheckSpec {
    fn validate(&self, path: &str) -> Result<ActiveCheck, FieldError> {
        let field = |name: &str| format!("{path}.{name}");
        let probe = match (self.kind.as_deref(), &self.path) {
            (None | Some("tcp"), None) => Probe::Tcp,
            (None | Some("tcp"), Some(p)) => {
                return Err(field_error(field("path"), p, "only with kind = \"http\""));
            }
            (Some("http"), p) => {
                let p = p.clone().unwrap_or_else(|| "/".to_string());
                let valid = p.starts_with('/') && p.len() <= 1024 && p.chars().all(|c| c.is_ascii_graphic());
                if !valid {
                    return Err(field_error(field("path"), p, "a path starting with /, like /health"));
                }
                Probe::Http { path: p }
            }
            (Some(other), _) => return Err(field_error(field("kind"), other, "tcp or http")),
        };
        let interval_ms = duration_ms(&field("interval"), self.interval.as_deref(), 2_000, 50, 3_600_000)?;
        let timeout_ms = duration_ms(&field("timeout"), self.timeout.as_deref(), 1_000, 10, 60_000)?;
        if timeout_ms > interval_ms {
            return Err(field_error(
                field("timeout"),
                format!("{timeout_ms}ms"),
                format!("at most the interval ({interval_ms}ms)"),
            ));
        }
        Ok(ActiveCheck {
            probe,
            interval_ms,
            timeout_ms,
            rise: number_in(&field("rise"), self.rise.unwrap_or(2), 1..=100)?,
            fall: number_in(&field("fall"), self.fall.unwrap_or(3), 1..=100)?,
        })
    }
}

/// `ejection = { consecutive_errors = 5, base = "1s", max = "30s" }` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EjectionSpec {
    pub consecutive_errors: Option<u32>,
    pub base: Option<String>,
    pub max: Option<String>,
}

impl EjectionSpec {
    fn validate(&self, path: &str) -> Result<Ejection, FieldError> {
        let default = Ejection::default();
        let failures_max = number_in(
            &format!("{path}.consecutive_errors"),
            self.consecutive_errors.unwrap_or(default.failures_max),
            1..=1000,
        )?;
        let base_ms = duration_ms(
            &format!("{path}.base"),
            self.base.as_deref(),
            default.base_ms,
            10,
            3_600_000,
        )?;
        let max_ms = duration_ms(
            &format!("{path}.max"),
            self.max.as_deref(),
            default.max_ms.max(base_ms),
            10,
            86_400_000,
        )?;
        if max_ms < base_ms {
            return Err(field_error(
                format!("{path}.max"),
                format!("{max_ms}ms"),
                "at least base",
            ));
        }
        Ok(Ejection {
            failures_max,
            base_ms,
            max_ms,
        })
    }
}

/// `breaker = { window, min_requests, failure_percent, open, probes }` as written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerSpec {
    pub window: Option<String>,
    pub min_requests: Option<u32>,
    pub failure_percent: Option<u32>,
    pub open: Option<String>,
    pub probes: Option<u32>,
}

impl BreakerSpec {
    fn validate(&self, path: &str) -> Result<BreakerPolicy, FieldError> {
        let default = BreakerPolicy::default();
        let window_ms = duration_ms(
            &format!("{path}.window"),
            self.window.as_deref(),
            default.window_ms,
            100,
            3_600_000,
        )?;
        let min_requests = number_in(
            &format!("{path}.min_requests"),
            self.min_requests.unwrap_or(default.min_requests),
            1..=1_000_000,
        )?;
        let failure_percent = number_in(
            &format!("{path}.failure_percent"),
            self.failure_percent.unwrap_or(default.failure_percent),
            1..=100,
        )?;
        let open_ms = duration_ms(
            &format!("{path}.open"),
            self.open.as_deref(),
            default.open_ms,
            10,
            3_600_000,
        )?;
        let probes = number_in(
            &format!("{path}.probes"),
            self.probes.unwrap_or(default.probes),
            1..=100,
        )?;
        Ok(BreakerPolicy {
            window_ms,
            min_requests,
            failure_percent,
            open_ms,
            probes,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum UpstreamSpec {
    Address(String),
    Weighted { address: String, weight: Option<u32> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    Tcp,
    Http,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Route {
    Primary,
    Replicas,
    Any,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Algorithm {
    RoundRobin,
    Weighted,
    LeastConnections,
    /// A consistent hash of the client's address (rendezvous hashing): removing one of N
    /// upstreams moves only the clients that were on it, about 1/N of them.
    IpHash,
    /// Power of two choices: the less busy of two upstreams drawn at random.
    P2c,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub address: String,
    pub weight: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Upstreams {
    Static(Vec<Upstream>),
    Service { name: String, route: Route },
}

/// A validated listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    pub mode: Mode,
    pub upstreams: Upstreams,
    pub algorithm: Algorithm,
    pub connect_timeout_ms: u64,
    pub try_timeout_ms: u64,
    pub retries: u32,
    pub max_ejected_percent: u32,
    pub max_requests: Option<u32>,
    pub fault: Option<Fault>,
    pub quota: Option<Quota>,
    pub drain_timeout_ms: u64,
    pub ejection: Ejection,
    pub breaker: BreakerPolicy,
    /// Upper-case methods served by replicas in read-only mode.
    pub read_methods: Vec<String>,
    /// Active checks of static upstreams.
    pub check: Option<ActiveCheck>,
}

impl ProxySpec {
    /// The admin address, if one is set.
    pub fn admin(&self) -> Result<Option<SocketAddr>, FieldError> {
        self.admin
            .as_deref()
            .map(|text| {
                text.parse()
                    .map_err(|_| field_error("proxy.admin", text, "an address with a port, like 127.0.0.1:9901"))
            })
            .transpose()
    }

    /// Every listener, validated; names and bind addresses must be unique.
    pub fn validate(&self) -> Result<Vec<Listener>, FieldError> {
        if self.listeners.is_empty() || self.listeners.len() > LISTENERS_MAX {
            return Err(field_error(
                "proxy.listeners",
                format!("{} listeners", self.listeners.len()),
                format!("1 to {LISTENERS_MAX} [[proxy.listeners]] tables"),
            ));
        }
        let mut listeners: Vec<Listener> = Vec::new();
        for (i, spec) in self.listeners.iter().enumerate() {
            let path = format!("proxy.listeners[{i}]");
            let listener = spec.validate_with(&path, &self.quota_tiers, &self.quota_clients)?;
            if listeners.iter().any(|l| l.name == listener.name) {
                return Err(field_error(
                    format!("{path}.name"),
                    &listener.name,
                    "a name no other listener has",
                ));
            }
            if listeners.iter().any(|l| l.bind == listener.bind) {
                return Err(field_error(
                    format!("{path}.bind"),
                    listener.bind.to_string(),
                    "an address no other listener binds",
                ));
            }
            listeners.push(listener);
        }
        Ok(listeners)
    }
}

impl Listener {
    /// What in this listener needs the control plane (its registry service, or a
    /// cluster-scope quota), worded for an error; `None` if it can run without one.
    pub fn needs_control_plane(&self) -> Option<String> {
        if let Upstreams::Service { name, .. } = &self.upstreams {
            return Some(format!("service {name}"));
        }
        self.quota
            .as_ref()
            .filter(|q| q.cluster)
            .map(|_| "quota scope = \"cluster\"".to_string())
    }
}

impl ListenerSpec {
    /// Validates a listener that uses no quota tiers.
    pub fn validate(&self, path: &str) -> Result<Listener, FieldError> {
        self.validate_with(path, &Default::default(), &Default::default())
    }

    pub fn validate_with(
        &self,
        path: &str,
        tiers: &std::collections::BTreeMap<String, TierSpec>,
        clients: &std::collections::BTreeMap<String, String>,
    ) -> Result<Listener, FieldError> {
        let field = |name: &str| format!("{path}.{name}");
        let name = match self.name.as_deref() {
            Some(n)
                if !n.is_empty()
                    && n.len() <= 128
                    && n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
            {
                n.to_string()
            }
            other => {
                return Err(field_error(
                    field("name"),
                    other.unwrap_or(""),
                    "1 to 128 letters, digits, '-', '_' or '.'",
                ))
            }
        };
        let bind_text = self.bind.as_deref().unwrap_or("");
        let bind: SocketAddr = bind_text
            .parse()
            .map_err(|_| field_error(field("bind"), bind_text, "an address with a port, like 127.0.0.1:15432"))?;
        let mode = match self.mode.as_deref() {
            None | Some("tcp") => Mode::Tcp,
            Some("http") => Mode::Http,
            Some(other) => return Err(field_error(field("mode"), other, "tcp or http")),
        };
        let upstreams = match (&self.upstreams, &self.service) {
            (Some(list), None) => Upstreams::Static(upstream_list(list, &field("upstreams"))?),
            (None, Some(service)) if !service.is_empty() => Upstreams::Service {
                name: service.clone(),
                route: match self.route.as_deref() {
                    None | Some("primary") => Route::Primary,
                    Some("replicas") => Route::Replicas,
                    Some("any") => Route::Any,
                    Some(other) => return Err(field_error(field("route"), other, "primary, replicas or any")),
                },
            },
            (Some(_), Some(service)) => {
                return Err(field_error(
                    field("service"),
                    service,
                    "either upstreams or service, not both",
                ))
            }
            _ => {
                return Err(field_error(
                    field("upstreams"),
                    "",
                    "a list of HOST:PORT, or service = NAME",
                ))
            }
        };
        if self.route.is_some() && matches!(upstreams, Upstreams::Static(_)) {
            return Err(field_error(
                field("route"),
                self.route.clone().unwrap_or_default(),
                "route goes with service, not with static upstreams",
            ));
        }
        let algorithm = match self.algorithm.as_deref() {
            None | Some("round-robin") => Algorithm::RoundRobin,
            Some("weighted") => Algorithm::Weighted,
            Some("least-connections") => Algorithm::LeastConnections,
            Some("ip-hash") => Algorithm::IpHash,
            Some("p2c") => Algorithm::P2c,
            Some(other) => {
                return Err(field_error(
                    field("algorithm"),
                    other,
                    "round-robin, weighted, least-connections, ip-hash or p2c",
                ))
            }
        };
        let connect_timeout_ms = duration_ms(
            &field("connect_timeout"),
            self.connect_timeout.as_deref(),
            CONNECT_TIMEOUT_MS_DEFAULT,
            10,
            60_000,
        )?;
        let try_timeout_ms = duration_ms(
            &field("try_timeout"),
            self.try_timeout.as_deref(),
            TRY_TIMEOUT_MS_DEFAULT,
            10,
            3_600_000,
        )?;
        let retries = number_in(&field("retries"), self.retries.unwrap_or(2), 0..=10)?;
        let max_ejected_percent = number_in(
            &field("max_ejected_percent"),
            self.max_ejected_percent.unwrap_or(50),
            0..=100,
        )?;
        let max_requests = self
            .max_requests
            .map(|n| number_in(&field("max_requests"), n, 1..=1_000_000))
            .transpose()?;
        if max_requests.is_some() && mode != Mode::Http {
            return Err(field_error(
                field("max_requests"),
                max_requests.unwrap_or_default().to_string(),
                "only with mode = \"http\"",
            ));
        }
        let fault = match &self.fault {
            None => None,
            Some(_) if mode != Mode::Http => {
                return Err(field_error(field("fault"), "set", "only with mode = \"http\""));
            }
            Some(spec) => Some(spec.validate(&field("fault"))?),
        };
        let quota = match &self.quota {
            None => None,
            Some(_) if mode != Mode::Http => {
                return Err(field_error(field("quota"), "set", "only with mode = \"http\""));
            }
            Some(spec) => Some(spec.validate(&field("quota"), tiers, clients)?),
        };
        let drain_timeout_ms = duration_ms(
            &field("drain_timeout"),
            self.drain_timeout.as_deref(),
            DRAIN_TIMEOUT_MS_DEFAULT,
            0,
            3_600_000,
        )?;
        let read_methods = match &self.read_methods {
            None => ["GET", "HEAD", "OPTIONS"].map(String::from).to_vec(),
            Some(_) if mode != Mode::Http => {
                return Err(field_error(field("read_methods"), "set", "only with mode = \"http\""));
            }
            Some(list) => list
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let valid = !m.is_empty() && m.len() <= 32 && m.chars().all(|c| c.is_ascii_alphabetic());
                    if valid {
                        Ok(m.to_ascii_uppercase())
                    } else {
                        Err(field_error(
                            format!("{}[{i}]", field("read_methods")),
                            m,
                            "an HTTP method, like GET",
                        ))
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        let check = match &self.check {
            None => None,
            Some(_) if !matches!(upstreams, Upstreams::Static(_)) => {
                return Err(field_error(
                    field("check"),
                    "set",
                    "only with static upstreams (a service's instances are checked by the region)",
                ));
            }
            Some(spec) => Some(spec.validate(&field("check"))?),
        };
        Ok(Listener {
            check,
            name,
            bind,
            mode,
            upstreams,
            algorithm,
            connect_timeout_ms,
            try_timeout_ms,
            retries,
            max_ejected_percent,
            max_requests,
            fault,
            quota,
            drain_timeout_ms,
            ejection: self.ejection.clone().unwrap_or_default().validate(&field("ejection"))?,
            breaker: self.breaker.clone().unwrap_or_default().validate(&field("breaker"))?,
            read_methods,
        })
    }
}

fn upstream_list(list: &[UpstreamSpec], path: &str) -> Result<Vec<Upstream>, FieldError> {
    if list.is_empty() || list.len() > UPSTREAMS_MAX {
        return Err(field_error(
            path.to_string(),
            format!("{} upstreams", list.len()),
            format!("1 to {UPSTREAMS_MAX} upstreams"),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, spec)| {
            let (address, weight) = match spec {
                UpstreamSpec::Address(a) => (a, None),
                UpstreamSpec::Weighted { address, weight } => (address, *weight),
            };
            let valid = address
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
            if !valid {
                return Err(field_error(
                    format!("{path}[{i}]"),
                    address,
                    "HOST:PORT, like 127.0.0.1:8081",
                ));
            }
            let weight = number_in(&format!("{path}[{i}].weight"), weight.unwrap_or(1), 1..=WEIGHT_MAX)?;
            Ok(Upstream {
                address: address.clone(),
                weight,
            })
        })
        .collect()
}

/// What the balancer knows of one candidate upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate<'a> {
    pub address: &'a str,
    pub weight: u32,
    /// Connections or requests in flight to it.
    pub active: u32,
}

/// Picks upstreams by one [`Algorithm`]. Keeps the little state round-robin needs.
#[derive(Debug, Clone)]
pub struct Balancer {
    algorithm: Algorithm,
    next: u64,
    /// Smooth weighted round-robin's running scores, by candidate position.
    scores: Vec<i64>,
}

impl Balancer {
    pub fn new(algorithm: Algorithm) -> Balancer {
        Balancer {
            algorithm,
            next: 0,
            scores: Vec::new(),
        }
    }

    /// The index in `candidates` to use, `None` if there is none. `client` is a hash of
    /// the client's address (ip-hash); `random` is fresh randomness (p2c).
    pub fn pick(&mut self, candidates: &[Candidate<'_>], client: u64, random: u64) -> Option<usize> {
        let n = candidates.len();
        if n == 0 {
            return None;
        }
        let pick = match self.algorithm {
            Algorithm::RoundRobin => self.round_robin(n),
            Algorithm::Weighted => self.smooth_weighted(candidates),
            Algorithm::LeastConnections => {
                // Ties go round-robin, so equal upstreams share the load.
                let start = self.round_robin(n);
                (0..n)
                    .map(|k| (start + k) % n)
                    .min_by_key(|i| candidates[*i].active)
                    .unwrap_or(start)
            }
            Algorithm::IpHash => (0..n)
                .max_by_key(|i| rendezvous(client, candidates[*i].address))
                .unwrap_or(0),
            Algorithm::P2c => {
                let a = (random % n as u64) as usize;
                let b = ((random >> 32) % n as u64) as usize;
                if candidates[b].active < candidates[a].active {
                    b
                } else {
                    a
                }
            }
        };
        Some(pick)
    }

    fn round_robin(&mut self, n: usize) -> usize {
        let pick = (self.next % n as u64) as usize;
        self.next = self.next.wrapping_add(1);
        pick
    }

    /// Nginx's smooth weighted round-robin: each pick raises every score by its weight and
    /// lowers the chosen one by the total, so weights 5:1:1 give a a b a c a a, not a
    /// burst of five.
    fn smooth_weighted(&mut self, candidates: &[Candidate<'_>]) -> usize {
        if self.scores.len() != candidates.len() {
            self.scores = vec![0; candidates.len()];
        }
        let total: i64 = candidates.iter().map(|c| i64::from(c.weight)).sum();
        for (score, c) in self.scores.iter_mut().zip(candidates) {
            *score += i64::from(c.weight);
        }
        let best = (0..candidates.len())
            .max_by_key(|i| (self.scores[*i], std::cmp::Reverse(*i)))
            .unwrap_or(0);
        self.scores[best] -= total;
        best
    }
}

/// Passive outlier ejection of one upstream: after `failures_max` failures in a row (5xx
/// answers, broken exchanges) it leaves rotation for a time that doubles with each ejection
/// in a row, from `base_ms` up to `max_ms`; a refused or timed-out connect ejects at once;
/// a success resets both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ejection {
    pub failures_max: u32,
    pub base_ms: u64,
    pub max_ms: u64,
}

impl Default for Ejection {
    fn default() -> Self {
        Ejection {
            failures_max: 5,
            base_ms: 1_000,
            max_ms: 30_000,
        }
    }
}

/// What went wrong with an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// It could not be reached at all: out of rotation at once.
    Connect,
    /// It answered 5xx, or broke off or timed out mid-exchange.
    Error,
}

/// Whether one more of `total` upstreams may be ejected while `ejected` already are,
/// under a maximum ejected share of `max_percent` (0: never eject; 100: all may go).
pub fn may_eject(ejected: usize, total: usize, max_percent: u32) -> bool {
    (ejected + 1) * 100 <= total * max_percent as usize
}

/// An upstream's standing with [`Ejection`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Outlier {
    failures: u32,
    ejections: u32,
    ejected_until_ms: u64,
}

impl Outlier {
    /// Records a failure; true if it ejects the upstream now.
    /// `room`: whether the pool may eject one more upstream now ([`may_eject`]); if not,
    /// the failure is counted and the upstream stays in rotation.
    pub fn failure(&mut self, now_ms: u64, kind: Failure, policy: Ejection, room: bool) -> bool {
        self.failures += 1;
        let enough = kind == Failure::Connect || self.failures >= policy.failures_max;
        if !enough || !room || self.ejected(now_ms) {
            return false;
        }
        let factor = 1u64 << self.ejections.min(16);
        self.ejected_until_ms = now_ms + policy.base_ms.saturating_mul(factor).min(policy.max_ms);
        self.ejections += 1;
        self.failures = 0;
        true
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.ejections = 0;
    }

    pub fn ejected(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until_ms
    }
}

/// When a circuit breaker opens and how it tries again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakerPolicy {
    /// The failure rate is measured over this window.
    pub window_ms: u64,
    /// Fewer outcomes than this in the window never open the breaker.
    pub min_requests: u32,
    /// Opens when at least this share of the window's outcomes failed, in percent.
    pub failure_percent: u32,
    /// Stays open this long, then lets probes through (half-open).
    pub open_ms: u64,
    /// Probes let through at once while half-open; this many successes in a row close it.
    pub probes: u32,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            window_ms: 10_000,
            min_requests: 20,
            failure_percent: 50,
            open_ms: 5_000,
            probes: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

const BREAKER_BUCKETS: u64 = 10;

/// A circuit breaker for one upstream: closed (everything passes, outcomes counted in
/// [`BREAKER_BUCKETS`] buckets over the window), open (nothing passes for `open_ms`),
/// half-open (up to `probes` requests at once; that many successes close it, one failure
/// opens it again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breaker {
    state: BreakerState,
    /// (bucket start, successes, failures), oldest first.
    buckets: std::collections::VecDeque<(u64, u32, u32)>,
    opened_ms: u64,
    probes_in_flight: u32,
    probe_successes: u32,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            state: BreakerState::Closed,
            buckets: std::collections::VecDeque::new(),
            opened_ms: 0,
            probes_in_flight: 0,
            probe_successes: 0,
        }
    }
}

impl Breaker {
    pub fn state(&mut self, now_ms: u64, policy: BreakerPolicy) -> BreakerState {
        if self.state == BreakerState::Open && now_ms >= self.opened_ms + policy.open_ms {
            self.state = BreakerState::HalfOpen;
            self.probes_in_flight = 0;
            self.probe_successes = 0;
        }
        self.state
    }

    /// Whether a request may go to this upstream now (a half-open breaker counts it as a
    /// probe: report its outcome with [`Breaker::record`]).
    pub fn allow(&mut self, now_ms: u64, policy: BreakerPolicy) -> bool {
        match self.state(now_ms, policy) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen if self.probes_in_flight < policy.probes => {
                self.probes_in_flight += 1;
                true
            }
            BreakerState::HalfOpen => false,
        }
    }

    /// The outcome of a request that [`Breaker::allow`] let through.
    pub fn record(&mut self, now_ms: u64, success: bool, policy: BreakerPolicy) {
        match self.state(now_ms, policy) {
            BreakerState::HalfOpen => {
                self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
                if !success {
                    self.open(now_ms);
                } else {
                    self.probe_successes += 1;
                    if self.probe_successes >= policy.probes {
                        self.state = BreakerState::Closed;
                        self.buckets.clear();
                    }
                }
            }
            BreakerState::Open => {}
            BreakerState::Closed => {
                let width = (policy.window_ms / BREAKER_BUCKETS).max(1);
                let start = now_ms - now_ms % width;
                while self
                    .buckets
                    .front()
                    .is_some_and(|(at, _, _)| *at + policy.window_ms <= now_ms)
                {
                    self.buckets.pop_front();
                }
                match self.buckets.back_mut() {
                    Some((at, ok, failed)) if *at == start => {
                        if success {
                            *ok += 1
                        } else {
                            *failed += 1
                        }
                    }
                    _ => self.buckets.push_back((start, u32::from(success), u32::from(!success))),
                }
                let (ok, failed) = self
                    .buckets
                    .iter()
                    .fold((0u32, 0u32), |(o, f), (_, ok, failed)| (o + ok, f + failed));
                let total = ok + failed;
                if total >= policy.min_requests && failed * 100 >= policy.failure_percent * total {
                    self.open(now_ms);
                }
            }
        }
    }

    /// A request let through ended without an outcome (its client went away): while
    /// half-open, its probe slot is free again.
    pub fn release(&mut self) {
        if self.state == BreakerState::HalfOpen {
            self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
        }
    }

    fn open(&mut self, now_ms: u64) {
        self.state = BreakerState::Open;
        self.opened_ms = now_ms;
        self.buckets.clear();
    }
}

/// A request's priority for load shedding (`X-Priority: high|normal|low`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Priority {
    Low,
    Normal,
    High,
}

impl Priority {
    /// From the header's value; anything else is normal.
    pub fn from_header(value: Option<&str>) -> Priority {
        match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            Some("low") => Priority::Low,
            Some("high") => Priority::High,
            _ => Priority::Normal,
        }
    }
}

/// Whether a listener with `in_flight` requests of at most `max` admits one more of this
/// priority: low ones only below half the limit, normal ones below nine tenths, high ones
/// up to the limit. So as load rises, low is shed first, then normal, and high last.
pub fn admit(priority: Priority, in_flight: u32, max: u32) -> bool {
    let ceiling = match priority {
        Priority::Low => max / 2,
        Priority::Normal => max - max / 10,
        Priority::High => max,
    };
    in_flight < ceiling.max(1)
}

/// Bounds retries to a share of the traffic, so that retrying cannot multiply the load on
/// upstreams that are failing for being overloaded: each request earns a share of a retry,
/// and a floor of retries a second is always allowed (so a quiet listener can still
/// retry). Earnings are capped at a thousand requests' worth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryBudget {
    /// Thousandths of a retry each request earns.
    ratio_milli: u64,
    floor_per_s: u64,
    /// Earned retries, in thousandths.
    tokens_milli: u64,
    /// The floor's retries, in thousandths.
    floor_milli: u64,
    last_ms: u64,
}

impl RetryBudget {
    /// `percent` of requests may be retried, plus `floor_per_s` retries a second.
    pub fn new(percent: u64, floor_per_s: u64) -> RetryBudget {
        RetryBudget {
            ratio_milli: percent * 10,
            floor_per_s,
            tokens_milli: 0,
            floor_milli: floor_per_s * 1000,
            last_ms: 0,
        }
    }

    /// A request arrived.
    pub fn deposit(&mut self) {
        self.tokens_milli = (self.tokens_milli + self.ratio_milli).min(self.ratio_milli * 1000 + 1000);
    }

    /// Whether one retry may go now; takes it from the budget if so.
    pub fn withdraw(&mut self, now_ms: u64) -> bool {
        let elapsed_ms = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        self.floor_milli = (self.floor_milli + elapsed_ms * self.floor_per_s).min(self.floor_per_s * 1000);
        if self.tokens_milli >= 1000 {
            self.tokens_milli -= 1000;
            true
        } else if self.floor_milli >= 1000 {
            self.floor_milli -= 1000;
            true
        } else {
            false
        }
    }
}

/// Whether a request with this method may be sent again after a failure that may have
/// reached the upstream (RFC 9110's idempotent methods).
pub fn idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE" | "TRACE")
}

/// Rendezvous (highest random weight) score of a client on an upstream.
fn rendezvous(client: u64, address: &str) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    client.hash(&mut hasher);
    address.hash(&mut hasher);
    hasher.finish()
}

/// The hash of a client address that `ip-hash` uses.
pub fn client_hash(ip: std::net::IpAddr) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    ip.hash(&mut hasher);
    hasher.finish()
}

/// A service listener's upstreams as the registry says now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Routing {
    /// Where the listener's connections and requests go.
    pub upstreams: Vec<Upstream>,
    /// `route = primary` with no primary serving: the replicas that take reads meanwhile
    /// (read-only mode). Empty otherwise.
    pub read_only: Vec<Upstream>,
    /// The serving primary's id, if any.
    pub primary: Option<String>,
}

/// `HOST:PORT` of an instance endpoint written as a URL (`http://h:p/path`) or as `h:p`.
pub fn endpoint_address(endpoint: &str) -> Option<String> {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let valid = authority
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    valid.then(|| authority.to_string())
}

/// The serving instances of `view` other than its primary, by id.
pub fn serving_replicas(view: &crate::api::ServiceView) -> impl Iterator<Item = &String> {
    view.serving.iter().filter(|id| view.primary.as_ref() != Some(*id))
}

/// Which instances of `view` a listener with `route` sends traffic to: only those the
/// registry calls serving (live, ready, not a standby). `primary` is the serving primary
/// (every serving instance for an active-active service, which has none); `replicas` the
/// serving instances but the primary; `any` all serving ones.
pub fn route(view: &crate::api::ServiceView, route: Route) -> Routing {
    let active_active = view.policy.mode == crate::service::Mode::ActiveActive;
    let primary = view
        .primary
        .clone()
        .filter(|p| !active_active && view.serving.contains(p));
    let upstream = |id: &String| {
        let instance = view.instances.iter().find(|i| &i.id == id)?;
        Some(Upstream {
            address: endpoint_address(&instance.endpoint)?,
            weight: 1,
        })
    };
    let replicas: Vec<Upstream> = serving_replicas(view).filter_map(upstream).collect();
    let all: Vec<Upstream> = view.serving.iter().filter_map(upstream).collect();
    let (upstreams, read_only) = match route {
        Route::Any => (all, Vec::new()),
        Route::Primary if active_active => (all, Vec::new()),
        Route::Primary => match primary.as_ref().and_then(upstream) {
            Some(p) => (vec![p], Vec::new()),
            None => (Vec::new(), replicas),
        },
        Route::Replicas => (replicas, Vec::new()),
    };
    Routing {
        upstreams,
        read_only,
        primary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listener(toml_like: serde_json::Value) -> Result<Listener, FieldError> {
        serde_json::from_value::<ListenerSpec>(toml_like)
            .expect("shape")
            .validate("proxy.listeners[0]")
    }

    #[test]
    fn listeners_validate_with_defaults() {
        let l = listener(serde_json::json!({
            "name": "web", "bind": "127.0.0.1:18080",
            "upstreams": ["127.0.0.1:8081", {"address": "127.0.0.1:8082", "weight": 3}],
        }))
        .unwrap();
        assert_eq!(
            (l.mode, l.algorithm, l.connect_timeout_ms),
            (Mode::Tcp, Algorithm::RoundRobin, 1000)
        );
        assert_eq!(
            l.upstreams,
            Upstreams::Static(vec![
                Upstream {
                    address: "127.0.0.1:8081".into(),
                    weight: 1
                },
                Upstream {
                    address: "127.0.0.1:8082".into(),
                    weight: 3
                },
            ])
        );
        let l = listener(serde_json::json!({"name": "db", "bind": "127.0.0.1:15432", "service": "orders-db"})).unwrap();
        assert_eq!(
            l.upstreams,
            Upstreams::Service {
                name: "orders-db".into(),
                route: Route::Primary
            }
        );
    }

    #[test]
    fn bad_fields_name_the_field_the_value_and_what_is_allowed() {
        let base = serde_json::json!({"name": "web", "bind": "127.0.0.1:18080", "upstreams": ["127.0.0.1:8081"]});
        let with = |key: &str, value: serde_json::Value| {
            let mut v = base.clone();
            v[key] = value;
            listener(v).unwrap_err()
        };
        let e = with("mode", "udp".into());
        assert_eq!((e.field.as_str(), e.value.as_str()), ("proxy.listeners[0].mode", "udp"));
        assert!(e.allowed.contains("tcp or http"));
        assert_eq!(with("bind", "localhost".into()).field, "proxy.listeners[0].bind");
        assert_eq!(with("algorithm", "random".into()).field, "proxy.listeners[0].algorithm");
        assert_eq!(
            with("upstreams", serde_json::json!(["nowhere"])).field,
            "proxy.listeners[0].upstreams[0]"
        );
        assert_eq!(
            with(
                "upstreams",
                serde_json::json!([{"address": "127.0.0.1:1", "weight": 0}])
            )
            .field,
            "proxy.listeners[0].upstreams[0].weight"
        );
        assert_eq!(with("service", "db".into()).field, "proxy.listeners[0].service");
        assert_eq!(with("route", "primary".into()).field, "proxy.listeners[0].route");
        assert_eq!(
            with("connect_timeout", "1h".into()).field,
            "proxy.listeners[0].connect_timeout"
        );
        assert_eq!(with("name", "no spaces".into()).field, "proxy.listeners[0].name");
        assert_eq!(with("retries", 11.into()).field, "proxy.listeners[0].retries");
        assert_eq!(with("max_requests", 0.into()).field, "proxy.listeners[0].max_requests");
        assert_eq!(
            with("max_ejected_percent", 101.into()).field,
            "proxy.listeners[0].max_ejected_percent"
        );
        assert_eq!(
            with("try_timeout", "0ms".into()).field,
            "proxy.listeners[0].try_timeout"
        );
        let twice = ProxySpec {
            listeners: vec![
                serde_json::from_value(base.clone()).unwrap(),
                serde_json::from_value(base.clone()).unwrap(),
            ],
            ..ProxySpec::default()
        };
        assert_eq!(twice.validate().unwrap_err().field, "proxy.listeners[1].name");
        assert_eq!(ProxySpec::default().validate().unwrap_err().field, "proxy.listeners");
        let admin = ProxySpec {
            admin: Some("nowhere".into()),
            ..ProxySpec::default()
        };
        assert_eq!(admin.admin().unwrap_err().field, "proxy.admin");
    }

    fn candidates<'a>(addresses: &'a [String], weights: &[u32], active: &[u32]) -> Vec<Candidate<'a>> {
        addresses
            .iter()
            .enumerate()
            .map(|(i, a)| Candidate {
                address: a,
                weight: weights[i],
                active: active[i],
            })
            .collect()
    }

    fn addresses(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    #[test]
    fn round_robin_and_weighted_share_by_weight() {
        let a = addresses(3);
        let c = candidates(&a, &[1, 1, 1], &[0, 0, 0]);
        let mut rr = Balancer::new(Algorithm::RoundRobin);
        let picks: Vec<usize> = (0..6).map(|_| rr.pick(&c, 0, 0).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let c = candidates(&a, &[5, 1, 1], &[0, 0, 0]);
        let mut w = Balancer::new(Algorithm::Weighted);
        let picks: Vec<usize> = (0..7).map(|_| w.pick(&c, 0, 0).unwrap()).collect();
        assert_eq!(picks, [0, 0, 1, 0, 2, 0, 0], "smooth, not five in a row");
        assert_eq!(Balancer::new(Algorithm::RoundRobin).pick(&[], 0, 0), None);
    }

    #[test]
    fn least_connections_and_p2c_prefer_the_idle() {
        let a = addresses(3);
        let c = candidates(&a, &[1, 1, 1], &[5, 0, 2]);
        let mut lc = Balancer::new(Algorithm::LeastConnections);
        assert!((0..5).all(|_| lc.pick(&c, 0, 0) == Some(1)));
        let mut p2c = Balancer::new(Algorithm::P2c);
        // Draws 0 and 1: the idler of the two.
        assert_eq!(p2c.pick(&c, 0, 1u64 << 32), Some(1));
        // Draws 0 and 2.
        assert_eq!(p2c.pick(&c, 0, 2u64 << 32), Some(2));
    }

    impl Outlier {
        fn failure_t(&mut self, now_ms: u64, kind: Failure, policy: Ejection) -> bool {
            self.failure(now_ms, kind, policy, true)
        }
    }

    #[test]
    fn the_ejected_share_is_capped() {
        assert!(may_eject(0, 2, 50) && !may_eject(1, 2, 50));
        assert!(!may_eject(0, 10, 0), "0 never ejects");
        assert!(may_eject(9, 10, 100));
        assert!(!may_eject(0, 1, 50), "the only upstream stays");
        let mut o = Outlier::default();
        assert!(!o.failure(0, Failure::Connect, Ejection::default(), false));
        assert!(!o.ejected(1));
    }

    #[test]
    fn ejection_grows_and_a_success_forgives() {
        let policy = Ejection::default();
        let connect = Failure::Connect;
        let mut o = Outlier::default();
        assert!(o.failure_t(0, connect, policy), "the first failed connect ejects");
        assert!(o.ejected(999) && !o.ejected(1_000));
        assert!(!o.failure_t(500, connect, policy), "already out");
        assert!(o.failure_t(1_000, connect, policy));
        assert!(o.ejected(2_999) && !o.ejected(3_000), "twice as long");
        o.success();
        assert!(o.failure_t(10_000, connect, policy));
        assert!(!o.ejected(11_000), "back to the base time");
        let mut o = Outlier::default();
        for i in 0..20 {
            o.failure_t(i * 100_000, connect, policy);
        }
        assert!(!o.ejected(1_900_000 + 30_000), "capped at max");
        let mut o = Outlier::default();
        let errors: Vec<bool> = (0..5).map(|i| o.failure_t(i, Failure::Error, policy)).collect();
        assert_eq!(errors, [false, false, false, false, true], "five 5xx in a row");
    }

    #[test]
    fn a_breaker_opens_on_the_failure_rate_and_closes_after_probes() {
        let policy = BreakerPolicy::default();
        let mut b = Breaker::default();
        // 19 failures: below min_requests, still closed.
        for i in 0..19 {
            assert!(b.allow(i, policy));
            b.record(i, false, policy);
        }
        assert_eq!(b.state(100, policy), BreakerState::Closed);
        // Old outcomes leave the window: 19 more successes now, then 1 failure: 1 of 20.
        for i in 0..19 {
            b.record(20_000 + i, true, policy);
        }
        b.record(20_100, false, policy);
        assert_eq!(b.state(20_100, policy), BreakerState::Closed, "5% is not 50%");
        for i in 0..20 {
            b.record(20_200 + i, false, policy);
        }
        assert_eq!(b.state(20_300, policy), BreakerState::Open, "21 of 40 failed");
        assert!(!b.allow(25_000, policy));
        // Half-open after open_ms: three probes at once, no more.
        let t = 20_219 + policy.open_ms;
        assert!(b.allow(t, policy) && b.allow(t, policy) && b.allow(t, policy));
        assert!(!b.allow(t, policy));
        b.record(t, true, policy);
        b.record(t, false, policy);
        assert_eq!(b.state(t, policy), BreakerState::Open, "a failed probe opens it again");
        let t = t + policy.open_ms;
        for _ in 0..3 {
            assert!(b.allow(t, policy));
            b.record(t, true, policy);
        }
        assert_eq!(b.state(t, policy), BreakerState::Closed);
    }

    #[test]
    fn shedding_drops_low_first_then_normal_then_high() {
        let max = 100;
        let admitted = |p: Priority| (0..=max).take_while(|in_flight| admit(p, *in_flight, max)).count();
        assert_eq!(
            (
                admitted(Priority::Low),
                admitted(Priority::Normal),
                admitted(Priority::High)
            ),
            (50, 90, 100)
        );
        assert!(admit(Priority::Low, 0, 1), "a limit of 1 still admits one");
        assert_eq!(Priority::from_header(Some(" LOW ")), Priority::Low);
        assert_eq!(Priority::from_header(Some("urgent")), Priority::Normal);
        assert_eq!(Priority::from_header(None), Priority::Normal);
    }

    #[test]
    fn faults_hit_their_share_of_requests() {
        let spec: FaultSpec =
            serde_json::from_value(serde_json::json!({"delay": "200ms", "delay_percent": 10, "abort_percent": 5}))
                .unwrap();
        let fault = spec.validate("f").unwrap();
        let delayed = (0..100).filter(|roll| fault.decide(*roll, 99).delay_ms == 200).count();
        let aborted = (0..100)
            .filter(|roll| fault.decide(99, *roll).abort_status == Some(503))
            .count();
        assert_eq!((delayed, aborted), (10, 5));
        let bad: FaultSpec = serde_json::from_value(serde_json::json!({"abort_percent": 101})).unwrap();
        assert_eq!(bad.validate("f").unwrap_err().field, "f.abort_percent");
        let bad: FaultSpec = serde_json::from_value(serde_json::json!({"abort_status": 200})).unwrap();
        assert_eq!(bad.validate("f").unwrap_err().field, "f.abort_status");
    }

    #[test]
    fn allowances_hold_the_rate_with_its_burst_and_the_day() {
        let tier = Tier {
            rate: Some(2),
            burst: 3,
            daily: Some(5),
        };
        let mut a = Allowance::default();
        let t = 10 * DAY_MS + 1_000;
        // The burst at once, then the rate.
        assert!((0..3).all(|_| a.take(t, tier).is_ok()));
        let over = a.take(t, tier).unwrap_err();
        assert_eq!((over.limit, over.retry_after_ms), ("rate", 500));
        assert!(a.take(t + 499, tier).is_err());
        assert!(a.take(t + 500 + 499, tier).is_ok(), "one earned in 500 ms");
        assert!(a.take(t + 10_000, tier).is_ok());
        // Five today in all: the daily limit.
        let over = a.take(t + 20_000, tier).unwrap_err();
        assert_eq!(over.limit, "daily");
        assert_eq!(over.retry_after_ms, 11 * DAY_MS - (t + 20_000));
        assert!(a.take(11 * DAY_MS, tier).is_ok(), "a new day");
    }

    #[test]
    fn an_allowance_is_forgettable_once_it_is_as_good_as_new() {
        let tier = Tier {
            rate: Some(2),
            burst: 4,
            daily: Some(100),
        };
        let mut a = Allowance::default();
        assert!(a.forgettable(0, tier));
        let t = 3 * DAY_MS;
        a.take(t, tier).unwrap();
        a.take(t, tier).unwrap();
        assert!(!a.forgettable(t + 999, tier), "counted today and the bucket short of 2");
        assert!(!a.forgettable(t + 1_000, tier), "the bucket is full but today counts 2");
        assert!(a.forgettable(4 * DAY_MS, tier), "a new day with a full bucket");
        let rate_only = Tier { daily: None, ..tier };
        let mut b = Allowance::default();
        b.take(t, rate_only).unwrap();
        assert!(!b.forgettable(t + 499, rate_only));
        assert!(b.forgettable(t + 500, rate_only), "no daily limit to remember");
    }

    #[test]
    fn active_checks_validate_by_field() {
        let listener = |check: serde_json::Value| {
            let spec: ListenerSpec = serde_json::from_value(serde_json::json!({
                "name": "web", "bind": "127.0.0.1:1", "mode": "http", "upstreams": ["127.0.0.1:2"], "check": check
            }))
            .unwrap();
            spec.validate("l")
        };
        let check = listener(serde_json::json!({"kind": "http", "path": "/health", "interval": "1s"}))
            .unwrap()
            .check
            .unwrap();
        assert_eq!(check.probe, Probe::Http { path: "/health".into() });
        assert_eq!(
            (check.interval_ms, check.timeout_ms, check.rise, check.fall),
            (1000, 1000, 2, 3)
        );
        assert_eq!(
            listener(serde_json::json!({})).unwrap().check.unwrap().probe,
            Probe::Tcp
        );
        for (bad, field) in [
            (serde_json::json!({"kind": "udp"}), "l.check.kind"),
            (serde_json::json!({"path": "/h"}), "l.check.path"),
            (serde_json::json!({"kind": "http", "path": "health"}), "l.check.path"),
            (
                serde_json::json!({"interval": "1s", "timeout": "2s"}),
                "l.check.timeout",
            ),
            (serde_json::json!({"fall": 0}), "l.check.fall"),
        ] {
            assert_eq!(listener(bad).unwrap_err().field, field);
        }
        let spec: ListenerSpec = serde_json::from_value(serde_json::json!({
            "name": "db", "bind": "127.0.0.1:1", "service": "db", "check": {}
        }))
        .unwrap();
        assert_eq!(spec.validate("l").unwrap_err().field, "l.check");
    }

    #[test]
    fn quotas_validate_against_their_tiers() {
        let tiers: std::collections::BTreeMap<String, TierSpec> = serde_json::from_value(serde_json::json!({
            "free": {"rate": 5, "daily": 1000}, "pro": {"rate": 100, "burst": 200}
        }))
        .unwrap();
        let clients: std::collections::BTreeMap<String, String> =
            serde_json::from_value(serde_json::json!({"key-1": "pro"})).unwrap();
        let spec: QuotaSpec =
            serde_json::from_value(serde_json::json!({"key": "header:X-Api-Key", "default_tier": "free"})).unwrap();
        let quota = spec.validate("q", &tiers, &clients).unwrap();
        assert_eq!(quota.key, QuotaKey::Header("x-api-key".into()));
        assert_eq!(quota.tier_of("key-1").0, "pro");
        assert_eq!(
            quota.tier_of("anyone").1,
            Tier {
                rate: Some(5),
                burst: 5,
                daily: Some(1000)
            }
        );
        let bad: QuotaSpec = serde_json::from_value(serde_json::json!({"default_tier": "gold"})).unwrap();
        assert_eq!(bad.validate("q", &tiers, &clients).unwrap_err().field, "q.default_tier");
        let cluster: QuotaSpec =
            serde_json::from_value(serde_json::json!({"default_tier": "free", "scope": "cluster"})).unwrap();
        assert!(cluster.validate("q", &tiers, &clients).unwrap().cluster);
        let elsewhere: QuotaSpec =
            serde_json::from_value(serde_json::json!({"default_tier": "free", "scope": "global"})).unwrap();
        assert_eq!(elsewhere.validate("q", &tiers, &clients).unwrap_err().field, "q.scope");
        let orphan: std::collections::BTreeMap<String, String> =
            serde_json::from_value(serde_json::json!({"key-2": "gold"})).unwrap();
        assert_eq!(
            spec.validate("q", &tiers, &orphan).unwrap_err().field,
            "proxy.quota_clients.key-2"
        );
    }

    #[test]
    fn the_retry_budget_is_a_share_of_requests_with_a_floor() {
        let mut budget = RetryBudget::new(20, 2);
        // The floor: two retries a second with no traffic at all.
        assert!(budget.withdraw(1_000) && budget.withdraw(1_000));
        assert!(!budget.withdraw(1_000));
        // 100 requests earn 20 retries.
        for _ in 0..100 {
            budget.deposit();
        }
        let granted = (0..50).filter(|_| budget.withdraw(1_000)).count();
        assert_eq!(granted, 20);
        assert!(budget.withdraw(2_000), "the floor refills");
        assert!(idempotent("GET") && idempotent("PUT") && !idempotent("POST") && !idempotent("PATCH"));
    }

    #[test]
    fn ip_hash_moves_about_one_in_n_clients_when_an_upstream_goes() {
        let a = addresses(5);
        let all = candidates(&a, &[1; 5], &[0; 5]);
        let fewer: Vec<Candidate<'_>> = all.iter().copied().filter(|c| c.address != a[2]).collect();
        let mut b = Balancer::new(Algorithm::IpHash);
        let clients = 10_000u64;
        let mut moved = 0;
        for client in 0..clients {
            let key = client_hash(std::net::IpAddr::from([10, 1, (client >> 8) as u8, client as u8]));
            let before = all[b.pick(&all, key, 0).unwrap()].address;
            let after = fewer[b.pick(&fewer, key, 0).unwrap()].address;
            if before != after {
                assert_eq!(before, a[2], "only clients of the removed upstream move");
                moved += 1;
            }
        }
        let share = moved as f64 / clients as f64;
        assert!((0.15..0.25).contains(&share), "moved {share}");
    }

    fn view(mode: &str, primary: Option<&str>, serving: &[&str]) -> crate::api::ServiceView {
        let spec = crate::service::PolicySpec {
            mode: Some(mode.to_string()),
            ..Default::default()
        };
        crate::api::ServiceView {
            name: "db".into(),
            primary: primary.map(String::from),
            token: 1,
            epoch: 1,
            instances: ["a", "b", "c"]
                .iter()
                .enumerate()
                .map(|(i, id)| crate::api::InstanceView {
                    id: id.to_string(),
                    endpoint: format!("http://127.0.0.1:{}/x", 9000 + i),
                    region: "r".into(),
                    zone: None,
                    priority: 0,
                    role: crate::service::InstanceRole::Replica,
                    health: crate::health::Health::Up,
                    ready: crate::health::Health::Up,
                    node: None,
                    tags: Default::default(),
                    reports: Default::default(),
                    synchronous: false,
                    lag: None,
                })
                .collect(),
            serving: serving.iter().map(|s| s.to_string()).collect(),
            policy: spec.validate().unwrap(),
            kind: Default::default(),
            synchronous_standby: None,
            index: 0,
        }
    }

    fn addresses_of(list: &[Upstream]) -> Vec<&str> {
        list.iter().map(|u| u.address.as_str()).collect()
    }

    #[test]
    fn routes_follow_the_serving_primary_and_fall_back_to_replicas_for_reads() {
        let up = view("active-passive", Some("a"), &["a", "b", "c"]);
        let primary = route(&up, Route::Primary);
        assert_eq!(addresses_of(&primary.upstreams), ["127.0.0.1:9000"]);
        assert!(primary.read_only.is_empty());
        assert_eq!(primary.primary.as_deref(), Some("a"));
        assert_eq!(
            addresses_of(&route(&up, Route::Replicas).upstreams),
            ["127.0.0.1:9001", "127.0.0.1:9002"]
        );
        assert_eq!(route(&up, Route::Any).upstreams.len(), 3);

        // The primary is down (not serving): nothing to write to, replicas for reads.
        let down = view("active-passive", Some("a"), &["b", "c"]);
        let primary = route(&down, Route::Primary);
        assert!(primary.upstreams.is_empty());
        assert_eq!(addresses_of(&primary.read_only), ["127.0.0.1:9001", "127.0.0.1:9002"]);
        assert_eq!(primary.primary, None);

        // Active-active has no primary: every serving instance takes primary traffic.
        let aa = view("active-active", None, &["a", "c"]);
        assert_eq!(
            addresses_of(&route(&aa, Route::Primary).upstreams),
            ["127.0.0.1:9000", "127.0.0.1:9002"]
        );
    }

    #[test]
    fn endpoint_addresses_come_from_urls_or_host_port() {
        assert_eq!(
            endpoint_address("http://10.0.0.1:8080/health").as_deref(),
            Some("10.0.0.1:8080")
        );
        assert_eq!(endpoint_address("10.0.0.1:5432").as_deref(), Some("10.0.0.1:5432"));
        assert_eq!(endpoint_address("postgres://u:p@db:5432/x").as_deref(), Some("db:5432"));
        assert_eq!(endpoint_address("http://nohost/"), None);
        assert_eq!(endpoint_address(":80"), None);
    }

    #[test]
    fn ejection_and_breaker_times_are_settable_and_checked() {
        let l = listener(serde_json::json!({
            "name": "x", "bind": "127.0.0.1:1", "upstreams": ["127.0.0.1:2"],
            "ejection": {"consecutive_errors": 2, "base": "200ms", "max": "2s"},
            "breaker": {"window": "2s", "min_requests": 4, "failure_percent": 25, "open": "1s", "probes": 1},
        }))
        .unwrap();
        assert_eq!(
            (l.ejection.failures_max, l.ejection.base_ms, l.ejection.max_ms),
            (2, 200, 2000)
        );
        assert_eq!(
            (
                l.breaker.window_ms,
                l.breaker.min_requests,
                l.breaker.failure_percent,
                l.breaker.open_ms,
                l.breaker.probes
            ),
            (2000, 4, 25, 1000, 1)
        );
        let defaults =
            listener(serde_json::json!({"name": "x", "bind": "127.0.0.1:1", "upstreams": ["127.0.0.1:2"]})).unwrap();
        assert_eq!(
            (defaults.ejection, defaults.breaker),
            (Ejection::default(), BreakerPolicy::default())
        );
        let bad = listener(serde_json::json!({
            "name": "x", "bind": "127.0.0.1:1", "upstreams": ["127.0.0.1:2"],
            "ejection": {"base": "5s", "max": "1s"},
        }))
        .unwrap_err();
        assert_eq!(bad.field, "proxy.listeners[0].ejection.max");
        let bad = listener(serde_json::json!({
            "name": "x", "bind": "127.0.0.1:1", "upstreams": ["127.0.0.1:2"],
            "breaker": {"failure_percent": 0},
        }))
        .unwrap_err();
        assert_eq!(bad.field, "proxy.listeners[0].breaker.failure_percent");
    }
}
