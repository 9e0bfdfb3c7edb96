//! One client connection: QUIC handshake, control stream, Hello/Welcome.

use std::sync::Arc;

use quinn::{ConnectionError, RecvStream, SendStream};

use super::ClientOptions;
use crate::trust::{ClientTrust, TrustError};
use herald_proto::frame::{encode_frame, FrameError, FrameReader};
use herald_proto::v1 as pb;
use herald_proto::ErrorCode;

/// The request id of Hello (the driver numbers later requests after it).
pub(crate) const HELLO_REQUEST_ID: u64 = 1;

/// Largest control frame the client accepts.
const MAX_CONTROL_FRAME: usize = 64 * 1024;

/// Bytes of received QUIC datagrams (live posts, `docs/protocol.md` §8.5)
/// buffered until the driver reads them. When it is full, quinn drops the
/// oldest; the ordering rules notice the missing seqs and ask for them again.
pub const DATAGRAM_RECEIVE_BUFFER: usize = 1024 * 1024;

/// The `max_ack_delay` a follower asks the server to use (QUIC's default);
/// with an ack-eliciting threshold of 0 it applies to nothing in practice.
const IMMEDIATE_ACK_DELAY: std::time::Duration = std::time::Duration::from_millis(25);

/// A client operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    /// The connection could not be made or was lost.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The server closed the connection (or refused the session) with a code.
    #[error("refused by server: {message} ({})", code_name(*code))]
    Refused {
        /// The close code, if this build knows it.
        code: Option<ErrorCode>,
        /// The server's reason.
        message: String,
    },
    /// The server answered a request with an Error.
    #[error("request failed: {message} ({})", code_name(*code))]
    Request {
        /// The error code, if this build knows it.
        code: Option<ErrorCode>,
        /// The server's message.
        message: String,
    },
    /// The server sent something this client cannot understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection dropped before the answer came.
    #[error("disconnected before the answer came")]
    Disconnected,
    /// The client was closed.
    #[error("client is closed")]
    Closed,
}

/// `shutting_down (10)`, or `unknown code` for a number this build does not know.
fn code_name(code: Option<ErrorCode>) -> String {
    code.map_or_else(|| "unknown code".to_string(), |c| c.to_string())
}

impl From<TrustError> for ClientError {
    fn from(e: TrustError) -> Self {
        ClientError::Connect(e.to_string())
    }
}

impl From<ConnectionError> for ClientError {
    fn from(e: ConnectionError) -> Self {
        match e {
            ConnectionError::ApplicationClosed(c) => ClientError::Refused {
                code: u32::try_from(c.error_code.into_inner())
                    .ok()
                    .and_then(ErrorCode::from_u32),
                message: String::from_utf8_lossy(&c.reason).into_owned(),
            },
            other => ClientError::Connect(other.to_string()),
        }
    }
}

impl ClientError {
    /// Whether reconnecting may help.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Refused { code, .. } => matches!(
                code,
                None | Some(ErrorCode::ShuttingDown)
                    | Some(ErrorCode::LaggingTooOften)
                    | Some(ErrorCode::Overloaded)
                    | Some(ErrorCode::Internal)
                    | Some(ErrorCode::StorageUnavailable)
            ),
            ClientError::Connect(_) | ClientError::Disconnected => true,
            _ => false,
        }
    }

    pub(crate) fn from_frame(conn: &quinn::Connection, e: FrameError) -> ClientError {
        match (conn.close_reason(), e) {
            (Some(reason), _) => reason.into(),
            (None, FrameError::Io(io)) => ClientError::Connect(io.to_string()),
            (None, other) => ClientError::Protocol(other.to_string()),
        }
    }
}

/// A QUIC client config for `trust` and ALPN `alpn`.
pub fn quic_client_config(
    trust: &ClientTrust,
    alpn: &[u8],
    keep_alive: std::time::Duration,
    idle_timeout: std::time::Duration,
) -> Result<quinn::ClientConfig, ClientError> {
    let crypto = crate::trust::client_crypto(trust, alpn)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    // Allows the server to send live datagrams (it sends them only to a
    // Hello that asks).
    cfg.transport_config(Arc::new(follower_transport(
        keep_alive,
        idle_timeout,
        Some(DATAGRAM_RECEIVE_BUFFER),
    )?));
    Ok(cfg)
}

/// A follower's QUIC transport settings: `keep_alive`, `idle_timeout`, up
/// to 4 incoming unidirectional streams (the server opens one, the feed), no
/// bidirectional ones, no path MTU discovery, and with `datagram_buffer`
/// live datagrams received and buffered up to that many bytes (`None`:
/// datagrams not negotiated).
///
/// It also asks the server, through the ACK-frequency extension, to
/// acknowledge each ack-eliciting packet at once (threshold 0) rather than
/// up to 25 ms later. A follower sends few of them (keep-alives, Hello,
/// Follow, Resend), so this costs no extra packets; what it saves is the
/// server's second wake-up per keep-alive, for a delayed ACK, which is
/// most of what 100k idle followers cost it (docs/performance.md).
pub fn follower_transport(
    keep_alive: std::time::Duration,
    idle_timeout: std::time::Duration,
    datagram_buffer: Option<usize>,
) -> Result<quinn::TransportConfig, ClientError> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(keep_alive));
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle_timeout)
            .map_err(|e| ClientError::Connect(format!("idle timeout: {e}")))?,
    ));
    t.max_concurrent_uni_streams(4u32.into());
    t.max_concurrent_bidi_streams(0u32.into());
    t.mtu_discovery_config(None);
    t.datagram_receive_buffer_size(datagram_buffer);
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(quinn::VarInt::from_u32(0))
        .max_ack_delay(Some(IMMEDIATE_ACK_DELAY));
    t.ack_frequency_config(Some(ack));
    Ok(t)
}

/// A client endpoint for `opts`; `large_buffers` asks the kernel for
/// [`crate::udp::UDP_BUFFER_BYTES`] socket buffers (for endpoints many
/// connections share).
pub(crate) fn client_endpoint(
    opts: &ClientOptions,
    large_buffers: bool,
) -> Result<quinn::Endpoint, ClientError> {
    let bind: std::net::SocketAddr = if opts.servers.first().is_some_and(|s| s.is_ipv6()) {
        "[::]:0"
            .parse()
            .map_err(|e: std::net::AddrParseError| ClientError::Connect(e.to_string()))?
    } else {
        "0.0.0.0:0"
            .parse()
            .map_err(|e: std::net::AddrParseError| ClientError::Connect(e.to_string()))?
    };
    let endpoint = if large_buffers {
        crate::udp::endpoint(bind, quinn::EndpointConfig::default(), None)
    } else {
        quinn::Endpoint::client(bind)
    };
    let mut endpoint = endpoint.map_err(|e| ClientError::Connect(e.to_string()))?;
    endpoint.set_default_client_config(quic_client_config(
        &opts.trust,
        herald_proto::ALPN,
        opts.keep_alive,
        opts.idle_timeout,
    )?);
    Ok(endpoint)
}

/// Opens a bare QUIC connection (no Hello), for tools and tests that speak
/// the protocol themselves. `alpn` is normally [`herald_proto::ALPN`].
pub async fn connect_raw(
    server: std::net::SocketAddr,
    trust: &ClientTrust,
    alpn: &[u8],
) -> Result<(quinn::Endpoint, quinn::Connection), ClientError> {
    let mut endpoint = quinn::Endpoint::client(
        "127.0.0.1:0"
            .parse()
            .map_err(|e: std::net::AddrParseError| ClientError::Connect(e.to_string()))?,
    )
    .map_err(|e| ClientError::Connect(e.to_string()))?;
    endpoint.set_default_client_config(quic_client_config(
        trust,
        alpn,
        std::time::Duration::from_secs(10),
        std::time::Duration::from_secs(30),
    )?);
    let conn = endpoint
        .connect(server, "localhost")
        .map_err(|e| ClientError::Connect(e.to_string()))?
        .await?;
    Ok((endpoint, conn))
}

/// An established, authenticated connection.
pub(crate) struct Conn {
    pub conn: quinn::Connection,
    pub ctl_send: SendStream,
    pub ctl_recv: FrameReader<RecvStream>,
    pub session_id: u64,
    /// The server sends live posts as datagrams too (Welcome said so).
    pub live_datagrams: bool,
}

impl Conn {
    /// Handshake, Hello, Welcome with `server`, within `opts.connect_timeout`.
    pub async fn open(
        endpoint: &quinn::Endpoint,
        opts: &ClientOptions,
        server: std::net::SocketAddr,
    ) -> Result<Conn, ClientError> {
        match tokio::time::timeout(opts.connect_timeout, Self::open_now(endpoint, opts, server))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(ClientError::Connect(format!(
                "no answer from {} within {} s",
                server,
                opts.connect_timeout.as_secs_f64()
            ))),
        }
    }

    async fn open_now(
        endpoint: &quinn::Endpoint,
        opts: &ClientOptions,
        server: std::net::SocketAddr,
    ) -> Result<Conn, ClientError> {
        let conn = endpoint
            .connect(server, &opts.server_name)
            .map_err(|e| ClientError::Connect(format!("{server}: {e}")))?
            .await
            .map_err(|e| match ClientError::from(e) {
                ClientError::Connect(m) => ClientError::Connect(format!("{server}: {m}")),
                other => other,
            })?;
        let (mut ctl_send, ctl_recv) = conn.open_bi().await?;
        let hello = pb::ClientFrame {
            request_id: HELLO_REQUEST_ID,
            kind: Some(pb::client_frame::Kind::Hello(pb::Hello {
                token: opts.token.clone(),
                client_name: opts.client_name.clone(),
                // The driver confirms every promoted post (Seen).
                receipts: true,
                live_datagrams: opts.live_datagrams,
            })),
        };
        ctl_send
            .write_all(&encode_frame(&hello))
            .await
            .map_err(|e| match conn.close_reason() {
                Some(r) => r.into(),
                None => ClientError::Connect(e.to_string()),
            })?;
        let mut ctl_recv = FrameReader::new(ctl_recv, MAX_CONTROL_FRAME);
        let frame = match ctl_recv.read_frame::<pb::ServerFrame>().await {
            Ok(Some(f)) => f,
            Ok(None) => {
                return Err(match conn.closed().await {
                    ConnectionError::LocallyClosed => ClientError::Closed,
                    e => e.into(),
                })
            }
            Err(e) => {
                // The server closes right after refusing; wait for the reason.
                let _ =
                    tokio::time::timeout(std::time::Duration::from_secs(2), conn.closed()).await;
                return Err(ClientError::from_frame(&conn, e));
            }
        };
        match frame.kind {
            Some(pb::server_frame::Kind::Welcome(w)) => Ok(Conn {
                conn,
                ctl_send,
                ctl_recv,
                session_id: w.session_id,
                // Only if asked for: a server that grants what was not asked
                // is not believed.
                live_datagrams: w.live_datagrams && opts.live_datagrams,
            }),
            Some(pb::server_frame::Kind::Error(e)) => Err(ClientError::Refused {
                code: ErrorCode::from_u32(e.code),
                message: e.message,
            }),
            _ => Err(ClientError::Protocol("expected Welcome".into())),
        }
    }
}
