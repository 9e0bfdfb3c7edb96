//! Reservations. When a slot opens, the winning campaign reserves up to one
//! impression per follower of the channel ([`Slot`]); each follower's writer
//! turns one reserved impression into a [`Claim`] when the frequency cap
//! allows, and confirms the claim once the frame is written. Whatever is not
//! claimed returns to the campaign when the slot is dropped (every queue that
//! held it has let go), and a claim that is never confirmed (the write failed)
//! returns on its own drop. So `impressions + reserved <= budget` holds at
//! every moment: the budget is never overspent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{CampaignLive, Promo};
use crate::feed::{Impression, PromotedSlot};
use crate::model::ChannelId;

/// Impressions reserved by one slot, shared by every follower's queue.
pub struct Slot {
    pub(super) promo: Arc<Promo>,
    pub(super) campaign: Arc<CampaignLive>,
    /// The campaign's frequency cap when the slot opened (read once here,
    /// not per claim).
    pub(super) cap: Option<super::FrequencyCap>,
    pub(super) channel: ChannelId,
    pub(super) remaining: AtomicU64,
}

impl PromotedSlot for Slot {
    fn claim(&self, follower: &str) -> Option<Box<dyn Impression>> {
        self.promo
            .claim(self, follower)
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
        }
    }
}

/// One impression claimed for one follower, counted once confirmed.
pub struct Claim {
    pub(super) promo: Arc<Promo>,
    pub(super) campaign: Arc<CampaignLive>,
    pub(super) channel: ChannelId,
    pub(super) follower: String,
    pub(super) at_ms: i64,
    pub(super) confirmed: bool,
}

impl Impression for Claim {
    fn confirm(mut self: Box<Self>) {
        let promo = self.promo.clone();
        promo.confirm(&mut self);
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.confirmed {
            self.promo.release(self);
        }
    }
}
