//! One timer heap per loop for all of its connections' QUIC timers (loss
//! detection, idle timeout, ACK delay, pacing, close). Public because the
//! load generator's follower loops (crate herald-loadtest) use the same heap.
//!
//! quinn-proto reports one deadline per connection (`poll_timeout`); each
//! time it changes the loop pushes the new one. An entry is `(deadline,
//! slot, generation)`; it is stale when the connection's current deadline or
//! generation differs, and is skipped when it comes up. Bound: stale entries
//! are compacted away once the heap holds more than twice the live
//! connections (plus slack), so the heap stays O(connections).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

/// Stale entries tolerated beyond twice the live connections.
const SLACK: usize = 1024;

/// A min-heap of `(deadline, slot, generation)` with lazy deletion.
#[derive(Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, usize, u64)>>,
}

impl Timers {
    /// Adds a deadline for `slot` in its generation `gen`.
    pub fn push(&mut self, at: Instant, slot: usize, gen: u64) {
        self.heap.push(Reverse((at, slot, gen)));
    }

    /// The earliest deadline (possibly stale: waking early is harmless).
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((t, _, _))| *t)
    }

    /// Pops an entry due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, usize, u64)> {
        match self.heap.peek() {
            Some(Reverse((t, _, _))) if *t <= now => self.heap.pop().map(|Reverse(e)| e),
            _ => None,
        }
    }

    /// Rebuilds the heap from the live deadlines when stale entries pile up.
    pub fn compact(&mut self, live: usize, current: impl FnOnce() -> Vec<(Instant, usize, u64)>) {
        if self.heap.len() > 2 * live + SLACK {
            self.heap = current().into_iter().map(Reverse).collect();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn pops_in_deadline_order_and_compacts() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        t.push(t0 + Duration::from_millis(5), 1, 1);
        t.push(t0 + Duration::from_millis(1), 2, 1);
        assert_eq!(t.next(), Some(t0 + Duration::from_millis(1)));
        assert!(t.pop_due(t0).is_none());
        let due = t0 + Duration::from_millis(10);
        assert_eq!(t.pop_due(due).map(|e| e.1), Some(2));
        assert_eq!(t.pop_due(due).map(|e| e.1), Some(1));
        assert!(t.pop_due(due).is_none());
        for i in 0..(SLACK + 10) {
            t.push(t0, i, 1);
        }
        t.compact(1, || vec![(t0, 7, 1)]);
        assert_eq!(t.pop_due(due).map(|e| e.1), Some(7));
        assert!(t.next().is_none());
    }
}
