//! The connection IDs the server issues: 12 bytes, 8 of them random and 4 a
//! keyed signature of those 8.
//!
//! Why not quinn-proto's `HashedConnectionIdGenerator`: its IDs carry 3
//! random bytes (16.7 million possible IDs), and quinn-proto draws the
//! source connection ID of a stateless Retry without checking it against the
//! IDs in use (it checks only those it gives to connections). With 10,000
//! followers holding several IDs each, about one Retry in 300 then names an
//! ID an established connection already has; the client's next Initial is
//! routed to that connection, which discards it, again on every retransmit,
//! until the client gives up (seen: 1 to 4 of 3,000 clients per connect storm
//! with Retry always on, none with it off). With 8 random bytes a collision
//! is out of reach (about `ids / 2^64` per Retry).
//!
//! The signature lets the endpoint tell an ID it issued (even before a
//! restart: the key comes from the persisted reset secret) from a random
//! one, as quinn-proto's generator does; and with several loops on one port
//! the first byte, modulo the number of loops, names the loop that owns the
//! connection (see `steering`).

use std::time::Duration;

use quinn_proto::{ConnectionId, ConnectionIdGenerator, InvalidCid};
use rand::RngCore;

/// Random bytes of an ID.
const NONCE_LEN: usize = 8;
/// Signature bytes of an ID.
const SIGNATURE_LEN: usize = 4;
/// Length of every ID the server issues.
pub const CID_LEN: usize = NONCE_LEN + SIGNATURE_LEN;

/// Most loops steering can address (one byte of the ID).
pub const MAX_LOOPS: usize = 64;

/// Issues keyed connection IDs, for loop `index` of `loops` (see the module
/// docs).
pub struct KeyedCids {
    key: ring::hmac::Key,
    index: u8,
    loops: u8,
}

impl KeyedCids {
    /// IDs signed with `key` for loop `index` of `loops` (one loop: 0 of 1).
    pub fn new(key: u64, index: usize, loops: usize) -> KeyedCids {
        let loops = loops.clamp(1, MAX_LOOPS);
        KeyedCids {
            key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key.to_le_bytes()),
            index: (index % loops) as u8,
            loops: loops as u8,
        }
    }

    /// HMAC-SHA256 of the nonce, cut to [`SIGNATURE_LEN`] bytes: stable
    /// across builds, so a restarted server recognises the IDs of the
    /// previous process.
    fn signature(&self, nonce: &[u8]) -> [u8; SIGNATURE_LEN] {
        let tag = ring::hmac::sign(&self.key, nonce);
        let mut sig = [0u8; SIGNATURE_LEN];
        sig.copy_from_slice(&tag.as_ref()[..SIGNATURE_LEN]);
        sig
    }
}

impl ConnectionIdGenerator for KeyedCids {
    fn generate_cid(&mut self) -> ConnectionId {
        let mut bytes = [0u8; CID_LEN];
        let mut rng = rand::rng();
        // The first byte is uniformly random: `loops` draws on average.
        loop {
            rng.fill_bytes(&mut bytes[..NONCE_LEN]);
            if bytes[0] % self.loops == self.index {
                break;
            }
        }
        let sig = self.signature(&bytes[..NONCE_LEN]);
        bytes[NONCE_LEN..].copy_from_slice(&sig);
        ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &ConnectionId) -> Result<(), InvalidCid> {
        if cid.len() != CID_LEN {
            return Err(InvalidCid);
        }
        let (nonce, sig) = cid.split_at(NONCE_LEN);
        if self.signature(nonce)[..] == sig[..] {
            Ok(())
        } else {
            Err(InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_LEN
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_validate_under_their_key_only_and_steer_to_their_loop() {
        let mut g = KeyedCids::new(7, 2, 4);
        let other = KeyedCids::new(8, 2, 4);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let cid = g.generate_cid();
            assert_eq!(cid.len(), CID_LEN);
            assert_eq!(cid[0] % 4, 2);
            assert!(g.validate(&cid).is_ok());
            assert!(other.validate(&cid).is_err());
            assert!(seen.insert(cid), "an ID repeated within 10,000");
        }
        // A random ID of the right length is (almost always) refused.
        let junk = ConnectionId::new(&[0x5a; CID_LEN]);
        assert!(g.validate(&junk).is_err());
        assert!(g.validate(&ConnectionId::new(&[1, 2, 3])).is_err());
    }

    #[test]
    fn every_loop_of_one_key_validates_the_others_ids() {
        // Stateless resets: any loop (or a restarted server) recognises them.
        for loops in [1, 2, 3, 8] {
            for index in 0..loops {
                let mut g = KeyedCids::new(42, index, loops);
                for _ in 0..50 {
                    let cid = g.generate_cid();
                    assert_eq!(cid[0] as usize % loops, index);
                    assert!(KeyedCids::new(42, 0, 1).validate(&cid).is_ok());
                }
            }
        }
    }
}
