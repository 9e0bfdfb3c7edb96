//! The `loop` follower engine: followers driven by a few OS threads, each an
//! event loop over one UDP socket, one client-mode [`quinn_proto::Endpoint`]
//! and all of its [`quinn_proto::Connection`]s, speaking the follower side
//! of Herald's protocol itself.
//!
//! # Why
//!
//! The `client` engine runs one `herald_client::Client` per follower on a
//! shared `quinn::Endpoint`: every delivered packet wakes the endpoint
//! driver, the connection's task, the client's driver and the follower's
//! task, about 30 µs of the load generator's CPU per delivery on the same
//! two cores as the server. Here a fan-out round costs each loop one
//! wake-up: datagrams come in with `recvmmsg` and GRO (quinn-udp), frames
//! are decoded and tallied in place, and ACKs leave with `sendmmsg` (GSO
//! when one connection has several packets). The shape is the server's own
//! transport (`server/src/transport/`), on the client side.
//!
//! # Threads
//!
//! `min(--endpoints, available cores)` threads, each owning
//! `--endpoints / threads` sockets (lanes: a socket, its endpoint and its
//! connections), one `poll(2)` over all of them and one timer heap;
//! follower `i` connects through socket `i % endpoints`, as with the
//! `client` engine. Not one thread per socket: the load generator shares
//! its cores with the server, and a loop's cost is per wake-up, so more
//! loops than cores only split each fan-out round into more, smaller
//! wake-ups and add context switches. Measured on two cores with 5,000
//! followers: four loops of one socket cost 19.3 µs of load-generator CPU
//! per delivery (latency p50 57 ms), two 14.3 µs (p50 35 ms). Sockets
//! stay as many as asked, each with its own kernel buffer.
//!
//! # What it keeps of the `client` engine
//!
//! The same [`Shared`] accounting, [`FollowerResult`]s and verification,
//! the same latency measure (arrival taken when the post's frame is
//! decoded), `--connect-rate` (follower `i` starts no earlier than
//! `i / rate` after the connect phase began) and `--connect-concurrency`
//! (split between the loops: loop `l` keeps its share of handshakes in
//! flight, from the connect until its follows are answered), each attempt
//! bounded by the run's connect timeout. What it does not do: reconnect.
//! A follower whose connection fails while connecting is reported failed
//! with the reason; one whose connection ends later is reported closed
//! early; the others go on. Promoted frames are counted
//! (`Shared::promoted`); Hello asks for no receipts.
//!
//! # Live datagrams
//!
//! Hello asks for them unless `--no-live-datagrams` (docs/protocol.md
//! §8.5): the connections allow QUIC datagrams ([`client_config`]), live
//! posts that come as datagrams and everything on the feed stream go
//! through the reference client's ordering module
//! (`herald_client::ordering`) per channel, gaps are asked for with
//! `Resend` (retried on the loop's timer heap), and only the posts it
//! releases in order are tallied, so verification stays exact. Each
//! follower reports how many posts came by datagram and by stream, and the
//! resends it sent. `--drop-datagrams-every N` (a test knob) drops every
//! Nth live-post datagram a follower receives, to exercise the repair.
//!
//! | file | job |
//! | --- | --- |
//! | `mod` | [`Engine`]: starts the loops, stops them, collects results |
//! | `event_loop` | one loop: receive, timers, connects, drive, transmit, wait |
//! | `session` | one follower's protocol: Hello, Follow, control and feed frames |
//! | `feed` | one follower's posts: ordering (stream and datagrams), tally, resends |
//! | `frames` | a bounded, non-async frame decoder; a live datagram's decoder |
//! | `quic` | the connections' QUIC client configuration |
//! | `wake` | the eventfd that wakes a loop to stop |
//!
//! The timer heap and the `sendmmsg` batch are the server transport's own
//! ([`herald_server::transport::timers`], [`herald_server::transport::tx_batch`]):
//! every datagram leaves as its own message (no GSO across connections), as
//! real followers' ACKs reach a server one by one.

mod event_loop;
mod feed;
mod frames;
mod quic;
mod session;
mod wake;

pub use quic::{client_config, DATAGRAM_BUFFER};

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::follower::{FollowerResult, Shared};

/// A follower as the engine runs it.
#[derive(Debug, Clone)]
pub struct FollowerPlan {
    /// Its number in the run (results come back in this order).
    pub index: usize,
    /// Its token, for Hello.
    pub token: String,
    /// Channels to follow, by name.
    pub channels: Vec<String>,
    /// The server it connects to.
    pub server: SocketAddr,
}

/// How the engine connects.
#[derive(Clone)]
pub struct EngineConfig {
    /// QUIC and TLS settings: [`client_config`].
    pub client: quinn_proto::ClientConfig,
    /// Hello asks for live datagrams (docs/protocol.md §8.5); `client`
    /// must then allow datagrams ([`client_config`] with `true`).
    pub live_datagrams: bool,
    /// Test knob: each follower drops every Nth live-post datagram it
    /// receives before looking at it (0: none).
    pub drop_datagrams_every: u32,
    /// TLS server name.
    pub server_name: String,
    /// Sent in Hello.
    pub client_name: String,
    /// Sockets (`--endpoints`), spread over at most one loop (thread) per
    /// core.
    pub sockets: usize,
    /// Receive and send buffer of each socket.
    pub buffer_bytes: usize,
    /// New connections per second over all loops (0: no pacing).
    pub connect_rate: u32,
    /// Handshakes in flight over all loops (each loop gets its share, at
    /// least one).
    pub connect_concurrency: usize,
    /// Longest one follower may take from its connect to its last Followed.
    pub connect_timeout: Duration,
    /// Largest feed frame accepted.
    pub max_feed_frame: usize,
    /// When the connect phase began (the origin of the connect pacing).
    pub started: Instant,
}

/// The engine could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid engine setting: {0}")]
    Config(&'static str),
    #[error("cannot open a loop's socket: {0}")]
    Socket(std::io::Error),
    #[error("cannot start a loop thread: {0}")]
    Thread(std::io::Error),
}

/// What a loop and the engine share: the stop request.
pub(crate) struct Control {
    stop: AtomicBool,
    waker: wake::Waker,
}

impl Control {
    fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.waker.wake();
    }
}

/// Asks its loop to stop when dropped: an engine dropped without
/// [`Engine::stop`] (an error after start, or a start that failed part-way)
/// leaves no loop running with its connections and keep-alives.
struct StopOnDrop(Arc<Control>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.request_stop();
    }
}

struct LoopHandle {
    control: StopOnDrop,
    indices: Vec<usize>,
    done: oneshot::Receiver<Vec<(usize, FollowerResult)>>,
    thread: std::thread::JoinHandle<()>,
}

/// Running follower loops.
pub struct Engine {
    loops: Vec<LoopHandle>,
    followers: usize,
}

impl Engine {
    /// Opens the sockets and starts the loops; followers connect at once,
    /// paced as configured, and report to `shared`.
    pub fn start(
        cfg: EngineConfig,
        followers: Vec<FollowerPlan>,
        shared: Arc<Shared>,
    ) -> Result<Engine, EngineError> {
        if cfg.sockets == 0 {
            return Err(EngineError::Config("sockets must be at least 1"));
        }
        if cfg.connect_concurrency == 0 {
            return Err(EngineError::Config(
                "connect concurrency must be at least 1",
            ));
        }
        let total = followers.len();
        let sockets = cfg.sockets.min(total.max(1));
        // One loop per core at most: more loops than cores only add
        // wake-ups and context switches (see the module docs).
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = sockets.min(cores);
        // Follower `k` connects through socket `k % sockets`, which is lane
        // `s / n` of loop `s % n`.
        let mut per_loop: Vec<Vec<(usize, FollowerPlan)>> = (0..n).map(|_| Vec::new()).collect();
        for (k, f) in followers.into_iter().enumerate() {
            let s = k % sockets;
            per_loop[s % n].push((s / n, f));
        }
        let mut loops = Vec::with_capacity(n);
        for (l, plans) in per_loop.into_iter().enumerate() {
            let bind = match plans.first().map(|p| p.1.server) {
                Some(SocketAddr::V6(_)) => SocketAddr::from(([0u16; 8], 0)),
                _ => SocketAddr::from(([0u8; 4], 0)),
            };
            let lanes = (l..sockets).step_by(n).count();
            let socks = (0..lanes)
                .map(|_| {
                    let sock = UdpSocket::bind(bind)?;
                    crate::endpoints::set_buffers(&sock, cfg.buffer_bytes);
                    sock.set_nonblocking(true)?;
                    Ok(sock)
                })
                .collect::<std::io::Result<Vec<_>>>()
                .map_err(EngineError::Socket)?;
            let control = Arc::new(Control {
                stop: AtomicBool::new(false),
                waker: wake::Waker::new().map_err(EngineError::Socket)?,
            });
            // Loop `l`'s share of the handshakes in flight.
            let share = cfg.connect_concurrency / n + usize::from(l < cfg.connect_concurrency % n);
            let indices = plans.iter().map(|p| p.1.index).collect();
            let lp = event_loop::Loop::new(
                &cfg,
                share.max(1),
                socks,
                plans,
                shared.clone(),
                control.clone(),
            )
            .map_err(EngineError::Socket)?;
            let (tx, done) = oneshot::channel();
            let thread = std::thread::Builder::new()
                .name(format!("lg-loop-{l}"))
                .spawn(move || {
                    let _ = tx.send(lp.run());
                })
                .map_err(EngineError::Thread)?;
            loops.push(LoopHandle {
                control: StopOnDrop(control),
                indices,
                done,
                thread,
            });
        }
        Ok(Engine {
            loops,
            followers: total,
        })
    }

    /// Tells every loop to close its connections and end, waits up to
    /// `grace` for them, joins their threads and returns the followers'
    /// results in follower order (one that a loop did not hand back in time
    /// is reported as such).
    pub async fn stop(self, grace: Duration) -> Vec<FollowerResult> {
        for l in &self.loops {
            l.control.0.request_stop();
        }
        let deadline = tokio::time::Instant::now() + grace;
        let mut slots: Vec<Option<FollowerResult>> = (0..self.followers).map(|_| None).collect();
        for l in self.loops {
            match tokio::time::timeout_at(deadline, l.done).await {
                Ok(Ok(results)) => {
                    for (i, r) in results {
                        if let Some(s) = slots.get_mut(i) {
                            *s = Some(r);
                        }
                    }
                    // It has handed in its results: it is returning.
                    let _ = tokio::task::spawn_blocking(move || l.thread.join()).await;
                }
                Ok(Err(_)) => {
                    let _ = tokio::task::spawn_blocking(move || l.thread.join()).await;
                    for i in l.indices {
                        if let Some(s) = slots.get_mut(i) {
                            *s = Some(failed("follower loop failed"));
                        }
                    }
                }
                Err(_) => {
                    // Left running (detached); the process ends after the run.
                    for i in l.indices {
                        if let Some(s) = slots.get_mut(i) {
                            *s = Some(failed("follower did not stop in time"));
                        }
                    }
                }
            }
        }
        slots
            .into_iter()
            .map(|s| s.unwrap_or_else(|| failed("follower not run")))
            .collect()
    }
}

fn failed(why: &str) -> FollowerResult {
    FollowerResult {
        error: Some(why.to_string()),
        ..FollowerResult::default()
    }
}
