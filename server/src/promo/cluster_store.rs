//! Promo state for a cluster of Herald nodes, in JetStream KV buckets.
//!
//! - [`CampaignStore`] / [`KvCampaigns`]: campaign specs and channel slot
//!   settings (`herald_campaigns`, `herald_promo_channels`), mirrored in memory
//!   on every node; writes compare-and-set on the key's revision.
//! - [`LeaseCounter`]: the budget. One record per campaign
//!   (`herald_promo_budget`) holds how many impressions are *allocated* to
//!   nodes (leased and not given back) and each node's share. A node leases a
//!   block with compare-and-set, only while `allocated + block <= budget`, and
//!   gives back what it does not use (slot end, pause, shutdown). A node shows
//!   an impression only from its lease, so the sum of every node's impressions
//!   is at most `allocated`, which is at most the budget: never overspent,
//!   whatever the concurrency. [`LocalBudget`] is the node's side: a lock-free
//!   pool that the (synchronous) placement code takes from and puts back to,
//!   refilled in the background.
//! - [`ImpressionCounts`]: each node flushes its own absolute totals per
//!   campaign (`<campaign>.<node>` in `herald_promo_counts`); a campaign's
//!   numbers are the sum over nodes. Absolute values per node mean a retried
//!   or replayed flush never counts twice, and two nodes never write one key.
//! - [`CapStore`]: frequency-cap entries per (campaign, follower) in
//!   `herald_promo_caps`, merged across nodes (union of impression times).
//!
//! Failure: a node killed with a lease loses the unused part of it (the budget
//! is under-spent by at most one block per lost node, never over-spent);
//! [`LeaseCounter::reclaim`] returns a dead node's share minus its flushed
//! impressions, for an operator who knows the node is gone (if it was not, the
//! campaign can overspend by what that node shows afterwards). Impressions
//! confirmed but not yet flushed when a node dies are lost from the counts
//! (at most one flush interval's worth).
//!
//! Frequency caps across nodes: a follower is on one node at a time; the node
//! loads the follower's entry when it first places for it and flushes changes
//! with the counts. A follower that moves to another node may see up to the
//! impressions of the last flush interval more than its cap.

pub mod campaign;

pub use campaign::{Campaign, Creative, FrequencyCap, State, Targeting, PROMOTED_LABEL};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::kvcache::{self, KvCache};
use crate::model::InvalidField;
use crate::nats::Nats;

/// Default organic posts between two promoted slots.
pub const DEFAULT_EVERY_POSTS: u32 = 5;
/// How long frequency-cap entries live in their bucket.
pub const CAP_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// Promo errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PromoError {
    #[error("no campaign {0:?}")]
    UnknownCampaign(String),
    #[error("campaign {0:?} already exists")]
    CampaignExists(String),
    #[error(transparent)]
    Invalid(#[from] InvalidField),
    #[error("promo storage: {0}")]
    Storage(String),
}

fn storage(e: impl std::fmt::Display) -> PromoError {
    PromoError::Storage(e.to_string())
}

fn key_of(id: &str) -> String {
    id.replace('.', "=")
}

/// A channel's slot settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelSlot {
    pub opt_in: bool,
    pub every_posts: u32,
}

impl Default for ChannelSlot {
    fn default() -> Self {
        ChannelSlot {
            opt_in: false,
            every_posts: DEFAULT_EVERY_POSTS,
        }
    }
}

/// A boxed future of a promo write.
pub type PromoFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, PromoError>> + Send + 'a>>;

/// A change to a campaign; may run more than once (compare-and-set retries).
pub type CampaignChange<'a> = Box<dyn Fn(&mut Campaign) + Send + Sync + 'a>;

/// Campaign specs and slot settings: what `herald::promo::Promo` keeps in
/// `promo.redb` besides counters.
pub trait CampaignStore: Send + Sync + 'static {
    /// Stores a new campaign after validating it.
    fn create(&self, c: Campaign) -> PromoFuture<'_, Campaign>;
    /// Changes a campaign, validates, stores.
    fn update<'a>(&'a self, id: &'a str, change: CampaignChange<'a>) -> PromoFuture<'a, Campaign>;
    fn get(&self, id: &str) -> Option<Campaign>;
    fn list(&self) -> Vec<Campaign>;
    /// A channel's slot settings (defaults when never set).
    fn channel_slot(&self, channel: &str) -> ChannelSlot;
    fn set_channel_slot<'a>(&'a self, channel: &'a str, s: ChannelSlot) -> PromoFuture<'a, ()>;
}

/// The KV-backed [`CampaignStore`].
pub struct KvCampaigns {
    campaigns: Arc<KvCache<Campaign>>,
    slots: Arc<KvCache<ChannelSlot>>,
}

impl KvCampaigns {
    pub async fn open(nats: &Nats) -> Result<Arc<KvCampaigns>, PromoError> {
        let c = kvcache::open_bucket(nats, &nats.cfg.bucket("campaigns"), Duration::ZERO)
            .await
            .map_err(storage)?;
        let s = kvcache::open_bucket(nats, &nats.cfg.bucket("promo_channels"), Duration::ZERO)
            .await
            .map_err(storage)?;
        Ok(Arc::new(KvCampaigns {
            campaigns: KvCache::open(c, kvcache::json::<Campaign>)
                .await
                .map_err(storage)?,
            slots: KvCache::open(s, kvcache::json::<ChannelSlot>)
                .await
                .map_err(storage)?,
        }))
    }
}

impl CampaignStore for KvCampaigns {
    fn create(&self, c: Campaign) -> PromoFuture<'_, Campaign> {
        Box::pin(async move {
            c.validate()?;
            let k = key_of(&c.id);
            let bytes = serde_json::to_vec(&c).map_err(storage)?;
            match kvcache::kv_create(&self.campaigns.store, &k, bytes.into()).await {
                Ok(rev) => {
                    self.campaigns.apply(&k, Some(c.clone()), rev);
                    Ok(c)
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    Err(PromoError::CampaignExists(c.id))
                }
                Err(e) => Err(storage(e)),
            }
        })
    }

    fn update<'a>(&'a self, id: &'a str, change: CampaignChange<'a>) -> PromoFuture<'a, Campaign> {
        Box::pin(async move {
            let k = key_of(id);
            for _ in 0..100 {
                let (cur, rev) = self
                    .campaigns
                    .fetch(&k, kvcache::json::<Campaign>)
                    .await
                    .map_err(storage)?
                    .ok_or_else(|| PromoError::UnknownCampaign(id.to_string()))?;
                let mut next = cur.clone();
                change(&mut next);
                next.id = cur.id.clone();
                next.validate()?;
                let bytes = serde_json::to_vec(&next).map_err(storage)?;
                match kvcache::kv_update(&self.campaigns.store, &k, bytes.into(), rev).await {
                    Ok(r) => {
                        self.campaigns.apply(&k, Some(next.clone()), r);
                        return Ok(next);
                    }
                    Err(e) if crate::nats::is_kv_conflict(&e) => continue,
                    Err(e) => return Err(storage(e)),
                }
            }
            Err(PromoError::Storage("too many concurrent updates".into()))
        })
    }

    fn get(&self, id: &str) -> Option<Campaign> {
        self.campaigns.get(&key_of(id)).map(|(c, _)| c)
    }

    fn list(&self) -> Vec<Campaign> {
        let mut v = self.campaigns.values();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    fn channel_slot(&self, channel: &str) -> ChannelSlot {
        self.slots
            .get(&key_of(channel))
            .map(|(s, _)| s)
            .unwrap_or_default()
    }

    fn set_channel_slot<'a>(&'a self, channel: &'a str, s: ChannelSlot) -> PromoFuture<'a, ()> {
        Box::pin(async move {
            if s.every_posts == 0 || s.every_posts > 10_000 {
                return Err(InvalidField("every_posts must be 1 to 10000".into()).into());
            }
            let k = key_of(channel);
            let bytes = serde_json::to_vec(&s).map_err(storage)?;
            let rev = kvcache::kv_put(&self.slots.store, &k, bytes.into())
                .await
                .map_err(storage)?;
            self.slots.apply(&k, Some(s), rev);
            Ok(())
        })
    }
}

// ------------------------------------------------------------------ budget

/// A campaign's budget record: impressions allocated to nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetRecord {
    /// Leased to nodes and not given back (includes impressions shown).
    pub allocated: u64,
    /// Each node's share of `allocated`.
    pub leases: BTreeMap<String, u64>,
}

/// The budget ledger shared by all nodes. See the module docs.
pub struct LeaseCounter {
    store: kv::Store,
    node: String,
}

/// Most compare-and-set attempts of one budget operation.
const BUDGET_ATTEMPTS: usize = 1000;

impl LeaseCounter {
    pub async fn open(nats: &Nats) -> Result<Arc<LeaseCounter>, PromoError> {
        let store = kvcache::open_bucket(nats, &nats.cfg.bucket("promo_budget"), Duration::ZERO)
            .await
            .map_err(storage)?;
        Ok(Arc::new(LeaseCounter {
            store,
            node: nats.cfg.node_id.clone(),
        }))
    }

    /// This node's id (its key in [`BudgetRecord::leases`]).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The campaign's record and revision (0: none yet).
    pub async fn state(&self, campaign: &str) -> Result<(BudgetRecord, u64), PromoError> {
        match kvcache::kv_entry(&self.store, key_of(campaign))
            .await
            .map_err(storage)?
        {
            Some(e) if e.operation == kv::Operation::Put => Ok((
                serde_json::from_slice(&e.value).map_err(storage)?,
                e.revision,
            )),
            _ => Ok((BudgetRecord::default(), 0)),
        }
    }

    /// Read-modify-write with compare-and-set; `change` returns what to
    /// report and whether to write.
    async fn cas<T>(
        &self,
        campaign: &str,
        change: impl Fn(&mut BudgetRecord) -> (T, bool),
    ) -> Result<T, PromoError> {
        let k = key_of(campaign);
        for _ in 0..BUDGET_ATTEMPTS {
            let (mut rec, rev) = self.state(campaign).await?;
            let (out, write) = change(&mut rec);
            if !write {
                return Ok(out);
            }
            let bytes: bytes::Bytes = serde_json::to_vec(&rec).map_err(storage)?.into();
            let r = if rev == 0 {
                kvcache::kv_create(&self.store, &k, bytes)
                    .await
                    .map_err(|e| {
                        (
                            e.kind() == kv::CreateErrorKind::AlreadyExists
                                || crate::nats::is_kv_conflict(&e),
                            e.to_string(),
                        )
                    })
            } else {
                kvcache::kv_update(&self.store, &k, bytes, rev)
                    .await
                    .map_err(|e| (crate::nats::is_kv_conflict(&e), e.to_string()))
            };
            match r {
                Ok(_) => return Ok(out),
                Err((true, _)) => {
                    tokio::time::sleep(Duration::from_micros(rand::random_range(100..2000))).await;
                    continue;
                }
                Err((false, e)) => return Err(PromoError::Storage(e)),
            }
        }
        Err(PromoError::Storage(
            "budget: too many concurrent updates".into(),
        ))
    }

    /// Leases up to `want` impressions of a campaign whose budget is
    /// `budget`; returns how many were granted (0 when exhausted).
    pub async fn lease(&self, campaign: &str, budget: u64, want: u64) -> Result<u64, PromoError> {
        self.cas(campaign, |rec| {
            let n = want.min(budget.saturating_sub(rec.allocated));
            if n == 0 {
                return (0, false);
            }
            rec.allocated += n;
            *rec.leases.entry(self.node.clone()).or_default() += n;
            (n, true)
        })
        .await
    }

    /// Gives back `n` unused impressions of this node's lease.
    pub async fn give_back(&self, campaign: &str, n: u64) -> Result<u64, PromoError> {
        if n == 0 {
            return Ok(0);
        }
        self.cas(campaign, |rec| {
            let mine = rec.leases.get(&self.node).copied().unwrap_or(0);
            let back = n.min(mine);
            if back == 0 {
                return (0, false);
            }
            rec.allocated -= back;
            rec.leases.insert(self.node.clone(), mine - back);
            (back, true)
        })
        .await
    }

    /// Returns a dead node's unused share: its lease minus the impressions it
    /// flushed. Only for a node known to be gone (see the module docs).
    pub async fn reclaim(
        &self,
        campaign: &str,
        node: &str,
        flushed: u64,
    ) -> Result<u64, PromoError> {
        self.cas(campaign, |rec| {
            let share = rec.leases.get(node).copied().unwrap_or(0);
            let back = share.saturating_sub(flushed);
            if back == 0 {
                return (0, false);
            }
            rec.allocated -= back;
            rec.leases.insert(node.to_string(), share - back);
            (back, true)
        })
        .await
    }
}

/// A node's leased impressions, ready for synchronous placement code.
#[derive(Default)]
pub struct LocalBudget {
    pools: DashMap<String, Arc<AtomicU64>>,
}

impl LocalBudget {
    fn pool(&self, campaign: &str) -> Arc<AtomicU64> {
        self.pools.entry(campaign.to_string()).or_default().clone()
    }

    /// Impressions available here now.
    pub fn available(&self, campaign: &str) -> u64 {
        self.pools
            .get(campaign)
            .map_or(0, |p| p.load(Ordering::Acquire))
    }

    /// Takes up to `n` impressions (a slot's reservation); never blocks.
    pub fn take(&self, campaign: &str, n: u64) -> u64 {
        let p = self.pool(campaign);
        let mut got = 0;
        let _ = p.fetch_update(Ordering::AcqRel, Ordering::Acquire, |a| {
            got = a.min(n);
            Some(a - got)
        });
        got
    }

    /// Returns impressions a slot did not use.
    pub fn put_back(&self, campaign: &str, n: u64) {
        if n > 0 {
            self.pool(campaign).fetch_add(n, Ordering::AcqRel);
        }
    }

    /// Leases a block when fewer than `low` are available; returns how many
    /// were added.
    pub async fn refill(
        &self,
        counter: &LeaseCounter,
        campaign: &str,
        budget: u64,
        low: u64,
        block: u64,
    ) -> Result<u64, PromoError> {
        if self.available(campaign) >= low {
            return Ok(0);
        }
        let got = counter.lease(campaign, budget, block).await?;
        self.put_back(campaign, got);
        Ok(got)
    }

    /// Gives every unused impression of `campaign` back to the ledger.
    pub async fn release(&self, counter: &LeaseCounter, campaign: &str) -> Result<u64, PromoError> {
        let n = self.take(campaign, u64::MAX);
        match counter.give_back(campaign, n).await {
            Ok(back) => Ok(back),
            Err(e) => {
                self.put_back(campaign, n);
                Err(e)
            }
        }
    }

    /// [`LocalBudget::release`] for every campaign (shutdown).
    pub async fn release_all(&self, counter: &LeaseCounter) -> Result<u64, PromoError> {
        let ids: Vec<String> = self.pools.iter().map(|e| e.key().clone()).collect();
        let mut total = 0;
        for id in ids {
            total += self.release(counter, &id).await?;
        }
        Ok(total)
    }
}

// ------------------------------------------------------------------ counts

/// One node's totals for one campaign.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCounts {
    pub impressions: u64,
    pub clicks: u64,
    pub reach: u64,
}

/// Per-node counts, merged by summing. See the module docs.
pub struct ImpressionCounts {
    cache: Arc<KvCache<NodeCounts>>,
    node: String,
}

impl ImpressionCounts {
    pub async fn open(nats: &Nats) -> Result<Arc<ImpressionCounts>, PromoError> {
        let s = kvcache::open_bucket(nats, &nats.cfg.bucket("promo_counts"), Duration::ZERO)
            .await
            .map_err(storage)?;
        Ok(Arc::new(ImpressionCounts {
            cache: KvCache::open(s, kvcache::json::<NodeCounts>)
                .await
                .map_err(storage)?,
            node: nats.cfg.node_id.clone(),
        }))
    }

    /// Writes this node's absolute totals for `campaign`.
    pub async fn flush(&self, campaign: &str, c: NodeCounts) -> Result<(), PromoError> {
        let k = format!("{}.{}", key_of(campaign), key_of(&self.node));
        let bytes = serde_json::to_vec(&c).map_err(storage)?;
        let rev = kvcache::kv_put(&self.cache.store, &k, bytes.into())
            .await
            .map_err(storage)?;
        self.cache.apply(&k, Some(c), rev);
        Ok(())
    }

    /// A campaign's totals over every node (as far as this node has seen).
    pub fn total(&self, campaign: &str) -> NodeCounts {
        let prefix = format!("{}.", key_of(campaign));
        self.cache
            .entries()
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .fold(NodeCounts::default(), |a, (_, c)| NodeCounts {
                impressions: a.impressions + c.impressions,
                clicks: a.clicks + c.clicks,
                reach: a.reach + c.reach,
            })
    }

    /// What one node flushed for `campaign` (for [`LeaseCounter::reclaim`]).
    pub fn of_node(&self, campaign: &str, node: &str) -> NodeCounts {
        self.cache
            .get(&format!("{}.{}", key_of(campaign), key_of(node)))
            .map(|(c, _)| c)
            .unwrap_or_default()
    }
}

// ------------------------------------------------------------------ caps

/// A follower's frequency-cap entry for one campaign.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapRecord {
    /// Impression times (ms) within the cap period, oldest first.
    pub times: Vec<i64>,
    /// Impressions ever shown to this follower (for reach: > 0).
    pub ever: u64,
}

/// Most impression times kept per entry (the largest cap is 1000).
pub const MAX_CAP_TIMES: usize = 1000;

/// Frequency-cap entries shared by all nodes.
pub struct CapStore {
    store: kv::Store,
}

fn cap_key(campaign: &str, follower: &str) -> String {
    let h = Sha256::digest(follower.as_bytes());
    format!("{}.{}", key_of(campaign), hex::encode(&h[..16]))
}

impl CapStore {
    pub async fn open(nats: &Nats) -> Result<Arc<CapStore>, PromoError> {
        let store = kvcache::open_bucket(nats, &nats.cfg.bucket("promo_caps"), CAP_RETENTION)
            .await
            .map_err(storage)?;
        Ok(Arc::new(CapStore { store }))
    }

    /// The follower's entry, if any node stored one.
    pub async fn load(
        &self,
        campaign: &str,
        follower: &str,
    ) -> Result<Option<CapRecord>, PromoError> {
        match kvcache::kv_entry(&self.store, cap_key(campaign, follower))
            .await
            .map_err(storage)?
        {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok(Some(serde_json::from_slice(&e.value).map_err(storage)?))
            }
            _ => Ok(None),
        }
    }

    /// Merges this node's view into the stored entry (union of times, the
    /// larger `ever`) and returns the merged entry.
    pub async fn merge(
        &self,
        campaign: &str,
        follower: &str,
        mine: &CapRecord,
    ) -> Result<CapRecord, PromoError> {
        let k = cap_key(campaign, follower);
        for _ in 0..BUDGET_ATTEMPTS {
            let (cur, rev) = match kvcache::kv_entry(&self.store, &k).await.map_err(storage)? {
                Some(e) if e.operation == kv::Operation::Put => (
                    serde_json::from_slice::<CapRecord>(&e.value).map_err(storage)?,
                    e.revision,
                ),
                _ => (CapRecord::default(), 0),
            };
            let mut times: Vec<i64> = cur.times.iter().chain(&mine.times).copied().collect();
            times.sort_unstable();
            times.dedup();
            if times.len() > MAX_CAP_TIMES {
                times.drain(..times.len() - MAX_CAP_TIMES);
            }
            let merged = CapRecord {
                times,
                ever: cur.ever.max(mine.ever),
            };
            if merged == cur && rev != 0 {
                return Ok(merged);
            }
            let bytes: bytes::Bytes = serde_json::to_vec(&merged).map_err(storage)?.into();
            let ok = if rev == 0 {
                match kvcache::kv_create(&self.store, &k, bytes).await {
                    Ok(_) => true,
                    Err(e)
                        if e.kind() == kv::CreateErrorKind::AlreadyExists
                            || crate::nats::is_kv_conflict(&e) =>
                    {
                        false
                    }
                    Err(e) => return Err(storage(e)),
                }
            } else {
                match kvcache::kv_update(&self.store, &k, bytes, rev).await {
                    Ok(_) => true,
                    Err(e) if crate::nats::is_kv_conflict(&e) => false,
                    Err(e) => return Err(storage(e)),
                }
            };
            if ok {
                return Ok(merged);
            }
        }
        Err(PromoError::Storage(
            "caps: too many concurrent updates".into(),
        ))
    }
}
