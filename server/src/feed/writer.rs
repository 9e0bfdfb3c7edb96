//! The feed writer: drains a session's [`Outbox`] into the follower's
//! [`FeedSink`] (its QUIC feed stream, or memory in tests), and keeps the
//! delivery promise: per channel, every post once, in seq order, no gap.
//!
//! It owns, per followed channel, the seq of the last post written (the
//! cursor). A post at or below the cursor is a duplicate and skipped; a post
//! above `cursor + 1` means the follower missed something (its queue
//! overflowed), so the gap is first filled from the log. A channel whose
//! queue overflowed is caught up from the log as soon as the queue has been
//! drained, and edits or deletes that did not fit are re-sent from the log
//! for the posts the follower already has.
//!
//! # Why catch-up and live meet with no gap and no duplicate
//!
//! This is the one place the argument is made; the pieces it relies on are:
//!
//! 1. The log (`store`) updates a channel's head *before* it hands the
//!    committed events to the fan-out, and hands them over in commit order.
//! 2. The hub registers a session as a follower and queues the session's
//!    `Follow` item in the same critical section (one bucket lock), and fans
//!    each event out to a bucket under that same lock. So every event fanned
//!    out after the registration lands in the queue *behind* the Follow item,
//!    and every event fanned out before it is not in the queue at all.
//! 3. The writer reads the channel's head only when it handles the Follow
//!    item, i.e. after the registration.
//!
//! Take any post `p` of the channel with seq above the follower's starting
//! position. Either the fan-out of `p` happened before the registration:
//! then, by (1), the head already covered `p` when the writer read it (3),
//! so `p` comes from the log during the catch-up. Or it happened after: then
//! by (2) `p` is in the queue behind the Follow item and comes live. Both
//! can happen (the head read may already cover a post that is also queued);
//! the cursor drops the second copy. Live events reach the queue in seq
//! order (1, 2), so a live post above `cursor + 1` can only mean that the
//! queue overflowed and dropped something, which the gap fill repairs from
//! the log before writing the post. An overflow that dropped the *last*
//! events of a channel leaves no later post to reveal the gap: the queue
//! reports the channel as lagged instead, and the writer catches it up to
//! the head once the queue is drained.
//!
//! Frames are written in batches: everything drained at once goes out in one
//! `write_all_chunks` call, and the frame and byte counters are added once per
//! such flush.
//!
//! # The live path
//!
//! Most of the time a follower only needs the next post of each channel
//! written: no log read, no waiting. For that the writer can hand its state
//! (the cursors, [`Core`]) to a [`LiveFeed`] while it has nothing else to do;
//! the transport's event loop then drains the queue itself, on its own
//! thread, through [`LiveFeed::pull`] — one loop turn for a whole fan-out
//! round instead of one task wake-up per follower. Every item is still
//! decided by the same code ([`Core::handle`]), so the argument above holds
//! for both paths; the live path simply stops, leaving the item at the front
//! of the queue, at anything that needs the log or may wait (a Follow, a gap,
//! a lag, a promoted post — its impression is made durable before its frame
//! goes out —, the close), and hands the queue back to the task, which continues
//! exactly where it stopped. Exactly one of the two drains at any time (the
//! queue's `live` flag, see `queue`), and frames leave in queue order:
//! the task goes live only after its last flush was accepted by the sink, and
//! the transport pulls only when everything the task wrote has gone into the
//! stream.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use herald_proto::encode_frame;

use super::event::{EventKind, FeedEvent};
use super::frames::{deleted_frame, edited_frame, post_frame, reset_frame};
use super::promoted::{CatchupSlots, Impression};
use super::queue::{Item, Outbox};
use super::sink::FeedSink;
use crate::model::{ChannelId, FollowRequest};
use crate::store::{ChannelLog, StoreError};

/// Most queued items the writer takes at once.
pub const MAX_DRAIN: usize = 1024;

/// Batch buffers larger than this (in items) are released after the batch,
/// so idle sessions hold none; buffers start empty and grow on first use.
const IDLE_CAPACITY: usize = 64;

/// Why the feed writer stopped.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// Writing to the feed stream failed (the follower is gone).
    #[error("feed stream write failed: {0}")]
    Write(#[from] std::io::Error),
    /// Reading the log for a catch-up or gap fill failed.
    #[error("log read failed: {0}")]
    Log(#[from] StoreError),
    /// The follower overflowed its queue more often than the [`LagPolicy`]
    /// allows.
    #[error("lagged {count} times within {window:?}")]
    LaggingTooOften {
        /// Overflow episodes within `window` (more than [`LagPolicy::max_events`]).
        count: usize,
        /// The policy's window.
        window: Duration,
    },
}

/// Counters a writer reports.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FeedStats {
    /// Frames written from the queue (live).
    pub live_frames: u64,
    /// Posts written from the log (catch-up, gap fill).
    pub catchup_frames: u64,
    /// Overflow episodes (each counts once, however many channels it hit).
    pub lag_events: u64,
}

/// Disconnect rule for followers that lag again and again.
#[derive(Debug, Clone, Copy)]
pub struct LagPolicy {
    /// More overflow episodes than this ...
    pub max_events: u32,
    /// ... within this window end the session (`lagging_too_often`).
    pub window: Duration,
}

/// What a feed writer needs besides its sink and queue.
pub struct FeedDeps {
    /// The log, for catch-up and gap fill.
    pub log: Arc<dyn ChannelLog>,
    /// The promoted post at the end of a catch-up.
    pub slots: Arc<dyn CatchupSlots>,
    /// The follower's id (for frequency caps).
    pub follower: String,
    /// The follower's client confirms promoted posts with Seen (it said so
    /// in Hello).
    pub receipts: bool,
    /// The follower takes live posts as QUIC datagrams (protocol §8.5): the
    /// live path hands its posts out as datagrams and writes Head frames.
    pub live_datagrams: bool,
    /// Posts read from the log per catch-up step.
    pub catchup_batch: usize,
    /// When to give up on a follower that keeps lagging.
    pub lag_policy: LagPolicy,
    /// Catch-up steps (a log read and its encoding) in progress server-wide;
    /// see [`CatchupBudget`].
    pub catchups: CatchupBudget,
}

/// The global bound on catch-up memory: every catch-up step (reading up to
/// `catchup_batch` posts from the log and encoding them) holds one permit
/// while the decoded posts exist. With `n` permits, at most `n` steps'
/// worth of decoded posts exist at once, however many followers replay
/// history at the same time; further steps wait their turn (those followers
/// get their history later; live delivery is not affected). The encoded
/// frames are written after the permit is released and are bounded per
/// session like the live queue (`session_queue_bytes`). A step never holds
/// a permit while writing to a (possibly slow) follower.
#[derive(Clone, Debug)]
pub struct CatchupBudget(Arc<tokio::sync::Semaphore>);

impl CatchupBudget {
    /// At most `steps` catch-up steps at once (at least 1).
    pub fn new(steps: usize) -> CatchupBudget {
        CatchupBudget(Arc::new(tokio::sync::Semaphore::new(steps.max(1))))
    }

    /// Steps that may start now without waiting.
    pub fn available(&self) -> usize {
        self.0.available_permits()
    }

    async fn step(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.0.acquire().await.ok()
    }
}

/// What a queued item needs before it can be written.
#[derive(Debug)]
enum Step {
    /// Handled: its frame (if any) is in `Core::chunks`.
    Done,
    /// The follower missed posts of `channel` up to `upto`: fill them from
    /// the log first, then handle the item again.
    Gap {
        /// The channel.
        channel: ChannelId,
        /// The last missing seq.
        upto: u64,
    },
    /// A follow: pick the start and catch up from the log.
    Follow(FollowRequest),
    /// A promoted post met by the live path: its impression must be durable
    /// before the frame goes out, which may wait, so the task handles it.
    Promoted,
    /// Write posts `from..=to` of `channel` again, from the log.
    Resend {
        /// The channel.
        channel: ChannelId,
        /// The first seq.
        from: u64,
        /// The last seq.
        to: u64,
    },
}

/// The writer's state both paths use: per channel the seq of the last post
/// written, and the frames (with their promoted impressions) of the batch
/// being written.
pub struct Core {
    cursors: HashMap<ChannelId, u64>,
    chunks: Vec<Bytes>,
    /// Live posts the live path hands out as datagrams
    /// ([`FeedDeps::live_datagrams`]); always empty otherwise.
    datagrams: Vec<Bytes>,
    live_datagrams: bool,
    /// Promoted impressions in `chunks`, counted once they are written.
    claims: Vec<Box<dyn Impression>>,
    follower: String,
    /// The follower's client confirms promoted posts ([`FeedDeps::receipts`]).
    receipts: bool,
    stats: FeedStats,
    /// The live path met something for the task after handing out frames:
    /// it hands the queue over on its next pull, once those frames are in
    /// the stream (see [`LiveFeed::pull`]).
    hand_over_due: bool,
}

impl Core {
    fn new(follower: String, receipts: bool, live_datagrams: bool) -> Core {
        Core {
            cursors: HashMap::new(),
            chunks: Vec::new(),
            datagrams: Vec::new(),
            live_datagrams,
            claims: Vec::new(),
            follower,
            receipts,
            stats: FeedStats::default(),
            hand_over_due: false,
        }
    }

    /// Decides one queued item (see the module docs). Changes nothing unless
    /// it returns [`Step::Done`]. `live`: called by the live path, which
    /// cannot wait (so it leaves promoted posts to the task).
    fn handle(&mut self, item: &Item, live: bool) -> Step {
        let ev = match item {
            Item::Follow(req) => return Step::Follow(req.clone()),
            Item::Unfollow(ch) => {
                self.cursors.remove(ch);
                return Step::Done;
            }
            Item::Resend { channel, from, to } => {
                return Step::Resend {
                    channel: channel.clone(),
                    from: *from,
                    to: *to,
                }
            }
            Item::Event(ev) => ev,
        };
        let Some(cur) = self.cursors.get_mut(&ev.channel) else {
            return Step::Done;
        };
        match ev.kind {
            EventKind::Post => {
                if ev.seq <= *cur {
                    return Step::Done;
                }
                if ev.seq > *cur + 1 {
                    return Step::Gap {
                        channel: ev.channel.clone(),
                        upto: ev.seq - 1,
                    };
                }
                *cur = ev.seq;
                #[cfg(feature = "fault-injection")]
                if super::fault::skip_delivery() {
                    return Step::Done;
                }
                // Datagrams only from the live path: the task writes what
                // follows a catch-up or gap fill, rare, and on the stream.
                if live && self.live_datagrams {
                    self.datagrams.push(ev.frame.clone());
                } else {
                    self.chunks.push(ev.frame.clone());
                }
                self.stats.live_frames += 1;
            }
            EventKind::Head => {
                if self.live_datagrams && ev.seq <= *cur {
                    self.chunks.push(ev.frame.clone());
                }
            }
            EventKind::Promoted if live => return Step::Promoted,
            EventKind::Promoted => {
                self.claim_promoted(ev);
            }
            EventKind::Edit | EventKind::Delete => {
                // A post the follower has not seen yet comes from the log in
                // its current state instead.
                if ev.seq <= *cur {
                    self.chunks.push(ev.frame.clone());
                    self.stats.live_frames += 1;
                }
            }
        }
        Step::Done
    }

    /// Claims this follower's impression of a promoted event and queues its
    /// frame (the follower's own, with its receipt, when it has one); false
    /// when the cap or the reservation says no.
    fn claim_promoted(&mut self, ev: &FeedEvent) -> bool {
        let Some(claim) = ev
            .slot
            .as_ref()
            .and_then(|s| s.claim(&self.follower, self.receipts))
        else {
            return false;
        };
        self.chunks
            .push(claim.frame().unwrap_or_else(|| ev.frame.clone()));
        self.claims.push(claim);
        true
    }

    /// Moves a followed channel's cursor to `seq` (no-op if it was
    /// unfollowed meanwhile). On the per-delivery path: no key clone.
    fn advance(&mut self, ch: &ChannelId, seq: u64) {
        if let Some(cur) = self.cursors.get_mut(ch) {
            *cur = seq;
        }
    }

    /// The batch was accepted by the sink: its promoted frames (counted
    /// before the write, see [`FeedWriter::flush`]) are impressions for good.
    fn written(&mut self) {
        self.chunks.clear();
        for claim in self.claims.drain(..) {
            claim.confirm();
        }
    }
}

thread_local! {
    /// Frames and bytes written, and queue bytes drained, by the live path
    /// on this thread since the last [`flush_live_metrics`].
    static LIVE_COUNTS: Cell<(u64, u64, u64)> = const { Cell::new((0, 0, 0)) };
    /// The items a pull peeked (reused by every pull on this thread; empty
    /// between pulls).
    static PEEKED: RefCell<Vec<Item>> = const { RefCell::new(Vec::new()) };
}

/// Adds what the live path counted on this thread to the metrics, once (the
/// transport's loop calls it once per turn, so metrics are per batch, never
/// per delivery).
pub fn flush_live_metrics() {
    let (frames, bytes, drained) = LIVE_COUNTS.with(|c| c.replace((0, 0, 0)));
    if frames > 0 {
        metrics::counter!(crate::metrics::FRAMES_DELIVERED).increment(frames);
        metrics::counter!(crate::metrics::BYTES_DELIVERED).increment(bytes);
    }
    if drained > 0 {
        metrics::gauge!(crate::metrics::QUEUE_BYTES).decrement(drained as f64);
    }
}

/// The writer's live path, shared with the transport (see the module docs).
pub struct LiveFeed {
    outbox: Arc<Outbox>,
    /// The writer's state while it is live; `None` while the task has it.
    core: Mutex<Option<Core>>,
}

impl LiveFeed {
    fn core(&self) -> MutexGuard<'_, Option<Core>> {
        // Only the live path and the task's hand-over lock it, never both
        // at once for long, and every update leaves the state consistent.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by the transport's loop when the follower's feed stream can
    /// take `room` bytes: moves the frames of the live events at the front of
    /// the queue (about `room` bytes of them) into `out`, the posts to go as
    /// datagrams ([`FeedDeps::live_datagrams`]) into `datagrams`, and returns
    /// whether more may be waiting. Never waits. Does nothing while the task
    /// drains.
    ///
    /// Frames handed out here go into the stream before anything the task
    /// writes after it takes the queue back: when something needs the task,
    /// a pull that handed out frames keeps the queue and says "more"; the
    /// next pull — which the transport makes only once those frames are in
    /// the stream — hands the queue over.
    pub fn pull(&self, room: usize, out: &mut Vec<Bytes>, datagrams: &mut Vec<Bytes>) -> bool {
        let mut guard = self.core();
        let Some(core) = guard.as_mut() else {
            return false;
        };
        if core.hand_over_due {
            core.hand_over_due = false;
            self.outbox.live_commit(0, true, true);
            return false;
        }
        PEEKED.with_borrow_mut(|items| self.pull_peeked(core, room, items, out, datagrams))
    }

    fn pull_peeked(
        &self,
        core: &mut Core,
        room: usize,
        items: &mut Vec<Item>,
        out: &mut Vec<Bytes>,
        datagrams: &mut Vec<Bytes>,
    ) -> bool {
        items.clear();
        if self.outbox.live_peek(room, items).is_none() {
            return false;
        }
        // The frames go straight into the caller's buffers (lent to the
        // core for the pull), so an idle follower's core keeps no buffer
        // capacity of its own.
        let (from_out, from_dg) = (out.len(), datagrams.len());
        std::mem::swap(&mut core.chunks, out);
        std::mem::swap(&mut core.datagrams, datagrams);
        let mut handled = 0;
        let mut stopped = false;
        for item in items.iter() {
            match core.handle(item, true) {
                Step::Done => handled += 1,
                Step::Gap { .. } | Step::Follow(_) | Step::Promoted | Step::Resend { .. } => {
                    stopped = true;
                    break;
                }
            }
        }
        std::mem::swap(&mut core.chunks, out);
        std::mem::swap(&mut core.datagrams, datagrams);
        let frames = (out.len() - from_out + datagrams.len() - from_dg) as u64;
        let bytes: usize = out[from_out..]
            .iter()
            .chain(datagrams[from_dg..].iter())
            .map(Bytes::len)
            .sum();
        // The transport takes every frame handed to it.
        core.written();
        let (drained, needed, left) = self.outbox.live_commit(handled, stopped, frames == 0);
        LIVE_COUNTS.with(|c| {
            let (f, b, d) = c.get();
            c.set((f + frames, b + bytes as u64, d + drained as u64));
        });
        // Let go of the peeked events (and their frames) at once.
        items.clear();
        if needed && frames > 0 {
            core.hand_over_due = true;
            return true;
        }
        !needed && left
    }
}

/// See the module docs.
pub struct FeedWriter<S> {
    sink: S,
    outbox: Arc<Outbox>,
    log: Arc<dyn ChannelLog>,
    core: Core,
    catchup_batch: usize,
    lag_policy: LagPolicy,
    recent_lags: VecDeque<Instant>,
    slots: Arc<dyn CatchupSlots>,
    catchups: CatchupBudget,
    live: Option<Arc<LiveFeed>>,
}

impl<S: FeedSink> FeedWriter<S> {
    /// A writer from `outbox` to `sink`.
    pub fn new(sink: S, outbox: Arc<Outbox>, deps: FeedDeps) -> FeedWriter<S> {
        FeedWriter {
            sink,
            outbox,
            log: deps.log,
            slots: deps.slots,
            core: Core::new(deps.follower, deps.receipts, deps.live_datagrams),
            catchup_batch: deps.catchup_batch.max(1),
            lag_policy: deps.lag_policy,
            recent_lags: VecDeque::new(),
            catchups: deps.catchups,
            live: None,
        }
    }

    /// The writer's live path: the transport pulls live events through it
    /// while the writer is idle. Give the outbox a live waker
    /// ([`Outbox::set_live_waker`]) that schedules the pulling; without one
    /// the writer never goes live.
    pub fn live(&mut self) -> Arc<LiveFeed> {
        self.live
            .get_or_insert_with(|| {
                Arc::new(LiveFeed {
                    outbox: self.outbox.clone(),
                    core: Mutex::new(None),
                })
            })
            .clone()
    }

    /// Counters so far.
    pub fn stats(&self) -> FeedStats {
        self.core.stats
    }

    /// Runs until the outbox is closed and drained, or the sink fails.
    pub async fn run(mut self) -> Result<FeedStats, FeedError> {
        let mut items = Vec::new();
        let mut lagged = Vec::new();
        loop {
            if !self
                .outbox
                .clone()
                .next_batch(&mut items, &mut lagged, MAX_DRAIN)
                .await
            {
                break;
            }
            for item in items.drain(..) {
                // At most one gap fill per item: after it the cursor is at
                // the post before this one (or the channel was unfollowed).
                for _ in 0..2 {
                    match self.core.handle(&item, false) {
                        Step::Done => break,
                        Step::Gap { channel, upto } => {
                            self.flush().await?;
                            self.fill(&channel, upto).await?;
                        }
                        Step::Follow(req) => {
                            self.flush().await?;
                            self.start(req).await?;
                            break;
                        }
                        // Only the live path is handed this one.
                        Step::Promoted => break,
                        Step::Resend { channel, from, to } => {
                            self.flush().await?;
                            self.resend(&channel, from, to).await?;
                            break;
                        }
                    }
                }
            }
            self.flush().await?;
            // An idle follower should not keep a burst's worth of buffers.
            if items.capacity() > IDLE_CAPACITY {
                items = Vec::new();
            }
            if self.core.chunks.capacity() > IDLE_CAPACITY {
                self.core.chunks = Vec::new();
            }
            // One overflow episode is one lag, however many channels it hit.
            if !lagged.is_empty() {
                self.note_lag()?;
                for (ch, from) in self.outbox.take_changes_lost() {
                    self.resend_changes(&ch, from).await?;
                }
            }
            for ch in lagged.drain(..) {
                let Some(head) = self.log.channel(&ch).map(|c| c.head_seq) else {
                    continue;
                };
                self.fill(&ch, head).await?;
            }
            self.go_live().await;
        }
        self.sink.finish();
        Ok(self.core.stats)
    }

    /// With nothing left to do, hands the cursors to the live path until it
    /// hands them back (it met something only the task can do, or the queue
    /// closed).
    async fn go_live(&mut self) {
        let Some(live) = self.live.clone() else {
            return;
        };
        let core = std::mem::replace(&mut self.core, Core::new(String::new(), false, false));
        *live.core() = Some(core);
        if self.outbox.try_go_live() {
            self.outbox.live_ended().await;
        }
        // The live path holds this lock for the whole of a pull, so once
        // it is ours no pull is half done.
        let core = live.core().take();
        if let Some(mut core) = core {
            core.hand_over_due = false;
            self.core = core;
        }
    }

    fn advance(&mut self, ch: &ChannelId, seq: u64) {
        self.core.advance(ch, seq);
    }

    fn note_lag(&mut self) -> Result<(), FeedError> {
        self.core.stats.lag_events += 1;
        metrics::counter!(crate::metrics::LAG_EVENTS).increment(1);
        let now = Instant::now();
        self.recent_lags.push_back(now);
        while self
            .recent_lags
            .front()
            .is_some_and(|t| now.duration_since(*t) > self.lag_policy.window)
        {
            self.recent_lags.pop_front();
        }
        if self.recent_lags.len() > self.lag_policy.max_events as usize {
            return Err(FeedError::LaggingTooOften {
                count: self.recent_lags.len(),
                window: self.lag_policy.window,
            });
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), FeedError> {
        if !self.core.chunks.is_empty() {
            let frames = self.core.chunks.len() as u64;
            let bytes: usize = self.core.chunks.iter().map(Bytes::len).sum();
            // Promoted frames in this batch are counted, durably, before
            // they go out: a crash after the write cannot lose the count.
            if !self.core.claims.is_empty() {
                for claim in self.core.claims.iter_mut() {
                    claim.count();
                }
                if let Err(e) = self.slots.durable().await {
                    tracing::warn!(error = %e, "impression counts are not durable yet; they stay in memory and are written later");
                }
            }
            if let Err(e) = self.sink.write_all_chunks(&mut self.core.chunks).await {
                // Not written: not impressions after all.
                for mut claim in self.core.claims.drain(..) {
                    claim.uncount();
                }
                return Err(e.into());
            }
            // Written: these promoted frames are impressions now.
            self.core.written();
            metrics::counter!(crate::metrics::FRAMES_DELIVERED).increment(frames);
            metrics::counter!(crate::metrics::BYTES_DELIVERED).increment(bytes as u64);
        }
        Ok(())
    }

    /// Handles a Follow: picks the starting cursor (sending a Reset when the
    /// follower's position cannot be honoured), then catches up to the head.
    async fn start(&mut self, req: FollowRequest) -> Result<(), FeedError> {
        let Some(info) = self.log.channel(&req.channel) else {
            return Ok(());
        };
        let oldest_known = info.oldest_seq.saturating_sub(1);
        let start = match req.after_seq {
            Some(after) => {
                // A position below the retained history needs no check
                // here: the catch-up finds the hole and says so (`fill`).
                let epoch_changed = req.epoch.is_some_and(|e| e != info.epoch);
                let ahead = after > info.head_seq;
                if epoch_changed || ahead {
                    self.core.chunks.push(encode_frame(&reset_frame(
                        &req.channel,
                        info.epoch,
                        info.oldest_seq,
                    )));
                    oldest_known
                } else {
                    after
                }
            }
            None => info
                .head_seq
                .saturating_sub(u64::from(req.tail))
                .max(oldest_known),
        };
        self.core.cursors.insert(req.channel.clone(), start);
        let before = self.core.stats.catchup_frames;
        self.fill(&req.channel, info.head_seq).await?;
        // At the end of a catch-up that delivered something, at most one
        // promoted post for this follower.
        if req.resume && self.core.stats.catchup_frames > before {
            let at = self
                .core
                .cursors
                .get(&req.channel)
                .copied()
                .unwrap_or(start);
            if let Some(ev) = self.slots.after_catchup(&req.channel, at) {
                if self.core.claim_promoted(&ev) {
                    self.flush().await?;
                }
            }
        }
        Ok(())
    }

    /// Re-sends, from the log, PostEdited / PostDeleted frames for every
    /// edited or deleted post of `ch` from seq `from` up to the cursor: the
    /// live events for them were dropped when the queue overflowed. Posts
    /// above the cursor are not needed: they come in their current state.
    async fn resend_changes(&mut self, ch: &ChannelId, from: u64) -> Result<(), FeedError> {
        let mut after = from.saturating_sub(1);
        loop {
            let Some(&cur) = self.core.cursors.get(ch) else {
                return Ok(());
            };
            if after >= cur {
                return self.flush().await;
            }
            let want = ((cur - after) as usize).min(self.catchup_batch);
            let last = {
                let step = self.catchups.step().await;
                let posts = self.log.read(ch.clone(), after, want).await?;
                let Some(last) = posts.last().map(|p| p.seq) else {
                    drop(step);
                    return self.flush().await;
                };
                for p in posts.iter().take_while(|p| p.seq <= cur) {
                    if p.deleted {
                        self.core.chunks.push(encode_frame(&deleted_frame(p)));
                    } else if p.edited_at_ms > 0 {
                        self.core.chunks.push(encode_frame(&edited_frame(p)));
                    }
                }
                drop(step);
                last
            };
            self.flush().await?;
            after = last;
        }
    }

    /// Writes posts `from..=to` of `ch` again, in their current state, as
    /// far as they were written before (up to the cursor), for a follower
    /// whose datagram carrying them was lost (protocol §8.5). The cursor
    /// does not move. Posts trimmed meanwhile are announced with a Reset,
    /// as in a catch-up.
    async fn resend(&mut self, ch: &ChannelId, from: u64, to: u64) -> Result<(), FeedError> {
        let Some(&cur) = self.core.cursors.get(ch) else {
            return Ok(());
        };
        let to = to.min(cur);
        let mut after = from.saturating_sub(1);
        while after < to {
            let want = ((to - after) as usize).min(self.catchup_batch);
            let step = self.catchups.step().await;
            let posts = self.log.read(ch.clone(), after, want).await?;
            self.core
                .chunks
                .extend(trimmed_reset(&*self.log, ch, after, posts.first()));
            if posts.is_empty() {
                break;
            }
            let mut last = after;
            for p in posts.iter().take_while(|p| p.seq <= to) {
                self.core.chunks.push(encode_frame(&post_frame(p)));
                self.core.stats.catchup_frames += 1;
                last = p.seq;
            }
            drop(posts);
            drop(step);
            self.flush().await?;
            if last == after {
                break;
            }
            after = last;
        }
        self.flush().await
    }

    /// Writes posts from the log until the channel's cursor reaches `upto`.
    async fn fill(&mut self, ch: &ChannelId, upto: u64) -> Result<(), FeedError> {
        if self.core.cursors.get(ch).is_some_and(|&cur| cur < upto) {
            metrics::counter!(crate::metrics::CATCHUPS).increment(1);
        }
        loop {
            let Some(&cur) = self.core.cursors.get(ch) else {
                return Ok(());
            };
            if cur >= upto {
                return self.flush().await;
            }
            let want = ((upto - cur) as usize).min(self.catchup_batch);
            // The decoded posts exist only within one step of the budget.
            let step = self.catchups.step().await;
            let posts = self.log.read(ch.clone(), cur, want).await?;
            self.core
                .chunks
                .extend(trimmed_reset(&*self.log, ch, cur, posts.first()));
            if posts.is_empty() {
                // Everything after the cursor up to `upto` was trimmed while
                // we were behind: go on after it.
                drop(step);
                self.advance(ch, upto);
                return self.flush().await;
            }
            // Encode all, then let go of the decoded posts before writing, and
            // write whenever the encoded frames reach the session's queue
            // bound: a catch-up holds about as much as the live queue may.
            let mut last = None;
            let mut frames = Vec::with_capacity(posts.len());
            for p in posts.iter().take_while(|p| p.seq <= upto) {
                frames.push((p.seq, encode_frame(&post_frame(p))));
                last = Some(p.seq);
            }
            drop(posts);
            drop(step);
            let mut pending = 0usize;
            for (seq, frame) in frames {
                pending += frame.len();
                self.core.chunks.push(frame);
                self.core.stats.catchup_frames += 1;
                if pending >= self.outbox.bound() {
                    self.advance(ch, seq);
                    self.flush().await?;
                    pending = 0;
                }
            }
            // No post at or below `upto` is left: everything up to it was trimmed.
            self.advance(ch, last.unwrap_or(upto));
            self.flush().await?;
        }
    }
}

/// The Reset that says what a log read after `after` found trimmed (no
/// silent gap): everything, when it found nothing (`first` is `None`), or the
/// posts below `first`; `None` when nothing was. Delivery goes on from what
/// is kept.
fn trimmed_reset(
    log: &dyn ChannelLog,
    ch: &ChannelId,
    after: u64,
    first: Option<&crate::model::Post>,
) -> Option<Bytes> {
    let frame = match first {
        None => log
            .channel(ch)
            .map(|info| reset_frame(ch, info.epoch, info.oldest_seq)),
        Some(p) if p.seq > after + 1 => Some(reset_frame(ch, p.epoch, p.seq)),
        Some(_) => None,
    }?;
    Some(encode_frame(&frame))
}
