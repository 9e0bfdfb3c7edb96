//! The embedded channel log on redb, with group commit.
//!
//! Writers send operations over a bounded queue ([`WRITE_QUEUE`]) to one
//! committer thread. The committer takes everything queued (up to
//! [`MAX_BATCH`] operations), applies it in one write transaction, commits
//! it durably (fsync), hands the committed events to the sink in order, and
//! only then answers each writer. Many concurrent publishes therefore share one
//! fsync, and seq assignment needs no lock: only the committer assigns seqs.
//!
//! Channel metadata (title, epoch, head, oldest retained seq) is also cached in
//! memory, updated by the committer after each commit, so `channel()` is a map
//! lookup. Reads run on tokio's blocking pool with their own read transaction.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use dashmap::DashMap;
use rand::RngCore;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use super::records::{decode_channel, decode_post, encode_channel, encode_post};
use super::{ChannelLog, EventSink, LogEvent, LogFuture, StoreError, TrimPolicy};
use crate::model::{now_ms, ChannelId, ChannelInfo, NewPost, Post};

/// File name of the log inside the data directory.
pub const LOG_FILE: &str = "herald.redb";
/// Most operations applied in one transaction.
pub const MAX_BATCH: usize = 4096;
/// Bound of the queue of operations waiting for the committer.
pub const WRITE_QUEUE: usize = 16_384;
/// Most posts one trim operation removes (a large trim runs as several).
const TRIM_STEP: u64 = 10_000;

const CHANNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("channels");
const POSTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("posts");

fn storage(e: impl std::fmt::Display) -> StoreError {
    StoreError::Storage(e.to_string())
}

enum OpKind {
    Create {
        id: ChannelId,
        title: String,
    },
    Append {
        channel: ChannelId,
        post: NewPost,
    },
    Edit {
        channel: ChannelId,
        seq: u64,
        text: String,
    },
    Delete {
        channel: ChannelId,
        seq: u64,
    },
    Trim {
        channel: ChannelId,
        policy: TrimPolicy,
    },
}

enum Outcome {
    Channel(ChannelInfo),
    Post(Post),
    Trimmed(u64),
}

struct Op {
    kind: OpKind,
    reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

/// The redb-backed [`ChannelLog`].
pub struct RedbLog {
    db: Arc<Database>,
    channels: Arc<DashMap<ChannelId, ChannelInfo>>,
    ops: mpsc::Sender<Op>,
}

impl RedbLog {
    /// Opens (or creates) the log in `data_dir` and starts its committer.
    /// Committed events go to `sink`.
    pub fn open(data_dir: &Path, sink: EventSink) -> Result<Arc<RedbLog>, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(storage)?;
        let db = Database::create(data_dir.join(LOG_FILE)).map_err(storage)?;
        let channels = Arc::new(DashMap::new());
        {
            let txn = db.begin_write().map_err(storage)?;
            txn.open_table(CHANNELS).map_err(storage)?;
            txn.open_table(POSTS).map_err(storage)?;
            txn.commit().map_err(storage)?;
            let read = db.begin_read().map_err(storage)?;
            let table = read.open_table(CHANNELS).map_err(storage)?;
            for entry in table.iter().map_err(storage)? {
                let (k, v) = entry.map_err(storage)?;
                let info = decode_channel(k.value(), v.value())?;
                channels.insert(info.id.clone(), info);
            }
        }
        let db = Arc::new(db);
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let committer = Committer {
            db: db.clone(),
            channels: channels.clone(),
            sink,
        };
        std::thread::Builder::new()
            .name("herald-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(storage)?;
        Ok(Arc::new(RedbLog {
            db,
            channels,
            ops: tx,
        }))
    }

    async fn submit(&self, kind: OpKind) -> Result<Outcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.ops
            .send(Op { kind, reply })
            .await
            .map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

fn expect_post(o: Outcome) -> Result<Post, StoreError> {
    match o {
        Outcome::Post(p) => Ok(p),
        _ => Err(StoreError::Storage(
            "committer answered with the wrong outcome".into(),
        )),
    }
}

impl ChannelLog for RedbLog {
    fn create_channel(&self, id: ChannelId, title: String) -> LogFuture<'_, ChannelInfo> {
        Box::pin(async move {
            match self.submit(OpKind::Create { id, title }).await? {
                Outcome::Channel(c) => Ok(c),
                _ => Err(StoreError::Storage(
                    "committer answered with the wrong outcome".into(),
                )),
            }
        })
    }

    fn channel(&self, id: &ChannelId) -> Option<ChannelInfo> {
        self.channels.get(id).map(|c| c.clone())
    }

    fn channels(&self) -> Vec<ChannelInfo> {
        self.channels.iter().map(|c| c.clone()).collect()
    }

    fn append(&self, channel: ChannelId, post: NewPost) -> LogFuture<'_, Post> {
        Box::pin(async move { expect_post(self.submit(OpKind::Append { channel, post }).await?) })
    }

    fn edit(&self, channel: ChannelId, seq: u64, text: String) -> LogFuture<'_, Post> {
        Box::pin(
            async move { expect_post(self.submit(OpKind::Edit { channel, seq, text }).await?) },
        )
    }

    fn delete(&self, channel: ChannelId, seq: u64) -> LogFuture<'_, Post> {
        Box::pin(async move { expect_post(self.submit(OpKind::Delete { channel, seq }).await?) })
    }

    fn read(&self, channel: ChannelId, after_seq: u64, limit: usize) -> LogFuture<'_, Vec<Post>> {
        Box::pin(async move {
            let Some(info) = self.channel(&channel) else {
                return Err(StoreError::UnknownChannel(channel));
            };
            let db = self.db.clone();
            tokio::task::spawn_blocking(move || read_range(&db, &info, after_seq, limit))
                .await
                .map_err(storage)?
        })
    }

    fn trim(&self, channel: ChannelId, policy: TrimPolicy) -> LogFuture<'_, u64> {
        Box::pin(async move {
            match self.submit(OpKind::Trim { channel, policy }).await? {
                Outcome::Trimmed(n) => Ok(n),
                _ => Err(StoreError::Storage(
                    "committer answered with the wrong outcome".into(),
                )),
            }
        })
    }
}

fn read_range(
    db: &Database,
    info: &ChannelInfo,
    after_seq: u64,
    limit: usize,
) -> Result<Vec<Post>, StoreError> {
    let txn = db.begin_read().map_err(storage)?;
    let table = txn.open_table(POSTS).map_err(storage)?;
    let ch = info.id.as_str();
    let start = after_seq.saturating_add(1);
    let mut out = Vec::with_capacity(limit.min(1024));
    if start > info.head_seq {
        return Ok(out);
    }
    for entry in table
        .range((ch, start)..=(ch, u64::MAX))
        .map_err(storage)?
        .take(limit)
    {
        let (k, v) = entry.map_err(storage)?;
        out.push(decode_post(&info.id, info.epoch, k.value().1, v.value())?);
    }
    Ok(out)
}

/// The thread that owns all writes.
struct Committer {
    db: Arc<Database>,
    channels: Arc<DashMap<ChannelId, ChannelInfo>>,
    sink: EventSink,
}

/// What one batch produced, before it is known to be durable.
struct Applied {
    results: Vec<Result<Outcome, StoreError>>,
    events: Vec<LogEvent>,
    changed: HashMap<ChannelId, ChannelInfo>,
}

impl Committer {
    fn run(self, mut rx: mpsc::Receiver<Op>) {
        let mut batch: Vec<Op> = Vec::with_capacity(256);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let kinds: Vec<&OpKind> = batch.iter().map(|op| &op.kind).collect();
            let started = std::time::Instant::now();
            let applied = self.apply(&kinds);
            metrics::histogram!(crate::metrics::COMMIT_SECONDS)
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!(crate::metrics::COMMIT_BATCH_SIZE).record(batch.len() as f64);
            match applied {
                Ok(applied) => {
                    for (id, info) in applied.changed {
                        self.channels.insert(id, info);
                    }
                    if !applied.events.is_empty() {
                        (self.sink)(&applied.events);
                    }
                    for (op, result) in batch.drain(..).zip(applied.results) {
                        let _ = op.reply.send(result);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, ops = batch.len(), "log commit failed");
                    for op in batch.drain(..) {
                        let _ = op.reply.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Applies a batch in one durable transaction.
    fn apply(&self, ops: &[&OpKind]) -> Result<Applied, StoreError> {
        let txn = self.db.begin_write().map_err(storage)?;
        let mut out = Applied {
            results: Vec::with_capacity(ops.len()),
            events: Vec::new(),
            changed: HashMap::new(),
        };
        {
            let mut channels = txn.open_table(CHANNELS).map_err(storage)?;
            let mut posts = txn.open_table(POSTS).map_err(storage)?;
            let now = now_ms();
            for op in ops {
                let r = self.apply_one(op, now, &mut posts, &mut out);
                out.results.push(r);
            }
            for info in out.changed.values() {
                channels
                    .insert(info.id.as_str(), encode_channel(info).as_slice())
                    .map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)?;
        Ok(out)
    }

    /// The working copy of a channel's metadata within the batch.
    fn working<'a>(
        &self,
        changed: &'a mut HashMap<ChannelId, ChannelInfo>,
        id: &ChannelId,
    ) -> Result<&'a mut ChannelInfo, StoreError> {
        if !changed.contains_key(id) {
            let info = self
                .channels
                .get(id)
                .map(|c| c.clone())
                .ok_or_else(|| StoreError::UnknownChannel(id.clone()))?;
            changed.insert(id.clone(), info);
        }
        changed
            .get_mut(id)
            .ok_or_else(|| StoreError::UnknownChannel(id.clone()))
    }

    fn apply_one(
        &self,
        op: &OpKind,
        now: i64,
        posts: &mut redb::Table<(&str, u64), &[u8]>,
        out: &mut Applied,
    ) -> Result<Outcome, StoreError> {
        match op {
            OpKind::Create { id, title } => {
                if self.channels.contains_key(id) || out.changed.contains_key(id) {
                    return Err(StoreError::ChannelExists(id.clone()));
                }
                let info = ChannelInfo {
                    id: id.clone(),
                    title: title.clone(),
                    epoch: 1,
                    head_seq: 0,
                    oldest_seq: 1,
                    created_at_ms: now,
                };
                out.changed.insert(id.clone(), info.clone());
                Ok(Outcome::Channel(info))
            }
            OpKind::Append { channel, post } => {
                let info = self.working(&mut out.changed, channel)?;
                let seq = info.head_seq + 1;
                let mut idb = [0u8; 12];
                rand::rng().fill_bytes(&mut idb);
                let p = Post {
                    channel: channel.clone(),
                    seq,
                    epoch: info.epoch,
                    id: hex::encode(idb),
                    text: post.text.clone(),
                    media: post.media.clone(),
                    created_at_ms: now,
                    edited_at_ms: 0,
                    deleted: false,
                };
                posts
                    .insert((channel.as_str(), seq), encode_post(&p).as_slice())
                    .map_err(storage)?;
                info.head_seq = seq;
                out.events.push(LogEvent::Posted(p.clone()));
                Ok(Outcome::Post(p))
            }
            OpKind::Edit { channel, seq, text } => {
                let p = self.update_post(channel, *seq, posts, out, |p| {
                    p.text = text.clone();
                    p.edited_at_ms = now;
                })?;
                out.events.push(LogEvent::Edited(p.clone()));
                Ok(Outcome::Post(p))
            }
            OpKind::Delete { channel, seq } => {
                let p = self.update_post(channel, *seq, posts, out, |p| {
                    p.text.clear();
                    p.media.clear();
                    p.deleted = true;
                    p.edited_at_ms = now;
                })?;
                out.events.push(LogEvent::Deleted(p.clone()));
                Ok(Outcome::Post(p))
            }
            OpKind::Trim { channel, policy } => {
                let info = self.working(&mut out.changed, channel)?;
                let mut removed = 0;
                while info.oldest_seq <= info.head_seq && removed < TRIM_STEP {
                    let over_count = policy.keep_max > 0
                        && info.head_seq - info.oldest_seq + 1 > policy.keep_max;
                    let key = (channel.as_str(), info.oldest_seq);
                    let too_old = match posts.get(key).map_err(storage)? {
                        Some(v) => {
                            decode_post(channel, info.epoch, info.oldest_seq, v.value())?
                                .created_at_ms
                                < policy.older_than_ms
                        }
                        None => true,
                    };
                    if !(over_count || too_old) {
                        break;
                    }
                    posts.remove(key).map_err(storage)?;
                    info.oldest_seq += 1;
                    removed += 1;
                }
                Ok(Outcome::Trimmed(removed))
            }
        }
    }

    fn update_post(
        &self,
        channel: &ChannelId,
        seq: u64,
        posts: &mut redb::Table<(&str, u64), &[u8]>,
        out: &mut Applied,
        change: impl FnOnce(&mut Post),
    ) -> Result<Post, StoreError> {
        let info = self.working(&mut out.changed, channel)?;
        let not_found = || StoreError::PostNotFound {
            channel: channel.clone(),
            seq,
        };
        let mut p = match posts.get((channel.as_str(), seq)).map_err(storage)? {
            Some(v) => decode_post(channel, info.epoch, seq, v.value())?,
            None => return Err(not_found()),
        };
        if p.deleted {
            return Err(not_found());
        }
        change(&mut p);
        posts
            .insert((channel.as_str(), seq), encode_post(&p).as_slice())
            .map_err(storage)?;
        Ok(p)
    }
}
