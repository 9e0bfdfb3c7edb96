//! Batched UDP transmit: datagrams for many destinations leave in one `sendmmsg(2)`;
//! a transmit holding several same-sized datagrams for one destination goes as one
//! message with a `UDP_SEGMENT` control message (GSO).
//!
//! The batch owns a fixed pool of buffers (`capacity` messages), reused from turn to
//! turn, so transmit memory is per event loop, not per connection: a connection
//! that once sent a burst keeps no transmit buffer of its own afterwards.
//!
//! Public because the load generator's follower loops (crate
//! herald-loadtest) send with it too: each of their datagrams stays its own
//! message, as real followers' are (no GSO across connections), so the
//! server's receive path sees what it would see in the field.
//!
//! Bound: at most `capacity` messages are queued; the loop flushes before
//! queueing more (and, when the socket is full, stops driving connections
//! until it can write again, so nothing here grows).

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// One queued message.
struct Meta {
    dest: socket2::SockAddr,
    segment_size: Option<u16>,
}

/// A fixed pool of transmit buffers sent with one `sendmmsg`.
pub struct TxBatch {
    bufs: Vec<Vec<u8>>,
    meta: Vec<Meta>,
    /// Messages filled.
    len: usize,
    /// Messages of `0..len` already handed to the kernel.
    sent: usize,
    capacity: usize,
    // Scratch for the syscall, kept to avoid reallocating each flush.
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    ctrl: Vec<[u64; 4]>,
    /// GSO stays on until the kernel refuses it once (EIO/EINVAL).
    pub gso_ok: bool,
    /// What was sent so far.
    pub stats: TxStats,
}

/// Counts of a [`TxBatch`].
#[derive(Default, Clone, Copy, Debug)]
pub struct TxStats {
    /// `sendmmsg` (or fallback) calls.
    pub syscalls: u64,
    /// Messages handed to the kernel (a GSO message holds several datagrams).
    pub messages: u64,
    /// Datagrams handed to the kernel.
    pub datagrams: u64,
    /// Datagrams refused for good (QUIC retransmits them).
    pub dropped: u64,
    /// Flushes that found the socket buffer full.
    pub would_block: u64,
}

// SAFETY: the raw pointers in `hdrs`/`iovs` are rebuilt before each syscall and never
// dereferenced outside `flush`; the batch is owned by one thread at a time.
unsafe impl Send for TxBatch {}

/// How a [`TxBatch::flush`] ended.
pub enum Flush {
    /// Everything queued is sent (or dropped after a non-retryable error).
    Done,
    /// The socket buffer is full: wait for POLLOUT and flush again.
    WouldBlock,
}

impl TxBatch {
    /// A batch of at most `capacity` messages.
    pub fn new(capacity: usize) -> Self {
        Self {
            bufs: (0..capacity).map(|_| Vec::new()).collect(),
            meta: Vec::with_capacity(capacity),
            len: 0,
            sent: 0,
            capacity,
            hdrs: Vec::with_capacity(capacity),
            iovs: Vec::with_capacity(capacity),
            ctrl: vec![[0u64; 4]; capacity],
            gso_ok: true,
            stats: TxStats::default(),
        }
    }

    /// No room for another message: flush first.
    pub fn is_full(&self) -> bool {
        self.len == self.capacity
    }

    /// Nothing left to send.
    pub fn is_empty(&self) -> bool {
        self.len == self.sent
    }

    /// The buffer for the next message (cleared); call [`commit`](Self::commit) after filling it.
    /// Must not be called when full.
    pub fn next_buf(&mut self) -> &mut Vec<u8> {
        let b = &mut self.bufs[self.len];
        b.clear();
        b
    }

    /// Queues the message just written into `next_buf()` (first `size` bytes).
    pub fn commit(&mut self, dest: SocketAddr, size: usize, segment_size: Option<usize>) {
        let b = &mut self.bufs[self.len];
        b.truncate(size);
        let seg = match segment_size {
            Some(s) if s < size => Some(s as u16),
            _ => None,
        };
        let meta = Meta {
            dest: dest.into(),
            segment_size: seg,
        };
        if self.meta.len() > self.len {
            self.meta[self.len] = meta;
        } else {
            self.meta.push(meta);
        }
        self.len += 1;
    }

    /// Copies a ready-made datagram in (e.g. an endpoint response).
    pub fn push_copy(&mut self, dest: SocketAddr, data: &[u8], segment_size: Option<usize>) {
        let b = self.next_buf();
        b.extend_from_slice(data);
        self.commit(dest, data.len(), segment_size);
    }

    /// Moves `conn`'s packets into the batch (up to `max_segments` datagrams
    /// per GSO message while the kernel takes GSO), flushing whenever the
    /// batch is full, until the connection has nothing more to send
    /// ([`Flush::Done`]) or the socket is full ([`Flush::WouldBlock`]: call
    /// again once it is writable).
    pub fn fill_from(
        &mut self,
        conn: &mut quinn_proto::Connection,
        now: std::time::Instant,
        max_segments: usize,
        fd: RawFd,
    ) -> Flush {
        let segs = if self.gso_ok { max_segments } else { 1 };
        loop {
            if self.is_full() {
                if let Flush::WouldBlock = self.flush(fd) {
                    return Flush::WouldBlock;
                }
            }
            let buf = self.next_buf();
            match conn.poll_transmit(now, segs, buf) {
                Some(t) => self.commit(t.destination, t.size, t.segment_size),
                None => return Flush::Done,
            }
        }
    }

    /// Sends everything queued. Datagrams the kernel refuses for good are dropped
    /// (QUIC's loss recovery owns retransmission).
    pub fn flush(&mut self, fd: RawFd) -> Flush {
        while self.sent < self.len {
            match self.send_some(fd) {
                Ok(n) => {
                    for m in &self.meta[self.sent..self.sent + n] {
                        self.stats.messages += 1;
                        self.stats.datagrams += m.segment_size.map_or(1, |_| 0);
                    }
                    for i in self.sent..self.sent + n {
                        if let Some(s) = self.meta[i].segment_size {
                            self.stats.datagrams += self.bufs[i].len().div_ceil(s as usize) as u64;
                        }
                    }
                    self.sent += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stats.would_block += 1;
                    return Flush::WouldBlock;
                }
                Err(e) => {
                    let i = self.sent;
                    let gso = self.meta[i].segment_size;
                    if let (Some(seg), Some(libc::EIO) | Some(libc::EINVAL)) =
                        (gso, e.raw_os_error())
                    {
                        // The device refuses segmentation offload: send this one datagram
                        // by datagram and stop asking for GSO.
                        self.gso_ok = false;
                        let dest = self.meta[i].dest.clone();
                        for chunk in self.bufs[i].chunks(seg as usize) {
                            // SAFETY: valid buffer and address for the duration of the call.
                            let r = unsafe {
                                libc::sendto(
                                    fd,
                                    chunk.as_ptr().cast(),
                                    chunk.len(),
                                    0,
                                    dest.as_ptr().cast(),
                                    dest.len(),
                                )
                            };
                            self.stats.syscalls += 1;
                            if r < 0 {
                                self.stats.dropped += 1;
                            } else {
                                self.stats.datagrams += 1;
                            }
                        }
                    } else {
                        self.stats.dropped += 1;
                    }
                    self.sent += 1;
                }
            }
        }
        self.len = 0;
        self.sent = 0;
        Flush::Done
    }

    fn send_some(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = self.len - self.sent;
        self.hdrs.clear();
        self.iovs.clear();
        for i in 0..n {
            let b = &self.bufs[self.sent + i];
            self.iovs.push(libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            });
        }
        for i in 0..n {
            let m = &self.meta[self.sent + i];
            // SAFETY: zeroed mmsghdr is a valid empty header.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = m.dest.as_ptr() as *mut libc::c_void;
            h.msg_hdr.msg_namelen = m.dest.len();
            h.msg_hdr.msg_iov = &mut self.iovs[i] as *mut libc::iovec;
            h.msg_hdr.msg_iovlen = 1;
            if let Some(seg) = m.segment_size {
                let ctrl = &mut self.ctrl[i];
                *ctrl = [0; 4];
                // SAFETY: `ctrl` is 32 bytes, 8-aligned: room for CMSG_SPACE(2) (= 24 on 64-bit).
                unsafe {
                    h.msg_hdr.msg_control = ctrl.as_mut_ptr().cast();
                    h.msg_hdr.msg_controllen = libc::CMSG_SPACE(2) as _;
                    let c = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*c).cmsg_level = libc::SOL_UDP;
                    (*c).cmsg_type = libc::UDP_SEGMENT;
                    (*c).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut u16, seg);
                }
            }
            self.hdrs.push(h);
        }
        self.stats.syscalls += 1;
        // SAFETY: headers point into buffers, addresses and control blocks that live
        // until this call returns.
        let r = unsafe { libc::sendmmsg(fd, self.hdrs.as_mut_ptr(), n as _, 0) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}
