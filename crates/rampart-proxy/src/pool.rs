//! A listener's upstreams with what the balancer needs to know of each: connections in
//! flight, passive ejection (`rampart_core::proxy::Outlier`) and a circuit breaker
//! (`rampart_core::proxy::Breaker`). An upstream is in rotation when it is not ejected and
//! its breaker lets a request through.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::metrics::{Metrics, UpstreamLabels};
use crate::now_ms;

use rampart_core::proxy::{
    may_eject, Balancer, Breaker, BreakerPolicy, BreakerState, Candidate, Ejection, Failure, Listener, Outlier,
    Upstream,
};

pub struct Pool {
    listener: String,
    max_ejected_percent: u32,
    metrics: Arc<Metrics>,
    upstreams: Vec<Member>,
    balancer: Mutex<Balancer>,
    ejection: Ejection,
    breaker: BreakerPolicy,
}

struct Member {
    upstream: Upstream,
    active: AtomicU32,
    outlier: Mutex<Outlier>,
    breaker: Mutex<Breaker>,
}

/// A connection or request counted against an upstream while it lives.
pub struct Lease {
    pool: Arc<Pool>,
    index: usize,
    /// Whether its outcome was recorded (else dropping it frees a half-open probe slot).
    recorded: std::sync::atomic::AtomicBool,
}

impl Lease {
    pub fn address(&self) -> &str {
        &self.pool.upstreams[self.index].upstream.address
    }

    /// The upstream answered well: it is forgiven its failures.
    pub fn succeeded(&self) {
        self.recorded.store(true, Ordering::Relaxed);
        let member = &self.pool.upstreams[self.index];
        member.outlier.lock().expect("outlier lock").success();
        let now = now_ms();
        let mut breaker = member.breaker.lock().expect("breaker lock");
        breaker.record(now, true, self.pool.breaker);
        self.pool
            .show_breaker(self.index, breaker.state(now, self.pool.breaker));
    }

    /// The upstream failed: it may leave rotation, and its breaker may open.
    pub fn failed(&self, kind: Failure) {
        self.recorded.store(true, Ordering::Relaxed);
        let member = &self.pool.upstreams[self.index];
        let now = now_ms();
        let room = may_eject(self.pool.ejected(now), self.pool.len(), self.pool.max_ejected_percent);
        let ejected = member
            .outlier
            .lock()
            .expect("outlier lock")
            .failure(now, kind, self.pool.ejection, room);
        if ejected {
            tracing::warn!(upstream = %member.upstream.address, ?kind, "upstream ejected");
            self.pool
                .metrics
                .ejections
                .get_or_create(&self.pool.labels(self.index))
                .inc();
        }
        let mut breaker = member.breaker.lock().expect("breaker lock");
        breaker.record(now, false, self.pool.breaker);
        let state = breaker.state(now, self.pool.breaker);
        if state == BreakerState::Open {
            tracing::warn!(upstream = %member.upstream.address, "circuit breaker open");
        }
        self.pool.show_breaker(self.index, state);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let member = &self.pool.upstreams[self.index];
        if !self.recorded.load(Ordering::Relaxed) {
            member.breaker.lock().expect("breaker lock").release();
        }
        member.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub fn new(listener: &Listener, upstreams: &[Upstream], metrics: Arc<Metrics>) -> Pool {
        let algorithm = listener.algorithm;
        Pool {
            listener: listener.name.clone(),
            max_ejected_percent: listener.max_ejected_percent,
            metrics,
            upstreams: upstreams
                .iter()
                .map(|u| Member {
                    upstream: u.clone(),
                    active: AtomicU32::new(0),
                    outlier: Mutex::new(Outlier::default()),
                    breaker: Mutex::new(Breaker::default()),
                })
                .collect(),
            balancer: Mutex::new(Balancer::new(algorithm)),
            ejection: Ejection::default(),
            breaker: BreakerPolicy::default(),
        }
    }

    /// Picks an upstream not in `tried`, among those in rotation (or among all that are not
    /// tried, when none is in rotation: better to try than to refuse outright).
    pub fn pick(self: &Arc<Self>, client: u64, tried: &[usize]) -> Option<Lease> {
        let now = now_ms();
        let mut passed = tried.to_vec();
        loop {
            let open = |i: &usize| {
                let member = &self.upstreams[*i];
                !member.outlier.lock().expect("outlier lock").ejected(now)
                    && member.breaker.lock().expect("breaker lock").state(now, self.breaker) != BreakerState::Open
            };
            let untried: Vec<usize> = (0..self.upstreams.len()).filter(|i| !passed.contains(i)).collect();
            if untried.is_empty() {
                return None;
            }
            let mut indices: Vec<usize> = untried.iter().copied().filter(open).collect();
            let panic_mode = indices.is_empty();
            if panic_mode {
                indices = untried;
            }
            let candidates: Vec<Candidate<'_>> = indices
                .iter()
                .map(|i| {
                    let m = &self.upstreams[*i];
                    Candidate {
                        address: &m.upstream.address,
                        weight: m.upstream.weight,
                        active: m.active.load(Ordering::Relaxed),
                    }
                })
                .collect();
            let chosen = self
                .balancer
                .lock()
                .expect("balancer lock")
                .pick(&candidates, client, rand::random())?;
            let index = indices[chosen];
            // A half-open breaker lets only a few probes through at once.
            if !panic_mode
                && !self.upstreams[index]
                    .breaker
                    .lock()
                    .expect("breaker lock")
                    .allow(now, self.breaker)
            {
                passed.push(index);
                continue;
            }
            self.upstreams[index].active.fetch_add(1, Ordering::Relaxed);
            return Some(Lease {
                pool: self.clone(),
                index,
                recorded: std::sync::atomic::AtomicBool::new(false),
            });
        }
    }

    /// Lets `pick` leave a lease's upstream out on the next try.
    pub fn index_of(lease: &Lease) -> usize {
        lease.index
    }

    fn labels(&self, index: usize) -> UpstreamLabels {
        UpstreamLabels {
            listener: self.listener.clone(),
            upstream: self.upstreams[index].upstream.address.clone(),
        }
    }

    fn show_breaker(&self, index: usize, state: BreakerState) {
        let value = match state {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        self.metrics.breaker_state.get_or_create(&self.labels(index)).set(value);
    }

    /// Upstreams out of rotation by ejection now.
    fn ejected(&self, now: u64) -> usize {
        self.upstreams
            .iter()
            .filter(|m| m.outlier.lock().expect("outlier lock").ejected(now))
            .count()
    }

    pub fn len(&self) -> usize {
        self.upstreams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }
}
