//! Who is calling: on a TLS node every `/v1` call carries `Authorization: Bearer NAME.SECRET`,
//! checked against the hashed tokens of the replicated state (so a token works on every
//! node and survives leader changes and restores, and a revoke takes effect everywhere).
//! The role a call needs comes from `rampart_core::auth::role_for`; key prefixes are
//! checked by the handlers, which know the exact key. A node without TLS serves everyone as
//! the anonymous local admin `-`: it is bound to loopback, or `--insecure` said so.
//!
//! Failed attempts are counted per reason in `rampart_auth_failures`, and a source that
//! keeps failing gets 429 for its failures; secrets never reach a log line, an event or
//! an error message.

use std::net::SocketAddr;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rampart_core::auth::{authorize, role_for, split_token, Denied, Grant, Role, Scope};
use rampart_core::config::Security;
use rampart_store::state::Token;
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::node::{now_ms, Shared};

/// Failed attempts a source may make in a burst, and how fast they drain.
pub const FAILURES_BURST: u32 = 20;
pub const FAILURES_DRAIN_MS: u64 = 1000;
pub const FAILURE_SOURCES_MAX: usize = 10_000;

/// Set by a forwarding node: the client address the forwarded call came from. Trusted only
/// on connections that presented a node certificate.
pub const FORWARDED_FOR_HEADER: &str = "x-rampart-forwarded-for";

/// The caller name of a call authenticated by a node certificate instead of a token.
pub const NODE_CERTIFICATE_ACTOR: &str = "node-certificate";

/// The accepted connection a request arrived on (inserted by `server.rs`).
#[derive(Debug, Clone, Copy)]
pub struct Connection {
    pub source: SocketAddr,
    /// The client presented a node certificate of the cluster CA.
    pub from_node: bool,
    /// A region link: a node of another region, on the region ALPN (TLS nodes only).
    pub region_link: bool,
}

/// The authenticated caller, for handlers (key scopes) and the audit trail.
#[derive(Debug, Clone)]
pub struct Caller {
    /// Token name; `-` on a node without tokens.
    pub name: String,
    pub role: Role,
    pub prefixes: Vec<String>,
    /// The client's address, as `IP:PORT`.
    pub source: String,
    /// The hash of the presented token (`None` on a node without tokens).
    pub token_hash: Option<[u8; 32]>,
}

impl Caller {
    /// False once the caller's token is revoked (or replaced under the same name): long
    /// calls such as watches end then instead of serving a revoked token.
    pub fn still_valid(&self, node: &Shared) -> bool {
        let Some(hash) = self.token_hash else { return true };
        let applied = node.applied.read().expect("state lock");
        applied
            .state
            .shipped
            .tokens
            .get(&self.name)
            .is_some_and(|t| t.hash == hash)
    }

    /// Refuses with 403 when this caller may not touch `scope` with `role`.
    pub fn check(&self, role: Role, scope: Scope<'_>) -> Result<(), ApiError> {
        authorize(
            Grant {
                role: self.role,
                prefixes: &self.prefixes,
            },
            role,
            scope,
        )
        .map_err(|denied| forbidden(&self.name, &denied))
    }
}

fn forbidden(name: &str, denied: &Denied) -> ApiError {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", format!("token {name:?}: {denied}"))
}

/// The token's record if `token` is valid on this node's applied state. The hash
/// comparison takes the same time whether or not the name exists or the secret is close.
fn verify(node: &Shared, token: &str) -> Option<(String, Token)> {
    let (name, secret) = split_token(token)?;
    let presented = crate::secret::hash_secret(secret);
    let applied = node.applied.read().expect("state lock");
    let record = applied.state.shipped.tokens.get(name);
    let expected = record.map_or([0u8; 32], |r| r.hash);
    let equal: bool = presented.ct_eq(&expected).into();
    record.filter(|_| equal).map(|r| (name.to_string(), r.clone()))
}

/// The client address of a request: the connection's, or for a call forwarded by a peer,
/// the one it names.
fn source_of(request: &Request, trust_forwarded: bool) -> String {
    let connection = request.extensions().get::<Connection>().copied();
    if trust_forwarded || connection.is_some_and(|c| c.from_node) {
        if let Some(forwarded) = request
            .headers()
            .get(FORWARDED_FOR_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.parse::<SocketAddr>().is_ok())
        {
            return forwarded.to_string();
        }
    }
    connection.map_or_else(|| "unknown".to_string(), |c| c.source.to_string())
}

fn refuse(node: &Shared, reason: &str, error: ApiError) -> Response {
    node.metrics.refused(reason);
    let mut response = error.into_response();
    if response.status() == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"rampart\""),
        );
    }
    response
}

/// Axum middleware: authenticates the caller and checks the call's role.
pub async fn authenticate(State(node): State<Shared>, mut request: Request, next: Next) -> Response {
    let Some(role) = role_for(request.method().as_str(), request.uri().path()) else {
        return next.run(request).await;
    };
    let security = node.config.security();
    let source = source_of(&request, security != Security::Tls);
    if security != Security::Tls {
        request.extensions_mut().insert(Caller {
            name: "-".to_string(),
            role: Role::Admin,
            prefixes: Vec::new(),
            source,
            token_hash: None,
        });
        return next.run(request).await;
    }
    let ip = source
        .parse::<SocketAddr>()
        .map(|a| a.ip())
        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
    let now = now_ms();
    // A source that keeps failing gets 429 instead of 401 for its failures; a valid token
    // is still served, so clients sharing an address (NAT, a proxy) are not locked out by
    // one misconfigured neighbour. Guessing a 256-bit secret is hopeless either way.
    let refuse_failure = |reason: &str, error: ApiError| -> Response {
        let mut limiter = node.auth_failures.lock().expect("limiter lock");
        let blocked = limiter.blocked(ip, now);
        limiter.record_failure(ip, now);
        drop(limiter);
        let Some(wait_ms) = blocked else {
            return refuse(&node, reason, error);
        };
        let mut response = refuse(
            &node,
            "rate_limited",
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_auth_failures",
                format!("too many failed authentications from {ip}; retry in {wait_ms}ms with a valid token"),
            ),
        );
        let seconds = wait_ms.div_ceil(1000).to_string();
        if let Ok(value) = HeaderValue::from_str(&seconds) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    };
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let from_node = request.extensions().get::<Connection>().is_some_and(|c| c.from_node);
    if presented.is_none() && from_node {
        // Break glass: a node certificate already grants everything (its holder can speak
        // Raft), so a call made with one and no token is served as admin and audited as
        // such. This is how a region whose admin tokens are all lost mints a new one.
        request.extensions_mut().insert(Caller {
            name: NODE_CERTIFICATE_ACTOR.to_string(),
            role: Role::Admin,
            prefixes: Vec::new(),
            source,
            token_hash: None,
        });
        return next.run(request).await;
    }
    let Some(presented) = presented else {
        return refuse_failure(
            "missing_token",
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "this node requires an API token: pass --token or RAMPART_TOKEN \
                 (HTTP: Authorization: Bearer NAME.SECRET)",
            ),
        );
    };
    let Some((name, token)) = verify(&node, presented) else {
        tracing::debug!(%source, "refused an invalid token");
        return refuse_failure(
            "invalid_token",
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "the token is not valid in this region: unknown, revoked or mistyped",
            ),
        );
    };
    let caller = Caller {
        name,
        role: token.role,
        prefixes: token.prefixes,
        source,
        token_hash: Some(token.hash),
    };
    if let Err(error) = caller.check(role, Scope::Unkeyed) {
        return refuse(&node, "forbidden", error);
    }
    request.extensions_mut().insert(caller);
    next.run(request).await
}
