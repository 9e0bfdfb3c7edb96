//! The server a run talks to: its QUIC and HTTP addresses, the keys to
//! publish and to mint follower tokens, how to trust its certificate, and how
//! to read its CPU and memory ([`Probe`]).

use std::net::SocketAddr;
use std::path::Path;

use herald_client::ClientTrust;
use herald_server::auth::Secrets;

use crate::probe::Probe;
use crate::LoadError;

/// See the module docs.
#[derive(Clone)]
pub struct Target {
    pub quic: SocketAddr,
    /// Base URL of the HTTP API, like `http://127.0.0.1:8080`.
    pub api: String,
    pub admin_key: String,
    pub jwt_secret: String,
    pub trust: ClientTrust,
    pub probe: Probe,
}

impl Target {
    /// A server whose data directory (admin key, token secret, self-signed
    /// certificate) is readable here; `api` is a base URL or an address.
    pub fn from_data_dir(
        quic: SocketAddr,
        api: &str,
        data_dir: &Path,
        probe: Probe,
    ) -> Result<Target, LoadError> {
        let secrets = Secrets::read_existing(data_dir)
            .map_err(|e| LoadError::Target(format!("secrets: {e}")))?;
        let trust = ClientTrust::pinned_file(&data_dir.join(herald_server::tls::CERT_FILE))
            .map_err(|e| LoadError::Target(format!("certificate: {e}")))?;
        Ok(Target {
            quic,
            api: herald::cli::base_url(api),
            admin_key: secrets.admin_key,
            jwt_secret: secrets.jwt_secret,
            trust,
            probe,
        })
    }
}
