//! Public keys for ES256 / RS256 follower tokens, from a JWKS file (a JSON
//! Web Key Set, as identity providers publish it). Keys of other types or
//! algorithms are skipped with a warning; a set with no usable key is an error.

use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};

/// A verification key from the set.
#[derive(Clone)]
pub struct PublicKey {
    pub(crate) kid: Option<String>,
    pub(crate) alg: Algorithm,
    pub(crate) key: DecodingKey,
}

/// The JWKS file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The JWKS file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file is not a JSON Web Key Set.
    #[error("{path}: not a JWK set: {message}")]
    Parse {
        /// The JWKS file.
        path: PathBuf,
        /// What the JSON parser said.
        message: String,
    },
    /// The set holds no ES256 (P-256) or RS256 key.
    #[error("{path}: no ES256 or RS256 key in the set")]
    NoUsableKey {
        /// The JWKS file.
        path: PathBuf,
    },
}

/// Reads the keys of a JWKS file.
pub fn load(path: &Path) -> Result<Vec<PublicKey>, JwksError> {
    let text = std::fs::read_to_string(path).map_err(|source| JwksError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|e| JwksError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let keys = from_set(&set);
    if keys.is_empty() {
        return Err(JwksError::NoUsableKey {
            path: path.to_path_buf(),
        });
    }
    Ok(keys)
}

/// The usable keys of `set`.
pub fn from_set(set: &JwkSet) -> Vec<PublicKey> {
    set.keys
        .iter()
        .filter_map(|jwk| match usable(jwk) {
            Ok(k) => Some(k),
            Err(why) => {
                tracing::warn!(kid = ?jwk.common.key_id, "skipping JWKS key: {why}");
                None
            }
        })
        .collect()
}

fn usable(jwk: &Jwk) -> Result<PublicKey, String> {
    let alg = match (&jwk.algorithm, jwk.common.key_algorithm) {
        (AlgorithmParameters::EllipticCurve(p), None | Some(KeyAlgorithm::ES256))
            if p.curve == EllipticCurve::P256 =>
        {
            Algorithm::ES256
        }
        (AlgorithmParameters::RSA(_), None | Some(KeyAlgorithm::RS256)) => Algorithm::RS256,
        _ => return Err("only ES256 (P-256) and RS256 keys are accepted".into()),
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    Ok(PublicKey {
        kid: jwk.common.key_id.clone(),
        alg,
        key,
    })
}
