//! CI smoke: a few hundred followers and tens of posts against an in-process
//! server must verify clean, and the server's `/metrics` must show the run;
//! with the default (`loop`) follower engine, and once with `client`.

mod common;

use herald_loadtest::options::Engine;
use herald_loadtest::{run, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_run_verifies_clean() {
    let server = common::InProcess::start().await;
    let opts = Options::small(300, 5, 40);
    let report = run(&opts, &server.target).await.unwrap();
    assert!(report.verify.ok, "{report}");
    assert_eq!(report.exit_code(), 0);
    assert_eq!(report.connect.connected, 300);
    assert!(report.delivery.completed);
    assert_eq!(report.delivery.delivered, report.delivery.expected);
    // 300 followers x 2 follows, 40 posts round-robin over 5 channels.
    assert!(report.delivery.expected >= 300 * 2 * 8);
    assert_eq!(report.delivery.latency_ms.count, report.delivery.delivered);
    assert!(report.server_stats.run_cpu_seconds.is_some(), "{report}");

    let metrics = reqwest::get(format!("{}/metrics", server.target.api))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in [
        herald_server::metrics::POSTS_PUBLISHED,
        herald_server::metrics::FRAMES_DELIVERED,
        herald_server::metrics::FANOUT_SECONDS,
        herald_server::metrics::COMMIT_SECONDS,
        herald_server::metrics::FOLLOWS,
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_engine_run_verifies_clean() {
    let server = common::InProcess::start().await;
    let opts = Options {
        engine: Engine::Client,
        connect_rate: 2000,
        ..Options::small(200, 3, 30)
    };
    let report = run(&opts, &server.target).await.unwrap();
    assert!(report.verify.ok, "{report}");
    assert_eq!(report.connect.connected, 200);
    assert_eq!(report.delivery.delivered, report.delivery.expected);
    assert_eq!(report.delivery.latency_ms.count, report.delivery.delivered);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_run_on_one_channel_verifies_clean() {
    let server = common::InProcess::start().await;
    let opts = Options {
        follows: 1,
        rate: 50.0,
        ..Options::small(100, 1, 10)
    };
    let report = run(&opts, &server.target).await.unwrap();
    assert!(report.verify.ok, "{report}");
    assert_eq!(report.delivery.delivered, 1000);
    assert_eq!(report.delivery.last_follower_ms.count, 10);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_impressions_equal_promoted_frames_received() {
    let server = common::InProcess::start().await;
    let opts = Options {
        campaign: true,
        // Promoted frames with receipts (Seen), through the client library.
        engine: Engine::Client,
        ..Options::small(200, 3, 30)
    };
    let report = run(&opts, &server.target).await.unwrap();
    assert!(report.verify.ok, "{report}");
    let c = report.campaign.clone().expect("campaign report");
    // 30 posts over 3 channels: 10 each, so two slots per channel, each
    // shown to every follower of that channel.
    assert!(c.received > 0, "{report}");
    assert_eq!(c.impressions, c.received);
    server.shutdown().await;
}
