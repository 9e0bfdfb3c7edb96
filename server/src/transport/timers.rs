//! One timer table per loop for all of its connections' QUIC timers (loss
//! detection, idle timeout, ACK delay, pacing, close). Public because the
//! load generator's follower loops (crate herald-loadtest) use the same one.
//!
//! quinn-proto reports one deadline per connection (`poll_timeout`); the
//! loop hands it over after driving the connection ([`Timers::set`]), and
//! [`Timers::pop_due`] gives back the slots whose deadline has come.
//!
//! Wake-up times are points of a grid (below), so the table is a sorted map
//! from a wake-up time to the slots due then: adding a deadline is a look-up
//! among a few hundred keys and a push onto a vector, and the slots due are
//! read in order from one vector. (A binary heap over 100k connections,
//! which this replaced, spent most of its time in cache misses sifting
//! entries down: about a tenth of the server's CPU with 100k idle
//! followers.) Three things keep it cheap when a loop holds 100k idle
//! connections, each resetting its idle timer on every keep-alive:
//!
//! - **Lazy moves.** A slot has at most one live heap entry (`queued`). A
//!   deadline that moves *later* (the idle timer, reset by each packet)
//!   adds nothing: when the old entry comes up, the slot is re-queued at
//!   its current deadline without touching the connection. Only a deadline
//!   that moves earlier adds an entry; the one it supersedes goes stale and
//!   is skipped when it comes up.
//! - **Slack that grows with distance** ([`Timers::scaled`], the server's
//!   loops). A deadline is rounded up to a grid of `slack` (2 ms) or, when
//!   it is further away, of the largest power-of-two multiple of `slack`
//!   not above an eighth of the distance (a 30 s idle timer: 2.048 s; a
//!   25 ms ACK delay: 2 ms). Timers fire at most that late, never early,
//!   and the many far deadlines of a loop fall on few grid points, so they
//!   cost few wake-ups. The grids nest (every coarse point is a fine one),
//!   so near and far timers share wake-ups too. The load generator uses a
//!   fixed grid ([`Timers::fixed`]): its followers' keep-alives must leave
//!   when each is due, as independent devices' would, not in bursts.
//!
//! Bound: stale entries are compacted away once the table holds more than
//! twice the queued slots (plus [`SLACK_ENTRIES`]), so it stays
//! O(connections); the per-slot state grows to the highest slot used.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Stale entries tolerated beyond twice the queued slots.
const SLACK_ENTRIES: usize = 1024;
/// Emptied bucket vectors kept for reuse.
const SPARE_BUCKETS: usize = 64;

/// A slot's timer state.
#[derive(Clone, Copy, Default)]
struct SlotTimer {
    /// The generation of the connection in the slot.
    gen: u64,
    /// The connection's current deadline (quinn-proto's `poll_timeout`).
    due: Option<Instant>,
    /// The wake-up time of the slot's live entry, if it has one.
    queued: Option<Instant>,
}

/// The deadlines of a loop's connections, by slot.
pub struct Timers {
    /// Wake-up time to the slots (and generations) queued for it.
    buckets: BTreeMap<Instant, Vec<(usize, u64)>>,
    /// Entries in `buckets`, live and stale.
    entries: usize,
    /// The bucket being handed out by `pop_due`, its time, and how far.
    draining: Vec<(usize, u64)>,
    draining_at: Instant,
    drained: usize,
    /// Emptied vectors, reused for new buckets.
    spare: Vec<Vec<(usize, u64)>>,
    slots: Vec<SlotTimer>,
    /// Slots with a live entry.
    queued: usize,
    /// Origin of the grids.
    epoch: Instant,
    /// The finest grid.
    slack: Duration,
    /// Whether far deadlines get a coarser grid.
    scaled: bool,
}

impl Timers {
    /// Empty; deadlines are rounded up to a grid of `slack` from `epoch`,
    /// far ones to a coarser grid (see the module docs).
    pub fn scaled(epoch: Instant, slack: Duration) -> Timers {
        Timers::new(epoch, slack, true)
    }

    /// Empty; every deadline is rounded up to a grid of `slack` from
    /// `epoch`.
    pub fn fixed(epoch: Instant, slack: Duration) -> Timers {
        Timers::new(epoch, slack, false)
    }

    fn new(epoch: Instant, slack: Duration, scaled: bool) -> Timers {
        Timers {
            buckets: BTreeMap::new(),
            entries: 0,
            draining: Vec::new(),
            draining_at: epoch,
            drained: 0,
            spare: Vec::new(),
            slots: Vec::new(),
            queued: 0,
            epoch,
            slack: slack.max(Duration::from_micros(1)),
            scaled,
        }
    }

    /// The time to wake up for `due`, seen at `now`: `due` rounded up to
    /// its grid (see the module docs).
    pub fn wake_time(&self, due: Instant, now: Instant) -> Instant {
        let slack = self.slack.as_nanos() as u64;
        let grid = if self.scaled {
            let eighth = due.saturating_duration_since(now).as_nanos() as u64 / 8;
            let units = (eighth / slack).max(1);
            // The largest power of two not above `units`.
            slack << (63 - units.leading_zeros())
        } else {
            slack
        };
        // In nanoseconds: rounding in coarser units could land before `due`.
        let since = due.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.epoch + Duration::from_nanos(since.div_ceil(grid) * grid)
    }

    /// Records the deadline of the connection in `slot` (generation `gen`)
    /// after it was driven at `now`. A new generation replaces the slot's
    /// state.
    pub fn set(&mut self, slot: usize, gen: u64, due: Option<Instant>, now: Instant) {
        if self.slots.len() <= slot {
            self.slots.resize(slot + 1, SlotTimer::default());
        }
        if self.slots[slot].gen != gen {
            self.clear(slot);
            self.slots[slot].gen = gen;
        }
        self.slots[slot].due = due;
        let Some(due) = due else { return };
        let wake = self.wake_time(due, now);
        let s = &mut self.slots[slot];
        match s.queued {
            Some(q) if q <= wake => {} // the live entry comes up first
            old => {
                if old.is_none() {
                    self.queued += 1;
                }
                s.queued = Some(wake);
                self.add(wake, slot, gen);
                self.compact();
            }
        }
    }

    /// Forgets `slot` (its connection is gone).
    pub fn clear(&mut self, slot: usize) {
        if let Some(s) = self.slots.get_mut(slot) {
            if s.queued.is_some() {
                self.queued -= 1;
            }
            *s = SlotTimer::default();
        }
    }

    /// The earliest wake-up (possibly of a stale entry: waking early is
    /// harmless).
    pub fn next(&self) -> Option<Instant> {
        let draining = (self.drained < self.draining.len()).then_some(self.draining_at);
        let first = self.buckets.first_key_value().map(|(t, _)| *t);
        draining.into_iter().chain(first).min()
    }

    fn add(&mut self, wake: Instant, slot: usize, gen: u64) {
        let spare = &mut self.spare;
        self.buckets
            .entry(wake)
            .or_insert_with(|| spare.pop().unwrap_or_default())
            .push((slot, gen));
        self.entries += 1;
    }

    /// A slot (and its generation) whose deadline is due at `now`, until
    /// none is left. The caller handles the connection's timeout and then
    /// [`Timers::set`]s its next deadline. A slot whose deadline has moved
    /// later is re-queued here.
    pub fn pop_due(&mut self, now: Instant) -> Option<(usize, u64)> {
        loop {
            if self.drained == self.draining.len() {
                let first = self.buckets.first_entry()?;
                if *first.key() > now {
                    return None;
                }
                let (at, next) = first.remove_entry();
                self.entries -= next.len();
                let mut done = std::mem::replace(&mut self.draining, next);
                done.clear();
                if self.spare.len() < SPARE_BUCKETS {
                    self.spare.push(done);
                }
                self.draining_at = at;
                self.drained = 0;
                continue;
            }
            let (slot, gen) = self.draining[self.drained];
            self.drained += 1;
            let t = self.draining_at;
            let Some(s) = self.slots.get_mut(slot) else {
                continue;
            };
            if s.gen != gen || s.queued != Some(t) {
                continue; // stale entry
            }
            s.queued = None;
            match s.due {
                Some(d) if d <= now => {
                    self.queued -= 1;
                    return Some((slot, gen));
                }
                Some(d) => {
                    // Moved later: queue it again, on its own grid (which
                    // is past `now`, as `d` is, so this ends).
                    let wake = self.wake_time(d, now);
                    debug_assert!(wake > now);
                    self.slots[slot].queued = Some(wake);
                    self.add(wake, slot, gen);
                }
                None => self.queued -= 1,
            }
        }
    }

    /// Rebuilds the table from the live entries when stale ones pile up.
    fn compact(&mut self) {
        if self.len() <= 2 * self.queued + SLACK_ENTRIES {
            return;
        }
        self.buckets.clear();
        self.entries = 0;
        self.draining.clear();
        self.drained = 0;
        for h in 0..self.slots.len() {
            let s = self.slots[h];
            if let Some(q) = s.queued {
                self.add(q, h, s.gen);
            }
        }
    }

    /// Entries held, live and stale.
    fn len(&self) -> usize {
        self.entries + self.draining.len() - self.drained
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn timers(t0: Instant) -> Timers {
        Timers::scaled(t0, 2 * MS)
    }

    #[test]
    fn near_deadlines_round_up_to_the_fine_grid_and_never_fire_early() {
        let t0 = Instant::now();
        let t = timers(t0);
        assert_eq!(t.wake_time(t0 + 3 * MS, t0), t0 + 4 * MS);
        assert_eq!(t.wake_time(t0 + 4 * MS, t0), t0 + 4 * MS);
        // 25 ms away: an eighth is 3.1 ms, so still the 2 ms grid.
        assert_eq!(t.wake_time(t0 + 25 * MS, t0), t0 + 26 * MS);
        // 30 s away: an eighth is 3.75 s; the grid is 1,024 x 2 ms.
        let far = t.wake_time(t0 + 30_000 * MS, t0);
        assert_eq!(far, t0 + 30_720 * MS);
        let fixed = Timers::fixed(t0, 2 * MS);
        for ms in [1u64, 7, 100, 999, 5_000, 60_000] {
            let due = t0 + Duration::from_millis(ms);
            let w = t.wake_time(due, t0);
            assert!(w >= due, "{ms} ms fired early");
            assert!(w - due <= (due - t0) / 8 + 2 * MS, "{ms} ms too late");
            let w = fixed.wake_time(due, t0);
            assert!(w >= due && w - due < 2 * MS, "{ms} ms off the fixed grid");
        }
    }

    #[test]
    fn a_deadline_off_the_microsecond_grid_still_rounds_up() {
        let t0 = Instant::now();
        let t = timers(t0);
        let due = t0 + 2 * MS + Duration::from_nanos(500);
        assert_eq!(t.wake_time(due, t0), t0 + 4 * MS);
        // Re-queued while not yet due: it is not handed out early, and
        // comes up at its grid point.
        let mut t = timers(t0);
        t.set(1, 1, Some(t0 + MS), t0);
        t.set(1, 1, Some(due), t0);
        let now = t0 + 2 * MS + Duration::from_nanos(200);
        assert_eq!(t.pop_due(now), None);
        assert_eq!(t.pop_due(t0 + 4 * MS), Some((1, 1)));
    }

    #[test]
    fn pops_due_slots_in_order() {
        let t0 = Instant::now();
        let mut t = timers(t0);
        t.set(1, 1, Some(t0 + 5 * MS), t0);
        t.set(2, 1, Some(t0 + MS), t0);
        assert_eq!(t.next(), Some(t0 + 2 * MS));
        assert!(t.pop_due(t0).is_none());
        let due = t0 + 10 * MS;
        assert_eq!(t.pop_due(due), Some((2, 1)));
        assert_eq!(t.pop_due(due), Some((1, 1)));
        assert!(t.pop_due(due).is_none());
        assert!(t.next().is_none());
    }

    #[test]
    fn a_deadline_moved_later_pushes_nothing_and_is_requeued_when_it_comes_up() {
        let t0 = Instant::now();
        let mut t = timers(t0);
        t.set(3, 1, Some(t0 + 10 * MS), t0);
        t.set(3, 1, Some(t0 + 20 * MS), t0);
        assert_eq!(t.len(), 1);
        // The old entry comes up: not due, queued again at the new time.
        assert!(t.pop_due(t0 + 10 * MS).is_none());
        assert_eq!(t.next(), Some(t0 + 20 * MS));
        assert_eq!(t.pop_due(t0 + 20 * MS), Some((3, 1)));
    }

    #[test]
    fn a_deadline_moved_earlier_fires_once_and_the_superseded_entry_is_stale() {
        let t0 = Instant::now();
        let mut t = timers(t0);
        t.set(4, 1, Some(t0 + 20 * MS), t0);
        t.set(4, 1, Some(t0 + 4 * MS), t0);
        assert_eq!(t.pop_due(t0 + 30 * MS), Some((4, 1)));
        assert!(t.pop_due(t0 + 30 * MS).is_none());
        // Cleared, a new generation, or no deadline: nothing fires.
        t.set(5, 1, Some(t0 + 2 * MS), t0);
        t.clear(5);
        t.set(6, 1, Some(t0 + 2 * MS), t0);
        t.set(6, 2, Some(t0 + 8 * MS), t0);
        t.set(7, 1, Some(t0 + 2 * MS), t0);
        t.set(7, 1, None, t0);
        assert_eq!(t.pop_due(t0 + 4 * MS), None);
        assert_eq!(t.pop_due(t0 + 8 * MS), Some((6, 2)));
        assert_eq!(t.queued, 0);
    }

    #[test]
    fn stale_entries_are_compacted() {
        let t0 = Instant::now();
        let mut t = timers(t0);
        let n = SLACK_ENTRIES as u32 + 10;
        for i in 0..n {
            // Each earlier than the last (and near, so on the 2 ms grid):
            // every push supersedes one.
            let due = t0 + 2 * MS * (n - i + 1);
            t.set(7, 1, Some(due), due - MS);
        }
        assert!(t.len() <= SLACK_ENTRIES + 2, "{}", t.len());
        assert_eq!(t.queued, 1);
    }
}
