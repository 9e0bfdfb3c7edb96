//! Rate limits: a token bucket, and the per-key publish limiter of the HTTP
//! API. Sessions keep their own buckets (one per connection, no sharing).

mod bucket;

pub use bucket::TokenBucket;

use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashmap::DashMap;

/// Publish rate per API key. One bucket per key id that has published; the
/// map is bounded by the number of keys.
pub struct PublishLimiter {
    rate: f64,
    burst: u32,
    buckets: DashMap<String, Mutex<TokenBucket>>,
}

impl PublishLimiter {
    pub fn new(rate: f64, burst: u32) -> PublishLimiter {
        PublishLimiter {
            rate,
            burst,
            buckets: DashMap::new(),
        }
    }

    /// Takes one publish for `key_id`; `Err(retry_after)` when over the rate.
    pub fn check(&self, key_id: &str) -> Result<(), Duration> {
        let now = Instant::now();
        if let Some(b) = self.buckets.get(key_id) {
            return take(&b, now);
        }
        let entry = self
            .buckets
            .entry(key_id.to_string())
            .or_insert_with(|| Mutex::new(TokenBucket::new(self.rate, self.burst, now)));
        take(&entry, now)
    }
}

fn take(b: &Mutex<TokenBucket>, now: Instant) -> Result<(), Duration> {
    // A poisoned bucket is still a valid pair of numbers.
    b.lock().unwrap_or_else(|p| p.into_inner()).try_take(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_key_buckets_are_independent() {
        let l = PublishLimiter::new(1.0, 2);
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_ok());
        let wait = l.check("a").unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(l.check("b").is_ok());
    }
}
