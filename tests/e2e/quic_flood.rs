//! Unanswered handshakes: a few hundred QUIC Initial packets that are
//! never answered (sent from raw UDP sockets, as an attacker
//! would) must not lock new followers out, and must not disturb followers
//! already connected. The Initials are genuine (made by quinn-proto's
//! client state machine, each with its own connection id), so the server
//! cannot tell them from real clients until it asks them to prove their
//! address.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_client::{Client, ClientTrust, Event};

use crate::harness::*;

/// `n` first datagrams of `n` handshakes to `server`, each never continued.
fn initials(n: usize, server: SocketAddr, trust: &ClientTrust) -> Vec<Vec<u8>> {
    let cfg = herald_client::quic_client_config(
        trust,
        herald_proto::ALPN,
        Duration::from_secs(15),
        Duration::from_secs(30),
    )
    .unwrap();
    let mut ep = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let now = Instant::now();
    (0..n)
        .map(|_| {
            let (_, mut conn) = ep.connect(now, cfg.clone(), server, "localhost").unwrap();
            let mut buf = Vec::new();
            let t = conn.poll_transmit(now, 1, &mut buf).expect("an Initial");
            buf.truncate(t.size);
            buf
        })
        .collect()
}

/// Sends `packets` to `server` from a few raw UDP sockets, never reading.
fn flood(packets: &[Vec<u8>], server: SocketAddr) -> Vec<UdpSocket> {
    let sockets: Vec<UdpSocket> = (0..4)
        .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
        .collect();
    for (i, p) in packets.iter().enumerate() {
        let _ = sockets[i % sockets.len()].send_to(p, server);
        if i % 50 == 49 {
            // Let the server's receive buffer drain a little.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    sockets
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unanswered_handshakes_do_not_lock_followers_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.api.create_channel("c", "").await.unwrap();
    let mut before = server.client("before").await;
    before.follow("c").await.unwrap();

    let packets = initials(600, server.quic, &server.trust);
    let (first, second) = packets.split_at(400);
    let quic = server.quic;
    let first = first.to_vec();
    let _flooders = tokio::task::spawn_blocking(move || flood(&first, quic))
        .await
        .unwrap();

    // A new follower gets in promptly, while the flood goes on.
    let second = second.to_vec();
    let more = tokio::task::spawn_blocking(move || flood(&second, quic));
    let t = Instant::now();
    let mut opts = server.options("after");
    opts.connect_timeout = Duration::from_secs(4);
    let mut after = tokio::time::timeout(Duration::from_secs(4), Client::connect(opts))
        .await
        .expect("a new follower connects within 4 s during a handshake flood")
        .expect("connects");
    let took = t.elapsed();
    let _more = more.await.unwrap();
    after.follow("c").await.unwrap();
    assert!(took < Duration::from_secs(3), "connecting took {took:?}");

    // Both the follower from before and the new one get a post at once.
    server.api.publish("c", "through the flood").await.unwrap();
    for c in [&mut before, &mut after] {
        match next(c).await {
            Event::Post(p) => assert_eq!(p.text, "through the flood"),
            other => panic!("unexpected {other:?}"),
        }
    }
    before.close().await;
    after.close().await;
    server.stop().await;
}
