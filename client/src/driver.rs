//! The client's background task: runs one connection at a time, turns frames
//! into [`Event`]s, and on a retryable disconnect reconnects and re-follows
//! every channel from the last seq it delivered.
//!
//! Promoted posts carry a receipt; the driver confirms what it handed to the
//! application with Seen (one in flight at a time, a few at once), and keeps
//! every receipt until the server answered, sending it again on the next
//! connection if the answer did not come: so the server counts each
//! promoted post this follower got exactly once, even across its crash.
//!
//! Feed frames and live datagrams go through each channel's ordering
//! ([`crate::ordering`], glued in [`delivery`]): posts are delivered once,
//! in seq order, whichever path brought them, and what is missing is asked
//! for with `Resend`.
//!
//! With a [`super::TokenRefresher`], it also keeps the token fresh: at about
//! 80 % of the token's remaining lifetime (read from its `exp`, unverified)
//! it asks the application for a new one and sends it in band (Refresh);
//! reconnects use the newest token, and a session closed for an expired
//! token is reconnected with a fresh one.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{mpsc, oneshot};

use super::conn::{ClientError, Conn};
use super::{
    ClientOptions, ClientStats, Command, Event, FollowFrom, Followed, RefreshError, RefreshFuture,
};
use crate::ordering::Release;
use delivery::{Change, ChannelState, Retries};
use herald_proto::frame::{encode_frame, FrameReader};
use herald_proto::model::{ChannelId, Post};
use herald_proto::v1 as pb;
use herald_proto::ErrorCode;

mod delivery;

enum Pending {
    Follow {
        channel: String,
        reply: Option<oneshot::Sender<Result<Followed, ClientError>>>,
    },
    Unfollow(oneshot::Sender<Result<(), ClientError>>),
    Click(oneshot::Sender<Result<bool, ClientError>>),
    Refresh,
    /// The first this many receipts of `Driver::receipts`.
    Seen(usize),
    /// A Resend for this channel.
    Resend(String),
}

/// Share of a token's remaining lifetime after which it is refreshed.
pub const REFRESH_AT: f64 = 0.8;
/// Longest wait, on close, for the CONNECTION_CLOSE to leave.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);
/// Pause before asking the refresher again after it failed.
const REFRESH_RETRY: Duration = Duration::from_secs(1);
/// How long a receipt waits for others to share its Seen.
const SEEN_DELAY: Duration = Duration::from_millis(20);
/// Pause before sending receipts again after the server could not take them.
const SEEN_RETRY: Duration = Duration::from_secs(1);

/// When to refresh `token`: at [`REFRESH_AT`] of its remaining lifetime.
fn refresh_deadline(token: &str) -> Option<tokio::time::Instant> {
    let exp = crate::token_expiry::unverified_expiry(token)?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let left_ms = (exp * 1000 - now_ms).max(0) as f64;
    Some(tokio::time::Instant::now() + Duration::from_millis((left_ms * REFRESH_AT) as u64))
}

async fn wait_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

async fn run_refresh(f: &mut Option<RefreshFuture>) -> Result<String, RefreshError> {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Why a connection ended.
enum End {
    /// The application closed the client (or dropped it).
    Closed,
    /// The connection failed.
    Failed(ClientError),
}

pub(crate) struct Driver {
    opts: ClientOptions,
    endpoint: quinn::Endpoint,
    /// Whether the endpoint is this client's alone (then it is drained on close).
    owns_endpoint: bool,
    cmds: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
    stats: Arc<ClientStats>,
    channels: HashMap<String, ChannelState>,
    next_request: u64,
    /// Held from `Client::close` until the close has been sent.
    closing: Option<oneshot::Sender<()>>,
    /// Receipts of promoted posts handed to the application, oldest first,
    /// not acknowledged by the server yet (at most
    /// [`super::MAX_UNCONFIRMED_RECEIPTS`]).
    receipts: VecDeque<u64>,
    /// When to send the next Seen (`None`: nothing to send).
    seen_due: Option<tokio::time::Instant>,
    /// Whether the current connection has live datagrams.
    live_datagrams: bool,
    /// What the orderings released and the application has not been given
    /// yet (emptied after each frame).
    released: Vec<Release<Post, Change>>,
    /// Channels whose ordering may have a Resend to ask (emptied after each
    /// frame, timer or answer).
    touched: Vec<String>,
}

impl Driver {
    pub fn new(
        opts: ClientOptions,
        endpoint: quinn::Endpoint,
        owns_endpoint: bool,
        cmds: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
        stats: Arc<ClientStats>,
    ) -> Driver {
        Driver {
            opts,
            endpoint,
            owns_endpoint,
            cmds,
            events,
            stats,
            channels: HashMap::new(),
            next_request: super::conn::HELLO_REQUEST_ID + 1,
            closing: None,
            receipts: VecDeque::new(),
            seen_due: None,
            live_datagrams: false,
            released: Vec::new(),
            touched: Vec::new(),
        }
    }

    pub async fn run(mut self, first: Conn) {
        let mut conn = first;
        loop {
            let end = self.serve(&mut conn).await;
            let err = match end {
                End::Closed => {
                    conn.conn.close(0u32.into(), b"bye");
                    // Let the CONNECTION_CLOSE leave before the process may
                    // exit, so the server forgets this follower at once.
                    if self.owns_endpoint {
                        let _ = tokio::time::timeout(CLOSE_FLUSH, self.endpoint.wait_idle()).await;
                    }
                    // Dropping `closing` tells `Client::close` it is done.
                    self.closing = None;
                    return;
                }
                End::Failed(e) => e,
            };
            let expired = matches!(
                err,
                ClientError::Refused {
                    code: Some(ErrorCode::TokenExpired),
                    ..
                }
            );
            let refreshable = expired && self.opts.token_refresher.is_some();
            if !self.opts.reconnect || !(err.is_retryable() || refreshable) {
                let code = match &err {
                    ClientError::Refused { code, .. } => *code,
                    _ => None,
                };
                let _ = self
                    .events
                    .send(Event::Closed {
                        code,
                        reason: err.to_string(),
                    })
                    .await;
                return;
            }
            let _ = self
                .events
                .send(Event::Disconnected {
                    reason: err.to_string(),
                })
                .await;
            conn = match self.reconnect().await {
                Some(c) => c,
                None => return,
            };
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            let _ = self.events.send(Event::Reconnected).await;
        }
    }

    /// Reconnects with exponential backoff; `None` if the application closed
    /// meanwhile or the server refuses for good.
    async fn reconnect(&mut self) -> Option<Conn> {
        // Exponential, with jitter, so the followers of a restarted server
        // do not all come back in the same instant.
        let mut pauses = ExponentialBuilder::default()
            .with_min_delay(self.opts.backoff_min)
            .with_max_delay(self.opts.backoff_max)
            .with_jitter()
            .without_max_times()
            .build();
        loop {
            let pause = pauses.next().unwrap_or(self.opts.backoff_max);
            let sleep = tokio::time::sleep(pause);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    cmd = self.cmds.recv() => match cmd {
                        None | Some(Command::Close { .. }) => return None,
                        Some(other) => other.fail(ClientError::Disconnected),
                    },
                }
            }
            self.refresh_if_due().await;
            // The next server of the list (the same one when there is one):
            // the one just lost may be gone for good.
            let n = self.opts.servers.len().max(1) as u64;
            let index = (self.stats.server_index.load(Ordering::Relaxed) + 1) % n;
            self.stats.server_index.store(index, Ordering::Relaxed);
            let addr = self.opts.servers.get(index as usize).copied()?;
            match Conn::open(&self.endpoint, &self.opts, addr).await {
                Ok(c) => return Some(c),
                Err(e) if e.is_retryable() => {
                    tracing::debug!(error = %e, "reconnect failed; retrying");
                }
                Err(e) => {
                    let code = match &e {
                        ClientError::Refused { code, .. } => *code,
                        _ => None,
                    };
                    let _ = self
                        .events
                        .send(Event::Closed {
                            code,
                            reason: e.to_string(),
                        })
                        .await;
                    return None;
                }
            }
        }
    }

    /// Before reconnecting: gets a new token if the current one is due.
    async fn refresh_if_due(&mut self) {
        let Some(refresher) = self.opts.token_refresher.clone() else {
            return;
        };
        let due =
            refresh_deadline(&self.opts.token).is_none_or(|at| at <= tokio::time::Instant::now());
        if !due {
            return;
        }
        match refresher().await {
            Ok(t) => self.opts.token = t,
            Err(e) => tracing::warn!(error = %e, "token refresh failed before reconnecting"),
        }
    }

    fn follow_frame(&mut self, channel: &str, from: FollowFrom) -> (u64, pb::ClientFrame) {
        let id = self.next_request;
        self.next_request += 1;
        (
            id,
            pb::ClientFrame {
                request_id: id,
                kind: Some(pb::client_frame::Kind::Follow(pb::Follow {
                    channel: channel.to_string(),
                    after_seq: from.after_seq,
                    epoch: from.epoch,
                    tail: from.tail,
                })),
            },
        )
    }

    /// Serves one connection until it ends.
    async fn serve(&mut self, c: &mut Conn) -> End {
        let mut pending: HashMap<u64, Pending> = HashMap::new();
        // Resends answered, waiting to be asked again if still needed.
        let mut retries = Retries::default();
        self.live_datagrams = c.live_datagrams;
        self.touched.clear();
        for st in self.channels.values_mut() {
            st.order
                .new_connection(c.live_datagrams, &mut self.released);
        }
        if self.emit_released().await.is_err() {
            return End::Closed;
        }
        // Re-follow what we followed before, from where we are.
        let resume: Vec<(String, FollowFrom)> = self
            .channels
            .iter()
            .map(|(k, st)| {
                let last = st.order.last_seq();
                let from = FollowFrom {
                    after_seq: last,
                    epoch: st.order.epoch(),
                    tail: if last.is_some() { 0 } else { st.tail },
                };
                (k.clone(), from)
            })
            .collect();
        for (channel, from) in resume {
            let (id, frame) = self.follow_frame(&channel, from);
            if let Err(e) = c.ctl_send.write_all(&encode_frame(&frame)).await {
                return End::Failed(write_error(&c.conn, e));
            }
            pending.insert(
                id,
                Pending::Follow {
                    channel,
                    reply: None,
                },
            );
        }
        // Receipts the last connection did not get answered go again.
        self.seen_due = (!self.receipts.is_empty()).then(tokio::time::Instant::now);
        let mut feed: Option<FrameReader<quinn::RecvStream>> = None;
        let mut refresh_at = self
            .opts
            .token_refresher
            .as_ref()
            .and_then(|_| refresh_deadline(&self.opts.token));
        let mut refreshing: Option<RefreshFuture> = None;
        loop {
            // Resends the last frame, answer or timer made due.
            while let Some(channel) = self.touched.pop() {
                if let Err(e) = self.ask_resend(c, &mut pending, &channel).await {
                    fail_pending(pending);
                    return End::Failed(e);
                }
            }
            let seen_in_flight = pending.values().any(|p| matches!(p, Pending::Seen(_)));
            tokio::select! {
                _ = wait_until(retries.next()), if retries.next().is_some() => {
                    retries.due(tokio::time::Instant::now(), &mut self.touched);
                }
                datagram = c.conn.read_datagram(), if self.live_datagrams => {
                    match datagram {
                        Ok(d) => {
                            if self.on_datagram(&d).await.is_err() {
                                return End::Closed;
                            }
                        }
                        Err(e) => {
                            fail_pending(pending);
                            return End::Failed(e.into());
                        }
                    }
                }
                _ = wait_until(self.seen_due), if !seen_in_flight && self.seen_due.is_some() => {
                    self.seen_due = None;
                    let n = self.receipts.len().min(herald_proto::model::MAX_RECEIPTS_PER_SEEN);
                    if n == 0 {
                        continue;
                    }
                    let id = self.next_request;
                    self.next_request += 1;
                    let frame = pb::ClientFrame {
                        request_id: id,
                        kind: Some(pb::client_frame::Kind::Seen(pb::Seen {
                            receipts: self.receipts.iter().take(n).copied().collect(),
                        })),
                    };
                    pending.insert(id, Pending::Seen(n));
                    if let Err(e) = c.ctl_send.write_all(&encode_frame(&frame)).await {
                        let err = write_error(&c.conn, e);
                        fail_pending(pending);
                        return End::Failed(err);
                    }
                }
                _ = wait_until(refresh_at), if refreshing.is_none() => {
                    refresh_at = None;
                    if let Some(r) = &self.opts.token_refresher {
                        refreshing = Some(r());
                    }
                }
                res = run_refresh(&mut refreshing), if refreshing.is_some() => {
                    refreshing = None;
                    match res {
                        Ok(token) => {
                            let id = self.next_request;
                            self.next_request += 1;
                            let frame = pb::ClientFrame {
                                request_id: id,
                                kind: Some(pb::client_frame::Kind::Refresh(pb::Refresh { token: token.clone() })),
                            };
                            refresh_at = refresh_deadline(&token);
                            self.opts.token = token;
                            pending.insert(id, Pending::Refresh);
                            if let Err(e) = c.ctl_send.write_all(&encode_frame(&frame)).await {
                                let err = write_error(&c.conn, e);
                                fail_pending(pending);
                                return End::Failed(err);
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "token refresh failed; retrying");
                            refresh_at = Some(tokio::time::Instant::now() + REFRESH_RETRY);
                        }
                    }
                }
                cmd = self.cmds.recv() => {
                    let frame = match cmd {
                        None => return End::Closed,
                        Some(Command::Close { done }) => {
                            self.closing = Some(done);
                            return End::Closed;
                        }
                        Some(Command::Follow { channel, from, reply }) => {
                            if ChannelId::parse(&channel).is_err() {
                                let _ = reply.send(Err(ClientError::Request {
                                    code: Some(ErrorCode::InvalidArgument),
                                    message: format!("invalid channel id {channel:?}"),
                                }));
                                continue;
                            }
                            let live_datagrams = self.live_datagrams;
                            let st = self
                                .channels
                                .entry(channel.clone())
                                .or_insert_with(|| ChannelState::new(live_datagrams, from.tail));
                            st.tail = from.tail;
                            if let Some(after) = from.after_seq {
                                st.order.resume_from(after, from.epoch, &mut self.released);
                            }
                            if self.emit_released().await.is_err() {
                                return End::Closed;
                            }
                            let (id, frame) = self.follow_frame(&channel, from);
                            pending.insert(id, Pending::Follow { channel, reply: Some(reply) });
                            frame
                        }
                        Some(Command::Click { campaign_id, channel, reply }) => {
                            let id = self.next_request;
                            self.next_request += 1;
                            pending.insert(id, Pending::Click(reply));
                            pb::ClientFrame {
                                request_id: id,
                                kind: Some(pb::client_frame::Kind::Click(pb::Click { campaign_id, channel })),
                            }
                        }
                        Some(Command::Unfollow { channel, reply }) => {
                            self.channels.remove(&channel);
                            let id = self.next_request;
                            self.next_request += 1;
                            pending.insert(id, Pending::Unfollow(reply));
                            pb::ClientFrame {
                                request_id: id,
                                kind: Some(pb::client_frame::Kind::Unfollow(pb::Unfollow { channel })),
                            }
                        }
                    };
                    if let Err(e) = c.ctl_send.write_all(&encode_frame(&frame)).await {
                        let err = write_error(&c.conn, e);
                        fail_pending(pending);
                        return End::Failed(err);
                    }
                }
                frame = c.ctl_recv.read_frame::<pb::ServerFrame>() => {
                    match frame {
                        Ok(Some(f)) => {
                            if matches!(pending.get(&f.request_id), Some(Pending::Resend(_))) {
                                if let Some(Pending::Resend(channel)) = pending.remove(&f.request_id) {
                                    if let Some(pb::server_frame::Kind::Error(e)) = &f.kind {
                                        tracing::debug!(%channel, error = %e.message, "resend refused");
                                    }
                                    self.on_resend_answer(channel, &mut retries);
                                }
                                continue;
                            }
                            if let Some(end) = self.on_control(f, &mut pending).await {
                                return end;
                            }
                        }
                        Ok(None) => {
                            fail_pending(pending);
                            return End::Failed(c.conn.closed().await.into());
                        }
                        Err(e) => {
                            fail_pending(pending);
                            let _ = tokio::time::timeout(Duration::from_secs(1), c.conn.closed()).await;
                            return End::Failed(ClientError::from_frame(&c.conn, e));
                        }
                    }
                }
                stream = c.conn.accept_uni(), if feed.is_none() => {
                    match stream {
                        Ok(s) => feed = Some(FrameReader::new(s, self.opts.max_feed_frame)),
                        Err(e) => {
                            fail_pending(pending);
                            return End::Failed(e.into());
                        }
                    }
                }
                frame = read_feed(&mut feed), if feed.is_some() => {
                    match frame {
                        Ok(Some(f)) => {
                            if self.on_feed(f).await.is_err() {
                                return End::Closed;
                            }
                        }
                        Ok(None) => {
                            fail_pending(pending);
                            return End::Failed(c.conn.closed().await.into());
                        }
                        Err(e) => {
                            fail_pending(pending);
                            let _ = tokio::time::timeout(Duration::from_secs(1), c.conn.closed()).await;
                            return End::Failed(ClientError::from_frame(&c.conn, e));
                        }
                    }
                }
            }
        }
    }

    async fn on_control(
        &mut self,
        f: pb::ServerFrame,
        pending: &mut HashMap<u64, Pending>,
    ) -> Option<End> {
        use pb::server_frame::Kind;
        let waiting = pending.remove(&f.request_id);
        match (f.kind, waiting) {
            (Some(Kind::Followed(fd)), Some(Pending::Follow { channel, reply })) => {
                if let Some(st) = self.channels.get_mut(&channel) {
                    // The position of a follow without one (§9); datagram
                    // posts may have waited for it.
                    st.order
                        .followed(fd.head_seq, fd.epoch, st.tail, &mut self.released);
                    self.touched.push(channel);
                }
                if let Some(r) = reply {
                    let _ = r.send(Ok(Followed {
                        head_seq: fd.head_seq,
                        epoch: fd.epoch,
                    }));
                }
                if self.emit_released().await.is_err() {
                    return Some(End::Closed);
                }
            }
            (Some(Kind::Unfollowed(_)), Some(Pending::Unfollow(reply))) => {
                let _ = reply.send(Ok(()));
            }
            (Some(Kind::Clicked(c)), Some(Pending::Click(reply))) => {
                let _ = reply.send(Ok(c.counted));
            }
            (Some(Kind::SeenNoted(_)), Some(Pending::Seen(n))) => {
                // Durable on the server: these receipts are done with.
                self.receipts.drain(..n.min(self.receipts.len()));
                self.stats
                    .receipts_unconfirmed
                    .store(self.receipts.len() as u64, Ordering::Relaxed);
                if !self.receipts.is_empty() {
                    self.seen_due = Some(tokio::time::Instant::now());
                }
            }
            (Some(Kind::Error(e)), waiting) => {
                let code = ErrorCode::from_u32(e.code);
                match waiting {
                    Some(Pending::Follow { channel, reply }) => {
                        // A re-follow after reconnect that failed for a
                        // passing reason keeps its position, and is tried
                        // again on the next connection; only a channel that
                        // is gone or forbidden is dropped.
                        let permanent = matches!(
                            code,
                            Some(ErrorCode::UnknownChannel)
                                | Some(ErrorCode::Forbidden)
                                | Some(ErrorCode::InvalidArgument)
                        );
                        if reply.is_some() || permanent {
                            self.channels.remove(&channel);
                        }
                        let err = ClientError::Request {
                            code,
                            message: e.message.clone(),
                        };
                        match reply {
                            Some(r) => {
                                let _ = r.send(Err(err));
                            }
                            None => {
                                if !self
                                    .emit(Event::Error {
                                        code,
                                        message: e.message,
                                        channel: e.channel,
                                    })
                                    .await
                                {
                                    return Some(End::Closed);
                                }
                            }
                        }
                    }
                    Some(Pending::Unfollow(reply)) => {
                        let _ = reply.send(Err(ClientError::Request {
                            code,
                            message: e.message,
                        }));
                    }
                    Some(Pending::Click(reply)) => {
                        let _ = reply.send(Err(ClientError::Request {
                            code,
                            message: e.message,
                        }));
                    }
                    Some(Pending::Seen(_)) => {
                        // Not taken now (e.g. storage unavailable): kept, and
                        // sent again a little later.
                        tracing::debug!(error = %e.message, "receipts not taken; will send them again");
                        self.seen_due = Some(tokio::time::Instant::now() + SEEN_RETRY);
                    }
                    // Answered in `serve` (never here).
                    Some(Pending::Resend(_)) => {}
                    Some(Pending::Refresh) | None => {
                        if !self
                            .emit(Event::Error {
                                code,
                                message: e.message,
                                channel: e.channel,
                            })
                            .await
                        {
                            return Some(End::Closed);
                        }
                    }
                }
            }
            (Some(Kind::Refreshed(_)), _) | (Some(Kind::Welcome(_)), _) => {}
            (_, Some(Pending::Follow { reply: Some(r), .. })) => {
                let _ = r.send(Err(ClientError::Protocol(
                    "unexpected answer to Follow".into(),
                )));
            }
            (_, Some(Pending::Unfollow(r))) => {
                let _ = r.send(Err(ClientError::Protocol(
                    "unexpected answer to Unfollow".into(),
                )));
            }
            _ => {}
        }
        None
    }

    /// Keeps `receipt` until the server acknowledges it, and schedules a Seen.
    fn note_receipt(&mut self, receipt: u64) {
        if self.receipts.len() >= super::MAX_UNCONFIRMED_RECEIPTS {
            self.receipts.pop_front();
            self.stats.receipts_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("too many promoted posts unconfirmed; the oldest receipt is dropped");
        }
        self.receipts.push_back(receipt);
        self.stats
            .receipts_unconfirmed
            .store(self.receipts.len() as u64, Ordering::Relaxed);
        if self.seen_due.is_none() {
            self.seen_due = Some(tokio::time::Instant::now() + SEEN_DELAY);
        }
    }

    async fn emit(&self, e: Event) -> bool {
        self.events.send(e).await.is_ok()
    }
}

async fn read_feed(
    feed: &mut Option<FrameReader<quinn::RecvStream>>,
) -> Result<Option<pb::FeedFrame>, herald_proto::FrameError> {
    match feed {
        Some(r) => r.read_frame().await,
        None => std::future::pending().await,
    }
}

fn write_error(conn: &quinn::Connection, e: quinn::WriteError) -> ClientError {
    match conn.close_reason() {
        Some(r) => r.into(),
        None => ClientError::Connect(e.to_string()),
    }
}

fn fail_pending(pending: HashMap<u64, Pending>) {
    for (_, p) in pending {
        match p {
            Pending::Follow { reply: Some(r), .. } => {
                let _ = r.send(Err(ClientError::Disconnected));
            }
            Pending::Unfollow(r) => {
                let _ = r.send(Err(ClientError::Disconnected));
            }
            Pending::Click(r) => {
                let _ = r.send(Err(ClientError::Disconnected));
            }
            _ => {}
        }
    }
}
