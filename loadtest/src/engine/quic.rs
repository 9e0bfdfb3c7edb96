//! The QUIC client configuration of the `loop` engine's connections: the
//! TLS setup of `herald_client::quic_client_config` (ALPN, pinned or CA
//! trust) with a transport of the same settings (keep-alive, idle timeout,
//! up to 4 incoming unidirectional streams, no bidirectional ones, no path
//! MTU discovery) plus a bounded receive buffer for QUIC datagrams when
//! live datagrams are asked for (docs/protocol.md §8.5).
//!
//! Bound: each connection buffers at most [`DATAGRAM_BUFFER`] bytes of
//! datagrams the loop has not taken yet; past that quinn-proto drops the
//! oldest, which the follower repairs like any lost datagram (Resend). The
//! loop takes a connection's datagrams each time it drives it, so the
//! buffer fills only if a whole fan-out round for one follower (about 250
//! posts of 256 bytes) lands between two turns.

use std::sync::Arc;
use std::time::Duration;

use herald_client::{ClientError, ClientTrust};

/// Datagram bytes one connection holds until the loop reads them.
pub const DATAGRAM_BUFFER: usize = 64 * 1024;

/// Incoming unidirectional streams allowed (the server opens one, the feed).
const MAX_UNI_STREAMS: u32 = 4;

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
    let mut t = quinn_proto::TransportConfig::default();
    t.keep_alive_interval(Some(keep_alive));
    t.max_idle_timeout(Some(
        quinn_proto::IdleTimeout::try_from(idle_timeout)
            .map_err(|e| ClientError::Connect(format!("idle timeout: {e}")))?,
    ));
    t.max_concurrent_uni_streams(MAX_UNI_STREAMS.into());
    t.max_concurrent_bidi_streams(0u32.into());
    t.mtu_discovery_config(None);
    t.datagram_receive_buffer_size(live_datagrams.then_some(DATAGRAM_BUFFER));
    cfg.transport_config(Arc::new(t));
    Ok(cfg)
}
