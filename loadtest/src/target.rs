//! The server a run talks to: its QUIC and HTTP addresses, the keys to
//! publish and to mint follower tokens, how to trust its certificate, and how
//! to read its CPU and memory ([`Probe`]).

use std::net::SocketAddr;
use std::path::Path;

use herald_client::ClientTrust;
use herald_server::auth::Secrets;

use crate::probe::Probe;
use crate::LoadError;

/// Another node of the same cluster: followers are spread over the target's
/// own address and these.
#[derive(Clone)]
pub struct Node {
    /// Its QUIC address.
    pub quic: SocketAddr,
    /// Base URL of its HTTP API.
    pub api: String,
    /// How to read its CPU and memory.
    pub probe: Probe,
}

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

    /// Every node: this target's own address first, then `others` (nodes
    /// of the same cluster, sharing its secrets and certificate).
    pub fn nodes(&self, others: &[Node]) -> Vec<Node> {
        let mut v = vec![Node {
            quic: self.quic,
            api: self.api.clone(),
            probe: self.probe.clone(),
        }];
        v.extend(others.iter().cloned());
        v
    }
}
