//! The shard counts of the buckets the Python library spread over several items (its
//! table contract, section 8.4): an acquire draws one of a bucket's shards at random, as
//! Python's does, so the load spreads over the partitions; each shard holds its share of
//! every limit, and enforces it on its own.
//!
//! Learnt from the items this process sees (each carries `shard_count`; shard 0's is
//! authoritative, another shard's may lag, and counts only grow while a bucket lives). A
//! bucket not known to be sharded is charged on shard 0, whose item tells its count; a
//! count learnt late only means the load spread late, never a different limit: every
//! write is decided on the shard's own item.

use std::sync::atomic::{AtomicBool, Ordering};

use quick_cache::sync::Cache;

use super::codec::Image;
use super::keys;
use crate::keys::{entity_resource, with_entity_resource};
use crate::repository::Shard;

/// Sharded buckets remembered at most (the least used go first; one forgotten is charged
/// on shard 0 until its item tells the count again).
const MAX_ENTRIES: usize = 10_000;

/// The Python library's most shards per bucket.
pub(super) const MAX_SHARDS: u32 = 32;

pub(super) struct ShardCounts {
    /// Whether any sharded bucket was seen: until then an acquire looks nothing up.
    any: AtomicBool,
    counts: Cache<String, u32>,
}

impl ShardCounts {
    pub fn new() -> Self {
        ShardCounts {
            any: AtomicBool::new(false),
            counts: Cache::new(MAX_ENTRIES),
        }
    }

    /// How many shards the bucket of an entity and resource has, as last seen (1 unless
    /// it was seen sharded).
    pub fn count(&self, entity_id: &str, resource: &str) -> u32 {
        if !self.any.load(Ordering::Relaxed) {
            return 1;
        }
        with_entity_resource(entity_id, resource, |key| self.counts.get(key)).unwrap_or(1)
    }

    /// Learns from an item of the bucket in `slot` (see [`keys::slot`]): shard 0's count
    /// is taken as it is; another shard's only raises the count (it may lag).
    pub fn learn(&self, entity_id: &str, slot: &str, image: &Image) {
        let (resource, shard) = keys::split_slot(slot);
        let seen = image.shards().clamp(1, MAX_SHARDS);
        let known = self.count(entity_id, resource);
        let count = if shard == 0 { seen } else { seen.max(known) };
        if count == known {
            return;
        }
        if count > 1 {
            self.any.store(true, Ordering::Relaxed);
            self.counts
                .insert(entity_resource(entity_id, resource), count);
        } else {
            with_entity_resource(entity_id, resource, |key| self.counts.remove(key));
        }
    }

    /// Forgets every bucket of an entity (it was deleted, its buckets with it).
    pub fn forget_entity(&self, entity_id: &str) {
        let prefix = entity_resource(entity_id, "");
        self.counts.retain(|key, _| !key.starts_with(&prefix));
    }
}

/// The order in which an acquire tries a bucket's shards: one drawn at random, then the
/// others from there (so a shard short of tokens does not refuse what another holds).
pub(super) fn shard_order(count: u32) -> impl Iterator<Item = Shard> {
    let count = count.max(1);
    let first = if count > 1 {
        rand::random::<u32>() % count
    } else {
        0
    };
    (0..count).map(move |k| Shard {
        index: (first + k) % count,
        count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(shards: i64) -> Image {
        Image {
            shard_count: shards,
            ..Image::default()
        }
    }

    #[test]
    fn counts_are_learnt_from_shard_zero_and_raised_by_others() {
        let counts = ShardCounts::new();
        assert_eq!(counts.count("k", "api"), 1);
        counts.learn("k", "api", &image(4));
        assert_eq!(counts.count("k", "api"), 4);
        // A lagging shard never lowers the count; a newer one raises it.
        counts.learn("k", &keys::slot("api", 3), &image(2));
        assert_eq!(counts.count("k", "api"), 4);
        counts.learn("k", &keys::slot("api", 5), &image(8));
        assert_eq!(counts.count("k", "api"), 8);
        // Shard 0 is authoritative (a bucket deleted and created afresh).
        counts.learn("k", "api", &image(1));
        assert_eq!(counts.count("k", "api"), 1);
        counts.learn("k", "api", &image(2));
        counts.forget_entity("k");
        assert_eq!(counts.count("k", "api"), 1);
    }

    #[test]
    fn every_shard_is_tried_once() {
        for count in [1, 2, 5, 32] {
            let mut seen: Vec<u32> = shard_order(count).map(|s| s.index).collect();
            assert!(shard_order(count).all(|s| s.count == count));
            seen.sort_unstable();
            assert_eq!(seen, (0..count).collect::<Vec<_>>());
        }
    }
}
