//! Who may do what. An API token carries a [`Role`] and, optionally, key prefixes; every
//! request needs a role (and, for keys, a scope). This module decides from plain inputs:
//! the node extracts the token, looks it up and carries out the verdict.
//!
//! Roles nest like etcd's and Consul's common policies: `admin` can do everything an
//! `operator` can, an operator everything a `write` token can, and so on down to `read`.

use std::collections::HashMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// What a token may do, weakest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads and watches.
    Read,
    /// KV writes, leases, elections, heartbeats.
    Write,
    /// Switchover, failover, members, backups.
    Operator,
    /// Tokens.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Read, Role::Write, Role::Operator, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Write => "write",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == text)
            .ok_or_else(|| format!("invalid role {text:?}: expected read, write, operator or admin"))
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which keys a request touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// Not about keys (leases, elections, cluster, tokens).
    Unkeyed,
    Key(&'a str),
    /// A range or watch over every key starting with this.
    Prefix(&'a str),
}

/// What a token grants.
#[derive(Debug, Clone, Copy)]
pub struct Grant<'a> {
    pub role: Role,
    /// Empty: every key. Otherwise keys must start with one of these.
    pub prefixes: &'a [String],
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("this call needs a token with role {needed} or above; this token has role {has}")]
    RoleTooWeak { needed: Role, has: Role },
    #[error("this token may only touch keys under {allowed}; {asked} is outside them")]
    OutsidePrefixes { asked: String, allowed: String },
}

/// Decides whether `grant` allows a call that needs `role` over `scope`.
pub fn authorize(grant: Grant<'_>, role: Role, scope: Scope<'_>) -> Result<(), Denied> {
    if grant.role < role {
        return Err(Denied::RoleTooWeak {
            needed: role,
            has: grant.role,
        });
    }
    if grant.prefixes.is_empty() {
        return Ok(());
    }
    // A prefix range is allowed only when the whole range lies inside one granted prefix.
    let (asked, label) = match scope {
        Scope::Unkeyed => return Ok(()),
        Scope::Key(key) => (key, format!("key {key:?}")),
        Scope::Prefix(prefix) => (prefix, format!("prefix {prefix:?}")),
    };
    if grant.prefixes.iter().any(|p| asked.starts_with(p.as_str())) {
        return Ok(());
    }
    Err(Denied::OutsidePrefixes {
        asked: label,
        allowed: grant
            .prefixes
            .iter()
            .map(|p| format!("{p:?}"))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// The role a request needs, from its method and path; `None` for the open endpoints
/// (`/health/*`, `/metrics`, `/metrics/ha`, `/metrics/regions`), which carry no data an attacker could use. Paths this table
/// does not know need `read` to look and `operator` to change, so a new endpoint is never
/// open by accident.
pub fn role_for(method: &str, path: &str) -> Option<Role> {
    if !path.starts_with("/v1/") && path != "/v1" {
        let open = ["/metrics", "/metrics/ha", "/metrics/regions"];
        return if path.starts_with("/health/") || open.contains(&path) {
            None
        } else {
            Some(Role::Read)
        };
    }
    let reading = matches!(method, "GET" | "HEAD" | "OPTIONS");
    let area = path.trim_start_matches("/v1/").split('/').next().unwrap_or("");
    Some(match (area, reading) {
        ("tokens", _) => Role::Admin,
        // The region log carries every shipped write, token hashes included; the lease
        // and votes decide which region takes writes.
        ("regions", _)
            if [
                "/v1/regions/log",
                "/v1/regions/snapshot",
                "/v1/regions/lease",
                "/v1/regions/vote",
                "/v1/regions/handover",
                "/v1/regions/ack",
            ]
            .iter()
            .any(|p| path.starts_with(p)) =>
        {
            Role::Admin
        }
        // An old primary's unshipped writes are user data of every key.
        ("regions", true) if path.starts_with("/v1/regions/divergence") => Role::Operator,
        (_, true) => Role::Read,
        ("kv" | "leases" | "elections" | "quotas", false) => Role::Write,
        ("services", false) if path.ends_with("/heartbeat") => Role::Write,
        (_, false) => Role::Operator,
    })
}

/// Token names: short, printable, and free of the `.` that separates name and secret.
pub fn check_token_name(name: &str) -> Result<(), String> {
    let ok =
        !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid token name {name:?}: 1 to 64 letters, digits, '-' or '_'"
        ))
    }
}

/// A token is `NAME.SECRET`; the name finds the record, the secret proves possession.
pub fn split_token(token: &str) -> Option<(&str, &str)> {
    let (name, secret) = token.split_once('.')?;
    (check_token_name(name).is_ok() && !secret.is_empty()).then_some((name, secret))
}

/// Limits failed authentication attempts per source address, as a leaky bucket: each
/// failure adds one, the level drains by one every `drain_ms`, and a source whose level has
/// reached `burst` has its further failures answered "too many" (429, with when to retry)
/// instead of "unauthenticated". Guessing a 256-bit secret is hopeless anyway; this tells a
/// misconfigured client or a scanner to back off, without locking out a valid token that
/// shares its address.
#[derive(Debug)]
pub struct FailureLimiter {
    burst: u32,
    drain_ms: u64,
    sources_max: usize,
    levels: HashMap<IpAddr, (u64, u64)>,
}

impl FailureLimiter {
    pub fn new(burst: u32, drain_ms: u64, sources_max: usize) -> FailureLimiter {
        FailureLimiter {
            burst: burst.max(1),
            drain_ms: drain_ms.max(1),
            sources_max: sources_max.max(1),
            levels: HashMap::new(),
        }
    }

    fn level(&self, source: IpAddr, now_ms: u64) -> u64 {
        self.levels.get(&source).map_or(0, |&(level, at_ms)| {
            level.saturating_sub(now_ms.saturating_sub(at_ms) / self.drain_ms)
        })
    }

    /// `Some(ms to wait)` when `source` must be refused now.
    pub fn blocked(&self, source: IpAddr, now_ms: u64) -> Option<u64> {
        let level = self.level(source, now_ms);
        (level >= u64::from(self.burst)).then(|| (level + 1 - u64::from(self.burst)) * self.drain_ms)
    }

    pub fn record_failure(&mut self, source: IpAddr, now_ms: u64) {
        let level = self.level(source, now_ms);
        if self.levels.len() >= self.sources_max && !self.levels.contains_key(&source) {
            // Bounded memory: forget sources that have drained; if none has, the oldest.
            let drain_ms = self.drain_ms;
            self.levels
                .retain(|_, (level, at_ms)| *level > now_ms.saturating_sub(*at_ms) / drain_ms);
            if self.levels.len() >= self.sources_max {
                if let Some(oldest) = self.levels.iter().min_by_key(|(_, (_, at))| *at).map(|(ip, _)| *ip) {
                    self.levels.remove(&oldest);
                }
            }
        }
        self.levels.insert(source, (level + 1, now_ms));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(role: Role, prefixes: &[String]) -> Grant<'_> {
        Grant { role, prefixes }
    }

    #[test]
    fn stronger_roles_include_weaker_ones() {
        assert!(authorize(grant(Role::Admin, &[]), Role::Operator, Scope::Unkeyed).is_ok());
        assert!(authorize(grant(Role::Write, &[]), Role::Read, Scope::Key("a")).is_ok());
        assert_eq!(
            authorize(grant(Role::Read, &[]), Role::Write, Scope::Key("a")),
            Err(Denied::RoleTooWeak {
                needed: Role::Write,
                has: Role::Read
            })
        );
    }

    #[test]
    fn prefixes_bound_keys_and_ranges() {
        let prefixes = vec!["app/".to_string()];
        let g = grant(Role::Write, &prefixes);
        assert!(authorize(g, Role::Write, Scope::Key("app/x")).is_ok());
        assert!(authorize(g, Role::Read, Scope::Prefix("app/sub/")).is_ok());
        assert!(authorize(g, Role::Write, Scope::Key("other")).is_err());
        assert!(
            authorize(g, Role::Read, Scope::Prefix("ap")).is_err(),
            "a wider range reaches keys outside the grant"
        );
        assert!(authorize(g, Role::Write, Scope::Unkeyed).is_ok());
    }

    #[test]
    fn every_path_has_a_role_and_changes_need_more_than_reads() {
        assert_eq!(role_for("GET", "/health/ready"), None);
        assert_eq!(role_for("GET", "/metrics"), None);
        assert_eq!(role_for("GET", "/metrics/regions"), None);
        assert_eq!(role_for("GET", "/metrics/other"), Some(Role::Read));
        assert_eq!(role_for("GET", "/v1/kv/a"), Some(Role::Read));
        assert_eq!(role_for("PUT", "/v1/kv/a"), Some(Role::Write));
        assert_eq!(role_for("POST", "/v1/leases/3/keepalive"), Some(Role::Write));
        assert_eq!(role_for("POST", "/v1/cluster/members"), Some(Role::Operator));
        assert_eq!(role_for("POST", "/v1/quotas/api/take"), Some(Role::Write));
        assert_eq!(role_for("GET", "/v1/tokens"), Some(Role::Admin));
        assert_eq!(role_for("GET", "/v1/regions/log"), Some(Role::Admin));
        assert_eq!(role_for("GET", "/v1/regions/snapshot"), Some(Role::Admin));
        assert_eq!(role_for("POST", "/v1/regions/lease"), Some(Role::Admin));
        assert_eq!(role_for("POST", "/v1/regions/vote"), Some(Role::Admin));
        assert_eq!(role_for("POST", "/v1/regions/handover"), Some(Role::Admin));
        assert_eq!(role_for("POST", "/v1/regions/ack"), Some(Role::Admin));
        assert_eq!(role_for("POST", "/v1/regions/failover"), Some(Role::Operator));
        assert_eq!(role_for("GET", "/v1/regions"), Some(Role::Read));
        assert_eq!(role_for("POST", "/v1/services/db/switchover"), Some(Role::Operator));
        assert_eq!(
            role_for("POST", "/v1/services/db/instances/a/heartbeat"),
            Some(Role::Write)
        );
        assert_eq!(role_for("POST", "/v1/some-future-thing"), Some(Role::Operator));
        assert_eq!(role_for("GET", "/anything-else"), Some(Role::Read));
    }

    #[test]
    fn tokens_split_into_name_and_secret() {
        assert_eq!(split_token("ci.abc"), Some(("ci", "abc")));
        assert_eq!(split_token("ci."), None);
        assert_eq!(split_token("noseparator"), None);
        assert_eq!(split_token("bad name.abc"), None);
    }

    #[test]
    fn failures_block_a_source_until_they_drain() {
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let mut limiter = FailureLimiter::new(3, 1000, 16);
        for _ in 0..3 {
            assert_eq!(limiter.blocked(ip, 0), None);
            limiter.record_failure(ip, 0);
        }
        assert_eq!(limiter.blocked(ip, 0), Some(1000));
        assert_eq!(limiter.blocked(other, 0), None, "other sources are unaffected");
        assert_eq!(limiter.blocked(ip, 1000), None, "one failure drained");
    }

    #[test]
    fn the_limiter_remembers_a_bounded_number_of_sources() {
        let mut limiter = FailureLimiter::new(1, 1_000_000, 4);
        for i in 0..100u8 {
            limiter.record_failure(IpAddr::from([10, 0, 0, i]), u64::from(i));
        }
        assert!(limiter.levels.len() <= 4);
        assert!(limiter.blocked(IpAddr::from([10, 0, 0, 99]), 100).is_some());
    }
}
