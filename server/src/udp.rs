//! UDP sockets for QUIC endpoints with larger kernel buffers.
//!
//! The kernel's default UDP receive buffer (about 208 KiB on Linux) drops
//! datagrams as soon as a burst of fan-out, or the ACKs of thousands of
//! followers, arrives faster than the endpoint's one receive task drains it;
//! every drop costs a retransmission and latency on both sides. Endpoints
//! made here ask for [`UDP_BUFFER_BYTES`] each way (the kernel caps the
//! request at `net.core.rmem_max` / `wmem_max`; a refusal is only logged).

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;

/// Receive and send buffer size requested for each endpoint socket.
pub const UDP_BUFFER_BYTES: usize = 4 * 1024 * 1024;

/// Binds the UDP socket for `addr` (before anything else is set up, so a
/// taken port fails the start early).
pub fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    UdpSocket::bind(addr)
}

/// Gives `socket` large buffers and wraps it in a quinn endpoint.
pub fn endpoint(
    socket: UdpSocket,
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    let state = quinn::udp::UdpSocketState::new((&socket).into())?;
    if let Err(e) = state.set_recv_buffer_size((&socket).into(), UDP_BUFFER_BYTES) {
        tracing::debug!(error = %e, "cannot enlarge the UDP receive buffer");
    }
    if let Err(e) = state.set_send_buffer_size((&socket).into(), UDP_BUFFER_BYTES) {
        tracing::debug!(error = %e, "cannot enlarge the UDP send buffer");
    }
    let runtime: Arc<dyn quinn::Runtime> = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime: call inside tokio"))?;
    quinn::Endpoint::new(config, server, socket, runtime)
}
