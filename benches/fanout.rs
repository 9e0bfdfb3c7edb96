//! Hub fan-out of one post to 1k / 100k / 1M in-process sessions.
//!
//! Every session follows one channel through `Hub::follow` with its own
//! `Outbox` (the real queue, 256 KiB bound). One iteration publishes one
//! encoded 256-byte post; the time measured is `Hub::publish` alone, i.e.
//! the push of a shared `Bytes` reference onto every follower's queue. The
//! queues are drained outside the timed section, as the feed writers would,
//! so they never fill up (no follower lags). Throughput is reported in
//! elements per second = deliveries per second.
//!
//! `one_core` uses a hub with one bucket per channel (fan-out on the calling
//! thread); `all_cores` uses the default hub (one bucket per core, fanned out
//! in parallel above `PARALLEL_FANOUT_MIN` followers). The 1M cases hold a
//! million outboxes (a few hundred MiB) and use few samples.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::FutureExt;
use herald_server::feed::{FeedEvent, Item, Outbox};
use herald_server::hub::Hub;
use herald_server::model::{ChannelId, FollowRequest, Post};

use herald_server::store::LogEvent;

const QUEUE_BYTES: usize = 256 * 1024;

struct Fixture {
    hub: Hub,
    outboxes: Vec<Arc<Outbox>>,
    event: Arc<FeedEvent>,
}

fn channel() -> ChannelId {
    ChannelId::parse("bench").unwrap_or_else(|e| panic!("{e}"))
}

fn fixture(hub: Hub, sessions: usize) -> Fixture {
    let ch = channel();
    let outboxes: Vec<Arc<Outbox>> = (0..sessions)
        .map(|_| Arc::new(Outbox::new(QUEUE_BYTES)))
        .collect();
    for (id, ob) in outboxes.iter().enumerate() {
        let follow = Item::Follow(FollowRequest {
            channel: ch.clone(),
            after_seq: Some(0),
            epoch: None,
            tail: 0,
            resume: false,
        });
        if hub.follow(&ch, id as u64, ob, follow).is_err() {
            panic!("follow refused");
        }
    }
    let post = Post {
        channel: ch,
        seq: 1,
        epoch: 1,
        id: "p1".into(),
        text: "x".repeat(256),
        media: Vec::new(),
        created_at_ms: 0,
        edited_at_ms: 0,
        deleted: false,
        damaged: false,
    };
    let f = Fixture {
        hub,
        outboxes,
        event: Arc::new(FeedEvent::from_log(&LogEvent::Posted(post))),
    };
    drain(&f.outboxes);
    f
}

/// Empties every queue, as the sessions' feed writers would. A queue holds
/// at most a Follow item and one event here, well under one batch.
fn drain(outboxes: &[Arc<Outbox>]) {
    let (mut items, mut lagged) = (Vec::new(), Vec::new());
    for ob in outboxes {
        // An empty queue would wait: `now_or_never` then just moves on.
        let _ = ob.next_batch(&mut items, &mut lagged, 64).now_or_never();
        items.clear();
        lagged.clear();
    }
}

fn run(c: &mut Criterion, group: &str, make: fn() -> Hub, sizes: &[usize]) {
    let mut g = c.benchmark_group(group);
    for &n in sizes {
        let f = fixture(make(), n);
        g.throughput(Throughput::Elements(n as u64));
        if n >= 1_000_000 {
            g.sample_size(10);
            g.measurement_time(Duration::from_secs(10));
        } else {
            g.sample_size(30);
            g.measurement_time(Duration::from_secs(5));
        }
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter_custom(|iters| {
                let mut spent = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let out = f.hub.publish(f.event.clone());
                    spent += start.elapsed();
                    assert_eq!(out.lagged, 0, "a queue overflowed");
                    drain(&f.outboxes);
                }
                spent
            })
        });
    }
    g.finish();
}

fn fanout(c: &mut Criterion) {
    run(
        c,
        "fanout_one_core",
        || Hub::new(1),
        &[1_000, 100_000, 1_000_000],
    );
    run(c, "fanout_all_cores", Hub::default, &[100_000, 1_000_000]);
}

criterion_group!(benches, fanout);
criterion_main!(benches);
