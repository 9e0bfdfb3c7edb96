//! `/metrics` of a real `herald` process (its own process, so its recorder
//! and counters are its alone and the figures are exact): after one
//! follower received three posts over QUIC, the transport's gauges and
//! per-loop counters say so.

use std::time::Duration;

use crate::harness::*;
use herald::cli::ApiClient;
use herald_client::{Client, ClientOptions, ClientTrust};

/// The value of the sample named exactly `name` (labels included).
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (n, v) = l.rsplit_once(' ')?;
            (n == name).then(|| v.parse::<f64>().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transport_figures_count_one_followers_traffic() {
    let dir = tempfile::tempdir().unwrap();
    let srv = spawn_server(dir.path(), "127.0.0.1:0", "127.0.0.1:0").await;
    let secrets = herald_server::auth::Secrets::read_existing(dir.path()).unwrap();
    let api = ApiClient::new(&format!("http://{}", srv.http), secrets.admin_key.clone());
    api.create_channel("m", "").await.unwrap();
    let trust = ClientTrust::pinned_file(&dir.path().join(herald_server::tls::CERT_FILE)).unwrap();
    let token = herald_server::auth::TokenIssuer::hs256(secrets.jwt_secret.as_bytes())
        .mint("follower", Duration::from_secs(3600))
        .unwrap();
    let mut follower = Client::connect(ClientOptions::new(srv.quic, trust, token))
        .await
        .unwrap();
    follower.follow("m").await.unwrap();
    for i in 0..3 {
        api.publish("m", &format!("post {i}")).await.unwrap();
    }
    let got = collect_posts(
        &mut follower,
        &std::collections::BTreeMap::from([("m".to_string(), 3)]),
    )
    .await;
    assert_eq!(got["m"].len(), 3);

    let text = reqwest::get(format!("http://{}/metrics", srv.http))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(sample(&text, "herald_connections_open"), 1.0);
    assert_eq!(sample(&text, "herald_frames_delivered_total"), 3.0);
    // The handshake, the control stream and three posts went out; their
    // ACKs and the follower's requests came in.
    assert!(sample(&text, "herald_quic_datagrams_sent_total{loop=\"0\"}") >= 3.0);
    assert!(sample(&text, "herald_quic_datagrams_received_total{loop=\"0\"}") >= 3.0);
    let calls = sample(&text, "herald_quic_send_calls_total{loop=\"0\"}");
    assert!(calls >= 1.0);
    assert!(calls <= sample(&text, "herald_quic_datagrams_sent_total{loop=\"0\"}"));
    assert!(sample(&text, "herald_quic_loop_turns_total{loop=\"0\"}") >= 1.0);
    drop(follower);
}
