//! The OpenAPI 3 document of the HTTP API, generated from the handlers'
//! annotations (utoipa) as the router is built, and served at
//! `/v1/openapi.json`.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// Top-level metadata and the routes that are not in the routed set.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Herald brand API",
        description = "Brands post to broadcast channels; see docs/api.md. Every error body is `{\"error\": {\"code\", \"message\"}}` with a stable code.",
    ),
    paths(healthz, openapi_json, metrics),
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

/// Liveness.
#[utoipa::path(get, path = "/healthz", tag = "meta",
    responses((status = 200, body = String, description = "ok")))]
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// This document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "the OpenAPI 3 document", content_type = "application/json")))]
pub async fn openapi_json() {}

/// Prometheus text exposition of the server's metrics (see `herald_server::metrics`).
#[utoipa::path(get, path = "/metrics", tag = "meta",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics() {}

/// Every route the API serves, as (path, methods). The unit test below and
/// the end-to-end test check the served document against it, so adding a
/// route without annotating it (or the reverse) fails.
pub const ROUTES: &[(&str, &[&str])] = &[
    ("/healthz", &["get"]),
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
