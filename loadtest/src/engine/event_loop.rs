//! One follower loop: an OS thread that owns one or more lanes (a UDP
//! socket, its client-mode [`quinn_proto::Endpoint`] and that endpoint's
//! connections, one per follower, and its transmit batch) and one timer
//! heap for all of them.
//!
//! A turn: read the readable sockets (`recvmmsg` and GRO through quinn-udp)
//! and feed the datagrams to their endpoints; look at the stop flag; fire
//! due timers; fail connects past their deadline; start the connects that are due and
//! have a slot; drive every connection touched this turn (its events, its
//! streams through its [`Session`], then its packets into the transmit
//! batch); flush the batches with `sendmmsg`; then `poll(2)` on the sockets
//! and the stop eventfd until the next timer or connect.
//!
//! quinn-proto is called in the order its docs ask: after `handle_event` /
//! `handle_timeout` / stream I/O the loop polls endpoint events, application
//! events and transmits, and re-reads `poll_timeout`.
//!
//! Bounds: connections at most the loop's followers; connects in flight at
//! most the loop's share of `--connect-concurrency` (and their deadlines,
//! one each); the touched and pending-transmit lists hold each connection
//! at most once; the timer heap is compacted ([`Timers`]); each lane's
//! transmit batch is [`TX_BATCH`] buffers, and the loop's receive buffers
//! are `BATCH_SIZE` slots of [`RECV_SLOT`]. Latency samples grow by one per post received,
//! as in the `client` engine.
//!
//! Nothing read from the network is unwrapped: bad packets are
//! quinn-proto's to reject, a follower's bad frames fail that follower, and
//! socket errors drop a datagram (QUIC retransmits) or end a receive batch.

use std::collections::VecDeque;
use std::io::{self, IoSliceMut};
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use herald_client::ClientError;
use quinn_proto::{ConnectionHandle, DatagramEvent, Dir, Event, StreamEvent, VarInt};

use super::session::{bye, Failure, Session, Step};
use super::{Control, EngineConfig, FollowerPlan};
use crate::follower::{FollowerResult, Shared};
use herald_server::transport::timers::Timers;
use herald_server::transport::tx_batch::{Flush, TxBatch};

/// Messages per `sendmmsg` (and transmit buffers per lane).
pub(super) const TX_BATCH: usize = 64;
/// Bytes of one receive slot (a GRO batch of datagrams lands in one slot).
const RECV_SLOT: usize = 64 * 1024;
/// Receive batches read per socket and turn at most, so a flood cannot
/// starve timers and transmits.
const RECV_ROUNDS: usize = 16;
/// Connections driven between two reads of the sockets in one turn.
const RECV_EVERY: usize = 256;
/// Timers are handled at multiples of this (never early), so those of
/// many connections falling in one window (ACK delays, keep-alives) are
/// handled in one turn and their packets leave in one `sendmmsg`. A fixed
/// grid ([`Timers::fixed`]): each follower's keep-alive leaves within this
/// of when it is due, as an independent device's would.
const TIMER_SLACK: Duration = Duration::from_millis(2);
/// Longest `poll(2)` wait with nothing due, in ms (a stop wakes the loop).
const MAX_WAIT_MS: i32 = 60_000;
/// How long a stopping loop waits for its connections' closes to finish.
const STOP_DRAIN: Duration = Duration::from_secs(2);

/// A follower of this loop.
struct Follower {
    plan: FollowerPlan,
    result: FollowerResult,
    /// The lane (socket) it connects through.
    lane: usize,
    /// When its connect may start (`--connect-rate`); its connect time
    /// counts from here, as the `client` engine counts from its task's start.
    start_at: Instant,
}

/// One connection as the loop holds it.
struct Entry {
    conn: quinn_proto::Connection,
    session: Session,
    /// Index in the loop's followers.
    follower: usize,
    gen: u64,
    /// On the list of connections to drive this turn.
    touched: bool,
    /// Waiting for the socket to take more transmits.
    pending_tx: bool,
    /// The follower's outcome is recorded (settled-then-closed or failed)
    /// and the connection is closing, or closed by us.
    ended: bool,
}

/// What every follower of the loop reports to (split from the rest of the
/// loop so a connection can be driven while its follower is updated).
struct Books {
    shared: Arc<Shared>,
    followers: Vec<Follower>,
    /// Followers connecting now (handshake to last Followed).
    in_flight: usize,
}

impl Books {
    /// Applies what a session call said.
    fn apply(&mut self, step: Step, e: &mut Entry, now: Instant) {
        match step {
            Step::Continue => {}
            // A connection the loop already ended (connect deadline, stop)
            // may still hand over a Followed it had buffered: it was
            // counted then, not again now.
            Step::Settled if e.ended => {}
            Step::Settled => {
                let f = &mut self.followers[e.follower];
                f.result.connected = true;
                f.result.connect_time = now.saturating_duration_since(f.start_at);
                self.shared.settle_ok(&f.result.channels);
                self.in_flight = self.in_flight.saturating_sub(1);
            }
            Step::Failed(why) => self.fail(e, why, now),
        }
    }

    /// Records a follower's failure (connecting) or end (settled) once,
    /// and closes its connection.
    fn fail(&mut self, e: &mut Entry, why: Failure, now: Instant) {
        if e.ended {
            return;
        }
        e.ended = true;
        e.conn.close(now, VarInt::from_u32(0), bye());
        let f = &mut self.followers[e.follower];
        if e.session.connecting() {
            f.result.error = Some(why.to_string());
            self.shared.connect_failed.fetch_add(1, Ordering::Relaxed);
            self.shared.settle();
            self.in_flight = self.in_flight.saturating_sub(1);
        } else {
            f.result.closed.get_or_insert_with(|| why.to_string());
        }
    }
}

/// One socket of a loop, with its endpoint and connections.
struct Lane {
    ep: quinn_proto::Endpoint,
    sock: UdpSocket,
    udp: quinn::udp::UdpSocketState,
    /// By connection handle.
    /// Boxed: growing the vector past a power of two then moves pointers,
    /// not thousands of quinn-proto connections (kilobytes each).
    conns: Vec<Option<Box<Entry>>>,
    tx: TxBatch,
    /// The socket refused more: wait for POLLOUT.
    tx_blocked: bool,
    /// Connections with packets waiting for the socket (each at most once).
    pending_tx: Vec<usize>,
    /// Most datagrams per GSO message (1: none).
    gso: usize,
    /// What the last `poll(2)` reported readable (set at start).
    ready: bool,
    /// Datagrams received (for the debug log at the end).
    datagrams_in: u64,
}

impl Lane {
    fn new(sock: UdpSocket) -> io::Result<Lane> {
        let udp = quinn::udp::UdpSocketState::new((&sock).into())?;
        let gso = udp.max_gso_segments().max(1);
        let ep = quinn_proto::Endpoint::new(
            Arc::new(quinn_proto::EndpointConfig::default()),
            None,
            !udp.may_fragment(),
            None,
        );
        Ok(Lane {
            ep,
            sock,
            udp,
            conns: Vec::new(),
            tx: TxBatch::new(TX_BATCH),
            tx_blocked: false,
            pending_tx: Vec::new(),
            gso,
            ready: true,
            datagrams_in: 0,
        })
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

pub(super) struct Loop {
    lanes: Vec<Lane>,
    cfg: EngineConfig,
    control: Arc<Control>,
    books: Books,
    /// Followers `..next_start` have been started.
    next_start: usize,
    max_in_flight: usize,
    /// Connect deadlines in start order (the timeout is one constant):
    /// (deadline, slot, generation); at most one per connect in flight
    /// or ended within the timeout.
    deadlines: VecDeque<(Instant, usize, u64)>,
    /// Connections over all lanes.
    live: usize,
    next_gen: u64,
    /// Keyed by slot (see [`Loop::slot`]).
    timers: Timers,
    /// Slots to drive this turn.
    touched: Vec<usize>,
    recv_buf: Vec<u8>,
    meta: Vec<quinn::udp::RecvMeta>,
    scratch: Vec<u8>,
    pollfds: Vec<libc::pollfd>,
    /// The last `poll(2)` reported the eventfd readable (set at start).
    wake_ready: bool,
    /// Set once stopping: until when to wait for the closes to drain.
    stopping: Option<Instant>,
    /// Turns run (for the debug log at the end).
    turns: u64,
}

impl Loop {
    /// A loop over `socks` (at least one); each plan comes with the index
    /// in `socks` of the socket it connects through.
    pub(super) fn new(
        cfg: &EngineConfig,
        max_in_flight: usize,
        socks: Vec<UdpSocket>,
        plans: Vec<(usize, FollowerPlan)>,
        shared: Arc<Shared>,
        control: Arc<Control>,
    ) -> io::Result<Loop> {
        let lanes = socks
            .into_iter()
            .map(Lane::new)
            .collect::<io::Result<Vec<_>>>()?;
        let n = lanes.len().max(1);
        let batch = quinn::udp::BATCH_SIZE.min(32);
        let followers = plans
            .into_iter()
            .map(|(lane, plan)| {
                let start_at = if cfg.connect_rate > 0 {
                    cfg.started
                        + Duration::from_secs_f64(plan.index as f64 / f64::from(cfg.connect_rate))
                } else {
                    cfg.started
                };
                Follower {
                    plan,
                    result: FollowerResult::default(),
                    lane: lane.min(n - 1),
                    start_at,
                }
            })
            .collect();
        Ok(Loop {
            lanes,
            cfg: cfg.clone(),
            control,
            books: Books {
                shared,
                followers,
                in_flight: 0,
            },
            next_start: 0,
            max_in_flight,
            deadlines: VecDeque::new(),
            live: 0,
            next_gen: 1,
            timers: Timers::fixed(cfg.started, TIMER_SLACK),
            touched: Vec::new(),
            recv_buf: vec![0u8; RECV_SLOT * batch],
            meta: vec![quinn::udp::RecvMeta::default(); batch],
            scratch: Vec::new(),
            pollfds: Vec::new(),
            wake_ready: true,
            stopping: None,
            turns: 0,
        })
    }

    /// One number for connection `h` of lane `lane`.
    fn slot(&self, lane: usize, h: usize) -> usize {
        h * self.lanes.len() + lane
    }

    /// (lane, handle) of a slot.
    fn unslot(&self, slot: usize) -> (usize, usize) {
        let n = self.lanes.len().max(1);
        (slot % n, slot / n)
    }

    fn entry(&mut self, slot: usize) -> Option<&mut Entry> {
        let (l, h) = self.unslot(slot);
        self.lanes
            .get_mut(l)
            .and_then(|lane| lane.conns.get_mut(h))
            .and_then(|e| e.as_deref_mut())
    }

    /// Runs until stopped and drained; returns every follower's result with
    /// its index in the run.
    pub(super) fn run(mut self) -> Vec<(usize, FollowerResult)> {
        loop {
            self.turns += 1;
            let now = Instant::now();
            for l in 0..self.lanes.len() {
                if std::mem::take(&mut self.lanes[l].ready) {
                    self.recv(l, now);
                }
            }
            if std::mem::take(&mut self.wake_ready) {
                self.control.waker.drain();
            }
            if self.stopping.is_none() && self.control.stop.load(Ordering::SeqCst) {
                self.begin_stop(now);
            }
            if let Some(until) = self.stopping {
                if self.live == 0 || now >= until {
                    break;
                }
            }
            let now = Instant::now();
            self.expire_timers(now);
            self.expire_connects(now);
            self.start_connects(now);
            self.drive_touched(now);
            for lane in &mut self.lanes {
                lane.flush();
            }
            self.wait();
        }
        for lane in &mut self.lanes {
            lane.flush();
        }
        let (mut turns_in, mut sys, mut msgs, mut dgrams, mut dropped) = (0, 0, 0, 0, 0);
        for lane in &self.lanes {
            turns_in += lane.datagrams_in;
            sys += lane.tx.stats.syscalls;
            msgs += lane.tx.stats.messages;
            dgrams += lane.tx.stats.datagrams;
            dropped += lane.tx.stats.dropped;
        }
        tracing::debug!(
            turns = self.turns,
            datagrams_in = turns_in,
            sendmmsg_calls = sys,
            messages_out = msgs,
            datagrams_out = dgrams,
            dropped,
            "follower loop done"
        );
        std::mem::take(&mut self.books.followers)
            .into_iter()
            .map(|f| (f.plan.index, f.result))
            .collect()
    }

    fn touch(&mut self, slot: usize) {
        if let Some(e) = self.entry(slot) {
            if !e.touched {
                e.touched = true;
                self.touched.push(slot);
            }
        }
    }

    /// Closes every connection and reports the followers not yet settled.
    fn begin_stop(&mut self, now: Instant) {
        self.stopping = Some(now + STOP_DRAIN);
        for f in &mut self.books.followers[self.next_start..] {
            f.result.error = Some("stopped before connecting".into());
        }
        self.next_start = self.books.followers.len();
        let mut slots = Vec::new();
        for (l, lane) in self.lanes.iter_mut().enumerate() {
            for (h, e) in lane.conns.iter_mut().enumerate() {
                let Some(e) = e.as_mut() else { continue };
                if !e.ended {
                    e.ended = true;
                    e.conn.close(now, VarInt::from_u32(0), bye());
                    if e.session.connecting() {
                        let f = &mut self.books.followers[e.follower];
                        f.result.error = Some("stopped while connecting".into());
                        self.books.in_flight = self.books.in_flight.saturating_sub(1);
                    }
                }
                slots.push((l, h));
            }
        }
        for (l, h) in slots {
            let slot = self.slot(l, h);
            self.touch(slot);
        }
    }

    /// Starts the connects that are due, while the loop has slots.
    fn start_connects(&mut self, now: Instant) {
        while self.stopping.is_none()
            && self.books.in_flight < self.max_in_flight
            && self.next_start < self.books.followers.len()
        {
            let k = self.next_start;
            let f = &mut self.books.followers[k];
            if f.start_at > now {
                break;
            }
            self.next_start += 1;
            let server = f.plan.server;
            let l = f.lane;
            let lane = &mut self.lanes[l];
            match lane
                .ep
                .connect(now, self.cfg.client.clone(), server, &self.cfg.server_name)
            {
                Ok((ch, conn)) => {
                    let gen = self.next_gen;
                    self.next_gen += 1;
                    if lane.conns.len() <= ch.0 {
                        lane.conns.resize_with(ch.0 + 1, || None);
                    }
                    lane.conns[ch.0] = Some(Box::new(Entry {
                        conn,
                        session: Session::new(
                            self.cfg.max_feed_frame,
                            self.cfg.live_datagrams,
                            self.cfg.drop_datagrams_every,
                        ),
                        follower: k,
                        gen,
                        touched: false,
                        pending_tx: false,
                        ended: false,
                    }));
                    self.live += 1;
                    self.books.in_flight += 1;
                    let slot = self.slot(l, ch.0);
                    self.deadlines
                        .push_back((now + self.cfg.connect_timeout, slot, gen));
                    self.touch(slot);
                }
                Err(e) => {
                    let why = Failure::Connect(ClientError::Connect(format!("{server}: {e}")));
                    f.result.error = Some(why.to_string());
                    self.books
                        .shared
                        .connect_failed
                        .fetch_add(1, Ordering::Relaxed);
                    self.books.shared.settle();
                }
            }
        }
    }

    /// Fails the followers still connecting at their deadline.
    fn expire_connects(&mut self, now: Instant) {
        while let Some(&(deadline, slot, gen)) = self.deadlines.front() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_front();
            let timeout = self.cfg.connect_timeout;
            let (l, h) = self.unslot(slot);
            let Some(e) = self
                .lanes
                .get_mut(l)
                .and_then(|lane| lane.conns.get_mut(h))
                .and_then(|e| e.as_mut())
            else {
                continue;
            };
            if e.gen != gen || e.ended || !e.session.connecting() {
                continue;
            }
            let server = self.books.followers[e.follower].plan.server;
            let why = Failure::Connect(ClientError::Connect(format!(
                "no answer from {server} within {} s",
                timeout.as_secs_f64()
            )));
            self.books.fail(e, why, now);
            self.touch(slot);
        }
    }

    fn wait(&mut self) {
        let pending = self
            .lanes
            .iter()
            .any(|l| !l.pending_tx.is_empty() && !l.tx_blocked);
        let timeout_ms: i32 = if !self.touched.is_empty() || pending {
            0
        } else if self.stopping.is_some() {
            10
        } else {
            let next_connect = (self.books.in_flight < self.max_in_flight)
                .then(|| self.books.followers.get(self.next_start))
                .flatten()
                .map(|f| f.start_at);
            // The timers' wake-ups are on their grid already; connect
            // deadlines and starts go to the end of their slack window.
            let next = [self.deadlines.front().map(|(d, ..)| *d), next_connect]
                .into_iter()
                .flatten()
                .map(|t| self.timers.wake_time(t, t))
                .chain(self.timers.next())
                .min();
            match next {
                Some(end) => {
                    let d = end.saturating_duration_since(Instant::now());
                    // Rounded up so a timer is never handled early.
                    (d.as_micros().div_ceil(1000)).min(MAX_WAIT_MS as u128) as i32
                }
                None => MAX_WAIT_MS,
            }
        };
        self.pollfds.clear();
        for lane in &self.lanes {
            self.pollfds.push(libc::pollfd {
                fd: lane.sock.as_raw_fd(),
                events: libc::POLLIN | if lane.tx_blocked { libc::POLLOUT } else { 0 },
                revents: 0,
            });
        }
        self.pollfds.push(libc::pollfd {
            fd: self.control.waker.fd(),
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: valid pollfds that live across the call.
        let r = unsafe {
            libc::poll(
                self.pollfds.as_mut_ptr(),
                self.pollfds.len() as libc::nfds_t,
                timeout_ms,
            )
        };
        if r > 0 {
            for (lane, fd) in self.lanes.iter_mut().zip(&self.pollfds) {
                if fd.revents & libc::POLLOUT != 0 {
                    lane.tx_blocked = false;
                }
                // Errors too: the read reports (and clears) them.
                lane.ready = fd.revents & !libc::POLLOUT != 0;
            }
            self.wake_ready = self.pollfds.last().is_some_and(|fd| fd.revents != 0);
        } else if r < 0 {
            // Interrupted: look at everything again.
            for lane in &mut self.lanes {
                lane.ready = true;
            }
            self.wake_ready = true;
        }
    }

    fn recv(&mut self, l: usize, now: Instant) {
        let batch = self.meta.len();
        let mut buf = std::mem::take(&mut self.recv_buf);
        for _round in 0..RECV_ROUNDS {
            let n = {
                let lane = &mut self.lanes[l];
                let mut iovs: Vec<IoSliceMut<'_>> =
                    buf.chunks_mut(RECV_SLOT).map(IoSliceMut::new).collect();
                match lane
                    .udp
                    .recv((&lane.sock).into(), &mut iovs, &mut self.meta)
                {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => break, // WouldBlock: drained; else drop this batch
                }
            };
            for i in 0..n {
                let m = self.meta[i];
                let start = i * RECV_SLOT;
                let mut data = BytesMut::from(&buf[start..start + m.len.min(RECV_SLOT)]);
                while !data.is_empty() {
                    let d = data.split_to(m.stride.max(1).min(data.len()));
                    self.lanes[l].datagrams_in += 1;
                    let ecn = m
                        .ecn
                        .and_then(|e| quinn_proto::EcnCodepoint::from_bits(e as u8));
                    self.on_datagram(l, now, m.addr, m.dst_ip, ecn, d);
                }
            }
            if n < batch {
                break; // drained; poll(2) is level-triggered
            }
        }
        self.recv_buf = buf;
    }

    fn on_datagram(
        &mut self,
        l: usize,
        now: Instant,
        addr: std::net::SocketAddr,
        dst_ip: Option<std::net::IpAddr>,
        ecn: Option<quinn_proto::EcnCodepoint>,
        data: BytesMut,
    ) {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        let lanes = self.lanes.len();
        let slot_of = |h: usize| h * lanes + l;
        let lane = &mut self.lanes[l];
        match lane.ep.handle(now, addr, dst_ip, ecn, data, &mut buf) {
            Some(DatagramEvent::ConnectionEvent(ch, ev)) => {
                if let Some(e) = lane.conns.get_mut(ch.0).and_then(|e| e.as_mut()) {
                    e.conn.handle_event(ev);
                    if !e.touched {
                        e.touched = true;
                        self.touched.push(slot_of(ch.0));
                    }
                }
            }
            // A client endpoint has no server config: nobody connects to it.
            Some(DatagramEvent::NewConnection(incoming)) => lane.ep.ignore(incoming),
            Some(DatagramEvent::Response(t)) if !lane.tx_blocked => {
                if lane.tx.is_full() {
                    lane.flush();
                }
                if !lane.tx.is_full() {
                    lane.tx
                        .push_copy(t.destination, &buf[..t.size.min(buf.len())], None);
                }
            }
            // The socket is full: dropped (the peer retransmits).
            Some(DatagramEvent::Response(_)) => {}
            None => {}
        }
        self.scratch = buf;
    }

    fn expire_timers(&mut self, now: Instant) {
        while let Some((slot, gen)) = self.timers.pop_due(now) {
            let Some(e) = self.entry(slot) else {
                continue;
            };
            if e.gen != gen {
                continue;
            }
            // Maybe the session's retry time: quinn-proto handles only the
            // timers that are due.
            e.conn.handle_timeout(now);
            self.touch(slot);
        }
    }

    fn drive_touched(&mut self, now: Instant) {
        for l in 0..self.lanes.len() {
            let lane = &mut self.lanes[l];
            if lane.tx_blocked || lane.pending_tx.is_empty() {
                continue;
            }
            for h in std::mem::take(&mut lane.pending_tx) {
                if let Some(e) = self.lanes[l].conns.get_mut(h).and_then(|e| e.as_mut()) {
                    e.pending_tx = false;
                }
                let slot = self.slot(l, h);
                self.touch(slot);
            }
        }
        let mut i = 0;
        while i < self.touched.len() {
            let slot = self.touched[i];
            i += 1;
            self.drive(slot, now);
            if i % RECV_EVERY == 0 {
                // A large round takes a while: read the sockets in between
                // so they do not overflow. Connections touched here join
                // the end of this same list.
                for l in 0..self.lanes.len() {
                    self.recv(l, now);
                }
            }
        }
        self.touched.clear();
    }

    /// Handles one connection's events and streams, then queues its packets.
    fn drive(&mut self, slot: usize, now: Instant) {
        let (l, h) = self.unslot(slot);
        let Some(lane) = self.lanes.get_mut(l) else {
            return;
        };
        let Some(e) = lane.conns.get_mut(h).and_then(|e| e.as_mut()) else {
            return;
        };
        e.touched = false;
        let mut drained = false;
        while let Some(ev) = e.conn.poll_endpoint_events() {
            drained |= ev.is_drained();
            if let Some(cev) = lane.ep.handle_event(ConnectionHandle(h), ev) {
                e.conn.handle_event(cev);
            }
        }
        let books = &mut self.books;
        while let Some(ev) = e.conn.poll() {
            let f = &mut books.followers[e.follower];
            let (plan, out) = (&f.plan, &mut f.result);
            let step = match ev {
                Event::Connected => {
                    e.session
                        .on_connected(&mut e.conn, plan, &self.cfg.client_name)
                }
                Event::ConnectionLost { reason } => {
                    Step::Failed(e.session.failure(reason.into(), plan.server))
                }
                Event::Stream(StreamEvent::Opened { dir: Dir::Uni }) => {
                    e.session.accept_feed(&mut e.conn, plan, &books.shared, out)
                }
                Event::Stream(StreamEvent::Opened { dir: Dir::Bi }) => {
                    // The server never opens one; refuse it.
                    while let Some(id) = e.conn.streams().accept(Dir::Bi) {
                        let _ = e.conn.recv_stream(id).stop(VarInt::from_u32(0));
                        let _ = e.conn.send_stream(id).reset(VarInt::from_u32(0));
                    }
                    Step::Continue
                }
                Event::Stream(StreamEvent::Readable { id }) => {
                    e.session
                        .on_readable(&mut e.conn, id, plan, &books.shared, out, now)
                }
                Event::DatagramReceived => {
                    e.session
                        .on_datagrams(&mut e.conn, plan, &books.shared, out);
                    Step::Continue
                }
                Event::Stream(StreamEvent::Writable { .. }) => e.session.write_control(&mut e.conn),
                Event::Stream(StreamEvent::Available { dir: Dir::Bi }) => {
                    e.session.open_control(&mut e.conn)
                }
                Event::Stream(_) | Event::HandshakeDataReady | Event::DatagramsUnblocked => {
                    Step::Continue
                }
            };
            books.apply(step, e, now);
        }
        // Resends for the gaps noticed above, or due to be asked again.
        if !e.ended {
            let f = &mut books.followers[e.follower];
            let step = e
                .session
                .poll(&mut e.conn, &f.plan, &books.shared, &mut f.result, now);
            books.apply(step, e, now);
        }
        // Transmit; when blocked (before or now), driven again once the
        // socket is writable.
        if lane.tx_blocked
            || matches!(
                lane.tx
                    .fill_from(&mut e.conn, now, lane.gso, lane.sock.as_raw_fd()),
                Flush::WouldBlock
            )
        {
            lane.tx_blocked = true;
            if !e.pending_tx {
                e.pending_tx = true;
                lane.pending_tx.push(h);
            }
        }
        while let Some(ev) = e.conn.poll_endpoint_events() {
            drained |= ev.is_drained();
            if let Some(cev) = lane.ep.handle_event(ConnectionHandle(h), ev) {
                e.conn.handle_event(cev);
            }
        }
        // Timer: the connection's, or the follower's next resend retry.
        let t = match (e.conn.poll_timeout(), e.session.retry_at()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.timers.set(slot, e.gen, t, now);
        if drained {
            self.timers.clear(slot);
            if let Some(mut e) = lane.conns[h].take() {
                if !e.ended {
                    let server = self.books.followers[e.follower].plan.server;
                    let why = e
                        .session
                        .failure(ClientError::Connect("connection drained".into()), server);
                    self.books.fail(&mut e, why, now);
                }
            }
            self.live = self.live.saturating_sub(1);
        }
    }
}
