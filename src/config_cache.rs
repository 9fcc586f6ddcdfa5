//! A TTL cache of what [`crate::Repository::load_config`] returned, per entity and resource.
//!
//! Misses are cached too (an entity with no stored limits costs one read per TTL, not one per
//! request), but a failed read is never cached: an outage must not turn into "no limits".

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

use crate::keys;
use crate::repository::StoredConfig;
use crate::CacheStats;

#[derive(Debug)]
pub(crate) struct ConfigCache {
    ttl_ms: i64,
    ttl: Duration,
    entries: DashMap<String, Entry, foldhash::fast::RandomState>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// When the next sweep of expired entries is due, epoch milliseconds.
    next_sweep_ms: AtomicI64,
    /// Whether anything was ever inserted: an in-process backend with nothing stored
    /// caches nothing, and its lookups then skip the map (and the hashing) altogether.
    used: AtomicBool,
}

#[derive(Debug)]
struct Entry {
    config: Arc<StoredConfig>,
    expires_at_ms: i64,
    /// The backend's config version when read, for backends that report one.
    version: Option<u64>,
}

impl Entry {
    /// Fresh until the TTL runs out, and for a backend that reports a version, only while
    /// the version has not moved. (The TTL applies either way, so idle keys' entries are
    /// swept and the cache stays bounded by the keys seen within one TTL.)
    fn fresh(&self, now_ms: i64, version: Option<u64>) -> bool {
        self.expires_at_ms > now_ms && (version.is_none() || self.version == version)
    }
}

impl ConfigCache {
    pub(crate) fn new(ttl: Duration) -> Self {
        ConfigCache {
            ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
            ttl,
            entries: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            next_sweep_ms: AtomicI64::new(i64::MIN),
            used: AtomicBool::new(false),
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.ttl_ms > 0
    }

    /// Counts a lookup as a hit or a miss.
    pub(crate) fn count(&self, hit: bool) {
        let counter = if hit { &self.hits } else { &self.misses };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The cached config if it is still fresh at `now_ms` (or, for a backend that reports
    /// a config version, if the version has not moved). Counts nothing: see [`Self::count`].
    pub(crate) fn lookup(
        &self,
        entity_id: &str,
        resource: &str,
        now_ms: i64,
        version: Option<u64>,
    ) -> Option<Arc<StoredConfig>> {
        if self.enabled() && self.used.load(Ordering::Relaxed) {
            let hit = keys::with_entity_resource(entity_id, resource, |key| {
                let found = self
                    .entries
                    .get(key)
                    .map(|e| e.fresh(now_ms, version).then(|| Arc::clone(&e.config)));
                if let Some(None) = found {
                    self.entries
                        .remove_if(key, |_, e| !e.fresh(now_ms, version));
                }
                found.flatten()
            });
            return hit;
        }
        None
    }

    pub(crate) fn insert(
        &self,
        entity_id: &str,
        resource: &str,
        config: Arc<StoredConfig>,
        now_ms: i64,
        version: Option<u64>,
    ) {
        if self.enabled() {
            self.used.store(true, Ordering::Relaxed);
            self.entries.insert(
                keys::entity_resource(entity_id, resource),
                Entry {
                    config,
                    expires_at_ms: now_ms.saturating_add(self.ttl_ms),
                    version,
                },
            );
            // Sweep expired entries once per TTL: the cache stays bounded by the keys seen
            // within two TTLs, at a cost linear in its size once per TTL.
            let due = self.next_sweep_ms.load(Ordering::Relaxed);
            if now_ms >= due
                && self
                    .next_sweep_ms
                    .compare_exchange(
                        due,
                        now_ms.saturating_add(self.ttl_ms),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_ok()
            {
                self.entries.retain(|_, e| e.fresh(now_ms, version));
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
