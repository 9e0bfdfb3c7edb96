//! Checking what was measured: every follower must have received every
//! published post of each channel it follows exactly once, in seq order,
//! within the timeout. Anything else is a violation, counted by kind, with a
//! few examples for the operator.

use serde::Serialize;

use crate::follower::FollowerResult;

/// Most example lines kept in a report.
pub const MAX_EXAMPLES: usize = 10;

/// Violations found, by kind. `ok` is true only when every count is zero.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    pub ok: bool,
    /// Followers that could not connect or follow.
    pub connect_failures: u64,
    /// Followers that ended before the run did.
    pub closed_early: u64,
    /// Posts the API refused.
    pub publish_failures: u64,
    /// Follower-channel pairs that did not reach the channel's head in time.
    pub incomplete: u64,
    /// Posts never received (skipped over, or not arrived in time).
    pub missing: u64,
    /// Of `missing`: seqs skipped over by a later post (a gap).
    pub gaps: u64,
    /// Posts received at or below an already received seq.
    pub out_of_order: u64,
    /// Duplicates the client library dropped before the tally saw them.
    pub duplicates: u64,
    /// Posts on channels not followed or beyond what was published.
    pub unexpected: u64,
    /// History resets and error events on followers.
    pub resets: u64,
    pub errors: u64,
    /// Reconnects (not a violation; resumed feeds must still verify).
    pub disconnects: u64,
    pub examples: Vec<String>,
}

/// Checks `results` against the acknowledged `heads` per channel.
pub fn verify(results: &[FollowerResult], heads: &[u64], publish_failures: u64) -> Verdict {
    let mut v = Verdict {
        publish_failures,
        ..Verdict::default()
    };
    let example = |v: &mut Verdict, s: String| {
        if v.examples.len() < MAX_EXAMPLES {
            v.examples.push(s);
        }
    };
    if publish_failures > 0 {
        example(&mut v, format!("{publish_failures} publishes failed"));
    }
    for (i, r) in results.iter().enumerate() {
        if !r.connected {
            v.connect_failures += 1;
            let e = r.error.clone().unwrap_or_default();
            example(&mut v, format!("follower {i}: not connected: {e}"));
            continue;
        }
        if let Some(reason) = &r.closed {
            v.closed_early += 1;
            example(&mut v, format!("follower {i}: closed early: {reason}"));
        }
        v.unexpected += r.unexpected;
        v.resets += r.resets;
        v.errors += r.errors;
        v.disconnects += r.disconnects;
        v.duplicates += r.client_duplicates;
        if r.client_duplicates > 0 {
            let n = r.client_duplicates;
            example(&mut v, format!("follower {i}: {n} duplicate posts"));
        }
        for t in &r.channels {
            let head = heads.get(t.channel).copied().unwrap_or(0);
            let expected = head.saturating_sub(t.start);
            let late = head.saturating_sub(t.last);
            v.gaps += t.gaps;
            v.missing += t.gaps + late;
            v.out_of_order += t.out_of_order;
            if late > 0 {
                v.incomplete += 1;
            }
            if t.gaps > 0 || late > 0 || t.out_of_order > 0 || t.received > expected {
                example(
                    &mut v,
                    format!(
                        "follower {i} channel {}: expected {expected} posts after seq {}, \
                         received {} (last seq {}, {} skipped, {} not arrived, {} out of order)",
                        t.channel, t.start, t.received, t.last, t.gaps, late, t.out_of_order
                    ),
                );
            }
        }
    }
    v.ok = v.connect_failures == 0
        && v.closed_early == 0
        && v.publish_failures == 0
        && v.incomplete == 0
        && v.missing == 0
        && v.out_of_order == 0
        && v.duplicates == 0
        && v.unexpected == 0
        && v.resets == 0
        && v.errors == 0;
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::follower::ChannelTally;

    fn follower(tallies: Vec<ChannelTally>) -> FollowerResult {
        FollowerResult {
            connected: true,
            channels: tallies,
            ..FollowerResult::default()
        }
    }

    #[test]
    fn clean_run_is_ok() {
        let r = follower(vec![ChannelTally {
            channel: 0,
            start: 0,
            last: 5,
            received: 5,
            ..ChannelTally::default()
        }]);
        let v = verify(&[r], &[5], 0);
        assert!(v.ok, "{v:?}");
    }

    #[test]
    fn gap_and_late_are_violations() {
        let gap = follower(vec![ChannelTally {
            channel: 0,
            start: 0,
            last: 5,
            received: 4,
            gaps: 1,
            ..ChannelTally::default()
        }]);
        let late = follower(vec![ChannelTally {
            channel: 0,
            start: 0,
            last: 3,
            received: 3,
            ..ChannelTally::default()
        }]);
        let v = verify(&[gap, late], &[5], 0);
        assert!(!v.ok);
        assert_eq!((v.gaps, v.missing, v.incomplete), (1, 3, 1));
        assert_eq!(v.examples.len(), 2);
    }
}
