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
//! lookup. Reads run on tokio's blocking pool with their own read transaction,
//! each tracked, so that [`ChannelLog::close`] can wait for them: once it
//! returns, no thread holds the database and the file can be opened again.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use dashmap::DashMap;
use rand::RngCore;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

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
/// How long an idempotency key answers with its first post (24 h).
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;

const CHANNELS: TableDefinition<&str, &[u8]> = TableDefinition::new("channels");
const POSTS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("posts");
/// Idempotency records: (channel, key) -> the first answer (see [`IdemRecord`]).
const IDEMPOTENCY: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("idempotency");
/// The same records by age: (channel, created_at_ms, key), for expiry.
const IDEMPOTENCY_BY_AGE: TableDefinition<(&str, i64, &str), ()> =
    TableDefinition::new("idempotency_by_age");

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
        idempotency_key: Option<String>,
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
    /// Stop after everything queued before it.
    Stop,
}

enum Outcome {
    Channel(ChannelInfo),
    Post(Post),
    Trimmed(u64),
    Stopped,
}

struct Op {
    kind: OpKind,
    reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

/// The redb-backed [`ChannelLog`].
pub struct RedbLog {
    /// `None` once closed: no new read can start.
    db: std::sync::RwLock<Option<Arc<Database>>>,
    /// Reads in flight on the blocking pool.
    reads: TaskTracker,
    channels: Arc<DashMap<ChannelId, ChannelInfo>>,
    ops: mpsc::Sender<Op>,
    committer: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for RedbLog {
    /// Closes the write queue and waits for the committer to finish what was
    /// queued, so the database file is released when the log is dropped.
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.ops, closed));
        let handle = self
            .committer
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("log committer thread panicked");
            }
        }
    }
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
            txn.open_table(IDEMPOTENCY).map_err(storage)?;
            txn.open_table(IDEMPOTENCY_BY_AGE).map_err(storage)?;
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
        let handle = std::thread::Builder::new()
            .name("herald-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(storage)?;
        Ok(Arc::new(RedbLog {
            db: std::sync::RwLock::new(Some(db)),
            reads: TaskTracker::new(),
            channels,
            ops: tx,
            committer: std::sync::Mutex::new(Some(handle)),
        }))
    }

    /// The open database (tests reach into its tables).
    #[cfg(test)]
    fn database(&self) -> Arc<Database> {
        self.db
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .expect("log is open")
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

    fn append(
        &self,
        channel: ChannelId,
        post: NewPost,
        idempotency_key: Option<String>,
    ) -> LogFuture<'_, Post> {
        Box::pin(async move {
            expect_post(
                self.submit(OpKind::Append {
                    channel,
                    post,
                    idempotency_key,
                })
                .await?,
            )
        })
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
            let task = {
                // Spawned under the guard, so `close` either sees this read
                // in the tracker or this read sees the log closed.
                let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
                let db = guard.as_ref().ok_or(StoreError::Closed)?.clone();
                self.reads
                    .spawn_blocking(move || read_range(&db, &info, after_seq, limit))
            };
            task.await.map_err(storage)?
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

    fn close(&self) -> LogFuture<'_, ()> {
        Box::pin(async move {
            // No new reads; then wait for the committer to finish what is
            // queued and for the reads in flight.
            let db = self.db.write().unwrap_or_else(|p| p.into_inner()).take();
            if db.is_none() {
                return Ok(());
            }
            drop(db);
            let _ = self.submit(OpKind::Stop).await;
            let handle = self
                .committer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(h) = handle {
                tokio::task::spawn_blocking(move || h.join())
                    .await
                    .map_err(storage)?
                    .map_err(|_| StoreError::Storage("log committer thread panicked".into()))?;
            }
            self.reads.close();
            self.reads.wait().await;
            Ok(())
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
        let mut stop = None;
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            // Everything queued before a Stop is committed; what comes after
            // it is dropped with the queue (its writers see `Closed`).
            if let Some(i) = batch.iter().position(|op| matches!(op.kind, OpKind::Stop)) {
                stop = Some(batch.remove(i));
                batch.truncate(i);
            }
            if !batch.is_empty() {
                self.commit(&mut batch);
            }
            if let Some(op) = stop {
                let _ = op.reply.send(Ok(Outcome::Stopped));
                return;
            }
        }
    }

    /// Applies, commits and answers one batch, fanning its events out in
    /// between.
    fn commit(&self, batch: &mut Vec<Op>) {
        let kinds: Vec<&OpKind> = batch.iter().map(|op| &op.kind).collect();
        let started = std::time::Instant::now();
        let applied = self.apply(&kinds);
        metrics::histogram!(crate::metrics::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(crate::metrics::COMMIT_BATCH_SIZE).record(batch.len() as f64);
        match applied {
            Ok(applied) => {
                for (id, info) in applied.changed {
                    self.channels.insert(id, info);
                }
                if !applied.events.is_empty() {
                    // A bug in fan-out must not take the log down with it:
                    // the batch is durable, its writers are answered, and
                    // followers catch the missed events up from the log.
                    let sink = &self.sink;
                    let events = &applied.events;
                    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink(events)))
                        .is_err()
                    {
                        tracing::error!(
                            events = events.len(),
                            "fan-out panicked; followers will catch up from the log"
                        );
                    }
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
            let mut tables = Tables {
                posts: txn.open_table(POSTS).map_err(storage)?,
                idem: txn.open_table(IDEMPOTENCY).map_err(storage)?,
                idem_age: txn.open_table(IDEMPOTENCY_BY_AGE).map_err(storage)?,
            };
            let now = now_ms();
            for op in ops {
                let r = self.apply_one(op, now, &mut tables, &mut out);
                // A storage error may have left an operation half applied
                // (say, a post without its idempotency record): abort the
                // whole batch rather than commit it.
                if let Err(e @ StoreError::Storage(_)) = &r {
                    return Err(e.clone());
                }
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
        tables: &mut Tables<'_>,
        out: &mut Applied,
    ) -> Result<Outcome, StoreError> {
        let posts = &mut tables.posts;
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
            OpKind::Append {
                channel,
                post,
                idempotency_key,
            } => {
                let info = self.working(&mut out.changed, channel)?;
                // A key seen within the TTL answers with the first post, from
                // this transaction's own view (so a repeat in the same batch
                // sees the first one too).
                if let Some(key) = idempotency_key {
                    let ch = channel.as_str();
                    let found = match tables.idem.get((ch, key.as_str())).map_err(storage)? {
                        Some(v) => Some(IdemRecord::decode(v.value())?),
                        None => None,
                    };
                    if let Some(rec) = found {
                        if rec.created_at_ms >= now - IDEMPOTENCY_TTL_MS {
                            let stored = match posts.get((ch, rec.seq)).map_err(storage)? {
                                Some(v) => {
                                    Some(decode_post(channel, rec.epoch, rec.seq, v.value())?)
                                }
                                None => None,
                            };
                            return Ok(Outcome::Post(
                                stored.unwrap_or_else(|| rec.to_post(channel)),
                            ));
                        }
                        tables
                            .idem_age
                            .remove((ch, rec.created_at_ms, key.as_str()))
                            .map_err(storage)?;
                    }
                }
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
                if let Some(key) = idempotency_key {
                    let rec = IdemRecord {
                        seq,
                        epoch: p.epoch,
                        created_at_ms: now,
                        id: p.id.clone(),
                    };
                    let ch = channel.as_str();
                    tables
                        .idem
                        .insert((ch, key.as_str()), rec.encode().as_slice())
                        .map_err(storage)?;
                    tables
                        .idem_age
                        .insert((ch, now, key.as_str()), ())
                        .map_err(storage)?;
                }
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
                expire_idempotency(tables, channel, now - IDEMPOTENCY_TTL_MS)?;
                Ok(Outcome::Trimmed(removed))
            }
            OpKind::Stop => Err(StoreError::Closed),
        }
    }

    fn update_post(
        &self,
        channel: &ChannelId,
        seq: u64,
        posts: &mut redb::Table<'_, (&str, u64), &[u8]>,
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

/// The tables one batch writes.
struct Tables<'txn> {
    posts: redb::Table<'txn, (&'static str, u64), &'static [u8]>,
    idem: redb::Table<'txn, (&'static str, &'static str), &'static [u8]>,
    idem_age: redb::Table<'txn, (&'static str, i64, &'static str), ()>,
}

/// Removes up to [`TRIM_STEP`] of `channel`'s idempotency records created
/// before `cutoff_ms`.
fn expire_idempotency(
    tables: &mut Tables<'_>,
    channel: &ChannelId,
    cutoff_ms: i64,
) -> Result<u64, StoreError> {
    let ch = channel.as_str();
    let mut old: Vec<(i64, String)> = Vec::new();
    for entry in tables
        .idem_age
        .range((ch, i64::MIN, "")..(ch, cutoff_ms, ""))
        .map_err(storage)?
        .take(TRIM_STEP as usize)
    {
        let (k, _) = entry.map_err(storage)?;
        let (_, at, key) = k.value();
        old.push((at, key.to_string()));
    }
    for (at, key) in &old {
        tables
            .idem_age
            .remove((ch, *at, key.as_str()))
            .map_err(storage)?;
        tables.idem.remove((ch, key.as_str())).map_err(storage)?;
    }
    Ok(old.len() as u64)
}

/// The first answer to an idempotent append: seq, epoch, post id, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
struct IdemRecord {
    seq: u64,
    epoch: u64,
    created_at_ms: i64,
    id: String,
}

impl IdemRecord {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(24 + self.id.len());
        v.extend_from_slice(&self.seq.to_be_bytes());
        v.extend_from_slice(&self.epoch.to_be_bytes());
        v.extend_from_slice(&self.created_at_ms.to_be_bytes());
        v.extend_from_slice(self.id.as_bytes());
        v
    }

    fn decode(b: &[u8]) -> Result<IdemRecord, StoreError> {
        let corrupt = || StoreError::Storage("corrupt idempotency record".into());
        let word = |i: usize| -> Result<[u8; 8], StoreError> {
            b.get(i * 8..i * 8 + 8)
                .and_then(|s| s.try_into().ok())
                .ok_or_else(corrupt)
        };
        Ok(IdemRecord {
            seq: u64::from_be_bytes(word(0)?),
            epoch: u64::from_be_bytes(word(1)?),
            created_at_ms: i64::from_be_bytes(word(2)?),
            id: String::from_utf8(b.get(24..).ok_or_else(corrupt)?.to_vec())
                .map_err(|_| corrupt())?,
        })
    }

    /// The answer when the post itself is gone (trimmed): its identity only.
    fn to_post(&self, channel: &ChannelId) -> Post {
        Post {
            channel: channel.clone(),
            seq: self.seq,
            epoch: self.epoch,
            id: self.id.clone(),
            text: String::new(),
            media: Vec::new(),
            created_at_ms: self.created_at_ms,
            edited_at_ms: 0,
            deleted: true,
        }
    }
}

#[cfg(test)]
mod idempotency_tests {
    //! Expiry of idempotency records, with records aged by hand.

    use super::*;
    use redb::ReadableTableMetadata;

    fn age(log: &RedbLog, channel: &str, key: &str, by_ms: i64) {
        let txn = log.database().begin_write().unwrap();
        {
            let mut idem = txn.open_table(IDEMPOTENCY).unwrap();
            let mut by_age = txn.open_table(IDEMPOTENCY_BY_AGE).unwrap();
            let mut rec =
                IdemRecord::decode(idem.get((channel, key)).unwrap().unwrap().value()).unwrap();
            by_age.remove((channel, rec.created_at_ms, key)).unwrap();
            rec.created_at_ms -= by_ms;
            idem.insert((channel, key), rec.encode().as_slice())
                .unwrap();
            by_age
                .insert((channel, rec.created_at_ms, key), ())
                .unwrap();
        }
        txn.commit().unwrap();
    }

    fn records(log: &RedbLog) -> (u64, u64) {
        let txn = log.database().begin_read().unwrap();
        let idem = txn.open_table(IDEMPOTENCY).unwrap();
        let by_age = txn.open_table(IDEMPOTENCY_BY_AGE).unwrap();
        (idem.len().unwrap(), by_age.len().unwrap())
    }

    #[tokio::test]
    async fn keys_older_than_the_ttl_post_anew_and_are_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let log = RedbLog::open(dir.path(), Arc::new(|_: &[LogEvent]| {})).unwrap();
        let ch = ChannelId::parse("e").unwrap();
        log.create_channel(ch.clone(), String::new()).await.unwrap();
        let post = || NewPost::new("x".into(), vec![]).unwrap();
        let key = |k: &str| Some(k.to_string());
        assert_eq!(
            log.append(ch.clone(), post(), key("old"))
                .await
                .unwrap()
                .seq,
            1
        );
        assert_eq!(
            log.append(ch.clone(), post(), key("young"))
                .await
                .unwrap()
                .seq,
            2
        );
        age(&log, "e", "old", IDEMPOTENCY_TTL_MS + 1000);
        // An expired key is a new key: it posts, and takes over the record.
        assert_eq!(
            log.append(ch.clone(), post(), key("old"))
                .await
                .unwrap()
                .seq,
            3
        );
        assert_eq!(
            log.append(ch.clone(), post(), key("old"))
                .await
                .unwrap()
                .seq,
            3
        );
        assert_eq!(records(&log), (2, 2));
        // The trim removes expired records only.
        age(&log, "e", "young", IDEMPOTENCY_TTL_MS + 1000);
        let keep_all = TrimPolicy {
            older_than_ms: 0,
            keep_max: 0,
        };
        assert_eq!(log.trim(ch.clone(), keep_all).await.unwrap(), 0);
        assert_eq!(records(&log), (1, 1));
        assert_eq!(
            log.append(ch.clone(), post(), key("old"))
                .await
                .unwrap()
                .seq,
            3
        );
        assert_eq!(
            log.append(ch.clone(), post(), key("young"))
                .await
                .unwrap()
                .seq,
            4
        );
    }

    #[test]
    fn record_round_trip_and_corruption() {
        let r = IdemRecord {
            seq: 7,
            epoch: 2,
            created_at_ms: 123,
            id: "abc".into(),
        };
        assert_eq!(IdemRecord::decode(&r.encode()).unwrap(), r);
        assert!(IdemRecord::decode(&[1, 2, 3]).is_err());
    }
}
