//! Storage faults: after a failed commit (a full disk,
//! simulated by the test-only fault hook: while the trigger file exists in
//! the data directory, database writes fail with ENOSPC) the server answers
//! 503 `storage_unavailable` (never a false 201), `/readyz` and `/healthz`
//! say so, and once the cause is gone it reopens its databases by itself:
//! publishing works again with the next seq, nothing acknowledged is lost,
//! and followers get every post once, in order.

use std::time::{Duration, Instant};

use herald_client::Event;
use herald_server::datadir::faults::FAIL_WRITES_FILE;
use serde_json::json;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_and_the_server_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.api.create_channel("c", "").await.unwrap();
    let mut follower = server.client("f").await;
    follower.follow("c").await.unwrap();
    for i in 1..=3 {
        let r = server
            .publish("c", &server.admin_key, &format!("p{i}"), None)
            .await;
        assert_eq!(r.status.as_u16(), 201, "{}", r.body);
    }
    let r = server.get("/readyz", None).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.body);

    // The disk fills up.
    let trigger = dir.path().join(FAIL_WRITES_FILE);
    std::fs::write(&trigger, b"").unwrap();
    for attempt in 0..3 {
        let r = server
            .publish("c", &server.admin_key, "p4", Some("key-4"))
            .await;
        r.assert_error(503, "storage_unavailable");
        assert!(r.headers.contains_key("retry-after"), "attempt {attempt}");
    }
    let r = server
        .post("/v1/brands", server.admin(), json!({"id": "b"}))
        .await;
    r.assert_error(503, "storage_unavailable");
    let r = server.get("/readyz", None).await;
    r.assert_error(503, "storage_unavailable");
    let health = server.http_text("/healthz").await;
    assert_eq!(health.0, 200, "liveness stays 200");
    assert!(health.1.starts_with("degraded:"), "{}", health.1);
    // Reads of what is stored still work.
    let h = server.api.history("c", 0, 100).await.unwrap();
    assert_eq!(h.posts.len(), 3);

    // Space comes back; the server recovers without a restart.
    std::fs::remove_file(&trigger).unwrap();
    let t = Instant::now();
    loop {
        let r = server.get("/readyz", None).await;
        if r.status.as_u16() == 200 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "not ready {:?} after the disk has room again: {}",
            t.elapsed(),
            r.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(server.http_text("/healthz").await.1, "ok\n");
    // The retry of the refused publish posts it, with the next seq.
    let r = server
        .publish("c", &server.admin_key, "p4", Some("key-4"))
        .await;
    assert_eq!(r.status.as_u16(), 201, "{}", r.body);
    assert_eq!(r.body["seq"], 4);
    let r = server
        .post("/v1/brands", server.admin(), json!({"id": "b"}))
        .await;
    assert_eq!(r.status.as_u16(), 201, "{}", r.body);

    let h = server.api.history("c", 0, 100).await.unwrap();
    let got: Vec<(u64, String)> = h.posts.iter().map(|p| (p.seq, p.text.clone())).collect();
    assert_eq!(
        got,
        (1..=4).map(|i| (i, format!("p{i}"))).collect::<Vec<_>>()
    );
    let mut seqs = Vec::new();
    while seqs.len() < 4 {
        match next(&mut follower).await {
            Event::Post(p) => seqs.push(p.seq),
            Event::Disconnected { .. } | Event::Reconnected => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_gapless(&seqs, 1, 4);
    follower.close().await;
    server.stop().await;
}
