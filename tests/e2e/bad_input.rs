//! Bad input never crashes the server or disturbs other sessions: each case
//! gets a clear error (a code and a message, or a refused handshake), and a
//! healthy follower connected throughout keeps receiving posts.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::harness::*;
use herald_client::{connect_raw, Client, ClientError};
use herald_proto::frame::encode_frame;
use herald_proto::v1 as pb;
use herald_proto::ErrorCode;

/// Waits for the server to close `conn` and returns (code, reason).
async fn close_reason(conn: &quinn::Connection) -> (u64, String) {
    match tokio::time::timeout(WAIT, conn.closed())
        .await
        .expect("server closes")
    {
        quinn::ConnectionError::ApplicationClosed(c) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("expected an application close, got {other}"),
    }
}

async fn raw_send(server: &TestServer, bytes: &[u8]) -> (u64, String) {
    let (_ep, conn) = connect_raw(server.quic, &server.trust, herald_proto::ALPN)
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    close_reason(&conn).await
}

fn hello(token: &str) -> Vec<u8> {
    encode_frame(&pb::ClientFrame {
        request_id: 0,
        kind: Some(pb::client_frame::Kind::Hello(pb::Hello {
            token: token.into(),
            client_name: "test".into(),
            receipts: false,
            live_datagrams: false,
        })),
    })
    .to_vec()
}

/// A healthy follower on channel `ok`, to prove other sessions carry on.
async fn healthy(server: &TestServer) -> Client {
    let c = server.client("healthy").await;
    c.follow("ok").await.unwrap();
    c
}

async fn still_delivers(server: &TestServer, c: &mut Client, n: usize) {
    let text = format!("still alive {n}");
    let seq = server.api.publish("ok", &text).await.unwrap().seq;
    let got = collect_posts(c, &BTreeMap::from([("ok".to_string(), 1)])).await;
    assert_eq!(got["ok"], vec![(seq, text)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_only_the_offending_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.api.create_channel("ok", "").await.unwrap();
    let mut good = healthy(&server).await;

    // Garbage: a length prefix followed by bytes that are not a ClientFrame.
    let (code, reason) = raw_send(&server, &[5, 0xff, 0xff, 0xff, 0xff, 0xff]).await;
    assert_eq!(code, ErrorCode::MalformedFrame.as_u32() as u64, "{reason}");
    assert!(!reason.is_empty());
    still_delivers(&server, &mut good, 1).await;

    // Oversized: declares 1 MiB; rejected before the server reads or allocates it.
    let mut big = Vec::new();
    prost::encode_length_delimiter(1 << 20, &mut big).unwrap();
    let (code, reason) = raw_send(&server, &big).await;
    assert_eq!(code, ErrorCode::FrameTooLarge.as_u32() as u64, "{reason}");
    assert!(reason.contains("exceeds"), "{reason}");
    still_delivers(&server, &mut good, 2).await;

    // Follow before Hello.
    let follow = encode_frame(&pb::ClientFrame {
        request_id: 1,
        kind: Some(pb::client_frame::Kind::Follow(pb::Follow {
            channel: "ok".into(),
            ..Default::default()
        })),
    });
    let (code, reason) = raw_send(&server, &follow).await;
    assert_eq!(code, ErrorCode::HelloRequired.as_u32() as u64, "{reason}");

    // A frame with no kind after a valid Hello.
    let mut bytes = hello(&server.token("x"));
    bytes.extend_from_slice(&encode_frame(&pb::ClientFrame {
        request_id: 2,
        kind: None,
    }));
    let (code, _) = raw_send(&server, &bytes).await;
    assert_eq!(code, ErrorCode::MalformedFrame.as_u32() as u64);

    // A Follow with an invalid channel id after Hello.
    let mut bytes = hello(&server.token("x"));
    bytes.extend_from_slice(&encode_frame(&pb::ClientFrame {
        request_id: 3,
        kind: Some(pb::client_frame::Kind::Follow(pb::Follow {
            channel: "not a channel!".into(),
            ..Default::default()
        })),
    }));
    let (code, reason) = raw_send(&server, &bytes).await;
    assert_eq!(code, ErrorCode::MalformedFrame.as_u32() as u64);
    assert!(reason.contains("channel id"), "{reason}");

    still_delivers(&server, &mut good, 3).await;
    drop(good);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_at_hello() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.api.create_channel("ok", "").await.unwrap();
    let mut good = healthy(&server).await;

    let mut opts = server.options("u");
    opts.token = "not-a-jwt".into();
    match Client::connect(opts).await {
        Err(ClientError::Refused { code, message }) => {
            assert_eq!(code, Some(ErrorCode::Unauthenticated), "{message}");
        }
        Err(e) => panic!("expected a refusal, got {e}"),
        Ok(_) => panic!("a junk token was accepted"),
    }

    // Signed with another secret.
    let mut opts = server.options("u");
    opts.token = herald_server::auth::TokenIssuer::hs256(b"some other secret")
        .mint("u", Duration::from_secs(60))
        .unwrap();
    assert!(matches!(
        Client::connect(opts).await,
        Err(ClientError::Refused {
            code: Some(ErrorCode::Unauthenticated),
            ..
        })
    ));

    // Expired.
    let now = herald_server::model::now_ms() / 1000;
    let mut opts = server.options("u");
    opts.token = server
        .issuer
        .sign(&herald_server::auth::Claims {
            sub: "u".into(),
            exp: now - 60,
            iat: None,
            nbf: None,
            channels: None,
        })
        .unwrap();
    assert!(matches!(
        Client::connect(opts).await,
        Err(ClientError::Refused {
            code: Some(ErrorCode::TokenExpired),
            ..
        })
    ));

    still_delivers(&server, &mut good, 1).await;
    drop(good);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_channel_is_a_request_error_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.api.create_channel("ok", "").await.unwrap();
    let mut c = server.client("u").await;
    match c.follow("nope").await {
        Err(ClientError::Request { code, message }) => {
            assert_eq!(code, Some(ErrorCode::UnknownChannel));
            assert!(message.contains("nope"), "{message}");
        }
        other => panic!("expected unknown_channel, got {other:?}"),
    }
    // Same connection still works.
    c.follow("ok").await.unwrap();
    still_delivers(&server, &mut c, 1).await;
    drop(c);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_alpn_is_refused_in_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.api.create_channel("ok", "").await.unwrap();
    let mut good = healthy(&server).await;
    match connect_raw(server.quic, &server.trust, b"h3").await {
        Err(ClientError::Connect(msg)) => {
            assert!(
                msg.to_lowercase().contains("application protocol") || msg.contains("120"),
                "{msg}"
            );
        }
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("a connection with the wrong ALPN was accepted"),
    }
    // An untrusted certificate pin is refused by the client.
    let other_dir = tempfile::tempdir().unwrap();
    let other = herald_server::tls::CertStore::self_signed(other_dir.path()).unwrap();
    drop(other);
    let wrong_pin = herald_client::ClientTrust::pinned_file(
        &other_dir.path().join(herald_server::tls::CERT_FILE),
    )
    .unwrap();
    assert!(connect_raw(server.quic, &wrong_pin, herald_proto::ALPN)
        .await
        .is_err());
    still_delivers(&server, &mut good, 1).await;
    drop(good);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_errors_are_json_with_stable_codes() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.api.create_channel("ok", "").await.unwrap();
    let mut good = healthy(&server).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/channels/ok/posts", server.http);

    async fn check(resp: reqwest::Response, status: u16, code: &str) {
        assert_eq!(resp.status().as_u16(), status);
        let body: serde_json::Value = resp.json().await.expect("JSON error body");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
    }

    let body = serde_json::json!({"text": "hi"});
    check(
        http.post(&url).json(&body).send().await.unwrap(),
        401,
        "unauthenticated",
    )
    .await;
    check(
        http.post(&url)
            .bearer_auth("wrong")
            .json(&body)
            .send()
            .await
            .unwrap(),
        401,
        "unauthenticated",
    )
    .await;
    let key = &server.admin_key;
    // A post over the text limit, and a body over the body limit, are each
    // refused with a message that names the limit.
    for (size, status, limit) in [(100_000, 400, "16384"), (300_000, 413, "256 KiB")] {
        let resp = http
            .post(&url)
            .bearer_auth(key)
            .json(&serde_json::json!({"text": "x".repeat(size)}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{size} bytes");
        let answer: serde_json::Value = resp.json().await.unwrap();
        let msg = answer["error"]["message"].as_str().unwrap_or_default();
        assert!(msg.contains(limit), "{answer}");
    }
    check(
        http.post(format!("http://{}/v1/channels/nope/posts", server.http))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap(),
        404,
        "unknown_channel",
    )
    .await;
    check(
        http.post(&url)
            .bearer_auth(key)
            .json(&serde_json::json!({"text": ""}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_argument",
    )
    .await;
    check(
        http.post(&url)
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_argument",
    )
    .await;
    check(
        http.post(&url)
            .bearer_auth(key)
            .json(&serde_json::json!({"text": "x".repeat(20_000)}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_argument",
    )
    .await;
    check(
        http.post(format!("http://{}/v1/channels", server.http))
            .bearer_auth(key)
            .json(&serde_json::json!({"id": "ok"}))
            .send()
            .await
            .unwrap(),
        409,
        "already_exists",
    )
    .await;
    check(
        http.post(format!("http://{}/v1/channels", server.http))
            .bearer_auth(key)
            .json(&serde_json::json!({"id": "bad id"}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_argument",
    )
    .await;
    check(
        http.patch(format!("{url}/notanumber"))
            .bearer_auth(key)
            .json(&serde_json::json!({"text": "x"}))
            .send()
            .await
            .unwrap(),
        400,
        "invalid_argument",
    )
    .await;
    // Nothing was published by any of the failed requests.
    assert_eq!(server.api.channel("ok").await.unwrap().head_seq, 0);
    still_delivers(&server, &mut good, 1).await;
    drop(good);
    server.stop().await;
}
