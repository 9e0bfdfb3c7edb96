//! Promoted impressions are exact across kill -9: the real `herald` binary
//! is killed with SIGKILL while a campaign fills every slot and followers
//! receive promoted posts, then restarted on the same data directory; the
//! impressions the campaign reports cover every promoted frame the followers
//! received (each count is durable before its frame leaves the server), and
//! exceed them by no more than what was in flight at the kill.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use herald::cli::ApiClient;
use herald_client::{Client, ClientOptions, Event};
use serde_json::json;

use crate::harness::*;

const FOLLOWERS: usize = 4;
/// Promoted rounds a follower may have counted (durably) but not yet been
/// sent when the server is killed: the documented over-count window. Seen:
/// 0 on an idle machine, up to 2 with two busy loops on the two cores.
const OVERCOUNT_ROUNDS: usize = 4;

/// Counts one follower's promoted frames and the last post seq it got.
struct Tally {
    promoted: AtomicU64,
    last_seq: AtomicU64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impressions_equal_frames_received_across_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = spawn_server(dir.path(), "127.0.0.1:0", "127.0.0.1:0").await;
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
    let srv2 = spawn_server(dir.path(), &srv.quic.to_string(), &srv.http.to_string()).await;
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
    // Quiet now: the counts must match (allow the last frames to arrive).
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
        v["impressions"].as_u64().unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let (mut reported, mut got);
    loop {
        reported = stats(
            http.clone(),
            base.clone(),
            secrets.admin_key.clone(),
            id.clone(),
        )
        .await;
        got = received(&tallies);
        if reported == got || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        before >= 150 && got > before,
        "before {before}, total {got}"
    );
    // No impression that reached a follower is lost: its count was durable
    // before its frame left the server.
    assert!(
        reported >= got,
        "impressions reported ({reported}) must cover every promoted frame received \
         ({got}) across kill -9 ({before} received before the kill)"
    );
    // The one window left: counted and durable, but not yet sent when the
    // process died. At most a few promoted rounds per follower (one every
    // post here, one post every 5 ms); the write that lost everything since
    // the last 250 ms flush lost tens.
    assert!(
        reported - got <= (OVERCOUNT_ROUNDS * FOLLOWERS) as u64,
        "impressions reported ({reported}) exceed promoted frames received ({got}) by more \
         than the in-flight window ({before} received before the kill)"
    );
    for r in readers {
        r.abort();
    }
    drop(srv2);
}
