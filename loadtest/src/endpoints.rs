//! The follower endpoints of a run: `--endpoints` UDP sockets shared by all
//! followers, each with a `--client-buffer-mib` receive and send buffer.
//!
//! A fan-out round sends every follower its packet within a few hundred
//! milliseconds; on one machine the followers' sockets must hold the round
//! until the load generator has read it, or the kernel drops packets and
//! QUIC's loss recovery (timeouts that double) stretches the round to tens
//! of seconds — measuring the load generator, not the server. The kernel
//! caps `SO_RCVBUF` at `net.core.rmem_max`; run as root, the load generator
//! asks with `SO_RCVBUFFORCE` / `SO_SNDBUFFORCE`, which may exceed it.
//! Receiving is quinn's own (`recvmmsg` with GRO, one task per endpoint).

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use herald_client::{quic_client_config, ClientOptions};

use crate::LoadError;

/// `count` client endpoints for `opts`' trust and keep-alive, with
/// `buffer_bytes` socket buffers each way (forced when allowed).
pub fn open(
    opts: &ClientOptions,
    count: usize,
    buffer_bytes: usize,
) -> Result<Vec<quinn::Endpoint>, LoadError> {
    let err = |e: std::io::Error| LoadError::Target(format!("cannot open a client endpoint: {e}"));
    let bind: SocketAddr = if opts.servers.first().is_some_and(SocketAddr::is_ipv6) {
        SocketAddr::from(([0u16; 8], 0))
    } else {
        SocketAddr::from(([0u8; 4], 0))
    };
    let config = quic_client_config(
        &opts.trust,
        herald_proto::ALPN,
        opts.keep_alive,
        opts.idle_timeout,
    )
    .map_err(|e| LoadError::Target(e.to_string()))?;
    let runtime: Arc<dyn quinn::Runtime> =
        quinn::default_runtime().ok_or_else(|| LoadError::Target("no async runtime".into()))?;
    (0..count)
        .map(|_| {
            let socket = UdpSocket::bind(bind).map_err(err)?;
            set_buffers(&socket, buffer_bytes);
            let mut ep = quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                socket,
                runtime.clone(),
            )
            .map_err(err)?;
            ep.set_default_client_config(config.clone());
            Ok(ep)
        })
        .collect()
}

/// Asks for `bytes` each way: forced (root), else as far as the caps allow.
pub(crate) fn set_buffers(socket: &UdpSocket, bytes: usize) {
    let fd = socket.as_raw_fd();
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    for (forced, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        // SAFETY: setsockopt with a valid descriptor and a c_int value.
        let set = |opt| unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&v as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if set(forced) != 0 && set(plain) != 0 {
            tracing::debug!(bytes, "cannot set a client socket buffer");
        }
    }
}
