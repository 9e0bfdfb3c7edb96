//! The hub: who follows what, and the fan-out.
//!
//! A sharded map (dashmap) from channel to its followers; each channel's
//! followers are split into per-core buckets by session id. A committed
//! event is encoded into its feed frame once ([`FeedEvent`], a shared
//! `Bytes`) and every follower's [`Outbox`] gets a reference to it. Fan-out
//! never waits on a follower: a full outbox marks the follower lagged.
//!
//! Channels with many followers are fanned out on one scoped thread per
//! bucket, so a post to a million followers uses every core; small channels
//! are fanned out inline. Events are fanned out in commit order (the log
//! calls [`Hub::publish`] from its committer), and each bucket is processed
//! completely before the next event, so every outbox receives a channel's
//! events in seq order.
//!
//! Registration and the session's `Follow` control item are queued inside
//! the same bucket lock, so a session's writer always sees its Follow before
//! any live event of that channel (why that makes the catch-up seam gapless
//! is argued once, in `feed::writer`). No map guard or lock is ever held
//! across `.await`.
//!
//! Per-channel counters (deliveries, lag events) are kept for the stats API;
//! they are bumped once per fan-out with its totals, never per follower.

mod subscribers;

pub use subscribers::{Subscriber, SubscriberSet};

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dashmap::DashMap;

use crate::feed::{ControlRefused, FeedEvent, Item, Outbox};
use crate::model::{ChannelId, Post};
use crate::store::LogEvent;

/// Channels with at least this many followers are fanned out in parallel.
pub const PARALLEL_FANOUT_MIN: usize = 4096;

/// One channel's followers, split into buckets.
struct ChannelSubs {
    buckets: Box<[Mutex<SubscriberSet>]>,
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
                .map(|_| Mutex::new(SubscriberSet::default()))
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
                Ok(g) => guards.push(g),
                Err(std::sync::TryLockError::Poisoned(p)) => guards.push(p.into_inner()),
                Err(std::sync::TryLockError::WouldBlock) => return false,
            }
        }
        if self.count.load(Ordering::Acquire) != 0 {
            return false;
        }
        self.retired.store(true, Ordering::Release);
        true
    }

    fn bucket(&self, session: u64) -> MutexGuard<'_, SubscriberSet> {
        let i = (session % self.buckets.len() as u64) as usize;
        lock(&self.buckets[i])
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
        }
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
        loop {
            let subs = self
                .channels
                .entry(channel.clone())
                .or_insert_with(|| Arc::new(ChannelSubs::new(self.buckets)))
                .value()
                .clone();
            let mut bucket = subs.bucket(session);
            if subs.retired.load(Ordering::Acquire) {
                // Emptied and leaving the map: follow its successor instead.
                continue;
            }
            if !bucket.insert(Subscriber {
                session,
                outbox: outbox.clone(),
            }) {
                return Ok(false);
            }
            if let Err(e) = outbox.push_control(follow) {
                bucket.remove(session);
                return Err(e);
            }
            subs.count.fetch_add(1, Ordering::AcqRel);
            return Ok(true);
        }
    }

    /// Removes `session` from `channel`'s followers; returns whether it was there.
    pub fn unfollow(&self, channel: &ChannelId, session: u64) -> bool {
        let Some(subs) = self.channels.get(channel).map(|s| s.value().clone()) else {
            return false;
        };
        let removed = {
            let mut bucket = subs.bucket(session);
            let removed = bucket.remove(session);
            if removed {
                subs.count.fetch_sub(1, Ordering::AcqRel);
            }
            removed
        };
        if removed && subs.count.load(Ordering::Acquire) == 0 {
            // Retiring takes every bucket lock and checks the count again,
            // so an entry leaves the map only while truly empty, and a
            // concurrent follow that got the old entry sees it retired.
            self.channels
                .remove_if(channel, |_, s| Arc::ptr_eq(s, &subs) && s.try_retire());
        }
        removed
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
                for sub in lock(b).iter() {
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

    fn fan_out(&self, ev: &Arc<FeedEvent>) -> Fanout {
        let Some(subs) = self.channels.get(&ev.channel).map(|s| s.value().clone()) else {
            return Fanout::default();
        };
        if subs.count.load(Ordering::Relaxed) < PARALLEL_FANOUT_MIN || subs.buckets.len() == 1 {
            let mut total = Fanout::default();
            for b in subs.buckets.iter() {
                total += self.fan_bucket(&lock(b), ev);
            }
            return total;
        }
        std::thread::scope(|s| {
            let handles: Vec<_> = subs
                .buckets
                .iter()
                .map(|b| {
                    // Each thread shares its own copy of the event, so the
                    // reference count it bumps is not contended across cores.
                    let local = Arc::new(ev.share());
                    s.spawn(move || self.fan_bucket(&lock(b), &local))
                })
                .collect();
            let mut total = Fanout::default();
            for h in handles {
                match h.join() {
                    Ok(f) => total += f,
                    Err(_) => tracing::error!("fan-out thread panicked"),
                }
            }
            total
        })
    }

    fn fan_bucket(&self, set: &SubscriberSet, ev: &Arc<FeedEvent>) -> Fanout {
        let mut f = Fanout::default();
        for sub in set.iter() {
            if sub.outbox.push_event(ev) {
                f.delivered += 1;
            } else {
                f.lagged += 1;
            }
        }
        if f.delivered > 0 {
            // The outboxes take these bytes off again as their writers drain.
            metrics::gauge!(crate::metrics::QUEUE_BYTES)
                .increment((f.delivered * ev.frame.len()) as f64);
        }
        f
    }
}

#[cfg(test)]
mod tests;
