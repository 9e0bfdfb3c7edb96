//! Helpers for the brand-auth end-to-end tests: a real server on 127.0.0.1
//! port 0 in a temporary data directory, raw HTTP calls that keep the status
//! and headers, and brand/key set-up through the API.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald::auth::TokenIssuer;
use herald::client::{Client, ClientOptions, Event};
use herald::config::Config;
use herald::server::Server;
use herald::tls::ClientTrust;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// Upper bound on any single wait; a hang fails instead of blocking.
pub const WAIT: Duration = Duration::from_secs(30);

pub struct AuthServer {
    pub quic: SocketAddr,
    pub base: String,
    pub trust: ClientTrust,
    pub issuer: TokenIssuer,
    pub admin_key: String,
    pub data_dir: PathBuf,
    http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A reply: status, headers, JSON body (Null when empty or not JSON).
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    /// The stable error code of an error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("<no code>")
    }

    /// Asserts an error status with a JSON body carrying `code` and a message.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.body);
        assert_eq!(self.code(), code, "body: {}", self.body);
        assert!(
            self.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "error body without a message: {}",
            self.body
        );
    }
}

pub fn config(dir: &Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        quic_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    }
}

impl AuthServer {
    pub async fn start(cfg: Config) -> AuthServer {
        let data_dir = cfg.data_dir.clone();
        // A server stopped in this process releases its database files when
        // the last handle (an HTTP connection task, the committer thread)
        // is gone, which nothing signals: retry a locked database briefly.
        let deadline = tokio::time::Instant::now() + WAIT;
        let server = loop {
            match Server::bind(cfg.clone()).await {
                Ok(s) => break s,
                Err(e) if e.to_string().contains("already open") => {
                    assert!(tokio::time::Instant::now() < deadline, "{e}");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("server binds: {e}"),
            }
        };
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let quic = server.quic_addr();
        let base = format!("http://{}", server.http_addr());
        let trust = server.client_trust().expect("client trust");
        let issuer = server.token_issuer();
        let admin_key = server.secrets().admin_key.clone();
        let task = tokio::spawn(server.run(async move {
            let _ = stop_rx.await;
        }));
        AuthServer {
            quic,
            base,
            trust,
            issuer,
            admin_key,
            data_dir,
            http: reqwest::Client::new(),
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// Stops the server and waits until it has finished.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t)
                .await
                .expect("server stops")
                .unwrap();
        }
    }

    /// One HTTP call; `key` None sends no Authorization header.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = tokio::time::timeout(WAIT, req.send())
            .await
            .expect("answer in time")
            .expect("request sent");
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        Reply {
            status,
            headers,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
        }
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> Reply {
        self.call(Method::GET, path, key, None, &[]).await
    }

    pub async fn post(&self, path: &str, key: Option<&str>, body: Value) -> Reply {
        self.call(Method::POST, path, key, Some(body), &[]).await
    }

    pub fn admin(&self) -> Option<&str> {
        Some(&self.admin_key)
    }

    /// Creates a brand with the admin key.
    pub async fn brand(&self, id: &str) {
        let r = self
            .post("/v1/brands", self.admin(), json!({ "id": id, "name": id }))
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }

    /// Creates a channel of `brand` with the admin key.
    pub async fn channel(&self, id: &str, brand: &str) {
        let r = self
            .post(
                "/v1/channels",
                self.admin(),
                json!({ "id": id, "title": id, "brand": brand }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    }

    /// Creates a key of `brand` with one grant (admin key); returns (key, id).
    pub async fn key(&self, brand: &str, channel: &str, role: &str) -> (String, String) {
        let r = self
            .post(
                &format!("/v1/brands/{brand}/keys"),
                self.admin(),
                json!({ "grants": [{ "channel": channel, "role": role }] }),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        (
            r.body["key"].as_str().unwrap().to_string(),
            r.body["id"].as_str().unwrap().to_string(),
        )
    }

    /// Publishes `text` with `key`; returns the reply.
    pub async fn publish(&self, channel: &str, key: &str, text: &str, idem: Option<&str>) -> Reply {
        let headers: Vec<(&str, &str)> = idem.map(|k| ("Idempotency-Key", k)).into_iter().collect();
        self.call(
            Method::POST,
            &format!("/v1/channels/{channel}/posts"),
            Some(key),
            Some(json!({ "text": text })),
            &headers,
        )
        .await
    }

    pub fn options(&self, token: String) -> ClientOptions {
        let mut o = ClientOptions::new(self.quic, self.trust.clone(), token);
        o.backoff_min = Duration::from_millis(20);
        o.backoff_max = Duration::from_millis(200);
        o
    }

    pub fn token(&self, user: &str) -> String {
        self.issuer.mint(user, Duration::from_secs(3600)).unwrap()
    }

    pub async fn connect(&self, token: String) -> Client {
        tokio::time::timeout(WAIT, Client::connect(self.options(token)))
            .await
            .expect("connect in time")
            .expect("connects")
    }
}

impl Drop for AuthServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The next event, within [`WAIT`].
pub async fn next(client: &mut Client) -> Event {
    tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("event in time")
        .expect("client still open")
}
