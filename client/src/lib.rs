//! The follower client library: connect, authenticate, follow with resume,
//! and a stream of typed events, with automatic reconnect.
//!
//! ```no_run
//! # async fn demo(trust: herald_client::ClientTrust, token: String) -> Result<(), herald_client::ClientError> {
//! use herald_client::{Client, ClientOptions, Event};
//! let mut client = Client::connect(ClientOptions::new("127.0.0.1:4433".parse().unwrap(), trust, token)).await?;
//! client.follow("news").await?;
//! while let Some(event) = client.next_event().await {
//!     if let Event::Post(p) = event {
//!         println!("{} #{}: {}", p.channel, p.seq, p.text);
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! The client remembers, per channel, the seq of the last post it delivered.
//! When the connection drops for a reason worth retrying (network loss, server
//! restart, lagging), it reconnects with backoff and re-follows every channel
//! from that seq, so the application sees every post once, in order. Posts at
//! or below the remembered seq are dropped (and counted in [`ClientStats`]).
//! Events wait in a bounded buffer ([`ClientOptions::event_buffer`]); an
//! application that stops reading stops the client reading, and the server
//! catches it up later.
//!
//! By default the client asks for live posts as QUIC datagrams
//! ([`ClientOptions::live_datagrams`], protocol §8.5). Datagrams may be lost,
//! repeated or reordered; the per-channel rules of [`ordering`] put the
//! posts of both paths back in seq order, hold edits, deletes and promoted
//! posts until their post is delivered, and ask the server for what is
//! missing, so the events are the same as with the feed stream alone.
//!
//! A client may be given several server addresses
//! ([`ClientOptions::with_servers`]: the nodes of one Herald cluster). It
//! connects to the first that answers; when its connection drops it
//! reconnects to the next one in the list (then the one after, round the
//! list), resuming every channel from its last seq: nodes of a cluster share
//! one log, so seqs and epochs are the same on every node.
//!
//! Tokens expire. Give [`ClientOptions::token_refresher`] a callback that
//! fetches a new token from the application's backend: the client calls it
//! before the current token runs out, sends the new token in band (the
//! session goes on), and uses it for every reconnect.

#![warn(missing_docs)]

mod conn;
mod datagram;
mod driver;
pub mod ordering;
mod token_expiry;
mod trust;
pub mod udp;

pub use conn::{
    connect_raw, follower_transport, quic_client_config, ClientError, DATAGRAM_RECEIVE_BUFFER,
};

/// Most receipts of promoted posts kept unconfirmed (the server has not
/// acknowledged them); past it the oldest is dropped, and that promoted post
/// is not counted if the server had not counted it yet.
pub const MAX_UNCONFIRMED_RECEIPTS: usize = 16_384;
pub use trust::{client_crypto, ClientTrust, TrustError};

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use herald_proto::model::Post;
use herald_proto::ErrorCode;

/// Why a token refresh failed (the application's own error).
pub type RefreshError = Box<dyn std::error::Error + Send + Sync>;
/// A token refresh in flight.
pub type RefreshFuture = Pin<Box<dyn Future<Output = Result<String, RefreshError>> + Send>>;
/// Fetches a new follower token (for the same `sub`) from the application.
pub type TokenRefresher = Arc<dyn Fn() -> RefreshFuture + Send + Sync>;

/// How to reach and authenticate to a server.
#[derive(Clone)]
pub struct ClientOptions {
    /// The servers' QUIC addresses, tried in order (see the crate docs); at
    /// least one. All must serve the same channels (one Herald, or the
    /// nodes of one cluster).
    pub servers: Vec<SocketAddr>,
    /// Name sent in TLS SNI and checked against a CA-verified certificate.
    pub server_name: String,
    /// How to trust the server's certificate.
    pub trust: ClientTrust,
    /// Follower token (JWT).
    pub token: String,
    /// Called before `token` expires (at about 80 % of its remaining
    /// lifetime) for a new one; `None`: the session ends when it expires.
    pub token_refresher: Option<TokenRefresher>,
    /// Sent in Hello, for server logs.
    pub client_name: String,
    /// Reconnect and resume on retryable disconnects.
    pub reconnect: bool,
    /// QUIC keep-alive interval; keep it near half of `idle_timeout`.
    pub keep_alive: Duration,
    /// A connection silent this long is considered lost (the smaller of this
    /// and the server's idle timeout applies).
    pub idle_timeout: Duration,
    /// Largest feed frame accepted.
    pub max_feed_frame: usize,
    /// Events buffered for the application.
    pub event_buffer: usize,
    /// A connection attempt (handshake, Hello, Welcome) that takes longer
    /// fails (the first one is returned by [`Client::connect`]; later ones
    /// are retried with backoff).
    pub connect_timeout: Duration,
    /// First pause between reconnect attempts (it doubles, with jitter).
    pub backoff_min: Duration,
    /// Largest pause between reconnect attempts.
    pub backoff_max: Duration,
    /// Ask the server for live posts as QUIC datagrams (`docs/protocol.md`
    /// §8.5): cheaper for the server, and a lost datagram costs no stream
    /// head-of-line blocking. The client then orders posts by seq across
    /// both paths and asks for what it missed (see [`ordering`]); the
    /// application sees the same events either way. Default: on.
    pub live_datagrams: bool,
}

impl ClientOptions {
    /// Defaults: reconnect on, 15 s keep-alive, 30 s idle timeout, 5 s to
    /// connect, 1024 buffered events, live datagrams asked for.
    pub fn new(server: SocketAddr, trust: ClientTrust, token: String) -> ClientOptions {
        ClientOptions::with_servers(vec![server], trust, token)
    }

    /// Like [`ClientOptions::new`], with several servers (the nodes of one
    /// cluster): the client connects to the first that answers and moves to
    /// the next when its connection drops. An empty list fails at connect.
    pub fn with_servers(
        servers: Vec<SocketAddr>,
        trust: ClientTrust,
        token: String,
    ) -> ClientOptions {
        ClientOptions {
            servers,
            server_name: "localhost".into(),
            trust,
            token,
            token_refresher: None,
            client_name: format!("herald-client/{}", env!("CARGO_PKG_VERSION")),
            reconnect: true,
            keep_alive: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(30),
            max_feed_frame: herald_proto::frame::DEFAULT_MAX_FEED_FRAME,
            event_buffer: 1024,
            connect_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            live_datagrams: true,
        }
    }
}

/// A client endpoint (one UDP socket, with large kernel buffers, see
/// [`crate::udp`]) set up for `opts`' trust and keep-alive, for sharing
/// between clients with [`Client::connect_via`].
pub fn shared_endpoint(opts: &ClientOptions) -> Result<quinn::Endpoint, ClientError> {
    conn::client_endpoint(opts, true)
}

/// Something that happened on the feed or the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A post, delivered once, in seq order per channel.
    Post(Post),
    /// A post the follower has seen was edited.
    Edited {
        /// The channel.
        channel: String,
        /// The post's seq.
        seq: u64,
        /// The channel's epoch.
        epoch: u64,
        /// The new text.
        text: String,
        /// When it was edited (Unix milliseconds).
        edited_at_ms: i64,
    },
    /// A post the follower has seen was deleted.
    Deleted {
        /// The channel.
        channel: String,
        /// The post's seq (it stays, as a tombstone).
        seq: u64,
        /// The channel's epoch.
        epoch: u64,
    },
    /// A promoted (paid) post, labelled; not part of the channel's history.
    Promoted {
        /// The channel it is shown in.
        channel: String,
        /// The campaign (send it back with [`Client::click`]).
        campaign_id: String,
        /// Show this to the user (e.g. "Sponsored").
        label: String,
        /// The creative's title.
        title: String,
        /// The creative's text.
        text: String,
        /// The creative's media, if any.
        media: Option<herald_proto::model::Media>,
        /// The call-to-action link.
        cta_url: String,
        /// The post it follows.
        after_seq: u64,
    },
    /// The server could not resume where asked (history reset or trimmed);
    /// delivery goes on from `oldest_seq`.
    Reset {
        /// The channel.
        channel: String,
        /// The channel's current epoch.
        epoch: u64,
        /// The oldest seq still retained; delivery goes on from there.
        oldest_seq: u64,
    },
    /// An error not tied to a request of the application (e.g. a re-follow
    /// after reconnect was refused).
    Error {
        /// The error code, if this build knows it.
        code: Option<ErrorCode>,
        /// The server's message.
        message: String,
        /// The channel it is about (may be empty).
        channel: String,
    },
    /// The connection dropped; the client is reconnecting.
    Disconnected {
        /// Why it dropped.
        reason: String,
    },
    /// The client reconnected and re-followed its channels.
    Reconnected,
    /// The connection ended for good (refused, or reconnect off); no more events follow.
    Closed {
        /// The close code, if the server gave one this build knows.
        code: Option<ErrorCode>,
        /// Why it ended.
        reason: String,
    },
}

/// Answer to a follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Followed {
    /// The channel's newest seq when the follow was accepted (0: no posts yet).
    pub head_seq: u64,
    /// The channel's epoch.
    pub epoch: u64,
}

/// Where to start a follow.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FollowFrom {
    /// Replay every post after this seq, then go live.
    pub after_seq: Option<u64>,
    /// The epoch `after_seq` belongs to; a different current epoch means a reset.
    pub epoch: Option<u64>,
    /// Without `after_seq`: the latest posts to deliver first.
    pub tail: u32,
}

/// Counters kept by a client.
#[derive(Debug, Default)]
pub struct ClientStats {
    /// Posts delivered to the application.
    pub posts: AtomicU64,
    /// Posts at or below the last delivered seq, dropped, that this client
    /// had not asked for again (the server sends none: should stay 0).
    pub duplicates_dropped: AtomicU64,
    /// Second copies of posts this client asked for again with `Resend`
    /// (live datagrams, §8.5: a datagram or stream frame already on its way
    /// when the request went out, or the resent copy), dropped.
    pub resent_copies: AtomicU64,
    /// Posts whose seq skipped ahead without a Reset (should stay 0).
    pub gaps: AtomicU64,
    /// Reconnections after a dropped connection.
    pub reconnects: AtomicU64,
    /// Promoted posts received.
    pub promoted: AtomicU64,
    /// Receipts of promoted posts the server has not acknowledged yet.
    pub receipts_unconfirmed: AtomicU64,
    /// Receipts dropped unconfirmed because more than
    /// [`MAX_UNCONFIRMED_RECEIPTS`] waited (should stay 0).
    pub receipts_dropped: AtomicU64,
    /// Index in [`ClientOptions::servers`] of the server of the current (or
    /// last) connection.
    pub server_index: AtomicU64,
    /// Posts received as QUIC datagrams (live datagrams, §8.5), before
    /// ordering (duplicates included).
    pub datagram_posts: AtomicU64,
    /// Datagrams that were not one well-formed, length-prefixed `Post`
    /// feed frame: dropped.
    pub datagrams_malformed: AtomicU64,
    /// Resend requests sent for posts that did not arrive.
    pub resends: AtomicU64,
    /// Posts or changes dropped because the channel already held
    /// [`ordering::MAX_HELD_POSTS`] posts or [`ordering::MAX_HELD_CHANGES`]
    /// changes waiting (a dropped post is asked for again).
    pub held_dropped: AtomicU64,
}

impl ClientStats {
    /// Reads one counter.
    pub fn get(&self, c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

pub(crate) enum Command {
    Follow {
        channel: String,
        from: FollowFrom,
        reply: oneshot::Sender<Result<Followed, ClientError>>,
    },
    Unfollow {
        channel: String,
        reply: oneshot::Sender<Result<(), ClientError>>,
    },
    Click {
        campaign_id: String,
        channel: String,
        reply: oneshot::Sender<Result<bool, ClientError>>,
    },
    Close {
        /// Dropped once the connection close has been sent.
        done: oneshot::Sender<()>,
    },
}

impl Command {
    /// Answers the command with `err` (it cannot be carried out).
    pub(crate) fn fail(self, err: ClientError) {
        match self {
            Command::Follow { reply, .. } => drop(reply.send(Err(err))),
            Command::Unfollow { reply, .. } => drop(reply.send(Err(err))),
            Command::Click { reply, .. } => drop(reply.send(Err(err))),
            Command::Close { .. } => {}
        }
    }
}

/// A connected follower. Dropping it closes the connection.
pub struct Client {
    cmds: mpsc::Sender<Command>,
    events: mpsc::Receiver<Event>,
    stats: Arc<ClientStats>,
    session_id: u64,
}

impl Client {
    /// Connects, says Hello and waits for Welcome. A refused token or
    /// handshake is returned here as an error.
    pub async fn connect(opts: ClientOptions) -> Result<Client, ClientError> {
        let endpoint = conn::client_endpoint(&opts, false)?;
        Client::start(endpoint, true, opts).await
    }

    /// Like [`Client::connect`], but through `endpoint`, which many clients
    /// may share (one UDP socket and one receive task for all of them, as a
    /// load generator wants). Make it with [`shared_endpoint`]. Closing this
    /// client closes only its connection; the endpoint stays open.
    pub async fn connect_via(
        endpoint: &quinn::Endpoint,
        opts: ClientOptions,
    ) -> Result<Client, ClientError> {
        Client::start(endpoint.clone(), false, opts).await
    }

    async fn start(
        endpoint: quinn::Endpoint,
        owns_endpoint: bool,
        opts: ClientOptions,
    ) -> Result<Client, ClientError> {
        // The first server that answers; the last error if none does.
        let mut first = Err(ClientError::Connect("no server address given".into()));
        let mut index = 0;
        for (i, addr) in opts.servers.iter().enumerate() {
            first = conn::Conn::open(&endpoint, &opts, *addr).await;
            match &first {
                Ok(_) => {
                    index = i;
                    break;
                }
                // A refused token would be refused by every node.
                Err(e) if !e.is_retryable() => break,
                Err(_) => {}
            }
        }
        let first = first?;
        let session_id = first.session_id;
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (ev_tx, ev_rx) = mpsc::channel(opts.event_buffer.max(1));
        let stats = Arc::new(ClientStats::default());
        stats.server_index.store(index as u64, Ordering::Relaxed);
        let driver =
            driver::Driver::new(opts, endpoint, owns_endpoint, cmd_rx, ev_tx, stats.clone());
        tokio::spawn(driver.run(first));
        Ok(Client {
            cmds: cmd_tx,
            events: ev_rx,
            stats,
            session_id,
        })
    }

    /// The server's id for the first session.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// Follows `channel` live.
    pub async fn follow(&self, channel: &str) -> Result<Followed, ClientError> {
        self.follow_from(channel, FollowFrom::default()).await
    }

    /// Follows `channel` from a position.
    pub async fn follow_from(
        &self,
        channel: &str,
        from: FollowFrom,
    ) -> Result<Followed, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Command::Follow {
                channel: channel.to_string(),
                from,
                reply,
            })
            .await
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Stops following `channel`.
    pub async fn unfollow(&self, channel: &str) -> Result<(), ClientError> {
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Command::Unfollow {
                channel: channel.to_string(),
                reply,
            })
            .await
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Reports a click on a promoted post's call to action. `Ok(true)` when
    /// counted; `Ok(false)` for a repeat (clicks count once per follower and
    /// campaign).
    pub async fn click(&self, campaign_id: &str, channel: &str) -> Result<bool, ClientError> {
        let (reply, rx) = oneshot::channel();
        self.cmds
            .send(Command::Click {
                campaign_id: campaign_id.to_string(),
                channel: channel.to_string(),
                reply,
            })
            .await
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// The next event; `None` once the client has closed for good.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Counters.
    pub fn stats(&self) -> &ClientStats {
        &self.stats
    }

    /// Closes the connection, and returns once the close has been sent
    /// (for a client with its own endpoint: flushed to the network, within
    /// a second), so the server forgets this follower at once even if the
    /// process exits right after.
    pub async fn close(self) {
        let (done, rx) = oneshot::channel();
        if self.cmds.send(Command::Close { done }).await.is_ok() {
            let _ = rx.await;
        }
    }
}
