//! Hub unit tests: registration, ordering, lag marking, and parallel fan-out.

use std::sync::Arc;
use std::time::Duration;

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

#[tokio::test(flavor = "current_thread")]
async fn a_follow_during_a_long_fan_out_waits_without_blocking_its_thread() {
    let hub = Arc::new(Hub::new(1));
    let first = Arc::new(Outbox::new(1 << 16));
    hub.follow(&ch("a"), 1, &first, follow_item("a")).unwrap();
    // Another thread holds the bucket, as a long fan-out would.
    let subs = hub.channels.get(&ch("a")).unwrap().value().clone();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = {
        let subs = subs.clone();
        std::thread::spawn(move || {
            let guard = lock(&subs.buckets[0].set);
            held_tx.send(()).unwrap();
            release_rx.recv().unwrap();
            drop(guard);
            subs.buckets[0].released.notify_waiters();
        })
    };
    held_rx.recv().unwrap();
    let o = Arc::new(Outbox::new(1 << 16));
    let follow = {
        let (hub, o) = (hub.clone(), o.clone());
        tokio::spawn(async move { hub.follow_async(&ch("a"), 2, &o, follow_item("a")).await })
    };
    // The only runtime thread is free: other tasks run while the follow waits.
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
    assert!(!follow.is_finished());
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    let followed = tokio::time::timeout(std::time::Duration::from_secs(5), follow)
        .await
        .expect("follows once the bucket is free")
        .unwrap();
    assert_eq!(followed, Ok(true));
    assert_eq!(hub.follower_count(&ch("a")), 2);
    assert!(hub.unfollow_async(&ch("a"), 2).await);
}

#[tokio::test]
async fn a_follower_that_left_during_a_fan_out_is_dropped_by_the_next() {
    let hub = Hub::new(1);
    let o = Arc::new(Outbox::new(1 << 16));
    let stay = Arc::new(Outbox::new(1 << 16));
    hub.follow(&ch("a"), 1, &o, follow_item("a")).unwrap();
    hub.follow(&ch("a"), 2, &stay, follow_item("a")).unwrap();
    let subs = hub.channels.get(&ch("a")).unwrap().value().clone();
    {
        // Busy bucket: the leaving session cannot remove itself now.
        let _busy = lock(&subs.buckets[0].set);
        o.close();
        hub.unfollow_nowait(&ch("a"), 1);
    }
    assert_eq!(hub.follower_count(&ch("a")), 2);
    let f = hub.publish(post_event("a", 1));
    assert_eq!(
        f,
        Fanout {
            delivered: 1,
            lagged: 0
        }
    );
    assert_eq!(hub.follower_count(&ch("a")), 1);
}

/// A committed post as the log hands it to the fan-out stage.
fn logged_post(channel: &str, epoch: u64, seq: u64) -> crate::store::LogEvent {
    crate::store::LogEvent::Posted(crate::model::Post {
        channel: ch(channel),
        seq,
        epoch,
        id: format!("{channel}{seq}"),
        text: "t".into(),
        media: vec![],
        created_at_ms: 0,
        edited_at_ms: 0,
        deleted: false,
        damaged: false,
    })
}

#[tokio::test]
async fn the_fan_out_stage_fans_batches_out_in_commit_order_off_the_caller() {
    let hub = Arc::new(Hub::new(2));
    let o = Arc::new(Outbox::new(1 << 20));
    hub.follow(&ch("a"), 1, &o, follow_item("a")).unwrap();
    let stage = FanoutStage::start(hub.clone(), None, |_, _| None).unwrap();
    let post = |seq: u64| logged_post("a", 1, seq);
    for batch in 0..50u64 {
        stage.submit(&[post(2 * batch + 1), post(2 * batch + 2)]);
    }
    stage.close();
    let seqs: Vec<u64> = drain(&o)
        .await
        .iter()
        .filter_map(|i| match i {
            Item::Event(e) => Some(e.seq),
            _ => None,
        })
        .collect();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_channel_quiet_after_posts_gets_one_head_at_its_last_seq() {
    let hub = Arc::new(Hub::new(1));
    let o = Arc::new(Outbox::new(1 << 20));
    hub.follow(&ch("a"), 1, &o, follow_item("a")).unwrap();
    hub.follow(&ch("b"), 1, &o, follow_item("b")).unwrap();
    let stage =
        FanoutStage::start(hub.clone(), Some(Duration::from_millis(30)), |_, _| None).unwrap();
    let post = |c: &str, seq: u64| logged_post(c, 4, seq);
    stage.submit(&[post("a", 1), post("b", 1), post("a", 2)]);
    stage.submit(&[post("a", 3)]);
    // Everything up to both Heads, in queue order.
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while got
            .iter()
            .filter(|(_, kind, _)| *kind == EventKind::Head)
            .count()
            < 2
        {
            for item in drain(&o).await {
                if let Item::Event(e) = item {
                    got.push((e.channel.to_string(), e.kind, e.seq));
                }
            }
        }
    })
    .await
    .expect("both heads come");
    stage.close();
    let heads: Vec<_> = got
        .iter()
        .filter(|(_, kind, _)| *kind == EventKind::Head)
        .cloned()
        .collect();
    assert_eq!(
        heads,
        vec![
            ("b".into(), EventKind::Head, 1),
            ("a".into(), EventKind::Head, 3)
        ]
    );
    // Each Head comes after its channel's last post.
    let last_a = got
        .iter()
        .rposition(|g| g == &("a".into(), EventKind::Post, 3));
    let head_a = got
        .iter()
        .position(|g| g.1 == EventKind::Head && g.0 == "a");
    assert!(last_a < head_a, "{got:?}");
    assert_eq!(o.queued_items(), 0, "one Head per quiet channel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_async_follows_wake_each_other_without_any_fan_out() {
    // A follow that finds the bucket held by another follow (not a fan-out)
    // must be woken by that follow's release: no post ever comes here.
    let hub = Arc::new(Hub::new(1));
    let mut tasks = Vec::new();
    for i in 0..400u64 {
        let hub = hub.clone();
        tasks.push(tokio::spawn(async move {
            let o = Arc::new(Outbox::new(1 << 10));
            hub.follow_async(&ch("a"), i, &o, follow_item("a")).await
        }));
    }
    for t in tasks {
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), t)
            .await
            .expect("every follow completes")
            .unwrap();
        assert_eq!(r, Ok(true));
    }
    assert_eq!(hub.follower_count(&ch("a")), 400);
}
