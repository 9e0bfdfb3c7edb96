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
use herald_proto::frame::{encode_frame, FrameReader};
use herald_proto::model::{ChannelId, Media, Post};
use herald_proto::v1 as pb;
use herald_proto::ErrorCode;

/// What the client knows of one followed channel.
#[derive(Debug, Clone, Copy, Default)]
struct ChannelState {
    /// Seq of the last post delivered to the application.
    last_seq: Option<u64>,
    epoch: Option<u64>,
    tail: u32,
}

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
        // Re-follow what we followed before, from where we are.
        let resume: Vec<(String, ChannelState)> =
            self.channels.iter().map(|(k, v)| (k.clone(), *v)).collect();
        for (channel, st) in resume {
            let from = FollowFrom {
                after_seq: st.last_seq,
                epoch: st.epoch,
                tail: if st.last_seq.is_some() { 0 } else { st.tail },
            };
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
            let seen_in_flight = pending.values().any(|p| matches!(p, Pending::Seen(_)));
            tokio::select! {
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
                            let st = self.channels.entry(channel.clone()).or_default();
                            st.tail = from.tail;
                            if from.after_seq.is_some() {
                                st.last_seq = from.after_seq;
                                st.epoch = from.epoch;
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
                            if !self.on_feed(f).await {
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
                    if st.last_seq.is_none() {
                        st.last_seq = Some(fd.head_seq.saturating_sub(u64::from(st.tail)));
                    }
                    st.epoch = Some(fd.epoch);
                }
                if let Some(r) = reply {
                    let _ = r.send(Ok(Followed {
                        head_seq: fd.head_seq,
                        epoch: fd.epoch,
                    }));
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

    /// Handles one feed frame; `false` if the application went away.
    async fn on_feed(&mut self, f: pb::FeedFrame) -> bool {
        use pb::feed_frame::Kind;
        let event = match f.kind {
            Some(Kind::Post(p)) => {
                let Some(st) = self.channels.get_mut(&p.channel) else {
                    return true;
                };
                if let Some(last) = st.last_seq {
                    if p.seq <= last {
                        self.stats
                            .duplicates_dropped
                            .fetch_add(1, Ordering::Relaxed);
                        return true;
                    }
                    if p.seq > last + 1 {
                        self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(channel = %p.channel, last, got = p.seq, "gap in feed");
                    }
                }
                st.last_seq = Some(p.seq);
                st.epoch = Some(p.epoch);
                let Ok(channel) = ChannelId::parse(&p.channel) else {
                    return true;
                };
                self.stats.posts.fetch_add(1, Ordering::Relaxed);
                Event::Post(Post {
                    channel,
                    seq: p.seq,
                    epoch: p.epoch,
                    id: p.id,
                    text: p.text,
                    media: p
                        .media
                        .into_iter()
                        .map(|m| Media {
                            url: m.url,
                            mime: m.mime,
                        })
                        .collect(),
                    created_at_ms: p.created_at_ms,
                    edited_at_ms: p.edited_at_ms,
                    deleted: p.deleted,
                    damaged: p.damaged,
                })
            }
            Some(Kind::Edited(e)) => {
                if !self.channels.contains_key(&e.channel) {
                    return true;
                }
                Event::Edited {
                    channel: e.channel,
                    seq: e.seq,
                    epoch: e.epoch,
                    text: e.text,
                    edited_at_ms: e.edited_at_ms,
                }
            }
            Some(Kind::Deleted(d)) => {
                if !self.channels.contains_key(&d.channel) {
                    return true;
                }
                Event::Deleted {
                    channel: d.channel,
                    seq: d.seq,
                    epoch: d.epoch,
                }
            }
            Some(Kind::Reset(r)) => {
                let Some(st) = self.channels.get_mut(&r.channel) else {
                    return true;
                };
                st.last_seq = Some(r.oldest_seq.saturating_sub(1));
                st.epoch = Some(r.epoch);
                Event::Reset {
                    channel: r.channel,
                    epoch: r.epoch,
                    oldest_seq: r.oldest_seq,
                }
            }
            Some(Kind::Promoted(p)) => {
                if !self.channels.contains_key(&p.channel) {
                    return true;
                }
                self.stats.promoted.fetch_add(1, Ordering::Relaxed);
                if p.receipt != 0 {
                    self.note_receipt(p.receipt);
                }
                Event::Promoted {
                    channel: p.channel,
                    campaign_id: p.campaign_id,
                    label: p.label,
                    title: p.title,
                    text: p.text,
                    media: p.media.map(|m| Media {
                        url: m.url,
                        mime: m.mime,
                    }),
                    cta_url: p.cta_url,
                    after_seq: p.after_seq,
                }
            }
            // Only sent to clients with live datagrams, which this one is not yet.
            Some(Kind::Head(_)) | None => return true,
        };
        self.emit(event).await
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
