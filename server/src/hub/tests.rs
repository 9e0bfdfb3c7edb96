//! Hub unit tests: registration, ordering, lag marking, and parallel fan-out.

use std::sync::Arc;

use super::*;
use crate::feed::{EventKind, Item, Outbox};
use crate::model::{ChannelId, FollowRequest};

fn ch(s: &str) -> ChannelId {
    ChannelId::parse(s).unwrap()
}

fn follow_item(c: &str) -> Item {
    Item::Follow(FollowRequest {
        channel: ch(c),
        after_seq: None,
        epoch: None,
        tail: 0,
        resume: false,
    })
}

fn post_event(c: &str, seq: u64) -> Arc<FeedEvent> {
    Arc::new(FeedEvent {
        channel: ch(c),
        seq,
        kind: EventKind::Post,
        frame: bytes::Bytes::from_static(b"frame"),
        slot: None,
    })
}

async fn drain(o: &Outbox) -> Vec<Item> {
    let (mut items, mut lagged) = (Vec::new(), Vec::new());
    o.next_batch(&mut items, &mut lagged, usize::MAX).await;
    items
}

#[tokio::test]
async fn follow_queues_control_before_events_and_unfollow_cleans_up() {
    let hub = Hub::new(2);
    let o = Arc::new(Outbox::new(1 << 20));
    assert!(hub.follow(&ch("a"), 7, &o, follow_item("a")).unwrap());
    assert!(!hub.follow(&ch("a"), 7, &o, follow_item("a")).unwrap());
    assert_eq!(hub.follower_count(&ch("a")), 1);
    for seq in 1..=3 {
        assert_eq!(hub.publish(post_event("a", seq)).delivered, 1);
    }
    assert_eq!(hub.publish(post_event("b", 1)).delivered, 0);
    let items = drain(&o).await;
    assert!(matches!(items[0], Item::Follow(_)));
    let seqs: Vec<u64> = items[1..]
        .iter()
        .map(|i| match i {
            Item::Event(e) => e.seq,
            _ => panic!(),
        })
        .collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert!(hub.unfollow(&ch("a"), 7));
    assert!(!hub.unfollow(&ch("a"), 7));
    assert_eq!(hub.channel_count(), 0);
}

#[tokio::test]
async fn full_outbox_is_lagged_not_blocking() {
    let hub = Hub::new(1);
    let small = Arc::new(Outbox::new(12));
    let big = Arc::new(Outbox::new(1 << 20));
    hub.follow(&ch("a"), 1, &small, follow_item("a")).unwrap();
    hub.follow(&ch("a"), 2, &big, follow_item("a")).unwrap();
    let mut total = Fanout::default();
    for seq in 1..=5 {
        total += hub.publish(post_event("a", seq));
    }
    // "frame" is 5 bytes: the small outbox takes two.
    assert_eq!(total.delivered, 5 + 2);
    assert_eq!(total.lagged, 3);
}

#[tokio::test]
async fn parallel_fanout_reaches_everyone_in_order() {
    let hub = Hub::new(4);
    let n = PARALLEL_FANOUT_MIN + 100;
    let outs: Vec<Arc<Outbox>> = (0..n).map(|_| Arc::new(Outbox::new(1 << 16))).collect();
    for (i, o) in outs.iter().enumerate() {
        hub.follow(&ch("big"), i as u64, o, follow_item("big"))
            .unwrap();
    }
    for seq in 1..=3 {
        assert_eq!(hub.publish(post_event("big", seq)).delivered, n);
    }
    for o in outs.iter().step_by(997) {
        let seqs: Vec<u64> = drain(o)
            .await
            .iter()
            .filter_map(|i| match i {
                Item::Event(e) => Some(e.seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
    }
}

#[tokio::test]
async fn channel_stats_count_deliveries_and_lag_per_fan_out() {
    let hub = Hub::new(2);
    let big = Arc::new(Outbox::new(1 << 20));
    // "frame" is 5 bytes: this one takes the first post and lags on the second.
    let small = Arc::new(Outbox::new(5));
    hub.follow(&ch("s"), 1, &big, follow_item("s")).unwrap();
    hub.follow(&ch("s"), 2, &small, follow_item("s")).unwrap();
    assert_eq!(hub.channel_stats(&ch("s")), ChannelStats::default());
    hub.publish(post_event("s", 1));
    hub.publish(post_event("s", 2));
    assert_eq!(
        hub.channel_stats(&ch("s")),
        ChannelStats {
            deliveries: 3,
            lag_events: 1
        }
    );
    assert_eq!(hub.channel_stats(&ch("other")), ChannelStats::default());
}

#[tokio::test]
async fn concurrent_follow_and_unfollow_never_lose_a_follower() {
    // Threads churn the same channel (follow, unfollow, follow again) so that
    // entries are retired and recreated under them; every session that ends
    // following must be reachable by a publish.
    let hub = Arc::new(Hub::new(2));
    let outs: Vec<Arc<Outbox>> = (0..64)
        .map(|_| Arc::new(Outbox::with_control_bound(1 << 20, 1 << 20)))
        .collect();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let hub = hub.clone();
            let outs = &outs;
            s.spawn(move || {
                for round in 0..200 {
                    for i in (t * 16)..(t * 16 + 16) {
                        let o = &outs[i as usize];
                        hub.follow(&ch("churn"), i, o, follow_item("churn"))
                            .unwrap();
                        if round < 199 {
                            hub.unfollow(&ch("churn"), i);
                        }
                    }
                }
            });
        }
    });
    assert_eq!(hub.follower_count(&ch("churn")), 64);
    assert_eq!(hub.publish(post_event("churn", 1)).delivered, 64);
    for i in 0..64 {
        assert!(hub.unfollow(&ch("churn"), i));
    }
    assert_eq!(hub.channel_count(), 0);
}
