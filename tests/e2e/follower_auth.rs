//! End to end through a real server over QUIC: follower tokens refused at
//! Hello (bad, expired, not yet valid, wrong audience; ES256 from a JWKS
//! file), a session closed at expiry without refresh and kept with it, a
//! channel-limited token, per-follower and per-connection limits, and the
//! delivery counts in stats.

use std::sync::Arc;
use std::time::Duration;

use crate::harness::{config, next, TestServer, WAIT};
use herald_client::{Client, ClientError, Event, RefreshFuture, TokenRefresher};
use herald_proto::ErrorCode;
use herald_server::auth::{Claims, ScopedClaims, TokenIssuer};
use reqwest::StatusCode;
use serde_json::json;

fn now() -> i64 {
    herald_server::model::now_ms() / 1000
}

fn claims(sub: &str, exp: i64, nbf: Option<i64>, channels: Option<Vec<&str>>) -> Claims {
    Claims {
        sub: sub.into(),
        exp,
        iat: Some(now()),
        nbf,
        channels: channels.map(|c| c.into_iter().map(String::from).collect()),
    }
}

fn scoped(c: Claims, iss: Option<&str>, aud: Option<&str>) -> ScopedClaims {
    ScopedClaims {
        claims: c,
        iss: iss.map(String::from),
        aud: aud.map(String::from),
    }
}

async fn refused(s: &TestServer, token: String) -> Option<ErrorCode> {
    match tokio::time::timeout(WAIT, Client::connect(s.options_for_token(token)))
        .await
        .expect("answer in time")
    {
        Err(ClientError::Refused { code, .. }) => code,
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("expected a refusal, got a session"),
    }
}

#[tokio::test]
async fn bad_expired_early_and_wrong_audience_tokens_are_refused_at_hello() {
    let dir = tempfile::tempdir().unwrap();
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let es = TokenIssuer::es256_pem(pair.serialize_pem().as_bytes(), Some("app-1".into())).unwrap();
    let jwks = dir.path().join("jwks.json");
    let set = json!({ "keys": [es.public_jwk().unwrap()] });
    std::fs::write(&jwks, set.to_string()).unwrap();
    let mut cfg = config(&dir.path().join("data"));
    cfg.auth.jwks_file = Some(jwks);
    cfg.auth.issuer = Some("https://id.test".into());
    cfg.auth.audience = Some("herald".into());
    let s = TestServer::start_with(cfg).await;
    let hs = &s.issuer;
    let iss = Some("https://id.test");
    let aud = Some("herald");
    let later = now() + 3600;

    // Good tokens: ES256 from the JWKS file, and HS256 with the server secret.
    let good = es
        .sign(&scoped(claims("ann", later, None, None), iss, aud))
        .unwrap();
    s.connect(good).await.close().await;
    let good_hs = hs
        .sign(&scoped(claims("bob", later, None, None), iss, aud))
        .unwrap();
    s.connect(good_hs).await.close().await;

    let unauth = Some(ErrorCode::Unauthenticated);
    assert_eq!(refused(&s, "not-a-token".into()).await, unauth);
    let other_secret = TokenIssuer::hs256(b"not the server secret")
        .sign(&scoped(claims("eve", later, None, None), iss, aud))
        .unwrap();
    assert_eq!(refused(&s, other_secret).await, unauth);
    let pair2 = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let forged = TokenIssuer::es256_pem(pair2.serialize_pem().as_bytes(), Some("app-1".into()))
        .unwrap()
        .sign(&scoped(claims("eve", later, None, None), iss, aud))
        .unwrap();
    assert_eq!(refused(&s, forged).await, unauth);
    let expired = es
        .sign(&scoped(claims("ann", now() - 5, None, None), iss, aud))
        .unwrap();
    assert_eq!(refused(&s, expired).await, Some(ErrorCode::TokenExpired));
    let early = es
        .sign(&scoped(
            claims("ann", later, Some(now() + 600), None),
            iss,
            aud,
        ))
        .unwrap();
    assert_eq!(refused(&s, early).await, unauth);
    let wrong_aud = es
        .sign(&scoped(
            claims("ann", later, None, None),
            iss,
            Some("another-app"),
        ))
        .unwrap();
    assert_eq!(refused(&s, wrong_aud).await, unauth);
    let no_aud = es
        .sign(&scoped(claims("ann", later, None, None), iss, None))
        .unwrap();
    assert_eq!(refused(&s, no_aud).await, unauth);
    let wrong_iss = es
        .sign(&scoped(
            claims("ann", later, None, None),
            Some("https://evil.test"),
            aud,
        ))
        .unwrap();
    assert_eq!(refused(&s, wrong_iss).await, unauth);
    s.stop().await;
}

#[tokio::test]
async fn a_channel_limited_token_cannot_follow_other_channels() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(config(dir.path())).await;
    s.brand("acme").await;
    s.channel("allowed", "acme").await;
    s.channel("other", "acme").await;
    let token = s
        .issuer
        .sign(&claims("cy", now() + 3600, None, Some(vec!["allowed"])))
        .unwrap();
    let client = s.connect(token).await;
    client.follow("allowed").await.unwrap();
    match client.follow("other").await {
        Err(ClientError::Request { code, .. }) => assert_eq!(code, Some(ErrorCode::Forbidden)),
        other => panic!("expected forbidden, got {other:?}"),
    }
    client.close().await;
    s.stop().await;
}

#[tokio::test]
async fn expiry_closes_a_session_without_refresh_and_refresh_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(config(dir.path())).await;
    s.brand("acme").await;
    s.channel("live", "acme").await;
    // Both tokens run out in about two seconds: a real deadline, kept short.
    let exp = now() + 2;
    let short = |sub: &str| s.issuer.sign(&claims(sub, exp, None, None)).unwrap();

    let mut plain = s.connect(short("no-refresh")).await;
    plain.follow("live").await.unwrap();

    let (called_tx, mut called_rx) = tokio::sync::mpsc::unbounded_channel();
    let issuer = s.issuer.clone();
    let refresher: TokenRefresher = Arc::new(move || -> RefreshFuture {
        let t = issuer.mint("refreshing", Duration::from_secs(3600));
        let _ = called_tx.send(());
        Box::pin(async move { t.map_err(|e| e.into()) })
    });
    let mut opts = s.options_for_token(short("refreshing"));
    opts.token_refresher = Some(refresher);
    let mut kept = Client::connect(opts).await.unwrap();
    kept.follow("live").await.unwrap();

    // Without refresh: closed with token_expired, for good.
    match next(&mut plain).await {
        Event::Closed { code, .. } => assert_eq!(code, Some(ErrorCode::TokenExpired)),
        other => panic!("expected Closed(token_expired), got {other:?}"),
    }
    assert!(plain.next_event().await.is_none());
    // The refresher ran before the expiry that closed the other session.
    tokio::time::timeout(WAIT, called_rx.recv())
        .await
        .unwrap()
        .unwrap();

    // With refresh: the same session goes on past the old expiry.
    let r = s.publish("live", &s.admin_key, "still here", None).await;
    assert_eq!(r.status, StatusCode::CREATED);
    match next(&mut kept).await {
        Event::Post(p) => assert_eq!(p.text, "still here"),
        other => panic!("expected the post, got {other:?}"),
    }
    assert_eq!(kept.stats().get(&kept.stats().reconnects), 0);
    kept.close().await;
    s.stop().await;
}

#[tokio::test]
async fn connections_per_follower_and_follow_rate_are_limited() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.limits.max_connections_per_follower = 1;
    cfg.limits.follows_per_sec = 0.01;
    cfg.limits.follow_burst = 2;
    cfg.limits.rate_limit_strikes = 2;
    let s = TestServer::start_with(cfg).await;
    s.brand("acme").await;
    for c in ["c1", "c2", "c3", "c4", "c5"] {
        s.channel(c, "acme").await;
    }

    let first = s.connect(s.token("dup")).await;
    assert_eq!(
        refused(&s, s.token("dup")).await,
        Some(ErrorCode::TooManyConnections)
    );
    first.close().await;

    let mut c = s.connect(s.token("fast")).await;
    c.follow("c1").await.unwrap();
    c.follow("c2").await.unwrap();
    for ch in ["c3", "c4"] {
        match c.follow(ch).await {
            Err(ClientError::Request { code, .. }) => {
                assert_eq!(code, Some(ErrorCode::RateLimited))
            }
            other => panic!("expected rate_limited, got {other:?}"),
        }
    }
    // Other control frames still pass; going on over the limit closes.
    c.unfollow("c2").await.unwrap();
    assert!(c.follow("c5").await.is_err());
    loop {
        match next(&mut c).await {
            Event::Closed { code, .. } => {
                assert_eq!(code, Some(ErrorCode::RateLimited));
                break;
            }
            Event::Error { .. } => {}
            other => panic!("expected Closed(rate_limited), got {other:?}"),
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn stats_count_followers_posts_and_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(config(dir.path())).await;
    s.brand("acme").await;
    s.channel("st", "acme").await;
    let (analyst, _) = s.key("acme", "st", "analyst").await;
    let mut c = s.connect(s.token("reader")).await;
    c.follow("st").await.unwrap();
    for t in ["a", "b"] {
        assert_eq!(
            s.publish("st", &s.admin_key, t, None).await.status,
            StatusCode::CREATED
        );
    }
    for _ in 0..2 {
        assert!(matches!(next(&mut c).await, Event::Post(_)));
    }
    let r = s.get("/v1/channels/st/stats", Some(&analyst)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["followers"], 1);
    assert_eq!(r.body["posts"], 2);
    assert_eq!(r.body["deliveries"], 2);
    assert_eq!(r.body["lag_events"], 0);
    c.close().await;
    s.stop().await;
}

#[tokio::test]
async fn a_refresh_that_would_drop_a_followed_channel_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = TestServer::start_with(config(dir.path())).await;
    s.brand("acme").await;
    s.channel("wide", "acme").await;
    let issuer = s.issuer.clone();
    let refresher: TokenRefresher = Arc::new(move || -> RefreshFuture {
        let t = issuer.sign(&claims("nar", now() + 3600, None, Some(vec!["elsewhere"])));
        Box::pin(async move { t.map_err(|e| e.into()) })
    });
    let mut opts = s.options_for_token(
        s.issuer
            .sign(&claims("nar", now() + 2, None, None))
            .unwrap(),
    );
    opts.token_refresher = Some(refresher);
    let mut c = Client::connect(opts).await.unwrap();
    c.follow("wide").await.unwrap();
    match next(&mut c).await {
        Event::Error { code, channel, .. } => {
            assert_eq!(code, Some(ErrorCode::Forbidden));
            assert_eq!(channel, "wide");
        }
        other => panic!("expected the refused refresh, got {other:?}"),
    }
    c.close().await;
    s.stop().await;
}
