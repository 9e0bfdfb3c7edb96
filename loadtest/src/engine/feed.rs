//! One follower's feed in the `loop` engine: what the feed stream and
//! live-post datagrams bring goes through the reference client's ordering
//! module ([`herald_client::ordering`], one [`ChannelOrder`] per followed
//! channel, the rules of docs/protocol.md §8.4 and §8.5), and only the posts
//! it releases, in seq order, reach [`record_post`]; so the run's
//! verification stays exact whichever path a post came by. The `Resend`s
//! the module asks for are encoded here for the session to send.
//!
//! Without live datagrams (not asked, or not granted in Welcome) the module
//! follows §8.4: posts are released as they come. A duplicate post then is
//! the server's fault and is counted as such ([`FollowerResult::client_duplicates`]);
//! with datagrams, duplicates are expected (a late datagram, a resent post)
//! and dropped quietly.
//!
//! Bounds: per channel, the module's ([`herald_client::ordering::MAX_HELD_POSTS`]
//! posts and [`herald_client::ordering::MAX_HELD_CHANGES`] changes held); the
//! release buffer holds what one frame releases and is emptied before the
//! call returns; resends in flight are at most one per channel.

use std::sync::atomic::Ordering;
use std::time::Instant;

use herald_client::ordering::{ChannelOrder, PostOutcome, Release, Source};
use herald_proto::frame::encode_frame;
use herald_proto::v1 as pb;

use super::frames::decode_post;
use super::FollowerPlan;
use crate::follower::{record_post, FollowerResult, Shared};

/// A post held or released by the module: what the tally needs.
struct Arrived {
    text: String,
    source: Source,
}

/// A change held or released by the module.
enum Change {
    /// A promoted post: counted when released (after the post it follows).
    Promoted,
    /// An edit or a delete: nothing to tally.
    Other,
}

/// What one call has to tell about the follower's inputs.
pub(super) struct Ctx<'a> {
    pub(super) plan: &'a FollowerPlan,
    pub(super) shared: &'a Shared,
    pub(super) out: &'a mut FollowerResult,
}

pub(super) struct Feed {
    /// Welcome granted live datagrams.
    granted: bool,
    /// Test knob: drop every Nth live-post datagram (0: none).
    drop_every: u32,
    /// Live-post datagrams received so far (for `drop_every`).
    datagram_posts_seen: u64,
    /// Per channel of the plan, in plan order (empty until Welcome).
    orders: Vec<ChannelOrder<Arrived, Change>>,
    /// What the module released for the call in progress.
    released: Vec<Release<Arrived, Change>>,
    /// Resends in flight: (request id, index in the plan's channels).
    resends: Vec<(u64, usize)>,
}

impl Feed {
    pub(super) fn new(drop_every: u32) -> Feed {
        Feed {
            granted: false,
            drop_every,
            datagram_posts_seen: 0,
            orders: Vec::new(),
            released: Vec::new(),
            resends: Vec::new(),
        }
    }

    /// Welcome came: whether live datagrams were granted, and the plan's
    /// channel count (one ordering each, no position yet).
    pub(super) fn welcome(&mut self, granted: bool, channels: usize) {
        self.granted = granted;
        self.orders = (0..channels).map(|_| ChannelOrder::new(granted)).collect();
    }

    /// The follow of channel `i` (of the plan) was answered: a live follow,
    /// so its position is the channel's head then (§9); held posts after it
    /// are released. The caller has created the channel's tally.
    pub(super) fn followed(&mut self, i: usize, head_seq: u64, epoch: u64, cx: &mut Ctx<'_>) {
        if let Some(o) = self.orders.get_mut(i) {
            o.followed(head_seq, epoch, 0, &mut self.released);
        }
        self.deliver(i, cx);
    }

    /// One frame of the feed stream.
    pub(super) fn frame(&mut self, f: pb::FeedFrame, cx: &mut Ctx<'_>) {
        use pb::feed_frame::Kind;
        match f.kind {
            Some(Kind::Post(p)) => self.post(p, Source::Stream, cx),
            Some(Kind::Reset(r)) => {
                if let Some(i) = channel(cx.plan, &r.channel) {
                    cx.out.resets += 1;
                    if let Some(o) = self.orders.get_mut(i) {
                        o.reset(r.epoch, r.oldest_seq, &mut self.released);
                    }
                    self.deliver(i, cx);
                }
            }
            Some(Kind::Head(h)) => {
                if let Some(o) = channel(cx.plan, &h.channel).and_then(|i| self.orders.get_mut(i)) {
                    o.head(h.epoch, h.seq);
                }
            }
            Some(Kind::Promoted(p)) => {
                self.change(&p.channel, p.after_seq, None, Change::Promoted, cx)
            }
            Some(Kind::Edited(e)) => {
                self.change(&e.channel, e.seq, Some(e.epoch), Change::Other, cx)
            }
            Some(Kind::Deleted(d)) => {
                self.change(&d.channel, d.seq, Some(d.epoch), Change::Other, cx)
            }
            None => {}
        }
    }

    /// One QUIC datagram: a live post, decoded (a malformed one is a
    /// protocol error of the follower, counted, and dropped) and, unless
    /// the test knob drops it, ordered.
    pub(super) fn datagram(&mut self, d: &[u8], max_frame: usize, cx: &mut Ctx<'_>) {
        let p = match decode_post(d, max_frame) {
            Ok(p) => p,
            Err(e) => {
                cx.out.errors += 1;
                cx.out
                    .error
                    .get_or_insert_with(|| format!("bad datagram: {e}"));
                return;
            }
        };
        self.datagram_posts_seen += 1;
        if self.drop_every > 0
            && self
                .datagram_posts_seen
                .is_multiple_of(u64::from(self.drop_every))
        {
            cx.out.datagrams_dropped += 1;
            return;
        }
        self.post(p, Source::Datagram, cx);
    }

    /// Answer `request_id` (`Resent`, or an `Error`) came at `now`: true if
    /// it answered one of this feed's `Resend`s.
    pub(super) fn resent(&mut self, request_id: u64, now: Instant) -> bool {
        let Some(k) = self.resends.iter().position(|(id, _)| *id == request_id) else {
            return false;
        };
        let (_, i) = self.resends.swap_remove(k);
        if let Some(o) = self.orders.get_mut(i) {
            o.resent(now);
        }
        true
    }

    /// Encodes into `ctl` the `Resend`s the channels ask for now, numbered
    /// from `next_id` on; returns whether there were any.
    pub(super) fn poll_resends(
        &mut self,
        now: Instant,
        next_id: &mut u64,
        ctl: &mut Vec<u8>,
        cx: &mut Ctx<'_>,
    ) -> bool {
        if !self.granted {
            return false;
        }
        let mut any = false;
        for (i, o) in self.orders.iter_mut().enumerate() {
            let Some(r) = o.poll_resend(now) else {
                continue;
            };
            let id = *next_id;
            *next_id += 1;
            let frame = pb::ClientFrame {
                request_id: id,
                kind: Some(pb::client_frame::Kind::Resend(pb::Resend {
                    channel: cx.plan.channels.get(i).cloned().unwrap_or_default(),
                    from_seq: r.from_seq,
                    to_seq: r.to_seq,
                })),
            };
            ctl.extend_from_slice(&encode_frame(&frame));
            // The module asks again only once the last one was answered,
            // so this replaces nothing; it keeps the list at one per channel.
            self.resends.retain(|(_, c)| *c != i);
            self.resends.push((id, i));
            cx.out.resends += 1;
            any = true;
        }
        any
    }

    /// When a channel may ask for a gap again (the retry after a `Resent`).
    pub(super) fn retry_at(&self) -> Option<Instant> {
        self.orders.iter().filter_map(|o| o.retry_at()).min()
    }

    fn post(&mut self, p: pb::Post, source: Source, cx: &mut Ctx<'_>) {
        let Some(i) = channel(cx.plan, &p.channel).filter(|&i| i < self.orders.len()) else {
            // Not followed (or before Welcome): tallied as unexpected.
            record_post(cx.shared, cx.out, |_, _| None, &p.channel, p.seq, &p.text);
            count(cx.out, source);
            return;
        };
        let arrived = Arrived {
            text: p.text,
            source,
        };
        let outcome = self.orders[i].post(source, p.seq, p.epoch, arrived, &mut self.released);
        if outcome == PostOutcome::Duplicate && !self.granted {
            cx.out.client_duplicates += 1;
        }
        self.deliver(i, cx);
    }

    fn change(
        &mut self,
        name: &str,
        at: u64,
        epoch: Option<u64>,
        change: Change,
        cx: &mut Ctx<'_>,
    ) {
        let Some(i) = channel(cx.plan, name) else {
            return;
        };
        match self.orders.get_mut(i) {
            Some(o) => {
                o.change(at, epoch, change, &mut self.released);
            }
            // Before Welcome (it cannot be): taken as it comes.
            None => self.released.push(Release::Change(change)),
        }
        self.deliver(i, cx);
    }

    /// Tallies what the module released for channel `i`.
    fn deliver(&mut self, i: usize, cx: &mut Ctx<'_>) {
        let name = cx.plan.channels.get(i).map_or("", String::as_str);
        for r in self.released.drain(..) {
            match r {
                Release::Post { seq, post, .. } => {
                    record_post(
                        cx.shared,
                        cx.out,
                        |tallies, ch| tallies.iter().position(|t| t.channel == ch),
                        name,
                        seq,
                        &post.text,
                    );
                    count(cx.out, post.source);
                }
                Release::Change(Change::Promoted) => {
                    cx.shared.promoted.fetch_add(1, Ordering::Relaxed);
                }
                Release::Change(Change::Other) => {}
            }
        }
    }
}

/// The index of `name` in the plan's channels.
fn channel(plan: &FollowerPlan, name: &str) -> Option<usize> {
    plan.channels.iter().position(|c| c == name)
}

fn count(out: &mut FollowerResult, source: Source) {
    match source {
        Source::Stream => out.stream_posts += 1,
        Source::Datagram => out.datagram_posts += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> FollowerPlan {
        FollowerPlan {
            index: 0,
            token: String::new(),
            channels: vec!["a".into()],
            server: ([127, 0, 0, 1], 1).into(),
        }
    }

    fn post(seq: u64) -> pb::Post {
        pb::Post {
            channel: "a".into(),
            seq,
            epoch: 1,
            text: format!("post {seq}"),
            ..Default::default()
        }
    }

    fn datagram(seq: u64) -> Vec<u8> {
        encode_frame(&pb::FeedFrame {
            kind: Some(pb::feed_frame::Kind::Post(post(seq))),
        })
        .to_vec()
    }

    fn stream(seq: u64) -> pb::FeedFrame {
        pb::FeedFrame {
            kind: Some(pb::feed_frame::Kind::Post(post(seq))),
        }
    }

    /// The tally of channel "a" (index 0 of the run's channels), followed
    /// at head 0.
    fn tally(out: &mut FollowerResult) {
        out.channels.push(crate::follower::ChannelTally::default());
    }

    #[test]
    fn datagrams_are_ordered_dropped_and_asked_for_again() {
        let plan = plan();
        let shared = Shared::new(&["a".to_string()], &[10], 1);
        let mut out = FollowerResult::default();
        let mut feed = Feed::new(3);
        feed.welcome(true, 1);
        let max = 1024;
        // Before Followed: held.
        feed.datagram(
            &datagram(1),
            max,
            &mut Ctx {
                plan: &plan,
                shared: &shared,
                out: &mut out,
            },
        );
        assert_eq!(out.datagram_posts, 0);
        tally(&mut out);
        feed.followed(
            0,
            0,
            1,
            &mut Ctx {
                plan: &plan,
                shared: &shared,
                out: &mut out,
            },
        );
        assert_eq!((out.channels[0].last, out.datagram_posts), (1, 1));
        // 2 arrives, 3 is the third datagram: dropped; 4 is held.
        for seq in [2, 3, 4] {
            feed.datagram(
                &datagram(seq),
                max,
                &mut Ctx {
                    plan: &plan,
                    shared: &shared,
                    out: &mut out,
                },
            );
        }
        assert_eq!((out.channels[0].last, out.datagrams_dropped), (2, 1));
        let now = Instant::now();
        let (mut next_id, mut ctl) = (7, Vec::new());
        let mut cx = Ctx {
            plan: &plan,
            shared: &shared,
            out: &mut out,
        };
        assert!(feed.poll_resends(now, &mut next_id, &mut ctl, &mut cx));
        let mut buf = super::super::frames::FrameBuf::new(1024);
        buf.push(&ctl);
        let f: pb::ClientFrame = buf.next().unwrap().unwrap();
        assert_eq!(f.request_id, 7);
        match f.kind {
            Some(pb::client_frame::Kind::Resend(r)) => {
                assert_eq!((r.channel.as_str(), r.from_seq, r.to_seq), ("a", 3, 3))
            }
            other => panic!("{other:?}"),
        }
        // One in flight: nothing more until it is answered.
        assert!(!feed.poll_resends(now, &mut next_id, &mut ctl, &mut cx));
        assert!(!feed.resent(99, now));
        assert!(feed.resent(7, now));
        assert!(feed.retry_at().is_some());
        // The resent post comes on the stream: 3 and the held 4 are tallied.
        feed.frame(stream(3), &mut cx);
        assert_eq!((out.channels[0].last, out.channels[0].received), (4, 4));
        assert_eq!(
            (out.stream_posts, out.datagram_posts, out.resends),
            (1, 3, 1)
        );
        // A late copy is dropped quietly with datagrams.
        feed.datagram(
            &datagram(3),
            max,
            &mut Ctx {
                plan: &plan,
                shared: &shared,
                out: &mut out,
            },
        );
        assert_eq!(
            (out.channels[0].out_of_order, out.client_duplicates),
            (0, 0)
        );
        // A malformed datagram is an error of the follower.
        feed.datagram(
            &[5, 1, 2],
            max,
            &mut Ctx {
                plan: &plan,
                shared: &shared,
                out: &mut out,
            },
        );
        assert_eq!(out.errors, 1);
        assert!(out.error.is_some());
    }

    #[test]
    fn a_head_above_the_position_asks_for_the_rest() {
        let plan = plan();
        let shared = Shared::new(&["a".to_string()], &[10], 1);
        let mut out = FollowerResult::default();
        tally(&mut out);
        let mut feed = Feed::new(0);
        feed.welcome(true, 1);
        let mut cx = Ctx {
            plan: &plan,
            shared: &shared,
            out: &mut out,
        };
        feed.followed(0, 0, 1, &mut cx);
        feed.frame(stream(1), &mut cx);
        feed.frame(
            pb::FeedFrame {
                kind: Some(pb::feed_frame::Kind::Head(pb::Head {
                    channel: "a".into(),
                    epoch: 1,
                    seq: 3,
                })),
            },
            &mut cx,
        );
        let (mut next_id, mut ctl) = (1, Vec::new());
        assert!(feed.poll_resends(Instant::now(), &mut next_id, &mut ctl, &mut cx));
        assert_eq!(next_id, 2);
        assert_eq!(cx.out.resends, 1);
    }

    #[test]
    fn without_datagrams_a_duplicate_is_the_servers_fault() {
        let plan = plan();
        let shared = Shared::new(&["a".to_string()], &[10], 1);
        let mut out = FollowerResult::default();
        tally(&mut out);
        let mut feed = Feed::new(0);
        feed.welcome(false, 1);
        let mut cx = Ctx {
            plan: &plan,
            shared: &shared,
            out: &mut out,
        };
        feed.followed(0, 0, 1, &mut cx);
        for seq in [1, 2, 2, 4] {
            feed.frame(stream(seq), &mut cx);
        }
        let (mut next_id, mut ctl) = (1, Vec::new());
        assert!(!feed.poll_resends(Instant::now(), &mut next_id, &mut ctl, &mut cx));
        let t = out.channels[0];
        // The gap (3) is released past and counted by the tally.
        assert_eq!((t.last, t.received, t.gaps), (4, 3, 1));
        assert_eq!((out.client_duplicates, out.stream_posts), (1, 3));
    }
}
