//! The embedded tenancy store: `brands.redb` in the data directory, every
//! record also cached in memory. Each write commits durably on its own, on
//! tokio's blocking pool (tracked, so shutdown can wait for it).

use std::path::Path;
use std::sync::Arc;

use dashmap::DashMap;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio_util::task::TaskTracker;

use super::{
    generate_key, hash_key, storage, Brand, ChannelMeta, Grant, KeyRecord, KeyRefused, MetaChange,
    TenancyError, TenancyFuture, TenancyStore,
};
use crate::datadir::{Db, DbSpec, DbUnavailable, Health, OpenError};
use crate::model::now_ms;

/// File name of the tenancy database inside the data directory.
pub const TENANCY_FILE: &str = "brands.redb";

/// redb's page cache for `brands.redb`, in bytes.
pub const TENANCY_CACHE_BYTES: usize = 8 * 1024 * 1024;

/// The tenancy database file.
pub const TENANCY_SPEC: DbSpec = DbSpec {
    file: TENANCY_FILE,
    holds: "the brands database (every brand, API key and channel owner)",
    cache_bytes: TENANCY_CACHE_BYTES,
    check_on_open: true,
};

const BRANDS: TableDefinition<&str, &[u8]> = TableDefinition::new("brands");
const KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("keys");
const CHANNEL_META: TableDefinition<&str, &[u8]> = TableDefinition::new("channel_meta");

/// The embedded tenancy store. See the module docs.
pub struct Tenancy {
    db: Db,
    /// Blocking work in flight ([`Tenancy::run`]).
    blocking: TaskTracker,
    brands: DashMap<String, Brand>,
    keys: DashMap<String, Arc<KeyRecord>>,
    meta: DashMap<String, ChannelMeta>,
    /// A handle on itself, so the [`TenancyStore`] methods (which get
    /// `&self`) can move work onto the blocking pool.
    me: std::sync::OnceLock<std::sync::Weak<Tenancy>>,
}

fn load<T: DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
    mut put: impl FnMut(String, T),
) -> Result<(), TenancyError> {
    let txn = db.begin_read().map_err(storage)?;
    let t = txn.open_table(table).map_err(storage)?;
    for entry in t.iter().map_err(storage)? {
        let (k, v) = entry.map_err(storage)?;
        let value = serde_json::from_slice(v.value())
            .map_err(|e| TenancyError::Storage(format!("corrupt record {:?}: {e}", k.value())))?;
        put(k.value().to_string(), value);
    }
    Ok(())
}

/// Reads every record of `brands.redb` and reports what is damaged
/// (`herald check`).
pub fn verify(db: &crate::datadir::CheckedDb) -> Result<crate::datadir::FileReport, TenancyError> {
    let mut report = crate::datadir::FileReport {
        file: TENANCY_FILE.to_string(),
        ..Default::default()
    };
    let txn = db.begin_read().map_err(storage)?;
    let mut counts = Vec::new();
    for (name, table) in [
        ("brands", BRANDS),
        ("keys", KEYS),
        ("channel owners", CHANNEL_META),
    ] {
        let t = txn.open_table(table).map_err(storage)?;
        let mut n = 0u64;
        for entry in t.iter().map_err(storage)? {
            report.records += 1;
            match entry {
                Ok((k, v)) => {
                    n += 1;
                    let ok = match table.name() {
                        "brands" => serde_json::from_slice::<Brand>(v.value()).is_ok(),
                        "keys" => serde_json::from_slice::<KeyRecord>(v.value()).is_ok(),
                        _ => serde_json::from_slice::<ChannelMeta>(v.value()).is_ok(),
                    };
                    if !ok {
                        report.note_damage(format!("{name} record {:?} is damaged", k.value()));
                    }
                }
                Err(e) => {
                    report.note_damage(format!("the {name} table cannot be read on: {e}"));
                    break;
                }
            }
        }
        counts.push(format!("{n} {name}"));
    }
    report.summary = counts.join(", ");
    Ok(report)
}

impl Tenancy {
    /// Opens (or creates) the tenancy database in `data_dir`. A missing,
    /// empty or damaged file of an existing data directory is an
    /// [`OpenError`] naming it.
    pub fn open(data_dir: &Path) -> Result<Arc<Tenancy>, OpenError> {
        let db = Db::open(data_dir, TENANCY_SPEC)?;
        let damaged = |e: TenancyError| OpenError::damaged(data_dir, &TENANCY_SPEC, e);
        let t = Tenancy {
            db,
            blocking: TaskTracker::new(),
            brands: DashMap::new(),
            keys: DashMap::new(),
            meta: DashMap::new(),
            me: std::sync::OnceLock::new(),
        };
        {
            let handle = t.db.get().map_err(|e| damaged(storage(e)))?;
            let txn = handle.begin_write().map_err(|e| damaged(storage(e)))?;
            for table in [BRANDS, KEYS, CHANNEL_META] {
                txn.open_table(table).map_err(|e| damaged(storage(e)))?;
            }
            txn.commit().map_err(|e| damaged(storage(e)))?;
            load(&handle, BRANDS, |k, v| {
                t.brands.insert(k, v);
            })
            .map_err(damaged)?;
            load(&handle, KEYS, |k, v| {
                t.keys.insert(k, Arc::new(v));
            })
            .map_err(damaged)?;
            load(&handle, CHANNEL_META, |k, v| {
                t.meta.insert(k, v);
            })
            .map_err(damaged)?;
        }
        let t = Arc::new(t);
        let _ = t.me.set(Arc::downgrade(&t));
        Ok(t)
    }

    /// Whether `brands.redb` can take writes now.
    pub fn health(&self) -> Health {
        self.db.health()
    }

    /// Tries to reopen `brands.redb` if a write failed (blocking).
    pub fn recover(&self) {
        let _ = self.db.for_write();
    }

    /// The database for one write transaction; a failed commit marks it for
    /// reopening ([`crate::datadir`]).
    fn write<T>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, TenancyError>,
    ) -> Result<T, TenancyError> {
        let db = self.db.for_write().map_err(|e| match e {
            DbUnavailable::Failed(why) => TenancyError::Unavailable(why),
            closed => storage(closed),
        })?;
        // A write that fails in the engine stored nothing and leaves the
        // file refusing writes until it is reopened: unavailable, not an
        // internal error.
        let engine = |e: &dyn std::fmt::Display| {
            self.db.failed(e);
            TenancyError::Unavailable(format!("brands.redb cannot take writes: {e}"))
        };
        let txn = db.begin_write().map_err(|e| engine(&e))?;
        let out = f(&txn)?;
        txn.commit().map_err(|e| engine(&e))?;
        Ok(out)
    }

    /// [`Tenancy::run`] from `&self`.
    async fn run_here<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Tenancy) -> Result<T, TenancyError> + Send + 'static,
    ) -> Result<T, TenancyError> {
        let me = self
            .me
            .get()
            .and_then(std::sync::Weak::upgrade)
            .ok_or_else(|| TenancyError::Storage("the tenancy store is closed".into()))?;
        me.run(f).await
    }

    /// Runs `f` on the blocking pool (every write commits with an fsync).
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Tenancy) -> Result<T, TenancyError> + Send + 'static,
    ) -> Result<T, TenancyError> {
        let me = self.clone();
        self.blocking
            .spawn_blocking(move || f(&me))
            .await
            .map_err(storage)?
    }

    /// Waits for the blocking work in flight; called at shutdown, after
    /// which the last handle can let go of the database.
    pub async fn close_blocking(&self) {
        self.blocking.close();
        self.blocking.wait().await;
        self.db.close();
    }

    /// Writes one record in its own durable transaction.
    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
        must_be_new: impl FnOnce() -> TenancyError,
    ) -> Result<(), TenancyError> {
        let bytes = serde_json::to_vec(value).map_err(storage)?;
        self.write(|txn| {
            let mut t = txn.open_table(table).map_err(storage)?;
            if t.insert(key, bytes.as_slice()).map_err(storage)?.is_some() {
                // Dropping the transaction aborts it.
                return Err(must_be_new());
            }
            Ok(())
        })
    }

    fn overwrite<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), TenancyError> {
        let bytes = serde_json::to_vec(value).map_err(storage)?;
        self.write(|txn| {
            let mut t = txn.open_table(table).map_err(storage)?;
            t.insert(key, bytes.as_slice()).map_err(storage)?;
            Ok(())
        })
    }

    /// Creates a brand.
    pub fn create_brand(&self, id: &str, name: &str) -> Result<Brand, TenancyError> {
        let brand = Brand {
            id: id.to_string(),
            name: name.to_string(),
            created_at_ms: now_ms(),
        };
        self.put(BRANDS, id, &brand, || TenancyError::BrandExists(id.into()))?;
        self.brands.insert(id.to_string(), brand.clone());
        Ok(brand)
    }

    /// A brand by id.
    pub fn brand(&self, id: &str) -> Option<Brand> {
        self.brands.get(id).map(|b| b.clone())
    }

    /// Every brand, by id.
    pub fn brands(&self) -> Vec<Brand> {
        let mut v: Vec<Brand> = self.brands.iter().map(|b| b.clone()).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Creates a key for `brand`; returns its record and the key, which is
    /// never stored and cannot be shown again.
    pub fn create_key(
        &self,
        brand: &str,
        label: &str,
        grants: Vec<Grant>,
    ) -> Result<(KeyRecord, String), TenancyError> {
        if !self.brands.contains_key(brand) {
            return Err(TenancyError::UnknownBrand(brand.into()));
        }
        let new = generate_key();
        let rec = KeyRecord {
            id: new.id.clone(),
            brand: brand.to_string(),
            label: label.to_string(),
            grants,
            hash: hash_key(&new.key),
            created_at_ms: now_ms(),
            revoked_at_ms: None,
        };
        self.put(KEYS, &rec.id, &rec, || {
            TenancyError::Storage("key id collision; retry".into())
        })?;
        self.keys.insert(rec.id.clone(), Arc::new(rec.clone()));
        Ok((rec, new.key))
    }

    /// A key record by id.
    pub fn key(&self, id: &str) -> Option<Arc<KeyRecord>> {
        self.keys.get(id).map(|k| k.clone())
    }

    /// The keys of `brand` (revoked ones too), oldest first.
    pub fn keys_of(&self, brand: &str) -> Vec<KeyRecord> {
        let mut v: Vec<KeyRecord> = self
            .keys
            .iter()
            .filter(|k| k.brand == brand)
            .map(|k| (**k).clone())
            .collect();
        v.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        v
    }

    /// Revokes a key of `brand` (revoking twice keeps the first time).
    pub fn revoke_key(&self, brand: &str, id: &str) -> Result<KeyRecord, TenancyError> {
        let Some(current) = self.key(id).filter(|k| k.brand == brand) else {
            return Err(TenancyError::UnknownKey(id.into()));
        };
        if current.revoked_at_ms.is_some() {
            return Ok((*current).clone());
        }
        let mut rec = (*current).clone();
        rec.revoked_at_ms = Some(now_ms());
        self.overwrite(KEYS, id, &rec)?;
        self.keys.insert(id.to_string(), Arc::new(rec.clone()));
        Ok(rec)
    }

    /// The record of a presented key, if the key is genuine and not revoked.
    pub fn authenticate(&self, key: &str) -> Result<Arc<KeyRecord>, KeyRefused> {
        super::keys::authenticate(key, |id| self.key(id))
    }

    /// A channel's brand and settings, if it belongs to a brand.
    pub fn channel_meta(&self, channel: &str) -> Option<ChannelMeta> {
        self.meta.get(channel).map(|m| m.clone())
    }

    /// Records that `channel` belongs to `meta.brand`; fails if it already
    /// belongs to one.
    pub fn claim_channel(&self, channel: &str, meta: ChannelMeta) -> Result<(), TenancyError> {
        if !self.brands.contains_key(&meta.brand) {
            return Err(TenancyError::UnknownBrand(meta.brand));
        }
        self.put(CHANNEL_META, channel, &meta, || {
            TenancyError::ChannelClaimed(channel.into())
        })?;
        self.meta.insert(channel.to_string(), meta);
        Ok(())
    }

    /// Undoes [`Tenancy::claim_channel`] (when creating the channel failed).
    pub fn release_channel(&self, channel: &str) -> Result<(), TenancyError> {
        self.write(|txn| {
            let mut t = txn.open_table(CHANNEL_META).map_err(storage)?;
            t.remove(channel).map_err(storage)?;
            Ok(())
        })?;
        self.meta.remove(channel);
        Ok(())
    }

    /// Changes a claimed channel's settings; returns the new settings.
    pub fn update_channel(
        &self,
        channel: &str,
        change: impl FnOnce(&mut ChannelMeta),
    ) -> Result<ChannelMeta, TenancyError> {
        let mut meta = self
            .channel_meta(channel)
            .ok_or_else(|| TenancyError::UnknownChannel(channel.into()))?;
        change(&mut meta);
        self.overwrite(CHANNEL_META, channel, &meta)?;
        self.meta.insert(channel.to_string(), meta.clone());
        Ok(meta)
    }
}

impl TenancyStore for Tenancy {
    fn create_brand(&self, id: String, name: String) -> TenancyFuture<'_, Brand> {
        Box::pin(self.run_here(move |t| t.create_brand(&id, &name)))
    }
    fn brand(&self, id: &str) -> Option<Brand> {
        Tenancy::brand(self, id)
    }
    fn brands(&self) -> Vec<Brand> {
        Tenancy::brands(self)
    }
    fn create_key(
        &self,
        brand: String,
        label: String,
        grants: Vec<Grant>,
    ) -> TenancyFuture<'_, (KeyRecord, String)> {
        Box::pin(self.run_here(move |t| t.create_key(&brand, &label, grants)))
    }
    fn key(&self, id: &str) -> Option<Arc<KeyRecord>> {
        Tenancy::key(self, id)
    }
    fn keys_of(&self, brand: &str) -> Vec<KeyRecord> {
        Tenancy::keys_of(self, brand)
    }
    fn revoke_key(&self, brand: String, id: String) -> TenancyFuture<'_, KeyRecord> {
        Box::pin(self.run_here(move |t| t.revoke_key(&brand, &id)))
    }
    fn authenticate(&self, key: &str) -> Result<Arc<KeyRecord>, KeyRefused> {
        Tenancy::authenticate(self, key)
    }
    fn channel_meta(&self, channel: &str) -> Option<ChannelMeta> {
        Tenancy::channel_meta(self, channel)
    }
    fn claim_channel(&self, channel: String, meta: ChannelMeta) -> TenancyFuture<'_, ()> {
        Box::pin(self.run_here(move |t| t.claim_channel(&channel, meta)))
    }
    fn release_channel(&self, channel: String) -> TenancyFuture<'_, ()> {
        Box::pin(self.run_here(move |t| t.release_channel(&channel)))
    }
    fn update_channel(
        &self,
        channel: String,
        change: MetaChange,
    ) -> TenancyFuture<'_, ChannelMeta> {
        Box::pin(self.run_here(move |t| t.update_channel(&channel, |m| change(m))))
    }
    fn close(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(self.close_blocking())
    }
    fn health(&self) -> Health {
        Tenancy::health(self)
    }
    fn recover(&self) {
        Tenancy::recover(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tenancy::{Role, KEY_PREFIX};

    fn grant(c: &str, role: Role) -> Grant {
        Grant {
            channel: c.into(),
            role,
        }
    }

    #[test]
    fn brands_keys_and_channels_persist_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let t = Tenancy::open(dir.path()).unwrap();
        t.create_brand("acme", "Acme").unwrap();
        assert_eq!(
            t.create_brand("acme", "again"),
            Err(TenancyError::BrandExists("acme".into()))
        );
        let (rec, key) = t
            .create_key("acme", "ci", vec![grant("news", Role::Publisher)])
            .unwrap();
        assert!(key.starts_with(KEY_PREFIX));
        assert_eq!(t.authenticate(&key).unwrap().id, rec.id);
        // A key with the right id but the wrong secret is unknown.
        let forged = format!("{KEY_PREFIX}{}_{}", rec.id, "0".repeat(64));
        assert_eq!(t.authenticate(&forged), Err(KeyRefused::Unknown));
        assert!(t.create_key("nobody", "", vec![]).is_err());
        t.claim_channel(
            "news",
            ChannelMeta {
                brand: "acme".into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert!(matches!(
            t.claim_channel(
                "news",
                ChannelMeta {
                    brand: "acme".into(),
                    ..Default::default()
                }
            ),
            Err(TenancyError::ChannelClaimed(_))
        ));
        t.update_channel("news", |m| m.verified = true).unwrap();
        t.revoke_key("acme", &rec.id).unwrap();
        assert_eq!(t.authenticate(&key), Err(KeyRefused::Revoked));
        drop(t);

        let t = Tenancy::open(dir.path()).unwrap();
        assert_eq!(t.brand("acme").unwrap().name, "Acme");
        assert_eq!(t.authenticate(&key), Err(KeyRefused::Revoked));
        assert!(t.channel_meta("news").unwrap().verified);
        assert_eq!(t.keys_of("acme").len(), 1);
        t.release_channel("news").unwrap();
        assert!(t.channel_meta("news").is_none());
    }
}
