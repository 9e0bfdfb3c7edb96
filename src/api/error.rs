//! HTTP error responses: a status and a JSON body
//! `{"error": {"code": "<stable name>", "message": "..."}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::error::ErrorCode;
use crate::model::InvalidField;
use crate::store::StoreError;

/// An API error. Every handler returns these; never a bare status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidArgument, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthenticated,
            message,
        )
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
        };
        if status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(error = %e, "storage error answering a request");
        }
        ApiError::new(status, code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": { "code": self.code.as_str(), "message": self.message }
        });
        (self.status, Json(body)).into_response()
    }
}
