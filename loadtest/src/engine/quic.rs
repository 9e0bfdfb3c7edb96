//! The QUIC client configuration of the `loop` engine's connections: the
//! reference client's (`herald_client::quic_client_config`: ALPN, pinned or
//! CA trust, `herald_client::follower_transport`), with a smaller receive
//! buffer for QUIC datagrams, or none when live datagrams are not asked for
//! (docs/protocol.md §8.5).
//!
//! Bound: each connection buffers at most [`DATAGRAM_BUFFER`] bytes of
//! datagrams the loop has not taken yet; past that quinn-proto drops the
//! oldest, which the follower repairs like any lost datagram (Resend). The
//! loop takes a connection's datagrams each time it drives it, so the
//! buffer fills only if a whole fan-out round for one follower (about 250
//! posts of 256 bytes) lands between two turns.

use std::sync::Arc;
use std::time::Duration;

use herald_client::{follower_transport, ClientError, ClientTrust};

/// Datagram bytes one connection holds until the loop reads them.
pub const DATAGRAM_BUFFER: usize = 64 * 1024;

/// A client configuration for the loop engine; `live_datagrams` turns on
/// receiving QUIC datagrams (the `max_datagram_frame_size` transport
/// parameter), off leaves datagrams unnegotiated.
pub fn client_config(
    trust: &ClientTrust,
    keep_alive: Duration,
    idle_timeout: Duration,
    live_datagrams: bool,
) -> Result<quinn_proto::ClientConfig, ClientError> {
    let mut cfg =
        herald_client::quic_client_config(trust, herald_proto::ALPN, keep_alive, idle_timeout)?;
    cfg.transport_config(Arc::new(follower_transport(
        keep_alive,
        idle_timeout,
        live_datagrams.then_some(DATAGRAM_BUFFER),
    )?));
    Ok(cfg)
}
