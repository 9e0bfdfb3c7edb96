//! End to end: brands post over HTTP, followers receive live over QUIC.
//! Three followers (two on `a`, one on `a` and `b`); 100 posts to `a` and 50
//! to `b` published concurrently: each follower gets exactly its channels'
//! posts, in seq order, no gap, no duplicate.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_followers_get_exactly_their_channels_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.api.create_channel("a", "A").await.unwrap();
    server.api.create_channel("b", "B").await.unwrap();

    let mut f1 = server.client("f1").await;
    let mut f2 = server.client("f2").await;
    let mut f3 = server.client("f3").await;
    f1.follow("a").await.unwrap();
    f2.follow("a").await.unwrap();
    f3.follow("a").await.unwrap();
    f3.follow("b").await.unwrap();

    // Publish concurrently: several tasks per channel.
    let mut tasks = Vec::new();
    for (ch, n, workers) in [("a", 100usize, 4usize), ("b", 50, 2)] {
        for w in 0..workers {
            let api = server.api.clone();
            tasks.push(tokio::spawn(async move {
                let mut out = Vec::new();
                for i in (w..n).step_by(workers) {
                    let text = format!("{ch}-{i}");
                    let p = api.publish(ch, &text).await.unwrap();
                    out.push((ch, p.seq, text));
                }
                out
            }));
        }
    }
    let mut published: BTreeMap<&str, BTreeMap<u64, String>> = BTreeMap::new();
    for t in tasks {
        for (ch, seq, text) in t.await.unwrap() {
            assert!(published.entry(ch).or_default().insert(seq, text).is_none());
        }
    }
    assert_eq!(published["a"].len(), 100);
    assert_eq!(published["b"].len(), 50);

    let want_a = BTreeMap::from([("a".to_string(), 100)]);
    let want_ab = BTreeMap::from([("a".to_string(), 100), ("b".to_string(), 50)]);
    for (client, want) in [(&mut f1, &want_a), (&mut f2, &want_a), (&mut f3, &want_ab)] {
        let got = collect_posts(client, want).await;
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>()
        );
        for (ch, posts) in &got {
            let seqs: Vec<u64> = posts.iter().map(|p| p.0).collect();
            assert_gapless(&seqs, 1, want[ch] as u64);
            for (seq, text) in posts {
                assert_eq!(&published[ch.as_str()][seq], text, "text of {ch}#{seq}");
            }
        }
        let s = client.stats();
        assert_eq!(
            s.duplicates_dropped.load(Ordering::Relaxed),
            0,
            "server sent a duplicate"
        );
        assert_eq!(s.gaps.load(Ordering::Relaxed), 0, "server skipped a seq");
    }

    // The channel view shows the head and the live follower count.
    let a = server.api.channel("a").await.unwrap();
    assert_eq!(a.head_seq, 100);
    assert_eq!(a.followers, 3);
    drop((f1, f2, f3));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_and_deletes_reach_followers_and_history_keeps_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.api.create_channel("e", "").await.unwrap();
    let mut f = server.client("f").await;
    f.follow("e").await.unwrap();
    for i in 1..=3 {
        server.api.publish("e", &format!("p{i}")).await.unwrap();
    }
    collect_posts(&mut f, &BTreeMap::from([("e".to_string(), 3)])).await;

    let http = reqwest::Client::new();
    let base = format!("http://{}/v1/channels/e/posts", server.http);
    let r = http
        .patch(format!("{base}/2"))
        .bearer_auth(&server.admin_key)
        .json(&serde_json::json!({"text": "p2 edited"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .delete(format!("{base}/1"))
        .bearer_auth(&server.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .delete(format!("{base}/99"))
        .bearer_auth(&server.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(WAIT, f.next_event())
            .await
            .unwrap()
            .unwrap()
        {
            herald_client::Event::Edited { seq, text, .. } => {
                seen.push(format!("edit {seq} {text}"))
            }
            herald_client::Event::Deleted { seq, .. } => seen.push(format!("delete {seq}")),
            _ => {}
        }
    }
    assert_eq!(seen, ["edit 2 p2 edited", "delete 1"]);

    let h = server.api.history("e", 0, 10).await.unwrap();
    assert_eq!(h.head_seq, 3);
    let view: Vec<(u64, bool, &str)> = h
        .posts
        .iter()
        .map(|p| (p.seq, p.deleted, p.text.as_str()))
        .collect();
    assert_eq!(
        view,
        [(1, true, ""), (2, false, "p2 edited"), (3, false, "p3")]
    );

    // A new post after edits takes the next seq, and the follower gets it.
    assert_eq!(server.api.publish("e", "p4").await.unwrap().seq, 4);
    let got = collect_posts(&mut f, &BTreeMap::from([("e".to_string(), 1)])).await;
    assert_eq!(got["e"][0], (4, "p4".to_string()));
    drop(f);
    server.stop().await;
}
