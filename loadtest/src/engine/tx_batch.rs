//! Batched UDP transmit for one socket: the packets of many connections
//! leave in one `sendmmsg(2)`, and same-sized datagrams for one destination
//! go as one message with a `UDP_SEGMENT` control message (GSO): a
//! transmit of several datagrams from one connection, and also consecutive
//! single datagrams of different connections, since every connection of a
//! socket talks to the same server. A follower's ACKs mostly have one size,
//! so a round's ACKs leave as a few GSO messages, each one trip through the
//! kernel's UDP path (and, on loopback, one datagram batch for the
//! server's GRO) instead of one per ACK.
//!
//! Each message carries its address as a plain `sockaddr_storage`
//! converted here.
//!
//! Bound: a fixed pool of `capacity` buffers (the loop's [`TX_BATCH`]),
//! reused from turn to turn; the loop flushes before queueing more, and
//! when the socket is full it stops driving connections until it can write
//! again, so nothing here grows.
//!
//! [`TX_BATCH`]: super::event_loop::TX_BATCH

use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// One queued message's address and GSO segment size.
struct Meta {
    addr: SocketAddr,
    /// Datagrams in the message.
    segments: usize,
    dest: libc::sockaddr_storage,
    dest_len: libc::socklen_t,
    segment_size: Option<u16>,
}

pub(super) struct TxBatch {
    bufs: Vec<Vec<u8>>,
    meta: Vec<Meta>,
    /// Messages filled.
    len: usize,
    /// Messages of `0..len` already handed to the kernel.
    sent: usize,
    // Scratch for the syscall, rebuilt before each one.
    hdrs: Vec<libc::mmsghdr>,
    iovs: Vec<libc::iovec>,
    ctrl: Vec<[u64; 4]>,
    /// GSO stays on until the kernel refuses it once (EIO/EINVAL).
    pub(super) gso_ok: bool,
    /// Most datagrams one GSO message may carry (1: no GSO).
    max_segments: usize,
    /// Datagrams refused for good (QUIC retransmits).
    pub(super) dropped: u64,
    /// `sendmmsg` calls, messages and datagrams handed to the kernel.
    pub(super) syscalls: u64,
    pub(super) messages: u64,
    pub(super) datagrams: u64,
}

// SAFETY: the raw pointers in `hdrs`/`iovs` are rebuilt before each syscall
// and never dereferenced outside `send_some`; one thread owns the batch.
unsafe impl Send for TxBatch {}

/// Largest GSO message (the UDP length field's bound, less headers).
const MAX_GSO_BYTES: usize = 65_000;

pub(super) enum Flush {
    /// Everything queued is sent (or dropped after a non-retryable error).
    Done,
    /// The socket buffer is full: wait for POLLOUT and flush again.
    WouldBlock,
}

/// `addr` as the kernel takes it.
fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_storage is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

impl TxBatch {
    /// A batch of `capacity` messages of up to `max_segments` datagrams.
    pub(super) fn new(capacity: usize, max_segments: usize) -> Self {
        Self {
            bufs: (0..capacity).map(|_| Vec::new()).collect(),
            meta: Vec::with_capacity(capacity),
            len: 0,
            sent: 0,
            hdrs: Vec::with_capacity(capacity),
            iovs: Vec::with_capacity(capacity),
            ctrl: vec![[0u64; 4]; capacity],
            gso_ok: true,
            max_segments: max_segments.max(1),
            dropped: 0,
            syscalls: 0,
            messages: 0,
            datagrams: 0,
        }
    }

    pub(super) fn is_full(&self) -> bool {
        self.len == self.bufs.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == self.sent
    }

    /// The buffer for the next message (cleared); call
    /// [`commit`](Self::commit) after filling it. Not when full.
    pub(super) fn next_buf(&mut self) -> &mut Vec<u8> {
        let b = &mut self.bufs[self.len];
        b.clear();
        b
    }

    /// Queues the message just written into `next_buf()` (first `size`
    /// bytes; datagrams of `segment_size` if several). A single datagram
    /// joins the message before it as one more GSO segment when that one
    /// goes to the same address, has not been handed to the kernel, holds
    /// only datagrams of this size (a shorter one may end it) and has room.
    pub(super) fn commit(&mut self, dest: SocketAddr, size: usize, segment_size: Option<usize>) {
        let single = segment_size.is_none_or(|s| s >= size);
        if single && self.gso_ok && self.len > self.sent && size > 0 {
            let (before, after) = self.bufs.split_at_mut(self.len);
            let prev = &mut before[self.len - 1];
            let m = &mut self.meta[self.len - 1];
            let seg = if m.segments == 1 {
                prev.len()
            } else {
                usize::from(m.segment_size.unwrap_or(0))
            };
            if m.addr == dest
                && seg > 0
                && size <= seg
                && prev.len() % seg == 0
                && m.segments < self.max_segments
                && prev.len() + size <= MAX_GSO_BYTES
                && u16::try_from(seg).is_ok()
            {
                prev.extend_from_slice(&after[0][..size]);
                m.segments += 1;
                m.segment_size = u16::try_from(seg).ok();
                return;
            }
        }
        self.bufs[self.len].truncate(size);
        let seg = match segment_size {
            Some(s) if s < size => u16::try_from(s).ok(),
            _ => None,
        };
        let (sa, sa_len) = sockaddr(dest);
        let meta = Meta {
            addr: dest,
            segments: seg.map_or(1, |s| size.div_ceil(usize::from(s))),
            dest: sa,
            dest_len: sa_len,
            segment_size: seg,
        };
        if self.meta.len() > self.len {
            self.meta[self.len] = meta;
        } else {
            self.meta.push(meta);
        }
        self.len += 1;
    }

    /// Copies a ready-made datagram in (an endpoint's own response).
    pub(super) fn push_copy(&mut self, dest: SocketAddr, data: &[u8]) {
        let b = self.next_buf();
        b.extend_from_slice(data);
        self.commit(dest, data.len(), None);
    }

    /// Sends everything queued. Datagrams the kernel refuses for good are
    /// dropped (QUIC's loss recovery retransmits).
    pub(super) fn flush(&mut self, fd: RawFd) -> Flush {
        while self.sent < self.len {
            match self.send_some(fd) {
                Ok(n) => {
                    let n = n.max(1).min(self.len - self.sent);
                    self.messages += n as u64;
                    self.datagrams += self.meta[self.sent..self.sent + n]
                        .iter()
                        .map(|m| m.segments as u64)
                        .sum::<u64>();
                    self.sent += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flush::WouldBlock,
                Err(e) => {
                    let i = self.sent;
                    if let (Some(seg), Some(libc::EIO) | Some(libc::EINVAL)) =
                        (self.meta[i].segment_size, e.raw_os_error())
                    {
                        // No segmentation offload here: send this one
                        // datagram by datagram and stop asking for GSO.
                        self.gso_ok = false;
                        let m = &self.meta[i];
                        for chunk in self.bufs[i].chunks(usize::from(seg)) {
                            // SAFETY: valid buffer and address for the call.
                            let r = unsafe {
                                libc::sendto(
                                    fd,
                                    chunk.as_ptr().cast(),
                                    chunk.len(),
                                    0,
                                    (&m.dest as *const libc::sockaddr_storage).cast(),
                                    m.dest_len,
                                )
                            };
                            if r < 0 {
                                self.dropped += 1;
                            }
                        }
                    } else {
                        self.dropped += 1;
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
            let m = &mut self.meta[self.sent + i];
            // SAFETY: a zeroed mmsghdr is a valid empty header.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&mut m.dest as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = m.dest_len;
            h.msg_hdr.msg_iov = &mut self.iovs[i] as *mut libc::iovec;
            h.msg_hdr.msg_iovlen = 1;
            if let Some(seg) = m.segment_size {
                let ctrl = &mut self.ctrl[i];
                *ctrl = [0; 4];
                // SAFETY: `ctrl` is 32 bytes, 8-aligned: room for
                // CMSG_SPACE(2) (24 on 64-bit).
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
        self.syscalls += 1;
        // SAFETY: the headers point into buffers, addresses and control
        // blocks that live until this call returns.
        let r = unsafe { libc::sendmmsg(fd, self.hdrs.as_mut_ptr(), n as _, 0) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r as usize)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_reaches_its_destination() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest = rx.local_addr().unwrap();
        let mut b = TxBatch::new(4, 1);
        for i in 0..3u8 {
            b.push_copy(dest, &[i; 10]);
        }
        use std::os::fd::AsRawFd;
        assert!(matches!(b.flush(tx.as_raw_fd()), Flush::Done));
        assert!(b.is_empty());
        let mut buf = [0u8; 64];
        for i in 0..3u8 {
            let (n, _) = rx.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], &[i; 10]);
        }
    }

    #[test]
    fn same_sized_datagrams_share_a_gso_message() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let dest = rx.local_addr().unwrap();
        let other: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut b = TxBatch::new(8, 3);
        // Four of 10 bytes (three fit one message), one short, one elsewhere.
        for (d, n) in [
            (dest, 10),
            (dest, 10),
            (dest, 10),
            (dest, 10),
            (dest, 4),
            (other, 10),
        ] {
            b.push_copy(d, &vec![7u8; n]);
        }
        let sizes: Vec<_> = (0..b.len)
            .map(|i| (b.bufs[i].len(), b.meta[i].segments))
            .collect();
        assert_eq!(sizes, vec![(30, 3), (14, 2), (10, 1)]);
        assert_eq!(b.meta[0].segment_size, Some(10));
        assert_eq!(b.meta[1].segment_size, Some(10));
        assert_eq!(b.meta[2].segment_size, None);
        // A longer datagram never joins shorter ones.
        let mut b = TxBatch::new(8, 64);
        b.push_copy(dest, &[1u8; 10]);
        b.push_copy(dest, &[1u8; 12]);
        assert_eq!(b.len, 2);
    }
}
