//! The brand HTTP API (axum, JSON), plus `/healthz` and the Prometheus
//! exposition at `/metrics` (see [`crate::metrics`]).
//!
//! Every error is a JSON body `{"error": {"code", "message"}}` with the right
//! status ([`error::ApiError`]). Writes are answered only once durable.

mod channels;
pub use channels::ChannelView;
pub use posts::{History, PostView, Published};
mod error;
mod extract;
mod posts;

pub use error::ApiError;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::{get, patch, post};
use axum::Router;

use crate::hub::Hub;
use crate::store::ChannelLog;

/// Largest request body accepted, in bytes (a post's text is at most 16 KiB).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// What handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub log: Arc<dyn ChannelLog>,
    pub hub: Arc<Hub>,
    pub admin_key: Arc<str>,
    /// Renders `/metrics`.
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
}

async fn render_metrics(
    axum::extract::State(state): axum::extract::State<ApiState>,
) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&state.metrics),
    )
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(render_metrics))
        .route("/v1/channels", post(channels::create).get(channels::list))
        .route("/v1/channels/{id}", get(channels::get))
        .route(
            "/v1/channels/{id}/posts",
            post(posts::publish).get(posts::history),
        )
        .route(
            "/v1/channels/{id}/posts/{seq}",
            patch(posts::edit).delete(posts::delete),
        )
        .fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                crate::error::ErrorCode::NotFound,
                "no such route",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}
