//! Rate limits, on `governor` (GCRA, one atomic word per limiter): the
//! per-key publish limiter of the HTTP API ([`PublishLimiter`]), and the
//! [`Rate`] a session keeps per connection for control frames, follows and
//! strikes.
//!
//! Rates are configured as a float per second (`0.5` is one every two
//! seconds) plus a burst; [`quota`] turns them into governor's quota.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

/// Governor's plain middleware on the std clock.
type Plain = NoOpMiddleware<std::time::Instant>;

/// `per_sec` events per second, `burst` at once. Rates are validated as
/// positive and finite by the configuration; anything else is clamped.
pub fn quota(per_sec: f64, burst: u32) -> Quota {
    let period = if per_sec.is_finite() && per_sec > 0.0 {
        Duration::from_secs_f64((1.0 / per_sec).min(86_400.0))
    } else {
        Duration::from_secs(86_400)
    };
    Quota::with_period(period.max(Duration::from_nanos(1)))
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN))
}

/// One rate (a token bucket, as far as callers can tell).
pub struct Rate {
    limiter: RateLimiter<NotKeyed, InMemoryState, MonotonicClock, Plain>,
}

impl Rate {
    /// A full bucket of `burst`, refilling at `per_sec`.
    pub fn new(per_sec: f64, burst: u32) -> Rate {
        Rate {
            limiter: RateLimiter::direct_with_clock(quota(per_sec, burst), MonotonicClock),
        }
    }

    /// Takes one, or says how long until one is there.
    pub fn take(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(MonotonicClock.now()))
    }
}

/// Publish rate per API key. One state word per key id that has published;
/// the map is bounded by the number of keys.
pub struct PublishLimiter {
    limiter: RateLimiter<String, DashMapStateStore<String>, MonotonicClock, Plain>,
}

impl PublishLimiter {
    /// `rate` publishes per second per key, `burst` at once.
    pub fn new(rate: f64, burst: u32) -> PublishLimiter {
        PublishLimiter {
            limiter: RateLimiter::dashmap_with_clock(quota(rate, burst), MonotonicClock),
        }
    }

    /// Takes one publish for `key_id`; `Err(retry_after)` when over the rate.
    pub fn check(&self, key_id: &str) -> Result<(), Duration> {
        self.limiter
            .check_key(&key_id.to_string())
            .map_err(|not_until| not_until.wait_time_from(MonotonicClock.now()))
    }
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

    #[test]
    fn burst_then_rate() {
        let r = Rate::new(20.0, 3);
        for _ in 0..3 {
            assert!(r.take().is_ok());
        }
        let wait = r.take().unwrap_err();
        assert!(wait <= Duration::from_millis(50), "{wait:?}");
        std::thread::sleep(wait + Duration::from_millis(5));
        assert!(r.take().is_ok());
        assert!(r.take().is_err());
    }

    #[test]
    fn fractional_and_odd_rates_make_a_quota() {
        assert_eq!(quota(0.5, 1).replenish_interval(), Duration::from_secs(2));
        assert_eq!(quota(0.0, 0).burst_size().get(), 1);
        assert!(quota(f64::NAN, 5).replenish_interval() >= Duration::from_secs(1));
        assert!(quota(1e12, 5).replenish_interval() >= Duration::from_nanos(1));
    }
}
