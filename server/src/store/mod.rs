//! The channel log: channels, their posts by seq, edits and tombstones.
//!
//! [`ChannelLog`] is the interface the rest of the server uses; [`RedbLog`]
//! is the embedded implementation (one redb file in the data directory, group
//! commit on a dedicated thread), the default; [`JetStreamLog`] is the cluster
//! mode's (one replicated NATS JetStream stream shared by every Herald node,
//! see [`jetstream`]).
//!
//! Promises kept by every implementation:
//! - `seq` starts at 1 and grows by exactly one per post; edits and deletes are
//!   events on an existing seq, never a hole.
//! - A write's future resolves only after the write is durable.
//! - Committed changes reach the [`EventSink`] exactly once each, in commit
//!   order, before the writer is answered.
//! - An append with an idempotency key seen in the last 24 h posts nothing
//!   and answers with the first post.
//! - A write that is not stored is never answered as stored: a failed commit
//!   answers [`StoreError::Unavailable`].

pub mod jetstream;
mod records;
mod redb_log;

pub use jetstream::JetStreamLog;

pub use redb_log::{
    verify, RedbLog, IDEMPOTENCY_TTL_MS, LOG_CACHE_BYTES, LOG_FILE, LOG_SPEC, MAX_BATCH,
    REOPEN_BACKOFF_MAX, TRIM_STEP, WRITE_QUEUE,
};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use crate::model::{ChannelId, ChannelInfo, NewPost, Post};

/// A boxed future returned by [`ChannelLog`] methods.
pub type LogFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A committed change, handed to the [`EventSink`] in commit order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// A new post.
    Posted(Post),
    /// A post whose text was replaced (`edited_at_ms` set).
    Edited(Post),
    /// A post turned into a tombstone (`deleted`, no text or media).
    Deleted(Post),
}

/// Receives committed changes, in commit order, on the committing thread.
/// It must not block for long: it is the fan-out entry point.
pub type EventSink = Arc<dyn Fn(&[LogEvent]) + Send + Sync>;

/// Which posts a trim removes: those older than `older_than_ms`, and the
/// oldest ones beyond `keep_max` posts (0: no count limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrimPolicy {
    /// Posts created before this time, in Unix milliseconds, are removed;
    /// `i64::MIN`: no age limit.
    pub older_than_ms: i64,
    /// Only this many of the newest posts are kept; 0: no count limit.
    pub keep_max: u64,
}

/// What one retention pass over every channel did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrimReport {
    /// Posts removed.
    pub posts_removed: u64,
    /// Expired idempotency records removed.
    pub keys_expired: u64,
    /// Channels that had posts removed.
    pub channels_trimmed: u64,
    /// The pass stopped at its bound ([`TRIM_STEP`] removals): run another.
    pub more: bool,
}

/// A log operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// No channel has this id.
    #[error("unknown channel {0}")]
    UnknownChannel(ChannelId),
    /// A channel with this id exists already.
    #[error("channel {0} already exists")]
    ChannelExists(ChannelId),
    /// The channel has no retained post at this seq (never posted, or trimmed).
    #[error("channel {channel} has no post {seq}")]
    PostNotFound {
        /// The channel.
        channel: ChannelId,
        /// The seq asked for.
        seq: u64,
    },
    /// The log was closed ([`ChannelLog::close`]).
    #[error("the log is shut down")]
    Closed,
    /// The storage engine failed; the text says how.
    #[error("storage error: {0}")]
    Storage(String),
    /// The log cannot take writes right now (a write failed, say on a full
    /// disk); it reopens itself once it can, and nothing was stored by the
    /// request. Retry later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// A stored record is damaged (its checksum does not match, or it does
    /// not decode); `herald check` lists every damaged record.
    #[error("{0}")]
    Damaged(String),
}

/// The channel log interface.
pub trait ChannelLog: Send + Sync + 'static {
    /// Creates a channel (epoch 1, no posts).
    fn create_channel(&self, id: ChannelId, title: String) -> LogFuture<'_, ChannelInfo>;
    /// A channel's current metadata and head, if it exists.
    fn channel(&self, id: &ChannelId) -> Option<ChannelInfo>;
    /// Every channel.
    fn channels(&self) -> Vec<ChannelInfo>;
    /// Appends a post; resolves once durable, with its seq.
    ///
    /// With an `idempotency_key`, an append whose key was already used on
    /// this channel within [`IDEMPOTENCY_TTL_MS`] posts nothing and resolves
    /// with the first post (same seq). The key's record commits in the same
    /// transaction as the post, so the promise holds across a crash; expired
    /// records are removed by [`ChannelLog::trim`].
    fn append(
        &self,
        channel: ChannelId,
        post: NewPost,
        idempotency_key: Option<String>,
    ) -> LogFuture<'_, Post>;
    /// Replaces a post's text; resolves once durable.
    fn edit(&self, channel: ChannelId, seq: u64, text: String) -> LogFuture<'_, Post>;
    /// Turns a post into a tombstone; resolves once durable.
    fn delete(&self, channel: ChannelId, seq: u64) -> LogFuture<'_, Post>;
    /// Retained posts with seq > `after_seq`, oldest first, at most `limit`.
    fn read(&self, channel: ChannelId, after_seq: u64, limit: usize) -> LogFuture<'_, Vec<Post>>;
    /// Removes posts by `policy`; resolves with how many were removed.
    fn trim(&self, channel: ChannelId, policy: TrimPolicy) -> LogFuture<'_, u64>;
    /// One retention pass over every channel, in one durable write (none if
    /// nothing is to be removed): removes posts by `policy` and expired
    /// idempotency records, at most [`TRIM_STEP`] in all; run it again while
    /// the report says `more`.
    fn trim_all(&self, policy: TrimPolicy) -> LogFuture<'_, TrimReport>;
    /// Whether the log can take writes now.
    fn health(&self) -> crate::datadir::Health;
    /// Finishes the writes already queued, waits for reads in flight, and
    /// releases the log's files. Every later call fails with
    /// [`StoreError::Closed`].
    fn close(&self) -> LogFuture<'_, ()>;
}

#[cfg(test)]
mod tests;
