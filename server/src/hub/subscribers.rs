//! One bucket of a channel's followers: a dense vector for fast fan-out
//! iteration, plus an index so that removing a follower is O(1).

use std::collections::HashMap;
use std::sync::Arc;

use crate::feed::Outbox;

/// A follower's entry: its session id and queue.
pub struct Subscriber {
    /// The follower's session id (unique within the server process).
    pub session: u64,
    /// The session's feed queue, which fan-out pushes into.
    pub outbox: Arc<Outbox>,
}

/// The followers of one channel in one bucket.
#[derive(Default)]
pub struct SubscriberSet {
    items: Vec<Subscriber>,
    index: HashMap<u64, usize>,
}

impl SubscriberSet {
    /// Adds a follower; returns `false` if the session was already here.
    pub fn insert(&mut self, sub: Subscriber) -> bool {
        if self.index.contains_key(&sub.session) {
            return false;
        }
        self.index.insert(sub.session, self.items.len());
        self.items.push(sub);
        true
    }

    /// Removes a follower; returns whether it was here.
    pub fn remove(&mut self, session: u64) -> bool {
        let Some(i) = self.index.remove(&session) else {
            return false;
        };
        self.items.swap_remove(i);
        if let Some(moved) = self.items.get(i) {
            self.index.insert(moved.session, i);
        }
        true
    }

    /// Followers in this set.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the set has no follower.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The followers, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Subscriber> {
        self.items.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_remove_keeps_index_consistent() {
        let mut s = SubscriberSet::default();
        for i in 0..10 {
            assert!(s.insert(Subscriber {
                session: i,
                outbox: Arc::new(Outbox::new(1 << 16)),
            }));
        }
        assert!(!s.insert(Subscriber {
            session: 3,
            outbox: Arc::new(Outbox::new(1 << 16)),
        }));
        for i in [0, 5, 9, 2] {
            assert!(s.remove(i));
            assert!(!s.remove(i));
        }
        let mut left: Vec<u64> = s.iter().map(|x| x.session).collect();
        left.sort();
        assert_eq!(left, vec![1, 3, 4, 6, 7, 8]);
        for i in left {
            assert!(s.remove(i));
        }
        assert!(s.is_empty());
    }
}
