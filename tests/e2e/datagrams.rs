//! Live datagrams (protocol §8.5) through a lossy path: a UDP relay between
//! the client and the server drops server→client packets by a fixed
//! pattern (and swaps some pairs), so live datagrams are lost and
//! reordered; the client still delivers every post once, in order, with
//! edits and deletes applied, and repairs a lost last datagram through the
//! server's Head. A client that does not ask for datagrams gets everything
//! on the feed stream as before.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::UdpSocket;

use crate::harness::*;
use herald_client::{Client, ClientOptions, Event};

/// Which server→client packets the relay drops or delays.
#[derive(Clone, Copy)]
struct Loss {
    /// Drop every `every`-th 1-RTT packet (0: none).
    every: u64,
    /// Drop the 1-RTT packets with these indexes (a burst).
    burst: (u64, u64),
    /// Hold every `swap_every`-th 1-RTT packet and send it after the next
    /// one (0: none).
    swap_every: u64,
}

const CLEAN: Loss = Loss {
    every: 0,
    burst: (0, 0),
    swap_every: 0,
};

/// A UDP relay on 127.0.0.1 in front of `server`, for one client.
struct Relay {
    addr: SocketAddr,
    /// Drop this many more large (> [`LARGE`] bytes) 1-RTT packets from the
    /// server, on top of the pattern.
    drop_large: Arc<AtomicUsize>,
    /// Server→client packets dropped so far.
    dropped: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

/// A packet this large carries a post (the small ones are acknowledgements).
const LARGE: usize = 400;

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A QUIC packet with a short header (1-RTT: after the handshake); the
/// handshake's long-header packets are never dropped, so connecting does
/// not wait for retransmissions.
fn short_header(packet: &[u8]) -> bool {
    packet.first().is_some_and(|b| b & 0x80 == 0)
}

async fn relay(server: SocketAddr, loss: Loss) -> Relay {
    let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    back.connect(server).await.unwrap();
    let addr = front.local_addr().unwrap();
    let drop_large = Arc::new(AtomicUsize::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let (dl, dr) = (drop_large.clone(), dropped.clone());
    let task = tokio::spawn(async move {
        let mut client: Option<SocketAddr> = None;
        let mut up = vec![0u8; 65536];
        let mut down = vec![0u8; 65536];
        let mut n: u64 = 0;
        let mut held: Option<Vec<u8>> = None;
        loop {
            tokio::select! {
                r = front.recv_from(&mut up) => {
                    let Ok((len, from)) = r else { return };
                    client = Some(from);
                    let _ = back.send(&up[..len]).await;
                }
                r = back.recv(&mut down) => {
                    let Ok(len) = r else { return };
                    let Some(to) = client else { continue };
                    let packet = &down[..len];
                    if short_header(packet) {
                        n += 1;
                        let large = len > LARGE;
                        let take = large
                            && dl
                                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| d.checked_sub(1))
                                .is_ok();
                        let pattern = (loss.every > 0 && n.is_multiple_of(loss.every))
                            || (loss.burst.0..loss.burst.1).contains(&n);
                        if take || pattern {
                            dr.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if loss.swap_every > 0 && n.is_multiple_of(loss.swap_every) && held.is_none() {
                            held = Some(packet.to_vec());
                            continue;
                        }
                    }
                    let _ = front.send_to(packet, to).await;
                    if let Some(h) = held.take() {
                        let _ = front.send_to(&h, to).await;
                    }
                }
            }
        }
    });
    Relay {
        addr,
        drop_large,
        dropped,
        task,
    }
}

/// A client for `user` through `relay`.
async fn client_via(server: &TestServer, relay: &Relay, user: &str) -> Client {
    let opts = ClientOptions {
        servers: vec![relay.addr],
        ..server.options(user)
    };
    tokio::time::timeout(WAIT, Client::connect(opts))
        .await
        .expect("connect in time")
        .expect("client connects")
}

async fn edit(server: &TestServer, channel: &str, seq: u64, text: &str) {
    let r = reqwest::Client::new()
        .patch(format!(
            "http://{}/v1/channels/{channel}/posts/{seq}",
            server.http
        ))
        .bearer_auth(&server.admin_key)
        .json(&serde_json::json!({ "text": text }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

async fn delete(server: &TestServer, channel: &str, seq: u64) {
    let r = reqwest::Client::new()
        .delete(format!(
            "http://{}/v1/channels/{channel}/posts/{seq}",
            server.http
        ))
        .bearer_auth(&server.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// What the application holds: text and deleted flag per seq, and the seqs
/// in arrival order. An edit or delete must come after its post.
#[derive(Default)]
struct Held {
    posts: BTreeMap<u64, (String, bool)>,
    order: Vec<u64>,
}

impl Held {
    fn apply(&mut self, ev: Event) {
        match ev {
            Event::Post(p) => {
                assert!(
                    self.posts.insert(p.seq, (p.text, p.deleted)).is_none(),
                    "post {} delivered twice",
                    p.seq
                );
                self.order.push(p.seq);
            }
            Event::Edited { seq, text, .. } => {
                let p = self.posts.get_mut(&seq);
                let p = p.unwrap_or_else(|| panic!("edit of {seq} before its post"));
                if !p.1 {
                    p.0 = text;
                }
            }
            Event::Deleted { seq, .. } => {
                let p = self.posts.get_mut(&seq);
                let p = p.unwrap_or_else(|| panic!("delete of {seq} before its post"));
                *p = (String::new(), true);
            }
            Event::Reset { .. } => panic!("no Reset expected: nothing was trimmed"),
            Event::Closed { reason, .. } => panic!("client closed: {reason}"),
            _ => {}
        }
    }

    /// Reads events until the held state is `want`.
    async fn until(&mut self, c: &mut Client, want: &BTreeMap<u64, (String, bool)>) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while &self.posts != want {
            let ev = tokio::time::timeout_at(deadline, c.next_event())
                .await
                .unwrap_or_else(|_| {
                    let missing: Vec<_> = want
                        .iter()
                        .filter(|(s, p)| self.posts.get(s) != Some(p))
                        .map(|(s, _)| *s)
                        .take(20)
                        .collect();
                    panic!(
                        "timed out with {} of {} posts; differing: {missing:?}",
                        self.posts.len(),
                        want.len()
                    )
                })
                .expect("client still open");
            self.apply(ev);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_post_once_in_order_through_a_lossy_reordering_path() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.api.create_channel("dg", "").await.unwrap();
    let relay = relay(
        server.quic,
        Loss {
            every: 5,
            burst: (150, 160),
            swap_every: 13,
        },
    )
    .await;
    let mut c = client_via(&server, &relay, "f").await;
    c.follow("dg").await.unwrap();

    // Posts, with edits and deletes of recent ones in between; `want` is
    // the server's final state.
    const POSTS: u64 = 400;
    let pad = "x".repeat(100);
    let mut want = BTreeMap::new();
    for seq in 1..=POSTS {
        let text = format!("p{seq} {pad}");
        let p = server.api.publish("dg", &text).await.unwrap();
        assert_eq!(p.seq, seq);
        want.insert(seq, (text, false));
        if seq % 10 == 0 {
            let t = format!("p{} edited", seq - 3);
            edit(&server, "dg", seq - 3, &t).await;
            want.insert(seq - 3, (t, false));
        }
        if seq % 25 == 0 {
            delete(&server, "dg", seq - 1).await;
            want.insert(seq - 1, (String::new(), true));
        }
    }
    let mut held = Held::default();
    held.until(&mut c, &want).await;
    assert_gapless(&held.order, 1, POSTS);

    let stats = c.stats();
    let dg = stats.get(&stats.datagram_posts);
    assert!(dg > POSTS / 2, "live posts came as datagrams: {dg}");
    assert!(relay.dropped.load(Ordering::Relaxed) > 0);
    assert!(
        stats.get(&stats.resends) > 0,
        "lost datagrams were asked for"
    );
    assert_eq!(stats.get(&stats.gaps), 0);
    assert_eq!(stats.get(&stats.datagrams_malformed), 0);
    assert_eq!(stats.get(&stats.reconnects), 0);
    assert_eq!(stats.get(&stats.posts), POSTS);
    c.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_last_datagram_is_repaired_through_head() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.api.create_channel("tail", "").await.unwrap();
    let relay = relay(server.quic, CLEAN).await;
    let mut c = client_via(&server, &relay, "f").await;
    c.follow("tail").await.unwrap();
    let big = "y".repeat(600);

    let mut want = BTreeMap::new();
    for seq in 1..=20u64 {
        let text = format!("p{seq} {big}");
        server.api.publish("tail", &text).await.unwrap();
        want.insert(seq, (text, false));
    }
    let mut held = Held::default();
    held.until(&mut c, &want).await;
    assert!(c.stats().get(&c.stats().datagram_posts) > 0);
    let resends = c.stats().get(&c.stats().resends);

    // The last three posts of a burst are lost, and nothing follows them:
    // only the server's Head (about a second later) reveals them.
    relay.drop_large.store(3, Ordering::Relaxed);
    for seq in 21..=23u64 {
        let text = format!("p{seq} {big}");
        server.api.publish("tail", &text).await.unwrap();
        want.insert(seq, (text, false));
    }
    held.until(&mut c, &want).await;
    assert_gapless(&held.order, 1, 23);
    assert!(relay.dropped.load(Ordering::Relaxed) > 0);
    let stats = c.stats();
    assert!(
        stats.get(&stats.resends) > resends,
        "the tail was asked for after the Head"
    );
    c.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_with_datagrams_gets_every_post_once_in_order() {
    // The application stops reading while 3 MiB of posts go out: the
    // client's datagram buffer overflows (quinn drops the oldest), and what
    // was lost is asked for again once it reads.
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.api.create_channel("st", "").await.unwrap();
    let mut c = tokio::time::timeout(
        WAIT,
        Client::connect(ClientOptions {
            event_buffer: 16,
            ..server.options("stalled")
        }),
    )
    .await
    .unwrap()
    .unwrap();
    c.follow("st").await.unwrap();
    const POSTS: usize = 3000;
    server
        .publish_numbered("st", POSTS, &"z".repeat(1000))
        .await;
    let got = collect_posts(&mut c, &BTreeMap::from([("st".to_string(), POSTS)])).await;
    let seqs: Vec<u64> = got["st"].iter().map(|(s, _)| *s).collect();
    assert_gapless(&seqs, 1, POSTS as u64);
    let stats = c.stats();
    assert!(stats.get(&stats.datagram_posts) > 0);
    assert_eq!(stats.get(&stats.posts), POSTS as u64);
    c.close().await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_live_datagrams_everything_comes_on_the_stream() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(dir.path()).await;
    server.api.create_channel("s", "").await.unwrap();
    let mut plain = tokio::time::timeout(
        WAIT,
        Client::connect(ClientOptions {
            live_datagrams: false,
            ..server.options("plain")
        }),
    )
    .await
    .unwrap()
    .unwrap();
    // The same server grants datagrams to a client that asks.
    let mut asking = server.client("asking").await;
    plain.follow("s").await.unwrap();
    asking.follow("s").await.unwrap();
    const POSTS: u64 = 100;
    for i in 1..=POSTS {
        server.api.publish("s", &format!("p{i}")).await.unwrap();
    }
    let want = BTreeMap::from([("s".to_string(), POSTS as usize)]);
    for c in [&mut plain, &mut asking] {
        let got = collect_posts(c, &want).await;
        let seqs: Vec<u64> = got["s"].iter().map(|(s, _)| *s).collect();
        assert_gapless(&seqs, 1, POSTS);
    }
    let p = plain.stats();
    assert_eq!(p.get(&p.datagram_posts), 0);
    assert_eq!(p.get(&p.resends), 0);
    assert_eq!(p.get(&p.posts), POSTS);
    let a = asking.stats();
    assert!(
        a.get(&a.datagram_posts) > 0,
        "the asking client got datagrams"
    );
    plain.close().await;
    asking.close().await;
    server.stop().await;
}

#[test]
fn the_relay_tells_short_headers() {
    assert!(short_header(&[0x40, 1, 2]));
    assert!(!short_header(&[0xc0, 1, 2]));
    assert!(!short_header(&[]));
}
