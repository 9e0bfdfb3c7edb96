//! Tenancy: brands, their API keys and roles, and which brand owns each
//! channel (with the channel's settings).
//!
//! [`TenancyStore`] is what the API uses; two stores implement it:
//! - [`Tenancy`] (embedded, the default): its own redb file
//!   ([`TENANCY_FILE`]) in the data directory. Writes are rare (an admin or an
//!   owner managing keys) and commit durably one at a time on tokio's
//!   blocking pool; everything is also cached in memory.
//! - [`KvTenancy`] (cluster mode): JetStream KV buckets shared by every
//!   Herald node, mirrored in memory on each (see [`kv`]).
//!
//! Either way, authenticating a request is a map lookup and a hash.

mod keys;
pub mod kv;
mod model;
mod redb_store;

pub use keys::{generate as generate_key, hash as hash_key, key_id, NewKey, KEY_PREFIX};
pub use kv::KvTenancy;
pub use model::{
    validate_brand_id, validate_len, validate_url, Brand, ChannelMeta, Grant, KeyRecord, Role,
    ALL_CHANNELS, MAX_BRAND_ID_LEN, MAX_DESCRIPTION_BYTES, MAX_GRANTS, MAX_NAME_BYTES,
    MAX_URL_BYTES,
};
pub use redb_store::{verify, Tenancy, TENANCY_CACHE_BYTES, TENANCY_FILE, TENANCY_SPEC};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// A tenancy operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TenancyError {
    /// A brand with this id exists already.
    #[error("brand {0:?} already exists")]
    BrandExists(String),
    /// No brand has this id.
    #[error("no brand {0:?}")]
    UnknownBrand(String),
    /// The brand has no key with this id.
    #[error("no key {0:?} in this brand")]
    UnknownKey(String),
    /// The channel already belongs to a brand.
    #[error("channel {0:?} already belongs to a brand")]
    ChannelClaimed(String),
    /// The channel belongs to no brand.
    #[error("channel {0:?} has no brand")]
    UnknownChannel(String),
    /// Reading or writing the store failed, or a record there is corrupt.
    #[error("tenancy storage error: {0}")]
    Storage(String),
    /// `brands.redb` cannot take writes right now; it is reopened once it can.
    #[error("tenancy storage unavailable: {0}")]
    Unavailable(String),
}

fn storage(e: impl std::fmt::Display) -> TenancyError {
    TenancyError::Storage(e.to_string())
}

/// Why a presented key was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRefused {
    /// Not a key: wrong format, no such key id, or the secret does not match.
    Unknown,
    /// A genuine key that was revoked.
    Revoked,
}

/// A boxed future returned by [`TenancyStore`] writes.
pub type TenancyFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, TenancyError>> + Send + 'a>>;

/// A change to a channel's settings. It may run more than once (the cluster
/// store re-runs it when another node changed the settings meanwhile), so it
/// must depend only on the settings it is given.
pub type MetaChange = Box<dyn Fn(&mut ChannelMeta) + Send + Sync>;

/// Brands, keys and channel ownership. Reads are from memory; writes are
/// durable when their future resolves.
pub trait TenancyStore: Send + Sync + 'static {
    /// Creates a brand.
    fn create_brand(&self, id: String, name: String) -> TenancyFuture<'_, Brand>;
    /// A brand by id.
    fn brand(&self, id: &str) -> Option<Brand>;
    /// Every brand, by id.
    fn brands(&self) -> Vec<Brand>;
    /// Creates a key for `brand`; returns its record and the key, which is
    /// never stored and cannot be shown again.
    fn create_key(
        &self,
        brand: String,
        label: String,
        grants: Vec<Grant>,
    ) -> TenancyFuture<'_, (KeyRecord, String)>;
    /// A key record by id.
    fn key(&self, id: &str) -> Option<Arc<KeyRecord>>;
    /// The keys of `brand` (revoked ones too), oldest first.
    fn keys_of(&self, brand: &str) -> Vec<KeyRecord>;
    /// Revokes a key of `brand` (revoking twice keeps the first time).
    fn revoke_key(&self, brand: String, id: String) -> TenancyFuture<'_, KeyRecord>;
    /// The record of a presented key, if the key is genuine and not revoked.
    fn authenticate(&self, key: &str) -> Result<Arc<KeyRecord>, KeyRefused>;
    /// Like [`TenancyStore::authenticate`], but a store shared with other
    /// nodes also asks the shared store about a key this node has not seen
    /// yet (created elsewhere a moment ago).
    fn authenticate_fresh<'a>(
        &'a self,
        key: &'a str,
    ) -> Pin<Box<dyn Future<Output = Result<Arc<KeyRecord>, KeyRefused>> + Send + 'a>> {
        Box::pin(std::future::ready(self.authenticate(key)))
    }
    /// A channel's brand and settings, if it belongs to a brand.
    fn channel_meta(&self, channel: &str) -> Option<ChannelMeta>;
    /// Records that `channel` belongs to `meta.brand`; fails if it already
    /// belongs to one.
    fn claim_channel(&self, channel: String, meta: ChannelMeta) -> TenancyFuture<'_, ()>;
    /// Undoes [`TenancyStore::claim_channel`] (when creating the channel failed).
    fn release_channel(&self, channel: String) -> TenancyFuture<'_, ()>;
    /// Changes a claimed channel's settings; returns the new settings.
    fn update_channel(&self, channel: String, change: MetaChange)
        -> TenancyFuture<'_, ChannelMeta>;
    /// Waits for writes in flight; called at shutdown.
    fn close(&self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Whether the store can take writes now.
    fn health(&self) -> crate::datadir::Health {
        crate::datadir::Health::Ok
    }
    /// Tries to make a store that failed a write usable again (blocking).
    fn recover(&self) {}
}
