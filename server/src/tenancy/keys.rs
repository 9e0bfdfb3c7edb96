//! API key material. A key reads `hk_<id>_<secret>`: the id (16 hex) finds
//! the record, the secret (64 hex, 256 random bits) proves possession. Only
//! the SHA-256 of the whole string is stored; the key is shown once.

use std::sync::Arc;

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{KeyRecord, KeyRefused};

/// Prefix of every brand API key.
pub const KEY_PREFIX: &str = "hk_";

/// A freshly made key: its id and the full secret string.
pub struct NewKey {
    /// The key id: 16 hex digits.
    pub id: String,
    /// The whole key, `hk_<id>_<secret>` with a 64 hex digit secret: to be shown
    /// once, never stored.
    pub key: String,
}

/// Makes a new random key.
pub fn generate() -> NewKey {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rand::rng().fill_bytes(&mut id);
    rand::rng().fill_bytes(&mut secret);
    let id = hex::encode(id);
    let key = format!("{KEY_PREFIX}{id}_{}", hex::encode(secret));
    NewKey { id, key }
}

/// The key id inside `key`, if it has the key format.
pub fn key_id(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex_ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex_ok(id, 16) && hex_ok(secret, 64)).then_some(id)
}

/// Hex SHA-256 of `key`.
pub fn hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The record of a presented key, found by its id with `lookup`, if the key
/// is genuine (its hash matches, compared in constant time) and not revoked.
/// Every store authenticates through this one check.
pub(super) fn authenticate(
    key: &str,
    lookup: impl FnOnce(&str) -> Option<Arc<KeyRecord>>,
) -> Result<Arc<KeyRecord>, KeyRefused> {
    let id = key_id(key).ok_or(KeyRefused::Unknown)?;
    let rec = lookup(id).ok_or(KeyRefused::Unknown)?;
    if !bool::from(hash(key).as_bytes().ct_eq(rec.hash.as_bytes())) {
        return Err(KeyRefused::Unknown);
    }
    if rec.revoked_at_ms.is_some() {
        return Err(KeyRefused::Revoked);
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_hash_stably() {
        let k = generate();
        assert_eq!(key_id(&k.key), Some(k.id.as_str()));
        assert_eq!(hash(&k.key), hash(&k.key));
        assert_ne!(hash(&k.key), hash(&generate().key));
        assert_eq!(key_id("hk_admin_abc"), None);
        assert_eq!(key_id("nope"), None);
    }
}
