//! The channel log on NATS JetStream: [`JetStreamLog`] implements
//! [`ChannelLog`] with the same promises as the embedded `RedbLog`, for a
//! cluster of stateless Herald nodes.
//!
//! # Layout
//! One stream (`HERALD_POSTS`, R3 in production, file storage, direct gets on)
//! holds every channel: `herald.posts.<channel>` has the channel's posts in seq
//! order, `herald.edits.<channel>.<seq>` the changes to post `<seq>` (see
//! [`codec`]). Channel records (title, epoch, creation time, trim floor) live in
//! the KV bucket `herald_channels`, mirrored in memory on every node
//! ([`crate::cluster::kvcache`]).
//!
//! # What `seq` is, and why it stays gapless
//! JetStream's stream sequence is global (all channels share it), so it cannot
//! be the channel seq. Each post carries its channel seq in the `Herald-Seq`
//! header, and is published with
//! `Nats-Expected-Last-Subject-Sequence: <stream seq of the channel's current
//! last post>` and `Herald-Seq: <that post's Herald-Seq + 1>`. The stream
//! leader checks the expectation atomically with storing the message (and, in
//! a cluster, refuses a second publish to a subject while one is still being
//! replicated), so of two appends computed from the same head exactly one is
//! stored; the loser gets "wrong last sequence", reads the new head from the
//! leader and retries. By induction every message on `herald.posts.<ch>`
//! carries the previous one's seq + 1, starting at 1: no gap, no duplicate. Only
//! posts go to that subject (edits have their own), and the last message of the
//! subject is never removed (see trimming), so the head is always readable.
//!
//! Appends to one channel from one node go through a per-channel task
//! ([`WRITE_QUEUE`]-bounded) that keeps the head it learned from its own acks,
//! so a node's appends do not race each other; appends from different nodes
//! race, and the loser retries (no lock, no leader of our own).
//!
//! # Durability and idempotency
//! An append resolves after the stream's ack, i.e. once a quorum of replicas
//! stored it. Every append carries a `Nats-Msg-Id`: with an `Idempotency-Key`,
//! a digest of (channel, key); without one, a random id for this call. The
//! stream's de-duplication window ([`crate::cluster::nats::ClusterConfig::duplicate_window`],
//! 24 h by default like `IDEMPOTENCY_TTL_MS`) then makes a retried publish
//! (after a timeout or a failover, when it is unknown whether the first try was
//! stored) answer with the first message, and the same key within the window
//! answer with the first post from any node. The server checks the msg id
//! before the expected sequence, so a retry never turns into a second post.
//!
//! # Fan-out: the [`EventSink`] on every node
//! Each node runs one ordered consumer over the whole stream (not one per
//! channel), starting after the stream's last sequence at open. It updates the
//! node's head and seq index and only then hands the events to the sink, in
//! stream order (so in per-channel order), each once (the task drops anything
//! at or below the last stream sequence it handled, also across consumer
//! re-creation). The node that appended waits until its own consumer has
//! handled the post before answering the writer (bounded by
//! [`APPLY_WAIT`]), so "the sink saw it before the writer was answered" and
//! read-your-writes hold on that node as with the embedded log. Cross-node
//! traffic is one copy of each post per node, whatever the followers.
//!
//! # Reads
//! `read` finds the stream sequence of the first post wanted through the node's
//! [`index::SeqIndex`] (or a binary search over the stream with leader reads),
//! then fetches posts in batches with direct gets (any replica). A replica
//! may trail the leader, so results are checked against what this node already
//! knows (its head, and the last stream sequence its consumer handled) and
//! completed from the leader when short. Current state: for the posts read,
//! one multi-last direct get fetches the last change of each
//! (`herald.edits.<ch>.<seq>`), checked the same way.
//!
//! Edits and deletes are messages on `herald.edits.<ch>.<seq>` holding the full
//! new state, published with the expected last sequence of that subject (so
//! concurrent edits of one post serialize and a deleted post stays deleted).
//! Why a subject per post rather than events in the channel's subject: reading
//! the current state of a range of posts is then one multi-last request, and
//! edits do not contend with appends.
//!
//! # Trimming
//! `trim` computes the first seq to keep (by age: the stream's store time; by
//! count: head - keep_max + 1), raises the channel's `floor` in KV (compare and
//! set; readers hide posts below it at once, on every node), then purges the
//! channel's posts (and their edits) below it, except the channel's last post,
//! which stays physically (hidden by the floor) so the next append still finds
//! its head. `oldest_seq` is the floor. The stream has no `max_age`: age-based
//! removal by the server could remove a quiet channel's last post and restart
//! its seqs at 1.

mod codec;
mod index;

use std::sync::Arc;
use std::time::Duration;

use async_nats::header::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use bytes::Bytes;
use dashmap::DashMap;
use futures_util::{FutureExt, StreamExt};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, watch};

use crate::cluster::kvcache::{self, KvCache};
use crate::cluster::nats::{Nats, NatsError, PubOutcome, StoredMsg};
use crate::model::{now_ms, ChannelId, ChannelInfo, NewPost, Post};
use crate::store::{
    ChannelLog, EventSink, LogEvent, LogFuture, StoreError, TrimPolicy, TrimReport,
};
use codec::{Op, StoredPost, Subjects, H_EXPECT_LAST_SUBJ_SEQ, H_MSG_ID, H_OP, H_SEQ};
use index::SeqIndex;

/// Bound of each channel's append queue on a node.
pub const WRITE_QUEUE: usize = 1024;
/// How long an append waits for the node's own consumer to hand the post to
/// the sink before answering anyway (the post is durable either way).
pub const APPLY_WAIT: Duration = Duration::from_secs(10);
/// Most messages fetched by one direct get.
pub const READ_BATCH: usize = 256;
/// Most events handed to the sink at once.
pub const SINK_BATCH: usize = 256;
/// Pull expiry of the fan-out consumer (its idle heartbeat is half of it).
pub const FANOUT_PULL_EXPIRY: Duration = Duration::from_secs(2);
/// A channel's append task exits after this long without work.
const APPENDER_IDLE: Duration = Duration::from_secs(30);
/// Farther than this from a known (seq, stream seq) pair, a read binary-searches.
const SCAN_LIMIT: u64 = 256;
/// Most conflicts (someone else appended first) one append absorbs.
const MAX_CONFLICTS: u32 = 10_000;

fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(e.to_string())
}

/// A channel's record in the `herald_channels` bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelRecord {
    /// The channel's title.
    pub title: String,
    /// Its epoch (1: history is never reset in this backend).
    pub epoch: u64,
    /// When it was created, Unix ms.
    pub created_at_ms: i64,
    /// Seq of the oldest post not trimmed (1 until the first trim).
    pub floor: u64,
}

/// A channel's last post as known on this node: its seq and stream seq.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Head {
    seq: u64,
    sseq: u64,
}

struct AppendOp {
    post: NewPost,
    key: Option<String>,
    reply: oneshot::Sender<Result<Post, StoreError>>,
}

struct Inner {
    nats: Nats,
    stream: String,
    subjects: Subjects,
    channels: Arc<KvCache<ChannelRecord>>,
    heads: DashMap<ChannelId, Head>,
    index: SeqIndex,
    /// Last stream sequence the fan-out consumer handled.
    applied: watch::Sender<u64>,
    appenders: DashMap<ChannelId, (u64, mpsc::Sender<AppendOp>)>,
    next_appender: std::sync::atomic::AtomicU64,
    /// Set by [`ChannelLog::close`]: every later call fails with `Closed`.
    closed: std::sync::atomic::AtomicBool,
    /// The append tasks, so `close` can wait for queued appends.
    tasks: tokio_util::task::TaskTracker,
}

/// The JetStream-backed [`ChannelLog`]. See the module docs.
pub struct JetStreamLog {
    inner: Arc<Inner>,
    fanout: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for JetStreamLog {
    fn drop(&mut self) {
        if let Some(f) = self
            .fanout
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            f.abort();
        }
    }
}

impl JetStreamLog {
    /// Creates the stream and bucket if missing, loads channels and heads,
    /// and starts this node's fan-out consumer. Committed events (from every
    /// node) go to `sink`.
    pub async fn open(nats: Nats, sink: EventSink) -> Result<Arc<JetStreamLog>, StoreError> {
        let subjects = Subjects::new(&nats.cfg.subject_prefix);
        let stream_name = nats.cfg.posts_stream();
        let config = stream::Config {
            name: stream_name.clone(),
            subjects: subjects.all(),
            num_replicas: nats.cfg.replicas,
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            // Never drop old messages on the server's own: a channel's last
            // post must survive (see "Trimming").
            discard: stream::DiscardPolicy::New,
            duplicate_window: nats.cfg.duplicate_window,
            allow_direct: true,
            deny_delete: true,
            ..Default::default()
        };
        // Retried while JetStream is not ready (a cluster still electing).
        let deadline = tokio::time::Instant::now() + crate::cluster::nats::KV_RETRY_DEADLINE;
        let mut st = loop {
            match nats.js.get_or_create_stream(config.clone()).await {
                Ok(st) => break st,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "posts stream not ready; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(StoreError::Storage(format!("posts stream: {e}"))),
            }
        };
        let last_at_open = st
            .info()
            .await
            .map_err(|e| StoreError::Storage(format!("posts stream info: {e}")))?
            .state
            .last_sequence;
        let bucket = kvcache::open_bucket(&nats, &nats.cfg.bucket("channels"), Duration::ZERO)
            .await
            .map_err(storage)?;
        let channels = KvCache::open(bucket, kvcache::json::<ChannelRecord>)
            .await
            .map_err(storage)?;
        let (applied, _) = watch::channel(last_at_open);
        let inner = Arc::new(Inner {
            nats,
            stream: stream_name,
            subjects,
            channels,
            heads: DashMap::new(),
            index: SeqIndex::default(),
            applied,
            appenders: DashMap::new(),
            next_appender: std::sync::atomic::AtomicU64::new(1),
            closed: std::sync::atomic::AtomicBool::new(false),
            tasks: tokio_util::task::TaskTracker::new(),
        });
        // Heads of known channels, from the leader, a few at a time.
        let ids: Vec<ChannelId> = inner
            .channels
            .entries()
            .into_iter()
            .filter_map(|(k, _)| codec::channel_of(&k))
            .collect();
        let loads = futures_util::stream::iter(ids)
            .map(|id| {
                let inner = inner.clone();
                async move { inner.fetch_head(&id).await.map(|_| ()) }
            })
            .buffer_unordered(16)
            .collect::<Vec<_>>()
            .await;
        for r in loads {
            r?;
        }
        let fanout = tokio::spawn(fanout_loop(inner.clone(), last_at_open + 1, sink));
        Ok(Arc::new(JetStreamLog {
            inner,
            fanout: std::sync::Mutex::new(Some(fanout)),
        }))
    }

    /// The last stream sequence this node's consumer handed to the sink.
    pub fn applied_seq(&self) -> u64 {
        *self.inner.applied.borrow()
    }

    /// The name of the posts stream.
    pub fn stream_name(&self) -> &str {
        &self.inner.stream
    }

    fn is_closed(&self) -> bool {
        self.inner.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Finishes queued appends, then stops the fan-out consumer.
    async fn shut(&self) -> Result<(), StoreError> {
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        // Dropping the senders ends each append task once its queue is empty.
        self.inner.appenders.clear();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        let fanout = self.fanout.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(f) = fanout {
            f.abort();
            let _ = f.await;
        }
        Ok(())
    }

    fn appender(&self, ch: &ChannelId) -> mpsc::Sender<AppendOp> {
        if let Some(e) = self.inner.appenders.get(ch) {
            return e.1.clone();
        }
        let mut entry = self.inner.appenders.entry(ch.clone()).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(WRITE_QUEUE);
            let id = self
                .inner
                .next_appender
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.inner
                .tasks
                .spawn(append_loop(self.inner.clone(), ch.clone(), id, rx));
            (id, tx)
        });
        entry.value_mut().1.clone()
    }
}

/// One channel's appends on this node, one at a time.
async fn append_loop(inner: Arc<Inner>, ch: ChannelId, id: u64, mut rx: mpsc::Receiver<AppendOp>) {
    loop {
        match tokio::time::timeout(APPENDER_IDLE, rx.recv()).await {
            Ok(Some(op)) => {
                let r = inner.append_one(&ch, op.post, op.key).await;
                let _ = op.reply.send(r);
            }
            Ok(None) => return,
            Err(_) => {
                // Idle: leave the map (only if still ours), refuse new work,
                // and finish what was queued meanwhile.
                inner.appenders.remove_if(&ch, |_, (i, _)| *i == id);
                rx.close();
                while let Some(op) = rx.recv().await {
                    let r = inner.append_one(&ch, op.post, op.key).await;
                    let _ = op.reply.send(r);
                }
                return;
            }
        }
    }
}

/// This node's fan-out: one ordered consumer over the whole stream.
async fn fanout_loop(inner: Arc<Inner>, start: u64, sink: EventSink) {
    let mut next = start;
    let mut backoff = Duration::from_millis(50);
    loop {
        let cfg = consumer::pull::OrderedConfig {
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: next,
            },
            // Pull expiry 2 s, so idle heartbeats every 1 s: a lost server is
            // noticed (two missed heartbeats) and the consumer re-created
            // within ~2 s. Batches bound what the client buffers.
            max_expires: FANOUT_PULL_EXPIRY,
            max_batch: SINK_BATCH as i64 * 2,
            max_bytes: 16 << 20,
            ..Default::default()
        };
        let created = async {
            let st = inner.nats.js.get_stream_no_info(&inner.stream).await?;
            let c = st.create_consumer(cfg).await?;
            c.messages().await.map_err(async_nats::Error::from)
        }
        .await;
        let mut msgs = match created {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, next, "fan-out consumer: create failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let mut batch: Vec<jetstream::Message> = Vec::with_capacity(SINK_BATCH);
        loop {
            match msgs.next().await {
                Some(Ok(m)) => batch.push(m),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, next, "fan-out consumer error; re-creating");
                    break;
                }
                None => break,
            }
            while batch.len() < SINK_BATCH {
                match msgs.next().now_or_never() {
                    Some(Some(Ok(m))) => batch.push(m),
                    _ => break,
                }
            }
            let mut events = Vec::with_capacity(batch.len());
            for m in batch.drain(..) {
                let sseq = match m.info() {
                    Ok(i) => i.stream_sequence,
                    Err(e) => {
                        tracing::error!(error = %e, "fan-out: message without stream sequence");
                        continue;
                    }
                };
                if sseq < next {
                    continue; // seen before a re-creation
                }
                next = sseq + 1;
                let stored = StoredMsg {
                    subject: m.subject.to_string(),
                    seq: sseq,
                    headers: m.headers.clone().unwrap_or_default(),
                    payload: m.payload.clone(),
                };
                match codec::decode(&inner.subjects, &stored) {
                    Ok((Op::Post, p)) => {
                        inner.note_head(&p.channel, Head { seq: p.seq, sseq });
                        inner.index.note(&p.channel, p.seq, sseq);
                        events.push(LogEvent::Posted(p));
                    }
                    Ok((Op::Edit, p)) => events.push(LogEvent::Edited(p)),
                    Ok((Op::Delete, p)) => events.push(LogEvent::Deleted(p)),
                    Err(e) => tracing::error!(error = %e, "fan-out: undecodable message skipped"),
                }
            }
            if !events.is_empty() {
                let s = &sink;
                let ev = &events;
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| s(ev))).is_err() {
                    tracing::error!(
                        events = events.len(),
                        "fan-out panicked; followers will catch up from the log"
                    );
                }
            }
            inner.applied.send_if_modified(|a| {
                let moved = next - 1 > *a;
                if moved {
                    *a = next - 1;
                }
                moved
            });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    hex::encode(b)
}

/// The `Nats-Msg-Id` of an idempotency key: digest of (channel, key), short
/// enough to keep the server's de-duplication map small.
pub fn idempotency_msg_id(ch: &ChannelId, key: &str) -> String {
    let mut h = Sha256::new();
    h.update(ch.as_str().as_bytes());
    h.update([0u8]);
    h.update(key.as_bytes());
    format!("k{}", hex::encode(&h.finalize()[..16]))
}

fn jitter(max_ms: u64) -> Duration {
    Duration::from_micros(rand::random_range(200..max_ms.max(1) * 1000))
}

impl Inner {
    fn record(&self, ch: &ChannelId) -> Option<(ChannelRecord, u64)> {
        self.channels.get(&codec::token(ch))
    }

    /// The channel record, asking the bucket itself if the watch has not
    /// delivered it yet (a channel just created on another node).
    async fn record_or_fetch(&self, ch: &ChannelId) -> Result<ChannelRecord, StoreError> {
        if let Some((r, _)) = self.record(ch) {
            return Ok(r);
        }
        match self
            .channels
            .fetch(&codec::token(ch), kvcache::json::<ChannelRecord>)
            .await
            .map_err(storage)?
        {
            Some((r, _)) => {
                self.fetch_head(ch).await?;
                Ok(r)
            }
            None => Err(StoreError::UnknownChannel(ch.clone())),
        }
    }

    fn note_head(&self, ch: &ChannelId, h: Head) {
        let mut e = self.heads.entry(ch.clone()).or_default();
        if h.seq > e.seq {
            *e = h;
        }
    }

    fn head(&self, ch: &ChannelId) -> Head {
        self.heads.get(ch).map(|h| *h).unwrap_or_default()
    }

    fn info(&self, ch: &ChannelId) -> Option<ChannelInfo> {
        let (r, _) = self.record(ch)?;
        let head = self.head(ch).seq.max(r.floor.saturating_sub(1));
        Some(ChannelInfo {
            id: ch.clone(),
            title: r.title,
            epoch: r.epoch,
            head_seq: head,
            oldest_seq: r.floor.max(1),
            created_at_ms: r.created_at_ms,
        })
    }

    /// Reads the channel's last post from the stream leader.
    async fn fetch_head(&self, ch: &ChannelId) -> Result<Head, StoreError> {
        let m = self
            .nats
            .leader_get(
                &self.stream,
                serde_json::json!({ "last_by_subj": self.subjects.posts(ch) }),
            )
            .await
            .map_err(storage)?;
        let h = match m {
            None => Head::default(),
            Some(m) => Head {
                seq: codec::seq_of(&m)?,
                sseq: m.seq,
            },
        };
        if h.seq > 0 {
            self.index.note(ch, h.seq, h.sseq);
        }
        self.note_head(ch, h);
        Ok(h)
    }

    /// Waits until this node's fan-out handled stream sequence `sseq`.
    async fn wait_applied(&self, sseq: u64) {
        let mut rx = self.applied.subscribe();
        if tokio::time::timeout(APPLY_WAIT, rx.wait_for(|a| *a >= sseq))
            .await
            .is_err()
        {
            tracing::warn!(
                sseq,
                "fan-out did not reach an acked post in time; answering anyway"
            );
        }
    }

    async fn append_one(
        &self,
        ch: &ChannelId,
        post: NewPost,
        key: Option<String>,
    ) -> Result<Post, StoreError> {
        let rec = self.record_or_fetch(ch).await?;
        let stored = StoredPost {
            id: random_hex(12),
            epoch: rec.epoch,
            text: post.text,
            media: post.media,
            created_at_ms: now_ms(),
            edited_at_ms: 0,
            deleted: false,
        };
        let payload = stored.encode()?;
        let msg_id = match &key {
            Some(k) => idempotency_msg_id(ch, k),
            None => format!("a{}", random_hex(16)),
        };
        let subject = self.subjects.posts(ch);
        let deadline = tokio::time::Instant::now() + self.nats.cfg.write_deadline;
        let mut head = self.head(ch);
        if head.seq == 0 {
            head = self.fetch_head(ch).await?;
        }
        let mut conflicts = 0u32;
        let mut backoff = Duration::from_millis(20);
        loop {
            let seq = head.seq + 1;
            let mut h = HeaderMap::new();
            h.insert(H_EXPECT_LAST_SUBJ_SEQ, head.sseq.to_string());
            h.insert(H_MSG_ID, msg_id.as_str());
            h.insert(H_SEQ, seq.to_string());
            h.insert(H_OP, Op::Post.as_str());
            let outcome = self.nats.publish(subject.clone(), h, payload.clone()).await;
            let retry_head = match outcome {
                Ok(PubOutcome::Stored {
                    seq: sseq,
                    duplicate: false,
                }) => {
                    self.note_head(ch, Head { seq, sseq });
                    self.index.note(ch, seq, sseq);
                    self.wait_applied(sseq).await;
                    return Ok(stored.into_post(ch.clone(), seq));
                }
                Ok(PubOutcome::Stored {
                    seq: sseq,
                    duplicate: true,
                }) => return self.first_answer(ch, sseq).await,
                Ok(PubOutcome::WrongLast(_)) => {
                    conflicts += 1;
                    true
                }
                Ok(PubOutcome::Busy) => {
                    conflicts += 1;
                    tokio::time::sleep(jitter(3)).await;
                    true
                }
                Err(NatsError::Unavailable(e)) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(StoreError::Storage(format!(
                            "append: cluster unavailable: {e}"
                        )));
                    }
                    tracing::debug!(error = %e, "append: retrying through unavailability");
                    tokio::time::sleep(backoff + jitter(10)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    // Same head, same msg id: if the first try was stored the
                    // retry answers "duplicate"; if someone else appended, it
                    // answers "wrong last sequence" and the head is re-read.
                    false
                }
                Err(e) => return Err(storage(e)),
            };
            if conflicts > MAX_CONFLICTS {
                return Err(StoreError::Storage(
                    "append: too many conflicting appends".into(),
                ));
            }
            if retry_head {
                match self.fetch_head(ch).await {
                    Ok(h) => head = h,
                    Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                    Err(_) => tokio::time::sleep(backoff).await,
                }
            }
        }
    }

    /// The answer to a duplicate publish: the first post, read from the leader.
    async fn first_answer(&self, ch: &ChannelId, sseq: u64) -> Result<Post, StoreError> {
        let m = self
            .nats
            .leader_get(&self.stream, serde_json::json!({ "seq": sseq }))
            .await
            .map_err(storage)?;
        match m {
            Some(m) => {
                let (_, p) = codec::decode(&self.subjects, &m)?;
                if &p.channel != ch {
                    return Err(StoreError::Storage("idempotency digest collision".into()));
                }
                self.wait_applied(sseq).await;
                Ok(p)
            }
            // Trimmed since: its identity is gone with it.
            None => Err(StoreError::Storage(format!(
                "the first post for this idempotency key (stream seq {sseq}) was trimmed"
            ))),
        }
    }

    /// The first message of `ch`'s posts at stream sequence >= `from`, from
    /// the leader.
    async fn probe(
        &self,
        ch: &ChannelId,
        from: u64,
    ) -> Result<Option<(u64, StoredMsg)>, StoreError> {
        let m = self
            .nats
            .leader_get(
                &self.stream,
                serde_json::json!({ "seq": from.max(1), "next_by_subj": self.subjects.posts(ch) }),
            )
            .await
            .map_err(storage)?;
        match m {
            Some(m) => {
                let s = codec::seq_of(&m)?;
                self.index.note(ch, s, m.seq);
                Ok(Some((s, m)))
            }
            None => Ok(None),
        }
    }

    /// The stream sequence of post `target` (leader reads: binary search
    /// between the nearest known pairs). `None`: not retained.
    async fn locate(&self, ch: &ChannelId, target: u64) -> Result<Option<u64>, StoreError> {
        let mut lo = match self.index.at_or_below(ch, target) {
            Some((s, ss)) if s == target => return Ok(Some(ss)),
            Some((_, ss)) => ss,
            None => 0,
        };
        let mut hi = match self.index.above(ch, target) {
            Some((_, ss)) => ss,
            None => {
                let h = self.fetch_head(ch).await?;
                if h.seq < target {
                    return Ok(None);
                }
                if h.seq == target {
                    return Ok(Some(h.sseq));
                }
                h.sseq
            }
        };
        // Invariant: every post of `ch` at a stream seq <= lo is < target and
        // every post at >= hi is > target.
        while hi > lo + 1 {
            let mid = lo + (hi - lo) / 2;
            match self.probe(ch, mid).await? {
                Some((s, m)) if s == target => return Ok(Some(m.seq)),
                Some((s, m)) if s < target => lo = m.seq,
                _ => hi = mid,
            }
        }
        Ok(None)
    }

    async fn read_range(
        &self,
        ch: &ChannelId,
        after_seq: u64,
        limit: usize,
    ) -> Result<Vec<Post>, StoreError> {
        self.record_or_fetch(ch).await?;
        let Some(info) = self.info(ch) else {
            return Err(StoreError::UnknownChannel(ch.clone()));
        };
        let start = after_seq.saturating_add(1).max(info.oldest_seq);
        let mut out: Vec<Post> = Vec::with_capacity(limit.min(1024));
        if limit == 0 || start > info.head_seq {
            return Ok(out);
        }
        let known_applied = *self.applied.borrow();
        // Where to start reading: near a known pair, or located exactly; `skip`
        // is how many posts below `start` the first batch will pass over.
        let (mut from, mut skip) = match self.index.at_or_below(ch, start) {
            Some((s, ss)) if start - s <= SCAN_LIMIT => (ss, start - s),
            _ => match self.locate(ch, start).await? {
                Some(ss) => (ss, 0),
                // Trimmed meanwhile: read on from the oldest post still there.
                None => (0, 0),
            },
        };
        let subject = self.subjects.posts(ch);
        // Posts up to here must come back (this node has seen them).
        let must_reach = info.head_seq.min(start + limit as u64 - 1);
        let mut next_seq = start;
        let mut from_leader = false;
        while out.len() < limit {
            let want = (limit - out.len()).min(READ_BATCH);
            let msgs: Vec<StoredMsg>;
            let mut exhausted = false;
            if from_leader {
                match self.probe(ch, from).await? {
                    Some((_, m)) => msgs = vec![m],
                    None => {
                        msgs = vec![];
                        exhausted = true;
                    }
                }
            } else {
                let n = (want as u64 + skip) as usize;
                skip = 0;
                let b = self
                    .nats
                    .direct_batch(
                        &self.stream,
                        serde_json::json!({ "seq": from.max(1), "next_by_subj": subject, "batch": n }),
                        n,
                    )
                    .await
                    .map_err(storage)?;
                exhausted = b.msgs.is_empty() || b.num_pending == Some(0);
                msgs = b.msgs;
            }
            for m in &msgs {
                from = m.seq + 1;
                let (_, p) = codec::decode(&self.subjects, m)?;
                self.index.note(ch, p.seq, m.seq);
                if p.seq < next_seq {
                    continue;
                }
                if p.seq > next_seq && !out.is_empty() {
                    return Err(StoreError::Storage(format!(
                        "channel {ch} has a hole: {} follows {}",
                        p.seq,
                        next_seq - 1
                    )));
                }
                next_seq = p.seq + 1;
                out.push(p);
                if out.len() >= limit {
                    break;
                }
            }
            if out.len() >= limit {
                break;
            }
            if exhausted {
                let reached = next_seq - 1;
                if reached < must_reach && !from_leader {
                    // A replica that trails the leader: finish from the leader.
                    from_leader = true;
                    continue;
                }
                break;
            }
        }
        self.overlay_changes(ch, &mut out, known_applied).await?;
        // A trim may have raised the floor meanwhile.
        if let Some((r, _)) = self.record(ch) {
            out.retain(|p| p.seq >= r.floor);
        }
        Ok(out)
    }

    /// Replaces posts that were edited or deleted by their current state.
    async fn overlay_changes(
        &self,
        ch: &ChannelId,
        posts: &mut [Post],
        known_applied: u64,
    ) -> Result<(), StoreError> {
        let Some(first) = posts.first().map(|p| p.seq) else {
            return Ok(());
        };
        for chunk in posts.chunks_mut(READ_BATCH) {
            let mut filters: Vec<String> = chunk
                .iter()
                .map(|p| self.subjects.edits(ch, p.seq))
                .collect();
            // The channel's last post always exists, so a fresh replica always
            // answers with an end-of-batch carrying its last stream sequence.
            filters.push(self.subjects.posts(ch));
            let mut fresh = None;
            for _ in 0..3 {
                let b = self
                    .nats
                    .direct_batch(
                        &self.stream,
                        serde_json::json!({ "multi_last": filters, "batch": filters.len() }),
                        filters.len(),
                    )
                    .await
                    .map_err(storage)?;
                if b.up_to_seq.is_some_and(|u| u >= known_applied) {
                    fresh = Some(b.msgs);
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let changes = match fresh {
                Some(m) => m,
                None => {
                    // Every replica we reached trails this node: ask the leader, post by post.
                    let mut v = Vec::new();
                    for p in chunk.iter() {
                        if let Some(m) = self
                            .nats
                            .leader_get(
                                &self.stream,
                                serde_json::json!({ "last_by_subj": self.subjects.edits(ch, p.seq) }),
                            )
                            .await
                            .map_err(storage)?
                        {
                            v.push(m);
                        }
                    }
                    v
                }
            };
            let chunk_first = chunk.first().map_or(first, |p| p.seq);
            for m in changes {
                if !matches!(
                    self.subjects.parse(&m.subject),
                    Some(codec::SubjectKind::Edit(..))
                ) {
                    continue;
                }
                let (_, p) = codec::decode(&self.subjects, &m)?;
                if let Some(slot) = p
                    .seq
                    .checked_sub(chunk_first)
                    .and_then(|i| chunk.get_mut(i as usize))
                {
                    if slot.seq == p.seq {
                        *slot = p;
                    }
                }
            }
        }
        Ok(())
    }

    /// The current state of post `seq` (leader reads) and the stream sequence
    /// of its last change (0: never changed).
    async fn current(&self, ch: &ChannelId, seq: u64) -> Result<(Post, u64), StoreError> {
        let not_found = || StoreError::PostNotFound {
            channel: ch.clone(),
            seq,
        };
        let rec = self.record_or_fetch(ch).await?;
        if seq == 0 || seq < rec.floor {
            return Err(not_found());
        }
        let Some(sseq) = self.locate(ch, seq).await? else {
            return Err(not_found());
        };
        let last_change = self
            .nats
            .leader_get(
                &self.stream,
                serde_json::json!({ "last_by_subj": self.subjects.edits(ch, seq) }),
            )
            .await
            .map_err(storage)?;
        let (post, change_seq) = match last_change {
            Some(m) => (codec::decode(&self.subjects, &m)?.1, m.seq),
            None => {
                let m = self
                    .nats
                    .leader_get(&self.stream, serde_json::json!({ "seq": sseq }))
                    .await
                    .map_err(storage)?
                    .ok_or_else(not_found)?;
                (codec::decode(&self.subjects, &m)?.1, 0)
            }
        };
        if post.deleted {
            return Err(not_found());
        }
        Ok((post, change_seq))
    }

    /// Edits or deletes post `seq`.
    async fn change(
        &self,
        ch: &ChannelId,
        seq: u64,
        op: Op,
        text: Option<String>,
    ) -> Result<Post, StoreError> {
        let msg_id = format!("e{}", random_hex(16));
        let deadline = tokio::time::Instant::now() + self.nats.cfg.write_deadline;
        let mut backoff = Duration::from_millis(20);
        let mut conflicts = 0u32;
        loop {
            let (mut p, last) = self.current(ch, seq).await?;
            p.edited_at_ms = now_ms();
            match op {
                Op::Edit => p.text = text.clone().unwrap_or_default(),
                _ => {
                    p.text.clear();
                    p.media.clear();
                    p.deleted = true;
                }
            }
            let mut h = HeaderMap::new();
            h.insert(H_EXPECT_LAST_SUBJ_SEQ, last.to_string());
            h.insert(H_MSG_ID, msg_id.as_str());
            h.insert(H_SEQ, seq.to_string());
            h.insert(H_OP, op.as_str());
            let payload: Bytes = StoredPost::of(&p).encode()?;
            match self
                .nats
                .publish(self.subjects.edits(ch, seq), h, payload)
                .await
            {
                Ok(PubOutcome::Stored {
                    seq: sseq,
                    duplicate,
                }) => {
                    if duplicate {
                        // A retry of ours that was stored the first time.
                        let m = self
                            .nats
                            .leader_get(&self.stream, serde_json::json!({ "seq": sseq }))
                            .await
                            .map_err(storage)?
                            .ok_or_else(|| StoreError::PostNotFound {
                                channel: ch.clone(),
                                seq,
                            })?;
                        p = codec::decode(&self.subjects, &m)?.1;
                    }
                    self.wait_applied(sseq).await;
                    return Ok(p);
                }
                Ok(PubOutcome::WrongLast(_)) | Ok(PubOutcome::Busy) => {
                    conflicts += 1;
                    if conflicts > MAX_CONFLICTS {
                        return Err(StoreError::Storage("edit: too many conflicts".into()));
                    }
                    tokio::time::sleep(jitter(3)).await;
                }
                Err(NatsError::Unavailable(e)) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(StoreError::Storage(format!(
                            "edit: cluster unavailable: {e}"
                        )));
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(storage(e)),
            }
        }
    }

    async fn create(&self, id: ChannelId, title: String) -> Result<ChannelInfo, StoreError> {
        let rec = ChannelRecord {
            title,
            epoch: 1,
            created_at_ms: now_ms(),
            floor: 1,
        };
        let bytes = serde_json::to_vec(&rec).map_err(storage)?;
        let key = codec::token(&id);
        match kvcache::kv_create(&self.channels.store, &key, bytes.into()).await {
            Ok(rev) => {
                self.channels.apply(&key, Some(rec), rev);
                self.note_head(&id, Head::default());
                self.info(&id)
                    .ok_or_else(|| StoreError::Storage("channel vanished after create".into()))
            }
            Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
                Err(StoreError::ChannelExists(id))
            }
            Err(e) => Err(StoreError::Storage(format!("create channel: {e}"))),
        }
    }

    /// Raises the channel's floor to at least `floor` (compare and set).
    async fn raise_floor(&self, ch: &ChannelId, floor: u64) -> Result<(), StoreError> {
        let key = codec::token(ch);
        for _ in 0..100 {
            let Some((mut rec, rev)) = self
                .channels
                .fetch(&key, kvcache::json::<ChannelRecord>)
                .await
                .map_err(storage)?
            else {
                return Err(StoreError::UnknownChannel(ch.clone()));
            };
            if rec.floor >= floor {
                return Ok(());
            }
            rec.floor = floor;
            let bytes = serde_json::to_vec(&rec).map_err(storage)?;
            match kvcache::kv_update(&self.channels.store, &key, bytes.into(), rev).await {
                Ok(new_rev) => {
                    self.channels.apply(&key, Some(rec), new_rev);
                    return Ok(());
                }
                Err(e) if crate::cluster::nats::is_kv_conflict(&e) => {
                    tokio::time::sleep(jitter(3)).await;
                    continue;
                }
                Err(e) => return Err(StoreError::Storage(format!("raise floor: {e}"))),
            }
        }
        Err(StoreError::Storage(
            "raise floor: too many conflicts".into(),
        ))
    }

    async fn trim_channel(&self, ch: &ChannelId, policy: TrimPolicy) -> Result<u64, StoreError> {
        self.record_or_fetch(ch).await?;
        let head = self.fetch_head(ch).await?;
        let Some(info) = self.info(ch) else {
            return Err(StoreError::UnknownChannel(ch.clone()));
        };
        let oldest = info.oldest_seq;
        let mut keep_from = oldest;
        if policy.keep_max > 0 && head.seq >= policy.keep_max {
            keep_from = keep_from.max(head.seq + 1 - policy.keep_max);
        }
        if policy.older_than_ms > now_ms() {
            keep_from = head.seq + 1;
        } else if policy.older_than_ms > 0 && keep_from <= head.seq {
            // The first post stored at or after the cutoff (store time).
            let t = time_rfc3339(policy.older_than_ms);
            let m = self
                .nats
                .leader_get(
                    &self.stream,
                    serde_json::json!({ "start_time": t, "next_by_subj": self.subjects.posts(ch) }),
                )
                .await
                .map_err(storage)?;
            let first_young = match m {
                Some(m) => codec::seq_of(&m)?,
                None => head.seq + 1,
            };
            keep_from = keep_from.max(first_young);
        }
        if keep_from <= oldest {
            return Ok(0);
        }
        self.raise_floor(ch, keep_from).await?;
        self.index.forget_below(ch, keep_from.min(head.seq));
        // Physically: everything below the first kept post, but never the last post.
        let keep_phys = keep_from.min(head.seq);
        let below = if keep_phys == head.seq {
            Some(head.sseq)
        } else {
            self.locate(ch, keep_phys).await?
        };
        if let Some(below) = below {
            self.nats
                .purge_below(&self.stream, &self.subjects.posts(ch), below)
                .await
                .map_err(storage)?;
            // Changes older than the first kept post belong to trimmed posts.
            let edits = format!(
                "{}.edits.{}.*",
                self.nats.cfg.subject_prefix,
                codec::token(ch)
            );
            self.nats
                .purge_below(&self.stream, &edits, below)
                .await
                .map_err(storage)?;
        }
        Ok(keep_from - oldest)
    }
}

/// Unix milliseconds as RFC 3339 (UTC), for JetStream's `start_time`.
fn time_rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        sod / 3600,
        (sod % 3600) / 60,
        sod % 60
    )
}

impl ChannelLog for JetStreamLog {
    fn create_channel(&self, id: ChannelId, title: String) -> LogFuture<'_, ChannelInfo> {
        Box::pin(async move {
            if self.is_closed() {
                return Err(StoreError::Closed);
            }
            self.inner.create(id, title).await
        })
    }

    fn channel(&self, id: &ChannelId) -> Option<ChannelInfo> {
        self.inner.info(id)
    }

    fn channels(&self) -> Vec<ChannelInfo> {
        self.inner
            .channels
            .entries()
            .into_iter()
            .filter_map(|(k, _)| codec::channel_of(&k))
            .filter_map(|id| self.inner.info(&id))
            .collect()
    }

    fn append(
        &self,
        channel: ChannelId,
        post: NewPost,
        idempotency_key: Option<String>,
    ) -> LogFuture<'_, Post> {
        Box::pin(async move {
            if self.is_closed() {
                return Err(StoreError::Closed);
            }
            let mut op = AppendOp {
                post,
                key: idempotency_key,
                reply: oneshot::channel().0,
            };
            // An idle appender may close between lookup and send: take a new one.
            for _ in 0..3 {
                let (tx, rx) = oneshot::channel();
                op.reply = tx;
                match self.appender(&channel).send(op).await {
                    Ok(()) => return rx.await.map_err(|_| StoreError::Closed)?,
                    Err(mpsc::error::SendError(back)) => {
                        self.inner
                            .appenders
                            .remove_if(&channel, |_, (_, s)| s.is_closed());
                        op = back;
                    }
                }
            }
            Err(StoreError::Closed)
        })
    }

    fn edit(&self, channel: ChannelId, seq: u64, text: String) -> LogFuture<'_, Post> {
        Box::pin(async move {
            if self.is_closed() {
                return Err(StoreError::Closed);
            }
            self.inner.change(&channel, seq, Op::Edit, Some(text)).await
        })
    }

    fn delete(&self, channel: ChannelId, seq: u64) -> LogFuture<'_, Post> {
        Box::pin(async move {
            if self.is_closed() {
                return Err(StoreError::Closed);
            }
            self.inner.change(&channel, seq, Op::Delete, None).await
        })
    }

    fn read(&self, channel: ChannelId, after_seq: u64, limit: usize) -> LogFuture<'_, Vec<Post>> {
        Box::pin(async move {
            if self.is_closed() {
                return Err(StoreError::Closed);
            }
            self.inner.read_range(&channel, after_seq, limit).await
        })
    }

    fn close(&self) -> LogFuture<'_, ()> {
        Box::pin(self.shut())
    }

    fn trim(&self, channel: ChannelId, policy: TrimPolicy) -> LogFuture<'_, u64> {
        Box::pin(async move {
            if self.is_closed() {
                return Err(StoreError::Closed);
            }
            self.inner.trim_channel(&channel, policy).await
        })
    }

    fn trim_all(&self, policy: TrimPolicy) -> LogFuture<'_, TrimReport> {
        Box::pin(async move {
            // Each channel's trim is one purge on the stream (idempotency
            // keys expire by themselves, with the stream's duplicate window).
            let mut report = TrimReport::default();
            for c in self.channels() {
                let n = self.trim(c.id, policy).await?;
                if n > 0 {
                    report.posts_removed += n;
                    report.channels_trimmed += 1;
                }
            }
            Ok(report)
        })
    }

    fn health(&self) -> crate::datadir::Health {
        // The replicated stream answers or times out per write; a write that
        // times out answers 503 on its own.
        crate::datadir::Health::Ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_and_msg_ids() {
        assert_eq!(time_rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(time_rfc3339(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        let a = ChannelId::parse("a").unwrap();
        let b = ChannelId::parse("b").unwrap();
        assert_eq!(idempotency_msg_id(&a, "k"), idempotency_msg_id(&a, "k"));
        assert_ne!(idempotency_msg_id(&a, "k"), idempotency_msg_id(&b, "k"));
        assert_eq!(idempotency_msg_id(&a, "k").len(), 33);
    }
}
