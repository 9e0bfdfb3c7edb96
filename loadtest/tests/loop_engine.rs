//! The `loop` follower engine end to end against an in-process server: a
//! run must verify clean (every follower got every post of its channels
//! once, in order), paced connects and promoted frames included; and
//! followers the server refuses are reported failed with the reason while
//! the others are verified. Live datagrams (docs/protocol.md §8.5): with
//! every third datagram dropped on purpose, the repair (Resend, Head) must
//! still deliver every post exactly once, in order; with them off, every
//! post comes on the stream.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald::cli::ApiClient;
use herald_loadtest::engine::{Engine, EngineConfig, FollowerPlan};
use herald_loadtest::follower::Shared;
use herald_loadtest::options::Engine as EngineKind;
use herald_loadtest::verify::verify;
use herald_loadtest::{run, Options};
use herald_server::auth::TokenIssuer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_engine_run_verifies_clean() {
    let server = common::InProcess::start().await;
    let opts = Options {
        engine: EngineKind::Loop,
        connect_rate: 2000,
        connect_concurrency: 16,
        // More sockets than a two-core machine gets loops: several per loop
        // there (on four or more cores, one each).
        endpoints: 4,
        ..Options::small(200, 2, 20)
    };
    let report = run(&opts, &server.target).await.unwrap();
    assert!(report.verify.ok, "{report}");
    assert_eq!(report.connect.connected, 200);
    assert!(report.delivery.completed, "{report}");
    // 200 followers each follow both channels; 20 posts, 10 per channel.
    assert_eq!(report.delivery.expected, 200 * 20);
    assert_eq!(report.delivery.delivered, report.delivery.expected);
    assert_eq!(report.delivery.latency_ms.count, report.delivery.delivered);
    assert_eq!(report.delivery.last_follower_ms.count, 20);
    // Live datagrams are on by default.
    let d = &report.delivery;
    assert!(d.datagram_posts > 0, "{report}");
    assert_eq!(d.datagram_posts + d.stream_posts, d.delivered, "{report}");
    // Paced at 2000/s: 200 connects take at least ~0.1 s.
    assert!(report.connect.wall_secs >= 0.09, "{report}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_engine_counts_promoted_frames() {
    let server = common::InProcess::start().await;
    let opts = Options {
        engine: EngineKind::Loop,
        campaign: true,
        ..Options::small(100, 3, 30)
    };
    let report = run(&opts, &server.target).await.unwrap();
    assert!(report.verify.ok, "{report}");
    let c = report.campaign.clone().expect("campaign report");
    assert!(c.received > 0, "{report}");
    assert_eq!(c.impressions, c.received);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_datagrams_are_asked_for_again_and_every_post_verifies() {
    let server = common::InProcess::start().await;
    let opts = Options {
        engine: EngineKind::Loop,
        live_datagrams: true,
        drop_datagrams_every: 3,
        // Paced, so that posts go out live one by one (as datagrams), and
        // each channel's last post may be the one dropped (then only Head
        // tells the follower about it).
        rate: 200.0,
        ..Options::small(60, 2, 40)
    };
    let report = run(&opts, &server.target).await.unwrap();
    assert!(report.verify.ok, "{report}");
    let d = &report.delivery;
    assert!(d.completed, "{report}");
    assert_eq!(d.expected, 60 * 40);
    assert_eq!(d.delivered, d.expected, "{report}");
    assert_eq!(d.datagram_posts + d.stream_posts, d.delivered, "{report}");
    assert!(d.datagram_posts > 0, "{report}");
    assert!(d.datagrams_dropped > 0, "{report}");
    assert!(d.resends > 0, "{report}");
    // Every dropped post came again on the stream.
    assert!(d.stream_posts >= d.datagrams_dropped, "{report}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_live_datagrams_every_post_comes_on_the_stream() {
    let server = common::InProcess::start().await;
    let opts = Options {
        engine: EngineKind::Loop,
        live_datagrams: false,
        rate: 200.0,
        ..Options::small(60, 2, 40)
    };
    let report = run(&opts, &server.target).await.unwrap();
    assert!(report.verify.ok, "{report}");
    let d = &report.delivery;
    assert_eq!(d.delivered, 60 * 40, "{report}");
    assert_eq!(d.stream_posts, d.delivered, "{report}");
    assert_eq!(
        (d.datagram_posts, d.resends, d.datagrams_dropped),
        (0, 0, 0)
    );
    server.shutdown().await;
}

/// Waits until `cond` holds, for at most `secs`.
async fn until(secs: u64, cond: impl Fn() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cond()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_followers_fail_with_the_reason_and_the_rest_verify() {
    let server = common::InProcess::start().await;
    let t = &server.target;
    let api = ApiClient::new(&t.api, t.admin_key.clone());
    let channel = format!("lg-bad-{}", std::process::id());
    api.create_channel(&channel, "loop engine test")
        .await
        .unwrap();
    const POSTS: u64 = 5;
    const N: usize = 30;
    let shared = Arc::new(Shared::new(
        std::slice::from_ref(&channel),
        &[POSTS],
        N as u64,
    ));
    let issuer = TokenIssuer::hs256(t.jwt_secret.as_bytes());
    let plans: Vec<FollowerPlan> = (0..N)
        .map(|i| FollowerPlan {
            index: i,
            token: match i {
                3 => "not-a-token".to_string(),
                _ => issuer
                    .mint(&format!("f{i}"), Duration::from_secs(600))
                    .unwrap(),
            },
            channels: match i {
                5 => vec!["no-such-channel".to_string()],
                _ => vec![channel.clone()],
            },
            server: t.quic,
        })
        .collect();
    let cfg = EngineConfig {
        client: herald_loadtest::engine::client_config(
            &t.trust,
            Duration::from_secs(15),
            Duration::from_secs(30),
            true,
        )
        .unwrap(),
        live_datagrams: true,
        drop_datagrams_every: 0,
        server_name: "localhost".into(),
        client_name: "loop-engine-test".into(),
        sockets: 2,
        buffer_bytes: 1 << 20,
        connect_rate: 0,
        connect_concurrency: 8,
        connect_timeout: Duration::from_secs(20),
        max_feed_frame: herald_proto::frame::DEFAULT_MAX_FEED_FRAME,
        started: Instant::now(),
    };
    let engine = Engine::start(cfg, plans, shared.clone()).unwrap();
    assert!(
        until(30, || shared.settled.load(Ordering::Acquire) == N as u64).await,
        "settled {} of {N}",
        shared.settled.load(Ordering::Acquire)
    );
    assert_eq!(shared.connect_failed.load(Ordering::Relaxed), 2);
    let mut head = 0;
    for i in 0..POSTS {
        let sent = herald_loadtest::post_text::post_text(0, i as usize, 40);
        head = api.publish(&channel, &sent).await.unwrap().seq;
    }
    assert!(
        until(30, || shared.is_complete()).await,
        "not all delivered"
    );
    let results = engine.stop(Duration::from_secs(10)).await;
    assert_eq!(results.len(), N);

    let bad_token = results[3].error.clone().unwrap_or_default();
    assert!(!results[3].connected);
    assert!(
        bad_token.starts_with("connect: ") && bad_token.contains("unauthenticated"),
        "{bad_token}"
    );
    let bad_follow = results[5].error.clone().unwrap_or_default();
    assert!(!results[5].connected);
    assert!(
        bad_follow.starts_with("follow no-such-channel: ") && bad_follow.contains("unknown"),
        "{bad_follow}"
    );

    let all = verify(&results, &[head], 0);
    assert!(!all.ok);
    assert_eq!(all.connect_failures, 2, "{all:?}");
    assert_eq!(all.missing, 0, "{all:?}");
    let good: Vec<_> = results
        .into_iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 5)
        .map(|(_, r)| r)
        .collect();
    let v = verify(&good, &[head], 0);
    assert!(v.ok, "{v:?}");
    assert!(good.iter().all(|r| r.channels[0].received == POSTS));
    assert!(good.iter().all(|r| r.closed.is_none()));
    server.shutdown().await;
}
