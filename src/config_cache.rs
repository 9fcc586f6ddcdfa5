//! A TTL cache of what [`crate::Repository::load_config`] returned, per entity and resource.
//!
//! Misses are cached too (an entity with no stored limits costs one read per TTL, not one per
//! request), but a failed read is never cached: an outage must not turn into "no limits".

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use crate::repository::StoredConfig;
use crate::CacheStats;

#[derive(Debug)]
pub(crate) struct ConfigCache {
    ttl_ms: i64,
    ttl: Duration,
    entries: DashMap<String, (Arc<StoredConfig>, i64)>,
    hits: AtomicU64,
    misses: AtomicU64,
    inserts: AtomicU64,
}

/// Every this many inserts, expired entries are swept so the cache stays bounded by the
/// number of keys seen within one TTL.
const SWEEP_EVERY: u64 = 4096;

fn key(entity_id: &str, resource: &str) -> String {
    format!("{entity_id}#{resource}")
}

impl ConfigCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        ConfigCache {
            ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
            ttl,
            entries: DashMap::new(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            inserts: AtomicU64::new(0),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.ttl_ms > 0
    }

    /// The cached config if it is still fresh at `now_ms`; counts a hit or a miss.
    pub(crate) fn get(
        &self,
        entity_id: &str,
        resource: &str,
        now_ms: i64,
    ) -> Option<Arc<StoredConfig>> {
        if self.enabled() {
            let key = key(entity_id, resource);
            if let Some(entry) = self.entries.get(&key) {
                if entry.1 > now_ms {
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return Some(Arc::clone(&entry.0));
                }
                drop(entry);
                self.entries.remove_if(&key, |_, v| v.1 <= now_ms);
            }
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        None
    }

    pub(crate) fn insert(
        &self,
        entity_id: &str,
        resource: &str,
        config: Arc<StoredConfig>,
        now_ms: i64,
    ) {
        if self.enabled() {
            self.entries.insert(
                key(entity_id, resource),
                (config, now_ms.saturating_add(self.ttl_ms)),
            );
            if self.inserts.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
                self.entries.retain(|_, v| v.1 > now_ms);
            }
        }
    }

    pub(crate) fn invalidate(&self) {
        self.entries.clear();
    }

    pub(crate) fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            size: self.entries.len() as u64,
            ttl: self.ttl,
        }
    }
}
