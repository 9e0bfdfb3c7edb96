//! The transport's settings: what QUIC runs with, and every bound on what the
//! event loops hold for the application and for peers.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::admission::HandshakePolicy;

/// Settings of a [`Transport`](super::Transport). Every queue the loops keep
/// is bounded by one of these.
#[derive(Clone)]
pub struct TransportConfig {
    /// QUIC and TLS settings for accepted connections (TLS 1.3 and ALPN are
    /// in its crypto config).
    pub server: Arc<quinn_proto::ServerConfig>,
    /// Endpoint settings: the stateless-reset key and the connection-id
    /// generator.
    pub endpoint: Arc<quinn_proto::EndpointConfig>,
    /// The UDP address to bind.
    pub listen: SocketAddr,
    /// Event loops (one thread, endpoint and socket each) on the same port
    /// (`SO_REUSEPORT`, packets steered by connection ID: see `steering`).
    pub loops: usize,
    /// Key of the connection IDs the loops issue when there are several
    /// (with one loop, `endpoint`'s own generator is used). Keep it across
    /// restarts, as `endpoint`'s, so old connections get stateless resets.
    pub cid_key: u64,
    /// Bytes of feed frames a connection may have queued for its feed stream
    /// and not yet taken by QUIC; a writer past it waits for room.
    pub feed_queue_bytes: usize,
    /// Bytes of the peer's control stream held for the application; when
    /// full the loop stops reading, and QUIC flow control pushes back.
    pub control_in_bytes: usize,
    /// Bytes of control replies queued and not yet taken by QUIC; a sender
    /// past it waits for room.
    pub control_out_bytes: usize,
    /// Established connections waiting for [`Transport::accept`](super::Transport::accept);
    /// beyond it new connections are closed with [`BUSY`](super::BUSY).
    pub accept_backlog: usize,
    /// Connections (handshaking or established) at once over all loops;
    /// further connection attempts are refused.
    pub max_connections: usize,
    /// Which handshakes are taken on, and for how long (see
    /// [`crate::admission`]): Retry under pressure, per-address limits, the
    /// handshake timeout, and `max_in_progress` handshakes in flight at once
    /// over all loops (split evenly between them; further attempts wait
    /// their turn in a queue, within the timeout).
    pub handshakes: HandshakePolicy,
    /// Connection attempts waiting for a handshake slot, per loop; beyond it
    /// they are refused.
    pub handshake_queue: usize,
    /// Most GSO segments per transmit (1 disables GSO).
    pub gso_segments: usize,
    /// Kernel socket buffer size requested each way.
    pub udp_buffer_bytes: usize,
    /// Called on each loop's thread at the end of every turn (the server
    /// adds what the live feed path counted on that thread to its metrics,
    /// once per turn instead of once per delivery).
    pub turn_hook: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl TransportConfig {
    /// Defaults around `server` and `endpoint`, listening on `listen`.
    pub fn new(
        server: quinn_proto::ServerConfig,
        endpoint: quinn_proto::EndpointConfig,
        listen: SocketAddr,
    ) -> TransportConfig {
        TransportConfig {
            server: Arc::new(server),
            endpoint: Arc::new(endpoint),
            listen,
            loops: 1,
            cid_key: rand::random(),
            feed_queue_bytes: 64 * 1024,
            control_in_bytes: 16 * 1024,
            control_out_bytes: 64 * 1024,
            accept_backlog: 1024,
            max_connections: 1_000_000,
            handshakes: HandshakePolicy {
                max_in_progress: 4096,
                retry_above: usize::MAX,
                per_address: usize::MAX,
                timeout: std::time::Duration::from_secs(10),
            },
            handshake_queue: 4096,
            gso_segments: 10,
            udp_buffer_bytes: super::socket::UDP_BUFFER_BYTES,
            turn_hook: None,
        }
    }
}
