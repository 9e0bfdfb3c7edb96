//! Edits and deletes are not lost when a follower's queue overflows: the
//! live PostEdited / PostDeleted events that did not fit are re-sent from the
//! log once the follower reads again.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use crate::harness::*;
use herald_client::{ClientOptions, Event};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_and_deletes_survive_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.session_queue_bytes = 64 * 1024;
    cfg.limits.max_lag_events = 1_000_000;
    let server = TestServer::start_with(cfg).await;
    server.api.create_channel("m", "").await.unwrap();
    let mut slow = herald_client::Client::connect(ClientOptions {
        event_buffer: 16,
        // Lag is a feed stream matter: live datagrams do not queue.
        live_datagrams: false,
        ..server.options("slow")
    })
    .await
    .unwrap();
    slow.follow("m").await.unwrap();

    // Posts 1..=10 reach the follower first, so its cursor is past them.
    for i in 1..=10 {
        server.api.publish("m", &format!("p{i}")).await.unwrap();
    }
    let got = collect_posts(&mut slow, &BTreeMap::from([("m".to_string(), 10)])).await;
    assert_eq!(got["m"].len(), 10);

    // Now it stops reading while 8 MiB of posts fill every buffer (the
    // transport windows hold about 3 MiB).
    const POSTS: usize = 8000;
    server.publish_numbered("m", POSTS, &"z".repeat(1000)).await;
    assert!(server.hub.totals().lagged.load(Ordering::Relaxed) > 0);

    // Edit post 5 and delete post 6 while the queue is full. The edit is
    // larger than the room a queue full of 1 KB posts can have left.
    let edited_text = format!("p5 edited {}", "e".repeat(10_000));
    let http = reqwest::Client::new();
    let base = format!("http://{}/v1/channels/m/posts", server.http);
    let r = http
        .patch(format!("{base}/5"))
        .bearer_auth(&server.admin_key)
        .json(&serde_json::json!({"text": edited_text}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .delete(format!("{base}/6"))
        .bearer_auth(&server.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // Reading again: every post, and both changes, whatever the queue dropped.
    let mut posts = 0;
    let (mut edited, mut deleted) = (None, false);
    while posts < POSTS || edited.is_none() || !deleted {
        let ev = tokio::time::timeout(WAIT, slow.next_event())
            .await
            .unwrap_or_else(|_| {
                panic!("stuck: {posts} posts, edited {edited:?}, deleted {deleted}")
            })
            .expect("open");
        match ev {
            Event::Post(_) => posts += 1,
            Event::Edited { seq: 5, text, .. } => edited = Some(text),
            Event::Deleted { seq: 6, .. } => deleted = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(edited.as_deref(), Some(edited_text.as_str()));
    assert_eq!(slow.stats().gaps.load(Ordering::Relaxed), 0);
    slow.close().await;
    server.stop().await;
}
