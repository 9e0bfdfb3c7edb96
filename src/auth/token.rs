//! Follower tokens: HS256 JWTs whose `sub` is the follower id. Verified for
//! signature and `exp` (and `nbf` when present); an optional `channels` claim
//! limits which channels the token may follow.

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;

/// The claims Herald reads from a follower token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Follower id.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
    /// Issued at, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Not before, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// If present, the only channels this token may follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<Vec<String>>,
}

/// An authenticated follower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Follower {
    pub id: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub channels: Option<Vec<String>>,
}

impl Follower {
    /// Whether this follower's token allows following `channel`.
    pub fn may_follow(&self, channel: &str) -> bool {
        self.channels
            .as_ref()
            .is_none_or(|list| list.iter().any(|c| c == channel))
    }
}

/// A token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token has expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl TokenError {
    /// The wire code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            TokenError::Expired => ErrorCode::TokenExpired,
            TokenError::Invalid(_) => ErrorCode::Unauthenticated,
        }
    }
}

/// Checks follower tokens.
#[derive(Clone)]
pub struct TokenVerifier {
    key: DecodingKey,
    validation: Validation,
}

impl TokenVerifier {
    /// Verifies HS256 tokens signed with `secret`.
    pub fn hs256(secret: &[u8]) -> TokenVerifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        TokenVerifier {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Verifies `token` and returns the follower it names.
    pub fn verify(&self, token: &str) -> Result<Follower, TokenError> {
        use jsonwebtoken::errors::ErrorKind;
        match decode::<Claims>(token, &self.key, &self.validation) {
            Ok(data) => {
                let c = data.claims;
                if c.sub.is_empty() || c.sub.len() > 256 {
                    return Err(TokenError::Invalid("sub must be 1 to 256 bytes".into()));
                }
                Ok(Follower {
                    id: c.sub,
                    expires_at: c.exp,
                    channels: c.channels,
                })
            }
            Err(e) => match e.kind() {
                ErrorKind::ExpiredSignature => Err(TokenError::Expired),
                ErrorKind::ImmatureSignature => {
                    Err(TokenError::Invalid("token is not valid yet (nbf)".into()))
                }
                ErrorKind::InvalidSignature => Err(TokenError::Invalid("bad signature".into())),
                _ => Err(TokenError::Invalid(e.to_string())),
            },
        }
    }
}

/// Mints follower tokens (for the CLI, tests and the load tester; production
/// apps mint them in their own backend with the same secret).
#[derive(Clone)]
pub struct TokenIssuer {
    key: EncodingKey,
}

impl TokenIssuer {
    /// Signs HS256 tokens with `secret`.
    pub fn hs256(secret: &[u8]) -> TokenIssuer {
        TokenIssuer {
            key: EncodingKey::from_secret(secret),
        }
    }

    /// Signs `claims`.
    pub fn sign(&self, claims: &Claims) -> Result<String, TokenError> {
        encode(&Header::new(Algorithm::HS256), claims, &self.key)
            .map_err(|e| TokenError::Invalid(e.to_string()))
    }

    /// A token for follower `sub`, valid for `ttl` from now.
    pub fn mint(&self, sub: &str, ttl: std::time::Duration) -> Result<String, TokenError> {
        let now = crate::model::now_ms() / 1000;
        self.sign(&Claims {
            sub: sub.to_string(),
            exp: now + ttl.as_secs() as i64,
            iat: Some(now),
            nbf: None,
            channels: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn good_bad_and_expired_tokens() {
        let issuer = TokenIssuer::hs256(b"secret");
        let verifier = TokenVerifier::hs256(b"secret");
        let t = issuer.mint("alice", Duration::from_secs(60)).unwrap();
        assert_eq!(verifier.verify(&t).unwrap().id, "alice");

        let other = TokenVerifier::hs256(b"other");
        assert!(matches!(other.verify(&t), Err(TokenError::Invalid(_))));
        assert!(matches!(
            verifier.verify("junk"),
            Err(TokenError::Invalid(_))
        ));

        let now = crate::model::now_ms() / 1000;
        let expired = issuer
            .sign(&Claims {
                sub: "bob".into(),
                exp: now - 10,
                iat: None,
                nbf: None,
                channels: None,
            })
            .unwrap();
        assert_eq!(verifier.verify(&expired), Err(TokenError::Expired));

        let early = issuer
            .sign(&Claims {
                sub: "carol".into(),
                exp: now + 100,
                iat: None,
                nbf: Some(now + 50),
                channels: None,
            })
            .unwrap();
        assert!(matches!(
            verifier.verify(&early),
            Err(TokenError::Invalid(_))
        ));
    }

    #[test]
    fn channel_claim_limits_follows() {
        let f = Follower {
            id: "x".into(),
            expires_at: 0,
            channels: Some(vec!["a".into()]),
        };
        assert!(f.may_follow("a"));
        assert!(!f.may_follow("b"));
    }
}
