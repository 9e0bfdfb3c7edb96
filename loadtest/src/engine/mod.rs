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
//! One thread per `--endpoints` socket (follower `i` is on loop
//! `i % endpoints`), not fewer threads each owning several sockets: a loop
//! wakes once per burst whatever its number of followers, so two loops
//! more than cores cost a couple of wake-ups per round, while one socket
//! per loop keeps the loop simple (one endpoint, one `poll(2)` set, one
//! transmit batch) and keeps each socket's kernel buffer its own. Run
//! `--endpoints 2` on two cores for the fewest wake-ups.
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
//! | file | job |
//! | --- | --- |
//! | `mod` | [`Engine`]: starts the loops, stops them, collects results |
//! | `event_loop` | one loop: receive, timers, connects, drive, transmit, wait |
//! | `session` | one follower's protocol: Hello, Follow, control and feed frames |
//! | `frames` | a bounded, non-async frame decoder |
//! | `timers` | the loop's timer heap |
//! | `tx_batch` | `sendmmsg` + GSO batches |
//! | `wake` | the eventfd that wakes a loop to stop |

mod event_loop;
mod frames;
mod session;
mod timers;
mod tx_batch;
mod wake;

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
    /// QUIC and TLS settings: `herald_client::quic_client_config(...)`.
    pub client: quinn_proto::ClientConfig,
    /// TLS server name.
    pub server_name: String,
    /// Sent in Hello.
    pub client_name: String,
    /// Loops (threads), each with one socket.
    pub loops: usize,
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

struct LoopHandle {
    control: Arc<Control>,
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
        if cfg.loops == 0 {
            return Err(EngineError::Config("loops must be at least 1"));
        }
        if cfg.connect_concurrency == 0 {
            return Err(EngineError::Config(
                "connect concurrency must be at least 1",
            ));
        }
        let total = followers.len();
        let n = cfg.loops.min(total.max(1));
        let mut per_loop: Vec<Vec<FollowerPlan>> = (0..n).map(|_| Vec::new()).collect();
        for (k, f) in followers.into_iter().enumerate() {
            per_loop[k % n].push(f);
        }
        let mut loops = Vec::with_capacity(n);
        for (l, plans) in per_loop.into_iter().enumerate() {
            let bind = match plans.first().map(|p| p.server) {
                Some(SocketAddr::V6(_)) => SocketAddr::from(([0u16; 8], 0)),
                _ => SocketAddr::from(([0u8; 4], 0)),
            };
            let sock = UdpSocket::bind(bind).map_err(EngineError::Socket)?;
            crate::endpoints::set_buffers(&sock, cfg.buffer_bytes);
            sock.set_nonblocking(true).map_err(EngineError::Socket)?;
            let control = Arc::new(Control {
                stop: AtomicBool::new(false),
                waker: wake::Waker::new().map_err(EngineError::Socket)?,
            });
            // Loop `l`'s share of the handshakes in flight.
            let share = cfg.connect_concurrency / n + usize::from(l < cfg.connect_concurrency % n);
            let indices = plans.iter().map(|p| p.index).collect();
            let lp = event_loop::Loop::new(
                &cfg,
                share.max(1),
                sock,
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
                control,
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
            l.control.stop.store(true, Ordering::SeqCst);
            l.control.waker.wake();
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
