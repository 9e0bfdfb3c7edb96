//! The QUIC transport: quinn-proto (quinn's state machine without I/O)
//! driven by one event loop per thread, each owning a
//! [`quinn_proto::Endpoint`], all of its connections, one timer heap and one
//! UDP socket.
//!
//! # Why this shape
//!
//! Herald's paced fan-out (one small frame per follower per post) pays QUIC's
//! per-packet costs once per delivery. With stock quinn every connection is
//! driven by its own task: each delivery woke the session's writer, the
//! connection's driver and the endpoint, and each packet left in its own
//! `sendmsg`. Here a fan-out round is: frames are pushed into each
//! follower's bounded queue (a reference count of one shared `Bytes`, never
//! a copy) and the loop is woken at most once (`wake`); the loop writes every
//! changed connection's queue into its stream, polls every connection for
//! packets and sends all of them with `sendmmsg` (GSO when one connection
//! has several packets); receiving uses `recvmmsg` and GRO. So a round costs
//! O(loops) wake-ups and O(packets / batch) syscalls, not O(followers) of
//! each. Transmit buffers belong to the loop, not to the connection, so an
//! idle follower holds no transmit buffer; and there is no per-connection
//! task, timer or channel.
//!
//! The application side is async and small: [`Transport::accept`] yields
//! established connections; a [`Connection`] offers the follower's control
//! stream as an `AsyncRead` ([`ControlReader`]), [`Connection::send_control`]
//! for replies, a [`FeedStream`] (the server-opened unidirectional stream,
//! a bounded queue of frames whose writer waits for room) and close codes.
//! TLS 1.3 and the ALPN are whatever the `quinn_proto::ServerConfig` in
//! [`TransportConfig`] says (the server gives it TLS 1.3 only, `herald/1`).
//!
//! | file | job |
//! | --- | --- |
//! | `config` | [`TransportConfig`]: QUIC settings and every bound |
//! | `socket` | binding UDP sockets with large buffers |
//! | `endpoint` | [`Transport`]: starts the loops, accepts, shuts down |
//! | `event_loop` | one loop: receive, admit, timers, drive, transmit, wait |
//! | `entry` | one connection as the loop holds it, and its stream I/O |
//! | `connection` | one connection as the application holds it |
//! | `wake` | how the application wakes a loop without losing a wake-up |
//! | `timers` | the loop's timer heap |
//! | `tx_batch` | `sendmmsg` + GSO batches |
//! | `steering` | several loops on one port: packets steered by connection ID |
//! | `cids` | the connection IDs the server issues (keyed, 8 random bytes) |
//!
//! # Bounds
//!
//! Every queue is bounded; the bound is named where the queue is defined:
//! feed frames per connection (`feed_queue_bytes`; beyond it QUIC's own send
//! buffer is bounded by the follower's stream window and
//! `TransportConfig::send_window`), control bytes each way
//! (`control_in_bytes`, `control_out_bytes`), established connections not
//! yet accepted (`accept_backlog`), connections (`max_connections`),
//! handshakes in flight (`max_handshakes`) and attempts waiting for one
//! (`handshake_queue`), the loop's dirty list (each connection at most once),
//! its timer heap (compacted), and its transmit batch ([`TX_BATCH`] buffers).
//!
//! # Known gaps
//!
//! - With `loops > 1`, a handshake whose client changes address before it
//!   completes lands on another loop (long-header packets are steered by
//!   address; see `steering`) and fails; the client connects again.
//! - ECN marks and the source address of outgoing packets (`IP_PKTINFO`) are
//!   not set: bind a specific address, not a wildcard, on multi-homed hosts.
//! - Timers have 1 ms resolution (`poll(2)`); pacing delays are rounded up.

pub mod cids;
mod config;
mod connection;
mod endpoint;
mod entry;
mod event_loop;
pub mod socket;
mod steering;
mod table;
pub mod timers;
pub mod tx_batch;
mod wake;

pub use config::TransportConfig;
pub use connection::{
    CloseReason, Closed, Connection, ControlReader, FeedSource, FeedStream, FeedWaker, GOING_AWAY,
};
pub use endpoint::{LoopStats, Transport};
pub use event_loop::TX_BATCH;
pub use quinn_proto::{ConnectionError, VarInt};

/// Application close code used when the accept backlog is full.
pub const BUSY: VarInt = VarInt::from_u32(herald_proto::ErrorCode::Overloaded as u32);

#[cfg(test)]
mod tests;
