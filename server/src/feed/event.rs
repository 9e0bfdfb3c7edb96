//! What the fan-out hands to every follower's queue: one event, encoded into
//! its feed frame once and shared (`Arc`, with the frame a `Bytes`), never
//! copied or re-encoded per follower.

use std::sync::Arc;

use bytes::Bytes;
use herald_proto::encode_frame;

use super::frames::{deleted_frame, edited_frame, head_frame};
use super::promoted::PromotedSlot;
use crate::model::ChannelId;
use crate::store::LogEvent;

/// What a feed event does to the follower's copy of a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// A new post; advances the channel's seq.
    Post,
    /// An existing post's text changed.
    Edit,
    /// An existing post became a tombstone.
    Delete,
    /// A promoted post (no seq of its own; `seq` is the post it follows).
    Promoted,
    /// Every post up to `seq` has been fanned out, and the channel has been
    /// quiet since: written (on the stream) only to followers with live
    /// datagrams, so that one whose last datagram was lost notices it
    /// (protocol §8.5).
    Head,
}

/// An event encoded once and shared by every follower's queue.
#[derive(Debug)]
pub struct FeedEvent {
    /// The channel it belongs to.
    pub channel: ChannelId,
    /// The post's seq (for a promoted post: the seq it follows).
    pub seq: u64,
    /// What it is.
    pub kind: EventKind,
    /// The complete length-delimited feed frame.
    pub frame: Bytes,
    /// For a promoted post: the impressions reserved for this fan-out.
    pub slot: Option<Arc<dyn PromotedSlot>>,
}

impl FeedEvent {
    /// Encodes a committed log event into its feed frame.
    pub fn from_log(ev: &LogEvent) -> FeedEvent {
        let (kind, post, frame) = match ev {
            LogEvent::Posted(p) => (EventKind::Post, p, encode_frame(&p.to_frame())),
            LogEvent::Edited(p) => (EventKind::Edit, p, encode_frame(&edited_frame(p))),
            LogEvent::Deleted(p) => (EventKind::Delete, p, encode_frame(&deleted_frame(p))),
        };
        FeedEvent {
            channel: post.channel.clone(),
            seq: post.seq,
            kind,
            frame,
            slot: None,
        }
    }

    /// The Head event of `channel` at `seq` of `epoch`.
    pub fn head(channel: &ChannelId, epoch: u64, seq: u64) -> FeedEvent {
        FeedEvent {
            channel: channel.clone(),
            seq,
            kind: EventKind::Head,
            frame: encode_frame(&head_frame(channel, epoch, seq)),
            slot: None,
        }
    }

    /// A copy sharing the same frame and slot (a reference count each), for
    /// a fan-out thread that should not contend on the original's count.
    pub fn share(&self) -> FeedEvent {
        FeedEvent {
            channel: self.channel.clone(),
            seq: self.seq,
            kind: self.kind,
            frame: self.frame.clone(),
            slot: self.slot.clone(),
        }
    }
}
