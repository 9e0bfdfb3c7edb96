//! One session per connected follower.
//!
//! The follower opens one bidirectional control stream; its first frame must
//! be Hello with a valid token. The server then opens one unidirectional feed
//! stream, answers Welcome, and serves Follow / Unfollow / Refresh requests
//! until the connection ends. Posts flow hub → `Outbox` → `FeedWriter` →
//! feed stream (see [`crate::feed`], which also holds the argument for why
//! catch-up and live delivery meet without gap or duplicate). The session is
//! registered in the hub per followed channel and removed from all of them
//! when it ends, by `Subscriptions`' `Drop`.
//!
//! Connection-level errors (garbage or oversized frame, missing Hello, bad or
//! expired token, lagging too often) close the connection with the error's
//! code and message as the QUIC close reason; request-level errors (unknown
//! channel, forbidden channel, too many follows) answer an Error frame and the
//! session goes on.
//!
//! Limits ([`ConnLimits`], [`FollowerConnections`]): control frames and follows per second per connection
//! answer `rate_limited` and close the connection if it keeps going over; a
//! follower id may hold only so many connections at once
//! (`too_many_connections` at Hello).

mod feed_stream;
mod limits;

pub use limits::{ConnLimits, ConnectionSlot, FollowerConnections, Verdict};

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{sleep_until, timeout, Instant};
use tokio_util::task::AbortOnDropHandle;

use crate::auth::{Follower, TokenVerifier};
use herald_proto::v1 as pb;
use herald_proto::{encode_frame, ErrorCode, FrameError, FrameReader};

use crate::config::Limits;
use crate::feed::{
    CatchupSlots, ControlRefused, DurableFuture, FeedDeps, FeedError, FeedEvent, FeedStats,
    FeedWriter, Item, LagPolicy, Outbox, MAX_PENDING_CONTROL,
};
use crate::hub::Hub;
use crate::model::{ChannelId, ClientRequest, FollowRequest};
use crate::promo::Promo;
use crate::store::ChannelLog;
use crate::transport::{CloseReason, Connection, VarInt};

/// Buffer a session's control-stream reader keeps while idle, in bytes.
pub const CONTROL_IDLE_BUFFER: usize = 256;

/// What every session shares.
pub struct SessionContext {
    pub(crate) hub: Arc<Hub>,
    pub(crate) log: Arc<dyn ChannelLog>,
    pub(crate) promo: Arc<Promo>,
    pub(crate) verifier: TokenVerifier,
    pub(crate) limits: Limits,
    /// Connections open per follower id.
    pub(crate) connections: Arc<FollowerConnections>,
    /// The server-wide bound on catch-up steps in progress.
    pub(crate) catchups: crate::feed::CatchupBudget,
}

/// How a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The QUIC connection ended: lost, timed out, or closed by the follower.
    #[error("connection lost: {0}")]
    Connection(#[from] CloseReason),
    /// The server closed the connection (see [`close`]).
    #[error("closed by server: {code}: {message}")]
    Closed {
        /// The error code, sent as the QUIC close code.
        code: ErrorCode,
        /// The close reason sent with it.
        message: String,
    },
    /// The control stream failed: a write failed, or it was reset or lost.
    #[error("control stream write failed: {0}")]
    Write(#[from] std::io::Error),
}

/// Closes `conn` with `code` and `message` as the close reason.
pub fn close(conn: &Connection, code: ErrorCode, message: &str) -> SessionError {
    conn.close(VarInt::from_u32(code.as_u32()), message.as_bytes());
    SessionError::Closed {
        code,
        message: message.to_string(),
    }
}

/// The channels a session follows; unregisters them from the hub on drop.
struct Subscriptions {
    hub: Arc<Hub>,
    session: u64,
    outbox: Arc<Outbox>,
    channels: HashSet<ChannelId>,
}

impl Drop for Subscriptions {
    fn drop(&mut self) {
        // Closed first: a bucket busy with a fan-out is not waited for (this
        // may run on a runtime worker); that fan-out drops the closed outbox.
        self.outbox.close();
        for ch in self.channels.drain() {
            self.hub.unfollow_nowait(&ch, self.session);
        }
    }
}

/// Counts a session in the active-sessions gauge while alive.
struct ActiveSession;

impl ActiveSession {
    fn new() -> ActiveSession {
        metrics::gauge!(crate::metrics::SESSIONS_ACTIVE).increment(1.0);
        ActiveSession
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        metrics::gauge!(crate::metrics::SESSIONS_ACTIVE).decrement(1.0);
    }
}

/// The promoted post at the end of a catch-up: the promo engine's auction,
/// told the channel's follower count by the hub (for targeting).
struct PromoCatchup {
    promo: Arc<Promo>,
    hub: Arc<Hub>,
}

impl CatchupSlots for PromoCatchup {
    fn after_catchup(&self, channel: &ChannelId, after_seq: u64) -> Option<Arc<FeedEvent>> {
        self.promo
            .after_catchup(channel, after_seq, self.hub.follower_count(channel))
    }

    fn durable(&self) -> DurableFuture<'_> {
        Box::pin(async move { self.promo.durable().await.map_err(|e| e.to_string()) })
    }
}

/// A connected follower. See the module docs.
pub struct Session {
    pub(crate) id: u64,
    pub(crate) conn: Connection,
    pub(crate) ctx: Arc<SessionContext>,
}

fn error_frame(
    request_id: u64,
    code: ErrorCode,
    message: String,
    channel: &str,
) -> pb::ServerFrame {
    pb::ServerFrame {
        request_id,
        kind: Some(pb::server_frame::Kind::Error(pb::Error {
            code: code.as_u32(),
            message,
            channel: channel.to_string(),
        })),
    }
}

fn frame_error_code(e: &FrameError) -> ErrorCode {
    match e {
        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
        _ => ErrorCode::MalformedFrame,
    }
}

impl Session {
    /// Serves the connection until it ends.
    pub async fn run(self) -> Result<FeedStats, SessionError> {
        let limits = &self.ctx.limits;
        // One deadline for the control stream and the Hello on it.
        let hello_by = Instant::now() + limits.hello_timeout();
        match tokio::time::timeout_at(hello_by, self.conn.control_opened()).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(close(
                    &self.conn,
                    ErrorCode::HelloRequired,
                    "no control stream opened in time",
                ))
            }
        }
        // Control frames are rare and small: keep little buffer per idle session.
        let mut reader = FrameReader::new(self.conn.control_reader(), limits.max_frame_bytes)
            .with_idle_capacity(CONTROL_IDLE_BUFFER);

        // Hello.
        let first =
            match tokio::time::timeout_at(hello_by, reader.read_frame::<pb::ClientFrame>()).await {
                Err(_) => {
                    return Err(close(
                        &self.conn,
                        ErrorCode::HelloRequired,
                        "no Hello in time",
                    ))
                }
                Ok(Ok(None)) => {
                    return Err(close(
                        &self.conn,
                        ErrorCode::HelloRequired,
                        "stream ended before Hello",
                    ))
                }
                Ok(Err(FrameError::Io(e))) => return Err(SessionError::Write(e)),
                Ok(Err(e)) => return Err(close(&self.conn, frame_error_code(&e), &e.to_string())),
                Ok(Ok(Some(f))) => f,
            };
        let (hello_id, token, receipts, live_datagrams) =
            match <(u64, ClientRequest)>::try_from(first) {
                Ok((
                    id,
                    ClientRequest::Hello {
                        token,
                        client_name,
                        receipts,
                        live_datagrams,
                    },
                )) => {
                    tracing::debug!(client = %client_name, receipts, live_datagrams, "hello");
                    (id, token, receipts, live_datagrams)
                }
                Ok(_) => {
                    return Err(close(
                        &self.conn,
                        ErrorCode::HelloRequired,
                        "the first frame must be Hello",
                    ))
                }
                Err(e) => return Err(close(&self.conn, ErrorCode::MalformedFrame, &e.to_string())),
            };
        let mut follower = match self.ctx.verifier.verify(&token) {
            Ok(f) => f,
            Err(e) => return Err(close(&self.conn, e.code(), &e.to_string())),
        };
        let Some(_slot) = self.ctx.connections.enter(&follower.id) else {
            return Err(close(
                &self.conn,
                ErrorCode::TooManyConnections,
                &format!(
                    "this follower has {} connections open already",
                    limits.max_connections_per_follower
                ),
            ));
        };
        let rate = ConnLimits::new(limits);
        metrics::counter!(crate::metrics::SESSIONS).increment(1);
        let _active = ActiveSession::new();

        // Feed stream and writer.
        match timeout(limits.hello_timeout(), self.conn.feed_opened()).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(close(
                    &self.conn,
                    ErrorCode::Internal,
                    "could not open the feed stream in time",
                ))
            }
        }
        // Live datagrams when the follower asked, the operator allows them
        // and the connection negotiated them (protocol §8.5).
        let live_datagrams =
            live_datagrams && limits.live_datagrams && self.conn.max_datagram_size().is_some();
        let outbox = Arc::new(Outbox::with_control_bound(
            limits.session_queue_bytes,
            limits.max_follows_per_connection + MAX_PENDING_CONTROL,
        ));
        let mut writer = FeedWriter::new(
            feed_stream::QuicFeed(self.conn.feed()),
            outbox.clone(),
            FeedDeps {
                log: self.ctx.log.clone(),
                slots: Arc::new(PromoCatchup {
                    promo: self.ctx.promo.clone(),
                    hub: self.ctx.hub.clone(),
                }),
                follower: follower.id.clone(),
                receipts,
                live_datagrams,
                catchup_batch: limits.catchup_batch,
                lag_policy: LagPolicy {
                    max_events: limits.max_lag_events,
                    window: limits.lag_window(),
                },
                catchups: self.ctx.catchups.clone(),
            },
        );
        // The live path: while the writer is idle, the transport's loop
        // drains live posts itself, woken by the fan-out.
        self.conn
            .set_feed_source(Arc::new(feed_stream::LivePull::new(&writer.live())));
        let waker = self.conn.feed_waker();
        outbox.set_live_waker(Box::new(move || waker.wake()));
        let mut writer = AbortOnDropHandle::new(tokio::spawn(writer.run()));
        let mut subs = Subscriptions {
            hub: self.ctx.hub.clone(),
            session: self.id,
            outbox,
            channels: HashSet::new(),
        };

        let welcome = pb::ServerFrame {
            request_id: hello_id,
            kind: Some(pb::server_frame::Kind::Welcome(pb::Welcome {
                session_id: self.id,
                max_frame_bytes: limits.max_frame_bytes as u32,
                max_follows: limits.max_follows_per_connection as u32,
                queue_bytes: limits.session_queue_bytes as u32,
                live_datagrams,
            })),
        };
        self.conn
            .send_control(encode_frame(&welcome))
            .await
            .map_err(control_closed)?;

        loop {
            let expiry = token_deadline(&follower);
            tokio::select! {
                frame = reader.read_frame::<pb::ClientFrame>() => {
                    let frame = match frame {
                        Ok(Some(f)) => f,
                        Ok(None) => {
                            // The follower finished its control stream: it is leaving.
                            self.conn.close(VarInt::from_u32(0), b"bye");
                            return Ok(FeedStats::default());
                        }
                        Err(FrameError::Io(e)) => {
                            // The control stream is gone (reset, or the
                            // connection is lost). Without it the session
                            // cannot be managed (no Refresh, no expiry
                            // check), so it ends here, whatever the
                            // connection does.
                            self.conn.close(VarInt::from_u32(0), b"control stream closed");
                            return Err(SessionError::Write(e));
                        }
                        Err(e) => return Err(close(&self.conn, frame_error_code(&e), &e.to_string())),
                    };
                    let (request_id, req) = match <(u64, ClientRequest)>::try_from(frame) {
                        Ok(r) => r,
                        Err(e) => return Err(close(&self.conn, ErrorCode::MalformedFrame, &e.to_string())),
                    };
                    let mut verdict = rate.control_frame();
                    if verdict == Verdict::Allow && matches!(req, ClientRequest::Follow(_)) {
                        verdict = rate.follow();
                    }
                    let reply = match verdict {
                        Verdict::Allow => self.handle(request_id, req, &mut subs, &mut follower).await?,
                        Verdict::Refuse(wait) => error_frame(
                            request_id,
                            ErrorCode::RateLimited,
                            format!("too many requests; retry in {} ms", wait.as_millis().max(1)),
                            req.channel().map_or("", |c| c.as_str()),
                        ),
                        Verdict::Close => {
                            return Err(close(&self.conn, ErrorCode::RateLimited, "too many requests over the limit"))
                        }
                    };
                    // A follower that does not read its replies holds this
                    // write; it may do so until its token expires, no longer.
                    match tokio::time::timeout_at(expiry, self.conn.send_control(encode_frame(&reply))).await {
                        Ok(r) => r.map_err(control_closed)?,
                        Err(_) => {
                            return Err(close(&self.conn, ErrorCode::TokenExpired, "token expired; send Refresh before it does"))
                        }
                    }
                }
                res = &mut writer => {
                    return match res {
                        Ok(Ok(stats)) => Ok(stats),
                        Ok(Err(FeedError::LaggingTooOften { count, window })) => Err(close(
                            &self.conn,
                            ErrorCode::LaggingTooOften,
                            &format!("lagged {count} times within {}s", window.as_secs()),
                        )),
                        Ok(Err(FeedError::Write(e))) => {
                            // The feed stream was stopped (or the connection
                            // lost): a session without its feed ends.
                            self.conn.close(VarInt::from_u32(0), b"feed stream closed");
                            Err(SessionError::Write(e))
                        }
                        Ok(Err(FeedError::Log(crate::store::StoreError::Unavailable(why)))) => Err(close(
                            &self.conn,
                            ErrorCode::StorageUnavailable,
                            &format!("the log cannot be read right now ({why}); reconnect and resume shortly"),
                        )),
                        Ok(Err(e)) => Err(close(&self.conn, ErrorCode::Internal, &e.to_string())),
                        Err(e) => Err(close(&self.conn, ErrorCode::Internal, &format!("feed writer failed: {e}"))),
                    };
                }
                _ = sleep_until(expiry) => {
                    return Err(close(&self.conn, ErrorCode::TokenExpired, "token expired; send Refresh before it does"));
                }
            }
        }
    }

    /// Answers one control request.
    async fn handle(
        &self,
        request_id: u64,
        req: ClientRequest,
        subs: &mut Subscriptions,
        follower: &mut Follower,
    ) -> Result<pb::ServerFrame, SessionError> {
        use pb::server_frame::Kind;
        let reply = |kind| pb::ServerFrame {
            request_id,
            kind: Some(kind),
        };
        Ok(match req {
            ClientRequest::Hello { .. } => error_frame(
                request_id,
                ErrorCode::HelloRequired,
                "Hello was already received".into(),
                "",
            ),
            ClientRequest::Follow(f) => match self.follow(f, subs, follower).await {
                Ok(followed) => reply(Kind::Followed(followed)),
                Err((code, msg, ch)) => error_frame(request_id, code, msg, &ch),
            },
            ClientRequest::Unfollow(ch) => {
                if subs.channels.remove(&ch) {
                    self.ctx.hub.unfollow_async(&ch, self.id).await;
                    // If the queue of control items is full the cursor stays,
                    // but no event of this channel is queued any more.
                    let _ = subs.outbox.push_control(Item::Unfollow(ch.clone()));
                }
                reply(Kind::Unfollowed(pb::Unfollowed {
                    channel: ch.to_string(),
                }))
            }
            ClientRequest::Refresh { token } => match self.ctx.verifier.verify(&token) {
                Ok(f) if f.id == follower.id => {
                    // A narrower token must not keep channels it no longer allows.
                    match subs.channels.iter().find(|c| !f.may_follow(c.as_str())) {
                        Some(c) => error_frame(
                            request_id,
                            ErrorCode::Forbidden,
                            format!("the new token does not allow channel {c:?}, which this session follows; unfollow it first"),
                            c.as_str(),
                        ),
                        None => {
                            *follower = f;
                            reply(Kind::Refreshed(pb::Refreshed {
                                expires_at: follower.expires_at,
                            }))
                        }
                    }
                }
                Ok(_) => {
                    return Err(close(
                        &self.conn,
                        ErrorCode::Forbidden,
                        "a refreshed token must name the same follower",
                    ))
                }
                Err(e) => error_frame(request_id, e.code(), e.to_string(), ""),
            },
            ClientRequest::Click { campaign_id, .. } => {
                match self.ctx.promo.click(&follower.id, &campaign_id) {
                    Ok(counted) => reply(Kind::Clicked(pb::Clicked {
                        campaign_id,
                        counted,
                    })),
                    Err(e) => error_frame(request_id, ErrorCode::NotFound, e.to_string(), ""),
                }
            }
            ClientRequest::Resend { channel, from, to } => {
                // Nothing to resend of a channel not followed (its posts
                // were never sent on this session).
                if subs.channels.contains(&channel) {
                    metrics::counter!(crate::metrics::RESENDS).increment(1);
                    let item = Item::Resend {
                        channel: channel.clone(),
                        from,
                        to,
                    };
                    match subs.outbox.push_control(item) {
                        Ok(()) => {}
                        Err(ControlRefused::Full) => {
                            return Ok(error_frame(
                                request_id,
                                ErrorCode::RateLimited,
                                "too many requests pending; retry later".into(),
                                channel.as_str(),
                            ))
                        }
                        Err(ControlRefused::Closed) => {
                            return Ok(error_frame(
                                request_id,
                                ErrorCode::ShuttingDown,
                                "session is closing".into(),
                                channel.as_str(),
                            ))
                        }
                    }
                }
                reply(Kind::Resent(pb::Resent {
                    channel: channel.to_string(),
                }))
            }
            ClientRequest::Seen { receipts } => {
                let counted = self.ctx.promo.settle(&follower.id, &receipts);
                // Answered once the counts are durable: the client forgets
                // the receipts when it reads the answer.
                if counted > 0 {
                    if let Err(e) = self.ctx.promo.durable().await {
                        return Ok(error_frame(
                            request_id,
                            ErrorCode::StorageUnavailable,
                            format!("{e}; send these receipts again later"),
                            "",
                        ));
                    }
                }
                reply(Kind::SeenNoted(pb::SeenNoted {
                    counted: counted as u32,
                }))
            }
        })
    }

    async fn follow(
        &self,
        f: FollowRequest,
        subs: &mut Subscriptions,
        follower: &Follower,
    ) -> Result<pb::Followed, (ErrorCode, String, String)> {
        let ch = f.channel.to_string();
        if !follower.may_follow(&ch) {
            return Err((
                ErrorCode::Forbidden,
                format!("this token may not follow {ch:?}"),
                ch,
            ));
        }
        let Some(info) = self.ctx.log.channel(&f.channel) else {
            return Err((ErrorCode::UnknownChannel, format!("no channel {ch:?}"), ch));
        };
        if !subs.channels.contains(&f.channel)
            && subs.channels.len() >= self.ctx.limits.max_follows_per_connection
        {
            return Err((
                ErrorCode::TooManyFollows,
                format!(
                    "a connection may follow at most {} channels",
                    self.ctx.limits.max_follows_per_connection
                ),
                ch,
            ));
        }
        // A live follow starts at the head read here (less the tail asked
        // for), so the position the follower is told is exactly where its feed
        // starts; anything committed meanwhile is caught up by the writer.
        let start = f.after_seq.unwrap_or_else(|| {
            info.head_seq
                .saturating_sub(u64::from(f.tail))
                .max(info.oldest_seq.saturating_sub(1))
        });
        let resolved = FollowRequest {
            after_seq: Some(start),
            epoch: f.epoch,
            ..f
        };
        let channel = resolved.channel.clone();
        match self
            .ctx
            .hub
            .follow_async(&channel, self.id, &subs.outbox, Item::Follow(resolved))
            .await
        {
            Ok(_) => {
                metrics::counter!(crate::metrics::FOLLOWS).increment(1);
                subs.channels.insert(channel);
            }
            Err(ControlRefused::Full) => {
                return Err((
                    ErrorCode::RateLimited,
                    "too many follow requests pending; retry later".into(),
                    ch,
                ))
            }
            Err(ControlRefused::Closed) => {
                return Err((ErrorCode::ShuttingDown, "session is closing".into(), ch))
            }
        }
        Ok(pb::Followed {
            channel: ch,
            head_seq: info.head_seq,
            epoch: info.epoch,
        })
    }
}

/// A control reply could not be queued: the connection is gone.
fn control_closed(_: crate::transport::Closed) -> SessionError {
    SessionError::Write(std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "control stream closed",
    ))
}

/// When the follower's token runs out.
fn token_deadline(f: &Follower) -> Instant {
    let left = f.expires_at - crate::model::now_ms() / 1000;
    Instant::now() + Duration::from_secs(left.clamp(0, 10 * 365 * 24 * 3600) as u64)
}
