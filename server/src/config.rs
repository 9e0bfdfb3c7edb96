//! Server configuration: one type, filled from defaults, then a TOML file,
//! then command-line flags (which also read `HERALD_*` environment variables).
//! Unknown keys in the file are an error, so a typo never passes silently.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Everything `herald serve` needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the log, secrets and self-signed certificate live.
    pub data_dir: PathBuf,
    /// UDP address of the QUIC endpoint (port 0 picks a free port).
    pub quic_addr: SocketAddr,
    /// QUIC event loops (threads, each with its own socket on `quic_addr`);
    /// packets are steered to the loop of their connection by connection ID.
    /// 1 to 64.
    pub quic_loops: usize,
    /// TCP address of the HTTP API (port 0 picks a free port).
    pub http_addr: SocketAddr,
    /// The QUIC endpoint's certificate (`[tls]`).
    pub tls: TlsConfig,
    /// Bounds on what peers can make the server hold or do (`[limits]`).
    pub limits: Limits,
    /// How long posts are kept (`[retention]`).
    pub retention: Retention,
    /// The promoted slot (`[promo]`).
    pub promo: PromoSection,
    /// How follower tokens are checked (`[auth]`).
    pub auth: AuthConfig,
    /// Cluster mode (`[cluster]`): with `urls`, the log, brands and keys and
    /// campaigns live in NATS JetStream, shared by every Herald node; without,
    /// in the data directory.
    pub cluster: ClusterSection,
}

/// Cluster mode on NATS JetStream (see `herald_server::cluster`). Empty
/// `urls` (the default) is the embedded mode: nothing here is used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterSection {
    /// NATS server URLs (`nats://host:4222`), any of which may be down; the
    /// client learns the rest of the cluster from them.
    pub urls: Vec<String>,
    /// Replicas of the posts stream and of every KV bucket (1 to 5; 3 in
    /// production, so one NATS node may die without losing anything). Used
    /// when the stream and buckets are first created.
    pub replicas: usize,
    /// This Herald node's id, unique in the cluster (impression leases and
    /// counts are kept per node). Empty: the host name.
    pub node_id: String,
    /// Timeout of one JetStream request, in milliseconds.
    pub request_timeout_ms: u64,
    /// How long a write (a post, an edit) retries through a NATS leader
    /// election or a lost quorum before it fails, in seconds.
    pub write_deadline_secs: u64,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            urls: Vec::new(),
            replicas: 3,
            node_id: String::new(),
            request_timeout_ms: 5000,
            write_deadline_secs: 30,
        }
    }
}

impl ClusterSection {
    /// Whether cluster mode is on.
    pub fn enabled(&self) -> bool {
        !self.urls.is_empty()
    }

    /// The node id: `node_id`, else the host name, else `herald`.
    pub fn node_id(&self) -> String {
        if !self.node_id.is_empty() {
            return self.node_id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "herald".to_string())
    }

    /// The connection settings for `crate::cluster::Nats::connect`.
    pub fn to_cluster_config(&self) -> Result<crate::cluster::ClusterConfig, ConfigError> {
        let mut c =
            crate::cluster::ClusterConfig::from_url_list(&self.urls.join(","), &self.node_id())
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        c.replicas = self.replicas;
        c.request_timeout = Duration::from_millis(self.request_timeout_ms);
        c.write_deadline = Duration::from_secs(self.write_deadline_secs);
        Ok(c)
    }
}

/// How follower tokens are checked. HS256 tokens signed with the server's
/// secret are always accepted; with `jwks_file`, ES256 / RS256 tokens signed
/// by one of its public keys are too. `issuer` and `audience`, when set, must
/// match the token's `iss` / `aud`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// A JWKS file whose ES256 / RS256 public keys also verify follower
    /// tokens; `None`: HS256 tokens only. Read once at start-up.
    pub jwks_file: Option<PathBuf>,
    /// When set, tokens must carry this `iss`; `None`: `iss` is not checked.
    pub issuer: Option<String>,
    /// When set, tokens must carry this `aud`; `None`: `aud` is not checked.
    pub audience: Option<String>,
}

/// Certificate files; when both are absent a self-signed certificate is made.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the certificate chain, leaf first; give it with `key`.
    pub cert: Option<PathBuf>,
    /// PEM file with the certificate's private key; give it with `cert`.
    pub key: Option<PathBuf>,
}

/// Bounds on what one peer can make the server hold or do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest control frame accepted from a follower, in bytes.
    pub max_frame_bytes: usize,
    /// Bound of each session's outbound feed queue, in bytes. A follower whose
    /// queue would overflow is marked lagged and caught up from the log.
    pub session_queue_bytes: usize,
    /// Most channels one connection may follow.
    pub max_follows_per_connection: usize,
    /// Send live posts as QUIC DATAGRAM frames to followers that ask for
    /// them (protocol §8.5): cheaper for the server than stream frames.
    pub live_datagrams: bool,
    /// Ask followers (QUIC ACK-frequency extension) to acknowledge at most
    /// every 10 packets or after this many milliseconds, instead of 25 ms
    /// after every packet: at one post every few hundred milliseconds that
    /// halves the ACKs the server processes. 0: do not ask. At most 16,383.
    /// A larger value also delays the retransmission of stream data lost at
    /// the end of a transmission (`vendor/README.md`).
    pub follower_ack_delay_ms: u64,
    /// Most QUIC connections at once; further handshakes are refused.
    pub max_connections: usize,
    /// Most handshakes in progress at once (a reconnect storm waits its turn).
    pub max_concurrent_handshakes: usize,
    /// A handshake must finish within this many seconds of its start, or it
    /// is dropped; an attempt waits at most as long for a slot.
    pub handshake_timeout_secs: u64,
    /// With this many handshakes in progress, a sender that has not proved
    /// its address is sent a stateless Retry first (0: always).
    pub handshake_retry_above: usize,
    /// Most unvalidated, and most validated, handshakes in progress per IP
    /// address (over it: Retry, or, once validated, a wait for the address's
    /// turn within the handshake timeout). Half the slots
    /// by default: one address (a NAT, a load generator) cannot take them
    /// all, yet many followers behind one address reconnect at once.
    pub max_handshakes_per_address: usize,
    /// A follower must send Hello within this many seconds of connecting.
    pub hello_timeout_secs: u64,
    /// A connection with no traffic for this long is closed (clients send
    /// keep-alives at about half of it).
    pub idle_timeout_secs: u64,
    /// A follower that lags more than `max_lag_events` times within
    /// `lag_window_secs` is disconnected with code `lagging_too_often`.
    pub max_lag_events: u32,
    /// The window, in seconds, in which `max_lag_events` is counted.
    pub lag_window_secs: u64,
    /// Posts read from the log per catch-up step (bounds memory per catch-up).
    pub catchup_batch: usize,
    /// Catch-up steps (a read of `catchup_batch` posts and their encoding)
    /// in progress at once, server-wide; more wait their turn. Bounds the
    /// memory of followers replaying history all at once.
    pub max_concurrent_catchups: usize,
    /// Publishes per second per brand API key (token bucket), and the burst.
    /// Over it the API answers 429 with Retry-After. The admin key is not limited.
    pub publish_per_sec: f64,
    /// Publishes a brand API key may make at once before `publish_per_sec`
    /// paces it (the bucket's size); at least 1.
    pub publish_burst: u32,
    /// Follow requests per second per connection, and the burst (a
    /// reconnecting client re-follows everything at once: keep it large).
    pub follows_per_sec: f64,
    /// Follow requests a connection may make at once before `follows_per_sec`
    /// paces it; at least 1.
    pub follow_burst: u32,
    /// Control frames per second per connection, and the burst.
    pub control_frames_per_sec: f64,
    /// Control frames a connection may send at once before
    /// `control_frames_per_sec` paces it; at least 1.
    pub control_frame_burst: u32,
    /// Requests refused for rate a connection may make (refilling at one per
    /// second) before it is closed with `rate_limited`.
    pub rate_limit_strikes: u32,
    /// Most connections open at once with tokens for the same follower id.
    pub max_connections_per_follower: usize,
    /// Most HTTP connections open at once. At the cap a new connection takes
    /// the place of the one idle for longest; when none is idle (every one
    /// has a request in flight) it is answered 503 and closed.
    pub http_max_connections: usize,
    /// An HTTP request's headers must arrive within this many seconds of the
    /// connection opening or the previous response (an idle keep-alive
    /// connection is closed after it too).
    pub http_header_timeout_secs: u64,
    /// An HTTP request's body must arrive and its answer be ready within
    /// this many seconds of its headers, or it is answered 408 and the
    /// connection closed.
    pub http_request_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: herald_proto::frame::DEFAULT_MAX_CONTROL_FRAME,
            session_queue_bytes: 256 * 1024,
            max_follows_per_connection: 1024,
            live_datagrams: true,
            follower_ack_delay_ms: 600,
            max_connections: 200_000,
            max_concurrent_handshakes: 256,
            handshake_timeout_secs: 5,
            handshake_retry_above: 64,
            max_handshakes_per_address: 128,
            hello_timeout_secs: 10,
            idle_timeout_secs: 60,
            max_lag_events: 20,
            lag_window_secs: 60,
            catchup_batch: 64,
            max_concurrent_catchups: 64,
            publish_per_sec: 50.0,
            publish_burst: 100,
            follows_per_sec: 100.0,
            follow_burst: 2048,
            control_frames_per_sec: 200.0,
            control_frame_burst: 4096,
            rate_limit_strikes: 20,
            max_connections_per_follower: 16,
            http_max_connections: 512,
            http_header_timeout_secs: 10,
            http_request_timeout_secs: 30,
        }
    }
}

impl Limits {
    /// The HTTP server's bounds.
    pub fn http(&self) -> crate::api::HttpLimits {
        crate::api::HttpLimits {
            max_connections: self.http_max_connections,
            header_timeout: Duration::from_secs(self.http_header_timeout_secs),
            request_timeout: Duration::from_secs(self.http_request_timeout_secs),
        }
    }

    /// The QUIC handshake admission policy.
    pub fn handshake_policy(&self) -> crate::admission::HandshakePolicy {
        crate::admission::HandshakePolicy {
            max_in_progress: self.max_concurrent_handshakes,
            retry_above: self.handshake_retry_above,
            per_address: self.max_handshakes_per_address,
            timeout: Duration::from_secs(self.handshake_timeout_secs),
        }
    }

    /// `hello_timeout_secs` as a duration.
    pub fn hello_timeout(&self) -> Duration {
        Duration::from_secs(self.hello_timeout_secs)
    }
    /// `idle_timeout_secs` as a duration.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    /// `lag_window_secs` as a duration.
    pub fn lag_window(&self) -> Duration {
        Duration::from_secs(self.lag_window_secs)
    }
}

/// How long posts are kept. A post is trimmed when it is older than
/// `max_age_days` (0: no age limit) or when the channel holds more than
/// `max_posts` (0: no count limit).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// Posts older than this many days are trimmed; 0: no age limit
    /// (default 30).
    pub max_age_days: u64,
    /// A channel keeps at most this many of its newest posts; 0: no count limit
    /// (the default).
    pub max_posts: u64,
    /// How often the background trim runs, in seconds.
    pub interval_secs: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_age_days: 30,
            max_posts: 0,
            interval_secs: 60,
        }
    }
}

/// The promoted slot. A follower's client that confirms promoted posts
/// (`receipts` in Hello; the Rust client does) has each one counted as an
/// impression when its receipt arrives; one not confirmed within
/// `receipt_window_secs` (from being written, or from a restart) is not
/// counted and goes back to the campaign's budget.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PromoSection {
    /// How long a written promoted post waits for its receipt, in seconds
    /// (1 to 86400, default 120).
    pub receipt_window_secs: u64,
}

impl Default for PromoSection {
    fn default() -> Self {
        PromoSection {
            receipt_window_secs: crate::promo::DEFAULT_RECEIPT_WINDOW.as_secs(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./herald-data"),
            quic_addr: SocketAddr::from(([127, 0, 0, 1], 4433)),
            quic_loops: 1,
            http_addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            retention: Retention::default(),
            promo: PromoSection::default(),
            auth: AuthConfig::default(),
            cluster: ClusterSection::default(),
        }
    }
}

/// The configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file is not valid TOML for [`Config`] (a syntax error, an unknown
    /// key, a value of the wrong type).
    #[error("{path}: {source}")]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// What the TOML parser said, with the position.
        source: Box<toml::de::Error>,
    },
    /// A value the server cannot run with; the text names the setting and its
    /// bound.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Values given on the command line (or in `HERALD_*` variables); each one
/// that is set replaces the file's value, and nothing else is touched.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// Replaces [`Config::data_dir`] when set.
    pub data_dir: Option<PathBuf>,
    /// Replaces [`Config::quic_addr`] when set.
    pub quic_addr: Option<SocketAddr>,
    /// Replaces [`Config::quic_loops`] when set.
    pub quic_loops: Option<usize>,
    /// Replaces [`Config::http_addr`] when set.
    pub http_addr: Option<SocketAddr>,
    /// Replaces `cluster.urls` when set (`--cluster nats://a,nats://b`).
    pub cluster_urls: Option<Vec<String>>,
    /// Replaces `cluster.node_id` when set.
    pub node_id: Option<String>,
}

impl Config {
    /// Defaults, then `file` (if given), then `overrides`; then validated.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut cfg = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Config::from_toml(&text).map_err(|source| ConfigError::Parse {
                    path: path.to_path_buf(),
                    source: Box::new(source),
                })?
            }
            None => Config::default(),
        };
        cfg.apply(overrides);
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parses a TOML document; absent keys keep their defaults.
    pub fn from_toml(text: &str) -> Result<Config, toml::de::Error> {
        toml::from_str(text)
    }

    fn apply(&mut self, o: &Overrides) {
        if let Some(v) = &o.data_dir {
            self.data_dir = v.clone();
        }
        if let Some(v) = o.quic_addr {
            self.quic_addr = v;
        }
        if let Some(v) = o.quic_loops {
            self.quic_loops = v;
        }
        if let Some(v) = o.http_addr {
            self.http_addr = v;
        }
        if let Some(v) = &o.cluster_urls {
            self.cluster.urls = v.clone();
        }
        if let Some(v) = &o.node_id {
            self.cluster.node_id = v.clone();
        }
    }

    /// Rejects values the server cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return bad("tls.cert and tls.key must be given together");
        }
        if !(1..=64).contains(&self.quic_loops) {
            return bad("quic_loops must be 1 to 64");
        }
        if l.max_frame_bytes < 1024 {
            return bad("limits.max_frame_bytes must be at least 1024");
        }
        if l.session_queue_bytes < 64 * 1024 {
            return bad("limits.session_queue_bytes must be at least 65536 (one post must fit)");
        }
        if l.max_follows_per_connection == 0 || l.max_connections == 0 {
            return bad("limits.max_follows_per_connection and limits.max_connections must be > 0");
        }
        if l.max_concurrent_handshakes == 0
            || l.catchup_batch == 0
            || l.max_concurrent_catchups == 0
        {
            return bad(
                "limits.max_concurrent_handshakes, catchup_batch and max_concurrent_catchups must be > 0",
            );
        }
        if l.handshake_timeout_secs == 0 || l.max_handshakes_per_address == 0 {
            return bad(
                "limits.handshake_timeout_secs and limits.max_handshakes_per_address must be > 0",
            );
        }
        if l.follower_ack_delay_ms >= 1 << 14 {
            return bad("limits.follower_ack_delay_ms must be below 16384 (QUIC's limit)");
        }
        if l.idle_timeout_secs < 2 || l.hello_timeout_secs == 0 {
            return bad("limits.idle_timeout_secs must be >= 2 and limits.hello_timeout_secs > 0");
        }
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !(positive(l.publish_per_sec)
            && positive(l.follows_per_sec)
            && positive(l.control_frames_per_sec))
        {
            return bad(
                "limits.publish_per_sec, follows_per_sec and control_frames_per_sec must be > 0",
            );
        }
        if l.publish_burst == 0
            || l.follow_burst == 0
            || l.control_frame_burst == 0
            || l.rate_limit_strikes == 0
            || l.max_connections_per_follower == 0
        {
            return bad(
                "limits bursts, rate_limit_strikes and max_connections_per_follower must be > 0",
            );
        }
        if l.http_max_connections == 0
            || l.http_header_timeout_secs == 0
            || l.http_request_timeout_secs == 0
        {
            return bad(
                "limits.http_max_connections, http_header_timeout_secs and http_request_timeout_secs must be > 0",
            );
        }
        if self.retention.interval_secs == 0 {
            return bad("retention.interval_secs must be > 0");
        }
        if !(1..=86_400).contains(&self.promo.receipt_window_secs) {
            return bad("promo.receipt_window_secs must be 1 to 86400");
        }
        let c = &self.cluster;
        if c.enabled() {
            if !(1..=5).contains(&c.replicas) {
                return bad("cluster.replicas must be 1 to 5");
            }
            if c.request_timeout_ms < 100 || c.write_deadline_secs == 0 {
                return bad(
                    "cluster.request_timeout_ms must be >= 100 and cluster.write_deadline_secs > 0",
                );
            }
            if !c
                .node_id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return bad("cluster.node_id may hold only letters, digits, '-' and '_'");
            }
            self.cluster.to_cluster_config()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readme_lists_every_key_with_its_default() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("```toml\ndata_dir")
            .expect("README has the configuration block");
        let block = &readme[start + "```toml\n".len()..];
        let block = &block[..block.find("```").expect("the block ends")];
        // Every key README shows parses, and has the value the code defaults to.
        assert_eq!(Config::from_toml(block).unwrap(), Config::default());
        // And README shows every key the code has.
        let shown: std::collections::BTreeSet<String> = block
            .lines()
            .map(|l| l.trim_start_matches("# ").trim())
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.to_string()))
            .collect();
        let table = toml::Table::try_from(Config::default()).unwrap();
        let mut keys = Vec::new();
        for (k, v) in &table {
            match v {
                toml::Value::Table(t) => keys.extend(t.keys().cloned()),
                _ => keys.push(k.clone()),
            }
        }
        for k in keys {
            assert!(
                shown.contains(&k),
                "README's configuration block lacks `{k}`"
            );
        }
    }

    #[test]
    fn file_values_survive_absent_overrides() {
        let cfg = Config::from_toml(
            "quic_addr = \"127.0.0.1:5000\"\n[limits]\nsession_queue_bytes = 100000\n",
        )
        .unwrap();
        let mut merged = cfg.clone();
        merged.apply(&Overrides {
            http_addr: Some("127.0.0.1:9000".parse().unwrap()),
            ..Default::default()
        });
        assert_eq!(merged.quic_addr, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(merged.http_addr, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(merged.limits.session_queue_bytes, 100000);
        assert_eq!(merged.limits.max_follows_per_connection, 1024);
        assert_eq!(merged.data_dir, PathBuf::from("./herald-data"));
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        assert!(Config::from_toml("quic_adr = \"1.2.3.4:1\"").is_err());
        assert!(Config::from_toml("[limits]\nmax_frame = 3").is_err());
        let mut c = Config::default();
        c.limits.session_queue_bytes = 10;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.tls.cert = Some("x".into());
        assert!(c.validate().is_err());
        assert!(Config::default().validate().is_ok());
        let mut c = Config::default();
        c.limits.publish_per_sec = 0.0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn cluster_section_parses_and_flags_override_it() {
        let c = Config::from_toml(
            "[cluster]\nurls = [\"nats://a:4222\"]\nreplicas = 1\nnode_id = \"n1\"\n",
        )
        .unwrap();
        assert!(c.cluster.enabled());
        assert_eq!(c.cluster.replicas, 1);
        assert!(c.validate().is_ok());
        let mut merged = c.clone();
        merged.apply(&Overrides {
            cluster_urls: Some(vec!["nats://b:1".into(), "nats://c:2".into()]),
            ..Default::default()
        });
        assert_eq!(merged.cluster.urls.len(), 2);
        assert_eq!(merged.cluster.node_id, "n1");
        assert!(!Config::default().cluster.enabled());
        let mut bad = c.clone();
        bad.cluster.urls = vec!["http://x".into()];
        assert!(bad.validate().is_err());
        bad.cluster.urls = vec!["nats://x".into()];
        bad.cluster.node_id = "a.b".into();
        assert!(bad.validate().is_err());
        assert!(Config::from_toml("[cluster]\nurl = \"x\"").is_err());
    }

    #[test]
    fn auth_section_parses() {
        let c = Config::from_toml(
            "[auth]\njwks_file = \"keys.json\"\nissuer = \"https://id\"\naudience = \"herald\"\n",
        )
        .unwrap();
        assert_eq!(c.auth.jwks_file, Some(PathBuf::from("keys.json")));
        assert_eq!(c.auth.audience.as_deref(), Some("herald"));
        assert!(Config::from_toml("[auth]\nissuers = \"x\"").is_err());
    }
}
