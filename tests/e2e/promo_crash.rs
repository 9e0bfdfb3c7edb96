//! Promoted impressions are exact across kill -9: the real `herald` binary
//! is killed with SIGKILL while a campaign fills every slot and followers
//! receive promoted posts, then restarted on the same data directory; once
//! the followers are back and have confirmed what they received (receipts,
//! sent again after the reconnect) and the receipt window has passed for the
//! frames that never left the killed server, the impressions the campaign
//! reports equal the promoted frames the followers received.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald::cli::ApiClient;
use herald_client::{Client, ClientOptions, Event};
use herald_proto::frame::encode_frame;
use herald_proto::v1 as pb;
use serde_json::json;

use crate::harness::*;

const FOLLOWERS: usize = 4;
/// The servers' receipt window: a promoted frame recorded (durably) but not
/// confirmed within it after the restart is not counted.
const RECEIPT_WINDOW_SECS: u64 = 5;

/// Counts one follower's promoted frames and the last post seq it got.
struct Tally {
    promoted: AtomicU64,
    last_seq: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impressions_equal_frames_received_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let conf_dir = tempfile::tempdir().unwrap();
    let conf = conf_dir.path().join("herald.toml");
    std::fs::write(
        &conf,
        format!("[promo]\nreceipt_window_secs = {RECEIPT_WINDOW_SECS}\n"),
    )
    .unwrap();
    let conf = conf.to_str().unwrap().to_string();
    let spawn = |quic: String, http: String| {
        let dir = dir.path().to_path_buf();
        let conf = conf.clone();
        async move {
            spawn_server_with(
                &dir,
                &[
                    "--quic-addr",
                    &quic,
                    "--http-addr",
                    &http,
                    "--config",
                    &conf,
                ],
            )
            .await
        }
    };
    let mut srv = spawn("127.0.0.1:0".into(), "127.0.0.1:0".into()).await;
    let secrets = herald_server::auth::Secrets::read_existing(dir.path()).unwrap();
    let base = format!("http://{}", srv.http);
    let api = ApiClient::new(&base, secrets.admin_key.clone());
    let http = reqwest::Client::new();
    let admin = secrets.admin_key.clone();
    let call = |method: reqwest::Method, path: &str, body: serde_json::Value| {
        http.request(method, format!("{base}{path}"))
            .bearer_auth(&admin)
            .json(&body)
            .timeout(WAIT)
            .send()
    };
    let r = call(reqwest::Method::POST, "/v1/brands", json!({"id": "acme"}))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    api.create_channel("c", "").await.unwrap();
    let r = call(
        reqwest::Method::PUT,
        "/v1/channels/c/promo",
        json!({"opt_in": true, "every_posts": 1}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let now = herald_server::model::now_ms();
    let r = call(
        reqwest::Method::POST,
        "/v1/campaigns",
        json!({"advertiser": "acme",
               "creative": {"title": "T", "text": "Buy", "cta_url": "https://acme.example"},
               "budget_impressions": 1_000_000_000u64, "cpm_bid_micros": 1000,
               "start_ms": now - 3_600_000, "end_ms": now + 3_600_000, "state": "active"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    let campaign: serde_json::Value = r.json().await.unwrap();
    let id = campaign["id"].as_str().unwrap().to_string();

    let trust =
        herald_client::ClientTrust::pinned_file(&dir.path().join(herald_server::tls::CERT_FILE))
            .unwrap();
    let issuer = herald_server::auth::TokenIssuer::hs256(secrets.jwt_secret.as_bytes());
    let mut tallies = Vec::new();
    let mut readers = Vec::new();
    for i in 0..FOLLOWERS {
        let opts = ClientOptions {
            backoff_min: Duration::from_millis(20),
            backoff_max: Duration::from_millis(200),
            // Probe often: the restarted server answers with a stateless reset.
            keep_alive: Duration::from_millis(200),
            ..ClientOptions::new(
                srv.quic,
                trust.clone(),
                issuer
                    .mint(&format!("f{i}"), Duration::from_secs(3600))
                    .unwrap(),
            )
        };
        let mut c = Client::connect(opts).await.unwrap();
        c.follow("c").await.unwrap();
        let tally = Arc::new(Tally {
            promoted: AtomicU64::new(0),
            last_seq: AtomicU64::new(0),
        });
        tallies.push(tally.clone());
        readers.push(tokio::spawn(async move {
            while let Some(ev) = c.next_event().await {
                match ev {
                    Event::Promoted { .. } => {
                        tally.promoted.fetch_add(1, Ordering::SeqCst);
                    }
                    Event::Post(p) => tally.last_seq.store(p.seq, Ordering::SeqCst),
                    _ => {}
                }
            }
        }));
    }
    // One more follower confirms receipts but never reads its feed: the
    // promoted frames written to it reach its QUIC buffers, never the
    // application, so it received none. They must not be counted (counting
    // at write would count them all), before the kill or after it.
    let (_silent_ep, silent) = herald_client::connect_raw(srv.quic, &trust, herald_proto::ALPN)
        .await
        .unwrap();
    let (mut silent_ctl, _silent_answers) = silent.open_bi().await.unwrap();
    for (request_id, kind) in [
        (
            1,
            pb::client_frame::Kind::Hello(pb::Hello {
                token: issuer.mint("silent", Duration::from_secs(3600)).unwrap(),
                client_name: "silent".into(),
                receipts: true,
                live_datagrams: false,
            }),
        ),
        (
            2,
            pb::client_frame::Kind::Follow(pb::Follow {
                channel: "c".into(),
                ..Default::default()
            }),
        ),
    ] {
        silent_ctl
            .write_all(&encode_frame(&pb::ClientFrame {
                request_id,
                kind: Some(kind),
            }))
            .await
            .unwrap();
    }
    let received =
        |t: &[Arc<Tally>]| -> u64 { t.iter().map(|t| t.promoted.load(Ordering::SeqCst)).sum() };

    // Posts flow, each opening the slot for every follower; kill -9 once a
    // good number of promoted frames went out.
    let publisher = {
        let api = api.clone();
        tokio::spawn(async move {
            let mut i = 0u64;
            loop {
                if api.publish("c", &format!("p{i}")).await.is_err() {
                    return;
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while received(&tallies) < 150 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "too few promoted frames"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    srv.child.kill().await.unwrap();
    publisher.await.unwrap();
    let before = received(&tallies);

    // Restart on the same data directory and ports; publish a few more.
    let srv2 = spawn(srv.quic.to_string(), srv.http.to_string()).await;
    for i in 0..10 {
        api.publish("c", &format!("after-{i}")).await.unwrap();
    }
    let head = api.channel("c").await.unwrap().head_seq;
    // Every follower reconnects and gets everything.
    let deadline = tokio::time::Instant::now() + WAIT;
    while tallies
        .iter()
        .any(|t| t.last_seq.load(Ordering::SeqCst) < head)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "followers did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Quiet now. The followers confirm what they received (again, for what
    // the killed server had not answered); what it had recorded but never
    // sent is given back once the receipt window is over.
    let stats = |http: reqwest::Client, base: String, admin: String, id: String| async move {
        let v: serde_json::Value = http
            .get(format!("{base}/v1/campaigns/{id}/stats"))
            .bearer_auth(admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (
            v["impressions"].as_u64().unwrap(),
            v["awaiting_receipt"].as_u64().unwrap(),
        )
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    let (mut reported, mut awaiting, mut got);
    loop {
        (reported, awaiting) = stats(
            http.clone(),
            base.clone(),
            secrets.admin_key.clone(),
            id.clone(),
        )
        .await;
        got = received(&tallies);
        if (reported == got && awaiting == 0) || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        before >= 150 && got > before,
        "before {before}, total {got}"
    );
    assert_eq!(
        (reported, awaiting),
        (got, 0),
        "impressions reported must equal the promoted frames the followers received \
         ({before} of them before the kill), with none left awaiting a receipt"
    );
    for r in readers {
        r.abort();
    }
    drop(srv2);
}
