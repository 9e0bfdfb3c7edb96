//! How a client decides to trust the server: pin the public key of the
//! server's self-signed certificate, or verify its chain and name against CA
//! roots. TLS 1.3 only, with the ring provider, ALPN `herald/1`.
//!
//! Pinning compares the certificate's SubjectPublicKeyInfo, not its bytes:
//! the server renews its self-signed certificate every two weeks with the
//! same key, so a client that pinned it once keeps connecting. The TLS
//! handshake still proves that the server holds that key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// The client's TLS set-up failed.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A certificate file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A certificate file held no certificate.
    #[error("{path}: no certificate in PEM file")]
    Pem {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the configuration.
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
    /// quinn refused the rustls configuration.
    #[error("QUIC crypto config: {0}")]
    Quic(String),
}

/// Reads every certificate from a PEM file.
fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let data = std::fs::read(path).map_err(|source| TrustError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TrustError::Pem {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// How a client decides to trust the server.
#[derive(Debug, Clone)]
pub enum ClientTrust {
    /// Trust a server whose certificate carries the public key of one of
    /// these certificates (the server's self-signed certificate).
    Pinned(Vec<CertificateDer<'static>>),
    /// Verify the server's chain against these CA certificates and its name.
    Roots(Vec<CertificateDer<'static>>),
}

impl ClientTrust {
    /// Pins the certificate(s) in a PEM file.
    pub fn pinned_file(path: &Path) -> Result<ClientTrust, TrustError> {
        Ok(ClientTrust::Pinned(load_certs(path)?))
    }

    /// Trusts the CA certificate(s) in a PEM file.
    pub fn ca_file(path: &Path) -> Result<ClientTrust, TrustError> {
        Ok(ClientTrust::Roots(load_certs(path)?))
    }
}

/// The client's QUIC crypto config for `trust`, ALPN `alpn`.
pub fn client_crypto(
    trust: &ClientTrust,
    alpn: &[u8],
) -> Result<quinn::crypto::rustls::QuicClientConfig, TrustError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let mut cfg = match trust {
        ClientTrust::Pinned(certs) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pinned: certs
                    .iter()
                    .map(|c| {
                        spki(c).ok_or_else(|| {
                            TrustError::Quic("a pinned certificate does not parse".into())
                        })
                    })
                    .collect::<Result<_, _>>()?,
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        ClientTrust::Roots(certs) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs {
                roots.add(c.clone())?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
        .map_err(|e| TrustError::Quic(e.to_string()))
}

/// The SubjectPublicKeyInfo (DER) of a certificate, if it parses.
fn spki(cert: &CertificateDer<'_>) -> Option<Vec<u8>> {
    let ee = webpki::EndEntityCert::try_from(cert).ok()?;
    Some(ee.subject_public_key_info().as_ref().to_vec())
}

/// Accepts an end-entity certificate with a pinned public key (whatever the
/// name or dates), and still checks that the peer holds the private key.
#[derive(Debug)]
struct PinnedVerifier {
    /// SubjectPublicKeyInfo of each pinned certificate.
    pinned: Vec<Vec<u8>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if spki(end_entity).is_some_and(|k| self.pinned.contains(&k)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(key: &rcgen::KeyPair, days: i64) -> CertificateDer<'static> {
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(1);
        p.not_after = now + time::Duration::days(days);
        p.self_signed(key).unwrap().der().clone()
    }

    #[test]
    fn a_renewed_certificate_with_the_same_key_is_still_trusted() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (old, renewed, stranger) = (cert(&key, 2), cert(&key, 14), cert(&other, 14));
        assert_ne!(old, renewed);
        let v = PinnedVerifier {
            pinned: vec![spki(&old).unwrap()],
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        };
        let name = ServerName::try_from("localhost").unwrap();
        let check =
            |c: &CertificateDer<'_>| v.verify_server_cert(c, &[], &name, &[], UnixTime::now());
        assert!(check(&old).is_ok());
        assert!(check(&renewed).is_ok());
        assert!(check(&stranger).is_err());
        assert!(check(&CertificateDer::from(vec![1, 2, 3])).is_err());
    }
}
