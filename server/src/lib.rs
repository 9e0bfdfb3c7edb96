//! Herald's server: brands post to channels over HTTP, followers receive the
//! posts over QUIC, every post once, in order, with no gap.
//!
//! A post's path, top-down (imports follow it; nothing imports back up):
//!
//! ```text
//!  brand ─HTTP─▶ api ──▶ store ──(committed, in order)──▶ hub ──▶ feed ──▶ session ──▶ transport ──▶ follower
//!                 │        ▲                               ▲        │                      (QUIC)
//!                 └─▶ promo┘ (campaigns, the slot) ────────┘        └── catch-up reads the store
//! ```
//!
//! | module | what lives there |
//! | --- | --- |
//! | [`admission`] | which QUIC handshakes are taken on: address validation (Retry) under pressure, per-address limits, the handshake timeout |
//! | [`server`] | [`Server`]: binds the listeners, wires the parts, runs them until shutdown, and returns only once every task has ended and every file is released |
//! | [`datadir`] | the data directory's databases: opening them (never an empty or damaged file silently), the marker that tells new from lost, reopening after a failed write |
//! | [`config`] | the configuration (defaults, TOML, flags, environment) and its limits |
//! | [`api`] | the brand HTTP API (axum), `/metrics`, `/healthz`, the OpenAPI document |
//! | [`store`] | the channel log: gapless seqs, durable group commit, retention, catch-up reads |
//! | [`hub`] | who follows what, and the fan-out of each committed event to every follower's queue |
//! | [`feed`] | what flows from the log to one follower: the event, the bounded queue, the frames, the writer that keeps the delivery promise |
//! | [`session`] | one per connected follower: the control stream (Hello, Follow, ...), rate limits, and the feed stream's writer |
//! | [`promo`] | campaigns, the promoted slot's auction, reservations and exact impression counts |
//! | [`tenancy`] | brands, their API keys and roles, channel ownership |
//! | [`cluster`] | cluster mode: the NATS JetStream connection the log, tenancy and promo backends share |
//! | [`check`] | `herald check`: every record of every database read and checked, damage reported |
//! | [`auth`] | follower tokens (JWT, JWKS) and the data directory's secrets |
//! | [`limits`] | the per-key publish rate limiter |
//! | [`tls`] | the server's certificate (self-signed and renewed, or the operator's) |
//! | [`transport`] | QUIC on quinn-proto: per-thread event loops that own the endpoint, the connections, their timers and the UDP socket, with batched sends |
//! | [`metrics`] | every metric's name, and the Prometheus recorder |
//! | [`json`] | request JSON read as the OpenAPI document states it (integers written `5.0`, fields that may be absent but not null) |
//! | [`model`] | the server's domain types (and the protocol's, re-exported) |
//!
//! The wire protocol (messages, framing, error codes) is the `herald-proto`
//! crate; the follower client library is `herald-client`; the `herald`
//! command line is the root package.

#![warn(missing_docs)]

pub mod admission;
pub mod api;
pub mod auth;
pub mod check;
pub mod cluster;
pub mod config;
pub mod datadir;
pub mod feed;
pub mod hub;
pub mod json;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod promo;
pub mod server;
pub mod session;
pub mod store;
pub mod tenancy;
pub mod tls;
pub mod transport;

pub use server::Server;
