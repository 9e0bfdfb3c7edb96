//! A node-local, bounded map from channel seq to stream sequence.
//!
//! JetStream finds messages by stream sequence; Herald asks by channel seq.
//! The pair (channel seq, stream seq) of a post never changes, so any pair
//! seen (from the fan-out consumer, an append's ack, or a read) is a fact that
//! can be kept: a later lookup starts from the nearest known pair at or below
//! the seq wanted, and only a lookup far from any known pair needs a binary
//! search over the stream (see `JetStreamLog::locate`). Per channel at most
//! [`POINTS`] pairs are kept; when full, every other pair among the older half
//! is dropped, so recent posts stay dense and older ones thin out
//! geometrically. Memory: ~[`POINTS`] x 16 B per channel ever looked up.

use std::collections::BTreeMap;

use dashmap::DashMap;

use crate::model::ChannelId;

/// Most pairs kept per channel.
pub const POINTS: usize = 128;

#[derive(Default)]
pub struct SeqIndex {
    map: DashMap<ChannelId, BTreeMap<u64, u64>>,
}

impl SeqIndex {
    /// Records that post `seq` of `ch` is at stream sequence `sseq`.
    pub fn note(&self, ch: &ChannelId, seq: u64, sseq: u64) {
        let mut e = self.map.entry(ch.clone()).or_default();
        e.insert(seq, sseq);
        if e.len() > POINTS {
            let old: Vec<u64> = e.keys().take(POINTS / 2).copied().collect();
            for k in old.iter().skip(1).step_by(2) {
                e.remove(k);
            }
        }
    }

    /// The known pair with the greatest seq <= `seq`.
    pub fn at_or_below(&self, ch: &ChannelId, seq: u64) -> Option<(u64, u64)> {
        let e = self.map.get(ch)?;
        e.range(..=seq).next_back().map(|(a, b)| (*a, *b))
    }

    /// The known pair with the smallest seq > `seq`.
    pub fn above(&self, ch: &ChannelId, seq: u64) -> Option<(u64, u64)> {
        let e = self.map.get(ch)?;
        e.range(seq.saturating_add(1)..)
            .next()
            .map(|(a, b)| (*a, *b))
    }

    /// Forgets pairs below `seq` (trimmed posts).
    pub fn forget_below(&self, ch: &ChannelId, seq: u64) {
        if let Some(mut e) = self.map.get_mut(ch) {
            let keep = e.split_off(&seq);
            *e = keep;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_and_thinning() {
        let ix = SeqIndex::default();
        let ch = ChannelId::parse("c").unwrap();
        for s in 1..=1000u64 {
            ix.note(&ch, s, s * 10);
        }
        assert_eq!(ix.at_or_below(&ch, 1000), Some((1000, 10000)));
        assert_eq!(ix.above(&ch, 999), Some((1000, 10000)));
        let len = ix.map.get(&ch).unwrap().len();
        assert!(len <= POINTS, "{len}");
        // Older pairs are sparser but still bound every lookup.
        let (s, ss) = ix.at_or_below(&ch, 10).unwrap();
        assert!(s <= 10 && ss == s * 10);
        ix.forget_below(&ch, 990);
        assert_eq!(ix.at_or_below(&ch, 10), None);
    }
}
