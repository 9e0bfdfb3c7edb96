//! HTTP error responses: a status and a JSON body
//! `{"error": {"code": "<stable name>", "message": "..."}}`; 429 answers also
//! carry `Retry-After`.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::model::InvalidField;
use crate::store::StoreError;
use crate::tenancy::TenancyError;
use herald_proto::ErrorCode;

/// An API error. Every handler returns these; never a bare status.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status of the answer.
    pub status: StatusCode,
    /// The stable error code, sent by name as `error.code`.
    pub code: ErrorCode,
    /// What went wrong, for people; sent as `error.message`.
    pub message: String,
    /// Seconds to wait, sent as `Retry-After`.
    pub retry_after: Option<u64>,
}

/// The JSON body of every error answer.
#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// A stable machine-readable `code` (see `docs/api.md`) and a message for people.
#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable error name, such as `not_found`,
    /// `invalid_argument` or `rate_limited`; branch on this, not on `message`.
    pub code: String,
    /// What went wrong, for people; the wording may change.
    pub message: String,
}

impl ApiError {
    /// An error answered with `status`, `code` and `message` (no `Retry-After`).
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// 400 `invalid_argument`: the request itself is wrong.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidArgument, message)
    }

    /// 401 `unauthenticated`: no usable key was presented.
    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthenticated,
            message,
        )
    }

    /// 403 `forbidden`: the key is known but lacks the right.
    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, ErrorCode::Forbidden, message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, ErrorCode::NotFound, message)
    }

    /// 503 `storage_unavailable` with `Retry-After: 1`: a database cannot
    /// take writes right now and is being reopened; nothing was stored.
    pub fn storage_unavailable(why: impl std::fmt::Display) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::StorageUnavailable,
                format!("nothing was stored: {why}"),
            )
        }
    }

    /// 429 with `Retry-After` (whole seconds, at least 1).
    pub fn rate_limited(wait: Duration) -> ApiError {
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        ApiError {
            retry_after: Some(secs.max(1)),
            ..ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                ErrorCode::RateLimited,
                format!(
                    "publish rate limit reached; retry in {} ms",
                    wait.as_millis()
                ),
            )
        }
    }
}

impl From<InvalidField> for ApiError {
    fn from(e: InvalidField) -> Self {
        ApiError::bad_request(e.0)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let (status, code) = match &e {
            StoreError::UnknownChannel(_) => (StatusCode::NOT_FOUND, ErrorCode::UnknownChannel),
            StoreError::ChannelExists(_) => (StatusCode::CONFLICT, ErrorCode::AlreadyExists),
            StoreError::PostNotFound { .. } => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            StoreError::Closed => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::ShuttingDown),
            StoreError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal),
            StoreError::Unavailable(why) => return ApiError::storage_unavailable(why),
            StoreError::Damaged(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::DataDamaged),
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "storage error answering a request");
        }
        ApiError::new(status, code, e.to_string())
    }
}

impl From<TenancyError> for ApiError {
    fn from(e: TenancyError) -> Self {
        let (status, code) = match &e {
            TenancyError::BrandExists(_) | TenancyError::ChannelClaimed(_) => {
                (StatusCode::CONFLICT, ErrorCode::AlreadyExists)
            }
            TenancyError::UnknownBrand(_) | TenancyError::UnknownKey(_) => {
                (StatusCode::NOT_FOUND, ErrorCode::NotFound)
            }
            // A channel made without a brand has no settings to change: a
            // conflict with the channel's state, not a malformed request.
            TenancyError::UnknownChannel(_) => (StatusCode::CONFLICT, ErrorCode::InvalidArgument),
            TenancyError::Storage(_) => (StatusCode::INTERNAL_SERVER_ERROR, ErrorCode::Internal),
            TenancyError::Unavailable(why) => return ApiError::storage_unavailable(why),
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "tenancy storage error answering a request");
        }
        ApiError::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.as_str().to_string(),
                message: self.message,
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}
