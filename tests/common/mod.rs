//! Shared helpers for end-to-end tests: a real server on 127.0.0.1 port 0 in
//! a temporary data directory, and clients connected through the public
//! client library.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald::auth::TokenIssuer;
use herald::cli::ApiClient;
use herald::client::{Client, ClientOptions, Event};
use herald::config::Config;
use herald::server::Server;
use herald::tls::ClientTrust;
use tokio::sync::oneshot;

/// Upper bound on any single wait in a test; a hang fails instead of blocking CI.
pub const WAIT: Duration = Duration::from_secs(30);

pub struct TestServer {
    pub quic: SocketAddr,
    pub http: SocketAddr,
    pub api: ApiClient,
    pub trust: ClientTrust,
    pub issuer: TokenIssuer,
    pub admin_key: String,
    pub data_dir: PathBuf,
    pub hub: std::sync::Arc<herald::hub::Hub>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub fn test_config(dir: &Path) -> Config {
    Config {
        data_dir: dir.to_path_buf(),
        quic_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    }
}

impl TestServer {
    pub async fn start(dir: &Path) -> TestServer {
        Self::start_with(test_config(dir)).await
    }

    pub async fn start_with(cfg: Config) -> TestServer {
        let data_dir = cfg.data_dir.clone();
        let server = Server::bind(cfg).await.expect("server binds");
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let quic = server.quic_addr();
        let http = server.http_addr();
        let trust = server.client_trust().expect("client trust");
        let issuer = server.token_issuer();
        let admin_key = server.secrets().admin_key.clone();
        let hub = server.hub();
        let task = tokio::spawn(server.run(async move {
            let _ = stop_rx.await;
        }));
        TestServer {
            quic,
            http,
            api: ApiClient::new(&format!("http://{http}"), admin_key.clone()),
            trust,
            issuer,
            admin_key,
            data_dir,
            hub,
            stop: Some(stop_tx),
            task: Some(task),
        }
    }

    pub fn token(&self, user: &str) -> String {
        self.issuer.mint(user, Duration::from_secs(3600)).unwrap()
    }

    pub fn options(&self, user: &str) -> ClientOptions {
        ClientOptions::new(self.quic, self.trust.clone(), self.token(user))
    }

    pub async fn client(&self, user: &str) -> Client {
        Client::connect(self.options(user))
            .await
            .expect("client connects")
    }

    /// Stops the server and waits until it has shut down.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
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
