//! Where promo state is kept: the [`PromoStore`] seam between the engine
//! (placement, claims and counters, in memory, in `super`) and storage.
//!
//! - The embedded store is the [`Ledger`] (`promo.redb`), whose behaviour is
//!   the same as before the seam: a campaign's record holds its spec and its
//!   totals, written together; flushes write absolute totals.
//! - The cluster store (`super::cluster_store::KvPromo`) keeps specs and slot
//!   settings in JetStream KV buckets that every node reads, each node's own
//!   totals under its own key, and the budget as leases
//!   ([`PromoStore::shared`]).
//!
//! Every method here may block (an fsync, a network round trip): the engine
//! calls them only on tokio's blocking pool (`Promo::run`).

use std::collections::HashMap;

use super::campaign::Campaign;
use super::ledger::{Batch, CampaignRecord, ChannelRecord, Ledger, LedgerError};
use super::ChannelSlot;
use crate::datadir::Health;

/// Promo storage. See the module docs.
pub(crate) trait PromoStore: Send + Sync + 'static {
    /// Stores a campaign's spec (with this node's totals). With `new`, fails
    /// if a campaign with this id exists in a store shared with other nodes.
    fn put_campaign(&self, rec: &CampaignRecord, new: bool) -> Result<(), LedgerError>;
    /// Stores a channel's slot settings (with its promoted impressions shown
    /// on this node).
    fn put_channel(&self, channel: &str, rec: &ChannelRecord) -> Result<(), LedgerError>;
    /// Writes a flush: this node's absolute totals, frequency-cap entries
    /// and clicks. Specs and settings in it are the ones last put; a shared
    /// store does not write them again (another node may have changed them).
    fn write(&self, batch: &Batch) -> Result<(), LedgerError>;
    /// The budget and state shared with other nodes, or `None` when this
    /// node is alone (the embedded store): then the budget is checked
    /// against this node's own counters.
    fn shared(&self) -> Option<&dyn SharedPromo> {
        None
    }
    /// Whether the store can take writes now.
    fn health(&self) -> Health {
        Health::Ok
    }
    /// Tries to make a store that failed a write usable again (blocking).
    fn recover(&self) {}
    /// Lets go of the store's files (at shutdown, once nothing writes).
    fn close(&self) {}
}

/// What other nodes did, as far as this node has seen.
#[derive(Debug, Default, Clone)]
pub(crate) struct Remote {
    /// Every campaign's current spec.
    pub campaigns: Vec<Campaign>,
    /// Every channel's slot settings that were ever set.
    pub slots: Vec<(String, ChannelSlot)>,
    /// Per campaign, the other nodes' flushed (impressions, clicks, reach).
    pub campaign_counts: HashMap<String, (u64, u64, u64)>,
    /// Per channel, the promoted impressions other nodes flushed.
    pub channel_counts: HashMap<String, u64>,
}

/// The part of a shared store that several nodes coordinate through.
pub(crate) trait SharedPromo: Send + Sync {
    /// Leases up to `want` impressions of `campaign` (budget `budget`) for
    /// this node; returns how many were granted (0: the budget is allocated).
    fn lease(&self, campaign: &str, budget: u64, want: u64) -> Result<u64, LedgerError>;
    /// Gives back `n` unused impressions of this node's lease.
    fn give_back(&self, campaign: &str, n: u64) -> Result<u64, LedgerError>;
    /// The other nodes' campaigns, settings and counts.
    fn remote(&self) -> Remote;
}

impl PromoStore for Ledger {
    fn put_campaign(&self, rec: &CampaignRecord, _new: bool) -> Result<(), LedgerError> {
        self.write(&Batch {
            campaigns: vec![rec.clone()],
            ..Batch::default()
        })
    }

    fn put_channel(&self, channel: &str, rec: &ChannelRecord) -> Result<(), LedgerError> {
        self.write(&Batch {
            channels: vec![(channel.to_string(), *rec)],
            ..Batch::default()
        })
    }

    fn write(&self, batch: &Batch) -> Result<(), LedgerError> {
        Ledger::write(self, batch)
    }

    fn health(&self) -> Health {
        Ledger::health(self)
    }

    fn recover(&self) {
        Ledger::recover(self)
    }

    fn close(&self) {
        Ledger::close(self)
    }
}
