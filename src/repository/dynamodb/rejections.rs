//! The local rejection cache: after a rejection, requests for the same entity and resource
//! that the remembered item state proves would fail are rejected from memory, with the
//! exact retry-after and no DynamoDB call, for at most `min(retry-after, max age)`.
//!
//! The remembered state can only be stale in the direction of *more* tokens than the table
//! holds (others consume meanwhile), except for a refund landing in that window, so a
//! rejection it proves is one DynamoDB would give, bar that refund, for at most the max age.

use quick_cache::sync::Cache;

use super::codec::Image;
use crate::keys;
use crate::repository::LimitCheck;

/// Entries kept at most. When full, the entry least likely to be used again goes
/// (quick_cache's S3-FIFO eviction), so a flood of distinct rejected ids cannot flush the
/// entries that keep hot keys off DynamoDB.
const MAX_ENTRIES: usize = 10_000;

pub(super) struct RejectionCache {
    max_age_ms: i64,
    entries: Cache<String, (Image, i64)>,
}

impl std::fmt::Debug for RejectionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RejectionCache")
            .field("max_age_ms", &self.max_age_ms)
            .field("len", &self.entries.len())
            .finish()
    }
}

impl RejectionCache {
    /// A cache keeping each rejection at most `max_age_ms` (0 disables it).
    pub fn new(max_age_ms: i64) -> Self {
        Self::with_capacity(max_age_ms, MAX_ENTRIES)
    }

    fn with_capacity(max_age_ms: i64, capacity: usize) -> Self {
        RejectionCache {
            max_age_ms,
            entries: Cache::new(capacity),
        }
    }

    /// The remembered image of an item, if still fresh at `now_ms` (the lookup allocates
    /// nothing: it runs on every acquire).
    pub fn get(&self, entity_id: &str, resource: &str, now_ms: i64) -> Option<Image> {
        if self.max_age_ms <= 0 {
            return None;
        }
        keys::with_entity_resource(entity_id, resource, |key| {
            let (image, until) = self.entries.get(key)?;
            (until > now_ms).then_some(image)
        })
    }

    /// Remembers the image behind a rejection, until the wait it reported (or the max age).
    pub fn remember(
        &self,
        entity_id: &str,
        resource: &str,
        image: Image,
        checks: &[LimitCheck],
        now_ms: i64,
    ) {
        if self.max_age_ms <= 0 {
            return;
        }
        let wait = checks
            .iter()
            .filter(|c| c.exceeded)
            .map(|c| {
                c.retry_after_ms
                    .map_or(i64::MAX, |ms| i64::try_from(ms).unwrap_or(i64::MAX))
            })
            .max()
            .unwrap_or(0);
        let until = now_ms.saturating_add(wait.min(self.max_age_ms));
        if until <= now_ms {
            return;
        }
        self.entries
            .insert(keys::entity_resource(entity_id, resource), (image, until));
    }

    /// Drops an entry (the request it held back now fits).
    pub fn forget(&self, entity_id: &str, resource: &str) {
        keys::with_entity_resource(entity_id, resource, |key| self.entries.remove(key));
    }

    /// Drops every entry of an entity (it was deleted, its buckets with it).
    pub fn forget_entity(&self, entity_id: &str) {
        let prefix = keys::entity_resource(entity_id, "");
        self.entries.retain(|key, _| !key.starts_with(&prefix));
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exceeded(wait_ms: u64) -> Vec<LimitCheck> {
        vec![LimitCheck {
            available: 0,
            exceeded: true,
            retry_after_ms: Some(wait_ms),
        }]
    }

    #[test]
    fn keeps_a_rejection_for_its_wait_capped_at_the_max_age() {
        let cache = RejectionCache::new(1_000);
        cache.remember("a", "api", Image::default(), &exceeded(300), 10_000);
        assert!(cache.get("a", "api", 10_299).is_some());
        assert!(cache.get("a", "api", 10_300).is_none());
        cache.remember("a", "api", Image::default(), &exceeded(60_000), 10_000);
        assert!(cache.get("a", "api", 10_999).is_some());
        assert!(cache.get("a", "api", 11_000).is_none());
    }

    #[test]
    fn zero_max_age_disables_it() {
        let cache = RejectionCache::new(0);
        cache.remember("a", "api", Image::default(), &exceeded(300), 0);
        assert_eq!(cache.len(), 0);
        assert!(cache.get("a", "api", 1).is_none());
    }

    #[test]
    fn a_flood_of_new_ids_keeps_the_hot_entries() {
        let cache = RejectionCache::with_capacity(1_000, 100);
        cache.remember("hot", "api", Image::default(), &exceeded(500), 0);
        for i in 0..1_000 {
            // The hot key is asked for all the time...
            assert!(cache.get("hot", "api", 1).is_some(), "evicted after {i}");
            // ...while a flood of one-off ids passes through.
            cache.remember(
                &format!("flood-{i}"),
                "api",
                Image::default(),
                &exceeded(500),
                0,
            );
        }
        assert!(cache.len() <= 110);
    }

    #[test]
    fn forgets_one_entity_only() {
        let cache = RejectionCache::new(1_000);
        for (entity, resource) in [("a", "api"), ("a", "chat"), ("ab", "api"), ("b", "api")] {
            cache.remember(entity, resource, Image::default(), &exceeded(500), 0);
        }
        cache.forget_entity("a");
        assert_eq!(cache.len(), 2);
        assert!(cache.get("ab", "api", 1).is_some());
        cache.forget("b", "api");
        assert_eq!(cache.len(), 1);
    }
}
