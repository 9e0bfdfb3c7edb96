//! The promoted slot end to end: slot spacing, labelling, exact impression
//! counts (impressions reported == promoted frames received), the catch-up
//! slot, click deduplication, a channel that did not opt in, and counts that
//! survive a restart.

use crate::harness::*;
use herald_client::{Client, Event, FollowFrom};

async fn put_json(
    server: &TestServer,
    method: reqwest::Method,
    path: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let r = reqwest::Client::new()
        .request(method, format!("http://{}{path}", server.http))
        .bearer_auth(&server.admin_key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{path}: {}", r.status());
    r.json().await.unwrap()
}

async fn get_json(server: &TestServer, path: &str) -> serde_json::Value {
    reqwest::Client::new()
        .get(format!("http://{}{path}", server.http))
        .bearer_auth(&server.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A campaign's stats once no promoted post it wrote awaits its receipt
/// (the followers confirm what they read within milliseconds; impressions
/// count then).
async fn settled_stats(server: &TestServer, id: &str) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stats = get_json(server, &format!("/v1/campaigns/{id}/stats")).await;
        if stats["awaiting_receipt"] == 0 {
            return stats;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "receipts did not arrive: {stats}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// Reads events until `posts` posts arrived; returns the event sequence as
/// strings ("p5", "ad:<campaign>@5").
async fn read_feed(c: &mut Client, posts: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut n = 0;
    while n < posts {
        match tokio::time::timeout(WAIT, c.next_event())
            .await
            .expect("feed")
            .expect("open")
        {
            Event::Post(p) => {
                n += 1;
                out.push(format!("{}:p{}", p.channel, p.seq));
            }
            Event::Promoted {
                channel,
                campaign_id,
                label,
                after_seq,
                ..
            } => {
                assert_eq!(label, "Sponsored");
                out.push(format!("{channel}:ad:{campaign_id}@{after_seq}"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promoted_slot_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.brand("acme").await;
    server.api.create_channel("news", "").await.unwrap();
    server.api.create_channel("quiet", "").await.unwrap();
    put_json(
        &server,
        reqwest::Method::PUT,
        "/v1/channels/news/promo",
        serde_json::json!({"opt_in": true, "every_posts": 5}),
    )
    .await;
    let now = herald_server::model::now_ms();
    let cmp = put_json(
        &server,
        reqwest::Method::POST,
        "/v1/campaigns",
        serde_json::json!({
            "advertiser": "acme",
            "creative": {"title": "Shoes", "text": "Fast shoes", "cta_url": "https://acme.example/shoes"},
            "budget_impressions": 1000,
            "cpm_bid_micros": 3_000_000,
            "start_ms": now - 1_000_000_000,
            "end_ms": now + 3_600_000,
            "state": "active"
        }),
    )
    .await;
    let id = cmp["id"].as_str().unwrap().to_string();
    assert_eq!(cmp["state"], "active");

    let mut followers = Vec::new();
    for u in ["u1", "u2", "u3"] {
        let c = server.client(u).await;
        c.follow("news").await.unwrap();
        c.follow("quiet").await.unwrap();
        followers.push(c);
    }
    for i in 1..=12 {
        server.api.publish("news", &format!("n{i}")).await.unwrap();
        server.api.publish("quiet", &format!("q{i}")).await.unwrap();
    }
    let mut received_ads = 0;
    for c in followers.iter_mut() {
        let feed = read_feed(c, 24).await;
        let news: Vec<&String> = feed.iter().filter(|e| e.starts_with("news:")).collect();
        let mut want: Vec<String> = Vec::new();
        for i in 1..=12 {
            want.push(format!("news:p{i}"));
            if i % 5 == 0 {
                want.push(format!("news:ad:{id}@{i}"));
            }
        }
        assert_eq!(
            news,
            want.iter().collect::<Vec<_>>(),
            "slot after every 5th post, right after it"
        );
        assert!(
            !feed.iter().any(|e| e.starts_with("quiet:ad")),
            "channel that did not opt in shows none"
        );
        received_ads += feed.iter().filter(|e| e.contains(":ad:")).count();
    }
    assert_eq!(received_ads, 6);

    let stats = settled_stats(&server, &id).await;
    assert_eq!(
        stats["impressions"], received_ads,
        "impressions equal frames received"
    );
    assert_eq!(stats["reach"], 3);
    assert_eq!(stats["spend_micros"], 6 * 3_000_000 / 1000);
    let chan = get_json(&server, "/v1/channels/news/promo").await;
    assert_eq!(chan["promoted_impressions"], 6);

    // Clicks count once per follower and campaign.
    assert!(followers[0].click(&id, "news").await.unwrap());
    assert!(!followers[0].click(&id, "news").await.unwrap());
    assert!(followers[1].click(&id, "news").await.unwrap());
    assert!(followers[0].click("cmp_unknown", "news").await.is_err());

    // Catch-up: a follower resuming after seq 3 gets posts 4..=12 and then
    // exactly one promoted post at the end of its catch-up.
    let mut late = server.client("late").await;
    late.follow_from(
        "news",
        FollowFrom {
            after_seq: Some(3),
            epoch: None,
            tail: 0,
        },
    )
    .await
    .unwrap();
    let mut feed = read_feed(&mut late, 9).await;
    // The catch-up slot comes right after the last replayed post.
    let next = tokio::time::timeout(WAIT, late.next_event())
        .await
        .unwrap()
        .unwrap();
    if let Event::Promoted { after_seq, .. } = next {
        feed.push(format!("news:ad:{id}@{after_seq}"));
    }
    let ads: Vec<&String> = feed.iter().filter(|e| e.contains(":ad:")).collect();
    assert_eq!(ads, vec![&format!("news:ad:{id}@12")], "{feed:?}");
    let stats = settled_stats(&server, &id).await;
    assert_eq!(stats["impressions"], 7);
    assert_eq!(stats["clicks"], 2);

    // Paused: no more slots.
    put_json(
        &server,
        reqwest::Method::PATCH,
        &format!("/v1/campaigns/{id}"),
        serde_json::json!({"state": "paused"}),
    )
    .await;
    for i in 13..=15 {
        server.api.publish("news", &format!("n{i}")).await.unwrap();
    }
    let feed = read_feed(&mut followers[2], 3).await;
    assert!(!feed.iter().any(|e| e.contains(":ad:")), "{feed:?}");

    // Counts survive a restart.
    drop(followers);
    drop(late);
    server.stop().await;
    let server = TestServer::start(dir.path()).await;
    let stats = get_json(&server, &format!("/v1/campaigns/{id}/stats")).await;
    assert_eq!(
        (
            stats["impressions"].as_u64(),
            stats["clicks"].as_u64(),
            stats["reach"].as_u64()
        ),
        (Some(7), Some(2), Some(4))
    );
    let c = get_json(&server, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(c["state"], "paused");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaign_api_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/campaigns", server.http);
    let now = herald_server::model::now_ms();
    server.brand("acme").await;
    let good = serde_json::json!({
        "advertiser": "acme",
        "creative": {"title": "T", "text": "x", "cta_url": "https://a.example"},
        "budget_impressions": 10, "cpm_bid_micros": 1, "end_ms": now + 60_000
    });
    let r = http.post(&url).json(&good).send().await.unwrap();
    assert_eq!(r.status(), 401);
    // The good body is good: what follows fails for the field alone.
    let r = http
        .post(&url)
        .bearer_auth(&server.admin_key)
        .json(&good)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // The advertiser must be given by the admin, and must exist (a brand
    // created later with that id must not inherit a campaign).
    for (advertiser, status) in [
        (serde_json::Value::Null, 400),
        (serde_json::json!(""), 404),
        (serde_json::json!("later"), 404),
    ] {
        let mut b = good.clone();
        if advertiser.is_null() {
            b.as_object_mut().unwrap().remove("advertiser");
        } else {
            b["advertiser"] = advertiser;
        }
        let r = http
            .post(&url)
            .bearer_auth(&server.admin_key)
            .json(&b)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "advertiser {}", b["advertiser"]);
    }
    // Type and shape errors are 400 like every malformed body (never 422).
    for bad in [
        serde_json::json!({"advertiser": "acme", "creative": 5}),
        serde_json::json!({"advertiser": "acme", "budget_impressions": "ten"}),
        serde_json::json!([1, 2]),
    ] {
        let r = http
            .post(&url)
            .bearer_auth(&server.admin_key)
            .json(&bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_argument");
    }
    for (field, value) in [
        ("budget_impressions", serde_json::json!(0)),
        ("end_ms", serde_json::json!(0)),
        (
            "creative",
            serde_json::json!({"title": "T", "text": "x".repeat(161), "cta_url": "https://a"}),
        ),
        (
            "creative",
            serde_json::json!({"title": "T", "text": "x", "cta_url": "ftp://a"}),
        ),
    ] {
        let mut b = good.clone();
        b[field] = value;
        let r = http
            .post(&url)
            .bearer_auth(&server.admin_key)
            .json(&b)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{field}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_argument");
    }
    let r = http
        .get(format!("{url}/cmp_nope"))
        .bearer_auth(&server.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .put(format!("http://{}/v1/channels/nope/promo", server.http))
        .bearer_auth(&server.admin_key)
        .json(&serde_json::json!({"opt_in": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn campaigns_belong_to_their_brand() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", server.http);
    let mut keys = Vec::new();
    for brand in ["acme", "globex"] {
        let r = http
            .post(format!("{base}/v1/brands"))
            .bearer_auth(&server.admin_key)
            .json(&serde_json::json!({"id": brand, "name": brand}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        let r: serde_json::Value = http
            .post(format!("{base}/v1/brands/{brand}/keys"))
            .bearer_auth(&server.admin_key)
            .json(&serde_json::json!({"label": "owner", "grants": [{"channel": "*", "role": "owner"}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        keys.push(r["key"].as_str().expect("key shown once").to_string());
    }
    let now = herald_server::model::now_ms();
    let body = serde_json::json!({
        "creative": {"title": "T", "text": "x", "cta_url": "https://a.example"},
        "budget_impressions": 10, "cpm_bid_micros": 1, "end_ms": now + 60_000
    });
    // A brand key creates campaigns for its own brand only.
    let r = http
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(&keys[0])
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let c: serde_json::Value = r.json().await.unwrap();
    assert_eq!(c["advertiser"], "acme");
    let id = c["id"].as_str().unwrap();
    let mut other = body.clone();
    other["advertiser"] = "globex".into();
    let r = http
        .post(format!("{base}/v1/campaigns"))
        .bearer_auth(&keys[0])
        .json(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // Another brand can neither read nor change it.
    for r in [
        http.get(format!("{base}/v1/campaigns/{id}"))
            .bearer_auth(&keys[1])
            .send()
            .await
            .unwrap(),
        http.get(format!("{base}/v1/campaigns/{id}/stats"))
            .bearer_auth(&keys[1])
            .send()
            .await
            .unwrap(),
        http.patch(format!("{base}/v1/campaigns/{id}"))
            .bearer_auth(&keys[1])
            .json(&serde_json::json!({"state": "active"}))
            .send()
            .await
            .unwrap(),
    ] {
        assert_eq!(r.status(), 403);
        let b: serde_json::Value = r.json().await.unwrap();
        assert_eq!(b["error"]["code"], "forbidden");
    }
    let r = http
        .patch(format!("{base}/v1/campaigns/{id}"))
        .bearer_auth(&keys[0])
        .json(&serde_json::json!({"state": "active"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    server.stop().await;
}
