//! A listener's upstreams with what the balancer needs to know of each: connections in
//! flight, passive ejection (`rampart_core::proxy::Outlier`) and a circuit breaker
//! (`rampart_core::proxy::Breaker`), and the active check's verdict if the listener has one.
//! An upstream is in rotation when its check has not found it down, it is not ejected and
//! its breaker lets a request through.
//!
//! The set can be replaced while connections run (a service listener follows the
//! registry): upstreams that stay keep their state, and connections to one that left are
//! told when to end — at once for a primary that lost its role, after the listener's
//! drain timeout otherwise (`Lease::closed`).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::metrics::{Metrics, UpstreamLabels};
use crate::now_ms;
use prometheus_client::metrics::gauge::Gauge;

use rampart_core::health::{CheckState, Health, Thresholds};
use rampart_core::proxy::{
    may_eject, Balancer, Breaker, BreakerPolicy, BreakerState, Candidate, Ejection, Failure, Listener, Outlier,
    Upstream,
};

pub struct Pool {
    listener: String,
    max_ejected_percent: u32,
    metrics: Arc<Metrics>,
    members: RwLock<Arc<Vec<Arc<Member>>>>,
    balancer: Mutex<Balancer>,
    ejection: Ejection,
    breaker: BreakerPolicy,
}

struct Member {
    upstream: Upstream,
    /// The address as a URI authority, for HTTP requests.
    authority: hyper::http::uri::Authority,
    active: AtomicU32,
    /// Under one lock: every request reads all three and writes two.
    judged: Mutex<Judged>,
    /// When connections to it must end; `None` while it belongs to the pool.
    close_at: watch::Sender<Option<Instant>>,
    /// `rampart_proxy_breaker_state` of this upstream, looked up once.
    breaker_gauge: Gauge,
}

/// What decides whether an upstream is in rotation.
struct Judged {
    outlier: Outlier,
    breaker: Breaker,
    /// The active check's verdict (unknown, hence in rotation, without a check).
    checked: CheckState,
}

impl Member {
    fn new(upstream: &Upstream, breaker_gauge: Gauge) -> Arc<Member> {
        Arc::new(Member {
            upstream: upstream.clone(),
            // Validated as HOST:PORT when the config or the registry was read.
            authority: upstream
                .address
                .parse()
                .unwrap_or_else(|_| hyper::http::uri::Authority::from_static("invalid.upstream:1")),
            active: AtomicU32::new(0),
            judged: Mutex::new(Judged {
                outlier: Outlier::default(),
                breaker: Breaker::default(),
                checked: CheckState::new(now_ms()),
            }),
            close_at: watch::channel(None).0,
            breaker_gauge,
        })
    }
}

impl Member {
    /// Not found down by its active check, not ejected, and its breaker not open.
    fn in_rotation(&self, now: u64, breaker: BreakerPolicy) -> bool {
        let mut judged = self.judged();
        judged.checked.health() != Health::Down
            && !judged.outlier.ejected(now)
            && judged.breaker.state(now, breaker) != BreakerState::Open
    }

    fn judged(&self) -> std::sync::MutexGuard<'_, Judged> {
        self.judged.lock().expect("upstream lock")
    }

    /// Sets the breaker's gauge; written only when it changes (this runs per request).
    fn show_breaker(&self, state: BreakerState) {
        let value = match state {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        if self.breaker_gauge.get() != value {
            self.breaker_gauge.set(value);
        }
    }
}

/// One upstream's standing, for the health endpoints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Standing {
    pub address: String,
    pub active: u32,
    pub ejected: bool,
    pub breaker: &'static str,
    /// The active check's verdict: `up`, `down` or `unknown` (no check, or too few probes).
    pub check: Health,
    /// Not found down by its check, not ejected, breaker not open.
    pub in_rotation: bool,
}

/// A connection or request counted against an upstream while it lives.
pub struct Lease {
    pool: Arc<Pool>,
    member: Arc<Member>,
    /// Whether its outcome was recorded (else dropping it frees a half-open probe slot).
    recorded: AtomicBool,
}

impl Lease {
    pub fn address(&self) -> &str {
        &self.member.upstream.address
    }

    pub fn authority(&self) -> hyper::http::uri::Authority {
        self.member.authority.clone()
    }

    /// Resolves when the connection must end because its upstream left the pool: at once
    /// or at the end of its drain. Never, while the upstream stays.
    pub async fn closed(&self) {
        self.closing().await
    }

    /// [`Lease::closed`] as a future of its own, for a response body that outlives the
    /// borrow.
    pub fn closing(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut close_at = self.member.close_at.subscribe();
        async move {
            let at: Option<Instant> = close_at.wait_for(Option::is_some).await.ok().and_then(|at| *at);
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        }
    }

    /// The upstream answered well: it is forgiven its failures.
    pub fn succeeded(&self) {
        self.recorded.store(true, Ordering::Relaxed);
        let now = now_ms();
        let state = {
            let mut judged = self.member.judged();
            judged.outlier.success();
            judged.breaker.record(now, true, self.pool.breaker);
            judged.breaker.state(now, self.pool.breaker)
        };
        self.member.show_breaker(state);
    }

    /// The upstream failed: it may leave rotation, and its breaker may open.
    pub fn failed(&self, kind: Failure) {
        self.recorded.store(true, Ordering::Relaxed);
        let member = &self.member;
        let now = now_ms();
        let members = self.pool.members();
        // Counted before this upstream's lock is taken: never two upstream locks at once.
        let ejected_now = members.iter().filter(|m| m.judged().outlier.ejected(now));
        let room = may_eject(ejected_now.count(), members.len(), self.pool.max_ejected_percent);
        let (ejected, state) = {
            let mut judged = member.judged();
            let ejected = judged.outlier.failure(now, kind, self.pool.ejection, room);
            judged.breaker.record(now, false, self.pool.breaker);
            (ejected, judged.breaker.state(now, self.pool.breaker))
        };
        if ejected {
            tracing::warn!(upstream = %member.upstream.address, ?kind, "upstream ejected");
            self.pool
                .metrics
                .ejections
                .get_or_create(&self.pool.labels(member))
                .inc();
        }
        if state == BreakerState::Open {
            tracing::warn!(upstream = %member.upstream.address, "circuit breaker open");
        }
        member.show_breaker(state);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.recorded.load(Ordering::Relaxed) {
            self.member.judged().breaker.release();
        }
        self.member.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub fn new(listener: &Listener, upstreams: &[Upstream], metrics: Arc<Metrics>) -> Pool {
        let pool = Pool {
            listener: listener.name.clone(),
            max_ejected_percent: listener.max_ejected_percent,
            metrics,
            members: RwLock::new(Arc::new(Vec::new())),
            balancer: Mutex::new(Balancer::new(listener.algorithm)),
            ejection: listener.ejection,
            breaker: listener.breaker,
        };
        let members = upstreams.iter().map(|u| pool.member(u)).collect();
        *pool.members.write().expect("members lock") = Arc::new(members);
        pool
    }

    fn member(&self, upstream: &Upstream) -> Arc<Member> {
        let labels = UpstreamLabels {
            listener: self.listener.clone(),
            upstream: upstream.address.clone(),
        };
        Member::new(upstream, self.metrics.breaker_state.get_or_create(&labels).clone())
    }

    fn members(&self) -> Arc<Vec<Arc<Member>>> {
        self.members.read().expect("members lock").clone()
    }

    /// Makes `upstreams` the pool. Those already in it keep their ejection, breaker and
    /// connections; connections to those that left end after `drain` (zero: at once).
    pub fn replace(&self, upstreams: &[Upstream], drain: Duration) {
        let mut members = self.members.write().expect("members lock");
        let next: Vec<Arc<Member>> = upstreams
            .iter()
            .map(|u| {
                members
                    .iter()
                    .find(|m| m.upstream == *u)
                    .cloned()
                    .unwrap_or_else(|| self.member(u))
            })
            .collect();
        for gone in members.iter().filter(|m| !next.iter().any(|n| Arc::ptr_eq(n, m))) {
            tracing::info!(
                listener = %self.listener,
                upstream = %gone.upstream.address,
                connections = gone.active.load(Ordering::Relaxed),
                "upstream left; its connections end in {drain:?}"
            );
            gone.close_at.send_replace(Some(Instant::now() + drain));
        }
        for new in next.iter().filter(|n| !members.iter().any(|m| Arc::ptr_eq(n, m))) {
            tracing::info!(listener = %self.listener, upstream = %new.upstream.address, "upstream joined");
        }
        *members = Arc::new(next);
    }

    /// Picks an upstream whose address is not in `tried`, among those in rotation (or
    /// among all that are not tried, when none is in rotation: better to try than to refuse
    /// outright).
    pub fn pick(self: &Arc<Self>, client: u64, tried: &[String]) -> Option<Lease> {
        let now = now_ms();
        let members = self.members();
        // Upstreams whose half-open breaker refused a probe just now.
        let mut passed: Vec<&str> = Vec::new();
        loop {
            let open = |m: &&Arc<Member>| m.in_rotation(now, self.breaker);
            let untried = |m: &&Arc<Member>| {
                let address = m.upstream.address.as_str();
                !tried.iter().any(|t| t == address) && !passed.contains(&address)
            };
            let mut chosen_from: Vec<&Arc<Member>> = members.iter().filter(untried).filter(open).collect();
            let panic_mode = chosen_from.is_empty();
            if panic_mode {
                chosen_from = members.iter().filter(untried).collect();
                if chosen_from.is_empty() {
                    return None;
                }
            }
            let candidates: Vec<Candidate<'_>> = chosen_from
                .iter()
                .map(|m| Candidate {
                    address: &m.upstream.address,
                    weight: m.upstream.weight,
                    active: m.active.load(Ordering::Relaxed),
                })
                .collect();
            let chosen = self
                .balancer
                .lock()
                .expect("balancer lock")
                .pick(&candidates, client, rand::random())?;
            let member = chosen_from[chosen];
            // A half-open breaker lets only a few probes through at once.
            if !panic_mode && !member.judged().breaker.allow(now, self.breaker) {
                passed.push(&member.upstream.address);
                continue;
            }
            member.active.fetch_add(1, Ordering::Relaxed);
            return Some(Lease {
                pool: self.clone(),
                member: member.clone(),
                recorded: AtomicBool::new(false),
            });
        }
    }

    /// Every upstream's standing now.
    pub fn standings(&self) -> Vec<Standing> {
        let now = now_ms();
        self.members()
            .iter()
            .map(|m| {
                let (ejected, breaker, check) = {
                    let mut judged = m.judged();
                    let breaker = judged.breaker.state(now, self.breaker);
                    (judged.outlier.ejected(now), breaker, judged.checked.health())
                };
                Standing {
                    address: m.upstream.address.clone(),
                    active: m.active.load(Ordering::Relaxed),
                    ejected,
                    breaker: match breaker {
                        BreakerState::Closed => "closed",
                        BreakerState::Open => "open",
                        BreakerState::HalfOpen => "half-open",
                    },
                    check,
                    in_rotation: m.in_rotation(now, self.breaker),
                }
            })
            .collect()
    }

    /// Every upstream's address, for the active checks to probe.
    pub fn addresses(&self) -> Vec<String> {
        self.members().iter().map(|m| m.upstream.address.clone()).collect()
    }

    /// Feeds an active check's probe of `address`: after `fall` failures in a row the
    /// upstream leaves rotation, after `rise` successes it is back.
    pub fn observe(&self, address: &str, ok: bool, thresholds: Thresholds) {
        let Some(member) = self.members().iter().find(|m| m.upstream.address == address).cloned() else {
            return;
        };
        let changed = member.judged().checked.observe(now_ms(), ok, thresholds);
        if let Some(health) = changed {
            tracing::warn!(listener = %self.listener, upstream = %address, ?health, "active check verdict");
            let up = i64::from(health == Health::Up);
            self.metrics.check_up.get_or_create(&self.labels(&member)).set(up);
        }
    }

    fn labels(&self, member: &Member) -> UpstreamLabels {
        UpstreamLabels {
            listener: self.listener.clone(),
            upstream: member.upstream.address.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.members().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
