//! API errors: a status, a stable code and a message a person can act on, rendered as
//! `{"error": {"code", "message"}}`; and the request checks every handler shares (a JSON
//! body, a name), which answer with those errors.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use rampart_core::api::{ErrorBody, ErrorDetail};
use rampart_store::Outcome;
use serde::de::DeserializeOwned;

/// Names in requests: elections, candidates, quotas and their clients.
pub const NAME_BYTES_MAX: usize = 256;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub current: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            current: None,
        }
    }

    pub fn with_current(mut self, current: serde_json::Value) -> ApiError {
        self.current = Some(current);
        self
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn no_leader() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_leader",
            "the region has no leader right now; retry shortly",
        )
    }

    /// This node lost leadership between routing and proposing; nothing was applied.
    pub fn not_leader() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_leader",
            "this node is no longer the leader; retry",
        )
    }

    pub fn timeout(what: &str, after: std::time::Duration) -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!(
                "{what} was not confirmed by a majority within {}ms; it may or may not take effect",
                after.as_millis()
            ),
        )
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
                current: self.current,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

/// Parses a JSON body, turning every failure into a 400/413 with a JSON error.
pub(crate) fn parse_body<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "request body is over --request-body-bytes-max",
            )
        } else {
            ApiError::bad_request("bad_body", rejection.body_text())
        }
    })?;
    let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("bad_json", format!("request body is not valid JSON for this call: {e}")))
}

pub(crate) fn unexpected(outcome: Outcome) -> ApiError {
    ApiError::internal(format!("unexpected outcome {outcome:?}"))
}

/// Names given in a request (elections, candidates, quotas, clients): 1 to
/// [`NAME_BYTES_MAX`] bytes.
pub(crate) fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    if name.is_empty() || name.len() > NAME_BYTES_MAX {
        return Err(ApiError::bad_request(
            "bad_name",
            format!("{what} must be 1 to {NAME_BYTES_MAX} bytes"),
        ));
    }
    Ok(())
}
