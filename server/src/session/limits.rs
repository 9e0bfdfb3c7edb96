//! Per-connection and per-follower limits: control frames per second and
//! follows per second (token buckets; a refused request answers an Error
//! frame with `rate_limited`, and a connection that keeps going over is
//! closed), and connections open at once per follower id.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use crate::config::Limits;
use crate::limits::Rate;

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Allow,
    /// Answer `rate_limited`; a token is there again after this long.
    Refuse(Duration),
    /// The connection went over too often: close it.
    Close,
}

/// One connection's rate state.
pub struct ConnLimits {
    control: Rate,
    follows: Rate,
    /// Refusals left before closing; refills one per second.
    strikes: Rate,
}

impl ConnLimits {
    /// Full buckets for a new connection.
    pub fn new(l: &Limits) -> ConnLimits {
        ConnLimits {
            control: Rate::new(l.control_frames_per_sec, l.control_frame_burst),
            follows: Rate::new(l.follows_per_sec, l.follow_burst),
            strikes: Rate::new(1.0, l.rate_limit_strikes),
        }
    }

    fn verdict(&self, r: Result<(), Duration>) -> Verdict {
        match r {
            Ok(()) => Verdict::Allow,
            Err(wait) => match self.strikes.take() {
                Ok(()) => Verdict::Refuse(wait),
                Err(_) => Verdict::Close,
            },
        }
    }

    /// Any control frame after Hello.
    pub fn control_frame(&self) -> Verdict {
        self.verdict(self.control.take())
    }

    /// A Follow request (also counted as a control frame).
    pub fn follow(&self) -> Verdict {
        self.verdict(self.follows.take())
    }
}

/// Connections open per follower id. An entry lives while the follower has
/// a connection ([`ConnectionSlot`] removes it on drop).
pub struct FollowerConnections {
    open: DashMap<String, usize>,
    max: usize,
}

impl FollowerConnections {
    /// An empty count that allows `max` connections per follower id.
    pub fn new(max: usize) -> Arc<FollowerConnections> {
        Arc::new(FollowerConnections {
            open: DashMap::new(),
            max,
        })
    }

    /// Counts a connection of `follower`; `None` if it has `max` already.
    pub fn enter(self: &Arc<Self>, follower: &str) -> Option<ConnectionSlot> {
        let mut n = self.open.entry(follower.to_string()).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(ConnectionSlot {
            owner: self.clone(),
            follower: follower.to_string(),
        })
    }

    /// Connections `follower` has open now.
    pub fn count(&self, follower: &str) -> usize {
        self.open.get(follower).map_or(0, |n| *n)
    }
}

/// One counted connection; uncounts itself when dropped.
pub struct ConnectionSlot {
    owner: Arc<FollowerConnections>,
    follower: String,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some(mut n) = self.owner.open.get_mut(&self.follower) {
            *n = n.saturating_sub(1);
        }
        self.owner.open.remove_if(&self.follower, |_, n| *n == 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_then_closes_when_it_goes_on() {
        let l = Limits {
            control_frames_per_sec: 1.0,
            control_frame_burst: 2,
            rate_limit_strikes: 2,
            ..Limits::default()
        };
        let c = ConnLimits::new(&l);
        assert_eq!(c.control_frame(), Verdict::Allow);
        assert_eq!(c.control_frame(), Verdict::Allow);
        assert!(matches!(c.control_frame(), Verdict::Refuse(_)));
        assert!(matches!(c.control_frame(), Verdict::Refuse(_)));
        assert_eq!(c.control_frame(), Verdict::Close);
    }

    #[test]
    fn connection_slots_count_and_release() {
        let f = FollowerConnections::new(2);
        let a = f.enter("u").unwrap();
        let _b = f.enter("u").unwrap();
        assert!(f.enter("u").is_none());
        assert!(f.enter("v").is_some());
        drop(a);
        assert_eq!(f.count("u"), 1);
        let c = f.enter("u");
        assert!(c.is_some());
        drop(c);
        drop(_b);
        assert_eq!(f.count("u"), 0);
        assert!(f.open.is_empty());
    }
}
