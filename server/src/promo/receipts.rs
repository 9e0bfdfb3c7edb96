//! Receipts: exact impressions across a crash.
//!
//! Counting an impression before its frame is written (the default, see the
//! module docs of [`super`]) leaves one window: a crash after the count is
//! durable and before the frame leaves the process counts an impression the
//! follower never got. A client that says `receipts` in Hello closes it: its
//! promoted frames carry a receipt (a number unique to this server), and
//! writing the frame records the impression as *awaiting its receipt*,
//! durably, before the frame goes out (the reservation stays held, so the
//! budget is never overspent). The client confirms what it received with
//! Seen, on whatever connection it has then, again after a reconnect until
//! the server answered; the server counts those impressions, makes the count
//! durable, and only then answers. An impression whose receipt does not
//! arrive within the receipt window ([`Promo::set_receipt_window`], default
//! [`DEFAULT_RECEIPT_WINDOW`]) is not counted: its reservation and
//! frequency-cap time go back to the campaign.
//!
//! So after a kill -9 and a restart, once the followers are back (and the
//! window has passed for frames that never left), a campaign's impressions
//! equal the promoted frames its followers received. Records awaiting a
//! receipt live in `promo.redb` and are loaded at start; their window starts
//! again then, so followers have time to come back. Memory: one entry per
//! impression awaiting receipt, within the campaigns' reservations (so within
//! their budgets), each for at most the window.
//!
//! Cluster mode does not use receipts yet (a follower may confirm on another
//! node than the one that wrote the frame): there, impressions are counted
//! when written, as for clients without receipts.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;

use super::ledger::ReceiptRecord;
use super::{lock, CampaignLive, Claim, Promo};
use crate::model::{now_ms, ChannelId};

/// How long a promoted frame waits for its receipt by default: long enough
/// for a follower to reconnect after a server restart and confirm it.
pub const DEFAULT_RECEIPT_WINDOW: Duration = Duration::from_secs(120);

/// An impression written to a follower, awaiting its receipt.
pub(super) struct Awaiting {
    pub campaign: Arc<CampaignLive>,
    pub channel: ChannelId,
    pub follower: String,
    /// When it was claimed (its frequency-cap time), Unix ms.
    pub at_ms: i64,
}

impl Awaiting {
    fn record(&self) -> ReceiptRecord {
        ReceiptRecord {
            campaign: self.campaign.id.clone(),
            channel: self.channel.to_string(),
            follower: self.follower.clone(),
            at_ms: self.at_ms,
        }
    }
}

/// The impressions awaiting their receipt, and when each stops waiting.
pub(super) struct Receipts {
    pub awaiting: DashMap<u64, Awaiting>,
    /// (deadline in Unix ms, receipt), in deadline order.
    deadlines: Mutex<VecDeque<(i64, u64)>>,
    next: AtomicU64,
    window_ms: AtomicI64,
}

impl Receipts {
    /// Receipts numbered from the clock in microseconds (so a restarted
    /// server does not reuse the numbers of an earlier run, unless it handed
    /// out more than a million a second), above every loaded one.
    pub fn new(loaded_max: u64) -> Receipts {
        let start = (now_ms().max(0) as u64).saturating_mul(1000);
        Receipts {
            awaiting: DashMap::new(),
            deadlines: Mutex::new(VecDeque::new()),
            next: AtomicU64::new(start.max(loaded_max.saturating_add(1)).max(1)),
            window_ms: AtomicI64::new(DEFAULT_RECEIPT_WINDOW.as_millis() as i64),
        }
    }

    pub fn next_id(&self) -> u64 {
        self.next.fetch_add(1, Ordering::Relaxed)
    }

    fn wait_for(&self, id: u64, a: Awaiting) {
        let deadline = now_ms().saturating_add(self.window_ms.load(Ordering::Relaxed));
        a.campaign.awaiting_receipt.fetch_add(1, Ordering::SeqCst);
        self.awaiting.insert(id, a);
        lock(&self.deadlines).push_back((deadline, id));
    }
}

impl Promo {
    /// How long a written promoted frame waits for its receipt before it is
    /// not counted (for impressions recorded from now on, and for those
    /// loaded at start if called before any expiry pass).
    pub fn set_receipt_window(&self, window: Duration) {
        let ms = window.as_millis().min(i64::MAX as u128) as i64;
        self.receipts.window_ms.store(ms, Ordering::Relaxed);
        let deadline = now_ms().saturating_add(ms);
        for d in lock(&self.receipts.deadlines).iter_mut() {
            d.0 = d.0.min(deadline);
        }
    }

    /// Loads the impressions that awaited their receipt when the server
    /// stopped; their window starts now.
    pub(super) fn load_receipts(&self, loaded: Vec<(u64, ReceiptRecord)>) {
        let mut dirty = lock(&self.dirty);
        for (id, r) in loaded {
            let (Some(campaign), Ok(channel)) =
                (self.campaign(&r.campaign), ChannelId::parse(&r.channel))
            else {
                // Its campaign is gone: nothing to count it against.
                dirty.receipts.insert(id);
                continue;
            };
            campaign.reserved.fetch_add(1, Ordering::SeqCst);
            self.receipts.wait_for(
                id,
                Awaiting {
                    campaign,
                    channel,
                    follower: r.follower,
                    at_ms: r.at_ms,
                },
            );
        }
    }

    /// The frame of `claim` was about to be written to a follower with
    /// receipts: it now awaits its receipt (still reserved, not counted).
    pub(super) fn await_receipt(&self, c: &mut Claim) {
        let mut dirty = lock(&self.dirty);
        c.confirmed = true;
        self.receipts.wait_for(
            c.receipt,
            Awaiting {
                campaign: c.campaign.clone(),
                channel: c.channel.clone(),
                follower: c.follower.clone(),
                at_ms: c.at_ms,
            },
        );
        dirty.receipts.insert(c.receipt);
        dirty
            .caps
            .insert((c.campaign.id.clone(), c.follower.clone()));
    }

    /// The frame of `claim` could not be written after all: it awaits
    /// nothing (and is released when the claim is dropped).
    pub(super) fn forget_receipt(&self, c: &mut Claim) {
        let mut dirty = lock(&self.dirty);
        c.confirmed = false;
        if let Some((_, a)) = self.receipts.awaiting.remove(&c.receipt) {
            a.campaign.awaiting_receipt.fetch_sub(1, Ordering::SeqCst);
        }
        dirty.receipts.insert(c.receipt);
    }

    /// The follower's client received the promoted frames with these
    /// receipts: counts each one still awaited from this follower. Returns
    /// how many were counted; [`Promo::durable`] makes them durable.
    pub fn settle(&self, follower: &str, receipts: &[u64]) -> usize {
        let mut counted = 0;
        let mut dirty = lock(&self.dirty);
        for id in receipts {
            let Some((_, a)) = self
                .receipts
                .awaiting
                .remove_if(id, |_, a| a.follower == follower)
            else {
                continue;
            };
            a.campaign.awaiting_receipt.fetch_sub(1, Ordering::SeqCst);
            self.count_impression(&a.campaign, &a.channel, &a.follower, &mut dirty);
            dirty.receipts.insert(*id);
            counted += 1;
        }
        counted
    }

    /// Gives up on every impression whose receipt is overdue at `now_ms`:
    /// not counted, its reservation and frequency-cap time given back.
    /// Returns how many.
    pub fn expire_receipts(&self, now_ms: i64) -> usize {
        let mut overdue = Vec::new();
        {
            let mut deadlines = lock(&self.receipts.deadlines);
            while deadlines.front().is_some_and(|(d, _)| *d <= now_ms) {
                if let Some((_, id)) = deadlines.pop_front() {
                    overdue.push(id);
                }
            }
        }
        let mut expired = 0;
        for id in overdue {
            let Some((_, a)) = self.receipts.awaiting.remove(&id) else {
                continue;
            };
            a.campaign.awaiting_receipt.fetch_sub(1, Ordering::SeqCst);
            self.unreserve(&a.campaign, &a.follower, a.at_ms);
            let mut dirty = lock(&self.dirty);
            dirty.receipts.insert(id);
            dirty
                .caps
                .insert((a.campaign.id.clone(), a.follower.clone()));
            expired += 1;
        }
        expired
    }

    /// Impressions awaiting their receipt, over every campaign.
    pub fn awaiting_receipts(&self) -> usize {
        self.receipts.awaiting.len()
    }

    /// What a flush writes for receipt `id`: its record while it awaits,
    /// `None` once it is gone.
    pub(super) fn receipt_record(&self, id: u64) -> Option<ReceiptRecord> {
        self.receipts.awaiting.get(&id).map(|a| a.record())
    }
}
