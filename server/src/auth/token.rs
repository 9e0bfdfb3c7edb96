//! Follower tokens: JWTs whose `sub` is the follower id, signed with HS256
//! (the server's shared secret) or ES256 / RS256 (public keys from a JWKS
//! file, [`super::jwks`]). Verified for signature, `exp`, `nbf` when present,
//! and `iss` / `aud` when the server is configured with them; an optional
//! `channels` claim limits which channels the token may follow.

use jsonwebtoken::{
    decode, decode_header, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation,
};

use super::jwks::PublicKey;
use serde::{Deserialize, Serialize};

use herald_proto::ErrorCode;

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

/// Claims with issuer and audience, for issuers that set them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ScopedClaims {
    /// The claims Herald reads (flattened into the same JSON object).
    #[serde(flatten)]
    pub claims: Claims,
    /// Issuer; must match `auth.issuer` when the server is configured with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Audience; must name `auth.audience` when the server is configured with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// An authenticated follower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Follower {
    /// The token's `sub`: 1 to 256 bytes.
    pub id: String,
    /// Unix seconds.
    pub expires_at: i64,
    /// The token's `channels` claim: when present, the only channels this
    /// follower may follow; `None`: any channel.
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
    /// The token's `exp` has passed (wire code `token_expired`).
    #[error("token has expired")]
    Expired,
    /// Anything else: malformed, bad signature, no matching key, not yet valid,
    /// wrong issuer or audience, bad `sub` (wire code `unauthenticated`). The text
    /// says which.
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
    hs256: DecodingKey,
    public: Vec<PublicKey>,
    issuer: Option<String>,
    audience: Option<String>,
}

impl TokenVerifier {
    /// Verifies HS256 tokens signed with `secret`.
    pub fn hs256(secret: &[u8]) -> TokenVerifier {
        TokenVerifier {
            hs256: DecodingKey::from_secret(secret),
            public: Vec::new(),
            issuer: None,
            audience: None,
        }
    }

    /// Also accepts ES256 / RS256 tokens signed by one of `keys`.
    pub fn with_public_keys(mut self, keys: Vec<PublicKey>) -> TokenVerifier {
        self.public = keys;
        self
    }

    /// Requires `iss` to be `issuer`, when given.
    pub fn with_issuer(mut self, issuer: Option<String>) -> TokenVerifier {
        self.issuer = issuer;
        self
    }

    /// Requires `aud` to name `audience`, when given.
    pub fn with_audience(mut self, audience: Option<String>) -> TokenVerifier {
        self.audience = audience;
        self
    }

    fn validation(&self, alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = 0;
        v.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            required.push("iss");
        }
        match &self.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                required.push("aud");
            }
            None => v.validate_aud = false,
        }
        v.set_required_spec_claims(&required);
        v
    }

    /// The keys that may have signed a token with this header.
    fn keys_for<'a>(&'a self, header: &'a Header) -> Vec<&'a DecodingKey> {
        match header.alg {
            Algorithm::HS256 => vec![&self.hs256],
            Algorithm::ES256 | Algorithm::RS256 => self
                .public
                .iter()
                .filter(|k| k.alg == header.alg)
                .filter(|k| match (&header.kid, &k.kid) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                })
                .map(|k| &k.key)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Verifies `token` and returns the follower it names.
    pub fn verify(&self, token: &str) -> Result<Follower, TokenError> {
        let header = decode_header(token).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let keys = self.keys_for(&header);
        if keys.is_empty() {
            return Err(TokenError::Invalid(format!(
                "no key for algorithm {:?}{}",
                header.alg,
                header
                    .kid
                    .as_deref()
                    .map(|k| format!(" and kid {k:?}"))
                    .unwrap_or_default()
            )));
        }
        let validation = self.validation(header.alg);
        let mut last = TokenError::Invalid("bad signature".into());
        for key in keys {
            match decode::<Claims>(token, key, &validation) {
                Ok(data) => return follower(data.claims),
                Err(e) => {
                    last = refusal(e);
                    if last != TokenError::Invalid("bad signature".into()) {
                        // The signature was good; the claims were not.
                        return Err(last);
                    }
                }
            }
        }
        Err(last)
    }
}

fn follower(c: Claims) -> Result<Follower, TokenError> {
    if c.sub.is_empty() || c.sub.len() > 256 {
        return Err(TokenError::Invalid("sub must be 1 to 256 bytes".into()));
    }
    Ok(Follower {
        id: c.sub,
        expires_at: c.exp,
        channels: c.channels,
    })
}

fn refusal(e: jsonwebtoken::errors::Error) -> TokenError {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::Invalid("token is not valid yet (nbf)".into()),
        ErrorKind::InvalidSignature => TokenError::Invalid("bad signature".into()),
        ErrorKind::InvalidAudience => TokenError::Invalid("wrong audience (aud)".into()),
        ErrorKind::InvalidIssuer => TokenError::Invalid("wrong issuer (iss)".into()),
        _ => TokenError::Invalid(e.to_string()),
    }
}

/// Mints follower tokens (for the CLI, tests and the load tester; production
/// apps mint them in their own backend with the same secret).
#[derive(Clone)]
pub struct TokenIssuer {
    key: EncodingKey,
    header: Header,
}

impl TokenIssuer {
    /// Signs HS256 tokens with `secret`.
    pub fn hs256(secret: &[u8]) -> TokenIssuer {
        TokenIssuer {
            key: EncodingKey::from_secret(secret),
            header: Header::new(Algorithm::HS256),
        }
    }

    /// Signs RS256 tokens with an RSA private key (PEM), naming `kid`.
    pub fn rs256_pem(pem: &[u8], kid: Option<String>) -> Result<TokenIssuer, TokenError> {
        let key = EncodingKey::from_rsa_pem(pem).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let mut header = Header::new(Algorithm::RS256);
        header.kid = kid;
        Ok(TokenIssuer { key, header })
    }

    /// Signs ES256 tokens with a P-256 private key (PKCS#8 PEM), naming `kid`.
    pub fn es256_pem(pem: &[u8], kid: Option<String>) -> Result<TokenIssuer, TokenError> {
        let key = EncodingKey::from_ec_pem(pem).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let mut header = Header::new(Algorithm::ES256);
        header.kid = kid;
        Ok(TokenIssuer { key, header })
    }

    /// This issuer's public key as a JWK (for ES256 issuers; tests and tools
    /// write it into a JWKS file).
    pub fn public_jwk(&self) -> Result<jsonwebtoken::jwk::Jwk, TokenError> {
        let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&self.key, self.header.alg)
            .map_err(|e| TokenError::Invalid(e.to_string()))?;
        jwk.common.key_id = self.header.kid.clone();
        Ok(jwk)
    }

    /// Signs `claims`.
    pub fn sign(&self, claims: &impl Serialize) -> Result<String, TokenError> {
        encode(&self.header, claims, &self.key).map_err(|e| TokenError::Invalid(e.to_string()))
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

    fn es256() -> TokenIssuer {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        TokenIssuer::es256_pem(pair.serialize_pem().as_bytes(), Some("k1".into())).unwrap()
    }

    fn scoped(sub: &str, iss: Option<&str>, aud: Option<&str>) -> ScopedClaims {
        ScopedClaims {
            claims: Claims {
                sub: sub.into(),
                exp: crate::model::now_ms() / 1000 + 60,
                iat: None,
                nbf: None,
                channels: None,
            },
            iss: iss.map(String::from),
            aud: aud.map(String::from),
        }
    }

    #[test]
    fn es256_from_jwks_with_issuer_and_audience() {
        let issuer = es256();
        let set = jsonwebtoken::jwk::JwkSet {
            keys: vec![issuer.public_jwk().unwrap()],
        };
        let keys = crate::auth::jwks::from_set(&set);
        assert_eq!(keys.len(), 1);
        let verifier = TokenVerifier::hs256(b"secret")
            .with_public_keys(keys)
            .with_issuer(Some("https://id.example".into()))
            .with_audience(Some("herald".into()));
        let good = issuer
            .sign(&scoped("dana", Some("https://id.example"), Some("herald")))
            .unwrap();
        assert_eq!(verifier.verify(&good).unwrap().id, "dana");
        let wrong_aud = issuer
            .sign(&scoped("dana", Some("https://id.example"), Some("other")))
            .unwrap();
        assert_eq!(
            verifier.verify(&wrong_aud),
            Err(TokenError::Invalid("wrong audience (aud)".into()))
        );
        let wrong_iss = issuer
            .sign(&scoped("dana", Some("https://evil"), Some("herald")))
            .unwrap();
        assert_eq!(
            verifier.verify(&wrong_iss),
            Err(TokenError::Invalid("wrong issuer (iss)".into()))
        );
        let no_aud = issuer
            .sign(&scoped("dana", Some("https://id.example"), None))
            .unwrap();
        assert!(verifier.verify(&no_aud).is_err());
        // Another key pair with the same kid: bad signature.
        let forged = es256()
            .sign(&scoped("dana", Some("https://id.example"), Some("herald")))
            .unwrap();
        assert_eq!(
            verifier.verify(&forged),
            Err(TokenError::Invalid("bad signature".into()))
        );
        // Without JWKS keys, ES256 tokens are refused.
        assert!(TokenVerifier::hs256(b"secret").verify(&good).is_err());
    }

    #[test]
    fn rs256_from_jwks_picks_the_key_by_kid() {
        // A fixed test-only key (generating RSA keys is slow in debug builds).
        let pem = include_bytes!("testdata/rs256-test-key.pem");
        let rs = TokenIssuer::rs256_pem(pem, Some("rsa-1".into())).unwrap();
        let es = es256();
        let set = jsonwebtoken::jwk::JwkSet {
            keys: vec![es.public_jwk().unwrap(), rs.public_jwk().unwrap()],
        };
        let verifier =
            TokenVerifier::hs256(b"s").with_public_keys(crate::auth::jwks::from_set(&set));
        let t = rs.sign(&scoped("rita", None, None)).unwrap();
        assert_eq!(verifier.verify(&t).unwrap().id, "rita");
        let t = es.sign(&scoped("eli", None, None)).unwrap();
        assert_eq!(verifier.verify(&t).unwrap().id, "eli");
        // A kid the set does not have is refused before any signature check.
        let unknown = TokenIssuer::rs256_pem(pem, Some("rsa-2".into()))
            .unwrap()
            .sign(&scoped("rita", None, None))
            .unwrap();
        assert!(
            matches!(verifier.verify(&unknown), Err(TokenError::Invalid(m)) if m.contains("kid"))
        );
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
