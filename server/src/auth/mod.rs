//! Authentication: follower tokens (JWT) checked at Hello, the public keys
//! they may be signed with (JWKS), and the secrets (admin key, token signing
//! secret) kept in the data directory.

pub mod jwks;
mod secrets;
mod token;

pub use jwks::{JwksError, PublicKey};
pub use secrets::{Secrets, SecretsError, ADMIN_KEY_FILE, JWT_SECRET_FILE, RESET_KEY_FILE};
pub use token::{Claims, Follower, ScopedClaims, TokenError, TokenIssuer, TokenVerifier};

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_works() {
        assert!(super::constant_time_eq(b"abc", b"abc"));
        assert!(!super::constant_time_eq(b"abc", b"abd"));
        assert!(!super::constant_time_eq(b"abc", b"abcd"));
    }
}
