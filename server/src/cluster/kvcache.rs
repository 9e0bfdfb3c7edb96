//! A KV bucket mirrored in memory and kept fresh by watching it.
//!
//! Every store in this crate (channel records, brands, keys, channel settings,
//! campaigns) reads from memory and writes to a JetStream KV bucket with
//! compare-and-set on the key's revision. [`KvCache`] loads the bucket when it
//! opens (it waits, bounded, until the watch has delivered everything up to the
//! bucket's last revision at open time) and then applies every change any node
//! makes. Updates are applied only if their revision is newer than what the
//! cache holds, so a node's own write (applied at once, for read-your-writes)
//! and the same write arriving later through the watch never go backwards.
//! Deletions leave a tombstone revision for the same reason.
//!
//! Staleness: another node's write is visible here after the watch delivers it
//! (typically well under a millisecond on loopback; during a NATS failover,
//! until the watch is re-established). Writes themselves never act on stale
//! data: they compare-and-set against the revision they read.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use dashmap::DashMap;
use futures_util::StreamExt;

use super::nats::{is_no_responders, is_transient, retrying, Nats, NatsError};

/// How long opening a cache may wait for the initial snapshot.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Decodes a value; `None` skips a corrupt entry (logged).
pub type Decode<T> = fn(&str, &[u8]) -> Option<T>;

/// See the module docs.
pub struct KvCache<T> {
    /// The bucket itself, for writes.
    pub store: kv::Store,
    map: DashMap<String, (Option<T>, u64)>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl<T> Drop for KvCache<T> {
    fn drop(&mut self) {
        if let Some(t) = self
            .task
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            t.abort();
        }
    }
}

/// Opens (or creates) a KV bucket with `history` 1 and the cluster's
/// replicas, retrying for up to [`crate::cluster::nats::KV_RETRY_DEADLINE`]
/// while JetStream is not ready (a cluster still electing its meta leader).
pub async fn open_bucket(
    nats: &Nats,
    name: &str,
    max_age: Duration,
) -> Result<kv::Store, NatsError> {
    let deadline = tokio::time::Instant::now() + super::nats::KV_RETRY_DEADLINE;
    let mut backoff = Duration::from_millis(50);
    loop {
        match open_bucket_once(nats, name, max_age).await {
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, bucket = name, "kv bucket not ready; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

async fn open_bucket_once(
    nats: &Nats,
    name: &str,
    max_age: Duration,
) -> Result<kv::Store, NatsError> {
    if let Ok(s) = nats.js.get_key_value(name).await {
        return Ok(s);
    }
    let cfg = kv::Config {
        bucket: name.to_string(),
        history: 1,
        max_age,
        num_replicas: nats.cfg.replicas,
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    };
    match nats.js.create_key_value(cfg).await {
        Ok(s) => Ok(s),
        // Another node created it first.
        Err(e) => nats
            .js
            .get_key_value(name)
            .await
            .map_err(|_| NatsError::Unavailable(format!("kv bucket {name}: {e}"))),
    }
}

impl<T: Clone + Send + Sync + 'static> KvCache<T> {
    /// Loads the bucket and starts watching it.
    pub async fn open(store: kv::Store, decode: Decode<T>) -> Result<Arc<KvCache<T>>, NatsError> {
        let last = retrying(is_transient, || store.status())
            .await
            .map_err(|e| NatsError::Unavailable(format!("kv status: {e}")))?
            .info
            .state
            .last_sequence;
        let cache = Arc::new(KvCache {
            store,
            map: DashMap::new(),
            task: std::sync::Mutex::new(None),
        });
        let (loaded_tx, loaded_rx) = tokio::sync::oneshot::channel();
        let weak = Arc::downgrade(&cache);
        let store = cache.store.clone();
        let task = tokio::spawn(async move {
            let mut loaded = Some(loaded_tx);
            if last == 0 {
                if let Some(tx) = loaded.take() {
                    let _ = tx.send(());
                }
            }
            let mut backoff = Duration::from_millis(50);
            loop {
                let mut watch = match store.watch_with_history(">").await {
                    Ok(w) => w,
                    Err(e) => {
                        tracing::warn!(error = %e, bucket = %store.name, "kv watch failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                };
                while let Some(next) = watch.next().await {
                    let entry = match next {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::warn!(error = %e, bucket = %store.name, "kv watch error");
                            break;
                        }
                    };
                    backoff = Duration::from_millis(50);
                    let Some(cache) = weak.upgrade() else { return };
                    match entry.operation {
                        kv::Operation::Put => match decode(&entry.key, &entry.value) {
                            Some(v) => cache.apply(&entry.key, Some(v), entry.revision),
                            None => {
                                tracing::error!(key = %entry.key, bucket = %store.name, "corrupt kv entry skipped")
                            }
                        },
                        kv::Operation::Delete | kv::Operation::Purge => {
                            cache.apply(&entry.key, None, entry.revision)
                        }
                    }
                    if entry.revision >= last {
                        if let Some(tx) = loaded.take() {
                            let _ = tx.send(());
                        }
                    }
                }
                tokio::time::sleep(backoff).await;
            }
        });
        *cache.task.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        tokio::time::timeout(LOAD_TIMEOUT, loaded_rx)
            .await
            .map_err(|_| NatsError::Unavailable("kv bucket did not load in time".into()))?
            .map_err(|_| NatsError::Unavailable("kv watcher stopped".into()))?;
        Ok(cache)
    }

    /// Applies a value (or a deletion) if `revision` is newer than the cached one.
    pub fn apply(&self, key: &str, value: Option<T>, revision: u64) {
        let mut e = self.map.entry(key.to_string()).or_insert((None, 0));
        if revision > e.1 {
            *e = (value, revision);
        }
    }

    /// The cached value and its revision.
    pub fn get(&self, key: &str) -> Option<(T, u64)> {
        self.map
            .get(key)
            .and_then(|e| e.0.clone().map(|v| (v, e.1)))
    }

    /// Every cached value.
    pub fn values(&self) -> Vec<T> {
        self.map.iter().filter_map(|e| e.0.clone()).collect()
    }

    /// Every cached (key, value).
    pub fn entries(&self) -> Vec<(String, T)> {
        self.map
            .iter()
            .filter_map(|e| e.0.clone().map(|v| (e.key().clone(), v)))
            .collect()
    }

    /// Reads a key from the bucket itself (a node that has not seen a write
    /// through its watch yet), caching what it finds.
    pub async fn fetch(&self, key: &str, decode: Decode<T>) -> Result<Option<(T, u64)>, NatsError> {
        let entry = kv_entry(&self.store, key)
            .await
            .map_err(|e| NatsError::Unavailable(format!("kv get: {e}")))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let v = decode(key, &e.value)
                    .ok_or_else(|| NatsError::Protocol(format!("corrupt kv entry {key:?}")))?;
                self.apply(key, Some(v.clone()), e.revision);
                Ok(Some((v, e.revision)))
            }
            _ => Ok(None),
        }
    }
}

/// JSON decode for [`KvCache`].
pub fn json<T: serde::de::DeserializeOwned>(key: &str, v: &[u8]) -> Option<T> {
    match serde_json::from_slice(v) {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!(key, error = %e, "corrupt kv value");
            None
        }
    }
}

// KV calls retried through a missing stream leader (see
// `crate::nats::retrying`): reads also on timeouts, writes only when nobody
// received them ("no responders"), since a timed-out write may have happened.

/// Reads one key's entry (retried on timeouts and missing leaders).
pub async fn kv_entry(
    store: &kv::Store,
    key: impl AsRef<str>,
) -> Result<Option<kv::Entry>, kv::EntryError> {
    let key = key.as_ref();
    retrying(is_transient, || store.entry(key.to_string())).await
}

/// Creates a key that must not exist yet; returns its revision.
pub async fn kv_create(
    store: &kv::Store,
    key: impl AsRef<str>,
    value: bytes::Bytes,
) -> Result<u64, kv::CreateError> {
    let key = key.as_ref();
    retrying(is_no_responders, || store.create(key, value.clone())).await
}

/// Writes a key if its revision is still `revision`; returns the new one.
pub async fn kv_update(
    store: &kv::Store,
    key: impl AsRef<str>,
    value: bytes::Bytes,
    revision: u64,
) -> Result<u64, kv::UpdateError> {
    let key = key.as_ref();
    retrying(is_no_responders, || {
        store.update(key, value.clone(), revision)
    })
    .await
}

/// Writes a key unconditionally; returns its revision.
pub async fn kv_put(
    store: &kv::Store,
    key: impl AsRef<str>,
    value: bytes::Bytes,
) -> Result<u64, kv::PutError> {
    let key = key.as_ref();
    retrying(is_no_responders, || store.put(key, value.clone())).await
}

/// Deletes a key (a tombstone with a revision).
pub async fn kv_delete(store: &kv::Store, key: impl AsRef<str>) -> Result<(), kv::DeleteError> {
    let key = key.as_ref();
    retrying(is_no_responders, || store.delete(key)).await
}
