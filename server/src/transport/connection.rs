//! One connection as the application sees it: a [`Connection`] handle, the
//! follower's control stream as a byte reader ([`ControlReader`], an
//! `AsyncRead`) plus [`Connection::send_control`], and the feed stream as a
//! bounded queue of frames ([`FeedStream`]).
//!
//! Everything here only changes the connection's shared state and schedules
//! the connection on its loop (see `wake`); the loop does the QUIC work. The
//! async methods wait on a `Notify` or a stored waker, never holding a lock
//! across `.await`.
//!
//! Bounds (from the [`TransportConfig`](super::TransportConfig)): inbound
//! control bytes `control_in_bytes` (the loop stops reading the stream when
//! full, so QUIC flow control pushes back), outbound control bytes
//! `control_out_bytes` and feed bytes `feed_queue_bytes` (a sender past them
//! waits for room; one frame larger than the bound is let through alone, so
//! a sender never waits forever).

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use quinn_proto::{ConnectionError, VarInt};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::Notify;

use super::wake::{lock, LoopShared};

/// Application close code used when a [`Connection`] is dropped.
pub const GOING_AWAY: VarInt = VarInt::from_u32(0);

/// Why a connection ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Closed by this side ([`Connection::close`], drop, shutdown, busy).
    Local {
        /// The application close code sent.
        code: VarInt,
        /// The reason sent with it.
        reason: Bytes,
    },
    /// Lost: closed by the peer, timed out, reset, or a protocol error.
    Lost(ConnectionError),
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Local { code, reason } => {
                write!(
                    f,
                    "closed locally ({code}: {})",
                    String::from_utf8_lossy(reason)
                )
            }
            CloseReason::Lost(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for CloseReason {}

/// The connection (or the stream written to) is gone.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the connection or its stream is closed")]
pub struct Closed;

/// Frames the loop pulls straight from the application, on its own thread,
/// when the feed stream can take them (the live fast path): no task is
/// woken per delivery. The application makes the loop pull with
/// [`FeedWaker::wake`].
pub trait FeedSource: Send + Sync {
    /// Moves up to about `room` bytes of frames into `out` (for the feed
    /// stream) and `datagrams` (each to go as one QUIC DATAGRAM frame if it
    /// fits, else on the stream too); returns whether more may be waiting.
    /// Must not block.
    fn pull(&self, room: usize, out: &mut Vec<Bytes>, datagrams: &mut Vec<Bytes>) -> bool;
}

/// The loop's reused buffers for frames pulled from a [`FeedSource`].
#[derive(Default)]
pub(super) struct FeedScratch {
    pub(super) stream: Vec<Bytes>,
    pub(super) datagrams: Vec<Bytes>,
    /// Frames sent as QUIC DATAGRAM frames so far (for the metrics).
    pub(super) datagrams_sent: u64,
}

/// How the peer's control stream ended.
#[derive(Clone, Copy, Debug)]
pub(super) enum InEnd {
    /// Finished cleanly (FIN).
    Finished,
    /// Reset by the peer with this code.
    Reset(VarInt),
}

pub(super) struct FeedState {
    pub(super) frames: VecDeque<Bytes>,
    pub(super) bytes: usize,
    /// The loop opened the feed stream.
    pub(super) opened: bool,
    /// The stream was stopped by the peer, failed, or the connection ended.
    pub(super) closed: bool,
    /// Finish the stream once the queue is written.
    pub(super) finish: bool,
    /// A writer waits for room.
    pub(super) waiting: bool,
}

pub(super) struct CtlState {
    /// The peer opened its control stream.
    pub(super) opened: bool,
    pub(super) inbound: VecDeque<Bytes>,
    pub(super) in_bytes: usize,
    pub(super) in_end: Option<InEnd>,
    /// The loop stopped reading because `inbound` was full.
    pub(super) in_paused: bool,
    pub(super) reader: Option<Waker>,
    pub(super) outbound: VecDeque<Bytes>,
    pub(super) out_bytes: usize,
    /// A sender waits for room.
    pub(super) out_waiting: bool,
    pub(super) close_request: Option<(VarInt, Bytes)>,
    pub(super) closed: Option<CloseReason>,
}

/// State shared between a connection's loop and the application.
pub(super) struct ConnShared {
    pub(super) slot: usize,
    pub(super) gen: u64,
    pub(super) remote: SocketAddr,
    pub(super) lp: Arc<LoopShared>,
    pub(super) scheduled: AtomicBool,
    pub(super) feed: Mutex<FeedState>,
    pub(super) ctl: Mutex<CtlState>,
    /// Room in the feed queue.
    pub(super) feed_room: Notify,
    /// Room in the outbound control queue.
    pub(super) ctl_room: Notify,
    /// A stream opened, or the connection ended.
    pub(super) changed: Notify,
    pub(super) feed_cap: usize,
    pub(super) ctl_in_cap: usize,
    pub(super) ctl_out_cap: usize,
    /// Where the loop pulls live frames from, once set.
    pub(super) source: OnceLock<Arc<dyn FeedSource>>,
    /// The largest QUIC DATAGRAM payload the peer takes, set when the
    /// handshake completes (0: the peer takes none).
    pub(super) datagram_max: AtomicUsize,
}

impl ConnShared {
    pub(super) fn new(
        slot: usize,
        gen: u64,
        remote: SocketAddr,
        lp: Arc<LoopShared>,
        cfg: &super::TransportConfig,
    ) -> ConnShared {
        ConnShared {
            slot,
            gen,
            remote,
            lp,
            scheduled: AtomicBool::new(false),
            feed: Mutex::new(FeedState {
                frames: VecDeque::new(),
                bytes: 0,
                opened: false,
                closed: false,
                finish: false,
                waiting: false,
            }),
            ctl: Mutex::new(CtlState {
                opened: false,
                inbound: VecDeque::new(),
                in_bytes: 0,
                in_end: None,
                in_paused: false,
                reader: None,
                outbound: VecDeque::new(),
                out_bytes: 0,
                out_waiting: false,
                close_request: None,
                closed: None,
            }),
            feed_room: Notify::new(),
            ctl_room: Notify::new(),
            changed: Notify::new(),
            feed_cap: cfg.feed_queue_bytes.max(1),
            ctl_in_cap: cfg.control_in_bytes.max(1),
            ctl_out_cap: cfg.control_out_bytes.max(1),
            source: OnceLock::new(),
            datagram_max: AtomicUsize::new(0),
        }
    }

    /// Asks the loop to look at this connection.
    pub(super) fn schedule(&self) {
        self.lp.schedule(&self.scheduled, self.slot, self.gen);
    }

    /// Waits on `notify` until `check` returns something. The waiter is
    /// registered before each check, so a notification between the check
    /// and the wait is not lost.
    async fn wait_for<T>(&self, notify: &Notify, mut check: impl FnMut() -> Option<T>) -> T {
        loop {
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(v) = check() {
                return v;
            }
            notified.await;
        }
    }
}

/// The application's handle to one follower connection. Dropping it closes
/// the connection with [`GOING_AWAY`].
pub struct Connection {
    pub(super) shared: Arc<ConnShared>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("remote", &self.shared.remote)
            .finish()
    }
}

impl Connection {
    /// The peer's address.
    pub fn remote_address(&self) -> SocketAddr {
        self.shared.remote
    }

    /// The largest QUIC DATAGRAM payload the peer takes on this path, or
    /// `None` if it did not negotiate datagrams (or this server does not
    /// allow them: [`TransportConfig`](super::TransportConfig)).
    pub fn max_datagram_size(&self) -> Option<usize> {
        Some(self.shared.datagram_max.load(Ordering::Relaxed)).filter(|&n| n > 0)
    }

    /// Resolves once the peer has opened its control stream, or with why
    /// the connection ended first.
    pub async fn control_opened(&self) -> Result<(), CloseReason> {
        let s = &*self.shared;
        s.wait_for(&s.changed, || {
            let st = lock(&s.ctl);
            if let Some(r) = &st.closed {
                return Some(Err(r.clone()));
            }
            st.opened.then_some(Ok(()))
        })
        .await
    }

    /// Resolves once the feed stream is open, or with why the connection
    /// ended first.
    pub async fn feed_opened(&self) -> Result<(), CloseReason> {
        let s = &*self.shared;
        s.wait_for(&s.changed, || {
            if let Some(r) = &lock(&s.ctl).closed {
                return Some(Err(r.clone()));
            }
            let f = lock(&s.feed);
            f.opened.then_some(Ok(()))
        })
        .await
    }

    /// The peer's control stream as a byte stream (one reader at a time).
    pub fn control_reader(&self) -> ControlReader {
        ControlReader {
            shared: self.shared.clone(),
        }
    }

    /// Queues `data` on the control stream, waiting while
    /// `control_out_bytes` are queued already.
    pub async fn send_control(&self, data: Bytes) -> Result<(), Closed> {
        let s = &*self.shared;
        let mut data = Some(data);
        s.wait_for(&s.ctl_room, || {
            let mut st = lock(&s.ctl);
            if st.closed.is_some() || st.close_request.is_some() {
                return Some(Err(Closed));
            }
            let len = data.as_ref().map_or(0, Bytes::len);
            if st.out_bytes > 0 && st.out_bytes + len > s.ctl_out_cap {
                st.out_waiting = true;
                return None;
            }
            if let Some(d) = data.take() {
                st.out_bytes += d.len();
                st.outbound.push_back(d);
            }
            drop(st);
            s.schedule();
            Some(Ok(()))
        })
        .await
    }

    /// The feed stream's queue.
    pub fn feed(&self) -> FeedStream {
        FeedStream {
            shared: self.shared.clone(),
        }
    }

    /// Lets the loop pull feed frames from `source` whenever the feed queue
    /// is empty and the stream can take more (set once). Frames queued with
    /// [`FeedStream::write_all`] always go first.
    pub fn set_feed_source(&self, source: Arc<dyn FeedSource>) {
        let _ = self.shared.source.set(source);
        self.shared.schedule();
    }

    /// A handle that makes the loop pull from the feed source.
    pub fn feed_waker(&self) -> FeedWaker {
        FeedWaker {
            shared: self.shared.clone(),
        }
    }

    /// Closes with an application error code and reason (sent in
    /// CONNECTION_CLOSE). Queued feed frames and control replies are dropped.
    pub fn close(&self, code: VarInt, reason: &[u8]) {
        let s = &*self.shared;
        {
            let mut st = lock(&s.ctl);
            if st.closed.is_some() || st.close_request.is_some() {
                return;
            }
            st.close_request = Some((code, Bytes::copy_from_slice(reason)));
        }
        s.schedule();
    }

    /// Why the connection ended, if it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        lock(&self.shared.ctl).closed.clone()
    }

    /// Resolves when the connection has ended.
    pub async fn closed(&self) -> CloseReason {
        let s = &*self.shared;
        s.wait_for(&s.changed, || lock(&s.ctl).closed.clone()).await
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.close(GOING_AWAY, b"");
    }
}

/// Makes a connection's loop pull from its [`FeedSource`]: the first wake
/// of a loop turn writes its eventfd, later ones only add the connection to
/// the loop's list.
#[derive(Clone)]
pub struct FeedWaker {
    shared: Arc<ConnShared>,
}

impl FeedWaker {
    /// Schedules the connection on its loop.
    pub fn wake(&self) {
        self.shared.schedule();
    }
}

/// The peer's control stream, read as bytes. End of stream (`Ok` with
/// nothing read) when the peer finished it; an error when the peer reset it
/// or the connection ended.
pub struct ControlReader {
    shared: Arc<ConnShared>,
}

impl AsyncRead for ControlReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let s = &*self.shared;
        let mut st = lock(&s.ctl);
        if let Some(front) = st.inbound.front_mut() {
            let n = front.len().min(buf.remaining());
            buf.put_slice(&front[..n]);
            front.advance(n);
            if front.is_empty() {
                st.inbound.pop_front();
            }
            st.in_bytes -= n;
            let resume = st.in_paused && st.in_bytes <= s.ctl_in_cap / 2;
            drop(st);
            if resume {
                s.schedule();
            }
            return Poll::Ready(Ok(()));
        }
        match st.in_end {
            Some(InEnd::Finished) => return Poll::Ready(Ok(())),
            Some(InEnd::Reset(code)) => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    format!("control stream reset by the peer (code {code})"),
                )))
            }
            None => {}
        }
        if let Some(r) = &st.closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                r.to_string(),
            )));
        }
        match &st.reader {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.reader = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

/// The feed stream's bounded queue of frames (see the module docs).
pub struct FeedStream {
    shared: Arc<ConnShared>,
}

impl FeedStream {
    /// Queues every chunk, in order, waiting for room whenever
    /// `feed_queue_bytes` are queued; fails once the stream or the
    /// connection is gone. The chunks are taken (left empty).
    pub async fn write_all(&mut self, chunks: &mut [Bytes]) -> Result<(), Closed> {
        let s = &*self.shared;
        let mut i = 0;
        while i < chunks.len() {
            let rest = &mut chunks[i..];
            // Waits until some room is free, then pushes as many chunks as fit.
            i += s
                .wait_for(&s.feed_room, || {
                    let mut q = lock(&s.feed);
                    if q.closed {
                        return Some(Err(Closed));
                    }
                    let mut n = 0;
                    for c in rest.iter_mut() {
                        if q.bytes > 0 && q.bytes + c.len() > s.feed_cap {
                            break;
                        }
                        q.bytes += c.len();
                        q.frames.push_back(std::mem::take(c));
                        n += 1;
                    }
                    if n == 0 {
                        q.waiting = true;
                        return None;
                    }
                    drop(q);
                    s.schedule();
                    Some(Ok(n))
                })
                .await?;
        }
        Ok(())
    }

    /// Bytes queued and not yet taken by QUIC.
    pub fn queued_bytes(&self) -> usize {
        lock(&self.shared.feed).bytes
    }

    /// No more frames: the stream is finished once the queue is written.
    pub fn finish(&mut self) {
        let s = &*self.shared;
        lock(&s.feed).finish = true;
        s.schedule();
    }
}
