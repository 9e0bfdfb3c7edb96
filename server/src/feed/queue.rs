//! A session's outbound queue, shared by the fan-out (producer, many threads) and
//! the session's feed writer (consumer).
//!
//! Live events are bounded in bytes (`bound`): an event that would overflow
//! is not queued; its channel is marked lagged instead, and the writer later
//! catches that channel up from the log. So a follower that stops reading
//! costs the server at most `bound` bytes of queued frames, and the publisher
//! is never blocked. Control items (follow/unfollow) are not dropped; they
//! are few, bounded by [`MAX_PENDING_CONTROL`].
//!
//! One drainer at a time: the session's writer task, or — while the writer
//! is idle and live — the transport's event loop, which drains live events
//! through [`LiveFeed`](super::LiveFeed) without waking the task (see
//! `writer`). The drainer is woken only when the queue goes from empty to
//! non-empty, so a burst costs one wake-up, not one per frame; in live mode
//! the wake-up is the transport scheduling the connection on its loop, which
//! costs no task wake-up at all. Only the task sets live mode (when it has
//! nothing to do), and only the live drainer or [`Outbox::close`] ends it.
//!
//! The queue-bytes gauge is raised by the hub once per fan-out and lowered
//! once per drained batch (by the live drainer, once per loop turn).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use tokio::sync::Notify;

use super::event::{EventKind, FeedEvent};
use crate::model::{ChannelId, FollowRequest};

/// Most control items that may wait in an outbox made with [`Outbox::new`].
/// Sessions allow `limits.max_follows_per_connection` more, so that a client
/// re-following all its channels at once after a reconnect is never refused.
pub const MAX_PENDING_CONTROL: usize = 64;

/// One queued item.
#[derive(Debug, Clone)]
pub enum Item {
    /// A live event, shared by every follower of its channel.
    Event(Arc<FeedEvent>),
    /// Start delivering a channel (queued in the same critical section that
    /// registers the session in the hub, so no live event can precede it).
    Follow(FollowRequest),
    /// Stop delivering a channel.
    Unfollow(ChannelId),
    /// Write posts `from..=to` of a channel again, from the log (protocol
    /// §8.5), as far as they were written before.
    Resend {
        /// The channel.
        channel: ChannelId,
        /// The first seq.
        from: u64,
        /// The last seq.
        to: u64,
    },
}

#[derive(Default)]
struct State {
    items: VecDeque<Item>,
    bytes: usize,
    control: usize,
    lagged: Vec<ChannelId>,
    /// Per lagged channel, the lowest seq whose edit or delete did not fit.
    changes_lost: Vec<(ChannelId, u64)>,
    closed: bool,
    /// The live drainer (the transport's loop) drains, not the task.
    live: bool,
}

/// Wakes the live drainer (the transport schedules the connection).
pub type LiveWaker = Box<dyn Fn() + Send + Sync>;

/// The queue. See the module docs.
pub struct Outbox {
    state: Mutex<State>,
    notify: Notify,
    live_waker: OnceLock<LiveWaker>,
    bound: usize,
    control_bound: usize,
}

/// Why a control item was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlRefused {
    /// The queue already holds as many control items as it may.
    Full,
    /// The queue is closed: its session is ending.
    Closed,
}

impl Outbox {
    /// An empty queue holding at most `bound` bytes of live events.
    pub fn new(bound: usize) -> Outbox {
        Outbox::with_control_bound(bound, MAX_PENDING_CONTROL)
    }

    /// An empty queue holding at most `bound` bytes of live events and
    /// `control_bound` control items.
    pub fn with_control_bound(bound: usize, control_bound: usize) -> Outbox {
        Outbox {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            live_waker: OnceLock::new(),
            bound,
            control_bound: control_bound.max(1),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave State inconsistent
        // (every update is a single push or drain), so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a live event. Returns `false` when it did not fit (the channel is
    /// then marked lagged) or the queue is closed.
    pub fn push_event(&self, ev: &Arc<FeedEvent>) -> bool {
        let len = ev.frame.len();
        let mut s = self.lock();
        if s.closed {
            return false;
        }
        if s.bytes + len > self.bound {
            let first_lag = !s.lagged.contains(&ev.channel);
            if first_lag {
                s.lagged.push(ev.channel.clone());
            }
            if matches!(ev.kind, EventKind::Edit | EventKind::Delete) {
                // The writer re-sends the current state of edited and
                // deleted posts from this seq on (see `take_changes_lost`).
                match s.changes_lost.iter_mut().find(|(c, _)| *c == ev.channel) {
                    Some((_, seq)) => *seq = (*seq).min(ev.seq),
                    None => s.changes_lost.push((ev.channel.clone(), ev.seq)),
                }
            }
            let wake = s.items.is_empty() && first_lag;
            let live = s.live;
            drop(s);
            if wake {
                self.wake(live);
            }
            return false;
        }
        let was_empty = s.items.is_empty();
        s.bytes += len;
        s.items.push_back(Item::Event(ev.clone()));
        let live = s.live;
        drop(s);
        if was_empty {
            self.wake(live);
        }
        true
    }

    /// Wakes whoever drains now.
    fn wake(&self, live: bool) {
        match (live, self.live_waker.get()) {
            (true, Some(w)) => w(),
            _ => self.notify.notify_one(),
        }
    }

    /// Lets the writer hand its live events to a drainer outside the task
    /// (the transport's loop), woken by `waker`. Set once.
    pub fn set_live_waker(&self, waker: LiveWaker) {
        let _ = self.live_waker.set(waker);
    }

    /// Whether a live drainer can take over.
    pub(super) fn has_live_drainer(&self) -> bool {
        self.live_waker.get().is_some()
    }

    /// The task hands draining to the live drainer, if there is nothing for
    /// the task to do (no item, no lag, not closed). Returns whether it did.
    pub(super) fn try_go_live(&self) -> bool {
        let mut s = self.lock();
        if s.items.is_empty() && s.lagged.is_empty() && !s.closed && self.has_live_drainer() {
            s.live = true;
            true
        } else {
            false
        }
    }

    /// The task waits until the live drainer hands draining back.
    pub(super) async fn live_ended(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.lock().live {
                return;
            }
            notified.await;
        }
    }

    /// For the live drainer: if live, clones up to `max_bytes` of events
    /// (and the control items between them) from the front into `out`,
    /// without taking them off. `None` if the task drains now.
    pub(super) fn live_peek(&self, max_bytes: usize, out: &mut Vec<Item>) -> Option<()> {
        let s = self.lock();
        if !s.live {
            return None;
        }
        let mut bytes = 0;
        for item in s.items.iter() {
            if let Item::Event(ev) = item {
                if bytes > 0 && bytes + ev.frame.len() > max_bytes {
                    break;
                }
                bytes += ev.frame.len();
            }
            out.push(item.clone());
        }
        Some(())
    }

    /// For the live drainer: takes the first `n` items off (those it
    /// handled). Returns the bytes of events taken off; whether the task is
    /// needed: `stopped` (the drainer met an item it cannot handle), or
    /// something only the task can do is waiting (a lag, the close); and
    /// whether items are left (an item pushed from here on finds the queue
    /// as this says, so a drainer that stops when none are left is woken
    /// for the next). With `hand_over`, a needed task is given the queue at
    /// once.
    pub(super) fn live_commit(
        &self,
        n: usize,
        stopped: bool,
        hand_over: bool,
    ) -> (usize, bool, bool) {
        let mut guard = self.lock();
        let s = &mut *guard;
        let before = s.bytes;
        for item in s.items.drain(..n.min(s.items.len())) {
            match &item {
                Item::Event(ev) => s.bytes -= ev.frame.len(),
                _ => s.control -= 1,
            }
        }
        let drained = before - s.bytes;
        let needed = s.live && (stopped || !s.lagged.is_empty() || s.closed);
        let left = !s.items.is_empty();
        let back = needed && hand_over;
        if back {
            s.live = false;
        }
        drop(guard);
        if back {
            self.notify.notify_one();
        }
        (drained, needed, left)
    }

    /// Queues a control item.
    pub fn push_control(&self, item: Item) -> Result<(), ControlRefused> {
        let mut s = self.lock();
        if s.closed {
            return Err(ControlRefused::Closed);
        }
        if s.control >= self.control_bound {
            return Err(ControlRefused::Full);
        }
        let was_empty = s.items.is_empty();
        s.control += 1;
        s.items.push_back(item);
        let live = s.live;
        drop(s);
        if was_empty {
            self.wake(live);
        }
        Ok(())
    }

    /// Waits for work, then moves up to `max` items into `items` and every
    /// lagged channel into `lagged`. Returns `false` once closed and drained.
    pub async fn next_batch(
        &self,
        items: &mut Vec<Item>,
        lagged: &mut Vec<ChannelId>,
        max: usize,
    ) -> bool {
        loop {
            {
                let mut guard = self.lock();
                let s = &mut *guard;
                if !s.items.is_empty() || !s.lagged.is_empty() {
                    let n = s.items.len().min(max);
                    let before = s.bytes;
                    for item in s.items.drain(..n) {
                        match &item {
                            Item::Event(ev) => s.bytes -= ev.frame.len(),
                            _ => s.control -= 1,
                        }
                        items.push(item);
                    }
                    lagged.append(&mut s.lagged);
                    let drained = before - s.bytes;
                    drop(guard);
                    if drained > 0 {
                        metrics::gauge!(crate::metrics::QUEUE_BYTES).decrement(drained as f64);
                    }
                    return true;
                }
                if s.closed {
                    return false;
                }
            }
            self.notify.notified().await;
        }
    }

    /// Channels whose edits or deletes were dropped on overflow, each with
    /// the lowest seq affected. Always reported together with (or before)
    /// the channel being marked lagged.
    pub fn take_changes_lost(&self) -> Vec<(ChannelId, u64)> {
        std::mem::take(&mut self.lock().changes_lost)
    }

    /// Refuses further items and wakes the writer so it can finish. Ends
    /// live mode: the task drains what is left.
    pub fn close(&self) {
        {
            let mut s = self.lock();
            s.closed = true;
            s.live = false;
        }
        self.notify.notify_one();
    }

    /// Whether the queue is closed (its session is ending).
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// Items (events and control) queued now.
    pub fn queued_items(&self) -> usize {
        self.lock().items.len()
    }

    /// Bytes of live events queued now.
    pub fn queued_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// The configured bound in bytes.
    pub fn bound(&self) -> usize {
        self.bound
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // Events never drained leave the queue-bytes gauge with the outbox.
        let left = self.lock().bytes;
        if left > 0 {
            metrics::gauge!(crate::metrics::QUEUE_BYTES).decrement(left as f64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feed::EventKind;
    use bytes::Bytes;

    fn ev(ch: &str, seq: u64, len: usize) -> Arc<FeedEvent> {
        Arc::new(FeedEvent {
            channel: ChannelId::parse(ch).unwrap(),
            seq,
            kind: EventKind::Post,
            frame: Bytes::from(vec![0u8; len]),
            slot: None,
        })
    }

    #[tokio::test]
    async fn overflow_marks_lagged_and_stays_bounded() {
        let q = Outbox::new(1000);
        assert!(q.push_event(&ev("a", 1, 400)));
        assert!(q.push_event(&ev("a", 2, 400)));
        assert!(!q.push_event(&ev("a", 3, 400)));
        assert!(!q.push_event(&ev("a", 4, 400)));
        assert!(!q.push_event(&ev("b", 1, 400)));
        assert_eq!(q.queued_bytes(), 800);
        let (mut items, mut lagged) = (Vec::new(), Vec::new());
        assert!(q.next_batch(&mut items, &mut lagged, 100).await);
        assert_eq!(items.len(), 2);
        assert_eq!(lagged.len(), 2, "each channel is reported once");
        assert_eq!(q.queued_bytes(), 0);
        assert!(q.push_event(&ev("a", 5, 400)));
    }

    #[tokio::test]
    async fn control_items_are_bounded_and_close_ends_the_batch_loop() {
        let q = Outbox::new(1000);
        for _ in 0..MAX_PENDING_CONTROL {
            q.push_control(Item::Unfollow(ChannelId::parse("a").unwrap()))
                .unwrap();
        }
        assert_eq!(
            q.push_control(Item::Unfollow(ChannelId::parse("a").unwrap())),
            Err(ControlRefused::Full)
        );
        let (mut items, mut lagged) = (Vec::new(), Vec::new());
        assert!(q.next_batch(&mut items, &mut lagged, 10).await);
        assert_eq!(items.len(), 10);
        q.close();
        items.clear();
        assert!(q.next_batch(&mut items, &mut lagged, 1000).await);
        assert_eq!(items.len(), MAX_PENDING_CONTROL - 10);
        assert!(!q.next_batch(&mut items, &mut lagged, 1000).await);
    }
}
