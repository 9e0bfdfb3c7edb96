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
//! frequency cap is reached or the reservation is used up), and confirms it
//! once the frame is written to the feed stream; a confirmed claim is one
//! impression. Counts live in memory and are flushed to `promo.redb` in
//! batches ([`Promo::flush`], every [`FLUSH_INTERVAL`] and at shutdown).
//!
//! Memory: a frequency-cap entry exists per (campaign, follower) that holds a
//! claim or was shown the campaign, so entries are bounded by the sum of
//! campaign budgets (impressions plus reservations never exceed a budget).
//! Its window of recent impressions is kept only when the campaign has a
//! frequency cap; otherwise the entry is just the "shown" mark that reach and
//! click checks need.
//!
//! Contention: claiming and confirming an impression (once per follower a
//! promoted post reaches) take no lock shared by all followers: the cap is
//! read from the slot, counts are atomics, the (campaign, follower) entry is
//! in a sharded map, and what the next flush must write is marked on the
//! campaign, the channel and the entry themselves (plus the entry's key in
//! one of [`DIRTY_SHARDS`] lists). Placement needs no global lock either:
//! it reads each candidate's spec in place and reserves with a
//! compare-and-swap against the campaign's allowance.

pub mod campaign;
mod ledger;
mod slot;

pub use campaign::{Campaign, Creative, FrequencyCap, State, Targeting, PROMOTED_LABEL};
pub use ledger::{LedgerError, PROMO_FILE};
pub use slot::{Claim, Slot};

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use tokio_util::task::TaskTracker;

use crate::feed::{EventKind, FeedEvent};
use crate::model::{now_ms, ChannelId};
use herald_proto::encode_frame;
use herald_proto::v1 as pb;
use ledger::{Batch, CampaignRecord, CapRecord, ChannelRecord, Ledger};

/// How often counts are flushed to disk.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// Default organic posts between two promoted slots.
pub const DEFAULT_EVERY_POSTS: u32 = 5;
/// Lists of (campaign, follower) entries changed since the last flush; a
/// confirm locks only the one its follower hashes to.
pub const DIRTY_SHARDS: usize = 16;

/// A campaign in memory: its spec and live counters.
pub(crate) struct CampaignLive {
    pub id: String,
    spec: RwLock<Campaign>,
    /// Confirmed impressions (flushed or not).
    impressions: AtomicU64,
    /// Impressions reserved by open slots and unconfirmed claims.
    reserved: AtomicU64,
    clicks: AtomicU64,
    reach: AtomicU64,
    /// Changed since the last flush.
    dirty: AtomicBool,
}

impl CampaignLive {
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

struct ChannelLive {
    settings: RwLock<ChannelSlot>,
    impressions: AtomicU64,
    /// Changed since the last flush.
    dirty: AtomicBool,
}

/// A campaign's numbers.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
pub struct CampaignStats {
    /// Impressions delivered: promoted posts written to a follower's feed.
    pub impressions: u64,
    /// Clicks reported by followers who were shown the campaign, at most one per
    /// follower.
    pub clicks: u64,
    /// What the impressions cost: `impressions * cpm_bid_micros / 1000`, in
    /// millionths of the currency unit.
    pub spend_micros: u64,
    /// Distinct followers shown the campaign at least once.
    pub reach: u64,
    /// Impressions held right now by open slots and claims not yet written;
    /// `impressions + reserved` never exceeds the budget.
    pub reserved: u64,
}

#[derive(Default)]
struct CapEntry {
    /// Recent impressions (only for a campaign with a frequency cap).
    times: VecDeque<i64>,
    ever: u64,
    /// Changed since the last flush (its key is in a dirty list).
    dirty: bool,
}

/// A (campaign, follower) key.
type CapKey = (String, String);

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
    channels: DashMap<String, Arc<ChannelLive>>,
    caps: DashMap<CapKey, CapEntry>,
    clicks: DashMap<CapKey, ()>,
    /// Keys of cap entries changed since the last flush, by follower hash.
    dirty_caps: Box<[Mutex<Vec<CapKey>>]>,
    /// Clicks not yet flushed (control path, rare).
    dirty_clicks: Mutex<Vec<CapKey>>,
    hasher: std::collections::hash_map::RandomState,
    ledger: Ledger,
    /// Serializes flushes so an older snapshot never overwrites a newer one.
    flushing: Mutex<()>,
    /// Blocking work in flight ([`Promo::run`]).
    blocking: TaskTracker,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Promo {
    /// Opens `promo.redb` in `data_dir` and loads everything.
    pub fn open(data_dir: &Path) -> Result<Arc<Promo>, PromoError> {
        let (ledger, loaded) = Ledger::open(data_dir)?;
        let campaigns = loaded
            .campaigns
            .into_iter()
            .map(|r| {
                (
                    r.campaign.id.clone(),
                    Arc::new(CampaignLive {
                        id: r.campaign.id.clone(),
                        spec: RwLock::new(r.campaign),
                        impressions: AtomicU64::new(r.impressions),
                        reserved: AtomicU64::new(0),
                        clicks: AtomicU64::new(r.clicks),
                        reach: AtomicU64::new(r.reach),
                        dirty: AtomicBool::new(false),
                    }),
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
                    dirty: AtomicBool::new(false),
                }),
            );
        }
        let caps = DashMap::new();
        for (k, r) in loaded.caps {
            caps.insert(
                k,
                CapEntry {
                    times: r.times.into(),
                    ever: r.ever,
                    dirty: false,
                },
            );
        }
        let clicks = DashMap::new();
        for k in loaded.clicks {
            clicks.insert(k, ());
        }
        Ok(Arc::new(Promo {
            campaigns: RwLock::new(campaigns),
            channels,
            caps,
            clicks,
            dirty_caps: (0..DIRTY_SHARDS).map(|_| Mutex::new(Vec::new())).collect(),
            dirty_clicks: Mutex::new(Vec::new()),
            hasher: std::collections::hash_map::RandomState::new(),
            ledger,
            flushing: Mutex::new(()),
            blocking: TaskTracker::new(),
        }))
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
            .map_err(|e| PromoError::Storage(LedgerError(e.to_string())))?
    }

    /// Waits for the blocking work in flight; called at shutdown, after
    /// which the last handle can let go of the database.
    pub async fn close(&self) {
        self.blocking.close();
        self.blocking.wait().await;
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
        self.ledger.write(&Batch {
            campaigns: vec![CampaignRecord {
                campaign: c.clone(),
                impressions: 0,
                clicks: 0,
                reach: 0,
            }],
            ..Batch::default()
        })?;
        let live = Arc::new(CampaignLive {
            id: c.id.clone(),
            spec: RwLock::new(c.clone()),
            impressions: AtomicU64::new(0),
            reserved: AtomicU64::new(0),
            clicks: AtomicU64::new(0),
            reach: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
        });
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
        self.ledger.write(&Batch {
            campaigns: vec![CampaignRecord {
                campaign: next.clone(),
                impressions: live.impressions.load(Ordering::SeqCst),
                clicks: live.clicks.load(Ordering::SeqCst),
                reach: live.reach.load(Ordering::SeqCst),
            }],
            ..Batch::default()
        })?;
        *live.spec.write().unwrap_or_else(|p| p.into_inner()) = next.clone();
        Ok(next)
    }

    /// A campaign, its derived state and its numbers.
    pub fn get(&self, id: &str) -> Option<(Campaign, State, CampaignStats)> {
        let live = self.campaign(id)?;
        let spec = live.spec();
        let impressions = live.impressions.load(Ordering::Relaxed);
        let stats = CampaignStats {
            impressions,
            clicks: live.clicks.load(Ordering::Relaxed),
            spend_micros: spec.spend_micros(impressions),
            reach: live.reach.load(Ordering::Relaxed),
            reserved: live.reserved.load(Ordering::Relaxed),
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
                c.impressions.load(Ordering::Relaxed),
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
            .or_insert_with(|| {
                Arc::new(ChannelLive {
                    settings: RwLock::new(ChannelSlot::default()),
                    impressions: AtomicU64::new(0),
                    dirty: AtomicBool::new(false),
                })
            })
            .clone();
        *c.settings.write().unwrap_or_else(|p| p.into_inner()) = s;
        c.dirty.store(true, Ordering::Release);
        self.flush()?;
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
        // (campaign, bid, created, allowance) of the best so far; specs are
        // read in place, not cloned.
        let mut best: Option<(Arc<CampaignLive>, u64, i64, u64)> = None;
        for live in self
            .campaigns
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
        {
            let spec = live.spec.read().unwrap_or_else(|p| p.into_inner());
            if spec.status != State::Active
                || now < spec.start_ms
                || now >= spec.end_ms
                || !spec.targeting.matches(channel.as_str(), followers)
            {
                continue;
            }
            let limit = spec.paced_allowance(now).min(spec.budget_impressions);
            // Reservation first, then impressions: a confirm moves one from
            // the first to the second in the opposite order, so the sum read
            // is never too low.
            let reserved = live.reserved.load(Ordering::SeqCst);
            if live.impressions.load(Ordering::SeqCst) + reserved >= limit {
                continue;
            }
            let better = match &best {
                None => true,
                Some((_, bid, created, _)) => {
                    (spec.cpm_bid_micros, std::cmp::Reverse(spec.created_at_ms))
                        > (*bid, std::cmp::Reverse(*created))
                }
            };
            if better {
                best = Some((live.clone(), spec.cpm_bid_micros, spec.created_at_ms, limit));
            }
        }
        let (live, _, _, limit) = best?;
        // Reserve without a lock: the compare-and-swap fails if another
        // placement or a confirm changed the reservation meanwhile.
        let n = loop {
            let reserved = live.reserved.load(Ordering::SeqCst);
            let used = live.impressions.load(Ordering::SeqCst) + reserved;
            if used >= limit {
                return None;
            }
            let n = want.min(limit - used);
            if n == 0 {
                return None;
            }
            if live
                .reserved
                .compare_exchange(reserved, reserved + n, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                break n;
            }
        };
        let spec = live.spec();
        let frame = encode_frame(&pb::FeedFrame {
            kind: Some(pb::feed_frame::Kind::Promoted(pb::Promoted {
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
            })),
        });
        Some(Arc::new(FeedEvent {
            channel: channel.clone(),
            seq: after_seq,
            kind: EventKind::Promoted,
            frame,
            slot: Some(Arc::new(Slot {
                promo: self.clone(),
                campaign: live,
                cap: spec.frequency_cap,
                channel: channel.clone(),
                remaining: AtomicU64::new(n),
            })),
        }))
    }

    // ------------------------------------------------------------ delivery

    /// Claims one impression of `slot` for `follower`, if the frequency cap
    /// and the reservation allow.
    pub fn claim(self: &Arc<Self>, slot: &Slot, follower: &str) -> Option<Claim> {
        let cap = slot.cap;
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
        })
    }

    /// Counts a claim whose frame was written (once: a confirmed claim is
    /// not released when dropped).
    pub fn confirm(&self, c: &mut Claim) {
        if c.confirmed {
            return;
        }
        c.confirmed = true;
        let live = &c.campaign;
        // Impressions first, then the reservation: `place` reads them in
        // the opposite order, so it never sees their sum too low.
        live.impressions.fetch_add(1, Ordering::SeqCst);
        live.reserved.fetch_sub(1, Ordering::SeqCst);
        live.dirty.store(true, Ordering::Release);
        let key = (live.id.clone(), c.follower.clone());
        let mut newly_dirty = false;
        if let Some(mut e) = self.caps.get_mut(&key) {
            e.ever += 1;
            if e.ever == 1 {
                live.reach.fetch_add(1, Ordering::Relaxed);
            }
            newly_dirty = !e.dirty;
            e.dirty = true;
        }
        if newly_dirty {
            self.mark_cap(key);
        }
        if let Some(ch) = self.channels.get(c.channel.as_str()) {
            ch.impressions.fetch_add(1, Ordering::Relaxed);
            ch.dirty.store(true, Ordering::Release);
        }
    }

    /// Lists a changed cap entry for the next flush (its shard only).
    fn mark_cap(&self, key: CapKey) {
        let shard = (self.hasher.hash_one(&key.1) % self.dirty_caps.len() as u64) as usize;
        lock(&self.dirty_caps[shard]).push(key);
    }

    /// Undoes an unconfirmed claim (from `Claim::drop`).
    fn release(&self, c: &Claim) {
        c.campaign.reserved.fetch_sub(1, Ordering::SeqCst);
        let key = (c.campaign.id.clone(), c.follower.clone());
        if let Some(mut e) = self.caps.get_mut(&key) {
            if let Some(i) = e.times.iter().rposition(|t| *t == c.at_ms) {
                e.times.remove(i);
            }
        }
        self.caps
            .remove_if(&key, |_, e| e.ever == 0 && e.times.is_empty());
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
        live.dirty.store(true, Ordering::Release);
        lock(&self.dirty_clicks).push(key);
        Ok(true)
    }

    // ------------------------------------------------------------ durability

    /// Writes everything changed since the last flush, in one transaction.
    pub fn flush(&self) -> Result<(), PromoError> {
        let _one_at_a_time = lock(&self.flushing);
        let mut batch = Batch::default();
        // Each mark is taken (cleared) as its record is read: a change made
        // after that marks it again for the next flush.
        let campaigns: Vec<Arc<CampaignLive>> = self
            .campaigns
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|c| c.dirty.swap(false, Ordering::AcqRel))
            .cloned()
            .collect();
        for live in &campaigns {
            batch.campaigns.push(CampaignRecord {
                campaign: live.spec(),
                impressions: live.impressions.load(Ordering::Relaxed),
                clicks: live.clicks.load(Ordering::Relaxed),
                reach: live.reach.load(Ordering::Relaxed),
            });
        }
        let mut channels = Vec::new();
        for entry in self.channels.iter() {
            let c = entry.value();
            if c.dirty.swap(false, Ordering::AcqRel) {
                let s = *c.settings.read().unwrap_or_else(|p| p.into_inner());
                batch.channels.push((
                    entry.key().clone(),
                    ChannelRecord {
                        opt_in: s.opt_in,
                        every_posts: s.every_posts,
                        impressions: c.impressions.load(Ordering::Relaxed),
                    },
                ));
                channels.push(c.clone());
            }
        }
        let mut keys = Vec::new();
        for shard in self.dirty_caps.iter() {
            keys.append(&mut lock(shard));
        }
        for key in &keys {
            if let Some(mut e) = self.caps.get_mut(key) {
                e.dirty = false;
                batch.caps.push((
                    key.clone(),
                    CapRecord {
                        times: e.times.iter().copied().collect(),
                        ever: e.ever,
                    },
                ));
            }
        }
        batch.clicks = std::mem::take(&mut *lock(&self.dirty_clicks));
        if batch.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.ledger.write(&batch) {
            // Mark again what was not written, for the next flush.
            for c in campaigns {
                c.dirty.store(true, Ordering::Release);
            }
            for c in channels {
                c.dirty.store(true, Ordering::Release);
            }
            for key in keys {
                let relist = match self.caps.get_mut(&key) {
                    Some(mut e) if !e.dirty => {
                        e.dirty = true;
                        true
                    }
                    _ => false,
                };
                if relist {
                    self.mark_cap(key);
                }
            }
            lock(&self.dirty_clicks).extend(batch.clicks);
            return Err(e.into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
