//! The feed: everything that flows from the log to one follower.
//!
//! ```text
//!  log ──(committed events)──▶ hub (fan-out) ──▶ Outbox ──▶ FeedWriter ──▶ FeedSink
//!                                                  (per session)            (QUIC stream)
//!  log ◀──────────── catch-up, gap fill, edit re-send ─────────┘
//! ```
//!
//! - [`FeedEvent`]: a committed post, edit, delete or promoted post, encoded
//!   into its frame once and shared by every follower's queue.
//! - [`frames`]: the frame builders for what the log holds.
//! - [`Outbox`]: a session's bounded queue (bounded in bytes); an event that
//!   does not fit marks the follower lagged instead of blocking anyone.
//! - [`FeedWriter`]: drains the queue into a [`FeedSink`] and keeps the
//!   delivery promise (every post once, in order, no gap); the argument for
//!   why catch-up and live delivery meet without gap or duplicate is written
//!   once, in [`writer`]. While it is idle, its [`LiveFeed`] lets the
//!   transport's event loop drain live events itself, with the same
//!   decisions and no task wake-up.
//! - [`promoted`]: the traits through which the promoted slot attaches to a
//!   fan-out without the feed knowing the promo engine.
//!
//! This module sits below both the hub (which pushes into queues) and the
//! session (which runs a writer per connection); it imports neither.

mod event;
#[cfg(feature = "fault-injection")]
mod fault;
pub mod frames;
pub mod promoted;
mod queue;
mod sink;
pub mod writer;

pub use event::{EventKind, FeedEvent};
pub use promoted::{CatchupSlots, DurableFuture, Impression, NoPromotions, PromotedSlot};
pub use queue::{ControlRefused, Item, LiveWaker, Outbox, MAX_PENDING_CONTROL};
pub use sink::{FeedSink, MemorySink};
pub use writer::{
    flush_live_metrics, CatchupBudget, FeedDeps, FeedError, FeedStats, FeedWriter, LagPolicy,
    LiveFeed, MAX_DRAIN,
};

#[cfg(test)]
mod tests;
