//! Publishing the posts over the HTTP API, paced or in a burst.
//!
//! Each post's text carries its send time ([`crate::post_text`]); followers
//! read it back to measure publish-to-delivery latency. Paced runs publish one
//! post per `1 / rate` seconds; a burst (rate 0) publishes them all at once.
//! Either way at most `publish_concurrency` requests are in flight. Each
//! request's time from sending to its answer (the post is durable by then) is
//! recorded: publish latency.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herald::cli::ApiClient;
use tokio::sync::Semaphore;

use hdrhistogram::Histogram;

use crate::follower::Shared;
use crate::plan::Plan;
use crate::post_text::post_text;
use crate::Options;

/// How publishing went.
#[derive(Debug, Default)]
pub struct Published {
    pub ok: u64,
    pub failed: u64,
    pub first_error: Option<String>,
    /// Per channel, the highest seq the API acknowledged.
    pub heads: Vec<u64>,
    /// From the first request sent to the last answer received.
    pub wall: Duration,
    /// Per acknowledged request, send to answer, in microseconds.
    pub latency_us: Option<Histogram<u64>>,
}

/// Publishes every planned post.
pub async fn publish_all(
    api: &ApiClient,
    channels: &[String],
    plan: &Plan,
    opts: &Options,
    shared: &Arc<Shared>,
) -> Published {
    let limit = Arc::new(Semaphore::new(opts.publish_concurrency));
    let mut pacer = (opts.rate > 0.0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / opts.rate));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(opts.posts);
    for i in 0..opts.posts {
        if let Some(p) = pacer.as_mut() {
            p.tick().await;
        }
        let Ok(permit) = limit.clone().acquire_owned().await else {
            break;
        };
        let ch = plan.channel_of_post(i);
        let api = api.clone();
        let name = channels[ch].clone();
        let size = opts.size;
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let sent = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64);
            let t0 = Instant::now();
            let r = api.publish(&name, &post_text(sent, i, size)).await;
            (ch, r.map(|p| (p, t0.elapsed())))
        }));
    }
    let mut out = Published {
        heads: vec![0; channels.len()],
        latency_us: Some(crate::report::us_histogram()),
        ..Published::default()
    };
    for t in tasks {
        match t.await {
            Ok((ch, Ok((p, took)))) => {
                out.ok += 1;
                out.heads[ch] = out.heads[ch].max(p.seq);
                if let Some(h) = out.latency_us.as_mut() {
                    h.saturating_record(took.as_micros() as u64);
                }
            }
            Ok((ch, Err(e))) => {
                out.failed += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
                // Nobody will receive it: stop waiting for it.
                let followers = shared
                    .connected_per_channel
                    .get(ch)
                    .map_or(0, |c| c.load(std::sync::atomic::Ordering::Relaxed));
                shared.advance(followers);
            }
            Err(e) => {
                out.failed += 1;
                out.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    out.wall = started.elapsed();
    out
}
