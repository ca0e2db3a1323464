//! A listener's upstreams with what the balancer needs to know of each: connections in
//! flight and passive ejection (`rampart_core::proxy::Outlier`).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use rampart_core::proxy::{Algorithm, Balancer, Candidate, Ejection, Outlier, Upstream};

pub struct Pool {
    upstreams: Vec<Member>,
    balancer: Mutex<Balancer>,
    ejection: Ejection,
}

struct Member {
    upstream: Upstream,
    active: AtomicU32,
    outlier: Mutex<Outlier>,
}

/// A connection or request counted against an upstream while it lives.
pub struct Lease {
    pool: Arc<Pool>,
    index: usize,
}

impl Lease {
    pub fn address(&self) -> &str {
        &self.pool.upstreams[self.index].upstream.address
    }

    /// The upstream answered: it is forgiven its failures.
    pub fn succeeded(&self) {
        self.pool.upstreams[self.index]
            .outlier
            .lock()
            .expect("outlier lock")
            .success();
    }

    /// The upstream failed (refused, timed out): it may leave rotation.
    pub fn failed(&self) {
        let member = &self.pool.upstreams[self.index];
        if member
            .outlier
            .lock()
            .expect("outlier lock")
            .failure(now_ms(), self.pool.ejection)
        {
            tracing::warn!(upstream = %member.upstream.address, "upstream ejected");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.upstreams[self.index].active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    pub fn new(upstreams: &[Upstream], algorithm: Algorithm) -> Pool {
        Pool {
            upstreams: upstreams
                .iter()
                .map(|u| Member {
                    upstream: u.clone(),
                    active: AtomicU32::new(0),
                    outlier: Mutex::new(Outlier::default()),
                })
                .collect(),
            balancer: Mutex::new(Balancer::new(algorithm)),
            ejection: Ejection::default(),
        }
    }

    /// Picks an upstream not in `tried`, among those in rotation (or among all, when every
    /// one is ejected: better to try than to refuse outright).
    pub fn pick(self: &Arc<Self>, client: u64, tried: &[usize]) -> Option<Lease> {
        let now = now_ms();
        let untried = |i: &usize| !tried.contains(i);
        let mut indices: Vec<usize> = (0..self.upstreams.len())
            .filter(untried)
            .filter(|i| !self.upstreams[*i].outlier.lock().expect("outlier lock").ejected(now))
            .collect();
        if indices.is_empty() && tried.is_empty() {
            indices = (0..self.upstreams.len()).collect();
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
        self.upstreams[index].active.fetch_add(1, Ordering::Relaxed);
        Some(Lease {
            pool: self.clone(),
            index,
        })
    }

    /// Lets `pick` leave a lease's upstream out on the next try.
    pub fn index_of(lease: &Lease) -> usize {
        lease.index
    }

    pub fn len(&self) -> usize {
        self.upstreams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
