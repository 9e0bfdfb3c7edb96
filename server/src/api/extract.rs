//! Request extractors whose rejections are [`ApiError`]s (JSON bodies with a
//! stable code) instead of axum's plain-text defaults. The caller's identity
//! is extracted by [`super::caller::Caller`].

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use herald_proto::ErrorCode;

/// A JSON body. Every rejection is a JSON error with code `invalid_argument`:
/// 400 for a body that is not JSON or has the wrong shape or types (axum
/// would say 422 for the latter; the API says 400 for every malformed body,
/// as docs/api.md and the OpenAPI document state), 413 for a body over
/// [`super::MAX_BODY_BYTES`], 415 without `Content-Type: application/json`.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(JsonBody(v)),
            Err(rej) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::new(
                rej.status(),
                ErrorCode::InvalidArgument,
                format!(
                    "the request body is larger than the limit of {} KiB (a post's text is at most {} KiB)",
                    super::MAX_BODY_BYTES / 1024,
                    crate::model::MAX_POST_TEXT_BYTES / 1024
                ),
            )),
            Err(rej) => {
                let status = match rej.status() {
                    StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
                    other => other,
                };
                Err(ApiError::new(
                    status,
                    ErrorCode::InvalidArgument,
                    rej.body_text(),
                ))
            }
        }
    }
}

/// Path parameters; a parameter that does not parse answers 400 with a JSON error.
pub struct PathParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for PathParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| PathParams(p.0))
            .map_err(|rej| ApiError::bad_request(rej.body_text()))
    }
}

/// Query parameters; bad ones answer 400 with a JSON error.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| QueryParams(q.0))
            .map_err(|rej| ApiError::bad_request(rej.body_text()))
    }
}
