//! Herald: the server behind broadcast channels.
//!
//! Brands post to a channel over the HTTP API ([`api`]); each post is made
//! durable in the channel log ([`store`]), then encoded once and fanned out
//! ([`hub`]) to every follower's session ([`session`]), which writes it to the
//! follower's QUIC feed stream. Followers use [`client`] to connect, follow,
//! and resume from the last seq they saw. [`server::Server`] wires the parts
//! together and runs them until shutdown.

pub mod api;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod promo;
pub mod proto;
pub mod server;
pub mod session;
pub mod store;
pub mod tenancy;
pub mod tls;
pub mod udp;
pub mod wire;

/// ALPN protocol id spoken on the QUIC port.
pub const ALPN: &[u8] = b"herald/1";
