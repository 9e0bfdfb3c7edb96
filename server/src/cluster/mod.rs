//! The cluster mode's connection to NATS JetStream, shared by the three
//! backends that live there: the channel log (`store::jetstream`), brands and
//! keys (`tenancy::kv`) and campaigns (`promo::cluster_store`).
//!
//! Selected by `herald serve --cluster nats://a:4222,nats://b:4222` or a
//! `[cluster]` section in the configuration; without it nothing here runs and
//! the server keeps everything in its data directory (redb).
//!
//! - [`nats`]: [`ClusterConfig`] (URLs, replicas, resource names, timeouts,
//!   this node's id), [`Nats`] (the connection and JetStream context) and
//!   the few raw JetStream requests Herald needs with typed outcomes.
//! - [`kvcache`]: a KV bucket mirrored in memory on every node and kept
//!   fresh by a watch; every KV-backed store reads from it.
//!
//! This module sits below `store`, `tenancy` and `promo` and imports none of
//! them.

pub mod kvcache;
pub mod nats;

pub use nats::{ClusterConfig, Nats, NatsError};
