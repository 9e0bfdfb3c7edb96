//! The transport driven over real UDP on 127.0.0.1, TLS 1.3, with stock
//! quinn clients (as followers use): every frame in order to many
//! connections with batched sends, a stalled follower filling only its own
//! queue, control bytes both ways, close codes both ways, a vanished peer
//! timed out, admission limits, and stateless Retry with two loops on one
//! port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::AsyncReadExt;

use super::*;

const ALPN: &[u8] = b"herald/1";
const FRAME: usize = 64;
/// Any single wait; a hang fails the test.
const WAIT: Duration = Duration::from_secs(20);

struct Cert {
    der: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

fn cert() -> Cert {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    Cert {
        der: ck.cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der()),
    }
}

fn server(tweak: impl FnOnce(&mut TransportConfig), idle: Duration) -> (Transport, Cert) {
    server_with(tweak, |_| {}, idle)
}

fn server_with(
    tweak: impl FnOnce(&mut TransportConfig),
    quic: impl FnOnce(&mut quinn_proto::TransportConfig),
    idle: Duration,
) -> (Transport, Cert) {
    let c = cert();
    let mut tls = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![c.der.clone()], PrivateKeyDer::Pkcs8(c.key.clone_key()))
        .unwrap();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn_proto::crypto::rustls::QuicServerConfig::try_from(tls).unwrap();
    let mut sc = quinn_proto::ServerConfig::with_crypto(Arc::new(crypto));
    let mut t = quinn_proto::TransportConfig::default();
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.max_idle_timeout(Some(idle.try_into().unwrap()));
    quic(&mut t);
    sc.transport_config(Arc::new(t));
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut cfg = TransportConfig::new(sc, quinn_proto::EndpointConfig::default(), addr);
    tweak(&mut cfg);
    let sock = socket::bind(addr, cfg.loops > 1, 1 << 20).unwrap();
    (Transport::start(cfg, sock).unwrap(), c)
}

fn client(c: &Cert, tweak: impl FnOnce(&mut quinn::TransportConfig)) -> quinn::Endpoint {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(client_config(c, tweak));
    ep
}

fn client_config(c: &Cert, tweak: impl FnOnce(&mut quinn::TransportConfig)) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(c.der.clone()).unwrap();
    let mut tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_uni_streams(4u32.into());
    t.max_concurrent_bidi_streams(0u32.into());
    tweak(&mut t);
    cc.transport_config(Arc::new(t));
    cc
}

/// Connects, opens the control stream and sends a hello byte.
async fn follow(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
) -> (quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let conn = ep.connect(addr, "localhost").unwrap().await.unwrap();
    let (mut s, r) = conn.open_bi().await.unwrap();
    s.write_all(b"H").await.unwrap();
    (conn, s, r)
}

/// Accepts `n` connections, reads each hello byte, answers "ok".
async fn accept_n(tr: &mut Transport, n: usize) -> Vec<Connection> {
    let mut v = Vec::new();
    while v.len() < n {
        let c = tokio::time::timeout(WAIT, tr.accept())
            .await
            .expect("accept in time")
            .expect("transport open");
        tokio::time::timeout(WAIT, c.control_opened())
            .await
            .unwrap()
            .unwrap();
        let mut hello = [0u8; 1];
        tokio::time::timeout(WAIT, c.control_reader().read_exact(&mut hello))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&hello, b"H");
        c.send_control(Bytes::from_static(b"ok")).await.unwrap();
        v.push(c);
    }
    v
}

fn frame(seq: u64) -> Bytes {
    let mut v = vec![(seq % 251) as u8; FRAME];
    v[..8].copy_from_slice(&seq.to_le_bytes());
    Bytes::from(v)
}

async fn read_frames(mut uni: quinn::RecvStream, posts: u64) -> Result<(), String> {
    let mut buf = [0u8; FRAME];
    for expect in 0..posts {
        uni.read_exact(&mut buf)
            .await
            .map_err(|e| format!("read {expect}: {e}"))?;
        if buf[..] != frame(expect)[..] {
            return Err(format!("frame {expect} differs"));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connections_receive_every_frame_in_order_in_batched_sends() {
    const N: usize = 32;
    const POSTS: u64 = 300;
    let (mut tr, c) = server(|_| {}, WAIT);
    let addr = tr.local_addr();
    let ep = client(&c, |_| {});
    let mut clients = Vec::new();
    for _ in 0..N {
        let ep = ep.clone();
        clients.push(tokio::spawn(async move {
            let (conn, _s, mut r) = follow(&ep, addr).await;
            let mut ok = [0u8; 2];
            r.read_exact(&mut ok).await.map_err(|e| e.to_string())?;
            assert_eq!(&ok, b"ok");
            let uni = conn.accept_uni().await.map_err(|e| e.to_string())?;
            read_frames(uni, POSTS).await?;
            Ok::<_, String>(conn)
        }));
    }
    let conns = accept_n(&mut tr, N).await;
    let mut feeds: Vec<_> = conns.iter().map(|c| c.feed()).collect();
    for seq in 0..POSTS {
        for f in feeds.iter_mut() {
            f.write_all(&mut [frame(seq)]).await.unwrap();
        }
    }
    for c in clients {
        let r = tokio::time::timeout(WAIT, c).await.unwrap().unwrap();
        r.expect("every frame, in order");
    }
    let st = tr.stats();
    assert!(st[0].tx_syscalls < st[0].tx_datagrams, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_follower_fills_only_its_own_queue() {
    const N: usize = 6;
    const POSTS: u64 = 4000; // 256 KB per follower, far beyond the stalled one's window
    let cap = 16 * 1024;
    let (mut tr, c) = server(|c| c.feed_queue_bytes = cap, WAIT);
    let addr = tr.local_addr();
    let ep = client(&c, |t| {
        t.stream_receive_window((16u32 * 1024).into());
        t.receive_window((32u32 * 1024).into());
    });
    // The first follower never reads its feed.
    let stalled = follow(&ep, addr).await;
    let mut healthy = Vec::new();
    for _ in 1..N {
        let ep = ep.clone();
        healthy.push(tokio::spawn(async move {
            let (conn, _s, _r) = follow(&ep, addr).await;
            let uni = conn.accept_uni().await.map_err(|e| e.to_string())?;
            read_frames(uni, POSTS).await?;
            Ok::<_, String>(conn)
        }));
    }
    let conns = accept_n(&mut tr, N).await;
    // One writer per connection, as each session has: the stalled one's
    // writer waits for room, the others go on.
    let mut writers = Vec::new();
    for (i, conn) in conns.iter().enumerate() {
        let mut feed = conn.feed();
        writers.push(tokio::spawn(async move {
            for seq in 0..POSTS {
                if feed.write_all(&mut [frame(seq)]).await.is_err() {
                    return (i, seq);
                }
            }
            (i, POSTS)
        }));
    }
    for h in healthy {
        tokio::time::timeout(WAIT, h)
            .await
            .expect("healthy followers in time")
            .unwrap()
            .expect("every frame in order");
    }
    let stalled_feed = conns[0].feed();
    assert!(stalled_feed.queued_bytes() <= cap);
    assert!(stalled_feed.queued_bytes() > 0);
    assert!(
        !writers[0].is_finished(),
        "the stalled writer waits for room"
    );
    drop(stalled);
    for w in writers.drain(1..) {
        assert_eq!(w.await.unwrap().1, POSTS);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_bytes_flow_both_ways_and_inbound_is_bounded() {
    let (mut tr, c) = server(|c| c.control_in_bytes = 1024, WAIT);
    let addr = tr.local_addr();
    let ep = client(&c, |_| {});
    let (conn, mut s, mut r) = follow(&ep, addr).await;
    let server_conns = accept_n(&mut tr, 1).await;
    let sc = &server_conns[0];
    let mut ok = [0u8; 2];
    r.read_exact(&mut ok).await.unwrap();
    // 64 KiB through a 1 KiB inbound queue: the reader gets every byte in
    // order while the loop pauses and resumes reading.
    let data: Vec<u8> = (0..65536u32).map(|i| (i % 253) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        s.write_all(&sent).await.unwrap();
        s.finish().unwrap();
        s
    });
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, sc.control_reader().read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, data, "every byte, in order, then end of stream");
    let _s = writer.await.unwrap();
    // Replies larger than the outbound bound still go out, in order.
    for i in 0..40u8 {
        sc.send_control(Bytes::from(vec![i; 4000])).await.unwrap();
    }
    let mut back = vec![0u8; 40 * 4000];
    tokio::time::timeout(WAIT, r.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    for (i, chunk) in back.chunks(4000).enumerate() {
        assert!(chunk.iter().all(|&b| b == i as u8));
    }
    drop(conn);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_codes_arrive_both_ways() {
    let (mut tr, c) = server(|_| {}, WAIT);
    let addr = tr.local_addr();
    let ep = client(&c, |_| {});
    let a = follow(&ep, addr).await;
    let b = follow(&ep, addr).await;
    let conns = accept_n(&mut tr, 2).await;
    conns[0].close(VarInt::from_u32(42), b"bye now");
    match tokio::time::timeout(WAIT, a.0.closed()).await.unwrap() {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, VarInt::from_u32(42));
            assert_eq!(&c.reason[..], b"bye now");
        }
        e => panic!("unexpected {e:?}"),
    }
    assert_eq!(
        conns[0].close_reason(),
        Some(CloseReason::Local {
            code: VarInt::from_u32(42),
            reason: Bytes::from_static(b"bye now")
        })
    );
    assert!(conns[0].feed().write_all(&mut [frame(0)]).await.is_err());
    assert!(conns[0]
        .send_control(Bytes::from_static(b"x"))
        .await
        .is_err());
    // The client closes: the server sees its code, and the control reader
    // fails (not a clean end of stream).
    b.0.close(VarInt::from_u32(7), b"leaving");
    match tokio::time::timeout(WAIT, conns[1].closed()).await.unwrap() {
        CloseReason::Lost(ConnectionError::ApplicationClosed(c)) => {
            assert_eq!(c.error_code, VarInt::from_u32(7));
            assert_eq!(&c.reason[..], b"leaving");
        }
        e => panic!("unexpected {e:?}"),
    }
    let mut rest = Vec::new();
    assert!(conns[1]
        .control_reader()
        .read_to_end(&mut rest)
        .await
        .is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_peer_is_timed_out() {
    let (mut tr, c) = server(|_| {}, Duration::from_millis(800));
    let addr = tr.local_addr();
    // The client lives in its own runtime; shutting it down ends its tasks
    // without CONNECTION_CLOSE, as a follower that loses power would.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ep = {
        let _in_rt = rt.enter();
        client(&c, |t| {
            t.keep_alive_interval(None);
        })
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    rt.spawn(async move {
        let c = follow(&ep, addr).await;
        let _ = tx.send(());
        let _keep = (ep, c);
        std::future::pending::<()>().await;
    });
    let conns = accept_n(&mut tr, 1).await;
    rx.await.unwrap();
    rt.shutdown_background();
    let t0 = std::time::Instant::now();
    let why = tokio::time::timeout(WAIT, conns[0].closed()).await.unwrap();
    assert_eq!(why, CloseReason::Lost(ConnectionError::TimedOut));
    assert!(
        t0.elapsed() >= Duration::from_millis(400),
        "{:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_are_refused_and_handshakes_wait_their_turn() {
    let (mut tr, c) = server(
        |c| {
            c.max_connections = 3;
            c.handshakes.max_in_progress = 1;
        },
        WAIT,
    );
    let addr = tr.local_addr();
    let ep = client(&c, |_| {});
    // Three at once through one handshake slot: all get in, in turn.
    let mut joins = Vec::new();
    for _ in 0..3 {
        let ep = ep.clone();
        joins.push(tokio::spawn(async move { follow(&ep, addr).await }));
    }
    let conns = accept_n(&mut tr, 3).await;
    let mut kept = Vec::new();
    for j in joins {
        kept.push(tokio::time::timeout(WAIT, j).await.unwrap().unwrap());
    }
    // A fourth is refused.
    let refused = tokio::time::timeout(WAIT, ep.connect(addr, "localhost").unwrap())
        .await
        .unwrap();
    assert!(
        matches!(refused, Err(quinn::ConnectionError::ConnectionClosed(_))),
        "{refused:?}"
    );
    drop((conns, kept));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_behind_one_address_over_its_limit_wait_their_turn() {
    // One handshake per address and state (unvalidated, validated): of
    // eight followers from 127.0.0.1 at once, all but the first are asked to
    // validate, and the validated ones beyond the first wait for it (they
    // were refused before).
    let (mut tr, c) = server(|c| c.handshakes.per_address = 1, WAIT);
    let addr = tr.local_addr();
    let ep = client(&c, |_| {});
    let joins: Vec<_> = (0..8)
        .map(|_| {
            let ep = ep.clone();
            tokio::spawn(async move { follow(&ep, addr).await })
        })
        .collect();
    let conns = accept_n(&mut tr, 8).await;
    let mut kept = Vec::new();
    for j in joins {
        kept.push(tokio::time::timeout(WAIT, j).await.unwrap().unwrap());
    }
    drop((conns, kept));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_never_finished_is_dropped_at_the_timeout_and_frees_its_slot() {
    // One handshake slot, a short handshake timeout, a long idle timeout.
    let (mut tr, c) = server(
        |c| {
            c.handshakes.max_in_progress = 1;
            c.handshakes.timeout = Duration::from_millis(300);
        },
        Duration::from_secs(120),
    );
    let addr = tr.local_addr();
    // A genuine Initial from a socket that never reads its answers takes
    // the only slot.
    let mut raw = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let now = std::time::Instant::now();
    let (_, mut stuck) = raw
        .connect(now, client_config(&c, |_| {}), addr, "localhost")
        .unwrap();
    let mut initial = Vec::new();
    let t = stuck.poll_transmit(now, 1, &mut initial).unwrap();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.send_to(&initial[..t.size], addr).unwrap();
    // A real follower gets in once the stuck handshake times out; without
    // the timeout it would wait for the 120 s idle timeout, far past this
    // bound.
    let ep = client(&c, |_| {});
    let joined = tokio::spawn(async move { follow(&ep, addr).await });
    let conns = accept_n(&mut tr, 1).await;
    let kept = tokio::time::timeout(Duration::from_secs(10), joined)
        .await
        .expect("the follower got the slot of the timed-out handshake")
        .unwrap();
    drop((conns, kept, sock));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateless_retry_and_two_loops_on_one_port() {
    let (mut tr, c) = server(
        |c| {
            c.handshakes.retry_above = 0;
            c.loops = 2;
        },
        WAIT,
    );
    let addr = tr.local_addr();
    let mut clients = Vec::new();
    for _ in 0..12 {
        // One endpoint (source port) per client so SO_REUSEPORT spreads them.
        let ep = client(&c, |_| {});
        clients.push(tokio::spawn(async move {
            let (conn, _s, _r) = follow(&ep, addr).await;
            let uni = conn.accept_uni().await.map_err(|e| e.to_string())?;
            read_frames(uni, 10).await?;
            Ok::<_, String>((ep, conn))
        }));
    }
    let conns = accept_n(&mut tr, 12).await;
    for seq in 0..10 {
        for c in &conns {
            c.feed().write_all(&mut [frame(seq)]).await.unwrap();
        }
    }
    for c in clients {
        tokio::time::timeout(WAIT, c)
            .await
            .unwrap()
            .unwrap()
            .expect("frames");
    }
    let st = tr.stats();
    assert_eq!(st.len(), 2);
    assert_eq!(st[0].connections + st[1].connections, 12, "{st:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_cut_short_by_the_send_window_resumes_when_acks_free_it() {
    // A 16 KiB send window: every large write is cut short by it (a partial
    // write, not a refusal), and must go on once ACKs free the window.
    const POSTS: u64 = 8000; // 512 KB
    let (mut tr, c) = server_with(
        |c| c.feed_queue_bytes = 64 * 1024,
        |t| {
            t.send_window(16 * 1024);
        },
        WAIT,
    );
    let addr = tr.local_addr();
    let ep = client(&c, |_| {});
    let reader = {
        let ep = ep.clone();
        tokio::spawn(async move {
            let (conn, _s, _r) = follow(&ep, addr).await;
            let uni = conn.accept_uni().await.map_err(|e| e.to_string())?;
            read_frames(uni, POSTS).await?;
            Ok::<_, String>(conn)
        })
    };
    let conns = accept_n(&mut tr, 1).await;
    let mut feed = conns[0].feed();
    let mut batch: Vec<Bytes> = Vec::new();
    for seq in 0..POSTS {
        batch.push(frame(seq));
        if batch.len() == 500 {
            tokio::time::timeout(WAIT, feed.write_all(&mut batch))
                .await
                .expect("the writer gets room again")
                .unwrap();
            batch.clear();
        }
    }
    tokio::time::timeout(WAIT, reader)
        .await
        .expect("every frame arrives")
        .unwrap()
        .expect("in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_loops_a_follower_that_changes_address_keeps_its_connection() {
    // NAT rebinding: the follower's packets come from a new port. With two
    // loops the kernel's address hash would often pick the other loop, which
    // does not know the connection; steering by connection ID must not.
    let (mut tr, c) = server(|c| c.loops = 2, WAIT);
    let addr = tr.local_addr();
    let ep = client(&c, |t| {
        t.keep_alive_interval(Some(Duration::from_millis(50)));
    });
    let (conn, _s, _r) = follow(&ep, addr).await;
    let conns = accept_n(&mut tr, 1).await;
    let mut feed = conns[0].feed();
    let mut uni = None;
    let mut seq = 0;
    for round in 0..8 {
        for _ in 0..20 {
            feed.write_all(&mut [frame(seq)]).await.unwrap();
            seq += 1;
        }
        if uni.is_none() {
            uni = Some(conn.accept_uni().await.unwrap());
        }
        let Some(u) = uni.as_mut() else {
            unreachable!()
        };
        let mut buf = [0u8; FRAME];
        for expect in (seq - 20)..seq {
            tokio::time::timeout(WAIT, u.read_exact(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("round {round}: frame {expect} in time"))
                .unwrap_or_else(|e| panic!("round {round}: frame {expect}: {e}"));
            assert_eq!(buf[..], frame(expect)[..]);
        }
        // A new source port for everything the follower sends from now on.
        ep.rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
            .unwrap();
    }
    assert!(
        conns[0].close_reason().is_none(),
        "{:?}",
        conns[0].close_reason()
    );
}
