//! The fan-out stage: the log's committer hands each durable batch of events
//! here and answers its publishers at once; one thread (`herald-fanout`)
//! fans the batches out, in commit order, through [`Hub::publish_log_with`].
//! So a fan-out to a large channel never holds up the next commit, and
//! durable publish latency does not depend on how many followers a channel
//! has.
//!
//! Order: batches arrive in commit order (one committer) and are fanned out
//! one at a time, in arrival order, so the log's promise — committed events
//! reach the fan-out in commit order, after the channel's head moved — still
//! holds for the fan-out itself (see `feed::writer` for why that matters).
//!
//! Bound: at most [`FANOUT_QUEUE`] batches wait; beyond it the committer
//! waits (backpressure: commits slow down rather than events being dropped,
//! since a dropped event at a channel's tail would reach its followers only
//! with the next post).
//!
//! Heads: followers that take live posts as datagrams (protocol §8.5) could
//! lose a channel's *last* datagram with no later post to reveal it. So once
//! a channel has had no post for `head_after` since its last one, the stage
//! fans out a Head event (the channel's last seq), once; each such follower's
//! writer turns it into a Head frame on its stream, the others ignore it.
//! The channels waiting for theirs are at most those posted to within the
//! last `head_after`.

use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{sync_channel, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::Hub;
use crate::feed::FeedEvent;
use crate::model::{ChannelId, Post};
use crate::store::LogEvent;

/// Batches waiting for the fan-out thread at most.
pub const FANOUT_QUEUE: usize = 1024;

/// See the module docs.
pub struct FanoutStage {
    tx: Mutex<Option<SyncSender<Vec<LogEvent>>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl FanoutStage {
    /// Starts the thread. After each post, `after_post` may return an event
    /// to fan out right behind it (the promoted slot). With `head_after`, a
    /// channel quiet that long after a post gets a Head (see the module docs).
    pub fn start(
        hub: Arc<Hub>,
        head_after: Option<Duration>,
        mut after_post: impl FnMut(&Post, usize) -> Option<Arc<FeedEvent>> + Send + 'static,
    ) -> std::io::Result<Arc<FanoutStage>> {
        let (tx, rx) = sync_channel::<Vec<LogEvent>>(FANOUT_QUEUE);
        let thread = std::thread::Builder::new()
            .name("herald-fanout".into())
            .spawn(move || {
                let mut quiet = head_after.map(Quiet::new);
                loop {
                    let due = quiet.as_ref().and_then(Quiet::next_due);
                    let got = match due {
                        Some(at) => rx.recv_timeout(at.saturating_duration_since(Instant::now())),
                        None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                    };
                    let events = match got {
                        Ok(events) => Some(events),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => break,
                    };
                    if let Some(events) = events {
                        // A bug in fan-out must not stop the stage: the events
                        // are durable, and followers catch up from the log.
                        let run = std::panic::AssertUnwindSafe(|| {
                            hub.publish_log_with(&events, &mut after_post);
                        });
                        if std::panic::catch_unwind(run).is_err() {
                            tracing::error!(
                                events = events.len(),
                                "fan-out panicked; followers will catch up from the log"
                            );
                        }
                        if let Some(q) = quiet.as_mut() {
                            q.note(&events, Instant::now());
                        }
                    }
                    if let Some(q) = quiet.as_mut() {
                        let mut heads = 0u64;
                        while let Some(ev) = q.pop_due(Instant::now()) {
                            hub.publish_head(Arc::new(ev));
                            heads += 1;
                        }
                        if heads > 0 {
                            metrics::counter!(crate::metrics::HEADS).increment(heads);
                        }
                    }
                }
            })?;
        Ok(Arc::new(FanoutStage {
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
        }))
    }

    /// Queues a committed batch (waits while [`FANOUT_QUEUE`] batches wait).
    pub fn submit(&self, events: &[LogEvent]) {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match tx {
            Some(tx) => {
                if tx.send(events.to_vec()).is_err() {
                    tracing::error!("the fan-out thread is gone; followers catch up from the log");
                }
            }
            None => tracing::debug!("fan-out closed; batch not fanned out"),
        }
    }

    /// Fans out what is queued, then stops the thread and waits for it
    /// (blocking; the thread lets go of the hub and of what `after_post`
    /// holds).
    pub fn close(&self) {
        drop(self.tx.lock().unwrap_or_else(|p| p.into_inner()).take());
        let thread = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            if t.join().is_err() {
                tracing::error!("the fan-out thread panicked");
            }
        }
    }
}

/// The channels posted to within the last `after`, waiting for their Head.
struct Quiet {
    after: Duration,
    /// Per channel: its epoch, last seq and when it was fanned out.
    last: HashMap<ChannelId, (u64, u64, Instant)>,
    /// (when, channel) in fan-out order; an entry is stale once its channel
    /// has had a later post.
    order: VecDeque<(Instant, ChannelId)>,
}

impl Quiet {
    fn new(after: Duration) -> Quiet {
        Quiet {
            after,
            last: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn note(&mut self, events: &[LogEvent], now: Instant) {
        for ev in events {
            if let LogEvent::Posted(p) = ev {
                self.last.insert(p.channel.clone(), (p.epoch, p.seq, now));
                if self.order.back().is_none_or(|(_, c)| *c != p.channel) {
                    self.order.push_back((now, p.channel.clone()));
                } else if let Some(back) = self.order.back_mut() {
                    back.0 = now;
                }
            }
        }
    }

    /// When the oldest waiting entry is due.
    fn next_due(&self) -> Option<Instant> {
        self.order.front().map(|(t, _)| *t + self.after)
    }

    /// The next Head due at `now`, if any.
    fn pop_due(&mut self, now: Instant) -> Option<FeedEvent> {
        while let Some((t, _)) = self.order.front() {
            if *t + self.after > now {
                return None;
            }
            let (t, ch) = self.order.pop_front()?;
            match self.last.get(&ch) {
                Some(&(epoch, seq, last)) if last == t => {
                    self.last.remove(&ch);
                    return Some(FeedEvent::head(&ch, epoch, seq));
                }
                // A later post of the channel is waiting further back.
                _ => continue,
            }
        }
        None
    }
}

impl Drop for FanoutStage {
    fn drop(&mut self) {
        self.close();
    }
}
