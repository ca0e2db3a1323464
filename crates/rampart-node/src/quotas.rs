//! Cluster-scope quotas (`POST /v1/quotas/{name}/take`): every proxy of a region draws on
//! one standing per client, kept in the replicated state and taken at the leader's clock,
//! so two proxies together admit exactly what one would.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use rampart_core::api::{QuotaTakeRequest, QuotaTakeResponse};
use rampart_core::proxy::TierSpec;
use rampart_store::{Op, Outcome};

use crate::error::{check_name, parse_body, unexpected, ApiError};
use crate::node::Shared;

pub async fn take(
    State(node): State<Shared>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: QuotaTakeRequest = parse_body(body)?;
    check_name("quota name", &name)?;
    check_name("client", &request.client)?;
    let tier = TierSpec::of_request(&request)
        .validate("")
        .map_err(|e| ApiError::bad_request("bad_limits", e.to_string()))?;
    let op = Op::QuotaTake {
        name,
        client: request.client,
        tier,
    };
    match node.propose(op).await? {
        Outcome::QuotaTaken { used_today } => Ok(Json(QuotaTakeResponse { used_today }).into_response()),
        Outcome::OverQuota { limit, retry_after_ms } => {
            let error = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "quota_exceeded",
                format!("over the {limit} limit; allowed again in {retry_after_ms}ms"),
            )
            .with_current(serde_json::json!({ "limit": limit, "retry_after_ms": retry_after_ms }));
            let mut response = error.into_response();
            let seconds = retry_after_ms.div_ceil(1000).max(1);
            if let Ok(value) = HeaderValue::from_str(&seconds.to_string()) {
                response.headers_mut().insert(axum::http::header::RETRY_AFTER, value);
            }
            Ok(response)
        }
        Outcome::QuotaClientsFull => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "quota_clients_full",
            format!(
                "the region keeps {} quota standings and none can be forgotten yet; new clients are refused",
                rampart_store::state::QUOTA_CLIENTS_MAX
            ),
        )
        .with_current(serde_json::json!({ "limit": "clients", "retry_after_ms": 1000 }))),
        other => Err(unexpected(other)),
    }
}
