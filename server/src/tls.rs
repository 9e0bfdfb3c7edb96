//! TLS for the QUIC endpoint: the server's certificate (configured, or a
//! self-signed ECDSA P-256 one created in the data directory and renewed near
//! expiry) and the server's rustls config. (How a client trusts the server,
//! pinned or by CA, lives in `herald_client::ClientTrust`.)
//!
//! The self-signed certificate is valid for [`SELF_SIGNED_VALIDITY`] and is
//! replaced (with the same key, which is what clients pin) when less than
//! [`RENEW_BEFORE`] remains, at start-up and by a
//! periodic check while running (see [`CertStore::renew_if_needed`]); the
//! server picks up a renewed certificate for new handshakes without restarting.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use herald_proto::ALPN;

/// How long a self-signed certificate is valid.
pub const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(14 * 24 * 3600);
/// A self-signed certificate with less than this left is replaced.
pub const RENEW_BEFORE: Duration = Duration::from_secs(3 * 24 * 3600);

/// File name of the self-signed certificate inside the data directory.
pub const CERT_FILE: &str = "tls/cert.pem";
/// File name of the self-signed certificate's key inside the data directory.
pub const KEY_FILE: &str = "tls/key.pem";

/// TLS set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why it could not be read or written.
        source: std::io::Error,
    },
    /// A PEM file holds no usable certificate or private key.
    #[error("{path}: no usable {what} in PEM file")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was looked for: `"certificate"` or `"private key"`.
        what: &'static str,
    },
    /// Making the self-signed certificate failed.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the certificate or key.
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The TLS config could not be made into QUIC's crypto config.
    #[error("QUIC crypto config: {0}")]
    Quic(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The crypto provider used everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate from a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = fs::read(path).map_err(io_err(path))?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = fs::read(path).map_err(io_err(path))?;
    PrivateKeyDer::from_pem_slice(&data).map_err(|_| TlsError::Pem {
        path: path.to_path_buf(),
        what: "private key",
    })
}

/// Seconds from now until the first certificate in `pem` expires (negative if expired).
fn seconds_left(pem: &[u8]) -> Option<i64> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    let not_after = cert.validity().not_after.timestamp();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    Some(not_after - now)
}

/// Where the server's certificate comes from, and the live copy handed to rustls.
pub struct CertStore {
    source: CertSource,
    current: RwLock<Arc<CertifiedKey>>,
}

enum CertSource {
    /// Operator-provided files; read once.
    Files,
    /// Self-signed in the data directory; renewed near expiry.
    SelfSigned { cert: PathBuf, key: PathBuf },
}

impl std::fmt::Debug for CertStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertStore")
    }
}

impl CertStore {
    /// Uses the operator's certificate chain and key.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Arc<CertStore>, TlsError> {
        let ck = certified_key(load_certs(cert)?, load_key(key)?)?;
        Ok(Arc::new(CertStore {
            source: CertSource::Files,
            current: RwLock::new(Arc::new(ck)),
        }))
    }

    /// Uses (creating or renewing as needed) the self-signed certificate in `data_dir`.
    pub fn self_signed(data_dir: &Path) -> Result<Arc<CertStore>, TlsError> {
        let cert = data_dir.join(CERT_FILE);
        let key = data_dir.join(KEY_FILE);
        ensure_self_signed(&cert, &key)?;
        let ck = certified_key(load_certs(&cert)?, load_key(&key)?)?;
        Ok(Arc::new(CertStore {
            source: CertSource::SelfSigned { cert, key },
            current: RwLock::new(Arc::new(ck)),
        }))
    }

    /// Renews a self-signed certificate that is near expiry and swaps it in.
    /// Returns whether it renewed.
    pub fn renew_if_needed(&self) -> Result<bool, TlsError> {
        let CertSource::SelfSigned { cert, key } = &self.source else {
            return Ok(false);
        };
        if !ensure_self_signed(cert, key)? {
            return Ok(false);
        }
        let ck = Arc::new(certified_key(load_certs(cert)?, load_key(key)?)?);
        match self.current.write() {
            Ok(mut g) => *g = ck,
            Err(poisoned) => *poisoned.into_inner() = ck,
        }
        Ok(true)
    }

    fn get(&self) -> Arc<CertifiedKey> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

fn certified_key(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, TlsError> {
    Ok(CertifiedKey::from_der(certs, key, &provider())?)
}

/// Creates the self-signed certificate if it is missing, unreadable or near
/// expiry. Returns whether a new one was written.
fn ensure_self_signed(cert_path: &Path, key_path: &Path) -> Result<bool, TlsError> {
    if let (Ok(pem), true) = (fs::read(cert_path), key_path.exists()) {
        if let Some(left) = seconds_left(&pem) {
            if left > RENEW_BEFORE.as_secs() as i64 {
                return Ok(false);
            }
        }
    }
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::seconds(SELF_SIGNED_VALIDITY.as_secs() as i64);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "herald self-signed");
    // Keep the key across renewals: clients pin the public key, so a renewed
    // certificate is still the one they trust.
    let key = match fs::read_to_string(key_path)
        .ok()
        .and_then(|pem| rcgen::KeyPair::from_pem(&pem).ok())
    {
        Some(k) => k,
        None => rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
    };
    let cert = params.self_signed(&key)?;
    if let Some(dir) = cert_path.parent() {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    write_private(key_path, key.serialize_pem().as_bytes())?;
    fs::write(cert_path, cert.pem()).map_err(io_err(cert_path))?;
    tracing::info!(path = %cert_path.display(), "created self-signed certificate (valid 14 days)");
    Ok(true)
}

/// Writes a file readable by its owner only.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), TlsError> {
    use std::io::Write;
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path).map_err(io_err(path))?;
    f.write_all(data).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// The server's QUIC crypto config: TLS 1.3, ALPN `herald/1` only.
pub fn server_crypto(
    certs: Arc<CertStore>,
) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
        .map_err(|e| TlsError::Quic(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertStore::self_signed(dir.path()).unwrap();
        let first = fs::read(dir.path().join(CERT_FILE)).unwrap();
        let left = seconds_left(&first).unwrap();
        assert!(left > 13 * 24 * 3600 && left <= 14 * 24 * 3600, "{left}");
        assert!(!store.renew_if_needed().unwrap());
        let _again = CertStore::self_signed(dir.path()).unwrap();
        assert_eq!(first, fs::read(dir.path().join(CERT_FILE)).unwrap());
    }

    #[test]
    fn a_certificate_near_expiry_is_renewed_and_swapped_in() {
        let dir = tempfile::tempdir().unwrap();
        let store = CertStore::self_signed(dir.path()).unwrap();
        let first = store.get().cert[0].clone();
        // Time passes: the file on disk now holds a certificate with a day left.
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(13);
        params.not_after = now + time::Duration::days(1);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let old = params.self_signed(&key).unwrap();
        fs::write(dir.path().join(CERT_FILE), old.pem()).unwrap();
        fs::write(dir.path().join(KEY_FILE), key.serialize_pem()).unwrap();
        assert!(store.renew_if_needed().unwrap(), "a day left: renewed");
        let swapped = store.get().cert[0].clone();
        assert_eq!(
            fs::read_to_string(dir.path().join(KEY_FILE)).unwrap(),
            key.serialize_pem(),
            "the key is kept, so clients that pinned it still connect"
        );
        assert_ne!(swapped, first);
        assert_ne!(swapped.as_ref(), old.der().as_ref());
        // What is served is what is on disk, valid for two weeks again.
        let on_disk = fs::read(dir.path().join(CERT_FILE)).unwrap();
        assert_eq!(load_certs(&dir.path().join(CERT_FILE)).unwrap()[0], swapped);
        assert!(seconds_left(&on_disk).unwrap() > 13 * 24 * 3600);
        assert!(!store.renew_if_needed().unwrap(), "fresh again: kept");
    }

    #[test]
    fn garbage_cert_file_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("tls")).unwrap();
        fs::write(dir.path().join(CERT_FILE), b"junk").unwrap();
        fs::write(dir.path().join(KEY_FILE), b"junk").unwrap();
        CertStore::self_signed(dir.path()).unwrap();
        assert!(seconds_left(&fs::read(dir.path().join(CERT_FILE)).unwrap()).is_some());
    }
}
