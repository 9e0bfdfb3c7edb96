//! The promoted slot: campaigns, placement, and exact impression accounting.
//!
//! Placement: a channel that opted in opens its slot after every
//! `every_posts` organic posts (when a post's seq is a multiple of it), and
//! once at the end of a follower's catch-up. The highest eligible bid wins
//! (eligible: active, in its flight, targets the channel, budget left, and
//! within its pacing allowance); ties go to the older campaign. The winner
//! reserves up to one impression per follower ([`Slot`]); its frame is encoded
//! once and fanned out like a post, but takes no seq and is not history.
//!
//! Delivery: each follower's writer asks for a [`Claim`] (refused when the
//! frequency cap is reached or the reservation is used up), counts it, and
//! waits until the count is durable in `promo.redb` ([`Promo::durable`]: one
//! write, group-committed, serves every writer waiting) before it writes the
//! frame to the feed stream; if the write fails, the count is taken back. A
//! counted claim is one impression. So a crash (kill -9) never loses an
//! impression that reached a follower: a count is on disk before its frame
//! leaves. The one window left is a crash after the count is durable and
//! before the frame leaves the process (under a millisecond on an idle machine,
//! longer when the cores are busy), which counts an
//! impression the follower never got. Followers whose client confirms
//! receipt close that window too: their impressions count when the receipt
//! arrives ([`receipts`]). Clicks and slot settings are flushed
//! every [`FLUSH_INTERVAL`] and at shutdown. While `promo.redb` cannot take
//! writes, counts stay in memory (and frames still go out) until it can.
//!
//! Memory: a frequency-cap entry exists per (campaign, follower) that holds a
//! claim or was shown the campaign, and a click entry per (campaign,
//! follower) that clicked, so entries are bounded by the sum of the budgets
//! of live campaigns (impressions plus reservations never exceed a budget):
//! [`FOLLOWER_STATE_GRACE_MS`] after a campaign's flight ends, its entries
//! are removed from memory and from `promo.redb` ([`Promo::prune_ended`]),
//! and they are not loaded at start-up either.
//!
//! Storage is behind [`store`]'s `PromoStore`: `promo.redb` by default, or,
//! in cluster mode, JetStream KV buckets shared by every node
//! ([`cluster_store`]). With a shared store, a node may reserve impressions
//! only out of a *lease*: blocks of the budget it took from a shared counter
//! with compare-and-set (never past the budget) and gives back when unused.
//! So every node's impressions plus reservations stay within what it leased,
//! and the sum over nodes within the budget: never overspent, whatever the
//! nodes do at once. Each node counts its own impressions and flushes its
//! absolute totals under its own key; a campaign's numbers are the sum.
//! Specs, slot settings and the other nodes' totals reach each node through
//! the store's watches and are applied at every flush ([`FLUSH_INTERVAL`]).
//!
//! Frequency caps and clicks in cluster mode are kept per node: a follower
//! is on one node at a time and its cap holds exactly there; a follower who
//! moves to another node may be shown a capped campaign up to its cap again
//! there (the tolerance: at most cap x nodes it visits within the period),
//! and a click counts only on a node that showed the campaign to it.

pub mod campaign;
pub mod cluster_store;
mod ledger;
mod receipts;
mod slot;
mod store;

pub use campaign::{Campaign, Creative, FrequencyCap, State, Targeting, PROMOTED_LABEL};
pub use ledger::{verify, LedgerError, PROMO_CACHE_BYTES, PROMO_FILE, PROMO_SPEC};
pub use receipts::DEFAULT_RECEIPT_WINDOW;
pub use slot::{Claim, Slot};

use std::collections::{HashSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use tokio_util::task::TaskTracker;

use crate::datadir::{Health, OpenError};
use crate::feed::{EventKind, FeedEvent};
use crate::model::{now_ms, ChannelId};
use herald_proto::encode_frame;
use herald_proto::v1 as pb;
use ledger::{Batch, CampaignRecord, CapRecord, ChannelRecord, Ledger};
use store::PromoStore;

/// How often counts are flushed to disk.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// How long after its flight ends a campaign keeps its per-follower entries
/// (frequency caps, clicks): a click on one of its last impressions still
/// counts within it. Then they are removed, from memory and from disk.
pub const FOLLOWER_STATE_GRACE_MS: i64 = 24 * 3600 * 1000;
/// How often campaigns past that grace are pruned.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);
/// Default organic posts between two promoted slots.
pub const DEFAULT_EVERY_POSTS: u32 = 5;
/// Cluster mode: the most impressions one lease asks for.
pub const MAX_LEASE: u64 = 100_000;

/// Cluster mode: the usual lease block of a campaign: a hundredth of its
/// budget, between 1 and 1000 (a slot that wanted more makes the next lease
/// as large as what it missed, up to [`MAX_LEASE`]).
pub fn lease_block(budget: u64) -> u64 {
    (budget / 100).clamp(1, 1000)
}

/// A campaign in memory: its spec and live counters.
pub(crate) struct CampaignLive {
    pub id: String,
    spec: RwLock<Campaign>,
    /// Confirmed impressions (flushed or not).
    impressions: AtomicU64,
    /// Impressions reserved by open slots and unconfirmed claims (including
    /// those awaiting their receipt).
    reserved: AtomicU64,
    /// Impressions written to followers with receipts, not confirmed yet.
    awaiting_receipt: AtomicU64,
    clicks: AtomicU64,
    reach: AtomicU64,
    /// Cluster mode: impressions leased by this node and not reserved yet.
    pool: AtomicU64,
    /// Cluster mode: impressions slots wanted but the lease did not hold,
    /// since the last lease top-up (sizes the next block).
    unmet: AtomicU64,
    /// Cluster mode: the other nodes' flushed (impressions, clicks, reach).
    others: RwLock<(u64, u64, u64)>,
}

impl CampaignLive {
    fn new(c: Campaign, impressions: u64, clicks: u64, reach: u64) -> CampaignLive {
        CampaignLive {
            id: c.id.clone(),
            spec: RwLock::new(c),
            impressions: AtomicU64::new(impressions),
            reserved: AtomicU64::new(0),
            awaiting_receipt: AtomicU64::new(0),
            clicks: AtomicU64::new(clicks),
            reach: AtomicU64::new(reach),
            pool: AtomicU64::new(0),
            unmet: AtomicU64::new(0),
            others: RwLock::new((0, 0, 0)),
        }
    }

    fn others(&self) -> (u64, u64, u64) {
        *self.others.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Impressions over every node (this node's live, the others' flushed).
    fn total_impressions(&self) -> u64 {
        self.impressions
            .load(Ordering::SeqCst)
            .saturating_add(self.others().0)
    }

    fn spec(&self) -> Campaign {
        self.spec.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A channel's slot settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChannelSlot {
    /// Whether the channel shows promoted posts (default: no).
    pub opt_in: bool,
    /// Organic posts between two slots: the slot opens after a post whose seq
    /// is a multiple of it; 1 to 10000, default [`DEFAULT_EVERY_POSTS`].
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

#[derive(Default)]
struct ChannelLive {
    settings: RwLock<ChannelSlot>,
    impressions: AtomicU64,
    /// Cluster mode: promoted impressions other nodes showed here.
    others: AtomicU64,
}

/// A campaign's numbers.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct CampaignStats {
    /// Impressions delivered: promoted posts written to a follower's feed
    /// and, for a client that confirms receipt, confirmed by it.
    pub impressions: u64,
    /// Clicks reported by followers who were shown the campaign, at most one per
    /// follower.
    pub clicks: u64,
    /// What the impressions cost: `impressions * cpm_bid_micros / 1000`, in
    /// millionths of the currency unit.
    pub spend_micros: u64,
    /// Distinct followers shown the campaign at least once.
    pub reach: u64,
    /// Impressions held right now by open slots, claims not yet written and
    /// promoted posts awaiting their receipt; `impressions + reserved` never
    /// exceeds the budget.
    pub reserved: u64,
    /// Of `reserved`: promoted posts written to followers whose client
    /// confirms receipt, not confirmed yet. Each becomes an impression when
    /// its receipt arrives, or goes back to the budget if it does not within
    /// the receipt window.
    pub awaiting_receipt: u64,
}

/// Group commit for [`Promo::durable`]: each caller takes a ticket after
/// counting its impressions; the flusher ([`Promo::run_flusher`]) notes the
/// newest ticket before it takes the dirty set, writes it, and then marks
/// every ticket up to that one completed (and durable, if the write
/// succeeded). One write serves every caller waiting at the time.
struct Journal {
    requested: AtomicU64,
    state: tokio::sync::watch::Sender<JournalState>,
    wake: tokio::sync::Notify,
}

#[derive(Debug, Clone, Copy, Default)]
struct JournalState {
    /// Tickets up to this one were handled by a write.
    completed: u64,
    /// Tickets up to this one are durable.
    durable: u64,
    /// No more writes (shutdown): waiters are told at once.
    closed: bool,
}

impl Default for Journal {
    fn default() -> Self {
        Journal {
            requested: AtomicU64::new(0),
            state: tokio::sync::watch::Sender::new(JournalState::default()),
            wake: tokio::sync::Notify::new(),
        }
    }
}

#[derive(Default)]
struct CapEntry {
    times: VecDeque<i64>,
    ever: u64,
}

#[derive(Default)]
struct Dirty {
    campaigns: HashSet<String>,
    channels: HashSet<String>,
    caps: HashSet<(String, String)>,
    clicks: Vec<(String, String)>,
    /// Campaigns whose per-follower entries are to be removed from the file.
    pruned: Vec<String>,
    /// Receipts awaited or no longer awaited since the last flush.
    receipts: HashSet<u64>,
}

/// Promo errors.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PromoError {
    /// No campaign has this id.
    #[error("no campaign {0:?}")]
    UnknownCampaign(String),
    /// A campaign or slot setting is out of bounds; the text names the field.
    #[error(transparent)]
    Invalid(#[from] crate::model::InvalidField),
    /// Reading or writing `promo.redb` failed (or the blocking task doing it
    /// did).
    #[error(transparent)]
    Storage(#[from] LedgerError),
}

/// The promo engine. See the module docs.
pub struct Promo {
    campaigns: RwLock<std::collections::HashMap<String, Arc<CampaignLive>>>,
    /// Serializes reservations so concurrent slots never over-reserve.
    auction: Mutex<()>,
    channels: DashMap<String, Arc<ChannelLive>>,
    caps: DashMap<(String, String), CapEntry>,
    clicks: DashMap<(String, String), ()>,
    dirty: Mutex<Dirty>,
    store: Box<dyn PromoStore>,
    /// Whether budgets are leased from a store shared with other nodes.
    leased: bool,
    /// Serializes flushes so an older snapshot never overwrites a newer one.
    flushing: Mutex<()>,
    /// Group commit of impression counts ([`Promo::durable`]).
    journal: Journal,
    /// Campaigns whose per-follower entries were pruned already.
    pruned: Mutex<HashSet<String>>,
    /// Blocking work in flight ([`Promo::run`]).
    blocking: TaskTracker,
    /// Impressions awaiting their receipt ([`receipts`]).
    receipts: receipts::Receipts,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Promo {
    /// Opens `promo.redb` in `data_dir` and loads everything. A missing,
    /// empty or damaged file of an existing data directory is an
    /// [`OpenError`] naming it.
    pub fn open(data_dir: &Path) -> Result<Arc<Promo>, OpenError> {
        let (ledger, loaded) = Ledger::open(data_dir)?;
        Ok(Promo::with_store(Box::new(ledger), loaded))
    }

    /// Cluster mode: campaigns, slot settings and counts in JetStream KV,
    /// budgets leased (see the module docs).
    pub async fn open_cluster(nats: &crate::cluster::Nats) -> Result<Arc<Promo>, PromoError> {
        let (store, loaded) = cluster_store::KvPromo::open(nats)
            .await
            .map_err(|e| PromoError::Storage(LedgerError::Storage(e.to_string())))?;
        let promo = Promo::with_store(Box::new(store), loaded);
        promo.apply_remote();
        Ok(promo)
    }

    fn with_store(store: Box<dyn PromoStore>, mut loaded: ledger::Loaded) -> Arc<Promo> {
        let leased = store.shared().is_some();
        let awaiting = std::mem::take(&mut loaded.receipts);
        let loaded_max = awaiting.iter().map(|(id, _)| *id).max().unwrap_or(0);
        let campaigns: std::collections::HashMap<String, Arc<CampaignLive>> = loaded
            .campaigns
            .into_iter()
            .map(|r| {
                (
                    r.campaign.id.clone(),
                    Arc::new(CampaignLive::new(
                        r.campaign,
                        r.impressions,
                        r.clicks,
                        r.reach,
                    )),
                )
            })
            .collect();
        let channels = DashMap::new();
        for (k, r) in loaded.channels {
            channels.insert(
                k,
                Arc::new(ChannelLive {
                    settings: RwLock::new(ChannelSlot {
                        opt_in: r.opt_in,
                        every_posts: r.every_posts,
                    }),
                    impressions: AtomicU64::new(r.impressions),
                    others: AtomicU64::new(0),
                }),
            );
        }
        // Per-follower entries of campaigns long over are not loaded (the
        // first prune removes them from the file too).
        let over: HashSet<String> = {
            let campaigns: &std::collections::HashMap<String, Arc<CampaignLive>> = &campaigns;
            campaigns
                .values()
                .filter(|c| c.spec().end_ms.saturating_add(FOLLOWER_STATE_GRACE_MS) < now_ms())
                .map(|c| c.id.clone())
                .collect()
        };
        let caps = DashMap::new();
        for (k, r) in loaded.caps {
            if over.contains(&k.0) {
                continue;
            }
            caps.insert(
                k,
                CapEntry {
                    times: r.times.into(),
                    ever: r.ever,
                },
            );
        }
        let clicks = DashMap::new();
        for k in loaded.clicks {
            if !over.contains(&k.0) {
                clicks.insert(k, ());
            }
        }
        let promo = Arc::new(Promo {
            campaigns: RwLock::new(campaigns),
            auction: Mutex::new(()),
            channels,
            caps,
            clicks,
            dirty: Mutex::new(Dirty::default()),
            store,
            leased,
            flushing: Mutex::new(()),
            journal: Journal::default(),
            pruned: Mutex::new(HashSet::new()),
            blocking: TaskTracker::new(),
            receipts: receipts::Receipts::new(loaded_max),
        });
        promo.load_receipts(awaiting);
        promo
    }

    /// Runs `f` (which may write to disk) on the blocking pool.
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Promo) -> Result<T, PromoError> + Send + 'static,
    ) -> Result<T, PromoError> {
        let me = self.clone();
        self.blocking
            .spawn_blocking(move || f(&me))
            .await
            .map_err(|e| PromoError::Storage(LedgerError::Storage(e.to_string())))?
    }

    /// Waits for the blocking work in flight, then lets go of the database;
    /// called at shutdown.
    pub async fn close(&self) {
        self.journal.state.send_modify(|s| s.closed = true);
        self.blocking.close();
        self.blocking.wait().await;
        self.store.close();
    }

    /// Resolves once every impression counted before the call is durable in
    /// `promo.redb`; many callers share one write (see [`Journal`]). `Err`
    /// when the write failed (the counts stay in memory and are written by a
    /// later flush) or the engine is closing.
    pub async fn durable(&self) -> Result<(), PromoError> {
        let ticket = self.journal.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let mut rx = self.journal.state.subscribe();
        self.journal.wake.notify_one();
        let st = *rx
            .wait_for(|s| s.completed >= ticket || s.closed)
            .await
            .map_err(|_| PromoError::Storage(LedgerError::Unavailable("closing".into())))?;
        if st.durable >= ticket {
            Ok(())
        } else {
            Err(PromoError::Storage(LedgerError::Unavailable(
                "the impression counts could not be written yet".into(),
            )))
        }
    }

    /// Writes counts to `promo.redb` until `stop`: at once for callers of
    /// [`Promo::durable`], and every [`FLUSH_INTERVAL`] for the rest
    /// (clicks, slot settings). [`Promo::durable`] relies on it: whoever
    /// runs a `Promo` with sessions runs this too (the server does).
    pub async fn run_flusher(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(FLUSH_INTERVAL);
        let mut prune = tokio::time::interval(PRUNE_INTERVAL);
        loop {
            let mut ticked = false;
            tokio::select! {
                _ = tick.tick() => {
                    ticked = true;
                    let n = self.expire_receipts(now_ms());
                    if n > 0 {
                        tracing::info!(impressions = n, "promoted posts not confirmed within the receipt window were not counted");
                    }
                }
                _ = self.journal.wake.notified() => {}
                _ = prune.tick() => {
                    let n = self.prune_ended(now_ms());
                    if n > 0 {
                        tracing::info!(entries = n, "pruned per-follower entries of campaigns long over");
                    }
                }
                _ = stop.cancelled() => {
                    // Shutting down: writers still finishing are told at
                    // once (their counts stay in memory and go to disk with
                    // the final flush) rather than waiting for a flush that
                    // will not come.
                    self.journal.state.send_modify(|s| s.closed = true);
                    return;
                }
            }
            loop {
                let target = self.journal.requested.load(Ordering::SeqCst);
                let res = self.run(|p| p.flush()).await;
                let ok = res.is_ok();
                self.journal.state.send_modify(|s| {
                    s.completed = s.completed.max(target);
                    if ok {
                        s.durable = s.durable.max(target);
                    }
                });
                if let Err(e) = res {
                    tracing::warn!(error = %e, "promo flush failed; will retry");
                    break;
                }
                if self.journal.requested.load(Ordering::SeqCst) == target {
                    break;
                }
            }
            // Cluster mode: other nodes' changes, and this node's leases,
            // once per interval.
            if self.leased && ticked {
                if let Err(e) = self.run(|p| p.sync()).await {
                    tracing::warn!(error = %e, "promo sync with the cluster failed; will retry");
                }
            }
        }
    }

    /// Whether `promo.redb` can take writes now.
    pub fn health(&self) -> Health {
        self.store.health()
    }

    /// Tries to reopen `promo.redb` if a write failed (blocking).
    pub fn recover(&self) {
        self.store.recover();
    }

    fn campaign(&self, id: &str) -> Option<Arc<CampaignLive>> {
        self.campaigns
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    // ------------------------------------------------------------ campaigns

    /// Stores a new campaign (durably) after validating it.
    pub fn create(&self, c: Campaign) -> Result<Campaign, PromoError> {
        c.validate()?;
        // Durable first, then live: a failed write changes nothing.
        let _one_writer = lock(&self.flushing);
        self.store.put_campaign(
            &CampaignRecord {
                campaign: c.clone(),
                impressions: 0,
                clicks: 0,
                reach: 0,
            },
            true,
        )?;
        let live = Arc::new(CampaignLive::new(c.clone(), 0, 0, 0));
        self.campaigns
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(c.id.clone(), live);
        Ok(c)
    }

    /// Changes a campaign with `change`, validates, stores durably, and only
    /// then lets placement see the change.
    pub fn update(
        &self,
        id: &str,
        change: impl FnOnce(&mut Campaign),
    ) -> Result<Campaign, PromoError> {
        let live = self
            .campaign(id)
            .ok_or_else(|| PromoError::UnknownCampaign(id.to_string()))?;
        // Holding the flush lock: no flush can write the old spec after ours.
        let _one_writer = lock(&self.flushing);
        let mut next = live.spec();
        change(&mut next);
        next.id = live.id.clone();
        next.validate()?;
        self.store.put_campaign(
            &CampaignRecord {
                campaign: next.clone(),
                impressions: live.impressions.load(Ordering::SeqCst),
                clicks: live.clicks.load(Ordering::SeqCst),
                reach: live.reach.load(Ordering::SeqCst),
            },
            false,
        )?;
        {
            let _auction = lock(&self.auction);
            *live.spec.write().unwrap_or_else(|p| p.into_inner()) = next.clone();
        }
        Ok(next)
    }

    /// A campaign, its derived state and its numbers.
    pub fn get(&self, id: &str) -> Option<(Campaign, State, CampaignStats)> {
        let live = self.campaign(id)?;
        let spec = live.spec();
        let (o_impressions, o_clicks, o_reach) = live.others();
        let impressions = live
            .impressions
            .load(Ordering::Relaxed)
            .saturating_add(o_impressions);
        let stats = CampaignStats {
            impressions,
            clicks: live.clicks.load(Ordering::Relaxed).saturating_add(o_clicks),
            spend_micros: spec.spend_micros(impressions),
            reach: live.reach.load(Ordering::Relaxed).saturating_add(o_reach),
            reserved: live.reserved.load(Ordering::Relaxed),
            awaiting_receipt: live.awaiting_receipt.load(Ordering::Relaxed),
        };
        let state = spec.state(impressions, now_ms());
        Some((spec, state, stats))
    }

    // ------------------------------------------------------------ channels

    /// A channel's slot settings and the promoted impressions shown in it.
    pub fn channel(&self, channel: &str) -> (ChannelSlot, u64) {
        match self.channels.get(channel) {
            Some(c) => (
                *c.settings.read().unwrap_or_else(|p| p.into_inner()),
                c.impressions
                    .load(Ordering::Relaxed)
                    .saturating_add(c.others.load(Ordering::Relaxed)),
            ),
            None => (ChannelSlot::default(), 0),
        }
    }

    /// Sets a channel's slot settings (durably).
    pub fn set_channel(&self, channel: &str, s: ChannelSlot) -> Result<(), PromoError> {
        if s.every_posts == 0 || s.every_posts > 10_000 {
            return Err(crate::model::InvalidField("every_posts must be 1 to 10000".into()).into());
        }
        let c = self
            .channels
            .entry(channel.to_string())
            .or_insert_with(|| Arc::new(ChannelLive::default()))
            .clone();
        let _one_writer = lock(&self.flushing);
        self.store.put_channel(
            channel,
            &ChannelRecord {
                opt_in: s.opt_in,
                every_posts: s.every_posts,
                impressions: c.impressions.load(Ordering::Relaxed),
            },
        )?;
        *c.settings.write().unwrap_or_else(|p| p.into_inner()) = s;
        Ok(())
    }

    // ------------------------------------------------------------ placement

    /// Called after post `seq` of `channel` was fanned out: opens the slot if
    /// it is due, returning the promoted event to fan out.
    pub fn after_post(
        self: &Arc<Self>,
        channel: &ChannelId,
        seq: u64,
        followers: usize,
    ) -> Option<Arc<FeedEvent>> {
        let (settings, _) = self.channel(channel.as_str());
        if !settings.opt_in
            || followers == 0
            || !seq.is_multiple_of(u64::from(settings.every_posts))
        {
            return None;
        }
        self.place(channel, seq, followers as u64, followers as u64)
    }

    /// The slot at the end of one follower's catch-up (`followers` is the
    /// channel's follower count, for targeting).
    pub fn after_catchup(
        self: &Arc<Self>,
        channel: &ChannelId,
        seq: u64,
        followers: usize,
    ) -> Option<Arc<FeedEvent>> {
        let (settings, _) = self.channel(channel.as_str());
        if !settings.opt_in {
            return None;
        }
        self.place(channel, seq, followers as u64, 1)
    }

    /// Runs the auction and reserves up to `want` impressions for the winner.
    fn place(
        self: &Arc<Self>,
        channel: &ChannelId,
        after_seq: u64,
        followers: u64,
        want: u64,
    ) -> Option<Arc<FeedEvent>> {
        let now = now_ms();
        let _auction = lock(&self.auction);
        let mut best: Option<(Arc<CampaignLive>, Campaign, u64)> = None;
        for live in self
            .campaigns
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            let spec = live.spec();
            if spec.status != State::Active
                || now < spec.start_ms
                || now >= spec.end_ms
                || !spec.targeting.matches(channel.as_str(), followers)
            {
                continue;
            }
            let reserved = live.reserved.load(Ordering::SeqCst);
            let used = live.total_impressions() + reserved;
            let limit = spec.paced_allowance(now).min(spec.budget_impressions);
            if used >= limit {
                continue;
            }
            // With leases, only what this node holds may be reserved.
            let room = if self.leased {
                (limit - used).min(live.pool.load(Ordering::SeqCst))
            } else {
                limit - used
            };
            if room == 0 {
                continue;
            }
            let better = match &best {
                None => true,
                Some((_, b, _)) => {
                    (spec.cpm_bid_micros, std::cmp::Reverse(spec.created_at_ms))
                        > (b.cpm_bid_micros, std::cmp::Reverse(b.created_at_ms))
                }
            };
            if better {
                best = Some((live.clone(), spec, room));
            }
        }
        let (live, spec, room) = best?;
        let mut n = want.min(room);
        if self.leased {
            // Take from the lease (claims and slot drops give back to it).
            let mut got = 0;
            let _ = live
                .pool
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
                    got = p.min(n);
                    Some(p - got)
                });
            if got < want {
                live.unmet.fetch_add(want - got, Ordering::Relaxed);
            }
            n = got;
        }
        if n == 0 {
            return None;
        }
        live.reserved.fetch_add(n, Ordering::SeqCst);
        let message = Arc::new(pb::Promoted {
            channel: channel.to_string(),
            campaign_id: spec.id.clone(),
            label: PROMOTED_LABEL.to_string(),
            title: spec.creative.title.clone(),
            text: spec.creative.text.clone(),
            media: spec.creative.media.as_ref().map(|m| pb::MediaRef {
                url: m.url.clone(),
                mime: m.mime.clone(),
            }),
            cta_url: spec.creative.cta_url.clone(),
            after_seq,
            receipt: 0,
        });
        let frame = encode_frame(&pb::FeedFrame {
            kind: Some(pb::feed_frame::Kind::Promoted((*message).clone())),
        });
        Some(Arc::new(FeedEvent {
            channel: channel.clone(),
            seq: after_seq,
            kind: EventKind::Promoted,
            frame,
            slot: Some(Arc::new(Slot {
                promo: self.clone(),
                campaign: live,
                channel: channel.clone(),
                remaining: AtomicU64::new(n),
                message,
            })),
        }))
    }

    // ------------------------------------------------------------ delivery

    /// Claims one impression of `slot` for `follower`, if the frequency cap
    /// and the reservation allow. `receipts`: the follower's client confirms
    /// promoted posts (not used in cluster mode; see [`receipts`]).
    pub fn claim(self: &Arc<Self>, slot: &Slot, follower: &str, receipts: bool) -> Option<Claim> {
        let cap = slot.campaign.spec().frequency_cap;
        let now = now_ms();
        let mut entry = self
            .caps
            .entry((slot.campaign.id.clone(), follower.to_string()));
        if let (Some(cap), dashmap::Entry::Occupied(e)) = (cap, &mut entry) {
            let e = e.get_mut();
            let since = now - (cap.period_secs as i64).saturating_mul(1000);
            while e.times.front().is_some_and(|t| *t <= since) {
                e.times.pop_front();
            }
            if e.times.len() >= cap.impressions as usize {
                return None;
            }
        }
        slot.remaining
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |r| r.checked_sub(1))
            .ok()?;
        // Entries exist only for followers holding a claim or shown the
        // campaign, so there are at most `impressions + reserved <= budget`.
        let mut e = entry.or_default();
        if cap.is_some() {
            e.times.push_back(now);
        }
        drop(e);
        Some(Claim {
            promo: self.clone(),
            campaign: slot.campaign.clone(),
            channel: slot.channel.clone(),
            follower: follower.to_string(),
            at_ms: now,
            confirmed: false,
            receipt: if receipts && !self.leased {
                self.receipts.next_id()
            } else {
                0
            },
            message: slot.message.clone(),
        })
    }

    /// Counts a claim whose frame was written (once: a confirmed claim is
    /// not released when dropped); with a receipt, records it as awaiting
    /// its receipt instead.
    pub fn confirm(&self, c: &mut Claim) {
        if c.confirmed {
            return;
        }
        if c.receipt != 0 {
            self.await_receipt(c);
            return;
        }
        let mut dirty = lock(&self.dirty);
        c.confirmed = true;
        self.count_impression(&c.campaign, &c.channel, &c.follower, &mut dirty);
    }

    /// Counts one impression of `live` shown to `follower` in `channel`,
    /// out of its reservation.
    fn count_impression(
        &self,
        live: &CampaignLive,
        channel: &ChannelId,
        follower: &str,
        dirty: &mut Dirty,
    ) {
        // Impressions first, then the reservation: `place` reads them in
        // the opposite order, so it never sees their sum too low.
        live.impressions.fetch_add(1, Ordering::SeqCst);
        live.reserved.fetch_sub(1, Ordering::SeqCst);
        let key = (live.id.clone(), follower.to_string());
        if let Some(mut e) = self.caps.get_mut(&key) {
            e.ever += 1;
            if e.ever == 1 {
                live.reach.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(ch) = self.channels.get(channel.as_str()) {
            ch.impressions.fetch_add(1, Ordering::Relaxed);
        }
        dirty.campaigns.insert(live.id.clone());
        dirty.channels.insert(channel.to_string());
        dirty.caps.insert(key);
    }

    /// Takes back a confirmed claim whose frame could not be written: it
    /// becomes an unconfirmed claim again (and is released when dropped).
    pub(crate) fn uncount(&self, c: &mut Claim) {
        if !c.confirmed {
            return;
        }
        if c.receipt != 0 {
            self.forget_receipt(c);
            return;
        }
        let mut dirty = lock(&self.dirty);
        c.confirmed = false;
        let live = &c.campaign;
        // The reservation first, then the impression: `place` reads
        // impressions first, so it never sees their sum too low.
        live.reserved.fetch_add(1, Ordering::SeqCst);
        live.impressions.fetch_sub(1, Ordering::SeqCst);
        let key = (live.id.clone(), c.follower.clone());
        if let Some(mut e) = self.caps.get_mut(&key) {
            e.ever = e.ever.saturating_sub(1);
            if e.ever == 0 {
                live.reach.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if let Some(ch) = self.channels.get(c.channel.as_str()) {
            ch.impressions.fetch_sub(1, Ordering::Relaxed);
        }
        dirty.campaigns.insert(live.id.clone());
        dirty.channels.insert(c.channel.to_string());
        dirty.caps.insert(key);
    }

    /// Undoes an unconfirmed claim (from `Claim::drop`).
    fn release(&self, c: &Claim) {
        self.unreserve(&c.campaign, &c.follower, c.at_ms);
    }

    /// Gives one reserved impression of `live`, claimed for `follower` at
    /// `at_ms`, back: to the campaign, and its frequency-cap time.
    fn unreserve(&self, live: &CampaignLive, follower: &str, at_ms: i64) {
        live.reserved.fetch_sub(1, Ordering::SeqCst);
        if self.leased {
            live.pool.fetch_add(1, Ordering::SeqCst);
        }
        let key = (live.id.clone(), follower.to_string());
        if let Some(mut e) = self.caps.get_mut(&key) {
            if let Some(i) = e.times.iter().rposition(|t| *t == at_ms) {
                e.times.remove(i);
            }
        }
        self.caps
            .remove_if(&key, |_, e| e.ever == 0 && e.times.is_empty());
    }

    /// Removes the per-follower entries (frequency caps, clicks) of every
    /// campaign whose flight ended more than [`FOLLOWER_STATE_GRACE_MS`]
    /// before `now_ms`, from memory and (with the next flush) from disk.
    /// Returns how many entries went. A campaign's totals (impressions,
    /// clicks, reach) stay.
    pub fn prune_ended(&self, now_ms: i64) -> usize {
        let over: HashSet<String> = {
            let pruned = lock(&self.pruned);
            self.campaigns
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .filter(|c| {
                    c.spec().end_ms.saturating_add(FOLLOWER_STATE_GRACE_MS) < now_ms
                        && !pruned.contains(&c.id)
                })
                .map(|c| c.id.clone())
                .collect()
        };
        if over.is_empty() {
            return 0;
        }
        let before = self.caps.len() + self.clicks.len();
        self.caps.retain(|(c, _), _| !over.contains(c));
        self.clicks.retain(|(c, _), _| !over.contains(c));
        let removed = before.saturating_sub(self.caps.len() + self.clicks.len());
        let mut dirty = lock(&self.dirty);
        dirty.caps.retain(|(c, _)| !over.contains(c));
        dirty.clicks.retain(|(c, _)| !over.contains(c));
        dirty.pruned.extend(over.iter().cloned());
        lock(&self.pruned).extend(over);
        removed
    }

    /// Per-follower entries held in memory (frequency caps, clicks).
    pub fn follower_entries(&self) -> usize {
        self.caps.len() + self.clicks.len()
    }

    /// Records a click; `Ok(false)` for a repeat or for a follower who was
    /// never shown the campaign.
    pub fn click(&self, follower: &str, campaign_id: &str) -> Result<bool, PromoError> {
        let live = self
            .campaign(campaign_id)
            .ok_or_else(|| PromoError::UnknownCampaign(campaign_id.to_string()))?;
        let key = (campaign_id.to_string(), follower.to_string());
        if self.caps.get(&key).is_none_or(|e| e.ever == 0) {
            return Ok(false);
        }
        if self.clicks.insert(key.clone(), ()).is_some() {
            return Ok(false);
        }
        live.clicks.fetch_add(1, Ordering::Relaxed);
        let mut dirty = lock(&self.dirty);
        dirty.campaigns.insert(campaign_id.to_string());
        dirty.clicks.push(key);
        Ok(true)
    }

    // ------------------------------------------------------------ cluster

    /// Cluster mode (a no-op otherwise): applies what other nodes changed
    /// (campaign specs, slot settings, their counts), then tops up the lease
    /// of every campaign that may be shown and gives back what the others
    /// hold. Blocks on the network: call it through [`Promo::run`].
    pub fn sync(&self) -> Result<(), PromoError> {
        if self.store.shared().is_none() {
            return Ok(());
        }
        self.apply_remote();
        self.upkeep_leases()
    }

    fn all_campaigns(&self) -> Vec<Arc<CampaignLive>> {
        self.campaigns
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn apply_remote(&self) {
        let Some(shared) = self.store.shared() else {
            return;
        };
        let remote = shared.remote();
        for c in remote.campaigns {
            match self.campaign(&c.id) {
                Some(live) => {
                    if live.spec() != c {
                        let _auction = lock(&self.auction);
                        *live.spec.write().unwrap_or_else(|p| p.into_inner()) = c;
                    }
                }
                None => {
                    let live = Arc::new(CampaignLive::new(c, 0, 0, 0));
                    self.campaigns
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(live.id.clone())
                        .or_insert(live);
                }
            }
        }
        for (ch, slot) in remote.slots {
            let c = self.channels.entry(ch).or_default().clone();
            *c.settings.write().unwrap_or_else(|p| p.into_inner()) = slot;
        }
        for live in self.all_campaigns() {
            let o = remote
                .campaign_counts
                .get(&live.id)
                .copied()
                .unwrap_or_default();
            *live.others.write().unwrap_or_else(|p| p.into_inner()) = o;
        }
        for (ch, n) in remote.channel_counts {
            self.channels
                .entry(ch)
                .or_default()
                .others
                .store(n, Ordering::Relaxed);
        }
    }

    /// Leases for campaigns that may be shown; gives back the rest.
    fn upkeep_leases(&self) -> Result<(), PromoError> {
        let Some(shared) = self.store.shared() else {
            return Ok(());
        };
        let now = now_ms();
        for live in self.all_campaigns() {
            let spec = live.spec();
            let showable = spec.status == State::Active
                && now >= spec.start_ms
                && now < spec.end_ms
                && live.total_impressions() < spec.budget_impressions;
            let pool = live.pool.load(Ordering::SeqCst);
            if showable {
                let block = lease_block(spec.budget_impressions);
                let unmet = live.unmet.swap(0, Ordering::Relaxed);
                if pool >= block && unmet == 0 {
                    continue;
                }
                let want = block.max(unmet).min(MAX_LEASE);
                let got = shared.lease(&live.id, spec.budget_impressions, want)?;
                live.pool.fetch_add(got, Ordering::SeqCst);
            } else if pool > 0 {
                self.give_back(shared, &live)?;
            }
        }
        Ok(())
    }

    fn give_back(
        &self,
        shared: &dyn store::SharedPromo,
        live: &CampaignLive,
    ) -> Result<(), PromoError> {
        let n = live.pool.swap(0, Ordering::SeqCst);
        if n == 0 {
            return Ok(());
        }
        if let Err(e) = shared.give_back(&live.id, n) {
            live.pool.fetch_add(n, Ordering::SeqCst);
            return Err(e.into());
        }
        Ok(())
    }

    /// Cluster mode, at shutdown: gives every unused leased impression back
    /// (after the sessions are gone, so nothing reserves any more).
    pub fn release_leases(&self) -> Result<(), PromoError> {
        let Some(shared) = self.store.shared() else {
            return Ok(());
        };
        for live in self.all_campaigns() {
            self.give_back(shared, &live)?;
        }
        Ok(())
    }

    // ------------------------------------------------------------ durability

    /// Writes everything changed since the last flush, in one transaction.
    pub fn flush(&self) -> Result<(), PromoError> {
        let _one_at_a_time = lock(&self.flushing);
        let dirty = std::mem::take(&mut *lock(&self.dirty));
        let mut batch = Batch::default();
        for id in &dirty.campaigns {
            if let Some(live) = self.campaign(id) {
                batch.campaigns.push(CampaignRecord {
                    campaign: live.spec(),
                    impressions: live.impressions.load(Ordering::Relaxed),
                    clicks: live.clicks.load(Ordering::Relaxed),
                    reach: live.reach.load(Ordering::Relaxed),
                });
            }
        }
        for ch in &dirty.channels {
            let (s, impressions) = self.channel(ch);
            batch.channels.push((
                ch.clone(),
                ChannelRecord {
                    opt_in: s.opt_in,
                    every_posts: s.every_posts,
                    impressions,
                },
            ));
        }
        for key in &dirty.caps {
            match self.caps.get(key) {
                Some(e) => batch.caps.push((
                    key.clone(),
                    CapRecord {
                        times: e.times.iter().copied().collect(),
                        ever: e.ever,
                    },
                )),
                // Taken back, or pruned: gone from the file too.
                None => batch.removed_caps.push(key.clone()),
            }
        }
        for id in &dirty.receipts {
            match self.receipt_record(*id) {
                Some(r) => batch.receipts.push((*id, r)),
                None => batch.removed_receipts.push(*id),
            }
        }
        batch.pruned = dirty.pruned.clone();
        batch.clicks = dirty.clicks.clone();
        if batch.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.store.write(&batch) {
            // Keep what was not written for the next flush.
            let mut d = lock(&self.dirty);
            d.campaigns.extend(dirty.campaigns);
            d.channels.extend(dirty.channels);
            d.caps.extend(dirty.caps);
            d.clicks.extend(dirty.clicks);
            d.pruned.extend(dirty.pruned);
            d.receipts.extend(dirty.receipts);
            return Err(e.into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
