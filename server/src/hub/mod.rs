//! The hub: who follows what, and the fan-out.
//!
//! A sharded map (dashmap) from channel to its followers; each channel's
//! followers are split into per-core buckets by session id. A committed
//! event is encoded into its feed frame once ([`FeedEvent`], a shared
//! `Bytes`) and every follower's [`Outbox`] gets a reference to it. Fan-out
//! never waits on a follower: a full outbox marks the follower lagged.
//!
//! The log hands committed events to a [`FanoutStage`]: one thread that fans
//! them out in commit order, off the log's commit thread, so a large fan-out
//! never delays the next durable commit. Channels with many followers are
//! fanned out bucket by bucket on a persistent pool of threads (one per
//! bucket beyond the first, started once; no thread is spawned per post),
//! so a post to a million followers uses every core; small channels are
//! fanned out inline. Each bucket is processed completely before the next
//! event, so every outbox receives a channel's events in seq order.
//!
//! Registration and the session's `Follow` control item are queued inside
//! the same bucket lock, so a session's writer always sees its Follow before
//! any live event of that channel (why that makes the catch-up seam gapless
//! is argued once, in `feed::writer`). No map guard or lock is ever held
//! across `.await`. Sessions follow and unfollow with
//! [`Hub::follow_async`] / [`Hub::unfollow_async`], which never block a
//! runtime worker on a bucket busy with a large fan-out: they try the lock
//! and otherwise wait for the bucket's release notification. A session that
//! ends during a fan-out does not wait either: its outbox is closed, and the
//! next fan-out of that bucket drops it.
//!
//! Per-channel counters (deliveries, lag events) are kept for the stats API;
//! they are bumped once per fan-out with its totals, never per follower.

mod pool;
mod stage;
mod subscribers;

pub use stage::{FanoutStage, FANOUT_QUEUE};
pub use subscribers::{Subscriber, SubscriberSet};

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, TryLockError};

use dashmap::DashMap;
use tokio::sync::Notify;

use crate::feed::{ControlRefused, FeedEvent, Item, Outbox};
use crate::model::{ChannelId, Post};
use crate::store::LogEvent;

/// Channels with at least this many followers are fanned out in parallel.
pub const PARALLEL_FANOUT_MIN: usize = 4096;

/// One bucket of a channel's followers, and the notification its lock's
/// release sends to async followers waiting for it.
struct Bucket {
    set: Mutex<SubscriberSet>,
    released: Notify,
}

impl Bucket {
    fn lock(&self) -> BucketGuard<'_> {
        BucketGuard {
            guard: Some(lock(&self.set)),
            released: &self.released,
        }
    }

    /// The lock without waiting; `None` if it is busy.
    fn try_lock(&self) -> Option<BucketGuard<'_>> {
        let guard = match self.set.try_lock() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        Some(BucketGuard {
            guard: Some(guard),
            released: &self.released,
        })
    }

    /// The lock for async callers: never blocks the calling thread on a
    /// bucket busy with a fan-out; it waits for the bucket's release.
    async fn lock_async(&self) -> BucketGuard<'_> {
        loop {
            // Registered before the attempt, so a release in between is not
            // missed.
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(guard) = self.try_lock() {
                return guard;
            }
            released.await;
        }
    }
}

/// A bucket's lock; releasing it wakes the async followers waiting for it,
/// whoever held it (a fan-out, a follow, an unfollow).
struct BucketGuard<'a> {
    guard: Option<MutexGuard<'a, SubscriberSet>>,
    released: &'a Notify,
}

impl std::ops::Deref for BucketGuard<'_> {
    type Target = SubscriberSet;
    fn deref(&self) -> &SubscriberSet {
        match self.guard.as_deref() {
            Some(set) => set,
            None => unreachable!("a bucket guard is only emptied by its drop"),
        }
    }
}

impl std::ops::DerefMut for BucketGuard<'_> {
    fn deref_mut(&mut self) -> &mut SubscriberSet {
        match self.guard.as_deref_mut() {
            Some(set) => set,
            None => unreachable!("a bucket guard is only emptied by its drop"),
        }
    }
}

impl Drop for BucketGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        self.released.notify_waiters();
    }
}

/// One channel's followers, split into buckets.
struct ChannelSubs {
    buckets: Box<[Bucket]>,
    /// Followers; changed only while holding the follower's bucket lock.
    count: AtomicUsize,
    /// Set (holding every bucket lock, with no follower) just before the
    /// entry leaves the map; a `follow` that finds it set retries.
    retired: std::sync::atomic::AtomicBool,
}

impl ChannelSubs {
    fn new(n: usize) -> ChannelSubs {
        ChannelSubs {
            buckets: (0..n)
                .map(|_| Bucket {
                    set: Mutex::new(SubscriberSet::default()),
                    released: Notify::new(),
                })
                .collect(),
            count: AtomicUsize::new(0),
            retired: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Marks an empty channel retired. Never waits: if a bucket is busy (a
    /// fan-out or a follow), the entry simply stays for now.
    fn try_retire(&self) -> bool {
        let mut guards = Vec::with_capacity(self.buckets.len());
        for b in self.buckets.iter() {
            match b.try_lock() {
                Some(g) => guards.push(g),
                None => return false,
            }
        }
        if self.count.load(Ordering::Acquire) != 0 {
            return false;
        }
        self.retired.store(true, Ordering::Release);
        true
    }

    fn bucket_of(&self, session: u64) -> &Bucket {
        &self.buckets[(session % self.buckets.len() as u64) as usize]
    }

    fn bucket(&self, session: u64) -> BucketGuard<'_> {
        self.bucket_of(session).lock()
    }
}

fn lock(m: &Mutex<SubscriberSet>) -> MutexGuard<'_, SubscriberSet> {
    // Every update is a single insert or remove; a poisoned set is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Counts of one fan-out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    /// Queues that accepted the event.
    pub delivered: usize,
    /// Queues that were full (their followers are now lagged for the channel).
    pub lagged: usize,
}

impl std::ops::AddAssign for Fanout {
    fn add_assign(&mut self, o: Fanout) {
        self.delivered += o.delivered;
        self.lagged += o.lagged;
    }
}

/// Totals of a channel's fan-outs since the server started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChannelStats {
    /// Events queued to followers.
    pub deliveries: u64,
    /// Events not queued because the follower's queue was full (it is caught
    /// up from the log later).
    pub lag_events: u64,
}

#[derive(Default)]
struct Counters {
    deliveries: AtomicU64,
    lag_events: AtomicU64,
}

/// Totals since start, updated once per fan-out (not per delivery).
#[derive(Debug, Default)]
pub struct HubTotals {
    /// Events fanned out by [`Hub::publish`]: posts, edits, deletes, and the
    /// promoted posts that follow a post.
    pub events: AtomicU64,
    /// Event copies queued to followers, over all events.
    pub delivered: AtomicU64,
    /// Event copies refused because a follower's queue was full (that follower
    /// is caught up from the log instead).
    pub lagged: AtomicU64,
}

/// The subscription registry and fan-out. See the module docs.
pub struct Hub {
    channels: DashMap<ChannelId, Arc<ChannelSubs>>,
    counters: DashMap<ChannelId, Counters>,
    buckets: usize,
    totals: HubTotals,
    /// Threads for the buckets of large channels, started at first use.
    pool: OnceLock<pool::Pool>,
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }
}

impl Hub {
    /// A hub whose channels split their followers into `buckets` buckets.
    pub fn new(buckets: usize) -> Hub {
        Hub {
            channels: DashMap::new(),
            counters: DashMap::new(),
            buckets: buckets.max(1),
            totals: HubTotals::default(),
            pool: OnceLock::new(),
        }
    }

    fn subs(&self, channel: &ChannelId) -> Arc<ChannelSubs> {
        self.channels
            .entry(channel.clone())
            .or_insert_with(|| Arc::new(ChannelSubs::new(self.buckets)))
            .value()
            .clone()
    }

    /// Registers under the bucket lock `bucket` of `subs`; `None` if the
    /// entry was retired meanwhile (follow its successor instead).
    fn register(
        subs: &ChannelSubs,
        mut bucket: BucketGuard<'_>,
        session: u64,
        outbox: &Arc<Outbox>,
        follow: &mut Option<Item>,
    ) -> Option<Result<bool, ControlRefused>> {
        if subs.retired.load(Ordering::Acquire) {
            return None;
        }
        if !bucket.insert(Subscriber {
            session,
            outbox: outbox.clone(),
        }) {
            return Some(Ok(false));
        }
        let Some(item) = follow.take() else {
            bucket.remove(session);
            return Some(Ok(false));
        };
        if let Err(e) = outbox.push_control(item) {
            bucket.remove(session);
            return Some(Err(e));
        }
        subs.count.fetch_add(1, Ordering::AcqRel);
        Some(Ok(true))
    }

    /// [`Hub::follow`] for async callers: never blocks the calling thread
    /// on a bucket busy with a fan-out; it waits for the bucket's release.
    pub async fn follow_async(
        &self,
        channel: &ChannelId,
        session: u64,
        outbox: &Arc<Outbox>,
        follow: Item,
    ) -> Result<bool, ControlRefused> {
        let mut follow = Some(follow);
        loop {
            let subs = self.subs(channel);
            let guard = subs.bucket_of(session).lock_async().await;
            // `None`: emptied and leaving the map; follow its successor.
            if let Some(r) = Self::register(&subs, guard, session, outbox, &mut follow) {
                return r;
            }
        }
    }

    /// [`Hub::unfollow`] for async callers: waits for a busy bucket's
    /// release instead of blocking the calling thread.
    pub async fn unfollow_async(&self, channel: &ChannelId, session: u64) -> bool {
        let Some(subs) = self.channels.get(channel).map(|s| s.value().clone()) else {
            return false;
        };
        // A channel retired meanwhile has no followers left: nothing removed.
        let guard = subs.bucket_of(session).lock_async().await;
        self.remove_locked(channel, &subs, guard, session)
    }

    /// Removes `session` if its bucket is free now; otherwise leaves it to
    /// the next fan-out of that bucket, which drops followers whose outbox is
    /// closed (the caller closes it first). For `Drop`, which cannot wait.
    pub fn unfollow_nowait(&self, channel: &ChannelId, session: u64) {
        let Some(subs) = self.channels.get(channel).map(|s| s.value().clone()) else {
            return;
        };
        let guard = subs.bucket_of(session).try_lock();
        if let Some(guard) = guard {
            self.remove_locked(channel, &subs, guard, session);
        }
    }

    fn remove_locked(
        &self,
        channel: &ChannelId,
        subs: &Arc<ChannelSubs>,
        mut bucket: BucketGuard<'_>,
        session: u64,
    ) -> bool {
        let removed = bucket.remove(session);
        if removed {
            subs.count.fetch_sub(1, Ordering::AcqRel);
        }
        drop(bucket);
        if removed && subs.count.load(Ordering::Acquire) == 0 {
            // Retiring takes every bucket lock and checks the count again,
            // so an entry leaves the map only while truly empty, and a
            // concurrent follow that got the old entry sees it retired.
            self.channels
                .remove_if(channel, |_, s| Arc::ptr_eq(s, subs) && s.try_retire());
        }
        removed
    }

    /// Registers `session` as a follower of `channel` and queues `follow` on
    /// its outbox in the same critical section. Returns `Ok(false)` if the
    /// session already follows the channel (nothing is queued then).
    pub fn follow(
        &self,
        channel: &ChannelId,
        session: u64,
        outbox: &Arc<Outbox>,
        follow: Item,
    ) -> Result<bool, ControlRefused> {
        // The map guard is dropped before the bucket lock is taken, so a
        // follow that waits for a bucket busy with a large fan-out does not
        // hold up every other channel of the same shard.
        let mut follow = Some(follow);
        loop {
            let subs = self.subs(channel);
            let bucket = subs.bucket(session);
            // `None`: emptied and leaving the map; follow its successor.
            if let Some(r) = Self::register(&subs, bucket, session, outbox, &mut follow) {
                return r;
            }
        }
    }

    /// Removes `session` from `channel`'s followers; returns whether it was there.
    pub fn unfollow(&self, channel: &ChannelId, session: u64) -> bool {
        let Some(subs) = self.channels.get(channel).map(|s| s.value().clone()) else {
            return false;
        };
        let bucket = subs.bucket(session);
        self.remove_locked(channel, &subs, bucket, session)
    }

    /// Followers of `channel` now.
    pub fn follower_count(&self, channel: &ChannelId) -> usize {
        self.channels
            .get(channel)
            .map_or(0, |s| s.count.load(Ordering::Relaxed))
    }

    /// Channels with at least one follower.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Fans committed log events out, in order, and counts the batch in
    /// the metrics once.
    pub fn publish_log(&self, events: &[LogEvent]) -> Fanout {
        self.publish_log_with(events, |_, _| None)
    }

    /// Like [`Hub::publish_log`], and after each post fans out whatever
    /// `after_post` returns for it (the promoted slot), so that event follows
    /// its post directly.
    pub fn publish_log_with(
        &self,
        events: &[LogEvent],
        mut after_post: impl FnMut(&Post, usize) -> Option<Arc<FeedEvent>>,
    ) -> Fanout {
        let started = std::time::Instant::now();
        let mut total = Fanout::default();
        let mut posts = 0u64;
        for ev in events {
            total += self.publish(Arc::new(FeedEvent::from_log(ev)));
            if let LogEvent::Posted(p) = ev {
                posts += 1;
                if let Some(next) = after_post(p, self.follower_count(&p.channel)) {
                    total += self.publish(next);
                }
            }
        }
        metrics::histogram!(crate::metrics::FANOUT_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::counter!(crate::metrics::POSTS_PUBLISHED).increment(posts);
        metrics::counter!(crate::metrics::FANOUT_DELIVERIES).increment(total.delivered as u64);
        total
    }

    /// Fan-out totals of `channel` since start.
    pub fn channel_stats(&self, channel: &ChannelId) -> ChannelStats {
        self.counters
            .get(channel)
            .map_or_else(ChannelStats::default, |c| ChannelStats {
                deliveries: c.deliveries.load(Ordering::Relaxed),
                lag_events: c.lag_events.load(Ordering::Relaxed),
            })
    }

    fn count(&self, channel: &ChannelId, f: Fanout) {
        if f.delivered == 0 && f.lagged == 0 {
            return;
        }
        let add = |c: &Counters| {
            c.deliveries
                .fetch_add(f.delivered as u64, Ordering::Relaxed);
            c.lag_events.fetch_add(f.lagged as u64, Ordering::Relaxed);
        };
        match self.counters.get(channel) {
            Some(c) => add(&c),
            None => add(&self.counters.entry(channel.clone()).or_default()),
        }
    }

    /// Totals since start.
    pub fn totals(&self) -> &HubTotals {
        &self.totals
    }

    /// The most live-event bytes any one session has queued right now, and
    /// the number of sessions looked at. Walks every subscription: for
    /// diagnostics and tests, not for the hot path.
    pub fn largest_queue(&self) -> (usize, usize) {
        let mut seen = std::collections::HashSet::new();
        let mut max = 0;
        for entry in self.channels.iter() {
            for b in entry.value().buckets.iter() {
                for sub in b.lock().iter() {
                    if seen.insert(sub.session) {
                        max = max.max(sub.outbox.queued_bytes());
                    }
                }
            }
        }
        (max, seen.len())
    }

    /// Fans one encoded event out to every follower of its channel.
    pub fn publish(&self, ev: Arc<FeedEvent>) -> Fanout {
        let f = self.fan_out(&ev);
        self.count(&ev.channel, f);
        self.totals.events.fetch_add(1, Ordering::Relaxed);
        self.totals
            .delivered
            .fetch_add(f.delivered as u64, Ordering::Relaxed);
        self.totals
            .lagged
            .fetch_add(f.lagged as u64, Ordering::Relaxed);
        f
    }

    /// Fans a Head event out (see `stage`): like [`Hub::publish`], but not
    /// counted as deliveries, since it delivers no post.
    pub fn publish_head(&self, ev: Arc<FeedEvent>) {
        self.fan_out(&ev);
    }

    fn fan_out(&self, ev: &Arc<FeedEvent>) -> Fanout {
        let Some(subs) = self.channels.get(&ev.channel).map(|s| s.value().clone()) else {
            return Fanout::default();
        };
        let n = subs.buckets.len();
        if subs.count.load(Ordering::Relaxed) < PARALLEL_FANOUT_MIN || n == 1 {
            let mut total = Fanout::default();
            for i in 0..n {
                total += fan_bucket(&subs, i, ev);
            }
            return total;
        }
        // Buckets 1.. on the pool's threads, bucket 0 here; each thread
        // shares its own copy of the event, so the reference count it bumps
        // is not contended across cores.
        let pool = self.pool.get_or_init(|| pool::Pool::new(n - 1));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let mut sent = 0;
        for i in 1..n {
            let (job_subs, local, done) = (subs.clone(), Arc::new(ev.share()), done_tx.clone());
            if pool.run(
                i - 1,
                Box::new(move || {
                    let _ = done.send(fan_bucket(&job_subs, i, &local));
                }),
            ) {
                sent += 1;
            } else {
                // No pool thread (it could not start): do it here.
                let _ = done_tx.send(fan_bucket(&subs, i, ev));
                sent += 1;
            }
        }
        drop(done_tx);
        let mut total = fan_bucket(&subs, 0, ev);
        for _ in 0..sent {
            match done_rx.recv() {
                Ok(f) => total += f,
                Err(_) => {
                    tracing::error!(
                        "a fan-out thread failed; its followers catch up at the next post"
                    );
                    break;
                }
            }
        }
        total
    }
}

/// Fans `ev` out to bucket `i` of `subs` under its lock, drops followers
/// whose outbox is closed (their session ended during a fan-out), then
/// tells async followers waiting for the bucket that it is free.
fn fan_bucket(subs: &ChannelSubs, i: usize, ev: &Arc<FeedEvent>) -> Fanout {
    let bucket = &subs.buckets[i];
    let mut f = Fanout::default();
    {
        let mut set = bucket.lock();
        let mut gone = Vec::new();
        for sub in set.iter() {
            if sub.outbox.push_event(ev) {
                f.delivered += 1;
            } else if sub.outbox.is_closed() {
                gone.push(sub.session);
            } else {
                f.lagged += 1;
            }
        }
        for session in gone {
            if set.remove(session) {
                subs.count.fetch_sub(1, Ordering::AcqRel);
            }
        }
        // Dropping the guard wakes followers waiting for the bucket.
    }
    if f.delivered > 0 {
        // The outboxes take these bytes off again as they are drained.
        metrics::gauge!(crate::metrics::QUEUE_BYTES)
            .increment((f.delivered * ev.frame.len()) as f64);
    }
    f
}

#[cfg(test)]
mod tests;
