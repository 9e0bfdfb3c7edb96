//! Tenancy in cluster mode: brands, API keys and channel ownership in
//! JetStream KV buckets, behind [`TenancyStore`] (the embedded store is
//! `brands.redb`, see [`super::Tenancy`]).
//!
//! Buckets (R = the cluster's replicas, history 1):
//! - `herald_brands`: brand id -> [`Brand`] (JSON)
//! - `herald_keys`: key id -> [`KeyRecord`] (JSON; only the key's SHA-256)
//! - `herald_channel_meta`: channel id -> [`ChannelMeta`] (JSON)
//!
//! Ids may contain `.`, which KV keys treat as a token separator: keys use the
//! channel-token form (`.` -> `=`, as in the channel log's subjects).
//!
//! Every bucket is mirrored in memory on every node ([`KvCache`]), so reads and
//! [`TenancyStore::authenticate`] are map lookups, as with the redb store.
//! Writes are compare-and-set on the key's revision ("create only if absent"
//! for brands, keys and channel claims), so two nodes can never both claim a
//! channel or create the same brand. A write is visible on the writing node at
//! once and on other nodes when their watch delivers it (well under a second;
//! during a NATS failover, until the watch is re-established). In particular a
//! revoked key can still authenticate on another node for that long, and a new
//! key may be unknown there for that long: [`KvTenancy::authenticate_fresh`]
//! asks the bucket when the cache does not know a key.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    generate_key, hash_key, key_id, storage, Brand, ChannelMeta, Grant, KeyRecord, KeyRefused,
    MetaChange, TenancyError, TenancyFuture, TenancyStore,
};
use crate::cluster::kvcache::{self, KvCache};
use crate::cluster::nats::{is_kv_conflict, Nats};
use crate::model::now_ms;

fn kv_key(id: &str) -> String {
    id.replace('.', "=")
}

/// The KV-backed [`TenancyStore`]. See the module docs.
pub struct KvTenancy {
    brands: Arc<KvCache<Brand>>,
    keys: Arc<KvCache<Arc<KeyRecord>>>,
    meta: Arc<KvCache<ChannelMeta>>,
}

fn decode_key(k: &str, v: &[u8]) -> Option<Arc<KeyRecord>> {
    kvcache::json::<KeyRecord>(k, v).map(Arc::new)
}

/// Creates `key` only if absent; `Ok(false)` if it exists.
async fn create<T: Serialize>(
    store: &kv::Store,
    key: &str,
    value: &T,
) -> Result<Option<u64>, TenancyError> {
    let bytes = serde_json::to_vec(value).map_err(storage)?;
    match kvcache::kv_create(store, key, bytes.into()).await {
        Ok(rev) => Ok(Some(rev)),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
        Err(e) => Err(storage(e)),
    }
}

/// Read-modify-write of one key with compare-and-set, retried on conflict.
async fn update_cas<T, F>(
    cache: &KvCache<T>,
    decode: kvcache::Decode<T>,
    key: &str,
    missing: impl Fn() -> TenancyError,
    change: F,
) -> Result<T, TenancyError>
where
    T: Clone + Serialize + DeserializeOwned + Send + Sync + 'static,
    F: Fn(&T) -> Option<T>,
{
    for _ in 0..100 {
        let (cur, rev) = cache
            .fetch(key, decode)
            .await
            .map_err(storage)?
            .ok_or_else(&missing)?;
        let Some(next) = change(&cur) else {
            return Ok(cur);
        };
        let bytes = serde_json::to_vec(&next).map_err(storage)?;
        match kvcache::kv_update(&cache.store, key, bytes.into(), rev).await {
            Ok(new_rev) => {
                cache.apply(key, Some(next.clone()), new_rev);
                return Ok(next);
            }
            Err(e) if is_kv_conflict(&e) => {
                tokio::time::sleep(std::time::Duration::from_micros(rand::random_range(
                    100..2000,
                )))
                .await;
                continue;
            }
            Err(e) => return Err(storage(e)),
        }
    }
    Err(TenancyError::Storage("too many concurrent updates".into()))
}

impl KvTenancy {
    /// Opens (or creates) the buckets and loads them.
    pub async fn open(nats: &Nats) -> Result<Arc<KvTenancy>, TenancyError> {
        let bucket = |w: &str| nats.cfg.bucket(w);
        let b = kvcache::open_bucket(nats, &bucket("brands"), Duration::ZERO)
            .await
            .map_err(storage)?;
        let k = kvcache::open_bucket(nats, &bucket("keys"), Duration::ZERO)
            .await
            .map_err(storage)?;
        let m = kvcache::open_bucket(nats, &bucket("channel_meta"), Duration::ZERO)
            .await
            .map_err(storage)?;
        Ok(Arc::new(KvTenancy {
            brands: KvCache::open(b, kvcache::json::<Brand>)
                .await
                .map_err(storage)?,
            keys: KvCache::open(k, decode_key).await.map_err(storage)?,
            meta: KvCache::open(m, kvcache::json::<ChannelMeta>)
                .await
                .map_err(storage)?,
        }))
    }
}

impl TenancyStore for KvTenancy {
    fn authenticate_fresh<'a>(
        &'a self,
        key: &'a str,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Arc<KeyRecord>, KeyRefused>> + Send + 'a>,
    > {
        Box::pin(async move {
            match self.authenticate(key) {
                Err(KeyRefused::Unknown) => {
                    let id = key_id(key).ok_or(KeyRefused::Unknown)?;
                    match self.keys.fetch(id, decode_key).await {
                        Ok(Some(_)) => self.authenticate(key),
                        _ => Err(KeyRefused::Unknown),
                    }
                }
                other => other,
            }
        })
    }

    fn create_brand(&self, id: String, name: String) -> TenancyFuture<'_, Brand> {
        Box::pin(async move {
            let brand = Brand {
                id: id.clone(),
                name,
                created_at_ms: now_ms(),
            };
            let k = kv_key(&id);
            let rev = create(&self.brands.store, &k, &brand)
                .await?
                .ok_or(TenancyError::BrandExists(id))?;
            self.brands.apply(&k, Some(brand.clone()), rev);
            Ok(brand)
        })
    }

    fn brand(&self, id: &str) -> Option<Brand> {
        self.brands.get(&kv_key(id)).map(|(b, _)| b)
    }

    fn brands(&self) -> Vec<Brand> {
        let mut v = self.brands.values();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    fn create_key(
        &self,
        brand: String,
        label: String,
        grants: Vec<Grant>,
    ) -> TenancyFuture<'_, (KeyRecord, String)> {
        Box::pin(async move {
            if self.brand(&brand).is_none()
                && self
                    .brands
                    .fetch(&kv_key(&brand), kvcache::json::<Brand>)
                    .await
                    .map_err(storage)?
                    .is_none()
            {
                return Err(TenancyError::UnknownBrand(brand));
            }
            let new = generate_key();
            let rec = KeyRecord {
                id: new.id.clone(),
                brand,
                label,
                grants,
                hash: hash_key(&new.key),
                created_at_ms: now_ms(),
                revoked_at_ms: None,
            };
            let rev = create(&self.keys.store, &rec.id, &rec)
                .await?
                .ok_or_else(|| TenancyError::Storage("key id collision; retry".into()))?;
            self.keys.apply(&rec.id, Some(Arc::new(rec.clone())), rev);
            Ok((rec, new.key))
        })
    }

    fn key(&self, id: &str) -> Option<Arc<KeyRecord>> {
        self.keys.get(id).map(|(k, _)| k)
    }

    fn keys_of(&self, brand: &str) -> Vec<KeyRecord> {
        let mut v: Vec<KeyRecord> = self
            .keys
            .values()
            .into_iter()
            .filter(|k| k.brand == brand)
            .map(|k| (*k).clone())
            .collect();
        v.sort_by(|a, b| (a.created_at_ms, &a.id).cmp(&(b.created_at_ms, &b.id)));
        v
    }

    fn revoke_key(&self, brand: String, id: String) -> TenancyFuture<'_, KeyRecord> {
        Box::pin(async move {
            let unknown = || TenancyError::UnknownKey(id.clone());
            let rec = update_cas(&self.keys, decode_key, &id, unknown, |cur| {
                if cur.brand != brand || cur.revoked_at_ms.is_some() {
                    return None;
                }
                let mut next = (**cur).clone();
                next.revoked_at_ms = Some(now_ms());
                Some(Arc::new(next))
            })
            .await?;
            if rec.brand != brand {
                return Err(unknown());
            }
            Ok((*rec).clone())
        })
    }

    fn authenticate(&self, key: &str) -> Result<Arc<KeyRecord>, KeyRefused> {
        super::keys::authenticate(key, |id| self.key(id))
    }

    fn channel_meta(&self, channel: &str) -> Option<ChannelMeta> {
        self.meta.get(&kv_key(channel)).map(|(m, _)| m)
    }

    fn claim_channel(&self, channel: String, meta: ChannelMeta) -> TenancyFuture<'_, ()> {
        Box::pin(async move {
            if self.brand(&meta.brand).is_none()
                && self
                    .brands
                    .fetch(&kv_key(&meta.brand), kvcache::json::<Brand>)
                    .await
                    .map_err(storage)?
                    .is_none()
            {
                return Err(TenancyError::UnknownBrand(meta.brand));
            }
            let k = kv_key(&channel);
            let rev = create(&self.meta.store, &k, &meta)
                .await?
                .ok_or(TenancyError::ChannelClaimed(channel))?;
            self.meta.apply(&k, Some(meta), rev);
            Ok(())
        })
    }

    fn release_channel(&self, channel: String) -> TenancyFuture<'_, ()> {
        Box::pin(async move {
            let k = kv_key(&channel);
            kvcache::kv_delete(&self.meta.store, &k)
                .await
                .map_err(storage)?;
            // The watch delivers the deletion with its revision; until then
            // hide the entry here with a revision above the one we read.
            let rev = self.meta.get(&k).map_or(0, |(_, r)| r);
            self.meta.apply(&k, None, rev + 1);
            Ok(())
        })
    }

    fn update_channel(
        &self,
        channel: String,
        change: MetaChange,
    ) -> TenancyFuture<'_, ChannelMeta> {
        Box::pin(async move {
            let k = kv_key(&channel);
            update_cas(
                &self.meta,
                kvcache::json::<ChannelMeta>,
                &k,
                || TenancyError::UnknownChannel(channel.clone()),
                |cur| {
                    let mut next = cur.clone();
                    change(&mut next);
                    Some(next)
                },
            )
            .await
        })
    }

    fn close(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        // Every write is awaited by its caller; nothing runs on its own.
        Box::pin(std::future::ready(()))
    }
}
