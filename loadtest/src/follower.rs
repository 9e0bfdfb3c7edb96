//! One simulated follower: connects through a shared client endpoint,
//! follows its channels, then tallies every post it receives (order, gaps,
//! duplicates, latency) until told to stop.
//!
//! Followers share one [`Shared`] block of counters so the run can show
//! progress and learn, without polling every follower, when every expected
//! delivery has arrived. Each follower keeps its latency samples locally and
//! hands them back when it ends, so the hot path takes no lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use herald_client::{Client, ClientOptions, Event};
use tokio::sync::{watch, Notify, Semaphore};

use crate::post_text::parse_send_time;

/// Counters and signals every follower shares.
pub struct Shared {
    /// Channel name to index.
    pub channel_index: HashMap<String, usize>,
    /// Followers connected and following (or failed), for the connect phase.
    pub settled: AtomicU64,
    pub connect_failed: AtomicU64,
    /// Signalled when `settled` reaches the number of followers.
    pub all_settled: Notify,
    /// Posts received, for progress.
    pub delivered: AtomicU64,
    /// Seq advances still expected before the run is complete: each
    /// connected follower adds the posts planned for its channels.
    pub remaining: AtomicI64,
    /// Signalled when `remaining` reaches zero.
    pub complete: Notify,
    /// Per channel and seq (1-based, index `seq - 1`), the latest arrival in
    /// microseconds after publish: when the post reached its last follower.
    pub last_arrival_us: Vec<Vec<AtomicU64>>,
    /// Arrival time of the most recent delivery, microseconds since the epoch.
    pub last_delivery_at_us: AtomicU64,
    /// Per channel, connected followers (what a failed publish is worth).
    pub connected_per_channel: Vec<AtomicU64>,
    /// Promoted frames received by all followers.
    pub promoted: AtomicU64,
    followers: u64,
}

impl Shared {
    pub fn new(channels: &[String], posts_per_channel: &[u64], followers: u64) -> Shared {
        Shared {
            channel_index: channels
                .iter()
                .enumerate()
                .map(|(i, c)| (c.clone(), i))
                .collect(),
            settled: AtomicU64::new(0),
            connect_failed: AtomicU64::new(0),
            all_settled: Notify::new(),
            delivered: AtomicU64::new(0),
            remaining: AtomicI64::new(0),
            complete: Notify::new(),
            last_arrival_us: posts_per_channel
                .iter()
                .map(|&n| (0..n).map(|_| AtomicU64::new(0)).collect())
                .collect(),
            last_delivery_at_us: AtomicU64::new(0),
            promoted: AtomicU64::new(0),
            connected_per_channel: posts_per_channel
                .iter()
                .map(|_| AtomicU64::new(0))
                .collect(),
            followers,
        }
    }

    /// A follower is connected and following `channels`: expects their
    /// posts and counts it settled.
    pub(crate) fn settle_ok(&self, channels: &[ChannelTally]) {
        let expected: u64 = channels
            .iter()
            .map(|t| {
                self.last_arrival_us
                    .get(t.channel)
                    .map_or(0, |v| v.len() as u64)
            })
            .sum();
        for t in channels {
            if let Some(c) = self.connected_per_channel.get(t.channel) {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.remaining.fetch_add(expected as i64, Ordering::AcqRel);
        self.settle();
    }

    /// A follower is done connecting (failed, or after [`Shared::settle_ok`]).
    pub(crate) fn settle(&self) {
        if self.settled.fetch_add(1, Ordering::AcqRel) + 1 == self.followers {
            self.all_settled.notify_one();
        }
    }

    /// Counts `n` seq advances as done; signals completion at zero.
    pub fn advance(&self, n: u64) {
        let n = n as i64;
        let before = self.remaining.fetch_sub(n, Ordering::AcqRel);
        if before > 0 && before - n <= 0 {
            self.complete.notify_one();
        }
    }

    /// Whether every expected seq advance has happened.
    pub fn is_complete(&self) -> bool {
        self.remaining.load(Ordering::Acquire) <= 0
    }
}

/// What one follower saw of one channel.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChannelTally {
    pub channel: usize,
    /// Head seq when the follow was answered; posts after it are expected.
    pub start: u64,
    /// Seq of the last post received.
    pub last: u64,
    pub received: u64,
    /// Seqs skipped over (a later post came first).
    pub gaps: u64,
    /// Posts at or below the last seq received (duplicate or out of order).
    pub out_of_order: u64,
}

/// What one follower reports when it ends.
#[derive(Debug, Default)]
pub struct FollowerResult {
    pub connected: bool,
    pub connect_time: Duration,
    pub error: Option<String>,
    pub channels: Vec<ChannelTally>,
    pub latencies_us: Vec<u32>,
    /// Posts on channels it does not follow or beyond what was published.
    pub unexpected: u64,
    pub resets: u64,
    pub errors: u64,
    pub disconnects: u64,
    /// Duplicates the client library (or the loop engine's ordering)
    /// dropped although the server sent the feed stream alone: it sent
    /// them twice. (With live datagrams duplicates are expected and not
    /// counted.)
    pub client_duplicates: u64,
    /// Closed for good before the run ended.
    pub closed: Option<String>,
    /// `--engine loop`: posts tallied that came as a QUIC datagram, and on
    /// the feed stream (with datagrams off every post counts as a stream
    /// post). The `client` engine counts neither.
    pub datagram_posts: u64,
    pub stream_posts: u64,
    /// Resend requests sent for posts missed (lost datagrams).
    pub resends: u64,
    /// Live-post datagrams dropped by `--drop-datagrams-every`.
    pub datagrams_dropped: u64,
}

/// How one follower connects.
pub struct FollowerSpec {
    pub endpoint: quinn::Endpoint,
    pub opts: ClientOptions,
    pub channels: Vec<String>,
}

/// Connects, follows, then tallies until `stop`.
pub async fn run(
    spec: FollowerSpec,
    shared: Arc<Shared>,
    handshakes: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) -> FollowerResult {
    let mut out = FollowerResult::default();
    let started = Instant::now();
    let mut client = {
        let Ok(_permit) = handshakes.acquire().await else {
            out.error = Some("connect limiter closed".into());
            shared.connect_failed.fetch_add(1, Ordering::Relaxed);
            shared.settle();
            return out;
        };
        match connect_and_follow(&spec, &shared, &mut out).await {
            Ok(c) => c,
            Err(e) => {
                out.error = Some(e);
                shared.connect_failed.fetch_add(1, Ordering::Relaxed);
                shared.settle();
                return out;
            }
        }
    };
    out.connected = true;
    out.connect_time = started.elapsed();
    // Posts are published only once every follower has settled, so this
    // expectation is in place before any delivery.
    shared.settle_ok(&out.channels);

    let index: HashMap<usize, usize> = out
        .channels
        .iter()
        .enumerate()
        .map(|(i, t)| (t.channel, i))
        .collect();
    loop {
        let ev = tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            ev = client.next_event() => ev,
        };
        let Some(ev) = ev else {
            out.closed = Some("client ended".into());
            break;
        };
        match ev {
            Event::Post(p) => record_post(
                &shared,
                &mut out,
                |_, ch| index.get(&ch).copied(),
                p.channel.as_str(),
                p.seq,
                &p.text,
            ),
            Event::Reset { .. } => out.resets += 1,
            Event::Error { message, .. } => {
                out.errors += 1;
                out.error.get_or_insert(message);
            }
            Event::Disconnected { .. } => out.disconnects += 1,
            Event::Closed { reason, .. } => {
                out.closed = Some(reason);
                break;
            }
            Event::Promoted { .. } => {
                shared.promoted.fetch_add(1, Ordering::Relaxed);
            }
            Event::Reconnected | Event::Edited { .. } | Event::Deleted { .. } => {}
        }
    }
    let stats = client.stats();
    // With live datagrams duplicates are expected (a late datagram, a post
    // resent after it) and the client's ordering drops them; on the feed
    // stream alone a duplicate is the server's fault.
    if !spec.opts.live_datagrams {
        out.client_duplicates = stats.get(&stats.duplicates_dropped);
    }
    out.resends = stats.get(&stats.resends);
    let malformed = stats.get(&stats.datagrams_malformed);
    if malformed > 0 {
        out.errors += malformed;
        out.error
            .get_or_insert_with(|| format!("{malformed} malformed datagrams"));
    }
    client.close().await;
    out
}

async fn connect_and_follow(
    spec: &FollowerSpec,
    shared: &Shared,
    out: &mut FollowerResult,
) -> Result<Client, String> {
    let client = Client::connect_via(&spec.endpoint, spec.opts.clone())
        .await
        .map_err(|e| format!("connect: {e}"))?;
    for ch in &spec.channels {
        let followed = client
            .follow(ch)
            .await
            .map_err(|e| format!("follow {ch}: {e}"))?;
        let Some(&channel) = shared.channel_index.get(ch) else {
            return Err(format!("unknown channel {ch}"));
        };
        out.channels.push(ChannelTally {
            channel,
            start: followed.head_seq,
            last: followed.head_seq,
            ..ChannelTally::default()
        });
    }
    Ok(client)
}

pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Tallies one received post (both engines): order, gaps, latency (arrival
/// taken now, when the frame has been decoded), and the shared progress.
/// `find` maps a channel index to the follower's tally of it.
pub(crate) fn record_post(
    shared: &Shared,
    out: &mut FollowerResult,
    find: impl FnOnce(&[ChannelTally], usize) -> Option<usize>,
    channel: &str,
    seq: u64,
    text: &str,
) {
    let now = now_us();
    shared.delivered.fetch_add(1, Ordering::Relaxed);
    shared.last_delivery_at_us.fetch_max(now, Ordering::Relaxed);
    let Some(&ch) = shared.channel_index.get(channel) else {
        out.unexpected += 1;
        return;
    };
    let Some(t) = find(&out.channels, ch).and_then(|i| out.channels.get_mut(i)) else {
        out.unexpected += 1;
        return;
    };
    if seq <= t.last {
        t.out_of_order += 1;
        return;
    }
    let advance = seq - t.last;
    t.gaps = t.gaps.saturating_add(advance - 1);
    t.last = seq;
    t.received += 1;
    let latency = parse_send_time(text).map(|sent| now.saturating_sub(sent));
    if let Some(l) = latency {
        out.latencies_us.push(l.min(u64::from(u32::MAX)) as u32);
    }
    match shared
        .last_arrival_us
        .get(ch)
        .and_then(|v| v.get((seq - 1) as usize))
    {
        Some(slot) => {
            slot.fetch_max(latency.unwrap_or(0), Ordering::Relaxed);
            shared.advance(advance);
        }
        None => out.unexpected += 1,
    }
}
