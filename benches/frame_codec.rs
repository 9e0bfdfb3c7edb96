//! Frame encode/decode: the per-publish and per-receive codec costs.
//!
//! - `encode_post_256`: a committed 256-byte post into its length-delimited
//!   feed frame, as the hub does once per publish (`FeedEvent::from_log`).
//! - `decode_post_256`: one such frame back into a `FeedFrame`, as every
//!   follower does once per delivery.
//! - `read_100_frames`: 100 frames through `FrameReader` from memory (the
//!   stream-framing path, without a network).

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use futures_util::FutureExt;
use herald_proto::v1 as pb;
use herald_proto::FrameReader;
use herald_server::feed::FeedEvent;
use herald_server::model::{ChannelId, Post};
use herald_server::store::LogEvent;
use prost::Message;

fn post(seq: u64) -> Post {
    Post {
        channel: ChannelId::parse("bench-channel").unwrap_or_else(|e| panic!("{e}")),
        seq,
        epoch: 1,
        id: format!("p{seq:016x}"),
        text: "x".repeat(256),
        media: Vec::new(),
        created_at_ms: 1_764_000_000_000,
        edited_at_ms: 0,
        deleted: false,
        damaged: false,
    }
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    g.throughput(Throughput::Elements(1));
    let ev = LogEvent::Posted(post(42));
    g.bench_function("encode_post_256", |b| {
        b.iter(|| FeedEvent::from_log(black_box(&ev)))
    });
    let frame: Bytes = FeedEvent::from_log(&ev).frame;
    g.bench_function("decode_post_256", |b| {
        b.iter(|| pb::FeedFrame::decode_length_delimited(black_box(frame.clone())))
    });
    let wire: Vec<u8> = (0..100)
        .flat_map(|i| {
            FeedEvent::from_log(&LogEvent::Posted(post(i)))
                .frame
                .to_vec()
        })
        .collect();
    g.throughput(Throughput::Elements(100));
    g.bench_function("read_100_frames", |b| {
        b.iter(|| {
            let mut r = FrameReader::new(black_box(&wire[..]), 64 * 1024);
            let mut n = 0;
            while let Some(Ok(Some(_))) = r.read_frame::<pb::FeedFrame>().now_or_never() {
                n += 1;
            }
            n
        })
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
