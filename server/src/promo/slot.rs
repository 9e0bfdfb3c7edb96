//! Reservations. When a slot opens, the winning campaign reserves up to one
//! impression per follower of the channel ([`Slot`]); each follower's writer
//! turns one reserved impression into a [`Claim`] when the frequency cap
//! allows, and confirms the claim once the frame is written. Whatever is not
//! claimed returns to the campaign when the slot is dropped (every queue that
//! held it has let go), and a claim that is never confirmed (the write failed)
//! returns on its own drop. A claim for a follower whose client confirms
//! receipt carries a receipt in its frame and, once written, awaits it (see
//! [`super::receipts`]). So `impressions + reserved <= budget` holds at
//! every moment: the budget is never overspent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use herald_proto::encode_frame;
use herald_proto::v1 as pb;

use super::{CampaignLive, Promo};
use crate::feed::{Impression, PromotedSlot};
use crate::model::ChannelId;

/// Impressions reserved by one slot, shared by every follower's queue.
pub struct Slot {
    pub(super) promo: Arc<Promo>,
    pub(super) campaign: Arc<CampaignLive>,
    pub(super) channel: ChannelId,
    pub(super) remaining: AtomicU64,
    /// The promoted post, for frames that carry a follower's receipt.
    pub(super) message: Arc<pb::Promoted>,
}

impl PromotedSlot for Slot {
    fn claim(&self, follower: &str, receipts: bool) -> Option<Box<dyn Impression>> {
        self.promo
            .claim(self, follower, receipts)
            .map(|c| Box::new(c) as Box<dyn Impression>)
    }

    fn campaign_id(&self) -> &str {
        &self.campaign.id
    }

    fn remaining(&self) -> u64 {
        self.remaining.load(Ordering::Relaxed)
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("campaign", &self.campaign.id)
            .field("channel", &self.channel)
            .field("remaining", &self.remaining.load(Ordering::Relaxed))
            .finish()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let left = *self.remaining.get_mut();
        if left > 0 {
            self.campaign.reserved.fetch_sub(left, Ordering::SeqCst);
            if self.promo.leased {
                self.campaign.pool.fetch_add(left, Ordering::SeqCst);
            }
        }
    }
}

/// One impression claimed for one follower, counted once confirmed (and
/// taken back, as if never claimed, if its frame could not be written).
pub struct Claim {
    pub(super) promo: Arc<Promo>,
    pub(super) campaign: Arc<CampaignLive>,
    pub(super) channel: ChannelId,
    pub(super) follower: String,
    pub(super) at_ms: i64,
    pub(super) confirmed: bool,
    /// The receipt its frame carries (0: counted when written, no receipt).
    pub(super) receipt: u64,
    pub(super) message: Arc<pb::Promoted>,
}

impl Impression for Claim {
    fn frame(&self) -> Option<Bytes> {
        (self.receipt != 0).then(|| {
            encode_frame(&pb::FeedFrame {
                kind: Some(pb::feed_frame::Kind::Promoted(pb::Promoted {
                    receipt: self.receipt,
                    ..(*self.message).clone()
                })),
            })
        })
    }

    fn count(&mut self) {
        let promo = self.promo.clone();
        promo.confirm(self);
    }

    fn uncount(&mut self) {
        let promo = self.promo.clone();
        promo.uncount(self);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.confirmed {
            self.promo.release(self);
        }
    }
}
