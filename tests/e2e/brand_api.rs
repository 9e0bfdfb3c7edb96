//! End to end through a real server: brands, keys and roles on the HTTP API
//! (401 / 403 paths with stable JSON codes), idempotent publish (also across
//! a restart), the per-key publish rate (429 + Retry-After), stats, and the
//! OpenAPI document.

use crate::harness::{config, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn keys_roles_and_every_refusal_has_a_stable_code() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(config(dir.path())).await;
    s.brand("acme").await;
    s.brand("globex").await;
    s.channel("acme-news", "acme").await;
    s.channel("acme-deals", "acme").await;
    s.channel("globex-news", "globex").await;
    let (publisher, publisher_id) = s.key("acme", "acme-news", "publisher").await;
    let (analyst, _) = s.key("acme", "acme-news", "analyst").await;
    let (owner, _) = s.key("acme", "*", "owner").await;
    let (globex, _) = s.key("globex", "*", "owner").await;
    assert!(publisher.starts_with("hk_"));

    // Missing key, malformed header, unknown key: 401 unauthenticated.
    s.publish("acme-news", "", "x", None)
        .await
        .assert_error(401, "unauthenticated");
    s.post("/v1/channels/acme-news/posts", None, json!({"text": "x"}))
        .await
        .assert_error(401, "unauthenticated");
    s.get("/v1/channels", Some("hk_0000000000000000_nope"))
        .await
        .assert_error(401, "unauthenticated");

    // The publisher posts in its channel, not in another one of its brand,
    // nor in another brand's.
    let r = s.publish("acme-news", &publisher, "hello", None).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["seq"], 1);
    s.publish("acme-deals", &publisher, "x", None)
        .await
        .assert_error(403, "forbidden");
    s.publish("globex-news", &publisher, "x", None)
        .await
        .assert_error(403, "forbidden");
    s.publish("globex-news", &owner, "x", None)
        .await
        .assert_error(403, "forbidden");
    // Wrong role: an analyst reads stats but may not post, edit or delete.
    s.publish("acme-news", &analyst, "x", None)
        .await
        .assert_error(403, "forbidden");
    s.call(
        Method::DELETE,
        "/v1/channels/acme-news/posts/1",
        Some(&analyst),
        None,
        &[],
    )
    .await
    .assert_error(403, "forbidden");
    let r = s.get("/v1/channels/acme-news/stats", Some(&analyst)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["posts"], 1);
    s.get("/v1/channels/globex-news/stats", Some(&analyst))
        .await
        .assert_error(403, "forbidden");
    // Settings need the owner role.
    s.call(
        Method::PATCH,
        "/v1/channels/acme-news",
        Some(&publisher),
        Some(json!({"description": "d"})),
        &[],
    )
    .await
    .assert_error(403, "forbidden");
    let r = s
        .call(
            Method::PATCH,
            "/v1/channels/acme-news",
            Some(&owner),
            Some(json!({"description": "Daily news", "promoted_opt_in": true})),
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["description"], "Daily news");
    assert_eq!(r.body["promoted_opt_in"], true);
    assert_eq!(r.body["brand"], "acme");

    // Admin-only actions refused to a brand key, even an owner's.
    s.post("/v1/brands", Some(&owner), json!({"id": "mine"}))
        .await
        .assert_error(403, "forbidden");
    s.get("/v1/brands", Some(&owner))
        .await
        .assert_error(403, "forbidden");
    s.call(
        Method::PATCH,
        "/v1/channels/acme-news",
        Some(&owner),
        Some(json!({"verified": true})),
        &[],
    )
    .await
    .assert_error(403, "forbidden");
    let r = s
        .call(
            Method::PATCH,
            "/v1/channels/acme-news",
            s.admin(),
            Some(json!({"verified": true})),
            &[],
        )
        .await;
    assert_eq!(r.body["verified"], true, "{}", r.body);

    // An owner creates channels for its own brand only, and keys for them.
    let r = s
        .post(
            "/v1/channels",
            Some(&owner),
            json!({"id": "acme-tv", "title": "TV"}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["brand"], "acme");
    s.post(
        "/v1/channels",
        Some(&owner),
        json!({"id": "x1", "brand": "globex"}),
    )
    .await
    .assert_error(403, "forbidden");
    s.post("/v1/channels", Some(&publisher), json!({"id": "x2"}))
        .await
        .assert_error(403, "forbidden");
    let r = s
        .post(
            "/v1/brands/acme/keys",
            Some(&owner),
            json!({"grants": [{"channel": "acme-tv", "role": "publisher"}]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    s.post(
        "/v1/brands/acme/keys",
        Some(&publisher),
        json!({"grants": [{"channel": "acme-news", "role": "owner"}]}),
    )
    .await
    .assert_error(403, "forbidden");
    s.post(
        "/v1/brands/globex/keys",
        Some(&owner),
        json!({"grants": [{"channel": "*", "role": "owner"}]}),
    )
    .await
    .assert_error(403, "forbidden");
    s.post(
        "/v1/brands/acme/keys",
        Some(&owner),
        json!({"grants": [{"channel": "globex-news", "role": "analyst"}]}),
    )
    .await
    .assert_error(403, "forbidden");
    // A brand key lists only what it may see.
    let r = s.get("/v1/channels", Some(&globex)).await;
    let ids: Vec<&str> = r.body["channels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["globex-news"]);

    // Revoked: 401 key_revoked, by the owner; another brand may not revoke it.
    s.call(
        Method::DELETE,
        &format!("/v1/brands/acme/keys/{publisher_id}"),
        Some(&globex),
        None,
        &[],
    )
    .await
    .assert_error(403, "forbidden");
    let r = s
        .call(
            Method::DELETE,
            &format!("/v1/brands/acme/keys/{publisher_id}"),
            Some(&owner),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body["revoked_at_ms"].is_i64());
    s.publish("acme-news", &publisher, "x", None)
        .await
        .assert_error(401, "key_revoked");
    let r = s.get("/v1/brands/acme/keys", Some(&owner)).await;
    assert!(r.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k.get("key").is_none() && k.get("hash").is_none()));

    // Unknown routes and bad bodies are JSON errors too.
    s.get("/v1/nothing", s.admin())
        .await
        .assert_error(404, "not_found");
    s.call(Method::PUT, "/v1/channels", s.admin(), None, &[])
        .await
        .assert_error(405, "invalid_argument");
    s.post("/v1/brands", s.admin(), json!({"id": "bad id"}))
        .await
        .assert_error(400, "invalid_argument");
    s.post("/v1/brands", s.admin(), json!({"id": "acme"}))
        .await
        .assert_error(409, "already_exists");
    s.stop().await;
}

#[tokio::test]
async fn idempotent_publish_returns_the_first_answer_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(config(dir.path())).await;
    s.brand("acme").await;
    s.channel("news", "acme").await;
    let (key, _) = s.key("acme", "news", "publisher").await;
    let first = s.publish("news", &key, "one", Some("req-1")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let again = s.publish("news", &key, "one (retry)", Some("req-1")).await;
    assert_eq!(again.status, first.status);
    assert_eq!(again.body, first.body);
    let other = s.publish("news", &key, "two", Some("req-2")).await;
    assert_eq!(other.body["seq"], 2);
    s.publish("news", &key, "x", Some("bad key with spaces"))
        .await
        .assert_error(400, "invalid_argument");
    s.stop().await;

    let s = TestServer::start_with(config(dir.path())).await;
    let after = s
        .publish("news", &key, "one (after restart)", Some("req-1"))
        .await;
    assert_eq!(after.status, StatusCode::CREATED);
    assert_eq!(after.body, first.body);
    let r = s.get("/v1/channels/news/posts", Some(&key)).await;
    let texts: Vec<&str> = r.body["posts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["one", "two"]);
    s.stop().await;
}

#[tokio::test]
async fn publish_rate_limit_answers_429_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.publish_per_sec = 0.5;
    cfg.limits.publish_burst = 2;
    let s = TestServer::start_with(cfg).await;
    s.brand("acme").await;
    s.channel("news", "acme").await;
    let (key, _) = s.key("acme", "news", "publisher").await;
    let (other, _) = s.key("acme", "news", "publisher").await;
    for i in 0..2 {
        let r = s.publish("news", &key, &format!("p{i}"), None).await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }
    let r = s.publish("news", &key, "too many", None).await;
    r.assert_error(429, "rate_limited");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    // Per key: another key still posts; the admin is not limited.
    assert_eq!(
        s.publish("news", &other, "other", None).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        s.publish("news", &s.admin_key, "admin", None).await.status,
        StatusCode::CREATED
    );
    s.stop().await;
}

#[tokio::test]
async fn openapi_document_is_openapi_3_and_lists_every_route() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(config(dir.path())).await;
    let r = s.get("/v1/openapi.json", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body["openapi"].as_str().unwrap().starts_with("3."));
    assert!(r.body["info"]["title"].is_string());
    // It deserializes as an OpenAPI document.
    let doc: utoipa::openapi::OpenApi = serde_json::from_value(r.body.clone()).unwrap();
    let routes = herald_server::api::openapi::ROUTES;
    assert_eq!(doc.paths.paths.len(), routes.len());
    for (path, methods) in routes {
        for m in *methods {
            assert!(r.body["paths"][path][m].is_object(), "{m} {path} missing");
        }
        // Each listed route answers (not the 404 fallback).
        let url = path
            .replace("{brand}", "acme")
            .replace("{id}", "c")
            .replace("{key_id}", "k")
            .replace("{seq}", "1");
        let method = Method::from_bytes(methods[0].to_uppercase().as_bytes()).unwrap();
        let reply = s.call(method, &url, None, None, &[]).await;
        assert_ne!(reply.code(), "not_found", "{path} is not routed");
    }
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dot_ids_are_refused_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start(dir.path()).await;
    s.brand("acme").await;
    for id in [".", ".."] {
        s.post(
            "/v1/channels",
            s.admin(),
            json!({"id": id, "brand": "acme"}),
        )
        .await
        .assert_error(400, "invalid_argument");
        s.post("/v1/brands", s.admin(), json!({"id": id}))
            .await
            .assert_error(400, "invalid_argument");
    }
    // Ids that only start with dots are ids like any other.
    s.channel("..x", "acme").await;
    s.stop().await;
}
