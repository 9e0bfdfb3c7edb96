//! The admin key and the token signing secret. Generated into the data
//! directory on first start (owner-only files); `HERALD_ADMIN_KEY` and
//! `HERALD_JWT_SECRET` override them.

use std::fs;
use std::path::{Path, PathBuf};

use rand::RngCore;

/// Admin key file inside the data directory.
pub const ADMIN_KEY_FILE: &str = "admin.key";
/// Token signing secret file inside the data directory.
pub const JWT_SECRET_FILE: &str = "jwt.secret";
/// QUIC stateless-reset key file inside the data directory. Keeping it across
/// restarts lets a restarted server tell clients of the previous process at
/// once that their connection is gone, so they reconnect without waiting for
/// their idle timeout.
pub const RESET_KEY_FILE: &str = "quic-reset.key";

/// Reading or creating a secret failed.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct SecretsError {
    /// The secret's file.
    pub path: PathBuf,
    /// Why it could not be read or written.
    pub source: std::io::Error,
}

/// The server's secrets.
#[derive(Clone)]
pub struct Secrets {
    /// The admin API key: `HERALD_ADMIN_KEY` if set, else the content of
    /// [`ADMIN_KEY_FILE`] (when generated: `hk_admin_` and 64 hex digits).
    pub admin_key: String,
    /// The HS256 secret follower tokens are signed with: `HERALD_JWT_SECRET` if
    /// set, else the content of [`JWT_SECRET_FILE`] (when generated: 64 hex digits).
    pub jwt_secret: String,
    /// Key for QUIC stateless resets (hex).
    pub reset_key: String,
    /// Files created on this start (to tell the operator once).
    pub created: Vec<PathBuf>,
    /// Whether the admin key was generated on this start (so it may be shown
    /// once). Never true when it came from `HERALD_ADMIN_KEY`.
    pub admin_key_generated: bool,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets").finish_non_exhaustive()
    }
}

impl Secrets {
    /// Loads the secrets from `data_dir`, creating missing ones; environment
    /// overrides win and are never written to disk.
    pub fn load_or_create(data_dir: &Path) -> Result<Secrets, SecretsError> {
        let mut created = Vec::new();
        let admin_key = match env_nonempty("HERALD_ADMIN_KEY") {
            Some(v) => v,
            None => file_or_create(&data_dir.join(ADMIN_KEY_FILE), "hk_admin_", &mut created)?,
        };
        let admin_key_generated = created.iter().any(|p| p.ends_with(ADMIN_KEY_FILE));
        let jwt_secret = match env_nonempty("HERALD_JWT_SECRET") {
            Some(v) => v,
            None => file_or_create(&data_dir.join(JWT_SECRET_FILE), "", &mut created)?,
        };
        let reset_key = file_or_create(&data_dir.join(RESET_KEY_FILE), "", &mut created)?;
        Ok(Secrets {
            admin_key,
            jwt_secret,
            reset_key,
            created,
            admin_key_generated,
        })
    }

    /// Reads the secrets a local server created, without creating any (for CLI commands).
    pub fn read_existing(data_dir: &Path) -> Result<Secrets, SecretsError> {
        let read = |name: &str, env: &str| -> Result<String, SecretsError> {
            if let Some(v) = env_nonempty(env) {
                return Ok(v);
            }
            let path = data_dir.join(name);
            fs::read_to_string(&path)
                .map(|s| s.trim().to_string())
                .map_err(|source| SecretsError { path, source })
        };
        Ok(Secrets {
            admin_key: read(ADMIN_KEY_FILE, "HERALD_ADMIN_KEY")?,
            jwt_secret: read(JWT_SECRET_FILE, "HERALD_JWT_SECRET")?,
            reset_key: String::new(),
            created: Vec::new(),
            admin_key_generated: false,
        })
    }
}

fn env_nonempty(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// A random secret: 32 bytes, hex.
pub fn random_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

fn file_or_create(
    path: &Path,
    prefix: &str,
    created: &mut Vec<PathBuf>,
) -> Result<String, SecretsError> {
    let err = |source| SecretsError {
        path: path.to_path_buf(),
        source,
    };
    match fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let secret = random_secret(prefix);
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(err)?;
    }
    crate::tls::write_private(path, format!("{secret}\n").as_bytes()).map_err(|e| match e {
        crate::tls::TlsError::Io { source, .. } => err(source),
        other => err(std::io::Error::other(other.to_string())),
    })?;
    created.push(path.to_path_buf());
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Secrets::load_or_create(dir.path()).unwrap();
        let b = Secrets::load_or_create(dir.path()).unwrap();
        let c = Secrets::read_existing(dir.path()).unwrap();
        if std::env::var("HERALD_ADMIN_KEY").is_err() {
            assert_eq!(a.created.len(), 3);
            assert!(a.admin_key.starts_with("hk_admin_"));
        }
        assert!(b.created.is_empty());
        assert_eq!(a.admin_key, b.admin_key);
        assert_eq!(a.jwt_secret, c.jwt_secret);
    }
}
