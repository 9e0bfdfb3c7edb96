//! Per-channel delivery order for a follower, sans-IO: the rules of
//! `docs/protocol.md` §8.4 and, with live datagrams, §8.5.
//!
//! A [`ChannelOrder`] is told what arrived for one followed channel (posts
//! from the feed stream or from datagrams, edits and deletes, promoted posts,
//! `Reset`, `Head`, the answer to a `Resend`) and puts what the application
//! may see now into a caller's `Vec` of [`Release`]s, in order. It never
//! reads a clock or the network: the caller passes the time in
//! ([`ChannelOrder::poll_resend`]) and sends the [`Resend`] requests it
//! returns. It is generic over the payload of a post (`P`) and of a change
//! (`C`, an edit, a delete or a promoted post), so any follower (the client
//! library, or a load generator with its own decoded types) can use it.
//!
//! What it promises, per channel, with live datagrams on: every post is
//! released once, in increasing seq order, with no gap (unless a `Reset`
//! says the missing posts are gone), whichever path brought it, however the
//! datagrams were lost, duplicated or reordered; a change (edit, delete,
//! promoted post) that refers to a post not released yet is held and
//! released, in arrival order, right after that post; missing posts are
//! asked for with at most one [`Resend`] outstanding, again a second
//! ([`RESEND_RETRY`]) after its answer if the gap is still there.
//!
//! Bounds, per channel: at most [`MAX_HELD_POSTS`] posts and
//! [`MAX_HELD_CHANGES`] changes are held. A post that does not fit is
//! dropped (the highest seq goes first), and is asked for again when its gap
//! is noticed (by a later post or a `Head`). A change that does not fit is
//! dropped (the newest); a post resent later comes in its current state, so
//! only an edit to a post that came late by datagram can be lost this way.
//!
//! Without live datagrams (the feed stream alone), it follows §8.4: a post
//! after a gap is released at once (and reported as
//! [`PostOutcome::Gap`]), and changes are never held.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Most posts held per channel (out of order, or waiting for a position).
pub const MAX_HELD_POSTS: usize = 1024;
/// Most changes (edits, deletes, promoted posts) held per channel.
pub const MAX_HELD_CHANGES: usize = 1024;
/// Most seqs one [`Resend`] asks for (the server's limit).
pub const MAX_RESEND_SEQS: u64 = 1024;
/// How long after a `Resent` (or an error answering a `Resend`) a gap that
/// is still there is asked for again.
pub const RESEND_RETRY: Duration = Duration::from_secs(1);

/// Which path a post came by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The feed stream (in order within the stream).
    Stream,
    /// A QUIC datagram (may be lost, repeated or reordered).
    Datagram,
}

/// Something the application may see now, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Release<P, C> {
    /// The next post of the channel.
    Post {
        /// Its seq.
        seq: u64,
        /// Its epoch.
        epoch: u64,
        /// The caller's payload.
        post: P,
    },
    /// A change whose post has been released (or will never be).
    Change(C),
}

/// What became of a post.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostOutcome {
    /// Released (and maybe held posts after it).
    Released,
    /// Released after a gap, without live datagrams (§8.4 rule 3).
    Gap,
    /// At or below the position, or already held: dropped.
    Duplicate,
    /// Held until the posts before it (or a position) come.
    Held,
    /// Out of order and no room to hold it: dropped (it is asked for again).
    DroppedFull,
    /// A datagram of another epoch than the channel's: dropped.
    Stale,
}

/// What became of a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeOutcome {
    /// Released.
    Released,
    /// Held until its post is released.
    Held,
    /// No room to hold it: dropped.
    DroppedFull,
}

/// Ask the server for these seqs again (inclusive; at most
/// [`MAX_RESEND_SEQS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resend {
    /// First seq.
    pub from_seq: u64,
    /// Last seq.
    pub to_seq: u64,
}

/// The one `Resend` of a channel in flight.
#[derive(Debug, Clone, Copy)]
struct Outstanding {
    to_seq: u64,
    /// When its answer came (`None`: not yet).
    answered: Option<Instant>,
}

/// A held change.
#[derive(Debug)]
struct HeldChange<C> {
    /// The seq it waits for.
    at: u64,
    /// Its epoch, if it has one (a promoted post has none).
    epoch: Option<u64>,
    change: C,
}

/// Delivery state of one followed channel. See the module docs.
#[derive(Debug)]
pub struct ChannelOrder<P, C> {
    live_datagrams: bool,
    /// Seq of the last released post.
    last_seq: Option<u64>,
    epoch: Option<u64>,
    /// Posts above `last_seq + 1` (or all, with no position), by seq, with
    /// their epoch; at most [`MAX_HELD_POSTS`].
    held: BTreeMap<u64, (u64, P)>,
    /// Changes waiting for their post, in arrival order; at most
    /// [`MAX_HELD_CHANGES`].
    changes: VecDeque<HeldChange<C>>,
    /// The highest `Head` seq above `last_seq`.
    head: Option<u64>,
    resend: Option<Outstanding>,
    /// The highest seq asked for with a `Resend` on this connection: a
    /// second copy of a post at or below it is the price of asking (the
    /// first may have been on its way), not a duplicate the server sent
    /// unasked.
    asked_upto: u64,
}

impl<P, C> ChannelOrder<P, C> {
    /// A channel with no position yet; `live_datagrams` as the connection's
    /// `Welcome` said.
    pub fn new(live_datagrams: bool) -> Self {
        ChannelOrder {
            live_datagrams,
            last_seq: None,
            epoch: None,
            held: BTreeMap::new(),
            changes: VecDeque::new(),
            head: None,
            resend: None,
            asked_upto: 0,
        }
    }

    /// Whether `seq` was asked for again with a `Resend` on this connection
    /// (so a second copy of it is expected; see [`ChannelOrder::poll_resend`]).
    pub fn was_asked(&self, seq: u64) -> bool {
        seq <= self.asked_upto
    }

    /// Seq of the last released post (the resume position).
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    /// Epoch of the position.
    pub fn epoch(&self) -> Option<u64> {
        self.epoch
    }

    /// Whether the rules of §8.5 apply (the connection has live datagrams).
    pub fn live_datagrams(&self) -> bool {
        self.live_datagrams
    }

    /// Posts held now.
    pub fn held_posts(&self) -> usize {
        self.held.len()
    }

    /// Changes held now.
    pub fn held_changes(&self) -> usize {
        self.changes.len()
    }

    /// A new connection, with or without live datagrams: the `Resend` in
    /// flight and the last `Head` belonged to the old one, and held posts
    /// are dropped (the re-follow replays every post after the position on
    /// the feed stream). Held changes stay held with live datagrams, and are
    /// released now without.
    pub fn new_connection(&mut self, live_datagrams: bool, out: &mut Vec<Release<P, C>>) {
        self.live_datagrams = live_datagrams;
        self.resend = None;
        self.asked_upto = 0;
        self.head = None;
        self.held.clear();
        if !live_datagrams {
            for c in self.changes.drain(..) {
                out.push(Release::Change(c.change));
            }
        }
    }

    /// The application follows from `after_seq` (of `epoch`, if known): the
    /// position is set to it, whatever it was.
    pub fn resume_from(
        &mut self,
        after_seq: u64,
        epoch: Option<u64>,
        out: &mut Vec<Release<P, C>>,
    ) {
        self.last_seq = Some(after_seq);
        self.epoch = epoch;
        if let Some(e) = epoch {
            self.held.retain(|_, (pe, _)| *pe == e);
        }
        self.advance(out);
    }

    /// `Followed` of a follow without a position (live, `tail` posts): sets
    /// the position to `head_seq - tail` if no post has set one (§9), then
    /// releases what that allows. Otherwise nothing changes. With live
    /// datagrams this is what sets the position of such a follow: posts
    /// from either path wait for it (a stricter form of §8.5 rule 2).
    pub fn followed(&mut self, head_seq: u64, epoch: u64, tail: u32, out: &mut Vec<Release<P, C>>) {
        if self.last_seq.is_some() {
            return;
        }
        self.last_seq = Some(head_seq.saturating_sub(u64::from(tail)));
        self.epoch = Some(epoch);
        self.held.retain(|_, (pe, _)| *pe == epoch);
        self.advance(out);
    }

    /// A `Post` of seq `seq` and epoch `epoch` came by `source`.
    pub fn post(
        &mut self,
        source: Source,
        seq: u64,
        epoch: u64,
        post: P,
        out: &mut Vec<Release<P, C>>,
    ) -> PostOutcome {
        if source == Source::Datagram && self.epoch.is_some_and(|e| e != epoch) {
            return PostOutcome::Stale;
        }
        let Some(last) = self.last_seq else {
            if self.live_datagrams {
                // Held until `followed` sets the position, stream posts
                // too: a live post too large for a datagram may come on the
                // stream after datagram posts before it, so it cannot be
                // the position.
                return self.hold(seq, epoch, post);
            }
            // The stream alone: the first post sets the position (§8.4).
            self.accept(seq, epoch, post, out);
            return PostOutcome::Released;
        };
        if seq <= last {
            return PostOutcome::Duplicate;
        }
        if seq == last + 1 {
            self.accept(seq, epoch, post, out);
            self.advance(out);
            return PostOutcome::Released;
        }
        if !self.live_datagrams {
            // §8.4 rule 3: never wait for missing seqs on the stream alone.
            self.accept(seq, epoch, post, out);
            self.advance(out);
            return PostOutcome::Gap;
        }
        self.hold(seq, epoch, post)
    }

    /// A change that refers to the post of seq `at`: an edit or a delete
    /// (`at` its seq, `epoch` its epoch), or a promoted post (`at` its
    /// `after_seq`, no epoch). With live datagrams, held until that post is
    /// released (§8.5 rule 3); otherwise released at once.
    pub fn change(
        &mut self,
        at: u64,
        epoch: Option<u64>,
        change: C,
        out: &mut Vec<Release<P, C>>,
    ) -> ChangeOutcome {
        let reached = self.last_seq.is_some_and(|l| at <= l);
        if !self.live_datagrams || reached {
            out.push(Release::Change(change));
            return ChangeOutcome::Released;
        }
        if self.changes.len() >= MAX_HELD_CHANGES {
            return ChangeOutcome::DroppedFull;
        }
        self.changes.push_back(HeldChange { at, epoch, change });
        ChangeOutcome::Held
    }

    /// A `Reset`: delivery goes on from `oldest_seq` of `epoch` (§8.4).
    /// Held posts at or below the new position, or of another epoch, are
    /// dropped; so are held changes for seqs at or below it (their posts
    /// were never released) or of another epoch.
    pub fn reset(&mut self, epoch: u64, oldest_seq: u64, out: &mut Vec<Release<P, C>>) {
        let pos = oldest_seq.saturating_sub(1);
        if self.epoch != Some(epoch) {
            // A Head of the old history says nothing of the new one.
            self.head = None;
        }
        self.last_seq = Some(pos);
        self.epoch = Some(epoch);
        self.held.retain(|s, (pe, _)| *s > pos && *pe == epoch);
        self.changes
            .retain(|c| c.at > pos && c.epoch.is_none_or(|e| e == epoch));
        if self.head.is_some_and(|h| h <= pos) {
            self.head = None;
        }
        self.advance(out);
    }

    /// A `Head`: every post up to `seq` of `epoch` has been sent. A later
    /// [`ChannelOrder::poll_resend`] asks for what is missing.
    pub fn head(&mut self, epoch: u64, seq: u64) {
        if self.epoch.is_some_and(|e| e != epoch) {
            return;
        }
        if self.last_seq.is_some_and(|l| seq <= l) {
            return;
        }
        self.head = Some(self.head.map_or(seq, |h| h.max(seq)));
    }

    /// The answer (`Resent`, or an error) to this channel's `Resend` came at
    /// `now`: if the gap is still there [`RESEND_RETRY`] later, it is asked
    /// for again.
    pub fn resent(&mut self, now: Instant) {
        if let Some(r) = &mut self.resend {
            r.answered = Some(now);
        }
    }

    /// When [`ChannelOrder::poll_resend`] may have something to ask that it
    /// has not now: the retry time of an answered `Resend`.
    pub fn retry_at(&self) -> Option<Instant> {
        self.resend
            .and_then(|r| r.answered)
            .map(|t| t + RESEND_RETRY)
    }

    /// The `Resend` to send now, if any: the seqs from `last_seq + 1` to
    /// just below the lowest held post, or else to the last `Head`; at most
    /// [`MAX_RESEND_SEQS`]; only one in flight (answered less than
    /// [`RESEND_RETRY`] ago counts as in flight). The caller sends it, and
    /// reports its answer with [`ChannelOrder::resent`].
    pub fn poll_resend(&mut self, now: Instant) -> Option<Resend> {
        if !self.live_datagrams {
            return None;
        }
        let last = self.last_seq?;
        if let Some(r) = self.resend {
            // In flight until answered; then until its posts came, or for
            // RESEND_RETRY.
            let answered = r.answered?;
            if last < r.to_seq && now < answered + RESEND_RETRY {
                return None;
            }
            self.resend = None;
        }
        let to = match self.held.keys().next() {
            Some(&lowest) => lowest - 1,
            None => self.head?,
        };
        if to <= last {
            return None;
        }
        let from = last + 1;
        let to = to.min(from + (MAX_RESEND_SEQS - 1));
        self.resend = Some(Outstanding {
            to_seq: to,
            answered: None,
        });
        self.asked_upto = self.asked_upto.max(to);
        Some(Resend {
            from_seq: from,
            to_seq: to,
        })
    }

    fn hold(&mut self, seq: u64, epoch: u64, post: P) -> PostOutcome {
        if self.held.contains_key(&seq) {
            return PostOutcome::Duplicate;
        }
        if self.held.len() >= MAX_HELD_POSTS {
            // Keep the lowest seqs: they are released first.
            match self.held.last_key_value() {
                Some((&highest, _)) if highest > seq => {
                    self.held.remove(&highest);
                }
                _ => return PostOutcome::DroppedFull,
            }
        }
        self.held.insert(seq, (epoch, post));
        PostOutcome::Held
    }

    fn accept(&mut self, seq: u64, epoch: u64, post: P, out: &mut Vec<Release<P, C>>) {
        self.last_seq = Some(seq);
        self.epoch = Some(epoch);
        out.push(Release::Post { seq, epoch, post });
    }

    /// After the position moved: drops held posts at or below it, releases
    /// the held posts that now follow on, then the changes they reached.
    fn advance(&mut self, out: &mut Vec<Release<P, C>>) {
        let Some(mut last) = self.last_seq else {
            return;
        };
        while let Some(entry) = self.held.first_entry() {
            let seq = *entry.key();
            if seq <= last {
                entry.remove();
                continue;
            }
            if seq != last + 1 {
                break;
            }
            let (epoch, post) = entry.remove();
            self.accept(seq, epoch, post, out);
            last = seq;
        }
        if self.head.is_some_and(|h| h <= last) {
            self.head = None;
        }
        if self.changes.iter().any(|c| c.at <= last) {
            let mut keep = VecDeque::with_capacity(self.changes.len());
            for c in self.changes.drain(..) {
                if c.at <= last {
                    out.push(Release::Change(c.change));
                } else {
                    keep.push_back(c);
                }
            }
            self.changes = keep;
        }
    }
}

#[cfg(test)]
mod tests;
