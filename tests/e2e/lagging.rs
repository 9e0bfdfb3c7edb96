//! The lag rule: a follower that lags more than `limits.max_lag_events`
//! times within `limits.lag_window_secs` is disconnected with the code
//! `lagging_too_often`; the client library reconnects and resumes from its
//! last seq, so the application still sees every post once, in order.

use std::sync::atomic::Ordering;

use crate::harness::*;
use herald_client::{ClientOptions, Event};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lagging_too_often_disconnects_and_the_client_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.session_queue_bytes = 64 * 1024;
    cfg.limits.max_lag_events = 0; // the first lag is one too many
    let server = TestServer::start_with(cfg).await;
    server.api.create_channel("l", "").await.unwrap();

    let opts = ClientOptions {
        event_buffer: 16,
        // Lag is a feed stream matter: live datagrams do not queue.
        live_datagrams: false,
        backoff_min: std::time::Duration::from_millis(10),
        ..server.options("slow")
    };
    let mut slow = herald_client::Client::connect(opts).await.unwrap();
    slow.follow("l").await.unwrap();

    const POSTS: usize = 3000;
    server.publish_numbered("l", POSTS, &"y".repeat(1000)).await;
    assert!(
        server.hub.totals().lagged.load(Ordering::Relaxed) > 0,
        "no lag happened"
    );

    let mut seqs = Vec::new();
    let mut disconnect_reason = None;
    let mut reconnected = false;
    while seqs.len() < POSTS {
        let ev = tokio::time::timeout(WAIT, slow.next_event())
            .await
            .unwrap_or_else(|_| panic!("stuck at {} posts", seqs.len()))
            .expect("client open");
        match ev {
            Event::Post(p) => seqs.push(p.seq),
            Event::Disconnected { reason } => disconnect_reason = Some(reason),
            Event::Reconnected => reconnected = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    let reason = disconnect_reason.expect("the server disconnected the lagging follower");
    // The close frame carries the code, but QUIC sends it best-effort: when
    // the slow client's receive buffer was full it can be lost, and the
    // client then learns of the closed connection from the server's
    // stateless reset instead. Either way it was told the connection is gone.
    assert!(
        reason.contains("lagging_too_often") || reason.contains("reset by peer"),
        "{reason}"
    );
    assert!(reconnected);
    assert_gapless(&seqs, 1, POSTS as u64);
    assert_eq!(slow.stats().gaps.load(Ordering::Relaxed), 0);
    slow.close().await;
    server.stop().await;
}
