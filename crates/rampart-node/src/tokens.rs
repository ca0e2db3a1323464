//! API tokens (`/v1/tokens`), the region's event log (`/v1/events`) with its audit trail,
//! and the bootstrap admin token.
//!
//! A token's secret is drawn on the node that takes the request and returned once; only its
//! SHA-256 goes through the Raft log. Every token change, like every other operator or
//! admin action, is committed as an audit event naming the token, the source address and
//! the outcome.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use rampart_core::api::{TokenCreateRequest, TokenCreated, TokenInfo, TokensResponse};
use rampart_core::auth::{check_token_name, Role};
use rampart_core::config::Security;
use rampart_store::{Op, Outcome};

use crate::auth::Caller;
use crate::error::{parse_body, unexpected, ApiError};
use crate::events::{audit, audit_event, record};
use crate::node::Shared;
use crate::secret::{hash_secret, new_secret};

/// Name of the bootstrap admin token, and the file (in the data dir) holding it.
pub const BOOTSTRAP_NAME: &str = "admin";
pub const BOOTSTRAP_FILE: &str = "admin.token";
const PREFIXES_MAX: usize = 16;

pub async fn create(
    State(node): State<Shared>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<TokenCreated>, ApiError> {
    let request: TokenCreateRequest = parse_body(body)?;
    check_token_name(&request.name).map_err(|m| ApiError::bad_request("bad_name", m))?;
    if request.prefixes.len() > PREFIXES_MAX {
        return Err(ApiError::bad_request(
            "bad_prefixes",
            format!("at most {PREFIXES_MAX} prefixes per token"),
        ));
    }
    for prefix in &request.prefixes {
        if prefix.is_empty() || prefix.len() > node.config.limits.key_bytes_max {
            return Err(ApiError::bad_request(
                "bad_prefixes",
                format!(
                    "invalid prefix {prefix:?}: 1 to {} bytes (leave prefixes out for every key)",
                    node.config.limits.key_bytes_max
                ),
            ));
        }
    }
    let secret = new_secret();
    let op = Op::TokenCreate {
        name: request.name.clone(),
        role: request.role,
        prefixes: request.prefixes.clone(),
        hash: hash_secret(&secret),
        bootstrap: false,
    };
    let result = match node.propose(op).await {
        Ok(Outcome::TokenCreated) => Ok(TokenCreated {
            info: TokenInfo {
                name: request.name.clone(),
                role: request.role,
                prefixes: request.prefixes.clone(),
                created_ms: crate::node::now_ms(),
            },
            token: format!("{}.{secret}", request.name),
        }),
        Ok(Outcome::TokenExists) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "token_exists",
            format!(
                "a token named {:?} exists; revoke it first or pick another name",
                request.name
            ),
        )),
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(e),
    };
    let detail = format!(
        "name={} role={} prefixes={:?}",
        request.name, request.role, request.prefixes
    );
    audit(&node, &caller, "token.create", detail, &result).await;
    result.map(Json)
}

pub async fn list(State(node): State<Shared>) -> Json<TokensResponse> {
    let applied = node.applied.read().expect("state lock");
    Json(TokensResponse {
        tokens: applied
            .state
            .shipped
            .tokens
            .iter()
            .map(|(name, t)| TokenInfo {
                name: name.clone(),
                role: t.role,
                prefixes: t.prefixes.clone(),
                created_ms: t.created_ms,
            })
            .collect(),
    })
}

pub async fn revoke(
    State(node): State<Shared>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_token_name(&name).map_err(|m| ApiError::bad_request("bad_name", m))?;
    let result = match node.propose(Op::TokenRevoke { name: name.clone() }).await {
        Ok(Outcome::TokenRevoked { found: true }) => Ok(serde_json::json!({"revoked": name})),
        Ok(Outcome::TokenRevoked { found: false }) => Err(ApiError::not_found(
            "token_not_found",
            format!("no token named {name:?}"),
        )),
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(e),
    };
    audit(&node, &caller, "token.revoke", format!("name={name}"), &result).await;
    result.map(Json)
}

/// Leader-only, on TLS nodes: gives a region that has never had one its first admin token,
/// written to `<data-dir>/admin.token` (owner-only) on the leader that made it. The file is
/// written before the token is proposed, so a crash in between can only leave a file whose
/// token never took effect (and the next attempt overwrites it), never a token nobody has.
pub async fn run_bootstrap(node: Shared) {
    // A standby region's shipped state comes from the primary region alone.
    if node.is_standby() {
        return;
    }
    if node.config.security() != Security::Tls {
        return;
    }
    let path: PathBuf = node.config.data_dir.join(BOOTSTRAP_FILE);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let (bootstrapped, admin_hash) = {
            let applied = node.applied.read().expect("state lock");
            let state = &applied.state;
            (
                state.shipped.auth_bootstrapped,
                state.shipped.tokens.get(BOOTSTRAP_NAME).map(|t| t.hash),
            )
        };
        if bootstrapped {
            // A file left by an attempt that never committed holds a dead token: remove it.
            if let Ok(text) = std::fs::read_to_string(&path) {
                let secret = text
                    .trim()
                    .split_once('.')
                    .map(|(_, s)| s.to_string())
                    .unwrap_or_default();
                if admin_hash != Some(hash_secret(&secret)) {
                    let _ = std::fs::remove_file(&path);
                }
            }
            return;
        }
        // Among regions, only once the primary holds the region lease: the token's write
        // would be refused before, and a file written for it would hold a dead token.
        if node.known_leader() != Some(node.id) || !node.holds_region_lease() {
            continue;
        }
        let secret = new_secret();
        let token = format!("{BOOTSTRAP_NAME}.{secret}\n");
        if let Err(e) = crate::certs::write_file(&path, token.as_bytes(), true) {
            tracing::error!("cannot write the bootstrap admin token: {e}");
            continue;
        }
        let op = Op::TokenCreate {
            name: BOOTSTRAP_NAME.to_string(),
            role: Role::Admin,
            prefixes: Vec::new(),
            hash: hash_secret(&secret),
            bootstrap: true,
        };
        match node.propose(op).await {
            Ok(Outcome::TokenCreated) => {
                debug_assert_eq!(
                    std::fs::metadata(&path).map(|m| m.permissions().mode() & 0o777).ok(),
                    Some(0o600)
                );
                tracing::info!(
                    path = %path.display(),
                    "bootstrap admin token written (owner-only); it is the only copy: keep it, \
                     or use it to create your own tokens and revoke it"
                );
                let source = format!("node {}", node.id);
                let detail = format!("name={BOOTSTRAP_NAME} role=admin file={}", path.display());
                record(&node, audit_event("token.bootstrap", "-", &source, "ok".into(), detail)).await;
                return;
            }
            Ok(_) => {
                // Another leader bootstrapped first, or an admin already existed.
                let _ = std::fs::remove_file(&path);
                return;
            }
            Err(e) => tracing::debug!("bootstrap token not committed yet: {}", e.message),
        }
    }
}
