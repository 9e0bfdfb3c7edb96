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

use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::Hub;
use crate::feed::FeedEvent;
use crate::model::Post;
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
    /// to fan out right behind it (the promoted slot).
    pub fn start(
        hub: Arc<Hub>,
        mut after_post: impl FnMut(&Post, usize) -> Option<Arc<FeedEvent>> + Send + 'static,
    ) -> std::io::Result<Arc<FanoutStage>> {
        let (tx, rx) = sync_channel::<Vec<LogEvent>>(FANOUT_QUEUE);
        let thread = std::thread::Builder::new()
            .name("herald-fanout".into())
            .spawn(move || {
                while let Ok(events) = rx.recv() {
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

impl Drop for FanoutStage {
    fn drop(&mut self) {
        self.close();
    }
}
