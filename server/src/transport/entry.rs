//! One connection as its loop holds it: quinn-proto's state machine, the
//! state shared with the application, and the stream I/O between them (the
//! control stream read into the inbound queue, control replies and feed
//! frames written from their queues into QUIC streams).
//!
//! Order: a follower's frames go into one queue in push order and are written
//! into one QUIC stream in queue order (`write_chunks` takes a prefix; the
//! rest stays at the front of the queue), and QUIC delivers a stream in order.
//!
//! Isolation: a full queue or a closed flow-control window stops only writes
//! to this connection; the loop never waits on a connection.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use quinn_proto::{ReadError, StreamId, VarInt, WriteError};

use super::connection::{CloseReason, ConnShared, FeedScratch, InEnd};
use super::wake::lock;
use crate::admission::Ticket;

/// Pulls from the feed source per `write_feed` call at most; beyond it the
/// connection is scheduled again for the next turn.
const MAX_PULLS: usize = 8;

/// Writes `chunks` into stream `id` until all are taken or quinn refuses
/// more, and returns how many whole chunks it took (a chunk taken in part is
/// left, shortened, at that index) and their bytes.
///
/// A write that quinn cuts short (the connection's flow-control window or
/// our send window ran out mid-way) is followed by another, which quinn then
/// refuses with `Blocked`: only a refused write puts the stream on quinn's
/// list of streams to wake with `Writable` when the window opens again. A
/// partial write alone would leave the rest of the queue waiting forever.
fn write_until_blocked(
    conn: &mut quinn_proto::Connection,
    id: StreamId,
    chunks: &mut [Bytes],
) -> Result<(usize, usize), WriteError> {
    let (mut taken, mut bytes) = (0, 0);
    while taken < chunks.len() {
        match conn.send_stream(id).write_chunks(&mut chunks[taken..]) {
            Ok(w) if w.chunks == 0 && w.bytes == 0 => break,
            Ok(w) => {
                taken += w.chunks;
                bytes += w.bytes;
            }
            Err(WriteError::Blocked) => break,
            Err(e) => return Err(e),
        }
    }
    Ok((taken, bytes))
}

pub(super) struct Entry {
    pub(super) conn: quinn_proto::Connection,
    pub(super) shared: Arc<ConnShared>,
    /// On the loop's list of connections to drive this turn.
    pub(super) touched: bool,
    /// Waiting for the socket to take more transmits.
    pub(super) pending_tx: bool,
    pub(super) feed: Option<StreamId>,
    pub(super) control: Option<StreamId>,
    /// The handshake is over (counted once, whether it succeeded or not).
    pub(super) established: bool,
    /// The handshake's place in the admission counts, given back (dropped)
    /// when it ends.
    pub(super) ticket: Option<Ticket>,
    /// The application was told the connection ended.
    pub(super) lost: bool,
}

impl Entry {
    pub(super) fn new(
        conn: quinn_proto::Connection,
        shared: Arc<ConnShared>,
        ticket: Ticket,
    ) -> Entry {
        Entry {
            conn,
            shared,
            touched: false,
            pending_tx: false,
            feed: None,
            control: None,
            established: false,
            ticket: Some(ticket),
            lost: false,
        }
    }

    /// Records the end of the connection and wakes whoever waits on it.
    pub(super) fn mark_closed(&mut self, reason: CloseReason) {
        self.lost = true;
        let s = &*self.shared;
        {
            let mut q = lock(&s.feed);
            q.closed = true;
            q.frames = VecDeque::new();
            q.bytes = 0;
        }
        let reader = {
            let mut st = lock(&s.ctl);
            if st.closed.is_none() {
                st.closed = Some(reason);
            }
            st.outbound = VecDeque::new();
            st.out_bytes = 0;
            st.reader.take()
        };
        if let Some(w) = reader {
            w.wake();
        }
        s.changed.notify_waiters();
        s.feed_room.notify_waiters();
        s.ctl_room.notify_waiters();
    }

    /// Closes the connection locally and tells the application.
    pub(super) fn close(&mut self, now: Instant, code: VarInt, reason: Bytes) {
        self.conn.close(now, code, reason.clone());
        self.mark_closed(CloseReason::Local { code, reason });
    }

    /// Takes the peer's control stream (the first bidirectional one) and
    /// refuses any other.
    pub(super) fn accept_control(&mut self) {
        while let Some(id) = self.conn.streams().accept(quinn_proto::Dir::Bi) {
            if self.control.is_none() {
                self.control = Some(id);
                lock(&self.shared.ctl).opened = true;
                self.shared.changed.notify_waiters();
                self.read_control();
            } else {
                let _ = self.conn.recv_stream(id).stop(VarInt::from_u32(0));
                let _ = self.conn.send_stream(id).reset(VarInt::from_u32(0));
            }
        }
    }

    /// Opens the feed stream if the peer allows it now.
    pub(super) fn open_feed(&mut self, scratch: &mut FeedScratch) {
        if self.feed.is_some() || self.lost {
            return;
        }
        self.feed = self.conn.streams().open(quinn_proto::Dir::Uni);
        if self.feed.is_some() {
            lock(&self.shared.feed).opened = true;
            self.shared.changed.notify_waiters();
            self.write_feed(scratch);
        }
    }

    /// Moves readable control bytes into the inbound queue, up to its bound.
    pub(super) fn read_control(&mut self) {
        let Some(id) = self.control else { return };
        let cap = self.shared.ctl_in_cap;
        let mut got = false;
        let reader = {
            let mut st = lock(&self.shared.ctl);
            if st.in_end.is_some() || st.in_paused {
                return;
            }
            match self.conn.recv_stream(id).read(true) {
                Ok(mut chunks) => {
                    loop {
                        if st.in_bytes >= cap {
                            st.in_paused = true;
                            break;
                        }
                        match chunks.next(cap - st.in_bytes) {
                            Ok(Some(c)) => {
                                st.in_bytes += c.bytes.len();
                                st.inbound.push_back(c.bytes);
                                got = true;
                            }
                            Ok(None) => {
                                st.in_end = Some(InEnd::Finished);
                                got = true;
                                break;
                            }
                            Err(ReadError::Blocked) => break,
                            Err(ReadError::Reset(code)) => {
                                st.in_end = Some(InEnd::Reset(code));
                                got = true;
                                break;
                            }
                        }
                    }
                    // The caller drives transmits for this connection
                    // afterwards, which sends any flow-control credit
                    // this read released.
                    let _ = chunks.finalize();
                }
                Err(_) => {
                    st.in_end = Some(InEnd::Reset(VarInt::from_u32(0)));
                    got = true;
                }
            }
            if got {
                st.reader.take()
            } else {
                None
            }
        };
        if let Some(w) = reader {
            w.wake();
        }
    }

    /// Resumes reading the control stream if the application made room.
    pub(super) fn resume_control(&mut self) {
        let resume = {
            let mut st = lock(&self.shared.ctl);
            let r = st.in_paused && st.in_bytes <= self.shared.ctl_in_cap / 2;
            if r {
                st.in_paused = false;
            }
            r
        };
        if resume {
            self.read_control();
        }
    }

    /// Writes queued control replies into the control stream.
    pub(super) fn write_control(&mut self) {
        let Some(id) = self.control else { return };
        let wake = {
            let mut st = lock(&self.shared.ctl);
            if st.outbound.is_empty() {
                return;
            }
            let chunks = st.outbound.make_contiguous();
            match write_until_blocked(&mut self.conn, id, chunks) {
                Ok((taken, bytes)) => {
                    st.outbound.drain(..taken);
                    st.out_bytes -= bytes;
                }
                Err(_) => {
                    st.outbound = VecDeque::new();
                    st.out_bytes = 0;
                }
            }
            let wake = st.out_waiting && st.out_bytes <= self.shared.ctl_out_cap / 2;
            if wake {
                st.out_waiting = false;
            }
            wake
        };
        if wake {
            self.shared.ctl_room.notify_waiters();
        }
    }

    /// Writes queued feed frames into the feed stream, as many as QUIC
    /// takes; once the queue is empty, pulls live frames from the feed
    /// source (if any) and writes them too, keeping what QUIC does not take
    /// yet at the front of the (then empty) queue. So frames leave in the
    /// order they were queued or pulled, and the queue stays within its
    /// bound: a pull asks for at most `feed_cap` bytes, and only into an
    /// empty queue. `scratch` is the loop's, reused.
    ///
    /// Frames the source hands out as datagrams go as QUIC DATAGRAM frames
    /// when they fit one (quinn drops the oldest unsent datagram if its
    /// bounded send buffer is full: the follower then asks for it again,
    /// protocol §8.5), otherwise into the stream with the rest. Not after
    /// stream frames written in the same call, though: quinn puts a packet's
    /// datagrams before its stream data, so they would overtake what was
    /// queued before them (a promoted post's frame, the end of a catch-up);
    /// those go into the stream behind it.
    pub(super) fn write_feed(&mut self, scratch: &mut FeedScratch) {
        let Some(id) = self.feed else { return };
        let mut pulls = 0;
        let mut wrote_stream = false;
        loop {
            let wake = {
                let mut q = lock(&self.shared.feed);
                if q.closed {
                    return;
                }
                if !q.frames.is_empty() {
                    let chunks = q.frames.make_contiguous();
                    match write_until_blocked(&mut self.conn, id, chunks) {
                        Ok((taken, bytes)) => {
                            q.frames.drain(..taken);
                            q.bytes -= bytes;
                            wrote_stream |= bytes > 0;
                        }
                        Err(_) => {
                            q.closed = true;
                            q.frames = VecDeque::new();
                            q.bytes = 0;
                        }
                    }
                }
                if q.frames.is_empty() && q.finish && !q.closed {
                    let _ = self.conn.send_stream(id).finish();
                    q.closed = true;
                }
                // An idle follower should not keep a burst's worth of queue.
                if q.frames.is_empty() && q.frames.capacity() > 16 {
                    q.frames = VecDeque::new();
                }
                let wake = q.waiting && (q.closed || q.bytes <= self.shared.feed_cap / 2);
                if wake {
                    q.waiting = false;
                }
                if !q.frames.is_empty() || q.closed {
                    drop(q);
                    if wake {
                        self.shared.feed_room.notify_waiters();
                    }
                    return;
                }
                wake
            };
            if wake {
                self.shared.feed_room.notify_waiters();
            }
            // The queue is empty: pull live frames.
            let Some(source) = self.shared.source.get() else {
                return;
            };
            // Bounded per call, so one busy follower cannot hold the loop.
            if pulls == MAX_PULLS {
                self.shared.schedule();
                return;
            }
            pulls += 1;
            let FeedScratch {
                stream: scratch,
                datagrams,
                datagrams_sent,
            } = &mut *scratch;
            scratch.clear();
            datagrams.clear();
            let more = source.pull(self.shared.feed_cap, scratch, datagrams);
            if !datagrams.is_empty() {
                // Fixed for the connection (no path MTU discovery), so read
                // once at the handshake instead of per datagram.
                let max = if wrote_stream {
                    0
                } else {
                    self.shared.datagram_max.load(Ordering::Relaxed)
                };
                for f in datagrams.drain(..) {
                    if f.len() > max {
                        scratch.push(f);
                    } else if self.conn.datagrams().send(f, true).is_ok() {
                        *datagrams_sent += 1;
                    }
                    // (`send` fails only for a frame too large or a peer
                    // without datagrams, both ruled out above.)
                }
            }
            if scratch.is_empty() {
                if !more {
                    return;
                }
                continue;
            }
            let written = match write_until_blocked(&mut self.conn, id, scratch) {
                Ok((taken, bytes)) => {
                    wrote_stream |= bytes > 0;
                    taken
                }
                Err(_) => {
                    scratch.clear();
                    self.feed_stopped();
                    return;
                }
            };
            if written < scratch.len() {
                let mut q = lock(&self.shared.feed);
                for f in scratch.drain(written..) {
                    q.bytes += f.len();
                    q.frames.push_back(f);
                }
                scratch.clear();
                return;
            }
            scratch.clear();
            if !more {
                return;
            }
        }
    }

    /// The peer stopped the feed stream: nothing more can be written.
    pub(super) fn feed_stopped(&mut self) {
        {
            let mut q = lock(&self.shared.feed);
            q.closed = true;
            q.frames = VecDeque::new();
            q.bytes = 0;
        }
        self.shared.feed_room.notify_waiters();
    }
}
