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
//!
//! # A failed commit
//!
//! When a commit fails in the storage engine (a full disk, an I/O error),
//! nothing of its batch is acknowledged: every writer in it is answered
//! [`StoreError::Unavailable`] (the API's 503 `storage_unavailable`), never a
//! success. redb then refuses every write until the file is reopened, so the
//! committer reopens it itself ([`crate::datadir::Db::try_reopen`], which
//! also proves the file takes a write again), retrying with a backoff of up
//! to [`REOPEN_BACKOFF_MAX`]; meanwhile new writes are refused at once. After
//! the reopen the channel metadata is reloaded from the file, since a commit
//! reported as failed may still have reached the disk: its posts keep their
//! seqs (an `Idempotency-Key` retry finds them) and are fanned out then.
//!
//! # Damaged records
//!
//! Every record carries a checksum ([`super::records`]). A post whose record
//! is damaged (or that redb cannot read) is read as a tombstone marked
//! `damaged`, so a catch-up goes on past it and the follower is told, and
//! `herald check` ([`verify`]) reports it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use dashmap::DashMap;
use rand::RngCore;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use super::records::{damaged_post, decode_channel, decode_post, encode_channel, encode_post};
use super::{ChannelLog, EventSink, LogEvent, LogFuture, StoreError, TrimPolicy, TrimReport};
use crate::datadir::{Db, DbSpec, DbUnavailable, Health, OpenError};
use crate::model::{now_ms, ChannelId, ChannelInfo, NewPost, Post};

/// File name of the log inside the data directory.
pub const LOG_FILE: &str = "herald.redb";
/// Most operations applied in one transaction.
pub const MAX_BATCH: usize = 4096;
/// Bound of the queue of operations waiting for the committer.
pub const WRITE_QUEUE: usize = 16_384;
/// Most posts (and expired idempotency records) one trim operation removes
/// (a large trim runs as several).
pub const TRIM_STEP: u64 = 10_000;
/// How long an idempotency key answers with its first post (24 h).
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;
/// redb's page cache for the log, in bytes (its default, 1 GiB, would let
/// memory grow with the log).
pub const LOG_CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Longest pause between two attempts to reopen the log after a failed commit.
pub const REOPEN_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(2);

/// The log's database file.
pub const LOG_SPEC: DbSpec = DbSpec {
    file: LOG_FILE,
    holds: "the channel log (every channel, post and idempotency key)",
    cache_bytes: LOG_CACHE_BYTES,
    // The log can be large; it is checked record by record as it is read,
    // and in full by `herald check`.
    check_on_open: false,
};

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

fn unavailable(e: DbUnavailable) -> StoreError {
    match e {
        DbUnavailable::Closed => StoreError::Closed,
        DbUnavailable::Failed(why) => StoreError::Unavailable(why),
    }
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
    TrimAll {
        policy: TrimPolicy,
    },
    /// Stop after everything queued before it.
    Stop,
}

enum Outcome {
    Channel(ChannelInfo),
    Post(Post),
    Trimmed(u64),
    TrimmedAll(TrimReport),
    Stopped,
}

struct Op {
    kind: OpKind,
    reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

/// The redb-backed [`ChannelLog`].
pub struct RedbLog {
    db: Arc<Db>,
    /// False once closed: no new read can start.
    open: std::sync::RwLock<bool>,
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
    /// Committed events go to `sink`. A missing, empty or damaged log file
    /// of an existing data directory is an [`OpenError`] naming the file.
    pub fn open(data_dir: &Path, sink: EventSink) -> Result<Arc<RedbLog>, OpenError> {
        let db = Arc::new(Db::open(data_dir, LOG_SPEC)?);
        let damaged = |e: &dyn std::fmt::Display| OpenError::damaged(data_dir, &LOG_SPEC, e);
        let channels = Arc::new(DashMap::new());
        {
            let handle = db.get().map_err(|e| damaged(&e))?;
            create_tables(&handle).map_err(|e| damaged(&e))?;
            for info in load_channels(&handle).map_err(|e| damaged(&e))? {
                channels.insert(info.id.clone(), info);
            }
        }
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let committer = Committer {
            db: db.clone(),
            channels: channels.clone(),
            sink,
        };
        let handle = std::thread::Builder::new()
            .name("herald-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(|source| OpenError::Io {
                path: data_dir.join(LOG_FILE),
                source,
            })?;
        Ok(Arc::new(RedbLog {
            db,
            open: std::sync::RwLock::new(true),
            reads: TaskTracker::new(),
            channels,
            ops: tx,
            committer: std::sync::Mutex::new(Some(handle)),
        }))
    }

    /// The open database (tests reach into its tables).
    #[cfg(test)]
    fn database(&self) -> Arc<Database> {
        self.db.get().expect("log is open")
    }

    async fn submit(&self, kind: OpKind) -> Result<Outcome, StoreError> {
        // Refused at once while the file cannot take writes.
        if let Health::Unavailable { .. } = self.db.health() {
            if !matches!(kind, OpKind::Stop) {
                return Err(StoreError::Unavailable(self.db.health().to_string()));
            }
        }
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
                let guard = self.open.read().unwrap_or_else(|p| p.into_inner());
                if !*guard {
                    return Err(StoreError::Closed);
                }
                let db = self.db.get().map_err(unavailable)?;
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

    fn trim_all(&self, policy: TrimPolicy) -> LogFuture<'_, TrimReport> {
        Box::pin(async move {
            match self.submit(OpKind::TrimAll { policy }).await? {
                Outcome::TrimmedAll(r) => Ok(r),
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
            {
                let mut open = self.open.write().unwrap_or_else(|p| p.into_inner());
                if !*open {
                    return Ok(());
                }
                *open = false;
            }
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
            self.db.close();
            Ok(())
        })
    }

    fn health(&self) -> Health {
        self.db.health()
    }
}

fn create_tables(db: &Database) -> Result<(), redb::Error> {
    let txn = db.begin_write()?;
    txn.open_table(CHANNELS)?;
    txn.open_table(POSTS)?;
    txn.open_table(IDEMPOTENCY)?;
    txn.open_table(IDEMPOTENCY_BY_AGE)?;
    txn.commit()?;
    Ok(())
}

/// Every channel's metadata, from the file.
fn load_channels(db: &Database) -> Result<Vec<ChannelInfo>, StoreError> {
    let read = db.begin_read().map_err(storage)?;
    let table = read.open_table(CHANNELS).map_err(storage)?;
    let mut out = Vec::new();
    for entry in table.iter().map_err(storage)? {
        let (k, v) = entry.map_err(storage)?;
        out.push(decode_channel(k.value(), v.value())?);
    }
    Ok(out)
}

/// Reads every record of the log and reports what is damaged or
/// inconsistent (`herald check`): each channel record, each post (its
/// checksum and encoding; a retained seq with no post; a post of no
/// channel), and each idempotency record.
pub fn verify(db: &crate::datadir::CheckedDb) -> Result<crate::datadir::FileReport, StoreError> {
    let mut report = crate::datadir::FileReport {
        file: LOG_FILE.to_string(),
        ..Default::default()
    };
    let txn = db.begin_read().map_err(storage)?;
    let mut channels: HashMap<String, Option<ChannelInfo>> = HashMap::new();
    let table = txn.open_table(CHANNELS).map_err(storage)?;
    for entry in table.iter().map_err(storage)? {
        report.records += 1;
        match entry {
            Ok((k, v)) => match decode_channel(k.value(), v.value()) {
                Ok(info) => {
                    channels.insert(k.value().to_string(), Some(info));
                }
                Err(e) => {
                    report.note_damage(e.to_string());
                    channels.insert(k.value().to_string(), None);
                }
            },
            Err(e) => report.note_damage(format!("the channels table cannot be read on: {e}")),
        }
    }
    let posts = txn.open_table(POSTS).map_err(storage)?;
    let (mut post_count, mut expected) = (0u64, HashMap::<String, u64>::new());
    for entry in posts.iter().map_err(storage)? {
        report.records += 1;
        let (k, v) = match entry {
            Ok(kv) => kv,
            Err(e) => {
                report.note_damage(format!("the posts table cannot be read on: {e}"));
                break;
            }
        };
        let (ch, seq) = k.value();
        post_count += 1;
        let Some(slot) = channels.get(ch) else {
            report.note_damage(format!("post {ch}/{seq} belongs to no channel"));
            continue;
        };
        let Some(info) = slot else {
            continue;
        };
        if seq < info.oldest_seq || seq > info.head_seq {
            report.note_damage(format!(
                "post {ch}/{seq} is outside the channel's retained range {}..={}",
                info.oldest_seq, info.head_seq
            ));
        }
        if let Err(e) = decode_post(&info.id, info.epoch, seq, v.value()) {
            report.note_damage(e.to_string());
        }
        *expected.entry(ch.to_string()).or_default() += 1;
    }
    for (id, info) in &channels {
        let Some(info) = info else { continue };
        let retained = (info.head_seq + 1).saturating_sub(info.oldest_seq);
        let found = expected.get(id).copied().unwrap_or(0);
        if found < retained {
            report.note_damage(format!(
                "channel {id} should retain {retained} posts ({}..={}) but has {found}",
                info.oldest_seq, info.head_seq
            ));
        }
    }
    let idem = txn.open_table(IDEMPOTENCY).map_err(storage)?;
    let mut keys = 0u64;
    for entry in idem.iter().map_err(storage)? {
        report.records += 1;
        match entry {
            Ok((k, v)) => {
                keys += 1;
                if IdemRecord::decode(v.value()).is_err() {
                    let (ch, key) = k.value();
                    report.note_damage(format!("idempotency record {ch}/{key:?} is damaged"));
                }
            }
            Err(e) => {
                report.note_damage(format!("the idempotency table cannot be read on: {e}"));
                break;
            }
        }
    }
    report.summary = format!(
        "{} channels, {post_count} posts, {keys} idempotency keys",
        channels.len()
    );
    Ok(report)
}

/// Retained posts of `info` after `after_seq`, at most `limit`. A post
/// whose record is damaged is read as a `damaged` tombstone; if redb cannot
/// iterate the range (a damaged page), the posts are read one by one, and
/// those it cannot read become `damaged` tombstones too.
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
    let mut next = start;
    let scanned: Result<(), redb::StorageError> = (|| {
        for entry in table.range((ch, start)..=(ch, u64::MAX))?.take(limit) {
            let (k, v) = entry?;
            let seq = k.value().1;
            out.push(post_or_damaged(info, seq, v.value()));
            next = seq.saturating_add(1);
        }
        Ok(())
    })();
    if let Err(e) = scanned {
        tracing::error!(channel = %info.id, after = next, error = %e, "cannot read the log's posts in order; reading them one by one");
        while out.len() < limit && next <= info.head_seq {
            match table.get((ch, next)) {
                Ok(Some(v)) => out.push(post_or_damaged(info, next, v.value())),
                Ok(None) => {}
                Err(_) => out.push(damaged_post(&info.id, info.epoch, next)),
            }
            next += 1;
        }
    }
    Ok(out)
}

fn post_or_damaged(info: &ChannelInfo, seq: u64, bytes: &[u8]) -> Post {
    match decode_post(&info.id, info.epoch, seq, bytes) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "serving a damaged post as a tombstone; run `herald check`");
            metrics::counter!(crate::metrics::DAMAGED_RECORDS).increment(1);
            damaged_post(&info.id, info.epoch, seq)
        }
    }
}

/// The thread that owns all writes.
struct Committer {
    db: Arc<Db>,
    channels: Arc<DashMap<ChannelId, ChannelInfo>>,
    sink: EventSink,
}

/// How [`Committer::recover`] ended.
enum Recovery {
    /// The log takes writes again.
    Reopened,
    /// A Stop came (answer it and end).
    Stop(Op),
    /// The log was dropped (end).
    Dropped,
}

/// What one batch produced, before it is known to be durable.
struct Applied {
    results: Vec<Result<Outcome, StoreError>>,
    events: Vec<LogEvent>,
    changed: HashMap<ChannelId, ChannelInfo>,
    /// Whether anything was written (a batch that wrote nothing is not
    /// committed: no fsync for nothing).
    dirty: bool,
}

impl Committer {
    fn run(self, mut rx: mpsc::Receiver<Op>) {
        let mut batch: Vec<Op> = Vec::with_capacity(256);
        let mut stop = None;
        loop {
            if self.db.is_failed() {
                match self.recover(&mut rx) {
                    Recovery::Reopened => continue,
                    Recovery::Stop(op) => {
                        let _ = op.reply.send(Ok(Outcome::Stopped));
                        return;
                    }
                    Recovery::Dropped => return,
                }
            }
            let Some(first) = rx.blocking_recv() else {
                return;
            };
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

    /// After a failed commit: reopens the file (with a growing pause between
    /// attempts), answering every operation queued meanwhile with
    /// `Unavailable`, until it takes writes again, a Stop comes, or the log
    /// is dropped.
    fn recover(&self, rx: &mut mpsc::Receiver<Op>) -> Recovery {
        let mut pause = std::time::Duration::from_millis(50);
        loop {
            // Answer what is queued (refused at once; nothing was written).
            loop {
                match rx.try_recv() {
                    Ok(op) if matches!(op.kind, OpKind::Stop) => return Recovery::Stop(op),
                    Ok(op) => {
                        let _ = op
                            .reply
                            .send(Err(StoreError::Unavailable(self.db.health().to_string())));
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Recovery::Dropped,
                }
            }
            match self.db.try_reopen() {
                Ok(()) => {
                    self.reload();
                    return Recovery::Reopened;
                }
                Err(e) => tracing::debug!(error = %e, "log not reopened yet"),
            }
            // Sleep in short steps, so a Stop is not kept waiting.
            let until = std::time::Instant::now() + pause;
            while std::time::Instant::now() < until {
                std::thread::sleep(std::time::Duration::from_millis(20));
                if !rx.is_empty() {
                    break;
                }
            }
            pause = (pause * 2).min(REOPEN_BACKOFF_MAX);
        }
    }

    /// Reloads channel metadata from the reopened file. A commit reported as
    /// failed may have reached the disk all the same: its posts keep their
    /// seqs and are fanned out now, so followers get them live.
    fn reload(&self) {
        let loaded = match self.db.get().map_err(unavailable).and_then(|db| {
            let infos = load_channels(&db)?;
            let mut events = Vec::new();
            for info in &infos {
                let cached_head = self.channels.get(&info.id).map_or(0, |c| c.head_seq);
                if info.head_seq > cached_head {
                    let lost = (info.head_seq - cached_head) as usize;
                    for p in read_range(&db, info, cached_head, lost)? {
                        events.push(LogEvent::Posted(p));
                    }
                }
            }
            Ok((infos, events))
        }) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "reloading channels after the reopen failed");
                self.db.failed(e);
                return;
            }
        };
        let (infos, events) = loaded;
        let ids: std::collections::HashSet<ChannelId> =
            infos.iter().map(|i| i.id.clone()).collect();
        self.channels.retain(|id, _| ids.contains(id));
        for info in infos {
            self.channels.insert(info.id.clone(), info);
        }
        if !events.is_empty() {
            tracing::warn!(
                posts = events.len(),
                "posts whose commit was reported as failed reached the disk; fanning them out"
            );
            let sink = &self.sink;
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sink(&events))).is_err() {
                tracing::error!("fan-out panicked; followers will catch up from the log");
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
                // Nothing of this batch is acknowledged; the file is
                // reopened before the next one (see the module docs).
                tracing::error!(error = %e, ops = batch.len(), "log commit failed");
                self.db.failed(&e);
                let answer = StoreError::Unavailable(format!(
                    "the log cannot take writes: {e}; nothing of this request was stored or it will be found by an Idempotency-Key retry"
                ));
                for op in batch.drain(..) {
                    let _ = op.reply.send(Err(answer.clone()));
                }
            }
        }
    }

    /// Applies a batch in one durable transaction.
    fn apply(&self, ops: &[&OpKind]) -> Result<Applied, StoreError> {
        let db = self.db.get().map_err(unavailable)?;
        let txn = db.begin_write().map_err(storage)?;
        let mut out = Applied {
            results: Vec::with_capacity(ops.len()),
            events: Vec::new(),
            changed: HashMap::new(),
            dirty: false,
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
        if out.dirty || !out.changed.is_empty() {
            txn.commit().map_err(storage)?;
        } else {
            txn.abort().map_err(storage)?;
        }
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
                                // A damaged first post still has its identity.
                                Some(v) => decode_post(channel, rec.epoch, rec.seq, v.value()).ok(),
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
                    damaged: false,
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
                let p = self.update_post(channel, *seq, posts, out, false, |p| {
                    p.text = text.clone();
                    p.edited_at_ms = now;
                })?;
                out.events.push(LogEvent::Edited(p.clone()));
                Ok(Outcome::Post(p))
            }
            OpKind::Delete { channel, seq } => {
                let p = self.update_post(channel, *seq, posts, out, true, |p| {
                    p.text.clear();
                    p.media.clear();
                    p.deleted = true;
                    p.edited_at_ms = now;
                })?;
                out.events.push(LogEvent::Deleted(p.clone()));
                Ok(Outcome::Post(p))
            }
            OpKind::Trim { channel, policy } => {
                let (removed, _) =
                    self.trim_channel(channel, policy, TRIM_STEP, now, tables, out)?;
                Ok(Outcome::Trimmed(removed))
            }
            OpKind::TrimAll { policy } => {
                // One transaction for every channel; a channel with nothing
                // to trim is only looked at (no write, and a pass that
                // changes nothing commits nothing).
                let mut report = TrimReport::default();
                let mut budget = TRIM_STEP;
                let ids: Vec<ChannelId> = self.channels.iter().map(|c| c.key().clone()).collect();
                for id in ids {
                    if budget == 0 {
                        report.more = true;
                        break;
                    }
                    let (posts_removed, keys_expired) =
                        self.trim_channel(&id, policy, budget, now, tables, out)?;
                    report.posts_removed += posts_removed;
                    report.keys_expired += keys_expired;
                    if posts_removed > 0 {
                        report.channels_trimmed += 1;
                    }
                    budget = budget.saturating_sub(posts_removed + keys_expired);
                }
                report.more |= budget == 0;
                Ok(Outcome::TrimmedAll(report))
            }
            OpKind::Stop => Err(StoreError::Closed),
        }
    }

    /// Trims one channel by `policy`, removing at most `budget` posts and
    /// expired idempotency records; returns (posts, records) removed. Writes
    /// nothing (and marks nothing changed) when there is nothing to remove.
    fn trim_channel(
        &self,
        channel: &ChannelId,
        policy: &TrimPolicy,
        budget: u64,
        now: i64,
        tables: &mut Tables<'_>,
        out: &mut Applied,
    ) -> Result<(u64, u64), StoreError> {
        let Some(mut info) = out
            .changed
            .get(channel)
            .cloned()
            .or_else(|| self.channels.get(channel).map(|c| c.clone()))
        else {
            return Err(StoreError::UnknownChannel(channel.clone()));
        };
        let mut removed = 0;
        while info.oldest_seq <= info.head_seq && removed < budget {
            let over_count =
                policy.keep_max > 0 && info.head_seq - info.oldest_seq + 1 > policy.keep_max;
            let too_old = match post_age(&tables.posts, &info, info.oldest_seq)? {
                Age::Missing => true,
                Age::At(t) => t < policy.older_than_ms,
                // A damaged post's age is unknown: seqs grow with time, so
                // it is as old as the post after it, at least.
                Age::Damaged => match post_age(&tables.posts, &info, info.oldest_seq + 1)? {
                    Age::At(t) => t < policy.older_than_ms,
                    Age::Missing | Age::Damaged => false,
                },
            };
            if !(over_count || too_old) {
                break;
            }
            tables
                .posts
                .remove((channel.as_str(), info.oldest_seq))
                .map_err(storage)?;
            info.oldest_seq += 1;
            removed += 1;
        }
        if removed > 0 {
            out.changed.insert(channel.clone(), info);
            out.dirty = true;
        }
        let expired = expire_idempotency(
            tables,
            channel,
            now - IDEMPOTENCY_TTL_MS,
            budget.saturating_sub(removed),
        )?;
        if expired > 0 {
            out.dirty = true;
        }
        Ok((removed, expired))
    }

    fn update_post(
        &self,
        channel: &ChannelId,
        seq: u64,
        posts: &mut redb::Table<'_, (&str, u64), &[u8]>,
        out: &mut Applied,
        deleting: bool,
        change: impl FnOnce(&mut Post),
    ) -> Result<Post, StoreError> {
        let info = self.working(&mut out.changed, channel)?;
        let not_found = || StoreError::PostNotFound {
            channel: channel.clone(),
            seq,
        };
        let mut p = match posts.get((channel.as_str(), seq)).map_err(storage)? {
            Some(v) => match decode_post(channel, info.epoch, seq, v.value()) {
                Ok(p) => p,
                // Deleting a damaged post replaces it with a sound
                // tombstone; editing it cannot (its text is lost).
                Err(StoreError::Damaged(_)) if deleting => {
                    let mut t = damaged_post(channel, info.epoch, seq);
                    t.damaged = false;
                    t.deleted = false;
                    t
                }
                Err(e) => return Err(e),
            },
            None => return Err(not_found()),
        };
        if p.deleted {
            return Err(not_found());
        }
        change(&mut p);
        out.dirty = true;
        posts
            .insert((channel.as_str(), seq), encode_post(&p).as_slice())
            .map_err(storage)?;
        Ok(p)
    }
}

/// How old a post is, as far as its record tells.
enum Age {
    /// No such post (trimmed already).
    Missing,
    /// Its record is damaged.
    Damaged,
    /// Created at this time (Unix milliseconds).
    At(i64),
}

fn post_age(
    posts: &redb::Table<'_, (&'static str, u64), &'static [u8]>,
    info: &ChannelInfo,
    seq: u64,
) -> Result<Age, StoreError> {
    Ok(match posts.get((info.id.as_str(), seq)).map_err(storage)? {
        None => Age::Missing,
        Some(v) => match decode_post(&info.id, info.epoch, seq, v.value()) {
            Ok(p) => Age::At(p.created_at_ms),
            Err(_) => Age::Damaged,
        },
    })
}

/// The tables one batch writes.
struct Tables<'txn> {
    posts: redb::Table<'txn, (&'static str, u64), &'static [u8]>,
    idem: redb::Table<'txn, (&'static str, &'static str), &'static [u8]>,
    idem_age: redb::Table<'txn, (&'static str, i64, &'static str), ()>,
}

/// Removes up to `budget` of `channel`'s idempotency records created before
/// `cutoff_ms`.
fn expire_idempotency(
    tables: &mut Tables<'_>,
    channel: &ChannelId,
    cutoff_ms: i64,
    budget: u64,
) -> Result<u64, StoreError> {
    if budget == 0 {
        return Ok(0);
    }
    let ch = channel.as_str();
    let mut old: Vec<(i64, String)> = Vec::new();
    for entry in tables
        .idem_age
        .range((ch, i64::MIN, "")..(ch, cutoff_ms, ""))
        .map_err(storage)?
        .take(budget as usize)
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
        let corrupt = || {
            StoreError::Damaged(
                "this Idempotency-Key's record is damaged; retry with a new key after checking the channel's history".into(),
            )
        };
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
            damaged: false,
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

    #[tokio::test]
    async fn one_retention_pass_trims_every_channel_and_expires_keys() {
        let dir = tempfile::tempdir().unwrap();
        let log = RedbLog::open(dir.path(), Arc::new(|_: &[LogEvent]| {})).unwrap();
        let post = || NewPost::new("x".into(), vec![]).unwrap();
        for (name, posts) in [("a", 5u64), ("b", 2), ("c", 0)] {
            let ch = ChannelId::parse(name).unwrap();
            log.create_channel(ch.clone(), String::new()).await.unwrap();
            for i in 0..posts {
                log.append(ch.clone(), post(), Some(format!("k{i}")))
                    .await
                    .unwrap();
            }
        }
        for k in ["k0", "k1"] {
            age(&log, "a", k, IDEMPOTENCY_TTL_MS + 1000);
        }
        age(&log, "b", "k0", IDEMPOTENCY_TTL_MS + 1000);
        let keep_two = TrimPolicy {
            older_than_ms: i64::MIN,
            keep_max: 2,
        };
        let r = log.trim_all(keep_two).await.unwrap();
        assert_eq!(
            r,
            TrimReport {
                posts_removed: 3,
                keys_expired: 3,
                channels_trimmed: 1,
                more: false
            }
        );
        assert_eq!(records(&log), (4, 4));
        let a = log.channel(&ChannelId::parse("a").unwrap()).unwrap();
        assert_eq!((a.oldest_seq, a.head_seq), (4, 5));
        // Nothing is due now: nothing is removed (and nothing written).
        let r = log.trim_all(keep_two).await.unwrap();
        assert_eq!(r, TrimReport::default());
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
