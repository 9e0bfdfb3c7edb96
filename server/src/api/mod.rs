//! The brand HTTP API (axum, JSON), plus `/healthz` (liveness), `/readyz`
//! (can it take writes and followers), `/v1/openapi.json` and
//! the Prometheus exposition at `/metrics` (see [`crate::metrics`]).
//!
//! Every error is a JSON body `{"error": {"code", "message"}}` with the right
//! status ([`error::ApiError`]). Writes are answered only once durable.
//! Every route takes a key ([`caller::Caller`]: the admin key or a brand API
//! key) and checks the caller's role in the channel or brand it touches.
//! The routes and the OpenAPI document come from the same annotated handlers
//! ([`openapi`]), so the document lists every route.

mod brands;
mod caller;
mod campaigns;
mod channels;
pub use campaigns::{CampaignView, ChannelPromoView};
mod error;
mod extract;
pub mod openapi;
mod posts;
mod serve;

pub use brands::{BrandList, CreatedKey, KeyList, KeyView};
pub use caller::Caller;
pub use channels::{ChannelList, ChannelStatsView, ChannelView};
pub use error::{ApiError, ErrorBody, ErrorDetail};
pub use posts::{History, PostView, Published, IDEMPOTENCY_KEY};
pub use serve::{serve, HttpLimits};

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::header;
use axum::routing::get;
use axum::Router;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::hub::Hub;
use crate::limits::PublishLimiter;
use crate::store::ChannelLog;
use crate::tenancy::TenancyStore;

/// Largest request body accepted, in bytes. Larger than any valid body
/// (a post's text is at most 16 KiB, but JSON may escape each of its
/// characters into six bytes), so an over-long field is answered 400 naming
/// it, and only a body that could never be valid gets 413.
pub const MAX_BODY_BYTES: usize = 256 * 1024;

/// What handlers share.
#[derive(Clone)]
pub struct ApiState {
    pub(crate) log: Arc<dyn ChannelLog>,
    pub(crate) hub: Arc<Hub>,
    pub(crate) promo: Arc<crate::promo::Promo>,
    pub(crate) admin_key: Arc<str>,
    pub(crate) tenancy: Arc<dyn TenancyStore>,
    pub(crate) publish_limiter: Arc<PublishLimiter>,
    /// Renders `/metrics`.
    pub(crate) metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Cancelled when the server starts shutting down (`/readyz` says so).
    pub(crate) stopping: tokio_util::sync::CancellationToken,
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

/// The routed API and its OpenAPI document, from the same annotated handlers.
pub fn routes() -> (Router<ApiState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .routes(routes!(brands::create_brand, brands::list_brands))
        .routes(routes!(brands::get_brand))
        .routes(routes!(brands::create_key, brands::list_keys))
        .routes(routes!(brands::revoke_key))
        .routes(routes!(channels::create, channels::list))
        .routes(routes!(channels::get, channels::update))
        .routes(routes!(channels::stats))
        .routes(routes!(posts::publish, posts::history))
        .routes(routes!(posts::edit, posts::delete))
        .routes(routes!(campaigns::create))
        .routes(routes!(campaigns::get, campaigns::update))
        .routes(routes!(campaigns::stats))
        .routes(routes!(campaigns::get_channel, campaigns::set_channel))
        .split_for_parts()
}

/// The OpenAPI document as served.
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    routes().1
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    let (routed, doc) = routes();
    let json: Arc<str> = match openapi::served_json(&doc) {
        Ok(j) => Arc::from(j),
        Err(e) => {
            tracing::error!(error = %e, "cannot serialize the OpenAPI document");
            Arc::from("{}")
        }
    };
    routed
        .route("/healthz", get(openapi::healthz))
        .route("/readyz", get(openapi::readyz))
        .route("/metrics", get(render_metrics))
        .route(
            "/v1/openapi.json",
            get(move || {
                let json = json.clone();
                async move {
                    (
                        [(header::CONTENT_TYPE, "application/json")],
                        json.to_string(),
                    )
                }
            }),
        )
        .fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                herald_proto::ErrorCode::NotFound,
                "no such route",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                herald_proto::ErrorCode::InvalidArgument,
                "this route does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}
