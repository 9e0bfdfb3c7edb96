//! The [`Transport`]: binds the socket(s), starts one event-loop thread per
//! socket, hands established connections to the application, and shuts the
//! loops down.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::Bytes;
use quinn_proto::VarInt;
use tokio::sync::mpsc;

use super::connection::{Connection, GOING_AWAY};
use super::event_loop::{Global, Loop};
use super::wake::{lock, LoopShared};
use super::TransportConfig;

/// Counters of one event loop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoopStats {
    /// Turns of the loop so far.
    pub turns: u64,
    /// UDP datagrams received.
    pub datagrams_in: u64,
    /// `sendmmsg` (and fallback `sendto`) calls.
    pub tx_syscalls: u64,
    /// Messages sent (a GSO message carries several datagrams).
    pub tx_messages: u64,
    /// Datagrams sent.
    pub tx_datagrams: u64,
    /// Datagrams the kernel refused for good (QUIC retransmits them).
    pub tx_dropped: u64,
    /// Connections held now.
    pub connections: u64,
}

/// A bound transport: `loops` event-loop threads on one UDP port.
pub struct Transport {
    local_addr: SocketAddr,
    loops: Vec<Arc<LoopShared>>,
    threads: Vec<JoinHandle<()>>,
    accept_rx: mpsc::Receiver<Connection>,
}

impl Transport {
    /// Starts the loops on `socket` (bound with [`socket::bind`](super::socket::bind),
    /// with `reuse_port` when `cfg.loops > 1`; further loops bind the same
    /// port). Needs no runtime; [`Transport::accept`] is async.
    pub fn start(cfg: TransportConfig, socket: UdpSocket) -> std::io::Result<Transport> {
        let loops_n = cfg.loops.clamp(1, super::steering::MAX_LOOPS);
        let (accept_tx, accept_rx) = mpsc::channel(cfg.accept_backlog.max(1));
        let local_addr = socket.local_addr()?;
        socket.set_nonblocking(true)?;
        let mut sockets = vec![socket];
        for _ in 1..loops_n {
            sockets.push(super::socket::bind(local_addr, true, cfg.udp_buffer_bytes)?);
        }
        if loops_n > 1 {
            use std::os::fd::AsRawFd;
            super::steering::attach(sockets[0].as_raw_fd(), loops_n)?;
        }
        let cfg = Arc::new(cfg);
        let global = Arc::new(Global::new(cfg.handshakes));
        let mut transport = Transport {
            local_addr,
            loops: Vec::new(),
            threads: Vec::new(),
            accept_rx,
        };
        for (i, sock) in sockets.into_iter().enumerate() {
            let shared = Arc::new(LoopShared::new()?);
            let endpoint = if loops_n > 1 {
                // This loop's connection IDs steer packets to it.
                let mut e = (*cfg.endpoint).clone();
                let key = cfg.cid_key;
                e.cid_generator(move || Box::new(super::cids::KeyedCids::new(key, i, loops_n)));
                Arc::new(e)
            } else {
                cfg.endpoint.clone()
            };
            let lp = Loop::new(
                cfg.clone(),
                i,
                endpoint,
                sock,
                shared.clone(),
                global.clone(),
                accept_tx.clone(),
            )?;
            let t = std::thread::Builder::new()
                .name(format!("herald-quic-{i}"))
                .spawn(move || lp.run())?;
            // Pushed as they start, so an error below still stops the
            // loops already running (Drop).
            transport.loops.push(shared);
            transport.threads.push(t);
        }
        Ok(transport)
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The next established connection (handshake done); `None` once every
    /// loop has stopped.
    pub async fn accept(&mut self) -> Option<Connection> {
        self.accept_rx.recv().await
    }

    /// The loops' counters.
    pub fn stats(&self) -> Vec<LoopStats> {
        self.loops
            .iter()
            .map(|l| {
                let s = &l.stats;
                LoopStats {
                    turns: s.turns.load(Ordering::Relaxed),
                    datagrams_in: s.datagrams_in.load(Ordering::Relaxed),
                    tx_syscalls: s.tx_syscalls.load(Ordering::Relaxed),
                    tx_messages: s.tx_messages.load(Ordering::Relaxed),
                    tx_datagrams: s.tx_datagrams.load(Ordering::Relaxed),
                    tx_dropped: s.tx_dropped.load(Ordering::Relaxed),
                    connections: s.connections.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Closes every connection with `code` and `reason` and refuses new
    /// ones; each loop exits once its connections are drained (or after two
    /// seconds). Idempotent: the first call's code wins.
    pub fn shutdown(&self, code: VarInt, reason: &[u8]) {
        for l in &self.loops {
            {
                let mut g = lock(&l.shutdown);
                if g.is_none() {
                    *g = Some((code, Bytes::copy_from_slice(reason)));
                }
            }
            l.force_wake();
        }
    }

    /// Shuts down (if not yet) and waits for the loop threads to exit
    /// (blocking: call it off the async runtime). The socket is closed when
    /// this returns.
    pub fn join(mut self) {
        self.shutdown(GOING_AWAY, b"shutdown");
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a QUIC event loop panicked");
            }
        }
    }
}

impl Drop for Transport {
    fn drop(&mut self) {
        self.shutdown(GOING_AWAY, b"shutdown");
    }
}
