//! The threads that fan large channels out bucket by bucket: started once
//! (at the first large fan-out) and kept, so no OS thread is spawned per
//! post. The fan-out stage hands each thread one bucket's job per event and
//! waits for all of them before the next event, so a channel's events reach
//! every outbox in order.
//!
//! Bound: each thread's job queue holds [`JOBS_PER_THREAD`] jobs; the single
//! submitter waits for every job of an event before submitting more, so it
//! never holds more than one.

use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

/// Jobs queued per thread at most.
pub const JOBS_PER_THREAD: usize = 4;

/// One bucket's fan-out.
pub type Job = Box<dyn FnOnce() + Send>;

/// See the module docs.
pub struct Pool {
    workers: Vec<(SyncSender<Job>, Option<JoinHandle<()>>)>,
}

impl Pool {
    /// Starts `n` threads (fewer if the OS refuses some; their jobs then run
    /// on the caller, see [`Pool::run`]).
    pub fn new(n: usize) -> Pool {
        let mut workers = Vec::with_capacity(n);
        for i in 0..n {
            let (tx, rx) = sync_channel::<Job>(JOBS_PER_THREAD);
            let spawned = std::thread::Builder::new()
                .name(format!("herald-fanout-{}", i + 1))
                .spawn(move || {
                    while let Ok(job) = rx.recv() {
                        // A panicking job drops its result sender: the
                        // submitter sees it and goes on.
                        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err() {
                            tracing::error!("fan-out job panicked");
                        }
                    }
                });
            match spawned {
                Ok(h) => workers.push((tx, Some(h))),
                Err(e) => tracing::warn!(error = %e, "cannot start a fan-out thread"),
            }
        }
        Pool { workers }
    }

    /// Queues `job` on thread `i` (modulo the threads running); `false` if
    /// there is no thread to run it.
    pub fn run(&self, i: usize, job: Job) -> bool {
        if self.workers.is_empty() {
            return false;
        }
        let (tx, _) = &self.workers[i % self.workers.len()];
        tx.send(job).is_ok()
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let handles: Vec<_> = self
            .workers
            .iter_mut()
            .filter_map(|(_, h)| h.take())
            .collect();
        // Closing the queues ends the threads.
        self.workers.clear();
        for h in handles {
            let _ = h.join();
        }
    }
}
