//! Tests of the ordering rules: each promise of the module docs, then a
//! simulated server and lossy network with many seeds.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use super::*;

/// A change in the tests: an edit of a post, or a promoted post after one.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ch {
    Edit { seq: u64, text: String },
    Promo { after: u64 },
}

type Order = ChannelOrder<String, Ch>;
type Out = Vec<Release<String, Ch>>;

fn text(seq: u64) -> String {
    format!("post {seq}")
}

fn seqs(out: &Out) -> Vec<u64> {
    out.iter()
        .filter_map(|r| match r {
            Release::Post { seq, .. } => Some(*seq),
            Release::Change(_) => None,
        })
        .collect()
}

/// A channel with datagrams and position `last`, epoch 1.
fn at(last: u64) -> Order {
    let mut o = Order::new(true);
    let mut out = Out::new();
    o.resume_from(last, Some(1), &mut out);
    assert!(out.is_empty());
    o
}

fn dg(o: &mut Order, seq: u64, out: &mut Out) -> PostOutcome {
    o.post(Source::Datagram, seq, 1, text(seq), out)
}

fn st(o: &mut Order, seq: u64, out: &mut Out) -> PostOutcome {
    o.post(Source::Stream, seq, 1, text(seq), out)
}

#[test]
fn in_order_posts_are_released_at_once_from_either_path() {
    let mut o = at(0);
    let mut out = Out::new();
    for seq in 1..=10 {
        let r = if seq % 2 == 0 {
            dg(&mut o, seq, &mut out)
        } else {
            st(&mut o, seq, &mut out)
        };
        assert_eq!(r, PostOutcome::Released);
    }
    assert_eq!(seqs(&out), (1..=10).collect::<Vec<_>>());
    assert_eq!(o.last_seq(), Some(10));
    assert_eq!(o.poll_resend(Instant::now()), None);
}

#[test]
fn duplicates_from_either_path_are_dropped() {
    let mut o = at(0);
    let mut out = Out::new();
    assert_eq!(dg(&mut o, 1, &mut out), PostOutcome::Released);
    assert_eq!(st(&mut o, 1, &mut out), PostOutcome::Duplicate);
    assert_eq!(dg(&mut o, 1, &mut out), PostOutcome::Duplicate);
    assert_eq!(dg(&mut o, 3, &mut out), PostOutcome::Held);
    assert_eq!(dg(&mut o, 3, &mut out), PostOutcome::Duplicate);
    assert_eq!(o.held_posts(), 1);
    assert_eq!(st(&mut o, 2, &mut out), PostOutcome::Released);
    assert_eq!(st(&mut o, 3, &mut out), PostOutcome::Duplicate);
    assert_eq!(seqs(&out), vec![1, 2, 3]);
    assert_eq!(o.held_posts(), 0);
}

#[test]
fn reordered_posts_are_held_and_released_in_order() {
    let mut o = at(0);
    let mut out = Out::new();
    for seq in [3, 5, 4, 2] {
        assert_eq!(dg(&mut o, seq, &mut out), PostOutcome::Held);
    }
    assert!(out.is_empty());
    assert_eq!(st(&mut o, 1, &mut out), PostOutcome::Released);
    assert_eq!(seqs(&out), vec![1, 2, 3, 4, 5]);
    // The payload goes with its seq.
    for r in &out {
        if let Release::Post { seq, post, epoch } = r {
            assert_eq!(post, &text(*seq));
            assert_eq!(*epoch, 1);
        }
    }
}

#[test]
fn copies_of_posts_asked_for_again_are_told_apart_from_unasked_duplicates() {
    let mut o = at(10);
    let mut out = Out::new();
    dg(&mut o, 13, &mut out);
    assert!(!o.was_asked(11), "nothing asked yet");
    assert_eq!(
        o.poll_resend(Instant::now()),
        Some(Resend {
            from_seq: 11,
            to_seq: 12
        })
    );
    assert!(o.was_asked(11) && o.was_asked(12));
    assert!(!o.was_asked(13), "13 was not asked for");
    // The resent posts come; the originals, late, are copies of asked posts.
    st(&mut o, 11, &mut out);
    st(&mut o, 12, &mut out);
    assert_eq!(seqs(&out), vec![11, 12, 13]);
    assert_eq!(dg(&mut o, 12, &mut out), PostOutcome::Duplicate);
    assert!(o.was_asked(12));
    // A new connection asked nothing yet.
    o.new_connection(true, &mut out);
    assert!(!o.was_asked(12));
}

#[test]
fn a_gap_is_asked_for_once_until_answered_then_again_after_a_second() {
    let t0 = Instant::now();
    let mut o = at(10);
    let mut out = Out::new();
    dg(&mut o, 14, &mut out);
    dg(&mut o, 15, &mut out);
    let ask = o.poll_resend(t0);
    assert_eq!(
        ask,
        Some(Resend {
            from_seq: 11,
            to_seq: 13
        })
    );
    // In flight: nothing more, however long it takes.
    dg(&mut o, 20, &mut out);
    assert_eq!(o.poll_resend(t0 + Duration::from_secs(5)), None);
    assert_eq!(o.retry_at(), None);
    // Answered: nothing for a second, then the same gap again.
    let t1 = t0 + Duration::from_secs(6);
    o.resent(t1);
    assert_eq!(o.retry_at(), Some(t1 + RESEND_RETRY));
    assert_eq!(o.poll_resend(t1 + Duration::from_millis(999)), None);
    assert_eq!(o.poll_resend(t1 + RESEND_RETRY), ask);
    o.resent(t1 + RESEND_RETRY);
    // The resent posts come on the stream: the next gap is asked at once.
    for seq in 11..=13 {
        st(&mut o, seq, &mut out);
    }
    assert_eq!(seqs(&out), vec![11, 12, 13, 14, 15]);
    assert_eq!(
        o.poll_resend(t1 + RESEND_RETRY),
        Some(Resend {
            from_seq: 16,
            to_seq: 19
        })
    );
}

#[test]
fn a_filled_gap_is_not_asked_again_after_its_answer() {
    let t0 = Instant::now();
    let mut o = at(0);
    let mut out = Out::new();
    dg(&mut o, 2, &mut out);
    assert!(o.poll_resend(t0).is_some());
    st(&mut o, 1, &mut out);
    // Still in flight (unanswered): no second request.
    assert_eq!(o.poll_resend(t0), None);
    o.resent(t0);
    assert_eq!(o.poll_resend(t0 + Duration::from_secs(2)), None);
    assert_eq!(seqs(&out), vec![1, 2]);
}

#[test]
fn long_gaps_are_asked_for_in_pieces_of_at_most_1024() {
    let t0 = Instant::now();
    let mut o = at(0);
    let mut out = Out::new();
    dg(&mut o, 3000, &mut out);
    let a = o.poll_resend(t0).unwrap();
    assert_eq!((a.from_seq, a.to_seq), (1, 1024));
    assert_eq!(a.to_seq - a.from_seq + 1, MAX_RESEND_SEQS);
    o.resent(t0);
    for seq in 1..=1024 {
        st(&mut o, seq, &mut out);
    }
    let b = o.poll_resend(t0).unwrap();
    assert_eq!((b.from_seq, b.to_seq), (1025, 2048));
    o.resent(t0);
    for seq in 1025..=2048 {
        st(&mut o, seq, &mut out);
    }
    let c = o.poll_resend(t0).unwrap();
    assert_eq!((c.from_seq, c.to_seq), (2049, 2999));
    o.resent(t0);
    for seq in 2049..=2999 {
        st(&mut o, seq, &mut out);
    }
    assert_eq!(seqs(&out), (1..=3000).collect::<Vec<_>>());
    assert_eq!(o.poll_resend(t0 + Duration::from_secs(9)), None);
}

#[test]
fn head_repairs_a_lost_last_datagram() {
    let t0 = Instant::now();
    let mut o = at(0);
    let mut out = Out::new();
    for seq in 1..=7 {
        dg(&mut o, seq, &mut out);
    }
    // 8, 9, 10 were lost: nothing tells the client but Head.
    assert_eq!(o.poll_resend(t0), None);
    o.head(1, 10);
    assert_eq!(
        o.poll_resend(t0),
        Some(Resend {
            from_seq: 8,
            to_seq: 10
        })
    );
    o.resent(t0);
    for seq in 8..=10 {
        st(&mut o, seq, &mut out);
    }
    assert_eq!(seqs(&out), (1..=10).collect::<Vec<_>>());
    assert_eq!(o.poll_resend(t0 + Duration::from_secs(5)), None);
    // A Head at or below the position, or of another epoch, asks nothing.
    o.head(1, 10);
    o.head(2, 50);
    assert_eq!(o.poll_resend(t0 + Duration::from_secs(10)), None);
}

#[test]
fn head_above_held_posts_asks_below_them_first_then_the_rest() {
    let t0 = Instant::now();
    let mut o = at(0);
    let mut out = Out::new();
    dg(&mut o, 3, &mut out);
    o.head(1, 6);
    assert_eq!(
        o.poll_resend(t0),
        Some(Resend {
            from_seq: 1,
            to_seq: 2
        })
    );
    o.resent(t0);
    st(&mut o, 1, &mut out);
    st(&mut o, 2, &mut out);
    assert_eq!(
        o.poll_resend(t0),
        Some(Resend {
            from_seq: 4,
            to_seq: 6
        })
    );
}

#[test]
fn datagrams_wait_for_a_position_from_followed() {
    let mut o = Order::new(true);
    let mut out = Out::new();
    for seq in [12, 11, 14, 9] {
        assert_eq!(dg(&mut o, seq, &mut out), PostOutcome::Held);
    }
    assert!(out.is_empty());
    assert_eq!(o.poll_resend(Instant::now()), None);
    // A live follow: head 10, no tail.
    o.followed(10, 1, 0, &mut out);
    assert_eq!(seqs(&out), vec![11, 12]);
    assert_eq!(o.last_seq(), Some(12));
    assert_eq!(
        o.poll_resend(Instant::now()),
        Some(Resend {
            from_seq: 13,
            to_seq: 13
        })
    );
    // A second Followed does not move the position.
    o.followed(100, 1, 0, &mut out);
    assert_eq!(o.last_seq(), Some(12));
}

#[test]
fn followed_with_a_tail_and_a_stream_post_set_the_position() {
    let mut o = Order::new(true);
    let mut out = Out::new();
    o.followed(10, 1, 3, &mut out);
    assert_eq!(o.last_seq(), Some(7));
    // Before Followed, stream posts wait too: a live post too large for a
    // datagram (8) must not jump the datagram posts before it (6, lost 7).
    let mut p = Order::new(true);
    dg(&mut p, 6, &mut out);
    assert_eq!(st(&mut p, 8, &mut out), PostOutcome::Held);
    assert_eq!(st(&mut p, 4, &mut out), PostOutcome::Held);
    dg(&mut p, 5, &mut out);
    assert!(out.is_empty());
    p.followed(5, 1, 2, &mut out);
    assert_eq!(seqs(&out), vec![4, 5, 6]);
    assert_eq!(
        p.poll_resend(Instant::now()),
        Some(Resend {
            from_seq: 7,
            to_seq: 7
        })
    );
    // Without datagrams the first stream post sets the position (8.4).
    let mut q = Order::new(false);
    let mut out = Out::new();
    assert_eq!(st(&mut q, 4, &mut out), PostOutcome::Released);
    q.followed(9, 1, 0, &mut out);
    assert_eq!(q.last_seq(), Some(4));
}

#[test]
fn held_datagrams_of_another_epoch_are_dropped_when_the_position_comes() {
    let mut o = Order::new(true);
    let mut out = Out::new();
    o.post(Source::Datagram, 11, 7, text(11), &mut out);
    dg(&mut o, 12, &mut out);
    o.followed(10, 1, 0, &mut out);
    // 11 was of epoch 7: gone; 12 waits for 11.
    assert!(out.is_empty());
    assert_eq!(o.held_posts(), 1);
    // A datagram of another epoch than the known one is stale.
    assert_eq!(
        o.post(Source::Datagram, 11, 7, text(11), &mut out),
        PostOutcome::Stale
    );
    assert_eq!(st(&mut o, 11, &mut out), PostOutcome::Released);
    assert_eq!(seqs(&out), vec![11, 12]);
}

#[test]
fn edits_and_promoted_posts_wait_for_their_post_and_keep_arrival_order() {
    let mut o = at(0);
    let mut out = Out::new();
    dg(&mut o, 1, &mut out);
    // 2 is late; changes for 2 and 3 and a promoted after 2 arrive first.
    let e2 = Ch::Edit {
        seq: 2,
        text: "two".into(),
    };
    let p2 = Ch::Promo { after: 2 };
    let e3 = Ch::Edit {
        seq: 3,
        text: "three".into(),
    };
    let e1 = Ch::Edit {
        seq: 1,
        text: "one".into(),
    };
    assert_eq!(
        o.change(2, Some(1), e2.clone(), &mut out),
        ChangeOutcome::Held
    );
    assert_eq!(o.change(2, None, p2.clone(), &mut out), ChangeOutcome::Held);
    assert_eq!(
        o.change(3, Some(1), e3.clone(), &mut out),
        ChangeOutcome::Held
    );
    // A change for a released post goes out at once.
    assert_eq!(
        o.change(1, Some(1), e1.clone(), &mut out),
        ChangeOutcome::Released
    );
    assert_eq!(o.held_changes(), 3);
    dg(&mut o, 2, &mut out);
    dg(&mut o, 3, &mut out);
    let want: Out = vec![
        Release::Post {
            seq: 1,
            epoch: 1,
            post: text(1),
        },
        Release::Change(e1),
        Release::Post {
            seq: 2,
            epoch: 1,
            post: text(2),
        },
        Release::Change(e2),
        Release::Change(p2),
        Release::Post {
            seq: 3,
            epoch: 1,
            post: text(3),
        },
        Release::Change(e3),
    ];
    assert_eq!(out, want);
    assert_eq!(o.held_changes(), 0);
}

#[test]
fn changes_wait_for_a_position_too() {
    let mut o = Order::new(true);
    let mut out = Out::new();
    let e = Ch::Edit {
        seq: 5,
        text: "x".into(),
    };
    assert_eq!(
        o.change(5, Some(1), e.clone(), &mut out),
        ChangeOutcome::Held
    );
    o.followed(9, 1, 0, &mut out);
    assert_eq!(out, vec![Release::Change(e)]);
}

#[test]
fn held_posts_are_bounded_keeping_the_lowest() {
    let mut o = at(0);
    let mut out = Out::new();
    for seq in 2..2 + MAX_HELD_POSTS as u64 {
        assert_eq!(dg(&mut o, seq, &mut out), PostOutcome::Held);
    }
    assert_eq!(o.held_posts(), MAX_HELD_POSTS);
    let top = 1 + MAX_HELD_POSTS as u64;
    // Above everything held: dropped.
    assert_eq!(dg(&mut o, top + 1, &mut out), PostOutcome::DroppedFull);
    assert_eq!(o.held_posts(), MAX_HELD_POSTS);
    // Below the highest held: the highest makes room.
    dg(&mut o, top, &mut out); // a duplicate of the highest: dropped
    assert_eq!(st(&mut o, 1, &mut out), PostOutcome::Released);
    assert_eq!(seqs(&out), (1..=top).collect::<Vec<_>>());
    let mut o = at(0);
    let mut out = Out::new();
    for seq in 3..3 + MAX_HELD_POSTS as u64 {
        dg(&mut o, seq, &mut out);
    }
    assert_eq!(dg(&mut o, 2, &mut out), PostOutcome::Held);
    assert_eq!(o.held_posts(), MAX_HELD_POSTS);
    st(&mut o, 1, &mut out);
    // The evicted highest is missing: it is asked for when noticed.
    let last = o.last_seq().unwrap();
    assert_eq!(last, 1 + MAX_HELD_POSTS as u64);
    o.head(1, last + 1);
    assert_eq!(
        o.poll_resend(Instant::now()),
        Some(Resend {
            from_seq: last + 1,
            to_seq: last + 1
        })
    );
}

#[test]
fn held_changes_are_bounded() {
    let mut o = at(0);
    let mut out = Out::new();
    for i in 0..MAX_HELD_CHANGES as u64 {
        assert_eq!(
            o.change(5, None, Ch::Promo { after: i }, &mut out),
            ChangeOutcome::Held
        );
    }
    assert_eq!(
        o.change(5, None, Ch::Promo { after: 9999 }, &mut out),
        ChangeOutcome::DroppedFull
    );
    for seq in 1..=5 {
        st(&mut o, seq, &mut out);
    }
    let promos: Vec<_> = out
        .iter()
        .filter_map(|r| match r {
            Release::Change(Ch::Promo { after }) => Some(*after),
            _ => None,
        })
        .collect();
    assert_eq!(promos, (0..MAX_HELD_CHANGES as u64).collect::<Vec<_>>());
}

#[test]
fn reset_in_the_same_epoch_drops_what_is_below_the_new_position() {
    let mut o = at(0);
    let mut out = Out::new();
    for seq in [3, 5, 9] {
        dg(&mut o, seq, &mut out);
    }
    o.change(4, Some(1), Ch::Promo { after: 4 }, &mut out);
    o.change(9, Some(1), Ch::Promo { after: 9 }, &mut out);
    // Posts 1..4 were trimmed: delivery goes on from 5.
    o.reset(1, 5, &mut out);
    assert_eq!(o.last_seq(), Some(5));
    assert_eq!(seqs(&out), vec![5]);
    assert_eq!(o.held_posts(), 1);
    assert_eq!(o.held_changes(), 1);
    for seq in 6..=8 {
        st(&mut o, seq, &mut out);
    }
    assert_eq!(seqs(&out), vec![5, 6, 7, 8, 9]);
    assert_eq!(out.last(), Some(&Release::Change(Ch::Promo { after: 9 })));
}

#[test]
fn reset_to_a_new_epoch_drops_everything_of_the_old_one() {
    let mut o = at(10);
    let mut out = Out::new();
    dg(&mut o, 12, &mut out);
    o.change(
        12,
        Some(1),
        Ch::Edit {
            seq: 12,
            text: "old".into(),
        },
        &mut out,
    );
    o.head(1, 20);
    o.reset(2, 1, &mut out);
    assert_eq!((o.last_seq(), o.epoch()), (Some(0), Some(2)));
    assert_eq!((o.held_posts(), o.held_changes()), (0, 0));
    // The old Head belonged to the old epoch: nothing to ask.
    assert_eq!(o.poll_resend(Instant::now()), None);
    assert_eq!(
        o.post(Source::Datagram, 1, 1, text(1), &mut out),
        PostOutcome::Stale
    );
    assert_eq!(
        o.post(Source::Stream, 1, 2, text(1), &mut out),
        PostOutcome::Released
    );
    assert_eq!(seqs(&out), vec![1]);
}

#[test]
fn without_datagrams_the_stream_rules_of_8_4_apply() {
    let mut o = Order::new(false);
    let mut out = Out::new();
    o.resume_from(0, Some(1), &mut out);
    assert_eq!(st(&mut o, 1, &mut out), PostOutcome::Released);
    // A gap is accepted at once.
    assert_eq!(st(&mut o, 5, &mut out), PostOutcome::Gap);
    assert_eq!(st(&mut o, 3, &mut out), PostOutcome::Duplicate);
    // Changes are never held, even for seqs above the position.
    assert_eq!(
        o.change(9, None, Ch::Promo { after: 9 }, &mut out),
        ChangeOutcome::Released
    );
    assert_eq!(o.poll_resend(Instant::now()), None);
    o.head(1, 100);
    assert_eq!(o.poll_resend(Instant::now()), None);
    assert_eq!(seqs(&out), vec![1, 5]);
}

#[test]
fn a_new_connection_forgets_the_resend_and_held_posts() {
    let t0 = Instant::now();
    let mut o = at(0);
    let mut out = Out::new();
    dg(&mut o, 3, &mut out);
    o.change(3, Some(1), Ch::Promo { after: 3 }, &mut out);
    assert!(o.poll_resend(t0).is_some());
    o.new_connection(true, &mut out);
    assert_eq!(o.held_posts(), 0);
    assert_eq!(o.held_changes(), 1);
    // The re-follow replays 1.. on the stream; no Resend is needed.
    assert_eq!(o.poll_resend(t0), None);
    for seq in 1..=3 {
        st(&mut o, seq, &mut out);
    }
    assert_eq!(seqs(&out), vec![1, 2, 3]);
    assert_eq!(out.last(), Some(&Release::Change(Ch::Promo { after: 3 })));
    // Without datagrams on the next one, held changes go out at once.
    o.change(9, Some(1), Ch::Promo { after: 9 }, &mut out);
    o.new_connection(false, &mut out);
    assert_eq!(out.last(), Some(&Release::Change(Ch::Promo { after: 9 })));
    assert!(!o.live_datagrams());
}

// ---------------------------------------------------------------- simulation

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// What the simulated server puts on a path.
#[derive(Debug, Clone)]
enum Frame {
    Post { seq: u64, text: String },
    Edit { seq: u64, text: String },
    Promo { after: u64 },
    Head { seq: u64 },
}

/// How lossy the simulated datagram path is, in percent.
struct Net {
    loss: u64,
    dup: u64,
    /// Posts sent on the stream instead (too large, say).
    on_stream: u64,
    /// A burst of this many datagrams lost at the very end.
    tail_loss: u64,
}

/// The application's view: posts by seq with their text, and checks that
/// every change comes after its post.
#[derive(Default)]
struct App {
    posts: BTreeMap<u64, String>,
    order: Vec<u64>,
    promos: Vec<u64>,
}

impl App {
    fn take(&mut self, out: &mut Out) {
        for r in out.drain(..) {
            match r {
                Release::Post { seq, post, .. } => {
                    assert!(self.posts.insert(seq, post).is_none(), "post {seq} twice");
                    self.order.push(seq);
                }
                Release::Change(Ch::Edit { seq, text }) => {
                    let p = self.posts.get_mut(&seq);
                    let p = p.unwrap_or_else(|| panic!("edit of {seq} before its post"));
                    *p = text;
                }
                Release::Change(Ch::Promo { after }) => {
                    assert!(self.posts.contains_key(&after), "promoted before {after}");
                    self.promos.push(after);
                }
            }
        }
    }
}

/// `n` posts published live (some edited later, some followed by a promoted
/// post) through a lossy, duplicating, reordering datagram path and an
/// in-order stream, interleaved at random; the client asks for what it
/// misses and the server resends it on the stream. Returns the Resends sent.
fn simulate(seed: u64, n: u64, net: Net) -> u64 {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let mut now = Instant::now();
    let mut o = Order::new(true);
    let mut out = Out::new();
    let mut app = App::default();
    // The server's current state of every post.
    let mut server: BTreeMap<u64, String> = BTreeMap::new();
    let mut stream: VecDeque<Frame> = VecDeque::new();
    let mut air: Vec<u64> = Vec::new(); // datagram posts in flight, by seq
    let mut air_text: BTreeMap<u64, String> = BTreeMap::new();
    let mut promos_sent = Vec::new();
    // The follow: position 0, and Followed comes after a few datagrams.
    let followed_at = rng.below(5);
    let mut published = 0;
    let mut resent_due: VecDeque<Instant> = VecDeque::new();
    let mut resends = 0;
    let mut steps = 0;
    loop {
        steps += 1;
        assert!(steps < 200_000, "simulation does not settle");
        now += Duration::from_millis(1);
        if published == followed_at && o.last_seq().is_none() {
            o.followed(0, 1, 0, &mut out);
        }
        // The server publishes, edits and promotes.
        if published < n && rng.chance(40) {
            published += 1;
            let seq = published;
            server.insert(seq, text(seq));
            let tail = seq + net.tail_loss > n;
            if rng.chance(net.on_stream) {
                stream.push_back(Frame::Post {
                    seq,
                    text: text(seq),
                });
            } else if !tail && !rng.chance(net.loss) {
                air.push(seq);
                air_text.insert(seq, text(seq));
                if rng.chance(net.dup) {
                    air.push(seq);
                }
            }
            if seq % 7 == 0 {
                stream.push_back(Frame::Promo { after: seq });
                promos_sent.push(seq);
            }
            if rng.chance(15) {
                // An edit of an already published post.
                let target = 1 + rng.below(seq);
                let t = format!("edit {target} at {seq}");
                server.insert(target, t.clone());
                stream.push_back(Frame::Edit {
                    seq: target,
                    text: t,
                });
            }
            if published == n {
                stream.push_back(Frame::Head { seq: n });
            }
        }
        // Something arrives: a stream frame or a random datagram.
        let from_air = !air.is_empty() && (stream.is_empty() || rng.chance(50));
        if from_air {
            let i = rng.below(air.len() as u64) as usize;
            let seq = air.swap_remove(i);
            let t = air_text.get(&seq).cloned().unwrap_or_default();
            o.post(Source::Datagram, seq, 1, t, &mut out);
        } else if let Some(f) = stream.pop_front() {
            match f {
                Frame::Post { seq, text } => {
                    o.post(Source::Stream, seq, 1, text, &mut out);
                }
                Frame::Edit { seq, text } => {
                    o.change(seq, Some(1), Ch::Edit { seq, text }, &mut out);
                }
                Frame::Promo { after } => {
                    o.change(after, None, Ch::Promo { after }, &mut out);
                }
                Frame::Head { seq } => o.head(1, seq),
            }
        }
        app.take(&mut out);
        // The Resent answers come a little later; the posts follow on the
        // stream, in their current state, only those published.
        while resent_due.front().is_some_and(|t| *t <= now) {
            resent_due.pop_front();
            o.resent(now);
        }
        if let Some(r) = o.poll_resend(now) {
            resends += 1;
            assert!(r.from_seq >= 1 && r.from_seq <= r.to_seq);
            assert!(r.to_seq - r.from_seq < MAX_RESEND_SEQS);
            assert_eq!(Some(r.from_seq - 1), o.last_seq());
            for seq in r.from_seq..=r.to_seq.min(published) {
                stream.push_back(Frame::Post {
                    seq,
                    text: server[&seq].clone(),
                });
            }
            resent_due.push_back(now + Duration::from_millis(5));
        }
        let idle = published == n && stream.is_empty() && air.is_empty();
        if idle && o.last_seq() == Some(n) && o.held_changes() == 0 {
            break;
        }
        if idle && resent_due.is_empty() {
            // Quiet: time passes until a retry is due.
            now += Duration::from_millis(100);
        }
    }
    assert_eq!(app.order, (1..=n).collect::<Vec<_>>(), "seed {seed}");
    assert_eq!(app.posts, server, "final state, seed {seed}");
    assert_eq!(app.promos, promos_sent, "seed {seed}");
    assert_eq!(o.held_posts(), 0);
    resends
}

#[test]
fn every_post_once_in_order_across_loss_duplication_and_reordering() {
    let mut resends = 0;
    for seed in 1..=40 {
        resends += simulate(
            seed,
            400,
            Net {
                loss: 20,
                dup: 10,
                on_stream: 10,
                tail_loss: 0,
            },
        );
    }
    assert!(resends > 0, "loss must have caused resends");
}

#[test]
fn every_post_once_when_the_last_datagrams_are_lost() {
    for seed in 100..=120 {
        let resends = simulate(
            seed,
            200,
            Net {
                loss: 0,
                dup: 0,
                on_stream: 0,
                tail_loss: 5,
            },
        );
        assert!(resends >= 1, "the tail must be asked for via Head");
    }
}

#[test]
fn every_post_once_on_a_very_lossy_path() {
    for seed in 200..=210 {
        simulate(
            seed,
            3000,
            Net {
                loss: 60,
                dup: 30,
                on_stream: 5,
                tail_loss: 20,
            },
        );
    }
}

#[test]
fn every_post_once_without_loss_asks_nothing_in_order() {
    // All on the stream: nothing to ask.
    assert_eq!(
        simulate(
            7,
            300,
            Net {
                loss: 0,
                dup: 0,
                on_stream: 100,
                tail_loss: 0,
            },
        ),
        0
    );
}
