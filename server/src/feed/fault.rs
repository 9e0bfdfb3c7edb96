//! Test-only fault injection (feature `fault-injection`): with
//! `HERALD_FAULT_SKIP_DELIVERY=N` set, the N-th live post delivery of the
//! whole process is silently skipped, so tests can prove that the load tester
//! detects a missing delivery. Never compiled into a normal build.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Whether this live post delivery is the one to drop.
pub fn skip_delivery() -> bool {
    static TARGET: OnceLock<u64> = OnceLock::new();
    let target = *TARGET.get_or_init(|| {
        std::env::var("HERALD_FAULT_SKIP_DELIVERY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    target != 0 && COUNTER.fetch_add(1, Ordering::Relaxed) + 1 == target
}
