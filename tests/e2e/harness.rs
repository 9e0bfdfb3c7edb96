//! The one harness of the end-to-end tests: a real server on 127.0.0.1
//! port 0 in a temporary data directory, followers connected over real QUIC
//! through the public client library, and the brand API called over real
//! HTTP (through the CLI's API client, or raw, keeping status and headers).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use herald::cli::ApiClient;
use herald_client::{Client, ClientOptions, ClientTrust, Event};
use herald_server::auth::TokenIssuer;
use herald_server::config::Config;
use herald_server::Server;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

/// Upper bound on any single wait in a test; a hang fails instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(30);

/// A running server and what a test needs to talk to it.
pub struct TestServer {
    pub quic: SocketAddr,
    pub http: SocketAddr,
    /// Base URL of the HTTP API, like `http://127.0.0.1:1234`.
    pub base: String,
    /// The brand API client, with the admin key.
    pub api: ApiClient,
    pub trust: ClientTrust,
    pub issuer: TokenIssuer,
    pub admin_key: String,
    pub data_dir: PathBuf,
    pub hub: std::sync::Arc<herald_server::hub::Hub>,
    http_client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A configuration on `dir` with both listeners on free loopback ports.
pub fn config(dir: &Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        quic_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    }
}

impl TestServer {
    pub async fn start(dir: &Path) -> TestServer {
        Self::start_with(config(dir)).await
    }

    pub async fn start_with(cfg: Config) -> TestServer {
        let data_dir = cfg.data_dir.clone();
        let server = Server::bind(cfg).await.expect("server binds");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let quic = server.quic_addr();
        let http = server.http_addr();
        let trust = ClientTrust::pinned_file(&server.certificate_file()).expect("certificate");
        let issuer = server.token_issuer();
        let admin_key = server.secrets().admin_key.clone();
        let hub = server.hub();
        let task = tokio::spawn(server.run(async move {
            let _ = stop_rx.await;
        }));
        let base = format!("http://{http}");
        TestServer {
            quic,
            http,
            api: ApiClient::new(&base, admin_key.clone()),
            base,
            trust,
            issuer,
            admin_key,
            data_dir,
            hub,
            http_client: reqwest::Client::new(),
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    /// A follower token for `user`, valid for an hour.
    pub fn token(&self, user: &str) -> String {
        self.issuer.mint(user, Duration::from_secs(3600)).unwrap()
    }

    /// Client options with `token` (reconnecting quickly, for tests).
    pub fn options_for_token(&self, token: String) -> ClientOptions {
        let mut o = ClientOptions::new(self.quic, self.trust.clone(), token);
        o.backoff_min = Duration::from_millis(20);
        o.backoff_max = Duration::from_millis(200);
        o
    }

    /// Client options for follower `user`.
    pub fn options(&self, user: &str) -> ClientOptions {
        self.options_for_token(self.token(user))
    }

    /// Publishes `count` posts to `channel` from 8 concurrent publishers,
    /// post `i` with the text `"{i} {body}"`, and waits for all of them.
    pub async fn publish_numbered(&self, channel: &str, count: usize, body: &str) {
        let mut tasks = Vec::new();
        for w in 0..8 {
            let (api, channel, body) = (self.api.clone(), channel.to_string(), body.to_string());
            tasks.push(tokio::spawn(async move {
                for i in (w..count).step_by(8) {
                    api.publish(&channel, &format!("{i} {body}")).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    }

    /// A connected client for follower `user`.
    pub async fn client(&self, user: &str) -> Client {
        self.connect(self.token(user)).await
    }

    /// A connected client with `token`.
    pub async fn connect(&self, token: String) -> Client {
        tokio::time::timeout(WAIT, Client::connect(self.options_for_token(token)))
            .await
            .expect("connect in time")
            .expect("client connects")
    }

    /// Stops the server and waits until `run` has returned.
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
        let mut req = self
            .http_client
            .request(method, format!("{}{path}", self.base));
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

    /// A GET without a key; (status, body text).
    pub async fn http_text(&self, path: &str) -> (u16, String) {
        let resp = tokio::time::timeout(
            WAIT,
            self.http_client.get(format!("{}{path}", self.base)).send(),
        )
        .await
        .expect("answer in time")
        .expect("request sent");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
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
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
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

/// The next event, within [`WAIT`].
pub async fn next(client: &mut Client) -> Event {
    tokio::time::timeout(WAIT, client.next_event())
        .await
        .expect("event in time")
        .expect("client still open")
}

/// Receives posts until `want` (channel -> count) posts arrived per channel,
/// returning (channel -> [(seq, text)]) in arrival order. Panics on timeout.
pub async fn collect_posts(
    client: &mut Client,
    want: &BTreeMap<String, usize>,
) -> BTreeMap<String, Vec<(u64, String)>> {
    let mut got: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    let done = |got: &BTreeMap<String, Vec<(u64, String)>>| {
        want.iter()
            .all(|(ch, n)| got.get(ch).map_or(0, |v| v.len()) >= *n)
    };
    while !done(&got) {
        let ev = tokio::time::timeout(WAIT, client.next_event())
            .await
            .unwrap_or_else(|_| panic!("timed out; got {:?} of {want:?}", counts(&got)))
            .expect("client closed early");
        if let Event::Post(p) = ev {
            got.entry(p.channel.to_string())
                .or_default()
                .push((p.seq, p.text));
        }
    }
    got
}

fn counts(got: &BTreeMap<String, Vec<(u64, String)>>) -> BTreeMap<String, usize> {
    got.iter().map(|(k, v)| (k.clone(), v.len())).collect()
}

/// Asserts that `seqs` is exactly `first..=last`, in order.
pub fn assert_gapless(seqs: &[u64], first: u64, last: u64) {
    let want: Vec<u64> = (first..=last).collect();
    assert_eq!(
        seqs,
        want.as_slice(),
        "posts must be exactly {first}..={last} in order"
    );
}

/// The real `herald` binary, spawned (`herald serve` on a data directory).
pub struct Spawned {
    pub child: Child,
    pub quic: std::net::SocketAddr,
    pub http: std::net::SocketAddr,
}

/// Starts `herald serve` and waits for its "listening" line.
pub async fn spawn_server(dir: &Path, quic: &str, http: &str) -> Spawned {
    spawn_server_with(dir, &["--quic-addr", quic, "--http-addr", http]).await
}

/// [`spawn_server`] with any `herald serve` arguments after `--data-dir`.
pub async fn spawn_server_with(dir: &Path, args: &[&str]) -> Spawned {
    let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn herald");
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(WAIT, async {
        while let Some(l) = lines.next_line().await.unwrap() {
            if l.starts_with("herald listening:") {
                return l;
            }
        }
        panic!("herald exited before listening");
    })
    .await
    .expect("herald starts");
    // Keep draining stdout so the child never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    // "herald listening: quic A http B"
    let parts: Vec<&str> = line.split_whitespace().collect();
    Spawned {
        child,
        quic: parts[3].parse().unwrap(),
        http: parts[5].parse().unwrap(),
    }
}

/// Runs the real `herald` binary with `args` to its end (within [`WAIT`]);
/// (exit code, stdout, stderr).
pub async fn run_herald(args: &[&std::ffi::OsStr]) -> (Option<i32>, String, String) {
    let out = tokio::time::timeout(
        WAIT,
        Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(args)
            .env("RUST_LOG", "warn")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("herald ends in time")
    .expect("herald runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
