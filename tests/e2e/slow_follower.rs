//! A slow follower never slows anyone else, its server-side queue stays under
//! the configured bound, and once it reads again it gets every post, in
//! order, exactly once (caught up from the log).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use crate::harness::*;
use herald_client::ClientOptions;

const POSTS: usize = 10_000;
const QUEUE_BOUND: usize = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_follower_is_bounded_then_caught_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.session_queue_bytes = QUEUE_BOUND;
    // Stalling is the point here: do not disconnect for lagging.
    cfg.limits.max_lag_events = 1_000_000;
    let server = TestServer::start_with(cfg).await;
    server.api.create_channel("s", "").await.unwrap();

    // The session queue and lag are feed stream matters (live datagrams do
    // not queue), so both followers take everything on the stream.
    let mut fast = herald_client::Client::connect(ClientOptions {
        live_datagrams: false,
        ..server.options("fast")
    })
    .await
    .unwrap();
    fast.follow("s").await.unwrap();
    // The slow follower buffers few events so that it stops reading soon.
    let slow_opts = ClientOptions {
        event_buffer: 16,
        live_datagrams: false,
        ..server.options("slow")
    };
    let mut slow = herald_client::Client::connect(slow_opts).await.unwrap();
    slow.follow("s").await.unwrap();

    // The fast follower reads concurrently with publishing.
    let fast_task = tokio::spawn(async move {
        let got = collect_posts(&mut fast, &BTreeMap::from([("s".to_string(), POSTS)])).await;
        let dups = fast.stats().duplicates_dropped.load(Ordering::Relaxed);
        // Hand the client back so its session stays open for the checks below.
        (got, dups, fast)
    });

    // 1 KiB posts, so that 10,000 of them (10 MiB) cannot all sit in the
    // transport's windows and the session queue.
    let body = "x".repeat(1000);
    let mut tasks = Vec::new();
    for w in 0..8 {
        let api = server.api.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..POSTS).step_by(8) {
                api.publish("s", &format!("{i:05} {body}")).await.unwrap();
            }
        }));
    }
    // Watch the slow follower's server-side queue from the outside while
    // the posts go out: it must fill up (the follower stopped reading) and
    // never hold more than the bound.
    let mut largest = 0;
    let publishing = futures_util::future::join_all(tasks);
    tokio::pin!(publishing);
    loop {
        tokio::select! {
            done = &mut publishing => {
                for t in done {
                    t.unwrap();
                }
                break;
            }
            _ = tokio::time::sleep(std::time::Duration::from_millis(5)) => {
                largest = largest.max(server.hub.largest_queue().0);
            }
        }
    }

    let (fast_got, fast_dups, fast) = fast_task.await.unwrap();
    let seqs: Vec<u64> = fast_got["s"].iter().map(|p| p.0).collect();
    assert_gapless(&seqs, 1, POSTS as u64);
    assert_eq!(fast_dups, 0);

    let (now, sessions) = server.hub.largest_queue();
    largest = largest.max(now);
    assert_eq!(sessions, 2);
    assert!(
        largest <= QUEUE_BOUND,
        "a queue held {largest} bytes; the bound is {QUEUE_BOUND}"
    );
    assert!(
        largest >= QUEUE_BOUND / 2,
        "the slow follower's queue never filled ({largest} bytes): the test did not stall it"
    );
    let lagged = server.hub.totals().lagged.load(Ordering::Relaxed);
    assert!(
        lagged > 0,
        "the slow follower never overflowed; the test did not test lag"
    );

    // Now it reads: every post, in order, once.
    let got = collect_posts(&mut slow, &BTreeMap::from([("s".to_string(), POSTS)])).await;
    let seqs: Vec<u64> = got["s"].iter().map(|p| p.0).collect();
    assert_gapless(&seqs, 1, POSTS as u64);
    assert_eq!(slow.stats().duplicates_dropped.load(Ordering::Relaxed), 0);
    assert_eq!(slow.stats().gaps.load(Ordering::Relaxed), 0);
    assert_eq!(
        slow.stats().reconnects.load(Ordering::Relaxed),
        0,
        "it was not disconnected"
    );

    // And it is live again afterwards.
    let seq = server.api.publish("s", "after").await.unwrap().seq;
    let got = collect_posts(&mut slow, &BTreeMap::from([("s".to_string(), 1)])).await;
    assert_eq!(got["s"][0].0, seq);
    drop((slow, fast));
    server.stop().await;
}
