//! Durable publish throughput of the embedded log: 64 concurrent publishers
//! append 256-byte posts to one channel through `RedbLog::append`; each
//! append resolves only after its commit is fsynced, so this measures group
//! commit (many posts sharing one fsync). Reported as posts per second
//! (criterion "elements"). Target: 20,000 durable posts/s on a 2-core machine.
//!
//! Run: `cargo bench --bench durable_publish`

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use herald_server::model::{ChannelId, NewPost};
use herald_server::store::{ChannelLog, EventSink, RedbLog};

const PUBLISHERS: usize = 64;
const POSTS_PER_ITER: usize = 6_400;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let sink: EventSink = Arc::new(|_| {});
    let log = RedbLog::open(dir.path(), sink).expect("open log");
    let channel = ChannelId::parse("bench").expect("channel id");
    rt.block_on(log.create_channel(channel.clone(), String::new()))
        .expect("create channel");
    let text = "x".repeat(256);

    let mut group = c.benchmark_group("durable_publish");
    group.throughput(Throughput::Elements(POSTS_PER_ITER as u64));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("64_publishers_256B", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                rt.block_on(async {
                    let mut tasks = Vec::with_capacity(PUBLISHERS);
                    for _ in 0..PUBLISHERS {
                        let log = log.clone();
                        let channel = channel.clone();
                        let text = text.clone();
                        tasks.push(tokio::spawn(async move {
                            for _ in 0..POSTS_PER_ITER / PUBLISHERS {
                                let post = NewPost::new(text.clone(), vec![]).expect("valid post");
                                log.append(channel.clone(), post, None)
                                    .await
                                    .expect("append");
                            }
                        }));
                    }
                    for t in tasks {
                        t.await.expect("publisher task");
                    }
                });
                total += start.elapsed();
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
