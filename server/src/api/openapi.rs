//! The OpenAPI 3 document of the HTTP API, generated from the handlers'
//! annotations (utoipa) as the router is built, and served at
//! `/v1/openapi.json`.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::error::{ApiError, ErrorBody};
use super::ApiState;
use crate::datadir::Health;
use herald_proto::ErrorCode;

/// Top-level metadata and the routes that are not in the routed set.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Herald brand API",
        description = "Brands post to broadcast channels; see docs/api.md. Every error body is `{\"error\": {\"code\", \"message\"}}` with a stable code.",
    ),
    paths(healthz, readyz, openapi_json, metrics),
    modifiers(&ApiKeyAuth),
    tags(
        (name = "brands", description = "Brands (admin)"),
        (name = "keys", description = "A brand's API keys"),
        (name = "channels", description = "Channels, settings and stats"),
        (name = "posts", description = "Publish, edit, delete, history"),
        (name = "campaigns", description = "Promoted posts: campaigns and channel slots"),
    )
)]
pub struct ApiDoc;

/// Declares the `api_key` bearer scheme the routes refer to.
struct ApiKeyAuth;

impl Modify for ApiKeyAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The admin key, or a brand API key (`hk_<id>_<secret>`)",
                    ))
                    .build(),
            ),
        );
    }
}

/// Liveness: the process serves requests. `ok`, or `degraded: ...` (still
/// 200: it recovers by itself, a restart would not help) when a database
/// cannot take writes.
#[utoipa::path(get, path = "/healthz", tag = "meta",
    responses((status = 200, body = String, content_type = "text/plain", description = "`ok`, or `degraded: <why>` while a database cannot take writes (it recovers by itself)")))]
pub async fn healthz(State(state): State<ApiState>) -> String {
    match unavailable(&state) {
        None => "ok\n".to_string(),
        Some(why) => format!("degraded: {why}\n"),
    }
}

/// What `/readyz` answers when ready.
#[derive(Serialize, Deserialize, Debug, utoipa::ToSchema)]
pub struct Ready {
    /// Always true in a 200 answer.
    pub ready: bool,
    /// Each database file and its state (`ok`).
    pub databases: BTreeMap<String, String>,
}

/// The first reason the server cannot take writes, if any.
fn unavailable(state: &ApiState) -> Option<String> {
    [
        state.log.health(),
        state.tenancy.health(),
        state.promo.health(),
    ]
    .into_iter()
    .find(|h| *h != Health::Ok)
    .map(|h| h.to_string())
}

/// Readiness: can the server take writes (posts, brands, campaigns) and
/// followers now? 503 `storage_unavailable` while a database cannot take
/// writes (it recovers by itself), 503 `shutting_down` once stopping.
#[utoipa::path(get, path = "/readyz", tag = "meta",
    responses(
        (status = 200, body = Ready, description = "ready for writes and followers"),
        (status = 503, body = ErrorBody, description = "`storage_unavailable` (a database cannot take writes; it recovers by itself) or `shutting_down`"),
    ))]
pub async fn readyz(State(state): State<ApiState>) -> Result<Json<Ready>, ApiError> {
    if state.stopping.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "the server is shutting down",
        ));
    }
    if let Some(why) = unavailable(&state) {
        return Err(ApiError {
            retry_after: Some(1),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::StorageUnavailable,
                why,
            )
        });
    }
    let databases = [
        crate::store::LOG_FILE,
        crate::tenancy::TENANCY_FILE,
        crate::promo::PROMO_FILE,
    ]
    .into_iter()
    .map(|f| (f.to_string(), "ok".to_string()))
    .collect();
    Ok(Json(Ready {
        ready: true,
        databases,
    }))
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "the OpenAPI 3 document", content_type = "application/json")))]
pub async fn openapi_json() {}

/// Prometheus text exposition of the server's metrics (see `herald_server::metrics`).
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics() {}

/// The document as served: utoipa's, plus what its attributes cannot say.
/// `CreateChannel` takes settings (`description`, `avatar_url`, `verified`,
/// `promoted_opt_in`) only with a `brand`: stated as an `anyOf`.
pub fn served_json(doc: &utoipa::openapi::OpenApi) -> Result<String, serde_json::Error> {
    let mut v = serde_json::to_value(doc)?;
    if let Some(create) = v.pointer_mut("/components/schemas/CreateChannel") {
        if let Some(obj) = create.as_object_mut() {
            obj.insert(
                "anyOf".into(),
                serde_json::json!([
                    {"required": ["brand"]},
                    {"properties": {
                        "description": {"const": ""},
                        "avatar_url": {"const": ""},
                        "verified": {"const": false},
                        "promoted_opt_in": {"const": false}
                    }}
                ]),
            );
        }
    }
    serde_json::to_string(&v)
}

/// Every route the API serves, as (path, methods). The unit test below and
/// the end-to-end test check the served document against it, so adding a
/// route without annotating it (or the reverse) fails.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/healthz", &["get"]),
    ("/readyz", &["get"]),
    ("/metrics", &["get"]),
    ("/v1/openapi.json", &["get"]),
    ("/v1/brands", &["get", "post"]),
    ("/v1/brands/{brand}", &["get"]),
    ("/v1/brands/{brand}/keys", &["get", "post"]),
    ("/v1/brands/{brand}/keys/{key_id}", &["delete"]),
    ("/v1/channels", &["get", "post"]),
    ("/v1/channels/{id}", &["get", "patch"]),
    ("/v1/channels/{id}/stats", &["get"]),
    ("/v1/channels/{id}/posts", &["get", "post"]),
    ("/v1/channels/{id}/posts/{seq}", &["delete", "patch"]),
    ("/v1/channels/{id}/promo", &["get", "put"]),
    ("/v1/campaigns", &["post"]),
    ("/v1/campaigns/{id}", &["get", "patch"]),
    ("/v1/campaigns/{id}/stats", &["get"]),
];

#[cfg(test)]
mod tests {
    use super::ROUTES;

    #[test]
    fn document_lists_exactly_the_routes() {
        let doc = crate::api::openapi_document();
        let v: serde_json::Value = serde_json::from_str(&doc.to_json().unwrap()).unwrap();
        assert!(v["openapi"].as_str().unwrap().starts_with("3."));
        let paths = v["paths"].as_object().unwrap();
        let mut got: Vec<(String, Vec<String>)> = paths
            .iter()
            .map(|(p, item)| {
                let mut m: Vec<String> = item.as_object().unwrap().keys().cloned().collect();
                m.sort();
                (p.clone(), m)
            })
            .collect();
        got.sort();
        let mut want: Vec<(String, Vec<String>)> = ROUTES
            .iter()
            .map(|(p, m)| (p.to_string(), m.iter().map(|s| s.to_string()).collect()))
            .collect();
        want.sort();
        assert_eq!(got, want);
        assert!(v["components"]["securitySchemes"]["api_key"].is_object());
    }
}
