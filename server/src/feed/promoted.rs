//! How the promoted slot attaches to the feed, without the feed knowing the
//! promo engine: a promoted event carries a [`PromotedSlot`] (the impressions
//! reserved for its fan-out); each follower's writer claims one
//! [`Impression`] from it (refused when the follower's frequency cap or the
//! reservation says no), counts it and waits until the count is durable
//! ([`CatchupSlots::durable`]) before the frame is written, and takes the
//! count back if the write fails. An impression dropped uncounted goes back
//! to the campaign. For a follower whose client confirms receipt, "count"
//! records the impression as awaiting its receipt (durably, the same way) and
//! the frame carries the receipt ([`Impression::frame`]); the promo engine
//! counts it when the client's Seen arrives. At the end of a resuming follower's catch-up, the writer asks
//! a [`CatchupSlots`] for at most one promoted event.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::event::FeedEvent;
use crate::model::ChannelId;

/// Impressions reserved for one promoted fan-out, shared by every queue
/// that holds the event.
pub trait PromotedSlot: Send + Sync + fmt::Debug {
    /// Claims one impression for `follower`, if the frequency cap and the
    /// reservation allow. `receipts`: the follower's client confirms
    /// promoted posts with Seen.
    fn claim(&self, follower: &str, receipts: bool) -> Option<Box<dyn Impression>>;

    /// The campaign filling the slot.
    fn campaign_id(&self) -> &str;

    /// Reserved impressions not claimed yet.
    fn remaining(&self) -> u64;
}

/// One claimed impression.
pub trait Impression: Send {
    /// The frame to write for this impression when it is not the event's
    /// shared one (it carries this follower's receipt).
    fn frame(&self) -> Option<bytes::Bytes> {
        None
    }

    /// Counts the impression (exactly once, however often called), in
    /// memory: its frame is about to be written. [`CatchupSlots::durable`]
    /// makes the count durable before the frame goes out.
    fn count(&mut self);

    /// Takes back a counted impression whose frame could not be written
    /// (the follower is gone); it is as if it had never been claimed.
    fn uncount(&mut self);

    /// Counts the impression for good (its frame was written).
    fn confirm(mut self: Box<Self>) {
        self.count();
    }
}

/// A boxed future of [`CatchupSlots::durable`].
pub type DurableFuture<'a> = Pin<Box<dyn Future<Output = Result<(), String>> + Send + 'a>>;

/// The promoted post shown at the end of one follower's catch-up, and the
/// durability of impression counts.
pub trait CatchupSlots: Send + Sync {
    /// A promoted event for `channel` after seq `after_seq`, if one is due.
    fn after_catchup(&self, channel: &ChannelId, after_seq: u64) -> Option<Arc<FeedEvent>>;

    /// Resolves once every impression counted before the call is durable
    /// (`Err` if it could not be made so; the counts stay in memory and are
    /// written later).
    fn durable(&self) -> DurableFuture<'_> {
        Box::pin(async { Ok(()) })
    }
}

/// No promoted posts at all (for embedding and tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPromotions;

impl CatchupSlots for NoPromotions {
    fn after_catchup(&self, _: &ChannelId, _: u64) -> Option<Arc<FeedEvent>> {
        None
    }
}
