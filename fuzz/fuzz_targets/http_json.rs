//! The HTTP API's JSON bodies through the real router and handlers (one
//! server on a temporary data directory, requests sent in memory with the
//! admin key): the first byte picks the route, the rest is the body. No
//! answer may be a 5xx, and nothing may panic.

#![no_main]

use std::sync::OnceLock;

use axum::body::Body;
use axum::http::{Method, Request};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

struct Fixture {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    admin: String,
    _dir: tempfile::TempDir,
    _server: herald_server::Server,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = tempfile::tempdir().expect("temp dir");
        let config = herald_server::config::Config {
            data_dir: dir.path().to_path_buf(),
            quic_addr: "127.0.0.1:0".parse().expect("addr"),
            http_addr: "127.0.0.1:0".parse().expect("addr"),
            ..Default::default()
        };
        let server = rt
            .block_on(herald_server::Server::bind(config))
            .expect("server binds");
        let router = server.api_router();
        let admin = server.secrets().admin_key.clone();
        // Something for the routes to find: a brand and two channels.
        for (method, path, body) in [
            ("POST", "/v1/brands", r#"{"id":"acme"}"#),
            ("POST", "/v1/channels", r#"{"id":"news","brand":"acme"}"#),
            ("POST", "/v1/channels", r#"{"id":"plain"}"#),
            ("POST", "/v1/channels/news/posts", r#"{"text":"one"}"#),
        ] {
            let req = request(method, path, body.as_bytes(), &admin);
            let _ = rt.block_on(router.clone().oneshot(req));
        }
        Fixture {
            rt,
            router,
            admin,
            _dir: dir,
            _server: server,
        }
    })
}

fn request(method: &str, path: &str, body: &[u8], key: &str) -> Request<Body> {
    Request::builder()
        .method(Method::from_bytes(method.as_bytes()).expect("method"))
        .uri(path)
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {key}"))
        .body(Body::from(body.to_vec()))
        .expect("request")
}

const ROUTES: &[(&str, &str)] = &[
    ("POST", "/v1/brands"),
    ("POST", "/v1/brands/acme/keys"),
    ("POST", "/v1/channels"),
    ("PATCH", "/v1/channels/news"),
    ("PATCH", "/v1/channels/plain"),
    ("POST", "/v1/channels/news/posts"),
    ("PATCH", "/v1/channels/news/posts/1"),
    ("PUT", "/v1/channels/news/promo"),
    ("POST", "/v1/campaigns"),
    ("PATCH", "/v1/campaigns/cmp_0000000000000000"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let (method, path) = ROUTES[which as usize % ROUTES.len()];
    let resp =
        f.rt.block_on(
            f.router
                .clone()
                .oneshot(request(method, path, body, &f.admin)),
        )
        .expect("infallible");
    assert!(
        !resp.status().is_server_error(),
        "{method} {path} answered {} to {:?}",
        resp.status(),
        String::from_utf8_lossy(body)
    );
});
