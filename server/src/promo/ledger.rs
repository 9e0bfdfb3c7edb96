//! Durable promo state in its own redb file (`promo.redb`): campaigns with
//! their totals, channel slot settings with promoted impressions shown,
//! per-follower frequency-cap entries and clicks, and the promoted frames
//! written to followers whose receipt has not arrived yet. Totals are written as
//! absolute values taken from memory, never as increments, so a flush that
//! is retried or replayed cannot count anything twice; a crash loses at most
//! what happened since the last flush.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::campaign::Campaign;
use crate::datadir::{Db, DbSpec, DbUnavailable, Health, OpenError};

/// File name inside the data directory.
pub const PROMO_FILE: &str = "promo.redb";

/// redb's page cache for `promo.redb`, in bytes.
pub const PROMO_CACHE_BYTES: usize = 16 * 1024 * 1024;

/// The promo ledger's database file.
pub const PROMO_SPEC: DbSpec = DbSpec {
    file: PROMO_FILE,
    holds: "the promo ledger (campaigns and their counts, channel slots, frequency caps, clicks)",
    cache_bytes: PROMO_CACHE_BYTES,
    check_on_open: true,
};

const CAMPAIGNS: TableDefinition<&str, &str> = TableDefinition::new("campaigns");
const CHANNELS: TableDefinition<&str, &str> = TableDefinition::new("channel_promo");
const CAPS: TableDefinition<(&str, &str), &str> = TableDefinition::new("caps");
const CLICKS: TableDefinition<(&str, &str), u8> = TableDefinition::new("clicks");
const RECEIPTS: TableDefinition<u64, &str> = TableDefinition::new("receipts");

/// Promo storage failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// A write failed, or a stored record is unreadable.
    #[error("promo storage: {0}")]
    Storage(String),
    /// `promo.redb` cannot take writes right now; it is reopened once it can.
    #[error("promo storage unavailable: {0}")]
    Unavailable(String),
}

fn err(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Storage(e.to_string())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CampaignRecord {
    pub campaign: Campaign,
    pub impressions: u64,
    pub clicks: u64,
    pub reach: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChannelRecord {
    pub opt_in: bool,
    pub every_posts: u32,
    pub impressions: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CapRecord {
    /// Confirmed impression times (ms) within the cap period.
    pub times: Vec<i64>,
    /// Impressions ever confirmed for this follower.
    pub ever: u64,
}

/// A promoted frame written to a follower whose client confirms receipt,
/// not confirmed yet (see `promo::receipts`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ReceiptRecord {
    pub campaign: String,
    pub channel: String,
    pub follower: String,
    /// When the impression was claimed (its frequency-cap time), Unix ms.
    pub at_ms: i64,
}

/// Everything loaded at start.
#[derive(Default)]
pub struct Loaded {
    pub campaigns: Vec<CampaignRecord>,
    pub channels: Vec<(String, ChannelRecord)>,
    pub caps: Vec<((String, String), CapRecord)>,
    pub clicks: Vec<(String, String)>,
    pub receipts: Vec<(u64, ReceiptRecord)>,
}

/// What one flush writes.
#[derive(Default)]
pub struct Batch {
    pub campaigns: Vec<CampaignRecord>,
    pub channels: Vec<(String, ChannelRecord)>,
    pub caps: Vec<((String, String), CapRecord)>,
    /// Frequency-cap entries that no longer exist (a claim taken back).
    pub removed_caps: Vec<(String, String)>,
    pub clicks: Vec<(String, String)>,
    /// Campaigns whose per-follower entries (caps and clicks) are removed.
    pub pruned: Vec<String>,
    /// Impressions awaiting their receipt.
    pub receipts: Vec<(u64, ReceiptRecord)>,
    /// Receipts that arrived, expired, or whose frame was not written.
    pub removed_receipts: Vec<u64>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.campaigns.is_empty()
            && self.channels.is_empty()
            && self.caps.is_empty()
            && self.removed_caps.is_empty()
            && self.clicks.is_empty()
            && self.pruned.is_empty()
            && self.receipts.is_empty()
            && self.removed_receipts.is_empty()
    }
}

pub struct Ledger {
    db: Arc<Db>,
}

impl Ledger {
    /// Opens (or creates) `promo.redb` in `data_dir` and loads everything.
    pub fn open(data_dir: &Path) -> Result<(Ledger, Loaded), OpenError> {
        let db = Arc::new(Db::open(data_dir, PROMO_SPEC)?);
        let damaged = |e: LedgerError| OpenError::damaged(data_dir, &PROMO_SPEC, e);
        let handle = db.get().map_err(|e| damaged(err(e)))?;
        create_tables(&handle).map_err(damaged)?;
        let loaded = load(&handle).map_err(damaged)?;
        drop(handle);
        Ok((Ledger { db }, loaded))
    }

    /// Whether `promo.redb` can take writes now.
    pub fn health(&self) -> Health {
        self.db.health()
    }

    /// Tries to reopen the database if a write failed.
    pub fn recover(&self) {
        let _ = self.db.for_write();
    }

    /// Lets go of the database (at shutdown).
    pub fn close(&self) {
        self.db.close();
    }

    /// Writes `batch` in one durable transaction.
    pub fn write(&self, batch: &Batch) -> Result<(), LedgerError> {
        let db = self.db.for_write().map_err(|e| match e {
            DbUnavailable::Failed(why) => LedgerError::Unavailable(why),
            closed => err(closed),
        })?;
        write_batch(&db, batch).map_err(|e| {
            // redb refuses every write after a failed one until reopened.
            self.db.failed(&e);
            LedgerError::Unavailable(format!("promo.redb cannot take writes: {e}"))
        })
    }
}

fn create_tables(db: &Database) -> Result<(), LedgerError> {
    let txn = db.begin_write().map_err(err)?;
    txn.open_table(CAMPAIGNS).map_err(err)?;
    txn.open_table(CHANNELS).map_err(err)?;
    txn.open_table(CAPS).map_err(err)?;
    txn.open_table(CLICKS).map_err(err)?;
    txn.open_table(RECEIPTS).map_err(err)?;
    txn.commit().map_err(err)
}

/// Everything in the ledger (each record is checked as it is decoded).
pub fn load(db: &Database) -> Result<Loaded, LedgerError> {
    let mut loaded = Loaded::default();
    let read = db.begin_read().map_err(err)?;
    for e in read
        .open_table(CAMPAIGNS)
        .map_err(err)?
        .iter()
        .map_err(err)?
    {
        let (k, v) = e.map_err(err)?;
        loaded.campaigns.push(
            serde_json::from_str(v.value())
                .map_err(|e| err(format!("campaign {:?}: {e}", k.value())))?,
        );
    }
    for e in read
        .open_table(CHANNELS)
        .map_err(err)?
        .iter()
        .map_err(err)?
    {
        let (k, v) = e.map_err(err)?;
        loaded.channels.push((
            k.value().to_string(),
            serde_json::from_str(v.value())
                .map_err(|e| err(format!("channel slot {:?}: {e}", k.value())))?,
        ));
    }
    for e in read.open_table(CAPS).map_err(err)?.iter().map_err(err)? {
        let (k, v) = e.map_err(err)?;
        let (c, f) = k.value();
        loaded.caps.push((
            (c.to_string(), f.to_string()),
            serde_json::from_str(v.value())
                .map_err(|e| err(format!("frequency cap ({c:?}, {f:?}): {e}")))?,
        ));
    }
    for e in read.open_table(CLICKS).map_err(err)?.iter().map_err(err)? {
        let (k, _) = e.map_err(err)?;
        let (c, f) = k.value();
        loaded.clicks.push((c.to_string(), f.to_string()));
    }
    for e in read
        .open_table(RECEIPTS)
        .map_err(err)?
        .iter()
        .map_err(err)?
    {
        let (k, v) = e.map_err(err)?;
        loaded.receipts.push((
            k.value(),
            serde_json::from_str(v.value())
                .map_err(|e| err(format!("receipt {}: {e}", k.value())))?,
        ));
    }
    Ok(loaded)
}

/// Reads every record of `promo.redb` and reports what is damaged
/// (`herald check`).
pub fn verify(db: &crate::datadir::CheckedDb) -> Result<crate::datadir::FileReport, LedgerError> {
    let mut report = crate::datadir::FileReport {
        file: PROMO_FILE.to_string(),
        ..Default::default()
    };
    let read = db.begin_read().map_err(err)?;
    let mut n = [0u64; 5];
    for e in read
        .open_table(CAMPAIGNS)
        .map_err(err)?
        .iter()
        .map_err(err)?
    {
        report.records += 1;
        n[0] += 1;
        match e {
            Ok((k, v)) => {
                if serde_json::from_str::<CampaignRecord>(v.value()).is_err() {
                    report.note_damage(format!("campaign {:?} is damaged", k.value()));
                }
            }
            Err(e) => report.note_damage(format!("the campaigns table cannot be read on: {e}")),
        }
    }
    for e in read
        .open_table(CHANNELS)
        .map_err(err)?
        .iter()
        .map_err(err)?
    {
        report.records += 1;
        n[1] += 1;
        match e {
            Ok((k, v)) => {
                if serde_json::from_str::<ChannelRecord>(v.value()).is_err() {
                    report.note_damage(format!("channel slot {:?} is damaged", k.value()));
                }
            }
            Err(e) => report.note_damage(format!("the channel slots table cannot be read on: {e}")),
        }
    }
    for e in read.open_table(CAPS).map_err(err)?.iter().map_err(err)? {
        report.records += 1;
        n[2] += 1;
        match e {
            Ok((k, v)) => {
                if serde_json::from_str::<CapRecord>(v.value()).is_err() {
                    let (c, f) = k.value();
                    report.note_damage(format!("frequency cap ({c:?}, {f:?}) is damaged"));
                }
            }
            Err(e) => {
                report.note_damage(format!("the frequency caps table cannot be read on: {e}"))
            }
        }
    }
    for e in read.open_table(CLICKS).map_err(err)?.iter().map_err(err)? {
        report.records += 1;
        n[3] += 1;
        if let Err(e) = e {
            report.note_damage(format!("the clicks table cannot be read on: {e}"));
        }
    }
    // Older files have no receipts table yet: nothing awaits a receipt.
    let receipts = match read.open_table(RECEIPTS) {
        Ok(t) => Some(t),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(err(e)),
    };
    let rows = match &receipts {
        Some(t) => Some(t.iter().map_err(err)?),
        None => None,
    };
    for e in rows.into_iter().flatten() {
        report.records += 1;
        n[4] += 1;
        match e {
            Ok((k, v)) => {
                if serde_json::from_str::<ReceiptRecord>(v.value()).is_err() {
                    report.note_damage(format!("receipt {} is damaged", k.value()));
                }
            }
            Err(e) => report.note_damage(format!("the receipts table cannot be read on: {e}")),
        }
    }
    report.summary = format!(
        "{} campaigns, {} channel slots, {} frequency caps, {} clicks, {} impressions awaiting receipt",
        n[0], n[1], n[2], n[3], n[4]
    );
    Ok(report)
}

/// Removes every frequency-cap entry or click of campaign `c` from `t`.
fn remove_campaign_keys<V: redb::Value + 'static>(
    t: &mut redb::Table<'_, (&'static str, &'static str), V>,
    c: &str,
) -> Result<(), LedgerError> {
    let mut gone = Vec::new();
    for e in t.range((c, "")..).map_err(err)? {
        let (k, _) = e.map_err(err)?;
        let (kc, f) = k.value();
        if kc != c {
            break;
        }
        gone.push(f.to_string());
    }
    for f in gone {
        t.remove((c, f.as_str())).map_err(err)?;
    }
    Ok(())
}

/// Writes `batch` in one durable transaction.
fn write_batch(db: &Database, batch: &Batch) -> Result<(), LedgerError> {
    let txn = db.begin_write().map_err(err)?;
    {
        let mut t = txn.open_table(CAMPAIGNS).map_err(err)?;
        for r in &batch.campaigns {
            let v = serde_json::to_string(r).map_err(err)?;
            t.insert(r.campaign.id.as_str(), v.as_str()).map_err(err)?;
        }
        let mut t = txn.open_table(CHANNELS).map_err(err)?;
        for (k, r) in &batch.channels {
            let v = serde_json::to_string(r).map_err(err)?;
            t.insert(k.as_str(), v.as_str()).map_err(err)?;
        }
        let mut caps = txn.open_table(CAPS).map_err(err)?;
        for ((c, f), r) in &batch.caps {
            let v = serde_json::to_string(r).map_err(err)?;
            caps.insert((c.as_str(), f.as_str()), v.as_str())
                .map_err(err)?;
        }
        for (c, f) in &batch.removed_caps {
            caps.remove((c.as_str(), f.as_str())).map_err(err)?;
        }
        let mut clicks = txn.open_table(CLICKS).map_err(err)?;
        for (c, f) in &batch.clicks {
            clicks.insert((c.as_str(), f.as_str()), 1u8).map_err(err)?;
        }
        for c in &batch.pruned {
            remove_campaign_keys(&mut caps, c)?;
            remove_campaign_keys(&mut clicks, c)?;
        }
        let mut receipts = txn.open_table(RECEIPTS).map_err(err)?;
        for (id, r) in &batch.receipts {
            let v = serde_json::to_string(r).map_err(err)?;
            receipts.insert(*id, v.as_str()).map_err(err)?;
        }
        for id in &batch.removed_receipts {
            receipts.remove(*id).map_err(err)?;
        }
    }
    txn.commit().map_err(err)
}
