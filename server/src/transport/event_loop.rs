//! The event loop: one OS thread that owns a [`quinn_proto::Endpoint`], all
//! of its connections, one timer heap and one UDP socket.
//!
//! A turn: read the socket (`recvmmsg` and GRO through quinn-udp) and feed
//! the datagrams to the endpoint; apply what the application asked for on
//! the connections it scheduled (write their queues into streams, closes);
//! fire due timers; drive every connection touched this turn (its events,
//! then its packets into the transmit batch); flush the batch with
//! `sendmmsg` (GSO when one connection has several packets); then `poll(2)`
//! on the socket and the loop's eventfd until the next timer, or, while
//! datagrams keep coming, a sleep to the next 2 ms window ([`Loop::wait`]).
//!
//! quinn-proto is called in the order its docs ask: after `handle_event` /
//! `handle_timeout` / application I/O the loop polls endpoint events,
//! application events and transmits, and re-reads `poll_timeout`.
//!
//! Admission: connections (handshaking or established, over all loops) are
//! capped by `max_connections` (further attempts are refused). Each new
//! attempt is then put to the [`crate::admission`] policy (shared by all
//! loops): a Retry for unvalidated senders under pressure or over their
//! address's limit, a refusal over a validated address's limit. Handshakes
//! in flight are capped by the policy's `max_in_progress` (further attempts
//! wait in a bounded queue, in arrival order, for at most the policy's
//! `timeout`), and a handshake that has not finished within that `timeout`
//! of its start is dropped. Established
//! connections go to the application through a bounded channel
//! (`accept_backlog`; beyond it they are closed with [`BUSY`]).
//!
//! Nothing read from the network is unwrapped: bad packets are quinn-proto's
//! to reject, socket errors drop a datagram (QUIC retransmits) or end one
//! receive batch. If the loop ever unwinds, every connection it held is
//! marked closed (its `Drop`), so no session waits on a dead loop.

use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use quinn_proto::{ConnectionError, ConnectionHandle, DatagramEvent, Dir, Event, StreamEvent};
use tokio::sync::mpsc;

use super::connection::{CloseReason, ConnShared, Connection, FeedScratch};
use super::entry::Entry;
use super::table::Table;
use super::timers::Timers;
use super::tx_batch::{Flush, TxBatch};
use super::wake::{lock, LoopShared};
use super::{TransportConfig, BUSY};
use crate::admission::{Admission, Decision, HandshakePolicy, Ticket};

/// Connections driven between two reads of the socket in one turn.
const RECV_EVERY: usize = 256;
/// Messages per `sendmmsg` (and transmit buffers per loop).
pub const TX_BATCH: usize = 64;
/// Receive batches read per turn at most (each up to `quinn_udp::BATCH_SIZE`
/// datagrams), so a flood cannot starve the application's work.
const RECV_ROUNDS: usize = 16;
/// Bytes of one receive slot (a GRO batch of datagrams lands in one slot).
const RECV_SLOT: usize = 64 * 1024;
/// How long a shutting-down loop waits for its connections to close.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(2);
/// Longest `poll(2)` wait when no timer is due sooner, in ms.
const MAX_WAIT_MS: i32 = 60_000;
/// Timer slack: the loop wakes for timers at multiples of this, so the
/// timers of many connections falling in one window (ACK delays, idle and
/// loss timers; with 100k idle followers, thousands a second) are handled
/// in one turn and their packets leave in one `sendmmsg`. Timers fire at
/// most this late (plus up to 1 ms of `poll(2)` rounding), never early, or
/// for a timer further away than eight times this, at most an eighth of
/// its distance late ([`Timers`]). While datagrams keep coming, the socket
/// is read on the same grid ([`Loop::wait`]).
const TIMER_SLACK: Duration = Duration::from_millis(2);

/// One loop's Prometheus counters (label `loop`), set once per turn.
struct LoopCounters {
    turns: metrics::Counter,
    datagrams_in: metrics::Counter,
    datagrams_out: metrics::Counter,
    send_calls: metrics::Counter,
    feed_datagrams: metrics::Counter,
}

impl LoopCounters {
    fn new(index: usize) -> LoopCounters {
        use crate::metrics as m;
        let l = index.to_string();
        LoopCounters {
            turns: metrics::counter!(m::QUIC_LOOP_TURNS, "loop" => l.clone()),
            datagrams_in: metrics::counter!(m::QUIC_DATAGRAMS_IN, "loop" => l.clone()),
            datagrams_out: metrics::counter!(m::QUIC_DATAGRAMS_OUT, "loop" => l.clone()),
            send_calls: metrics::counter!(m::QUIC_SEND_CALLS, "loop" => l.clone()),
            feed_datagrams: metrics::counter!(m::FEED_DATAGRAMS, "loop" => l),
        }
    }
}

/// Counts shared by every loop of one transport.
pub(super) struct Global {
    /// Connections accepted (handshaking or established) and not drained.
    pub(super) open: AtomicUsize,
    /// Handshakes in progress, over all loops and per address.
    admission: Arc<Admission>,
}

impl Global {
    pub(super) fn new(policy: HandshakePolicy) -> Global {
        Global {
            open: AtomicUsize::new(0),
            admission: Admission::new(policy),
        }
    }
}

/// Close code for a handshake that ran out of time (no application error:
/// the peer never got that far).
const HANDSHAKE_TIMED_OUT: quinn_proto::VarInt = quinn_proto::VarInt::from_u32(0);

pub(super) struct Loop {
    cfg: Arc<TransportConfig>,
    ep: quinn_proto::Endpoint,
    sock: UdpSocket,
    udp: quinn::udp::UdpSocketState,
    shared: Arc<LoopShared>,
    global: Arc<Global>,
    accept_tx: mpsc::Sender<Connection>,
    /// By quinn-proto handle (see `table`).
    conns: Table<Entry>,
    /// Per slot of `conns`, the generation of its connection (0: empty),
    /// which the wake-up path checks first: a dense array that stays in
    /// cache, where a look at the entry itself (quinn-proto's state,
    /// kilobytes) is a cache miss. The timers keep their own per slot.
    gens: Vec<u64>,
    live: usize,
    next_gen: u64,
    handshaking: usize,
    max_handshakes: usize,
    /// Connection attempts waiting for a handshake slot, with when they
    /// arrived.
    /// Without a ticket: a validated sender over its address's limit
    /// (`Decision::Wait`), which asks again when a slot is free.
    waiting: VecDeque<(Instant, quinn_proto::Incoming, Option<Ticket>)>,
    /// Handshake deadlines of accepted connections, in order (the timeout
    /// is one constant): (deadline, handle, generation). At most one per
    /// connection accepted within the last timeout.
    deadlines: VecDeque<(Instant, usize, u64)>,
    timers: Timers,
    touched: Vec<usize>,
    pending_tx: Vec<usize>,
    tx: TxBatch,
    tx_blocked: bool,
    gso: usize,
    recv_buf: Vec<u8>,
    meta: Vec<quinn::udp::RecvMeta>,
    scratch: Vec<u8>,
    dirty_scratch: Vec<(usize, u64)>,
    /// Frames pulled from a feed source, reused.
    frames_scratch: FeedScratch,
    datagrams_in: u64,
    shutting_down: Option<Instant>,
    open_gauge: metrics::Gauge,
    counters: LoopCounters,
    /// What the last `poll(2)` reported readable (both set at start): the
    /// socket is read, and the eventfd drained, only when they are, saving
    /// two system calls on every turn woken by the other one or by a timer.
    sock_ready: bool,
    wake_ready: bool,
    /// Datagrams the last read took, and whether it emptied the socket
    /// (see [`Loop::wait`]).
    recv_took: usize,
    recv_drained: bool,
}

impl Loop {
    pub(super) fn new(
        cfg: Arc<TransportConfig>,
        index: usize,
        endpoint: Arc<quinn_proto::EndpointConfig>,
        sock: UdpSocket,
        shared: Arc<LoopShared>,
        global: Arc<Global>,
        accept_tx: mpsc::Sender<Connection>,
    ) -> io::Result<Loop> {
        let udp = quinn::udp::UdpSocketState::new((&sock).into())?;
        let gso = cfg.gso_segments.clamp(1, udp.max_gso_segments().max(1));
        let batch = quinn::udp::BATCH_SIZE.min(32);
        let ep = quinn_proto::Endpoint::new(
            endpoint,
            Some(cfg.server.clone()),
            !udp.may_fragment(),
            None,
        );
        let max_handshakes = (cfg.handshakes.max_in_progress / cfg.loops.max(1)).max(1);
        Ok(Loop {
            ep,
            udp,
            sock,
            shared,
            global,
            accept_tx,
            conns: Table::new(),
            gens: Vec::new(),
            live: 0,
            next_gen: 1,
            handshaking: 0,
            max_handshakes,
            waiting: VecDeque::new(),
            deadlines: VecDeque::new(),
            timers: Timers::scaled(Instant::now(), TIMER_SLACK),
            touched: Vec::new(),
            pending_tx: Vec::new(),
            tx: TxBatch::new(TX_BATCH),
            tx_blocked: false,
            gso,
            recv_buf: vec![0u8; RECV_SLOT * batch],
            meta: vec![quinn::udp::RecvMeta::default(); batch],
            scratch: Vec::new(),
            dirty_scratch: Vec::new(),
            frames_scratch: FeedScratch::default(),
            datagrams_in: 0,
            shutting_down: None,
            open_gauge: metrics::gauge!(crate::metrics::CONNECTIONS_OPEN),
            counters: LoopCounters::new(index),
            sock_ready: true,
            wake_ready: true,
            recv_took: 0,
            recv_drained: true,
            cfg,
        })
    }

    /// Runs until shut down and drained.
    pub(super) fn run(mut self) {
        loop {
            let now = Instant::now();
            if std::mem::take(&mut self.sock_ready) {
                self.recv(now);
            }
            if std::mem::take(&mut self.wake_ready) {
                self.apply_app(now);
            }
            if self.check_shutdown(now) {
                break;
            }
            let now = Instant::now();
            self.expire_timers(now);
            self.expire_handshakes(now);
            self.admit_waiting(now);
            self.drive_touched(now);
            self.flush();
            self.publish_stats();
            if let Some(hook) = &self.cfg.turn_hook {
                hook();
            }
            self.wait();
        }
        self.flush();
        self.publish_stats();
    }

    fn publish_stats(&self) {
        let c = &self.counters;
        c.turns.increment(1);
        c.datagrams_in.absolute(self.datagrams_in);
        c.datagrams_out.absolute(self.tx.stats.datagrams);
        c.send_calls.absolute(self.tx.stats.syscalls);
        c.feed_datagrams
            .absolute(self.frames_scratch.datagrams_sent);
        let s = &self.shared.stats;
        s.turns.fetch_add(1, Ordering::Relaxed);
        s.datagrams_in.store(self.datagrams_in, Ordering::Relaxed);
        s.tx_syscalls
            .store(self.tx.stats.syscalls, Ordering::Relaxed);
        s.tx_messages
            .store(self.tx.stats.messages, Ordering::Relaxed);
        s.tx_datagrams
            .store(self.tx.stats.datagrams, Ordering::Relaxed);
        s.tx_dropped.store(self.tx.stats.dropped, Ordering::Relaxed);
        s.connections.store(self.live as u64, Ordering::Relaxed);
    }

    /// Starts closing everything on request; true when the loop should exit.
    fn check_shutdown(&mut self, now: Instant) -> bool {
        if self.shutting_down.is_none() {
            let req = lock(&self.shared.shutdown).clone();
            let Some((code, reason)) = req else {
                return false;
            };
            self.shutting_down = Some(now + SHUTDOWN_DRAIN);
            let mut buf = std::mem::take(&mut self.scratch);
            while let Some((_, incoming, _)) = self.waiting.pop_front() {
                buf.clear();
                let t = self.ep.refuse(incoming, &mut buf);
                self.push_response(&t, &buf);
            }
            self.scratch = buf;
            for h in 0..self.conns.capacity() {
                if let Some(e) = self.conns.get_mut(h) {
                    if !e.lost {
                        e.close(now, code, reason.clone());
                    }
                    self.touch(h);
                }
            }
        }
        matches!(self.shutting_down, Some(d) if self.live == 0 || now >= d)
    }

    fn touch(&mut self, h: usize) {
        if let Some(e) = self.conns.get_mut(h) {
            if !e.touched {
                e.touched = true;
                self.touched.push(h);
            }
        }
    }

    /// Sleeps until there is something to do. When the last read took
    /// datagrams and emptied the socket, traffic is steady (the followers'
    /// ACKs during a fan-out; with 100k idle followers, thousands of
    /// keep-alives a second): the loop then does not wait on the socket,
    /// which would wake it for nearly every datagram, but sleeps until the
    /// next point of the timer grid ([`TIMER_SLACK`]), woken at once only by
    /// the application, and reads there, together with the timers due. One
    /// sleep and one read per window, however many datagrams arrive in it;
    /// nothing received waits longer than a window. A read that finds
    /// nothing puts the loop back to waiting on the socket.
    fn wait(&mut self) {
        let timeout_ms: i32 =
            if !self.touched.is_empty() || (!self.pending_tx.is_empty() && !self.tx_blocked) {
                0
            } else if self.shutting_down.is_some() {
                10
            } else {
                let now = Instant::now();
                let timeout = self.cfg.handshakes.timeout;
                // The timers' wake-ups are on their grid already; the
                // handshake deadlines go to the end of their slack window.
                let next = [
                    self.waiting.front().map(|(w, ..)| *w + timeout),
                    self.deadlines.front().map(|(d, ..)| *d),
                ]
                .into_iter()
                .flatten()
                .map(|t| self.timers.wake_time(t, t))
                .chain(self.timers.next())
                .min();
                if self.recv_took > 0 && self.recv_drained && !self.tx_blocked {
                    let grid = self.timers.wake_time(now, now);
                    let until = next.map_or(grid, |t| t.min(grid));
                    self.sleep_on_eventfd(until.saturating_duration_since(now));
                    self.sock_ready = true;
                    return;
                }
                match next {
                    Some(end) => {
                        let d = end.saturating_duration_since(now);
                        // Round up so a timer is never handled early.
                        (d.as_micros().div_ceil(1000)).min(MAX_WAIT_MS as u128) as i32
                    }
                    None => MAX_WAIT_MS,
                }
            };
        let mut fds = [
            libc::pollfd {
                fd: self.sock.as_raw_fd(),
                events: libc::POLLIN | if self.tx_blocked { libc::POLLOUT } else { 0 },
                revents: 0,
            },
            libc::pollfd {
                fd: self.shared.eventfd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds that live across the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
        if r > 0 {
            if fds[0].revents & libc::POLLOUT != 0 {
                self.tx_blocked = false;
            }
            // Errors too: the read reports (and clears) them.
            self.sock_ready = fds[0].revents & !libc::POLLOUT != 0;
            self.wake_ready = fds[1].revents != 0;
        } else if r < 0 {
            // Interrupted: look at everything again.
            self.sock_ready = true;
            self.wake_ready = true;
        }
    }

    /// Sleeps for `left`, returning early if the application wakes the loop.
    fn sleep_on_eventfd(&mut self, left: Duration) {
        if left.is_zero() {
            return;
        }
        let mut fd = libc::pollfd {
            fd: self.shared.eventfd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: left.as_secs() as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        };
        // SAFETY: one valid pollfd and a timespec that live across the call.
        let r = unsafe { libc::ppoll(&mut fd, 1, &ts, std::ptr::null()) };
        if r != 0 {
            self.wake_ready = true; // woken, or interrupted: look again
        }
    }

    fn recv(&mut self, now: Instant) {
        let mut took = 0;
        let batch = self.meta.len();
        let mut buf = std::mem::take(&mut self.recv_buf);
        let mut drained = false;
        for _round in 0..RECV_ROUNDS {
            let n = {
                let mut iovs: Vec<IoSliceMut<'_>> =
                    buf.chunks_mut(RECV_SLOT).map(IoSliceMut::new).collect();
                match self
                    .udp
                    .recv((&self.sock).into(), &mut iovs, &mut self.meta)
                {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        drained = true; // WouldBlock: drained; else drop this batch
                        break;
                    }
                }
            };
            took += n;
            for i in 0..n {
                let m = self.meta[i];
                let start = i * RECV_SLOT;
                let mut data = BytesMut::from(&buf[start..start + m.len.min(RECV_SLOT)]);
                while !data.is_empty() {
                    let d = data.split_to(m.stride.max(1).min(data.len()));
                    self.datagrams_in += 1;
                    let ecn = m
                        .ecn
                        .and_then(|e| quinn_proto::EcnCodepoint::from_bits(e as u8));
                    self.on_datagram(now, m.addr, m.dst_ip, ecn, d);
                }
            }
            if n < batch {
                drained = true; // poll(2) is level-triggered
                break;
            }
        }
        self.recv_took = took;
        self.recv_drained = drained;
        self.recv_buf = buf;
    }

    fn on_datagram(
        &mut self,
        now: Instant,
        addr: SocketAddr,
        dst_ip: Option<std::net::IpAddr>,
        ecn: Option<quinn_proto::EcnCodepoint>,
        data: BytesMut,
    ) {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        match self.ep.handle(now, addr, dst_ip, ecn, data, &mut buf) {
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                if let Some(e) = self.conns.get_mut(ch.0) {
                    e.conn.handle_event(ev);
                    self.touch(ch.0);
                }
            }
            Some(DatagramEvent::NewConnection(incoming)) => {
                self.on_incoming(now, incoming, &mut buf)
            }
            Some(DatagramEvent::Response(t)) => self.push_response(&t, &buf),
            None => {}
        }
        self.scratch = buf;
    }

    fn push_response(&mut self, t: &quinn_proto::Transmit, buf: &[u8]) {
        if self.tx.is_full() {
            self.flush();
            if self.tx.is_full() {
                return; // socket full: drop; the peer retries
            }
        }
        self.tx
            .push_copy(t.destination, &buf[..t.size.min(buf.len())], t.segment_size);
    }

    fn refuse(&mut self, incoming: quinn_proto::Incoming, buf: &mut Vec<u8>) {
        buf.clear();
        let t = self.ep.refuse(incoming, buf);
        self.push_response(&t, buf);
    }

    fn on_incoming(&mut self, now: Instant, incoming: quinn_proto::Incoming, buf: &mut Vec<u8>) {
        if self.shutting_down.is_some() {
            return self.refuse(incoming, buf);
        }
        if self.global.open.load(Ordering::Relaxed) >= self.cfg.max_connections {
            tracing::warn!(
                limit = self.cfg.max_connections,
                "connection limit reached; refusing"
            );
            return self.refuse(incoming, buf);
        }
        let peer = incoming.remote_address();
        let ticket = match self.global.admission.decide(
            peer.ip(),
            incoming.remote_address_validated(),
            incoming.may_retry(),
        ) {
            Decision::Accept(t) => Some(t),
            Decision::Wait => None,
            Decision::Retry => {
                metrics::counter!(crate::metrics::HANDSHAKES, "result" => "retry").increment(1);
                buf.clear();
                match self.ep.retry(incoming, buf) {
                    Ok(t) => self.push_response(&t, buf),
                    Err(e) => self.ep.ignore(e.into_incoming()),
                }
                return;
            }
            Decision::Refuse(why) => {
                metrics::counter!(crate::metrics::HANDSHAKES, "result" => "refused").increment(1);
                tracing::debug!(%peer, why, "handshake refused");
                return self.refuse(incoming, buf);
            }
        };
        match ticket {
            Some(t) if self.handshaking < self.max_handshakes => self.accept(now, incoming, t, buf),
            ticket => {
                if self.waiting.len() >= self.cfg.handshake_queue {
                    metrics::counter!(crate::metrics::HANDSHAKES, "result" => "refused")
                        .increment(1);
                    return self.refuse(incoming, buf);
                }
                self.waiting.push_back((now, incoming, ticket));
            }
        }
    }

    /// Closes connections whose handshake has not finished within the
    /// policy's timeout, giving their places back at once.
    fn expire_handshakes(&mut self, now: Instant) {
        while let Some(&(deadline, h, gen)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            let Some(e) = self.conns.get_mut(h) else {
                continue;
            };
            if e.shared.gen != gen || e.established {
                continue;
            }
            metrics::counter!(crate::metrics::HANDSHAKES, "result" => "timed_out").increment(1);
            tracing::debug!(peer = %e.shared.remote, "handshake timed out");
            e.ticket = None;
            e.established = true; // counted once
            self.handshaking = self.handshaking.saturating_sub(1);
            e.close(
                now,
                HANDSHAKE_TIMED_OUT,
                Bytes::from_static(b"handshake timed out"),
            );
            self.touch(h);
        }
    }

    /// Starts handshakes for waiting attempts, in arrival order, while
    /// slots are free; one waiting for its address's turn is passed over
    /// until the address has room. Drops attempts that waited too long
    /// (the oldest are at the front).
    fn admit_waiting(&mut self, now: Instant) {
        let mut buf = std::mem::take(&mut self.scratch);
        let mut i = 0;
        while i < self.waiting.len() {
            let at = self.waiting[i].0;
            if now.duration_since(at) >= self.cfg.handshakes.timeout {
                if let Some((_, incoming, _)) = self.waiting.remove(i) {
                    metrics::counter!(crate::metrics::HANDSHAKES, "result" => "timed_out")
                        .increment(1);
                    self.ep.ignore(incoming);
                }
                continue;
            }
            if self.handshaking >= self.max_handshakes {
                break;
            }
            let entry = &mut self.waiting[i];
            let ticket =
                match entry.2.take() {
                    Some(t) => Some(t),
                    None => match self.global.admission.decide(
                        entry.1.remote_address().ip(),
                        true,
                        false,
                    ) {
                        Decision::Accept(t) => Some(t),
                        _ => None,
                    },
                };
            match ticket {
                Some(t) => {
                    if let Some((_, incoming, _)) = self.waiting.remove(i) {
                        self.accept(now, incoming, t, &mut buf);
                    }
                }
                None => i += 1,
            }
        }
        self.scratch = buf;
    }

    /// Starts a handshake; it must finish within the policy's timeout.
    fn accept(
        &mut self,
        now: Instant,
        incoming: quinn_proto::Incoming,
        ticket: Ticket,
        buf: &mut Vec<u8>,
    ) {
        let remote = incoming.remote_address();
        buf.clear();
        match self.ep.accept(incoming, now, buf, None) {
            Ok((ch, conn)) => {
                let gen = self.next_gen;
                self.next_gen += 1;
                let shared = Arc::new(ConnShared::new(
                    ch.0,
                    gen,
                    remote,
                    self.shared.clone(),
                    &self.cfg,
                ));
                if self.gens.len() <= ch.0 {
                    self.gens.resize(ch.0 + 1, 0);
                }
                self.gens[ch.0] = gen;
                self.conns.insert(ch.0, Entry::new(conn, shared, ticket));
                self.deadlines
                    .push_back((now + self.cfg.handshakes.timeout, ch.0, gen));
                self.live += 1;
                self.handshaking += 1;
                self.global.open.fetch_add(1, Ordering::Relaxed);
                self.open_gauge.increment(1.0);
                self.touch(ch.0);
            }
            Err(e) => {
                metrics::counter!(crate::metrics::HANDSHAKES, "result" => "failed").increment(1);
                if let Some(t) = e.response {
                    self.push_response(&t, buf);
                }
            }
        }
    }

    /// Applies what the application asked for on the connections it scheduled.
    fn apply_app(&mut self, now: Instant) {
        // The eventfd drained, then the flag cleared, then the list taken:
        // see `wake`.
        self.shared.drain_eventfd();
        self.shared.wake_pending.store(false, Ordering::SeqCst);
        let mut dirty = std::mem::take(&mut self.dirty_scratch);
        std::mem::swap(&mut dirty, &mut *lock(&self.shared.dirty));
        for &(h, gen) in &dirty {
            if self.gens.get(h) != Some(&gen) {
                continue;
            }
            let Some(e) = self.conns.get_mut(h) else {
                continue;
            };
            // Cleared before the state is read: see `wake`.
            e.shared.scheduled.store(false, Ordering::SeqCst);
            if e.lost {
                continue;
            }
            let close = lock(&e.shared.ctl).close_request.take();
            if let Some((code, reason)) = close {
                e.close(now, code, reason);
            } else {
                e.resume_control();
                e.write_control();
                e.write_feed(&mut self.frames_scratch);
            }
            if !e.touched {
                e.touched = true;
                self.touched.push(h);
            }
        }
        dirty.clear();
        self.dirty_scratch = dirty;
    }

    fn expire_timers(&mut self, now: Instant) {
        while let Some((h, _gen)) = self.timers.pop_due(now) {
            let Some(e) = self.conns.get_mut(h) else {
                continue;
            };
            e.conn.handle_timeout(now);
            self.touch(h);
        }
    }

    fn drive_touched(&mut self, now: Instant) {
        if !self.tx_blocked && !self.pending_tx.is_empty() {
            let pend = std::mem::take(&mut self.pending_tx);
            for h in pend {
                if let Some(e) = self.conns.get_mut(h) {
                    e.pending_tx = false;
                }
                self.touch(h);
            }
        }
        let mut i = 0;
        while i < self.touched.len() {
            let h = self.touched[i];
            i += 1;
            self.drive(h, now);
            if i % RECV_EVERY == 0 {
                // A large fan-out round takes tens of ms: read the socket in
                // between so the followers' ACKs do not overflow its buffer.
                // Connections touched here join the end of this same list.
                self.recv(now);
            }
        }
        self.touched.clear();
    }

    /// Handles one connection's events, then queues its packets.
    fn drive(&mut self, h: usize, now: Instant) {
        let Some(e) = self.conns.get_mut(h) else {
            return;
        };
        e.touched = false;
        let mut drained = false;
        while let Some(ev) = e.conn.poll_endpoint_events() {
            drained |= ev.is_drained();
            if let Some(cev) = self.ep.handle_event(ConnectionHandle(h), ev) {
                e.conn.handle_event(cev);
            }
        }
        while let Some(ev) = e.conn.poll() {
            match ev {
                Event::HandshakeDataReady => {}
                // Timed out (and closed) in this same turn, before its
                // events were read: not handed to the application.
                Event::Connected if e.lost => {}
                Event::Connected => {
                    self.handshaking = self.handshaking.saturating_sub(1);
                    e.established = true;
                    e.ticket = None;
                    e.shared.datagram_max.store(
                        e.conn.datagrams().max_size().unwrap_or(0),
                        Ordering::Relaxed,
                    );
                    metrics::counter!(crate::metrics::HANDSHAKES, "result" => "ok").increment(1);
                    e.open_feed(&mut self.frames_scratch);
                    let app = Connection {
                        shared: e.shared.clone(),
                    };
                    if let Err(err) = self.accept_tx.try_send(app) {
                        // Closed with BUSY first, so the handle's drop
                        // (which would close with GOING_AWAY) does nothing.
                        e.close(now, BUSY, Bytes::from_static(b"busy"));
                        drop(err.into_inner());
                    }
                }
                Event::ConnectionLost { reason } => {
                    if !e.established {
                        self.handshaking = self.handshaking.saturating_sub(1);
                        e.established = true; // count it once
                        e.ticket = None;
                        metrics::counter!(crate::metrics::HANDSHAKES, "result" => "failed")
                            .increment(1);
                    }
                    e.mark_closed(CloseReason::Lost(reason));
                }
                Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => e.accept_control(),
                Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
                    while let Some(id) = e.conn.streams().accept(Dir::Uni) {
                        let _ = e
                            .conn
                            .recv_stream(id)
                            .stop(quinn_proto::VarInt::from_u32(0));
                    }
                }
                Event::Stream(StreamEvent::Readable { id }) => {
                    if e.control == Some(id) {
                        e.read_control();
                    }
                }
                Event::Stream(StreamEvent::Writable { id }) => {
                    if e.feed == Some(id) {
                        e.write_feed(&mut self.frames_scratch);
                    } else if e.control == Some(id) {
                        e.write_control();
                    }
                }
                Event::Stream(StreamEvent::Available { dir: Dir::Uni }) => {
                    if e.established {
                        e.open_feed(&mut self.frames_scratch);
                    }
                }
                Event::Stream(StreamEvent::Stopped { id, .. }) => {
                    if e.feed == Some(id) {
                        e.feed_stopped();
                    }
                }
                Event::Stream(_) => {}
                Event::DatagramReceived => while e.conn.datagrams().recv().is_some() {},
                Event::DatagramsUnblocked => {}
            }
        }
        // Transmit; when blocked (before or now), driven again once the
        // socket is writable.
        if self.tx_blocked
            || matches!(
                self.tx
                    .fill_from(&mut e.conn, now, self.gso, self.sock.as_raw_fd()),
                Flush::WouldBlock
            )
        {
            self.tx_blocked = true;
            if !e.pending_tx {
                e.pending_tx = true;
                self.pending_tx.push(h);
            }
        }
        while let Some(ev) = e.conn.poll_endpoint_events() {
            drained |= ev.is_drained();
            if let Some(cev) = self.ep.handle_event(ConnectionHandle(h), ev) {
                e.conn.handle_event(cev);
            }
        }
        self.timers.set(h, e.shared.gen, e.conn.poll_timeout(), now);
        if drained {
            self.timers.clear(h);
            self.gens[h] = 0;
            if let Some(mut e) = self.conns.take(h) {
                if !e.established {
                    self.handshaking = self.handshaking.saturating_sub(1);
                }
                if lock(&e.shared.ctl).closed.is_none() {
                    e.mark_closed(CloseReason::Lost(ConnectionError::LocallyClosed));
                }
            }
            self.live = self.live.saturating_sub(1);
            self.global.open.fetch_sub(1, Ordering::Relaxed);
            self.open_gauge.decrement(1.0);
        }
    }

    fn flush(&mut self) {
        if self.tx_blocked || self.tx.is_empty() {
            return;
        }
        if let Flush::WouldBlock = self.tx.flush(self.sock.as_raw_fd()) {
            self.tx_blocked = true;
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        // Normal exit or unwinding: nobody may wait on these connections now.
        let mut buf = Vec::new();
        while let Some((_, incoming, _)) = self.waiting.pop_front() {
            buf.clear();
            let _ = self.ep.refuse(incoming, &mut buf);
        }
        let mut left = 0;
        for e in self.conns.iter_mut() {
            left += 1;
            if lock(&e.shared.ctl).closed.is_none() {
                e.mark_closed(CloseReason::Lost(ConnectionError::LocallyClosed));
            }
        }
        if left > 0 {
            self.global.open.fetch_sub(left, Ordering::Relaxed);
            self.open_gauge.decrement(left as f64);
        }
    }
}
