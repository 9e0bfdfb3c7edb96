//! The feed writer driven directly: an in-memory log, a real [`Outbox`] with
//! small bounds, and a [`MemorySink`] the test reads frame by frame (or stops
//! reading, to make the writer wait as a slow follower would). No network,
//! no fsync: each test runs in milliseconds.
//!
//! Every test here guards one piece of the delivery logic in `writer.rs`
//! (cursor dedupe, catch-up, gap fill, lag catch-up, edit re-send, Reset);
//! each was seen to fail with that piece removed. Each runs twice: with the
//! writer task alone (`task_path`), and with a stand-in for the transport's
//! loop pulling live posts through the writer's [`LiveFeed`] while the task
//! is idle (`live_path`), so the hand-over between the two is driven by
//! every scenario too.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use herald_proto::v1 as pb;
use prost::Message;
use tokio::sync::{mpsc, Notify};

use super::*;
use crate::model::{ChannelId, ChannelInfo, FollowRequest, NewPost, Post};
use crate::store::{ChannelLog, LogEvent, LogFuture, StoreError, TrimPolicy};

/// Any single wait; a hang fails the test instead of blocking.
const WAIT: Duration = Duration::from_secs(5);

fn ch(s: &str) -> ChannelId {
    ChannelId::parse(s).unwrap()
}

/// A channel log in memory, with the same head-before-fan-out order as the
/// real one: `append` updates the head and returns the committed event,
/// which the test then fans out by hand.
#[derive(Default)]
struct MemLog {
    channels: Mutex<BTreeMap<ChannelId, MemChannel>>,
}

/// A channel's metadata and its retained posts by seq.
type MemChannel = (ChannelInfo, BTreeMap<u64, Post>);

impl MemLog {
    fn with_channel(id: &str) -> Arc<MemLog> {
        let log = MemLog::default();
        log.channels.lock().unwrap().insert(
            ch(id),
            (
                ChannelInfo {
                    id: ch(id),
                    title: String::new(),
                    epoch: 1,
                    head_seq: 0,
                    oldest_seq: 1,
                    created_at_ms: 0,
                },
                BTreeMap::new(),
            ),
        );
        Arc::new(log)
    }

    /// A channel `id` holding posts 1..=n, each with `len` bytes of text.
    fn with_posts(id: &str, n: u64, len: usize) -> Arc<MemLog> {
        let log = MemLog::with_channel(id);
        for _ in 0..n {
            log.post(id, len);
        }
        log
    }

    /// Appends a post of `len` bytes of text; returns its event.
    fn post(&self, id: &str, len: usize) -> LogEvent {
        let mut map = self.channels.lock().unwrap();
        let (info, posts) = map.get_mut(&ch(id)).unwrap();
        info.head_seq += 1;
        let p = Post {
            channel: ch(id),
            seq: info.head_seq,
            epoch: info.epoch,
            id: format!("p{}", info.head_seq),
            text: format!("{:0len$}", info.head_seq),
            media: vec![],
            created_at_ms: 0,
            edited_at_ms: 0,
            deleted: false,
            damaged: false,
        };
        posts.insert(p.seq, p.clone());
        LogEvent::Posted(p)
    }

    fn edit(&self, id: &str, seq: u64, text: &str) -> LogEvent {
        let mut map = self.channels.lock().unwrap();
        let p = map.get_mut(&ch(id)).unwrap().1.get_mut(&seq).unwrap();
        p.text = text.to_string();
        p.edited_at_ms = 1;
        LogEvent::Edited(p.clone())
    }

    fn delete(&self, id: &str, seq: u64) -> LogEvent {
        let mut map = self.channels.lock().unwrap();
        let p = map.get_mut(&ch(id)).unwrap().1.get_mut(&seq).unwrap();
        p.text.clear();
        p.deleted = true;
        p.edited_at_ms = 2;
        LogEvent::Deleted(p.clone())
    }

    /// Drops every post below `oldest`.
    fn trim_below(&self, id: &str, oldest: u64) {
        let mut map = self.channels.lock().unwrap();
        let (info, posts) = map.get_mut(&ch(id)).unwrap();
        posts.retain(|s, _| *s >= oldest);
        info.oldest_seq = oldest;
    }
}

impl ChannelLog for MemLog {
    fn create_channel(&self, _: ChannelId, _: String) -> LogFuture<'_, ChannelInfo> {
        unreachable!("not used by the writer")
    }

    fn channel(&self, id: &ChannelId) -> Option<ChannelInfo> {
        self.channels.lock().unwrap().get(id).map(|c| c.0.clone())
    }

    fn channels(&self) -> Vec<ChannelInfo> {
        unreachable!("not used by the writer")
    }

    fn append(&self, _: ChannelId, _: NewPost, _: Option<String>) -> LogFuture<'_, Post> {
        unreachable!("not used by the writer")
    }

    fn edit(&self, _: ChannelId, _: u64, _: String) -> LogFuture<'_, Post> {
        unreachable!("not used by the writer")
    }

    fn delete(&self, _: ChannelId, _: u64) -> LogFuture<'_, Post> {
        unreachable!("not used by the writer")
    }

    fn read(&self, channel: ChannelId, after_seq: u64, limit: usize) -> LogFuture<'_, Vec<Post>> {
        let out = match self.channels.lock().unwrap().get(&channel) {
            Some((_, posts)) => Ok(posts
                .range(after_seq.saturating_add(1)..)
                .take(limit)
                .map(|(_, p)| p.clone())
                .collect()),
            None => Err(StoreError::UnknownChannel(channel)),
        };
        Box::pin(async move { out })
    }

    fn trim(&self, _: ChannelId, _: TrimPolicy) -> LogFuture<'_, u64> {
        unreachable!("not used by the writer")
    }

    fn trim_all(&self, _: TrimPolicy) -> LogFuture<'_, crate::store::TrimReport> {
        unreachable!("not used by the writer")
    }

    fn health(&self) -> crate::datadir::Health {
        crate::datadir::Health::Ok
    }

    fn close(&self) -> LogFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// What the follower received, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Got {
    Post(u64, String),
    Edited(u64, String),
    Deleted(u64),
    Reset { epoch: u64, oldest_seq: u64 },
    Promoted(String),
    Head(u64),
}

fn reset(epoch: u64, oldest_seq: u64) -> Got {
    Got::Reset { epoch, oldest_seq }
}

fn decode(frame: &Bytes) -> Got {
    let f = pb::FeedFrame::decode_length_delimited(frame.clone()).unwrap();
    match f.kind.unwrap() {
        pb::feed_frame::Kind::Post(p) => Got::Post(p.seq, p.text),
        pb::feed_frame::Kind::Edited(e) => Got::Edited(e.seq, e.text),
        pb::feed_frame::Kind::Deleted(d) => Got::Deleted(d.seq),
        pb::feed_frame::Kind::Reset(r) => Got::Reset {
            epoch: r.epoch,
            oldest_seq: r.oldest_seq,
        },
        pb::feed_frame::Kind::Promoted(p) => Got::Promoted(p.campaign_id),
        pb::feed_frame::Kind::Head(h) => Got::Head(h.seq),
    }
}

thread_local! {
    /// Whether the running test drives the live path too (see the macro at
    /// the end).
    static LIVE_PATH: Cell<bool> = const { Cell::new(false) };
    /// Whether the follower takes live datagrams (only the datagram tests).
    static DATAGRAMS: Cell<bool> = const { Cell::new(false) };
}

/// Bytes the stand-in loop asks for per pull (small, so that pulls stop
/// part-way through a queue as the real loop's do).
const PULL_ROOM: usize = 200;

/// A writer on `log`, fed by an outbox of `bound` bytes, writing into a sink
/// that holds `sink_capacity` unread frames.
struct Rig {
    log: Arc<MemLog>,
    outbox: Arc<Outbox>,
    frames: mpsc::Receiver<Bytes>,
    /// What the live path handed out as datagrams.
    datagrams: mpsc::UnboundedReceiver<Bytes>,
    task: tokio::task::JoinHandle<Result<FeedStats, FeedError>>,
}

impl Rig {
    fn start(log: Arc<MemLog>, bound: usize, sink_capacity: usize) -> Rig {
        Rig::start_with(log, bound, sink_capacity, 64)
    }

    fn start_with(log: Arc<MemLog>, bound: usize, sink_capacity: usize, batch: usize) -> Rig {
        Rig::start_full(log, bound, sink_capacity, batch, Arc::new(NoPromotions))
    }

    fn start_full(
        log: Arc<MemLog>,
        bound: usize,
        sink_capacity: usize,
        batch: usize,
        slots: Arc<dyn CatchupSlots>,
    ) -> Rig {
        let outbox = Arc::new(Outbox::new(bound));
        let (sink, frames) = MemorySink::new(sink_capacity);
        let pump_tx = sink.sender();
        let (dgram_tx, datagrams) = mpsc::unbounded_channel();
        let mut writer = FeedWriter::new(
            sink,
            outbox.clone(),
            FeedDeps {
                log: log.clone(),
                slots,
                follower: "f".into(),
                receipts: false,
                live_datagrams: DATAGRAMS.with(Cell::get),
                catchup_batch: batch,
                lag_policy: LagPolicy {
                    max_events: 1000,
                    window: Duration::from_secs(60),
                },
                catchups: crate::feed::CatchupBudget::new(2),
            },
        );
        if LIVE_PATH.with(Cell::get) {
            // A stand-in for the transport's loop: woken by the fan-out, it
            // pulls live frames and writes them to the same sink; a full
            // sink makes it wait, as a blocked stream makes the loop wait
            // for the stream to become writable.
            let live = writer.live();
            let wake = Arc::new(Notify::new());
            let waker = wake.clone();
            outbox.set_live_waker(Box::new(move || waker.notify_one()));
            if let Some(tx) = pump_tx {
                tokio::spawn(async move {
                    let (mut out, mut dgrams) = (Vec::new(), Vec::new());
                    loop {
                        wake.notified().await;
                        loop {
                            let more = live.pull(PULL_ROOM, &mut out, &mut dgrams);
                            for f in dgrams.drain(..) {
                                let _ = dgram_tx.send(f);
                            }
                            for f in out.drain(..) {
                                if tx.send(f).await.is_err() {
                                    return;
                                }
                            }
                            if !more {
                                break;
                            }
                        }
                    }
                });
            }
        }
        Rig {
            log,
            outbox,
            frames,
            datagrams,
            task: tokio::spawn(writer.run()),
        }
    }

    fn follow(&self, id: &str, after_seq: Option<u64>, epoch: Option<u64>) {
        let resume = after_seq.is_some();
        // A live follow starts at the head the session read (as the session does).
        let after_seq = after_seq.or_else(|| self.log.channel(&ch(id)).map(|c| c.head_seq));
        self.outbox
            .push_control(Item::Follow(FollowRequest {
                channel: ch(id),
                after_seq,
                epoch,
                tail: 0,
                resume,
            }))
            .unwrap();
    }

    /// Waits until the writer has taken everything queued (it then either
    /// waits for more, or is blocked writing to the sink).
    async fn settle(&self) {
        tokio::time::timeout(WAIT, async {
            while self.outbox.queued_items() > 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("writer takes its queue");
        // Let it finish handling what it took (no further wake-up is needed
        // for that: a few turns of the scheduler).
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
    }

    /// Fans `ev` out to this follower's queue, as the hub does; returns
    /// whether it fit.
    fn fan_out(&self, ev: &LogEvent) -> bool {
        self.outbox.push_event(&Arc::new(FeedEvent::from_log(ev)))
    }

    /// Delivers post 1 (read), then post 2, which the writer cannot hand to
    /// the sink (it holds one unread frame): from here on the queue fills
    /// up as a slow follower's does. Posts have 40 bytes of text (56-byte
    /// frames).
    async fn stall(&mut self) {
        assert!(self.fan_out(&self.log.post("a", 40)));
        assert_eq!(seqs(&self.read(1).await), vec![1]);
        assert!(self.fan_out(&self.log.post("a", 40)));
        self.settle().await;
    }

    /// The next frame the live path handed out as a datagram.
    async fn next_datagram(&mut self) -> Bytes {
        tokio::time::timeout(WAIT, self.datagrams.recv())
            .await
            .expect("datagram in time")
            .expect("a datagram")
    }

    /// Reads the next `n` frames.
    async fn read(&mut self, n: usize) -> Vec<Got> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let f = tokio::time::timeout(WAIT, self.frames.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out after {out:?}"))
                .expect("writer ended early");
            out.push(decode(&f));
        }
        out
    }

    /// Closes the queue, lets the writer finish, and returns every frame not
    /// read yet, and the writer's counters.
    async fn finish(mut self) -> (Vec<Got>, FeedStats) {
        self.outbox.close();
        let mut rest = Vec::new();
        let stats = tokio::time::timeout(WAIT, async {
            loop {
                tokio::select! {
                    res = &mut self.task => break res,
                    Some(f) = self.frames.recv() => rest.push(decode(&f)),
                }
            }
        })
        .await
        .expect("writer finishes")
        .unwrap()
        .expect("writer ends cleanly");
        while let Ok(f) = self.frames.try_recv() {
            rest.push(decode(&f));
        }
        (rest, stats)
    }
}

fn posts(range: std::ops::RangeInclusive<u64>) -> Vec<u64> {
    range.collect()
}

fn seqs(got: &[Got]) -> Vec<u64> {
    got.iter()
        .map(|g| match g {
            Got::Post(s, _) => *s,
            other => panic!("expected only posts, got {other:?}"),
        })
        .collect()
}

async fn live_only_follow_gets_each_live_post_once_in_order() {
    let log = MemLog::with_posts("a", 3, 8);
    let mut rig = Rig::start(log.clone(), 1 << 16, 64);
    rig.follow("a", None, None);
    rig.settle().await;
    for _ in 0..5 {
        assert!(rig.fan_out(&log.post("a", 8)));
    }
    // Nothing before the follow; 4..=8 live.
    assert_eq!(seqs(&rig.read(5).await), posts(4..=8));
    // A re-delivered post (at or below the cursor) is dropped.
    let old = LogEvent::Posted(log.read(ch("a"), 5, 1).await.unwrap().remove(0));
    assert!(rig.fan_out(&old));
    let (rest, stats) = rig.finish().await;
    assert_eq!(rest, vec![]);
    assert_eq!(stats.live_frames, 5);
    assert_eq!(stats.catchup_frames, 0);
}

async fn catch_up_then_live_with_posts_racing_the_switch() {
    let log = MemLog::with_posts("a", 10, 8);
    let mut rig = Rig::start_with(log.clone(), 1 << 16, 64, 4);
    rig.follow("a", Some(0), None);
    // Posts 11 and 12 commit (the head moves) and are fanned out after the
    // registration but before the writer reads the head: they are in the
    // log's catch-up *and* in the queue.
    for _ in 0..2 {
        assert!(rig.fan_out(&log.post("a", 8)));
    }
    let first = rig.read(12).await;
    assert_eq!(seqs(&first), posts(1..=12));
    // Posts fanned out after the catch-up come live only.
    for _ in 0..3 {
        assert!(rig.fan_out(&log.post("a", 8)));
    }
    assert_eq!(seqs(&rig.read(3).await), posts(13..=15));
    let (rest, stats) = rig.finish().await;
    assert_eq!(rest, vec![], "the overlap 11..=12 must not come twice");
    assert_eq!(stats.catchup_frames, 12);
    assert_eq!(stats.live_frames, 3);
}

async fn a_post_dropped_on_overflow_is_filled_from_the_log_before_the_next() {
    let log = MemLog::with_channel("a");
    // The queue holds 300 bytes: three small posts fit, one big one does
    // not, and the small post after it fits again.
    let mut rig = Rig::start(log.clone(), 300, 1);
    rig.follow("a", None, None);
    rig.settle().await;
    rig.stall().await;
    // Each 40-byte post is a 56-byte frame: three fit in 300 bytes.
    for _ in 0..3 {
        assert!(rig.fan_out(&log.post("a", 40)));
    }
    assert!(!rig.fan_out(&log.post("a", 200)), "6 overflows");
    assert!(rig.fan_out(&log.post("a", 10)), "7 fits");
    let got = rig.read(6).await;
    assert_eq!(seqs(&got), posts(2..=7));
    let (rest, stats) = rig.finish().await;
    assert_eq!(rest, vec![]);
    assert_eq!(stats.catchup_frames, 1, "post 6 came from the log");
    assert_eq!(stats.lag_events, 1);
}

async fn a_follower_that_lagged_at_the_tail_is_caught_up_to_the_head() {
    let log = MemLog::with_channel("a");
    let mut rig = Rig::start(log.clone(), 100, 1);
    rig.follow("a", None, None);
    rig.settle().await;
    assert!(rig.fan_out(&log.post("a", 40)));
    assert_eq!(seqs(&rig.read(1).await), vec![1]);
    // The writer blocks on 2; 3 fills the queue; 4..=9 overflow, and no
    // later live post will reveal the gap.
    let mut fitted = 0;
    for _ in 2..=9 {
        fitted += usize::from(rig.fan_out(&log.post("a", 40)));
    }
    assert!(fitted < 8, "some posts must overflow");
    assert_eq!(seqs(&rig.read(8).await), posts(2..=9));
    let (rest, stats) = rig.finish().await;
    assert_eq!(rest, vec![]);
    assert!(stats.catchup_frames > 0);
}

async fn edits_and_deletes_dropped_on_overflow_are_resent_from_the_log() {
    let log = MemLog::with_channel("a");
    let mut rig = Rig::start(log.clone(), 120, 1);
    rig.follow("a", None, None);
    rig.settle().await;
    for _ in 1..=3 {
        assert!(rig.fan_out(&log.post("a", 40)));
        assert_eq!(rig.read(1).await.len(), 1);
    }
    // Block the writer with one more post, fill the queue, then edit 2 and
    // delete 3: both events overflow.
    assert!(rig.fan_out(&log.post("a", 40)));
    assert_eq!(seqs(&rig.read(1).await), vec![4]);
    assert!(rig.fan_out(&log.post("a", 40)));
    rig.settle().await;
    while rig.fan_out(&log.post("a", 40)) {}
    let head = log.channel(&ch("a")).unwrap().head_seq;
    assert!(!rig.fan_out(&log.edit("a", 2, "two, edited")));
    assert!(!rig.fan_out(&log.delete("a", 3)));
    let mut got = rig.read((head - 4) as usize).await;
    got.extend(rig.finish().await.0);
    let posts_only: Vec<u64> = got
        .iter()
        .filter_map(|g| match g {
            Got::Post(s, _) => Some(*s),
            _ => None,
        })
        .collect();
    assert_eq!(posts_only, posts(5..=head));
    let changes: Vec<&Got> = got.iter().filter(|g| !matches!(g, Got::Post(..))).collect();
    assert_eq!(
        changes,
        vec![&Got::Edited(2, "two, edited".into()), &Got::Deleted(3)],
        "the follower has posts 2 and 3: it must learn of both changes"
    );
}

async fn edits_of_posts_not_yet_delivered_are_not_sent() {
    let log = MemLog::with_posts("a", 3, 8);
    let mut rig = Rig::start(log.clone(), 1 << 16, 64);
    rig.follow("a", Some(0), None);
    assert_eq!(seqs(&rig.read(3).await), posts(1..=3));
    let edit = log.edit("a", 2, "new");
    assert!(rig.fan_out(&edit));
    assert_eq!(rig.read(1).await, vec![Got::Edited(2, "new".into())]);
    // An edit above the cursor: the post itself comes later in its new state.
    let four = log.post("a", 8);
    let edit4 = log.edit("a", 4, "four, edited");
    assert!(rig.fan_out(&edit4));
    assert!(rig.fan_out(&four));
    let (rest, _) = rig.finish().await;
    // Post 4 comes as fanned out (its text at commit time); the edit event
    // was for a post the follower did not have yet, so it was skipped.
    assert_eq!(rest, vec![Got::Post(4, "00000004".into())]);
}

async fn resume_with_another_epoch_is_reset_and_replayed() {
    let log = MemLog::with_posts("a", 4, 8);
    let mut rig = Rig::start(log.clone(), 1 << 16, 64);
    rig.follow("a", Some(2), Some(7));
    let got = rig.read(5).await;
    assert_eq!(got[0], reset(1, 1));
    assert_eq!(seqs(&got[1..]), posts(1..=4));
    assert_eq!(rig.finish().await.0, vec![]);
}

async fn resume_below_the_retained_history_is_reset_to_the_oldest() {
    let log = MemLog::with_posts("a", 10, 8);
    log.trim_below("a", 6);
    let mut rig = Rig::start(log.clone(), 1 << 16, 64);
    rig.follow("a", Some(2), Some(1));
    let got = rig.read(6).await;
    assert_eq!(got[0], reset(1, 6));
    assert_eq!(seqs(&got[1..]), posts(6..=10));
    // Resuming exactly at the oldest retained position is no reset.
    let mut rig2 = Rig::start(log.clone(), 1 << 16, 64);
    rig2.follow("a", Some(5), Some(1));
    assert_eq!(seqs(&rig2.read(5).await), posts(6..=10));
    assert_eq!(rig.finish().await.0, vec![]);
    assert_eq!(rig2.finish().await.0, vec![]);
}

async fn resume_when_everything_was_trimmed_is_reset_then_live() {
    let log = MemLog::with_posts("a", 5, 8);
    log.trim_below("a", 6);
    let mut rig = Rig::start(log.clone(), 1 << 16, 64);
    rig.follow("a", Some(2), Some(1));
    assert_eq!(rig.read(1).await, vec![reset(1, 6)]);
    assert!(rig.fan_out(&log.post("a", 8)));
    assert_eq!(seqs(&rig.read(1).await), vec![6]);
    assert_eq!(rig.finish().await.0, vec![]);
}

async fn a_lagging_follower_whose_missed_posts_were_all_trimmed_is_told() {
    let log = MemLog::with_channel("a");
    // 130 bytes: two 56-byte frames fit.
    let mut rig = Rig::start(log.clone(), 130, 1);
    rig.follow("a", None, None);
    rig.settle().await;
    rig.stall().await;
    // 3 and 4 are queued; 5..=7 overflow and are trimmed away (7 is the head).
    for _ in 3..=7 {
        rig.fan_out(&log.post("a", 40));
    }
    log.trim_below("a", 8);
    let mut got = rig.read(3).await;
    got.extend(rig.finish().await.0);
    assert_eq!(
        got,
        vec![
            Got::Post(2, format!("{:040}", 2)),
            Got::Post(3, format!("{:040}", 3)),
            Got::Post(4, format!("{:040}", 4)),
            reset(1, 8),
        ]
    );
}

async fn resume_ahead_of_the_head_is_reset() {
    let log = MemLog::with_posts("a", 3, 8);
    let mut rig = Rig::start(log.clone(), 1 << 16, 64);
    rig.follow("a", Some(9), Some(1));
    let got = rig.read(4).await;
    assert_eq!(got[0], reset(1, 1));
    assert_eq!(seqs(&got[1..]), posts(1..=3));
    assert_eq!(rig.finish().await.0, vec![]);
}

async fn history_trimmed_while_lagging_is_reset_mid_stream() {
    let log = MemLog::with_channel("a");
    // 130 bytes: two 56-byte frames fit.
    let mut rig = Rig::start(log.clone(), 130, 1);
    rig.follow("a", None, None);
    rig.settle().await;
    // Block the writer on 2, let 3..=10 mostly overflow, then trim 3..=7
    // away before the follower reads again.
    rig.stall().await;
    let mut queued = Vec::new();
    for _ in 3..=10 {
        let ev = log.post("a", 40);
        if rig.fan_out(&ev) {
            if let LogEvent::Posted(p) = ev {
                queued.push(p.seq);
            }
        }
    }
    assert_eq!(queued, vec![3, 4], "the queue holds two frames");
    log.trim_below("a", 8);
    let mut got = rig.read(5).await;
    got.extend(rig.finish().await.0);
    // 2, then what was queued, then a Reset to the oldest retained, then the rest.
    assert_eq!(
        got,
        vec![
            Got::Post(2, format!("{:040}", 2)),
            Got::Post(3, format!("{:040}", 3)),
            Got::Post(4, format!("{:040}", 4)),
            reset(1, 8),
            Got::Post(8, format!("{:040}", 8)),
            Got::Post(9, format!("{:040}", 9)),
            Got::Post(10, format!("{:040}", 10)),
        ]
    );
}

#[tokio::test]
async fn unfollow_stops_delivery_and_a_write_failure_ends_the_writer() {
    let log = MemLog::with_channel("a");
    let mut rig = Rig::start(log.clone(), 1 << 16, 64);
    rig.follow("a", None, None);
    rig.settle().await;
    assert!(rig.fan_out(&log.post("a", 8)));
    assert_eq!(seqs(&rig.read(1).await), vec![1]);
    rig.outbox.push_control(Item::Unfollow(ch("a"))).unwrap();
    assert!(rig.fan_out(&log.post("a", 8)));
    // The follower goes away: the next write fails and the writer ends.
    drop(std::mem::replace(&mut rig.frames, mpsc::channel(1).1));
    rig.follow("a", None, None);
    assert!(rig.fan_out(&log.post("a", 8)));
    let res = tokio::time::timeout(WAIT, rig.task).await.unwrap().unwrap();
    assert!(matches!(res, Err(FeedError::Write(_))), "{res:?}");
}

/// The hand-over between the task and the live path under real
/// concurrency: two worker threads, a small queue that overflows again and
/// again, a follower that reads in fits and starts, two channels (one
/// followed with history while the other is live), edits on the way. The
/// scripted scenarios above pin down each decision; this one checks only
/// the promise, over many interleavings: every post of each channel once,
/// in order, with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_and_task_hand_over_under_concurrency_keeps_every_post_once_in_order() {
    LIVE_PATH.with(|l| l.set(true));
    const POSTS: u64 = 1500;
    let log = MemLog::with_channel("a");
    log.channels.lock().unwrap().insert(
        ch("b"),
        (
            ChannelInfo {
                id: ch("b"),
                title: String::new(),
                epoch: 1,
                head_seq: 0,
                oldest_seq: 1,
                created_at_ms: 0,
            },
            BTreeMap::new(),
        ),
    );
    for _ in 0..20 {
        log.post("b", 8);
    }
    let mut rig = Rig::start_with(log.clone(), 400, 1, 16);
    rig.follow("a", None, None);
    let publisher = {
        let log = log.clone();
        let outbox = rig.outbox.clone();
        tokio::spawn(async move {
            for i in 0..POSTS {
                for (c, len) in [("a", 8 + (i % 50) as usize), ("b", 8)] {
                    let ev = log.post(c, len);
                    outbox.push_event(&Arc::new(FeedEvent::from_log(&ev)));
                }
                if i.is_multiple_of(7) {
                    let ev = log.edit("a", 1 + i / 2, "edited");
                    outbox.push_event(&Arc::new(FeedEvent::from_log(&ev)));
                }
                if i == 300 {
                    // Follow b from the start while a is live.
                    outbox
                        .push_control(Item::Follow(FollowRequest {
                            channel: ch("b"),
                            after_seq: Some(0),
                            epoch: None,
                            tail: 0,
                            resume: true,
                        }))
                        .unwrap();
                }
                if i.is_multiple_of(13) {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut next = BTreeMap::from([("a", 1u64), ("b", 1u64)]);
    let mut n = 0u64;
    tokio::time::timeout(Duration::from_secs(60), async {
        while next["a"] <= POSTS || next["b"] <= POSTS + 20 {
            let f = rig.frames.recv().await.expect("writer runs");
            n += 1;
            if n.is_multiple_of(31) {
                // Read in fits and starts, so the queue overflows.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let frame = pb::FeedFrame::decode_length_delimited(f).unwrap();
            if let Some(pb::feed_frame::Kind::Post(p)) = frame.kind {
                let want = next.get_mut(p.channel.as_str()).unwrap();
                assert_eq!(
                    p.seq, *want,
                    "channel {}: once, in order, no gap",
                    p.channel
                );
                *want += 1;
            }
        }
    })
    .await
    .expect("every post arrives");
    publisher.await.unwrap();
    let (rest, stats) = rig.finish().await;
    assert!(
        rest.iter().all(|g| !matches!(g, Got::Post(..))),
        "no post twice: {rest:?}"
    );
    // The scenario did what it is for: overflows, catch-ups and live posts.
    assert!(stats.lag_events > 0, "{stats:?}");
    assert!(stats.catchup_frames > 20, "{stats:?}");
    assert!(stats.live_frames > 0, "{stats:?}");
}

/// Impressions of the test's promoted slot: counted (in memory), and made
/// durable; durability waits until the test opens `gate`.
#[derive(Debug)]
struct PromoLedger {
    counted: std::sync::atomic::AtomicU64,
    durable: std::sync::atomic::AtomicU64,
    gate: tokio::sync::Semaphore,
}

impl Default for PromoLedger {
    fn default() -> Self {
        PromoLedger {
            counted: Default::default(),
            durable: Default::default(),
            gate: tokio::sync::Semaphore::new(0),
        }
    }
}

#[derive(Debug)]
struct TestSlot(Arc<PromoLedger>);

struct TestImpression {
    ledger: Arc<PromoLedger>,
    counted: bool,
}

impl PromotedSlot for TestSlot {
    fn claim(&self, _: &str, _: bool) -> Option<Box<dyn Impression>> {
        Some(Box::new(TestImpression {
            ledger: self.0.clone(),
            counted: false,
        }))
    }
    fn campaign_id(&self) -> &str {
        "camp"
    }
    fn remaining(&self) -> u64 {
        u64::MAX
    }
}

impl Impression for TestImpression {
    fn count(&mut self) {
        if !std::mem::replace(&mut self.counted, true) {
            self.ledger.counted.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn uncount(&mut self) {
        if std::mem::replace(&mut self.counted, false) {
            self.ledger.counted.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

struct TestSlots(Arc<PromoLedger>);

impl CatchupSlots for TestSlots {
    fn after_catchup(&self, _: &ChannelId, _: u64) -> Option<Arc<FeedEvent>> {
        None
    }
    fn durable(&self) -> DurableFuture<'_> {
        Box::pin(async {
            let permit = self.0.gate.acquire().await.map_err(|e| e.to_string())?;
            permit.forget();
            let counted = self.0.counted.load(Ordering::SeqCst);
            self.0.durable.store(counted, Ordering::SeqCst);
            Ok(())
        })
    }
}

async fn a_promoted_post_leaves_only_once_its_impression_is_durable() {
    let log = MemLog::with_channel("a");
    let ledger = Arc::new(PromoLedger::default());
    let mut rig = Rig::start_full(
        log.clone(),
        4096,
        16,
        64,
        Arc::new(TestSlots(ledger.clone())),
    );
    rig.follow("a", None, None);
    rig.settle().await;
    assert!(rig.fan_out(&log.post("a", 8)));
    assert_eq!(seqs(&rig.read(1).await), vec![1]);
    let promoted = Arc::new(FeedEvent {
        channel: ch("a"),
        seq: 1,
        kind: EventKind::Promoted,
        frame: herald_proto::encode_frame(&pb::FeedFrame {
            kind: Some(pb::feed_frame::Kind::Promoted(pb::Promoted {
                channel: "a".into(),
                campaign_id: "camp".into(),
                after_seq: 1,
                ..Default::default()
            })),
        }),
        slot: Some(Arc::new(TestSlot(ledger.clone()))),
    });
    assert!(rig.outbox.push_event(&promoted));
    assert!(rig.fan_out(&log.post("a", 8)));
    rig.settle().await;
    // Counted, not durable yet: nothing may have left, neither the promoted
    // post nor the post queued behind it.
    assert_eq!(ledger.counted.load(Ordering::SeqCst), 1);
    assert_eq!(ledger.durable.load(Ordering::SeqCst), 0);
    assert!(
        rig.frames.try_recv().is_err(),
        "a frame left before its count was durable"
    );
    ledger.gate.add_permits(1);
    assert_eq!(rig.read(1).await, vec![Got::Promoted("camp".into())]);
    assert_eq!(ledger.durable.load(Ordering::SeqCst), 1);
    assert_eq!(seqs(&rig.read(1).await), vec![2]);
    let (rest, _) = rig.finish().await;
    assert!(rest.is_empty(), "{rest:?}");
}

/// With live datagrams, the live path hands live posts out as datagrams
/// (nothing on the stream), and a Head event becomes a stream frame; a
/// follower without them gets no Head.
#[tokio::test]
async fn live_posts_go_as_datagrams_and_head_on_the_stream() {
    LIVE_PATH.with(|l| l.set(true));
    for datagrams in [true, false] {
        DATAGRAMS.with(|d| d.set(datagrams));
        let log = MemLog::with_posts("a", 3, 8);
        let mut rig = Rig::start(log.clone(), 1 << 16, 64);
        rig.follow("a", None, None);
        rig.settle().await;
        for _ in 0..5 {
            assert!(rig.fan_out(&log.post("a", 8)));
        }
        let head = Arc::new(FeedEvent::head(&ch("a"), 1, 8));
        assert!(rig.outbox.push_event(&head));
        rig.settle().await;
        if datagrams {
            let mut got = Vec::new();
            for _ in 0..5 {
                let f = rig.next_datagram().await;
                got.push(decode(&f));
            }
            assert_eq!(seqs(&got), posts(4..=8));
            assert_eq!(rig.read(1).await, vec![Got::Head(8)]);
            let (rest, stats) = rig.finish().await;
            assert_eq!(rest, vec![]);
            assert_eq!(stats.live_frames, 5);
        } else {
            assert_eq!(seqs(&rig.read(5).await), posts(4..=8));
            assert!(rig.datagrams.try_recv().is_err(), "no datagrams unasked");
            let (rest, _) = rig.finish().await;
            assert_eq!(rest, vec![], "no Head without datagrams");
        }
    }
    DATAGRAMS.with(|d| d.set(false));
}

/// A Resend writes the posts asked for again, from the log and in their
/// current state, but none the follower was not sent yet (above the
/// cursor); posts trimmed meanwhile are announced with a Reset; a Resend of
/// a channel not followed writes nothing. The cursor does not move: the next
/// live post still comes once.
#[tokio::test]
async fn resend_writes_the_posts_asked_for_as_they_are_now() {
    LIVE_PATH.with(|l| l.set(true));
    DATAGRAMS.with(|d| d.set(true));
    let log = MemLog::with_posts("a", 3, 8);
    let mut rig = Rig::start(log.clone(), 1 << 16, 64);
    rig.follow("a", None, None);
    rig.settle().await;
    for _ in 0..3 {
        assert!(rig.fan_out(&log.post("a", 8)));
    }
    for _ in 0..3 {
        rig.next_datagram().await;
    }
    log.edit("a", 5, "edited");
    // Committed, not fanned out yet: not sent, so not resent.
    let seven = log.post("a", 8);
    let resend = |channel: &str, from, to| Item::Resend {
        channel: ch(channel),
        from,
        to,
    };
    rig.outbox.push_control(resend("a", 4, 9)).unwrap();
    assert_eq!(
        rig.read(3).await,
        vec![
            Got::Post(4, "00000004".into()),
            Got::Post(5, "edited".into()),
            Got::Post(6, "00000006".into()),
        ]
    );
    log.trim_below("a", 6);
    rig.outbox.push_control(resend("a", 4, 6)).unwrap();
    assert_eq!(
        rig.read(2).await,
        vec![reset(1, 6), Got::Post(6, "00000006".into())]
    );
    rig.outbox.push_control(resend("b", 1, 3)).unwrap();
    assert!(rig.fan_out(&seven));
    // Live again: as a datagram, or on the stream if the task still had
    // the queue when it came.
    let f = tokio::time::timeout(WAIT, async {
        tokio::select! {
            Some(f) = rig.datagrams.recv() => f,
            Some(f) = rig.frames.recv() => f,
        }
    })
    .await
    .expect("post 7 in time");
    assert_eq!(decode(&f), Got::Post(7, "00000007".into()));
    let (rest, stats) = rig.finish().await;
    assert_eq!(rest, vec![]);
    assert_eq!(stats.live_frames, 4);
    assert_eq!(stats.catchup_frames, 4);
    DATAGRAMS.with(|d| d.set(false));
}

/// Runs each scenario on both paths.
macro_rules! on_both_paths {
    ($($name:ident),* $(,)?) => {
        mod task_path {
            $(
                #[tokio::test]
                async fn $name() {
                    super::LIVE_PATH.with(|l| l.set(false));
                    super::$name().await
                }
            )*
        }
        mod live_path {
            $(
                #[tokio::test]
                async fn $name() {
                    super::LIVE_PATH.with(|l| l.set(true));
                    super::$name().await
                }
            )*
        }
    };
}

on_both_paths!(
    live_only_follow_gets_each_live_post_once_in_order,
    catch_up_then_live_with_posts_racing_the_switch,
    a_post_dropped_on_overflow_is_filled_from_the_log_before_the_next,
    a_follower_that_lagged_at_the_tail_is_caught_up_to_the_head,
    edits_and_deletes_dropped_on_overflow_are_resent_from_the_log,
    edits_of_posts_not_yet_delivered_are_not_sent,
    resume_with_another_epoch_is_reset_and_replayed,
    resume_below_the_retained_history_is_reset_to_the_oldest,
    resume_when_everything_was_trimmed_is_reset_then_live,
    a_lagging_follower_whose_missed_posts_were_all_trimmed_is_told,
    resume_ahead_of_the_head_is_reset,
    history_trimmed_while_lagging_is_reset_mid_stream,
    a_promoted_post_leaves_only_once_its_impression_is_durable,
);
