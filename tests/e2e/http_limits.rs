//! HTTP connections that send nothing, or
//! trickle their headers or body, are timed out; and with a low connection
//! cap, many idle connections held by a stranger do not keep a real publish
//! out (they neither exhaust descriptors nor the cap).

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::*;

const CAP: usize = 8;

async fn server(dir: &std::path::Path) -> TestServer {
    let mut cfg = config(dir);
    cfg.limits.http_max_connections = CAP;
    cfg.limits.http_header_timeout_secs = 2;
    cfg.limits.http_request_timeout_secs = 2;
    TestServer::start_with(cfg).await
}

/// Reads until the server closes the connection (or `within` passes);
/// returns what was read and whether it closed in time.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return (String::from_utf8_lossy(&got).into(), false),
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into(), true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_trickling_connections_are_timed_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    server.api.create_channel("c", "").await.unwrap();

    // A connection that never sends a byte.
    let mut silent = TcpStream::connect(server.http).await.unwrap();
    // One that trickles its headers, a byte at a time.
    let mut slow_head = TcpStream::connect(server.http).await.unwrap();
    // One that sends complete headers, then trickles its body.
    let mut slow_body = TcpStream::connect(server.http).await.unwrap();
    let head = format!(
        "POST /v1/channels/c/posts HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\n\
         content-type: application/json\r\ncontent-length: 200\r\n\r\n",
        server.admin_key
    );
    slow_body.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let trickle = async {
        let line = b"GET /healthz HTTP/1.1\r\nhost: x\r\n";
        for i in 0..10 {
            let _ = slow_head.write_all(&line[i..i + 1]).await;
            let _ = slow_body.write_all(b" ").await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    };
    let (silent_res, _) = tokio::join!(
        read_until_closed(&mut silent, Duration::from_secs(6)),
        trickle
    );
    assert!(
        silent_res.1,
        "a connection that sends nothing must be closed"
    );
    let (_, head_closed) = read_until_closed(&mut slow_head, Duration::from_secs(1)).await;
    assert!(head_closed, "trickled headers must time out");
    let (answer, body_closed) = read_until_closed(&mut slow_body, Duration::from_secs(1)).await;
    assert!(body_closed, "a trickled body must time out; got {answer:?}");
    assert!(
        answer.starts_with("HTTP/1.1 408"),
        "a trickled body is answered 408: {answer:?}"
    );
    assert!(answer.contains("request_timeout"), "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    // Nothing was posted by the trickled body.
    let ch = server.api.channel("c").await.unwrap();
    assert_eq!(ch.head_seq, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_at_the_cap_do_not_keep_a_publish_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = server(dir.path()).await;
    server.api.create_channel("c", "").await.unwrap();

    // A stranger opens many connections and sends nothing on any of them.
    let mut idle = Vec::new();
    for _ in 0..(CAP * 25) {
        idle.push(TcpStream::connect(server.http).await.unwrap());
    }
    // The server holds no more than the cap of them: the others are closed
    // at once (answered 503, or made to give way to a newer one).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut still_open = 0;
    for s in idle.iter_mut() {
        let mut b = [0u8; 256];
        if tokio::time::timeout(Duration::from_millis(20), s.read(&mut b))
            .await
            .is_err()
        {
            still_open += 1;
        }
    }
    assert!(
        still_open <= CAP,
        "{still_open} idle connections held with a cap of {CAP}"
    );

    // A real publish is answered at once, and succeeds, while the stranger
    // keeps its connections (and opens more). Each call on a new connection:
    // a kept-alive one is idle between calls and may give way too.
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let publish = |text: &'static str| {
        http.post(format!("{}/v1/channels/c/posts", server.base))
            .bearer_auth(&server.admin_key)
            .json(&serde_json::json!({ "text": text }))
            .timeout(WAIT)
            .send()
    };
    let t = Instant::now();
    let r = publish("hello").await.unwrap();
    assert_eq!(r.status().as_u16(), 201);
    for _ in 0..CAP {
        idle.push(TcpStream::connect(server.http).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = publish("again").await.unwrap();
    assert_eq!(r.status().as_u16(), 201);
    // At once (a few fsyncs), not after an idle connection times out.
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "publishing took {:?} behind idle connections",
        t.elapsed()
    );
    drop(idle);
    server.stop().await;
}
