//! A listener's quota standings. `scope = "local"`: each client's allowance is counted here.
//! `scope = "cluster"`: every request is taken from the client's one standing in the
//! control plane (`POST /v1/quotas/{listener}/take`), so every proxy of the region with a
//! listener of that name draws on the same allowance; a refusal is remembered until its
//! `Retry-After` so an exhausted client costs no further writes. When the control plane
//! cannot answer within [`CLUSTER_WAIT`], the proxy counts locally for
//! [`FALLBACK`] (each proxy then holds the limit on its own) and asks again after.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rampart_client::Client;
use rampart_core::proxy::{Allowance, OverQuota, Tier};

use crate::now_ms;

/// Clients whose standing is kept (idle ones are forgotten beyond this).
const CLIENTS_MAX: usize = 100_000;
/// Clients idle this long are forgotten first when the table is full.
const IDLE_MS: u64 = 600_000;
/// How long a request waits for the control plane's count before the proxy counts locally.
pub const CLUSTER_WAIT: Duration = Duration::from_millis(500);
/// How long the proxy counts locally after the control plane failed to answer.
pub const FALLBACK: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Standing {
    allowance: Allowance,
    seen_ms: u64,
    /// The control plane's last refusal and when it lapses.
    refused: Option<(u64, OverQuota)>,
}

/// Whether a request was counted, and where.
pub enum Counted {
    Local(Result<(), OverQuota>),
    Cluster(Result<(), OverQuota>),
    /// The control plane did not answer: counted locally instead.
    Fallback(Result<(), OverQuota>),
}

impl Counted {
    pub fn outcome(&self) -> Result<(), OverQuota> {
        match self {
            Counted::Local(o) | Counted::Cluster(o) | Counted::Fallback(o) => *o,
        }
    }
}

pub struct Standings {
    /// The quota's name in the control plane: the listener's.
    name: String,
    control: Option<Arc<Client>>,
    clients: Mutex<HashMap<String, Standing>>,
    /// Until when (ms) requests are counted locally after a control-plane failure.
    fallback_until_ms: AtomicU64,
}

impl Standings {
    pub fn new(name: &str, control: Option<Arc<Client>>) -> Standings {
        Standings {
            name: name.to_string(),
            control,
            clients: Mutex::new(HashMap::new()),
            fallback_until_ms: AtomicU64::new(0),
        }
    }

    /// Takes one request's worth of `client`'s allowance under `tier`.
    pub async fn take(&self, client: &str, tier: Tier, cluster: bool) -> Counted {
        let now = now_ms();
        let control = self.control.as_ref().filter(|_| cluster);
        let Some(control) = control else {
            return Counted::Local(self.with(client, now, |s| s.allowance.take(now, tier)));
        };
        if now < self.fallback_until_ms.load(Ordering::Relaxed) {
            return Counted::Fallback(self.with(client, now, |s| s.allowance.take(now, tier)));
        }
        let remembered = self.with(client, now, |s| match s.refused {
            Some((until, over)) if now < until => Err(OverQuota {
                retry_after_ms: until - now,
                ..over
            }),
            _ => Ok(()),
        });
        if remembered.is_err() {
            return Counted::Cluster(remembered);
        }
        match control.quota_take(&self.name, client, tier, CLUSTER_WAIT).await {
            Ok(Ok(_)) => Counted::Cluster(Ok(())),
            Ok(Err(over)) => {
                let until = now_ms() + over.retry_after_ms;
                self.with(client, now, |s| s.refused = Some((until, over)));
                Counted::Cluster(Err(over))
            }
            Err(e) => {
                tracing::warn!(quota = %self.name, "the control plane did not count a request, counting locally: {e}");
                self.fallback_until_ms
                    .store(now_ms() + FALLBACK.as_millis() as u64, Ordering::Relaxed);
                Counted::Fallback(self.with(client, now, |s| s.allowance.take(now, tier)))
            }
        }
    }

    /// Runs `f` on `client`'s standing, made if new (forgetting idle clients when full).
    fn with<T>(&self, client: &str, now: u64, f: impl FnOnce(&mut Standing) -> T) -> T {
        let mut clients = self.clients.lock().expect("quota standings lock");
        if clients.len() >= CLIENTS_MAX && !clients.contains_key(client) {
            clients.retain(|_, s| now.saturating_sub(s.seen_ms) < IDLE_MS);
        }
        let standing = clients.entry(client.to_string()).or_default();
        standing.seen_ms = now;
        f(standing)
    }
}
