//! Authentication: follower tokens (JWT) checked at Hello, the public keys
//! they may be signed with (JWKS), and the secrets (admin key, token signing
//! secret) kept in the data directory.

pub mod jwks;
mod secrets;
mod token;

pub use jwks::{JwksError, PublicKey};
pub use secrets::{Secrets, SecretsError, ADMIN_KEY_FILE, JWT_SECRET_FILE, RESET_KEY_FILE};
pub use token::{Claims, Follower, ScopedClaims, TokenError, TokenIssuer, TokenVerifier};
