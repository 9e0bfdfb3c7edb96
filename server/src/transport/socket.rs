//! The UDP sockets of the event loops: non-blocking, with large kernel
//! buffers, and optionally sharing one port (`SO_REUSEPORT`) between loops.
//!
//! The kernel's default UDP receive buffer (about 208 KiB on Linux) drops
//! datagrams as soon as the ACKs of thousands of followers arrive faster than
//! a loop reads them; every drop costs a retransmission and latency on both
//! sides. Sockets made here ask for [`UDP_BUFFER_BYTES`] each way, with
//! `SO_RCVBUFFORCE` / `SO_SNDBUFFORCE` when the process may (`CAP_NET_ADMIN`),
//! else with the plain options, which the kernel caps at `net.core.rmem_max` /
//! `wmem_max` (a refusal is only logged).

use std::net::{SocketAddr, UdpSocket};

/// Receive and send buffer size requested for each socket.
pub const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Binds a non-blocking UDP socket on `addr` with `buffer_bytes` buffers;
/// with `reuse_port`, further sockets may bind the same port.
pub fn bind(addr: SocketAddr, reuse_port: bool, buffer_bytes: usize) -> std::io::Result<UdpSocket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    if !force_buffer(&s, libc::SO_RCVBUFFORCE, buffer_bytes) {
        if let Err(e) = s.set_recv_buffer_size(buffer_bytes) {
            tracing::debug!(error = %e, "cannot enlarge the UDP receive buffer");
        }
    }
    if !force_buffer(&s, libc::SO_SNDBUFFORCE, buffer_bytes) {
        if let Err(e) = s.set_send_buffer_size(buffer_bytes) {
            tracing::debug!(error = %e, "cannot enlarge the UDP send buffer");
        }
    }
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// Sets a buffer size past the kernel's cap; false if not permitted.
fn force_buffer(s: &socket2::Socket, option: libc::c_int, bytes: usize) -> bool {
    use std::os::fd::AsRawFd;
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt on a valid descriptor with a c_int value.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&v as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    r == 0
}
