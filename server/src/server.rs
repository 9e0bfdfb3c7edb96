//! The server as a type: [`Server::bind`] sets everything up (data directory,
//! secrets, certificate, log, hub, QUIC endpoint, HTTP listener) and reports
//! the bound addresses; [`Server::run`] serves until the shutdown future
//! resolves.
//!
//! Lifecycle: every task the server starts (each session, each HTTP
//! connection, the background loops) runs on one [`TaskTracker`]. Shutdown
//! cancels one token (`stop`): accepting ends, every session is closed with
//! code `shutting_down`, HTTP connections finish the request in flight.
//! After [`SHUTDOWN_GRACE`] a second token (`kill`) drops whatever still
//! runs. Then the promo counts are flushed and the log, the promo ledger and
//! the tenancy store are closed, so when `run` returns the data directory
//! can be opened again at once.
//!
//! Tests bind port 0 and pass their own shutdown future.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::auth::{Secrets, TokenIssuer, TokenVerifier};
use crate::config::Config;
use crate::hub::{FanoutStage, Hub};
use crate::promo::{Promo, PromoError};
use crate::session::{FollowerConnections, Session, SessionContext, SessionError};
use crate::store::{ChannelLog, EventSink, JetStreamLog, RedbLog, StoreError, TrimPolicy};
use crate::tenancy::{KvTenancy, Tenancy, TenancyStore};
use crate::tls::{CertStore, TlsError};
use crate::transport::{Transport, TransportConfig, VarInt};
use herald_proto::ErrorCode;

/// How long shutdown waits for connections to close and HTTP requests to finish.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Start-up failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory could not be created.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The data directory.
        path: PathBuf,
        /// Why it could not be created.
        source: std::io::Error,
    },
    /// The admin key, token secret or QUIC reset key could not be read or created.
    #[error(transparent)]
    Secrets(#[from] crate::auth::SecretsError),
    /// The certificate could not be loaded or made.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The channel log could not be opened.
    #[error("log: {0}")]
    Store(#[from] StoreError),
    /// A database of the data directory is missing, empty or damaged (the
    /// message names the file and what to do).
    #[error(transparent)]
    Open(#[from] crate::datadir::OpenError),
    /// Another process holds the data directory's lock.
    #[error(
        "another herald is using the data directory {path} (its lock file {lock} is held{holder}); \
         stop it, or give this server its own --data-dir"
    )]
    DataDirBusy {
        /// The data directory.
        path: PathBuf,
        /// The lock file.
        lock: PathBuf,
        /// `, by process N` when the holder's pid is known.
        holder: String,
    },
    /// The QUIC endpoint could not be bound.
    #[error("cannot bind QUIC on {addr}: {source}")]
    BindQuic {
        /// The configured `quic_addr`.
        addr: SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// The HTTP listener could not be bound.
    #[error("cannot bind HTTP on {addr}: {source}")]
    BindHttp {
        /// The configured `http_addr`.
        addr: SocketAddr,
        /// Why binding failed.
        source: std::io::Error,
    },
    /// The promo ledger (`promo.redb`) could not be opened.
    #[error(transparent)]
    Promo(#[from] PromoError),
    /// A limit cannot be expressed as a QUIC transport setting (such as an
    /// idle timeout out of range).
    #[error("invalid transport setting: {0}")]
    Transport(String),
    /// The file named by `auth.jwks_file` is unusable.
    #[error("auth.jwks_file: {0}")]
    Jwks(#[from] crate::auth::JwksError),
    /// The tenancy database (`brands.redb`) could not be opened.
    #[error("tenancy: {0}")]
    Tenancy(#[from] crate::tenancy::TenancyError),
    /// Cluster mode: the `[cluster]` settings are unusable, or the NATS
    /// cluster could not be reached in time.
    #[error("cluster: {0}")]
    Cluster(String),
    /// The fan-out thread could not be started.
    #[error("cannot start the fan-out thread: {0}")]
    Fanout(String),
}

/// A bound, not yet running server.
pub struct Server {
    /// Held until the databases are closed: one server per data directory.
    lock: DataDirLock,
    config: Config,
    transport: Transport,
    http: tokio::net::TcpListener,
    hub: Arc<Hub>,
    log: Arc<dyn ChannelLog>,
    /// Fans committed events out off the log's commit thread.
    fanout: Arc<FanoutStage>,
    promo: Arc<Promo>,
    certs: Arc<CertStore>,
    secrets: Secrets,
    verifier: TokenVerifier,
    tenancy: Arc<dyn TenancyStore>,
    quic_addr: SocketAddr,
    http_addr: SocketAddr,
}

impl Server {
    /// Binds both listeners, then prepares the data directory (so a start
    /// that cannot bind writes nothing, and no generated secret goes unseen).
    pub async fn bind(config: Config) -> Result<Server, ServerError> {
        let udp = crate::transport::socket::bind(
            config.quic_addr,
            config.quic_loops > 1,
            crate::transport::socket::UDP_BUFFER_BYTES,
        )
        .map_err(|source| ServerError::BindQuic {
            addr: config.quic_addr,
            source,
        })?;
        let http = tokio::net::TcpListener::bind(config.http_addr)
            .await
            .map_err(|source| ServerError::BindHttp {
                addr: config.http_addr,
                source,
            })?;
        let http_addr = http.local_addr().map_err(|source| ServerError::BindHttp {
            addr: config.http_addr,
            source,
        })?;

        let dir = config.data_dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| ServerError::DataDir {
            path: dir.clone(),
            source,
        })?;
        let lock = DataDirLock::take(&dir)?;
        let secrets = Secrets::load_or_create(&dir)?;
        let certs = match (&config.tls.cert, &config.tls.key) {
            (Some(c), Some(k)) => CertStore::from_files(c, k)?,
            _ => CertStore::self_signed(&dir)?,
        };

        let hub = Arc::new(Hub::default());
        let nats = match config.cluster.enabled() {
            true => Some(connect_cluster(&config).await?),
            false => None,
        };
        let promo = match &nats {
            Some(nats) => with_cluster_timeout(&config, Promo::open_cluster(nats)).await??,
            None => Promo::open(&dir)?,
        };
        promo.set_receipt_window(Duration::from_secs(config.promo.receipt_window_secs));
        let stage_promo = promo.clone();
        // After an organic post, the channel's promoted slot may open.
        let heads = config.limits.live_datagrams.then_some(HEAD_AFTER);
        let fanout = FanoutStage::start(hub.clone(), heads, move |p, followers| {
            stage_promo.after_post(&p.channel, p.seq, followers)
        })
        .map_err(|e| ServerError::Fanout(e.to_string()))?;
        let stage = fanout.clone();
        let sink: EventSink = Arc::new(move |events| stage.submit(events));
        let (log, tenancy): (Arc<dyn ChannelLog>, Arc<dyn TenancyStore>) = match nats {
            Some(nats) => {
                with_cluster_timeout(&config, async {
                    let log: Arc<dyn ChannelLog> = JetStreamLog::open(nats.clone(), sink).await?;
                    let tenancy: Arc<dyn TenancyStore> = KvTenancy::open(&nats).await?;
                    Ok::<_, ServerError>((log, tenancy))
                })
                .await??
            }
            None => {
                let log: Arc<dyn ChannelLog> = RedbLog::open(&dir, sink)?;
                let tenancy: Arc<dyn TenancyStore> = Tenancy::open(&dir)?;
                // Every database exists now: from here on, one that goes
                // missing or empty was lost, not new (see `crate::datadir`).
                crate::datadir::Marker::ensure(
                    &dir,
                    &[
                        crate::store::LOG_FILE,
                        crate::tenancy::TENANCY_FILE,
                        crate::promo::PROMO_FILE,
                    ],
                )?;
                (log, tenancy)
            }
        };
        let mut verifier = TokenVerifier::hs256(secrets.jwt_secret.as_bytes())
            .with_issuer(config.auth.issuer.clone())
            .with_audience(config.auth.audience.clone());
        if let Some(path) = &config.auth.jwks_file {
            verifier = verifier.with_public_keys(crate::auth::jwks::load(path)?);
        }

        let mut server_config = quinn_proto::ServerConfig::with_crypto(Arc::new(
            crate::tls::server_crypto(certs.clone())?,
        ));
        server_config.transport_config(Arc::new(transport(&config)?));
        let bind_err = |source| ServerError::BindQuic {
            addr: config.quic_addr,
            source,
        };
        let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secrets.reset_key.as_bytes());
        // Connection ids are validated with a key too; derive it from the same
        // persisted secret so a restarted server recognises the ids of the
        // previous process and answers them with a stateless reset.
        let tag = ring::hmac::sign(&reset_key, b"herald connection id key");
        let mut cid_key = [0u8; 8];
        cid_key.copy_from_slice(&tag.as_ref()[..8]);
        let cid_key = u64::from_le_bytes(cid_key);
        let mut endpoint_config = quinn_proto::EndpointConfig::new(Arc::new(reset_key));
        endpoint_config
            .cid_generator(move || Box::new(crate::transport::cids::KeyedCids::new(cid_key, 0, 1)));
        let mut transport_config =
            TransportConfig::new(server_config, endpoint_config, config.quic_addr);
        transport_config.max_connections = config.limits.max_connections;
        transport_config.loops = config.quic_loops;
        transport_config.cid_key = cid_key;
        transport_config.handshakes = config.limits.handshake_policy();
        transport_config.turn_hook = Some(Arc::new(crate::feed::flush_live_metrics));
        // The recorder first: the loops take their metric handles when they
        // start, and a handle taken before it exists records nothing.
        crate::metrics::install();
        let transport = Transport::start(transport_config, udp).map_err(bind_err)?;
        let quic_addr = transport.local_addr();
        Ok(Server {
            lock,
            config,
            transport,
            http,
            hub,
            log,
            fanout,
            promo,
            certs,
            secrets,
            verifier,
            tenancy,
            quic_addr,
            http_addr,
        })
    }

    /// The bound QUIC address.
    pub fn quic_addr(&self) -> SocketAddr {
        self.quic_addr
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The secrets in use.
    pub fn secrets(&self) -> &Secrets {
        &self.secrets
    }

    /// The configuration in use.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The certificate a client should trust: the operator's (verify it
    /// against its CA) or the self-signed one in the data directory (pin it).
    pub fn certificate_file(&self) -> PathBuf {
        match &self.config.tls.cert {
            Some(c) => c.clone(),
            None => self.config.data_dir.join(crate::tls::CERT_FILE),
        }
    }

    /// Mints follower tokens signed with this server's secret.
    pub fn token_issuer(&self) -> TokenIssuer {
        TokenIssuer::hs256(self.secrets.jwt_secret.as_bytes())
    }

    /// The log, for embedding and tests.
    pub fn log(&self) -> Arc<dyn ChannelLog> {
        self.log.clone()
    }

    /// Brands, keys and channel ownership, for embedding and tests.
    pub fn tenancy(&self) -> Arc<dyn TenancyStore> {
        self.tenancy.clone()
    }

    /// The hub, for embedding and tests.
    pub fn hub(&self) -> Arc<Hub> {
        self.hub.clone()
    }

    fn api_state(&self, stopping: CancellationToken) -> crate::api::ApiState {
        crate::api::ApiState {
            log: self.log.clone(),
            hub: self.hub.clone(),
            promo: self.promo.clone(),
            admin_key: Arc::from(self.secrets.admin_key.as_str()),
            tenancy: self.tenancy.clone(),
            publish_limiter: Arc::new(crate::limits::PublishLimiter::new(
                self.config.limits.publish_per_sec,
                self.config.limits.publish_burst,
            )),
            metrics: crate::metrics::install(),
            stopping,
        }
    }

    /// The HTTP API on this server's parts, without a listener: requests go
    /// in with `tower::ServiceExt::oneshot` (for embedding, and for the
    /// fuzzer of the API's JSON bodies).
    pub fn api_router(&self) -> axum::Router {
        crate::api::router(self.api_state(CancellationToken::new()))
    }

    /// Serves until `shutdown` resolves; see the module docs for the order
    /// of shutdown. Returns once every task the server started has ended and
    /// every database is closed.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let tasks = TaskTracker::new();
        // Graceful: stop accepting, let requests and sessions finish.
        let stop = CancellationToken::new();
        // The grace period is over: drop whatever is still running.
        let kill = CancellationToken::new();
        let ctx = Arc::new(SessionContext {
            hub: self.hub.clone(),
            log: self.log.clone(),
            promo: self.promo.clone(),
            verifier: self.verifier.clone(),
            limits: self.config.limits.clone(),
            connections: FollowerConnections::new(self.config.limits.max_connections_per_follower),
            catchups: crate::feed::CatchupBudget::new(self.config.limits.max_concurrent_catchups),
        });

        let api = crate::api::router(self.api_state(stop.clone()));
        tasks.spawn(crate::api::serve(
            self.http,
            api,
            self.config.limits.http(),
            tasks.clone(),
            stop.clone(),
            kill.clone(),
        ));
        tasks.spawn(retention_loop(
            self.log.clone(),
            self.config.retention.clone(),
            stop.clone(),
        ));
        tasks.spawn(cert_renewal_loop(self.certs.clone(), stop.clone()));
        tasks.spawn(self.promo.clone().run_flusher(stop.clone()));
        tasks.spawn(storage_recovery_loop(
            self.promo.clone(),
            self.tenancy.clone(),
            stop.clone(),
        ));
        tasks.spawn(metrics_upkeep_loop(stop.clone()));

        let mut transport = self.transport;
        accept_loop(&mut transport, ctx, &tasks, &kill, shutdown).await;

        tracing::info!("shutting down");
        stop.cancel();
        transport.shutdown(
            VarInt::from_u32(ErrorCode::ShuttingDown.as_u32()),
            b"server shutting down",
        );
        tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "requests or sessions still running after the grace period; dropping them"
            );
            kill.cancel();
            tasks.wait().await;
        }
        // Let the close frames leave before the socket goes: the loops exit
        // once their connections are drained (bounded by the transport).
        if let Err(e) = tokio::task::spawn_blocking(move || transport.join()).await {
            tracing::error!(error = %e, "joining the QUIC loops failed");
        }
        // Sessions are gone: count what they delivered, durably.
        match self.promo.run(|p| p.flush()).await {
            Ok(()) => {}
            Err(e) => tracing::error!(error = %e, "final promo flush failed"),
        }
        // Cluster mode: what this node leased and did not show goes back.
        if let Err(e) = self.promo.run(|p| p.release_leases()).await {
            tracing::warn!(error = %e, "giving back impression leases failed");
        }
        self.tenancy.close().await;
        self.promo.close().await;
        if let Err(e) = self.log.close().await {
            tracing::error!(error = %e, "closing the log failed");
        }
        // The log hands it nothing more: finish the queued fan-outs and stop.
        let fanout = self.fanout.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || fanout.close()).await {
            tracing::error!(error = %e, "stopping the fan-out failed");
        }
        drop(self.lock);
    }
}

/// How long cluster mode may take to reach NATS and open its stream and
/// buckets at start-up.
pub const CLUSTER_OPEN_TIMEOUT: Duration = Duration::from_secs(60);

/// Cluster mode: connects to NATS (the client goes on reconnecting by
/// itself afterwards).
async fn connect_cluster(config: &Config) -> Result<crate::cluster::Nats, ServerError> {
    let cfg = config
        .cluster
        .to_cluster_config()
        .map_err(|e| ServerError::Cluster(e.to_string()))?;
    let urls = cfg.urls.join(",");
    let nats = with_cluster_timeout(config, crate::cluster::Nats::connect(cfg))
        .await?
        .map_err(|e| ServerError::Cluster(e.to_string()))?;
    // The client connects in the background (and keeps reconnecting): say
    // at once when no server of the list answers, rather than time out
    // later on the first request.
    let connected = async {
        while nats.client.connection_state() != async_nats::connection::State::Connected {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(CLUSTER_CONNECT_TIMEOUT, connected)
        .await
        .is_err()
    {
        return Err(ServerError::Cluster(format!(
            "cannot connect to any NATS server of {urls} within {}s (is nats-server running?)",
            CLUSTER_CONNECT_TIMEOUT.as_secs()
        )));
    }
    Ok(nats)
}

/// How long cluster mode waits at start-up for a NATS connection.
pub const CLUSTER_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Bounds one step of cluster start-up by [`CLUSTER_OPEN_TIMEOUT`], with an
/// error that says where NATS was expected.
async fn with_cluster_timeout<T>(
    config: &Config,
    f: impl Future<Output = T>,
) -> Result<T, ServerError> {
    tokio::time::timeout(CLUSTER_OPEN_TIMEOUT, f)
        .await
        .map_err(|_| {
            ServerError::Cluster(format!(
                "NATS at {} did not answer within {}s (is nats-server running, with JetStream on?)",
                config.cluster.urls.join(","),
                CLUSTER_OPEN_TIMEOUT.as_secs()
            ))
        })
}

/// The data directory's lock file (`herald.lock`), held by the running
/// server so that a second server on the same directory is refused at once
/// with a clear message instead of a database error. It is an OS file lock:
/// it goes away with the process, even after `kill -9`.
struct DataDirLock {
    _file: std::fs::File,
}

/// File name of the lock inside the data directory.
pub const LOCK_FILE: &str = "herald.lock";

impl DataDirLock {
    fn take(dir: &std::path::Path) -> Result<DataDirLock, ServerError> {
        use std::io::{Read, Seek, Write};
        let path = dir.join(LOCK_FILE);
        let io = |source| ServerError::DataDir {
            path: path.clone(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                let pid = pid.trim();
                return Err(ServerError::DataDirBusy {
                    path: dir.to_path_buf(),
                    lock: path.clone(),
                    holder: if pid.is_empty() {
                        String::new()
                    } else {
                        format!(", by process {pid}")
                    },
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        // Who holds it, for the message above (best effort).
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        Ok(DataDirLock { _file: file })
    }
}

/// A channel quiet this long after a post gets a Head frame to followers
/// with live datagrams (protocol §8.5).
const HEAD_AFTER: Duration = Duration::from_secs(1);

/// With `follower_ack_delay_ms`: followers acknowledge at least every this
/// many ack-eliciting packets plus one (so bulk transfers stay ACK-clocked).
const FOLLOWER_ACK_THRESHOLD: u32 = 9;

/// Largest QUIC DATAGRAM frame a follower may send (the server reads none).
const DATAGRAM_IN_BYTES: usize = 1500;

fn transport(config: &Config) -> Result<quinn_proto::TransportConfig, ServerError> {
    let limits = &config.limits;
    let mut t = quinn_proto::TransportConfig::default();
    // One control stream from the follower; it opens no unidirectional streams.
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Small windows bound what one slow or hostile follower makes us hold.
    t.stream_receive_window((64u32 * 1024).into());
    t.receive_window((128u32 * 1024).into());
    t.send_window(1024 * 1024);
    // Datagrams go one way, to followers that ask (protocol §8.5); quinn
    // sends none unless receiving is enabled too. What a follower sends is
    // discarded; 1,500 bytes is its most (the advertised frame size).
    // Unsent live datagrams are bounded like the session's queue; past it
    // quinn drops the oldest, which the follower asks for again.
    if limits.live_datagrams {
        t.datagram_receive_buffer_size(Some(DATAGRAM_IN_BYTES));
        t.datagram_send_buffer_size(limits.session_queue_bytes);
    } else {
        t.datagram_receive_buffer_size(None);
    }
    t.mtu_discovery_config(None);
    // Fewer ACKs from followers (see `follower_ack_delay_ms`, and
    // vendor/README.md for the quinn-proto patch this relies on).
    if limits.follower_ack_delay_ms > 0 {
        let mut ack = quinn_proto::AckFrequencyConfig::default();
        ack.max_ack_delay(Some(Duration::from_millis(limits.follower_ack_delay_ms)))
            .ack_eliciting_threshold(VarInt::from_u32(FOLLOWER_ACK_THRESHOLD));
        t.ack_frequency_config(Some(ack));
    }
    t.keep_alive_interval(None);
    let idle = quinn_proto::IdleTimeout::try_from(limits.idle_timeout())
        .map_err(|e| ServerError::Transport(e.to_string()))?;
    t.max_idle_timeout(Some(idle));
    Ok(t)
}

/// Accepts established connections until `shutdown`; each session is a
/// task on `tasks`, dropped on `kill`. The transport bounds connections and
/// handshakes, by the [`crate::admission`] policy.
async fn accept_loop(
    transport: &mut Transport,
    ctx: Arc<SessionContext>,
    tasks: &TaskTracker,
    kill: &CancellationToken,
    shutdown: impl Future<Output = ()>,
) {
    let next_id = AtomicU64::new(1);
    tokio::pin!(shutdown);
    loop {
        let conn = tokio::select! {
            c = transport.accept() => match c {
                Some(c) => c,
                None => break,
            },
            _ = &mut shutdown => break,
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        let ctx = ctx.clone();
        let kill = kill.clone();
        // A debug span: at the default log level an enabled span per
        // session costs about 0.85 KiB per idle follower (its registry slot
        // and formatted fields), 3 % of the whole. The one info line below
        // carries the session's id and peer itself.
        let peer = conn.remote_address();
        let span = tracing::debug_span!("session", id, %peer);
        let session = async move {
            match (Session { id, conn, ctx }).run().await {
                Ok(_) => tracing::debug!("session ended"),
                Err(SessionError::Closed { code, message }) => {
                    tracing::info!(session = id, %peer, %code, %message, "session closed by server")
                }
                Err(e) => tracing::debug!(error = %e, "session ended"),
            }
        };
        tasks.spawn(
            async move {
                tokio::select! {
                    _ = session => {}
                    _ = kill.cancelled() => {}
                }
            }
            .instrument(span),
        );
    }
}

/// Trims every channel by the retention policy, periodically.
async fn retention_loop(
    log: Arc<dyn ChannelLog>,
    retention: crate::config::Retention,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(retention.interval_secs));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let policy = TrimPolicy {
            // 0 days means no age limit, like 0 posts means no count limit.
            older_than_ms: if retention.max_age_days == 0 {
                i64::MIN
            } else {
                crate::model::now_ms().saturating_sub(
                    (retention.max_age_days as i64).saturating_mul(24 * 3600 * 1000),
                )
            },
            keep_max: retention.max_posts,
        };
        // Passes of bounded size, each one durable write (none when nothing
        // is due), until nothing is left to remove.
        loop {
            match log.trim_all(policy).await {
                Ok(r) => {
                    if r.posts_removed > 0 || r.keys_expired > 0 {
                        tracing::info!(
                            posts = r.posts_removed,
                            channels = r.channels_trimmed,
                            idempotency_keys = r.keys_expired,
                            "retention trim"
                        );
                    }
                    if !r.more || stop.is_cancelled() {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "retention trim failed; will retry");
                    break;
                }
            }
        }
    }
}

/// Reopens a database whose write failed once it can take writes again,
/// for the databases written only now and then (the log's committer
/// reopens the log itself), so `/readyz` recovers without waiting for the
/// next write.
async fn storage_recovery_loop(
    promo: Arc<Promo>,
    tenancy: Arc<dyn TenancyStore>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(crate::datadir::REOPEN_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        if promo.health() != crate::datadir::Health::Ok {
            let _ = promo
                .run(|p| {
                    p.recover();
                    Ok(())
                })
                .await;
        }
        if tenancy.health() != crate::datadir::Health::Ok {
            // Reopening may block on the disk: off the runtime's workers,
            // and awaited here, so shutdown waits for it.
            let t = tenancy.clone();
            let _ = tokio::task::spawn_blocking(move || t.recover()).await;
        }
    }
}

/// Compacts histogram storage periodically, so memory stays bounded when
/// nobody scrapes `/metrics`.
async fn metrics_upkeep_loop(stop: CancellationToken) {
    let handle = crate::metrics::install();
    let mut tick = tokio::time::interval(crate::metrics::UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        handle.run_upkeep();
    }
}

/// Renews a self-signed certificate near expiry while running.
async fn cert_renewal_loop(certs: Arc<CertStore>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => return,
        }
        let certs = certs.clone();
        match tokio::task::spawn_blocking(move || certs.renew_if_needed()).await {
            Ok(Ok(true)) => tracing::info!("renewed the self-signed certificate"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "certificate renewal failed"),
            Err(e) => tracing::warn!(error = %e, "certificate renewal task failed"),
        }
    }
}
