//! How the application wakes an event loop: each loop has a list of the
//! connections the application changed ("dirty"), a flag saying a wake-up is
//! pending, and an `eventfd` the loop polls together with its socket.
//!
//! A fan-out round that touches thousands of connections of one loop costs
//! one `eventfd` write, not one per connection: a connection is put on the
//! dirty list only when its `scheduled` flag was clear, and the eventfd is
//! written only when the loop's `wake_pending` flag was clear.
//!
//! # No lost wake-up
//!
//! A producer first changes the connection's shared state, then sets the
//! connection's `scheduled` flag and, if it was clear, appends the connection
//! to the dirty list and then sets the loop's `wake_pending` flag, writing the
//! eventfd only if that flag was clear. The loop, only when `poll(2)` says
//! the eventfd is readable, first drains the eventfd, *then* clears
//! `wake_pending`, *then* takes the dirty list; and it clears a connection's
//! `scheduled` *before* it reads that connection's state. So:
//!
//! - a producer that found `wake_pending` set (and wrote nothing) appended
//!   its entry before the loop cleared the flag, hence before the loop took
//!   the list: the entry is taken in this turn;
//! - a producer that found it clear wrote the eventfd after setting it; if
//!   that write came after the loop drained, the eventfd stays readable and
//!   the next `poll(2)` returns at once;
//! - any change to a connection made after the loop read its state finds
//!   `scheduled` clear and schedules it again.
//!
//! (Clearing the flag *before* draining would lose a wake-up: a producer
//! could set the flag and write between the two, the drain would swallow
//! that write, and every later producer would see the flag set and write
//! nothing, leaving their entries on the list until some other event.)
//!
//! Bound: the dirty list holds each connection at most once (its `scheduled`
//! flag), so it never exceeds the loop's connections.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use bytes::Bytes;
use quinn_proto::VarInt;

/// Locks `m`, ignoring poisoning: every critical section in the transport is
/// a handful of field updates that leave the state consistent.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Counters of one loop, written by the loop once per turn.
#[derive(Default)]
pub(super) struct AtomicStats {
    pub(super) turns: AtomicU64,
    pub(super) datagrams_in: AtomicU64,
    pub(super) tx_syscalls: AtomicU64,
    pub(super) tx_messages: AtomicU64,
    pub(super) tx_datagrams: AtomicU64,
    pub(super) tx_dropped: AtomicU64,
    pub(super) connections: AtomicU64,
}

/// What one loop shares with the application.
pub(super) struct LoopShared {
    /// Connections the application changed: (slot, generation).
    pub(super) dirty: Mutex<Vec<(usize, u64)>>,
    pub(super) wake_pending: AtomicBool,
    eventfd: OwnedFd,
    /// Set once by [`Transport::shutdown`](super::Transport::shutdown).
    pub(super) shutdown: Mutex<Option<(VarInt, Bytes)>>,
    pub(super) stats: AtomicStats,
}

impl LoopShared {
    pub(super) fn new() -> std::io::Result<LoopShared> {
        // SAFETY: plain eventfd creation; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(LoopShared {
            dirty: Mutex::new(Vec::new()),
            wake_pending: AtomicBool::new(false),
            // SAFETY: `efd` is a fresh descriptor that nothing else owns.
            eventfd: unsafe { OwnedFd::from_raw_fd(efd) },
            shutdown: Mutex::new(None),
            stats: AtomicStats::default(),
        })
    }

    /// The descriptor the loop polls.
    pub(super) fn eventfd(&self) -> std::os::fd::RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Wakes the loop unless a wake-up is pending already.
    pub(super) fn wake(&self) {
        if !self.wake_pending.swap(true, Ordering::SeqCst) {
            self.force_wake();
        }
    }

    /// Writes the eventfd whatever the flag says.
    pub(super) fn force_wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64 to our eventfd. A full
        // counter (EAGAIN) means a wake-up is pending anyway.
        unsafe {
            libc::write(self.eventfd.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }

    /// Takes the eventfd's count (the loop, after clearing `wake_pending`).
    pub(super) fn drain_eventfd(&self) {
        let mut v = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a local buffer from our
        // non-blocking eventfd.
        unsafe {
            libc::read(self.eventfd.as_raw_fd(), v.as_mut_ptr().cast(), 8);
        }
    }

    /// Puts connection (`slot`, `gen`) on the dirty list unless it is there,
    /// and wakes the loop.
    pub(super) fn schedule(&self, scheduled: &AtomicBool, slot: usize, gen: u64) {
        if !scheduled.swap(true, Ordering::SeqCst) {
            lock(&self.dirty).push((slot, gen));
            self.wake();
        }
    }
}
