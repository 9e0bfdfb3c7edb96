//! The feed side of the driver: frames of the feed stream and live
//! datagrams go through each channel's [`ChannelOrder`]; what it releases
//! becomes [`Event`]s, in order; the `Resend`s it asks for are sent on the
//! control stream, and their answers and retry times come back here.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::Ordering;

use super::{write_error, Driver, Pending};
use crate::conn::{ClientError, Conn};
use crate::datagram::decode_post;
use crate::ordering::{ChangeOutcome, ChannelOrder, PostOutcome, Release, Source};
use crate::Event;
use herald_proto::frame::encode_frame;
use herald_proto::model::{ChannelId, Media, Post};
use herald_proto::v1 as pb;

/// A change held or released by a channel's ordering: the event, and the
/// receipt of a promoted post (0: none), confirmed once it is released.
#[derive(Debug)]
pub(super) struct Change {
    event: Event,
    receipt: u64,
}

/// One channel's ordering.
pub(super) type Order = ChannelOrder<Post, Change>;

/// What the client knows of one followed channel.
#[derive(Debug)]
pub(super) struct ChannelState {
    /// Position, epoch, and what waits (see [`crate::ordering`]).
    pub order: Order,
    /// The `tail` of the application's follow, repeated on a re-follow
    /// that has no position yet.
    pub tail: u32,
}

impl ChannelState {
    pub fn new(live_datagrams: bool, tail: u32) -> ChannelState {
        ChannelState {
            order: Order::new(live_datagrams),
            tail,
        }
    }
}

/// When channels whose `Resend` was answered may ask again (one entry per
/// answer, each gone [`crate::ordering::RESEND_RETRY`] after it, so at most
/// the answers of the last second are kept).
#[derive(Default)]
pub(super) struct Retries(BinaryHeap<Reverse<(tokio::time::Instant, String)>>);

impl Retries {
    /// The earliest retry time.
    pub fn next(&self) -> Option<tokio::time::Instant> {
        self.0.peek().map(|Reverse((t, _))| *t)
    }

    /// Takes the channels due at `now`.
    pub fn due(&mut self, now: tokio::time::Instant, into: &mut Vec<String>) {
        while self.0.peek().is_some_and(|Reverse((t, _))| *t <= now) {
            if let Some(Reverse((_, ch))) = self.0.pop() {
                into.push(ch);
            }
        }
    }
}

/// The application dropped its client: nothing more to deliver.
pub(super) struct AppGone;

fn post_from(p: pb::Post) -> Option<Post> {
    Some(Post {
        channel: ChannelId::parse(&p.channel).ok()?,
        seq: p.seq,
        epoch: p.epoch,
        id: p.id,
        text: p.text,
        media: p
            .media
            .into_iter()
            .map(|m| Media {
                url: m.url,
                mime: m.mime,
            })
            .collect(),
        created_at_ms: p.created_at_ms,
        edited_at_ms: p.edited_at_ms,
        deleted: p.deleted,
        damaged: p.damaged,
    })
}

impl Driver {
    /// Handles one feed stream frame.
    pub(super) async fn on_feed(&mut self, f: pb::FeedFrame) -> Result<(), AppGone> {
        use pb::feed_frame::Kind;
        match f.kind {
            Some(Kind::Post(p)) => self.on_post(Source::Stream, p),
            Some(Kind::Edited(e)) => {
                let change = Change {
                    event: Event::Edited {
                        channel: e.channel.clone(),
                        seq: e.seq,
                        epoch: e.epoch,
                        text: e.text,
                        edited_at_ms: e.edited_at_ms,
                    },
                    receipt: 0,
                };
                self.on_change(&e.channel, e.seq, Some(e.epoch), change);
            }
            Some(Kind::Deleted(d)) => {
                let change = Change {
                    event: Event::Deleted {
                        channel: d.channel.clone(),
                        seq: d.seq,
                        epoch: d.epoch,
                    },
                    receipt: 0,
                };
                self.on_change(&d.channel, d.seq, Some(d.epoch), change);
            }
            Some(Kind::Promoted(p)) => {
                let change = Change {
                    event: Event::Promoted {
                        channel: p.channel.clone(),
                        campaign_id: p.campaign_id,
                        label: p.label,
                        title: p.title,
                        text: p.text,
                        media: p.media.map(|m| Media {
                            url: m.url,
                            mime: m.mime,
                        }),
                        cta_url: p.cta_url,
                        after_seq: p.after_seq,
                    },
                    receipt: p.receipt,
                };
                self.on_change(&p.channel, p.after_seq, None, change);
            }
            Some(Kind::Reset(r)) => {
                let Some(st) = self.channels.get_mut(&r.channel) else {
                    return Ok(());
                };
                st.order.reset(r.epoch, r.oldest_seq, &mut self.released);
                self.touched.push(r.channel.clone());
                // The Reset first, then the posts it let through.
                let reset = Event::Reset {
                    channel: r.channel,
                    epoch: r.epoch,
                    oldest_seq: r.oldest_seq,
                };
                if !self.emit(reset).await {
                    self.released.clear();
                    return Err(AppGone);
                }
            }
            Some(Kind::Head(h)) => {
                if let Some(st) = self.channels.get_mut(&h.channel) {
                    st.order.head(h.epoch, h.seq);
                    self.touched.push(h.channel);
                }
            }
            None => {}
        }
        self.emit_released().await
    }

    /// Handles one datagram: a live post, or something malformed (counted
    /// and dropped).
    pub(super) async fn on_datagram(&mut self, d: &[u8]) -> Result<(), AppGone> {
        match decode_post(d, self.opts.max_feed_frame) {
            Ok(p) => {
                self.stats.datagram_posts.fetch_add(1, Ordering::Relaxed);
                self.on_post(Source::Datagram, p);
            }
            Err(e) => {
                self.stats
                    .datagrams_malformed
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "datagram dropped");
            }
        }
        self.emit_released().await
    }

    fn on_post(&mut self, source: Source, p: pb::Post) {
        if !self.channels.contains_key(&p.channel) {
            return;
        }
        let Some(post) = post_from(p) else {
            return;
        };
        let channel = post.channel.clone();
        let Some(st) = self.channels.get_mut(channel.as_str()) else {
            return;
        };
        let (seq, epoch) = (post.seq, post.epoch);
        let last = st.order.last_seq();
        let outcome = st.order.post(source, seq, epoch, post, &mut self.released);
        if st.order.live_datagrams() {
            // A gap may have opened, or closed with another behind it.
            self.touched.push(channel.as_str().to_string());
        }
        match outcome {
            PostOutcome::Released | PostOutcome::Held => {}
            PostOutcome::Duplicate | PostOutcome::Stale if st.order.was_asked(seq) => {
                self.stats.resent_copies.fetch_add(1, Ordering::Relaxed);
            }
            PostOutcome::Duplicate | PostOutcome::Stale => {
                self.stats
                    .duplicates_dropped
                    .fetch_add(1, Ordering::Relaxed);
            }
            PostOutcome::Gap => {
                self.stats.gaps.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%channel, ?last, got = seq, "gap in feed");
            }
            PostOutcome::DroppedFull => {
                self.stats.held_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn on_change(&mut self, channel: &str, at: u64, epoch: Option<u64>, change: Change) {
        let Some(st) = self.channels.get_mut(channel) else {
            return;
        };
        if st.order.change(at, epoch, change, &mut self.released) == ChangeOutcome::DroppedFull {
            self.stats.held_dropped.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(channel, at, "too many changes held; one dropped");
        }
    }

    /// Hands what the orderings released to the application, in order.
    pub(super) async fn emit_released(&mut self) -> Result<(), AppGone> {
        let mut released = std::mem::take(&mut self.released);
        let mut gone = false;
        for r in released.drain(..) {
            if gone {
                continue;
            }
            let event = match r {
                Release::Post { post, .. } => {
                    self.stats.posts.fetch_add(1, Ordering::Relaxed);
                    Event::Post(post)
                }
                Release::Change(c) => {
                    if matches!(c.event, Event::Promoted { .. }) {
                        self.stats.promoted.fetch_add(1, Ordering::Relaxed);
                        if c.receipt != 0 {
                            self.note_receipt(c.receipt);
                        }
                    }
                    c.event
                }
            };
            gone = !self.emit(event).await;
        }
        // The buffer's capacity is kept for the next frame.
        self.released = released;
        if gone {
            Err(AppGone)
        } else {
            Ok(())
        }
    }

    /// Sends the `Resend` `channel`'s ordering asks for now, if any.
    pub(super) async fn ask_resend(
        &mut self,
        c: &mut Conn,
        pending: &mut HashMap<u64, Pending>,
        channel: &str,
    ) -> Result<(), ClientError> {
        let Some(st) = self.channels.get_mut(channel) else {
            return Ok(());
        };
        let Some(r) = st.order.poll_resend(std::time::Instant::now()) else {
            return Ok(());
        };
        let id = self.next_request;
        self.next_request += 1;
        pending.insert(id, Pending::Resend(channel.to_string()));
        self.stats.resends.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(channel, from = r.from_seq, to = r.to_seq, "resend");
        let frame = pb::ClientFrame {
            request_id: id,
            kind: Some(pb::client_frame::Kind::Resend(pb::Resend {
                channel: channel.to_string(),
                from_seq: r.from_seq,
                to_seq: r.to_seq,
            })),
        };
        c.ctl_send
            .write_all(&encode_frame(&frame))
            .await
            .map_err(|e| write_error(&c.conn, e))
    }

    /// The answer to `channel`'s `Resend` (`Resent`, or an `Error`): the
    /// gap is asked for again a second later if it is still there.
    pub(super) fn on_resend_answer(&mut self, channel: String, retries: &mut Retries) {
        let Some(st) = self.channels.get_mut(&channel) else {
            return;
        };
        st.order.resent(std::time::Instant::now());
        if let Some(at) = st.order.retry_at() {
            retries.0.push(Reverse((
                tokio::time::Instant::from_std(at),
                channel.clone(),
            )));
        }
        // Its posts may have come already: the next gap may be asked now.
        self.touched.push(channel);
    }
}
