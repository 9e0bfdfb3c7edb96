//! Promo state in cluster mode, in JetStream KV buckets shared by every
//! Herald node ([`KvPromo`], the shared `PromoStore`).
//!
//! | bucket | key | value |
//! | --- | --- | --- |
//! | `herald_campaigns` | campaign id | the campaign's spec (JSON) |
//! | `herald_promo_channels` | channel token | the channel's slot settings |
//! | `herald_promo_counts` | `c.<campaign>.<node>` / `h.<channel>.<node>` | that node's absolute totals |
//! | `herald_promo_budget` | campaign id | [`BudgetRecord`]: impressions allocated to nodes |
//!
//! The budget: a node leases a block with compare-and-set, only while
//! `allocated + block <= budget`, and gives back what it did not use (the
//! campaign stops being showable, shutdown). A node reserves impressions
//! only out of its lease, so the sum of every node's impressions is at most
//! `allocated`, which is at most the budget: never overspent. A node killed
//! while holding a lease loses its unused part: the campaign under-spends by
//! at most one lease per lost node, never over-spends.
//!
//! Counts: each node writes only its own keys, with absolute values, so a
//! retried or replayed flush never counts twice and two nodes never write one
//! key; a campaign's numbers are the sum over nodes. A node that restarts
//! with the same node id goes on from its flushed totals.
//!
//! Specs and settings are mirrored in memory on every node by watches
//! (`crate::cluster::kvcache`); a change made on one node reaches the others'
//! placement at their next sync (every `FLUSH_INTERVAL`, after the watch
//! delivered it). Two nodes updating one campaign at the same moment: the
//! last write wins.
//!
//! The engine calls this store on tokio's blocking pool; each call runs its
//! network requests to the end there with the runtime's handle.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use serde::{Deserialize, Serialize};

use super::campaign::Campaign;
use super::ledger::{Batch, CampaignRecord, ChannelRecord, LedgerError, Loaded};
use super::store::{PromoStore, Remote, SharedPromo};
use super::ChannelSlot;
use crate::cluster::kvcache::{self, KvCache};
use crate::cluster::nats::{is_kv_conflict, Nats, NatsError};

/// Most compare-and-set attempts of one budget operation.
const BUDGET_ATTEMPTS: usize = 1000;

fn err(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

/// Ids may contain `.`, a KV key token separator: keys use `=` instead.
fn token(id: &str) -> String {
    id.replace('.', "=")
}

fn untoken(t: &str) -> String {
    t.replace('=', ".")
}

/// One node's totals for one campaign (or, with only `impressions`, one
/// channel).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCounts {
    /// Impressions this node delivered.
    pub impressions: u64,
    /// Clicks this node counted.
    #[serde(default)]
    pub clicks: u64,
    /// Followers this node showed the campaign to.
    #[serde(default)]
    pub reach: u64,
}

/// A campaign's budget record: impressions allocated to nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetRecord {
    /// Leased to nodes and not given back (includes impressions shown).
    pub allocated: u64,
    /// Each node's share of `allocated`.
    pub leases: BTreeMap<String, u64>,
}

/// The KV-backed promo store. See the module docs.
pub struct KvPromo {
    node: String,
    rt: tokio::runtime::Handle,
    campaigns: Arc<KvCache<Campaign>>,
    slots: Arc<KvCache<ChannelSlot>>,
    counts: Arc<KvCache<NodeCounts>>,
    budget: kv::Store,
}

impl KvPromo {
    /// Opens (or creates) the buckets, loads them, and returns this node's
    /// view to start from: every campaign with this node's totals, every
    /// slot setting with this node's counts.
    pub async fn open(nats: &Nats) -> Result<(KvPromo, Loaded), NatsError> {
        let bucket = |w: &str| nats.cfg.bucket(w);
        let c = kvcache::open_bucket(nats, &bucket("campaigns"), Duration::ZERO).await?;
        let s = kvcache::open_bucket(nats, &bucket("promo_channels"), Duration::ZERO).await?;
        let n = kvcache::open_bucket(nats, &bucket("promo_counts"), Duration::ZERO).await?;
        let budget = kvcache::open_bucket(nats, &bucket("promo_budget"), Duration::ZERO).await?;
        let store = KvPromo {
            node: nats.cfg.node_id.clone(),
            rt: tokio::runtime::Handle::current(),
            campaigns: KvCache::open(c, kvcache::json::<Campaign>).await?,
            slots: KvCache::open(s, kvcache::json::<ChannelSlot>).await?,
            counts: KvCache::open(n, kvcache::json::<NodeCounts>).await?,
            budget,
        };
        let mut loaded = Loaded::default();
        for c in store.campaigns.values() {
            let mine = store.mine(&format!("c.{}", token(&c.id)));
            loaded.campaigns.push(CampaignRecord {
                campaign: c,
                impressions: mine.impressions,
                clicks: mine.clicks,
                reach: mine.reach,
            });
        }
        for (k, slot) in store.slots.entries() {
            let ch = untoken(&k);
            let mine = store.mine(&format!("h.{k}"));
            loaded.channels.push((
                ch,
                ChannelRecord {
                    opt_in: slot.opt_in,
                    every_posts: slot.every_posts,
                    impressions: mine.impressions,
                },
            ));
        }
        Ok((store, loaded))
    }

    /// This node's flushed counts under `prefix` (`c.<campaign>` or `h.<channel>`).
    fn mine(&self, prefix: &str) -> NodeCounts {
        self.counts
            .get(&format!("{prefix}.{}", self.node))
            .map(|(c, _)| c)
            .unwrap_or_default()
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    fn put_counts(&self, key: String, c: NodeCounts) -> Result<(), LedgerError> {
        if self.counts.get(&key).map(|(v, _)| v) == Some(c) {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&c).map_err(err)?;
        let rev = self
            .block_on(kvcache::kv_put(&self.counts.store, &key, bytes.into()))
            .map_err(err)?;
        self.counts.apply(&key, Some(c), rev);
        Ok(())
    }

    /// The campaign's budget record and revision (0: none yet).
    async fn budget_state(&self, campaign: &str) -> Result<(BudgetRecord, u64), LedgerError> {
        match kvcache::kv_entry(&self.budget, token(campaign))
            .await
            .map_err(err)?
        {
            Some(e) if e.operation == kv::Operation::Put => {
                Ok((serde_json::from_slice(&e.value).map_err(err)?, e.revision))
            }
            _ => Ok((BudgetRecord::default(), 0)),
        }
    }

    /// Read-modify-write of a budget record with compare-and-set; `change`
    /// returns what to report and whether to write.
    async fn budget_cas(
        &self,
        campaign: &str,
        change: impl Fn(&mut BudgetRecord) -> (u64, bool),
    ) -> Result<u64, LedgerError> {
        let k = token(campaign);
        for _ in 0..BUDGET_ATTEMPTS {
            let (mut rec, rev) = self.budget_state(campaign).await?;
            let (out, write) = change(&mut rec);
            if !write {
                return Ok(out);
            }
            let bytes: bytes::Bytes = serde_json::to_vec(&rec).map_err(err)?.into();
            let r = if rev == 0 {
                kvcache::kv_create(&self.budget, &k, bytes)
                    .await
                    .map_err(|e| {
                        (
                            e.kind() == kv::CreateErrorKind::AlreadyExists || is_kv_conflict(&e),
                            e.to_string(),
                        )
                    })
            } else {
                kvcache::kv_update(&self.budget, &k, bytes, rev)
                    .await
                    .map_err(|e| (is_kv_conflict(&e), e.to_string()))
            };
            match r {
                Ok(_) => return Ok(out),
                Err((true, _)) => {
                    tokio::time::sleep(Duration::from_micros(rand::random_range(100..2000))).await;
                }
                Err((false, e)) => return Err(LedgerError::Storage(e)),
            }
        }
        Err(LedgerError::Storage(
            "budget: too many concurrent updates".into(),
        ))
    }

    /// The budget record of a campaign, for tests and operators.
    pub async fn budget_record(&self, campaign: &str) -> Result<BudgetRecord, LedgerError> {
        Ok(self.budget_state(campaign).await?.0)
    }
}

impl PromoStore for KvPromo {
    fn put_campaign(&self, rec: &CampaignRecord, new: bool) -> Result<(), LedgerError> {
        let k = token(&rec.campaign.id);
        let bytes: bytes::Bytes = serde_json::to_vec(&rec.campaign).map_err(err)?.into();
        let rev = if new {
            match self.block_on(kvcache::kv_create(&self.campaigns.store, &k, bytes)) {
                Ok(rev) => rev,
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    return Err(LedgerError::Storage(format!(
                        "campaign {:?} already exists",
                        rec.campaign.id
                    )))
                }
                Err(e) => return Err(err(e)),
            }
        } else {
            self.block_on(kvcache::kv_put(&self.campaigns.store, &k, bytes))
                .map_err(err)?
        };
        self.campaigns.apply(&k, Some(rec.campaign.clone()), rev);
        Ok(())
    }

    fn put_channel(&self, channel: &str, rec: &ChannelRecord) -> Result<(), LedgerError> {
        let k = token(channel);
        let slot = ChannelSlot {
            opt_in: rec.opt_in,
            every_posts: rec.every_posts,
        };
        let bytes = serde_json::to_vec(&slot).map_err(err)?;
        let rev = self
            .block_on(kvcache::kv_put(&self.slots.store, &k, bytes.into()))
            .map_err(err)?;
        self.slots.apply(&k, Some(slot), rev);
        Ok(())
    }

    fn write(&self, batch: &Batch) -> Result<(), LedgerError> {
        // Only this node's totals: specs and settings were put when they
        // changed; caps and clicks stay in this node's memory (module docs
        // of `super`).
        for r in &batch.campaigns {
            self.put_counts(
                format!("c.{}.{}", token(&r.campaign.id), self.node),
                NodeCounts {
                    impressions: r.impressions,
                    clicks: r.clicks,
                    reach: r.reach,
                },
            )?;
        }
        for (ch, r) in &batch.channels {
            self.put_counts(
                format!("h.{}.{}", token(ch), self.node),
                NodeCounts {
                    impressions: r.impressions,
                    ..NodeCounts::default()
                },
            )?;
        }
        Ok(())
    }

    fn shared(&self) -> Option<&dyn SharedPromo> {
        Some(self)
    }
}

impl SharedPromo for KvPromo {
    fn lease(&self, campaign: &str, budget: u64, want: u64) -> Result<u64, LedgerError> {
        let node = self.node.clone();
        self.block_on(self.budget_cas(campaign, |rec| {
            let n = want.min(budget.saturating_sub(rec.allocated));
            if n == 0 {
                return (0, false);
            }
            rec.allocated += n;
            *rec.leases.entry(node.clone()).or_default() += n;
            (n, true)
        }))
    }

    fn give_back(&self, campaign: &str, n: u64) -> Result<u64, LedgerError> {
        let node = self.node.clone();
        self.block_on(self.budget_cas(campaign, |rec| {
            let mine = rec.leases.get(&node).copied().unwrap_or(0);
            let back = n.min(mine);
            if back == 0 {
                return (0, false);
            }
            rec.allocated -= back;
            rec.leases.insert(node.clone(), mine - back);
            (back, true)
        }))
    }

    fn remote(&self) -> Remote {
        let mut r = Remote {
            campaigns: self.campaigns.values(),
            slots: self
                .slots
                .entries()
                .into_iter()
                .map(|(k, s)| (untoken(&k), s))
                .collect(),
            campaign_counts: HashMap::new(),
            channel_counts: HashMap::new(),
        };
        for (k, c) in self.counts.entries() {
            let mut parts = k.split('.');
            let (Some(kind), Some(id), Some(node), None) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if node == self.node {
                continue;
            }
            match kind {
                "c" => {
                    let e = r.campaign_counts.entry(untoken(id)).or_default();
                    e.0 += c.impressions;
                    e.1 += c.clicks;
                    e.2 += c.reach;
                }
                "h" => *r.channel_counts.entry(untoken(id)).or_default() += c.impressions,
                _ => {}
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        assert_eq!(untoken(&token("news.tech")), "news.tech");
        assert!(!token("a.b.c").contains('.'));
    }
}
