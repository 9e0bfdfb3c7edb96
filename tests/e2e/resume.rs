//! Catch-up and resume: a follower that went away comes back with its last
//! seq and gets exactly what it missed, in order, then the live posts; the
//! seam between replay and live has no gap and no duplicate; a position the
//! server cannot honour is answered with a Reset.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use crate::harness::*;
use herald_client::{Event, FollowFrom};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_returns_with_last_seq_and_gets_exactly_what_it_missed() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.api.create_channel("r", "").await.unwrap();

    let mut c = server.client("u").await;
    let f = c.follow("r").await.unwrap();
    for i in 1..=10 {
        server
            .api
            .publish("r", &format!("before {i}"))
            .await
            .unwrap();
    }
    let got = collect_posts(&mut c, &BTreeMap::from([("r".to_string(), 10)])).await;
    let last = got["r"].last().unwrap().0;
    assert_eq!(last, 10);
    c.close().await;

    // 1000 posts while it is away.
    let mut tasks = Vec::new();
    for w in 0..4 {
        let api = server.api.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..1000).step_by(4) {
                api.publish("r", &format!("away {i}")).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }

    let mut c = server.client("u").await;
    let back = c
        .follow_from(
            "r",
            FollowFrom {
                after_seq: Some(last),
                epoch: Some(f.epoch),
                tail: 0,
            },
        )
        .await
        .unwrap();
    assert_eq!(back.head_seq, 1010);
    // Live posts published while the replay is running meet it without a seam.
    let api = server.api.clone();
    let live = tokio::spawn(async move {
        for i in 0..50 {
            api.publish("r", &format!("live {i}")).await.unwrap();
        }
    });
    let got = collect_posts(&mut c, &BTreeMap::from([("r".to_string(), 1050)])).await;
    live.await.unwrap();
    let seqs: Vec<u64> = got["r"].iter().map(|p| p.0).collect();
    assert_gapless(&seqs, 11, 1060);
    assert!(got["r"][..1000].iter().all(|p| p.1.starts_with("away ")));
    assert!(got["r"][1000..].iter().all(|p| p.1.starts_with("live ")));
    assert_eq!(c.stats().duplicates_dropped.load(Ordering::Relaxed), 0);
    c.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_and_reset() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.api.create_channel("t", "").await.unwrap();
    for i in 1..=20 {
        server.api.publish("t", &format!("p{i}")).await.unwrap();
    }

    // A live follow may ask for the latest N posts first.
    let mut c = server.client("u").await;
    c.follow_from(
        "t",
        FollowFrom {
            tail: 5,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let got = collect_posts(&mut c, &BTreeMap::from([("t".to_string(), 5)])).await;
    let seqs: Vec<u64> = got["t"].iter().map(|p| p.0).collect();
    assert_gapless(&seqs, 16, 20);
    c.close().await;

    // A position from another epoch: Reset, then everything retained.
    let mut c = server.client("u").await;
    c.follow_from(
        "t",
        FollowFrom {
            after_seq: Some(7),
            epoch: Some(99),
            tail: 0,
        },
    )
    .await
    .unwrap();
    let first = tokio::time::timeout(WAIT, c.next_event())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first,
        Event::Reset {
            channel: "t".into(),
            epoch: 1,
            oldest_seq: 1
        }
    );
    let got = collect_posts(&mut c, &BTreeMap::from([("t".to_string(), 20)])).await;
    let seqs: Vec<u64> = got["t"].iter().map(|p| p.0).collect();
    assert_gapless(&seqs, 1, 20);
    c.close().await;

    // A position ahead of the head (e.g. from a wiped server) is reset too.
    let mut c = server.client("u").await;
    c.follow_from(
        "t",
        FollowFrom {
            after_seq: Some(500),
            epoch: None,
            tail: 0,
        },
    )
    .await
    .unwrap();
    let first = tokio::time::timeout(WAIT, c.next_event())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(first, Event::Reset { oldest_seq: 1, .. }),
        "{first:?}"
    );
    c.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimmed_history_resets_to_the_oldest_retained_post() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.retention.max_posts = 5;
    cfg.retention.interval_secs = 1;
    let server = TestServer::start_with(cfg).await;
    server.api.create_channel("k", "").await.unwrap();
    for i in 1..=12 {
        server.api.publish("k", &format!("p{i}")).await.unwrap();
    }
    // Wait for the background trim (it runs every second) to keep only 5.
    let deadline = tokio::time::Instant::now() + WAIT;
    while server.api.channel("k").await.unwrap().oldest_seq != 8 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention never trimmed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut c = server.client("u").await;
    c.follow_from(
        "k",
        FollowFrom {
            after_seq: Some(2),
            epoch: Some(1),
            tail: 0,
        },
    )
    .await
    .unwrap();
    let first = tokio::time::timeout(WAIT, c.next_event())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        first,
        Event::Reset {
            channel: "k".into(),
            epoch: 1,
            oldest_seq: 8
        }
    );
    let got = collect_posts(&mut c, &BTreeMap::from([("k".to_string(), 5)])).await;
    let seqs: Vec<u64> = got["k"].iter().map(|p| p.0).collect();
    assert_gapless(&seqs, 8, 12);
    c.close().await;
    server.stop().await;
}
