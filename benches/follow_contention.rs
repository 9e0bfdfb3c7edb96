//! Follow/unfollow under contention: T threads (1, 2, 4) each repeatedly
//! follow and unfollow their own sessions on one shared channel that already
//! has 10,000 followers, as a reconnect storm would. One element is one
//! follow plus one unfollow, including taking the queued Follow item off the
//! session's outbox (as its feed writer would; the outbox bounds pending
//! control items). Reported as elements (follow+unfollow pairs) per second.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::FutureExt;
use herald_server::feed::{Item, Outbox};
use herald_server::hub::Hub;
use herald_server::model::{ChannelId, FollowRequest};

const BACKGROUND: u64 = 10_000;
const PER_THREAD: u64 = 1_000;

fn follow_item(ch: &ChannelId) -> Item {
    Item::Follow(FollowRequest {
        channel: ch.clone(),
        after_seq: Some(0),
        epoch: None,
        tail: 0,
        resume: false,
    })
}

fn contention(c: &mut Criterion) {
    let ch = ChannelId::parse("busy").unwrap_or_else(|e| panic!("{e}"));
    let hub = Arc::new(Hub::default());
    let idle = Arc::new(Outbox::new(64 * 1024));
    for id in 0..BACKGROUND {
        // The background followers share one outbox; drain its Follow items.
        let _ = hub.follow(&ch, id, &idle, follow_item(&ch));
        let (mut items, mut lagged) = (Vec::new(), Vec::new());
        let _ = idle.next_batch(&mut items, &mut lagged, 64).now_or_never();
    }
    let mut g = c.benchmark_group("follow_unfollow");
    g.sample_size(20);
    for threads in [1u64, 2, 4] {
        g.throughput(Throughput::Elements(threads * PER_THREAD));
        g.bench_with_input(BenchmarkId::new("threads", threads), &threads, |b, &t| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    std::thread::scope(|s| {
                        for k in 0..t {
                            let hub = &hub;
                            let ch = &ch;
                            s.spawn(move || {
                                let ob = Arc::new(Outbox::new(64 * 1024));
                                let (mut items, mut lagged) = (Vec::new(), Vec::new());
                                let base = 1_000_000 * (k + 1);
                                for i in 0..PER_THREAD {
                                    let id = base + i;
                                    let _ = hub.follow(ch, id, &ob, follow_item(ch));
                                    hub.unfollow(ch, id);
                                    items.clear();
                                    let _ =
                                        ob.next_batch(&mut items, &mut lagged, 64).now_or_never();
                                }
                            });
                        }
                    });
                    spent += start.elapsed();
                }
                spent
            })
        });
    }
    g.finish();
}

criterion_group!(benches, contention);
criterion_main!(benches);
