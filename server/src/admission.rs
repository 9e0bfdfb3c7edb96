//! Which QUIC handshakes the server takes on, and for how long: the policy
//! that keeps strangers' unanswered handshakes from locking followers out.
//!
//! A QUIC Initial packet costs a sender one datagram and costs the server a
//! TLS handshake (CPU) and a connection's state until the handshake ends.
//! Without a policy, a few hundred Initials that are never answered hold
//! every handshake slot until the idle timeout. So:
//!
//! - **Address validation under pressure.** While fewer than
//!   [`HandshakePolicy::retry_above`] handshakes are in progress, a new one
//!   is taken on at once. Above it, a sender that has not proved its address
//!   is sent a stateless Retry (a token, no state kept): a real client
//!   answers it within a round trip and comes back validated; a flood from
//!   spoofed or raw sockets that never reads its answers costs nothing more.
//! - **Per-address limits.** At most [`HandshakePolicy::per_address`]
//!   unvalidated and as many validated handshakes run at once per IP
//!   address. Over the unvalidated limit a sender is asked to validate
//!   (Retry); over the validated one it waits its turn (in the transport's
//!   bounded queue, within the timeout) until one of its address's
//!   handshakes ends: many real followers behind one address (a NAT)
//!   connect at that address's pace instead of being refused, and one
//!   address never holds more than its share of the slots. Counted
//!   separately, so an address's unvalidated flood never keeps its
//!   validated clients out.
//! - **A short handshake timeout.** A handshake that has not finished
//!   within [`HandshakePolicy::timeout`] of its start (seconds, not the
//!   minute-long idle timeout) is dropped, and so is an attempt that waited
//!   that long for a slot.
//! - **A hard cap** of [`HandshakePolicy::max_in_progress`] handshakes: an
//!   unvalidated sender is asked to validate first; a validated one waits
//!   for a slot (within its timeout) in the transport's bounded queue.
//!
//! Established connections are never touched by any of this.
//!
//! The policy decides; the transport's event loops (`crate::transport`)
//! carry the decision out with quinn-proto's `Endpoint::{accept, retry,
//! refuse}`, hold each handshake's [`Ticket`] until it ends, and enforce
//! the slots and the timeout. It lives apart from the endpoint so it can be
//! unit-tested alone and shared by every loop. Memory: one map entry per IP address with a handshake in
//! progress (removed when its last one ends), so bounded by the handshakes
//! in progress.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The numbers of the policy (from `[limits]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandshakePolicy {
    /// Most handshakes in progress at once.
    pub max_in_progress: usize,
    /// With this many in progress, unvalidated senders are sent a Retry
    /// first (0: always).
    pub retry_above: usize,
    /// Most unvalidated, and most validated, handshakes in progress per IP
    /// address.
    pub per_address: usize,
    /// A handshake (and its wait for a slot) must finish within this.
    pub timeout: Duration,
}

/// What to do with a new handshake.
#[derive(Debug)]
pub enum Decision {
    /// Take it on (wait for a slot with [`Ticket::slot`], then accept).
    Accept(Ticket),
    /// Send a stateless Retry: the sender must prove its address first.
    Retry,
    /// Refuse it (the sender is told at once).
    Refuse(&'static str),
    /// A validated sender over its address's limit: it waits (within the
    /// timeout) until one of its address's handshakes ends, then asks again.
    Wait,
}

/// Counts in progress per address, validated or not.
#[derive(Debug, Default, Clone, Copy)]
struct PerAddress {
    unvalidated: usize,
    validated: usize,
}

/// The policy's state. See the module docs.
#[derive(Debug)]
pub struct Admission {
    policy: HandshakePolicy,
    in_progress: AtomicUsize,
    per_address: Mutex<HashMap<IpAddr, PerAddress>>,
}

impl Admission {
    /// A policy with nothing in progress.
    pub fn new(policy: HandshakePolicy) -> Arc<Admission> {
        Arc::new(Admission {
            policy,
            in_progress: AtomicUsize::new(0),
            per_address: Mutex::new(HashMap::new()),
        })
    }

    /// The policy's numbers.
    pub fn policy(&self) -> HandshakePolicy {
        self.policy
    }

    /// Handshakes taken on and not yet ended (waiting for a slot included).
    pub fn in_progress(&self) -> usize {
        self.in_progress.load(Ordering::Relaxed)
    }

    /// Decides on a new handshake from `ip`. `validated`: the sender proved
    /// its address (it came back with a Retry token); `may_retry`: a Retry
    /// may still be sent (it has not been sent one already).
    pub fn decide(self: &Arc<Self>, ip: IpAddr, validated: bool, may_retry: bool) -> Decision {
        let p = self.policy;
        let mut map = self.per_address.lock().unwrap_or_else(|e| e.into_inner());
        let in_progress = self.in_progress.load(Ordering::Relaxed);
        let entry = map.get(&ip).copied().unwrap_or_default();
        if !validated && may_retry {
            let pressure = in_progress >= p.retry_above || in_progress >= p.max_in_progress;
            if pressure || entry.unvalidated >= p.per_address {
                return Decision::Retry;
            }
        }
        if validated && entry.validated >= p.per_address {
            return Decision::Wait;
        }
        if !validated && entry.unvalidated >= p.per_address {
            // A sender that may not be retried and cannot be validated.
            return Decision::Refuse("too many handshakes in progress from this address");
        }
        let e = map.entry(ip).or_default();
        if validated {
            e.validated += 1;
        } else {
            e.unvalidated += 1;
        }
        self.in_progress.fetch_add(1, Ordering::Relaxed);
        Decision::Accept(Ticket {
            admission: self.clone(),
            ip,
            validated,
        })
    }
}

/// One handshake taken on; gives its counts back when dropped.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    ip: IpAddr,
    validated: bool,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let a = &self.admission;
        a.in_progress.fetch_sub(1, Ordering::Relaxed);
        let mut map = a.per_address.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = map.get_mut(&self.ip) {
            if self.validated {
                e.validated = e.validated.saturating_sub(1);
            } else {
                e.unvalidated = e.unvalidated.saturating_sub(1);
            }
            if e.validated == 0 && e.unvalidated == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HandshakePolicy {
        HandshakePolicy {
            max_in_progress: 8,
            retry_above: 4,
            per_address: 2,
            timeout: Duration::from_secs(5),
        }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, n])
    }

    fn accept(d: Decision) -> Ticket {
        match d {
            Decision::Accept(t) => t,
            other => panic!("expected Accept, got {other:?}"),
        }
    }

    #[test]
    fn unvalidated_senders_are_retried_under_pressure_and_per_address() {
        let a = Admission::new(policy());
        // Per address: the third unvalidated handshake from one address is
        // asked to validate.
        let t1 = accept(a.decide(ip(1), false, true));
        let _t2 = accept(a.decide(ip(1), false, true));
        assert!(matches!(a.decide(ip(1), false, true), Decision::Retry));
        // Validated ones from that address are counted apart.
        let v1 = accept(a.decide(ip(1), true, false));
        // Under pressure (4 in progress): every unvalidated sender is retried.
        let _t3 = accept(a.decide(ip(2), false, true));
        assert_eq!(a.in_progress(), 4);
        assert!(matches!(a.decide(ip(3), false, true), Decision::Retry));
        // ... but a validated one is taken on.
        let _v2 = accept(a.decide(ip(3), true, false));
        // Over the validated per-address limit: refused.
        let _v3 = accept(a.decide(ip(1), true, false));
        assert!(matches!(a.decide(ip(1), true, false), Decision::Wait));
        // Ending handshakes gives their counts back.
        drop((t1, v1));
        assert_eq!(a.in_progress(), 4);
        drop((_t2, _t3, _v2, _v3));
        assert_eq!(a.in_progress(), 0);
        assert!(a.per_address.lock().unwrap().is_empty());
        accept(a.decide(ip(1), false, true));
    }

    #[test]
    fn retry_above_zero_always_validates_first() {
        let a = Admission::new(HandshakePolicy {
            retry_above: 0,
            ..policy()
        });
        assert!(matches!(a.decide(ip(1), false, true), Decision::Retry));
        accept(a.decide(ip(1), true, false));
    }
}
