//! How the promoted slot attaches to the feed, without the feed knowing the
//! promo engine: a promoted event carries a [`PromotedSlot`] (the impressions
//! reserved for its fan-out); each follower's writer claims one
//! [`Impression`] from it (refused when the follower's frequency cap or the
//! reservation says no), and confirms the impression once the frame has been
//! written to the follower. An impression dropped unconfirmed goes back to
//! the campaign. At the end of a resuming follower's catch-up, the writer asks
//! a [`CatchupSlots`] for at most one promoted event.

use std::fmt;
use std::sync::Arc;

use super::event::FeedEvent;
use crate::model::ChannelId;

/// Impressions reserved for one promoted fan-out, shared by every queue
/// that holds the event.
pub trait PromotedSlot: Send + Sync + fmt::Debug {
    /// Claims one impression for `follower`, if the frequency cap and the
    /// reservation allow.
    fn claim(&self, follower: &str) -> Option<Box<dyn Impression>>;

    /// The campaign filling the slot.
    fn campaign_id(&self) -> &str;

    /// Reserved impressions not claimed yet.
    fn remaining(&self) -> u64;
}

/// One claimed impression.
pub trait Impression: Send {
    /// The frame was written: count the impression (exactly once).
    fn confirm(self: Box<Self>);
}

/// The promoted post shown at the end of one follower's catch-up.
pub trait CatchupSlots: Send + Sync {
    /// A promoted event for `channel` after seq `after_seq`, if one is due.
    fn after_catchup(&self, channel: &ChannelId, after_seq: u64) -> Option<Arc<FeedEvent>>;
}

/// No promoted posts at all (for embedding and tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPromotions;

impl CatchupSlots for NoPromotions {
    fn after_catchup(&self, _: &ChannelId, _: u64) -> Option<Arc<FeedEvent>> {
        None
    }
}
