//! The brand HTTP API (axum, JSON), plus `/healthz`.
//!
//! Every error is a JSON body `{"error": {"code", "message"}}` with the right
//! status ([`error::ApiError`]). Writes are answered only once durable.

mod campaigns;
mod channels;
pub use campaigns::{CampaignView, ChannelPromoView};
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
    pub promo: Arc<crate::promo::Promo>,
    pub admin_key: Arc<str>,
}

/// The API's routes.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
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
        .route("/v1/campaigns", post(campaigns::create))
        .route(
            "/v1/campaigns/{id}",
            get(campaigns::get).patch(campaigns::update),
        )
        .route("/v1/campaigns/{id}/stats", get(campaigns::stats))
        .route(
            "/v1/channels/{id}/promo",
            get(campaigns::get_channel).put(campaigns::set_channel),
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
