//! The last image seen of each bucket item this process wrote (as DynamoDB returned it),
//! so that an acquire on an item whose `rf` has gone stale skips the speculative write the
//! fresh-`rf` rule would refuse and goes straight to the rf-locked write built from it:
//! one call when nobody else wrote meanwhile, and a lost race returns the newer item.
//!
//! An image only ever guides which write to try; every write is conditioned on the item as
//! it is, so a stale image costs a call, never a wrong decision.

use quick_cache::sync::Cache;

use super::codec::Image;
use crate::keys;

/// Items remembered at most (the ones least likely to be used again go first).
const MAX_ENTRIES: usize = 10_000;

pub(super) struct ImageCache {
    entries: Cache<String, Image>,
}

impl ImageCache {
    pub fn new() -> Self {
        ImageCache {
            entries: Cache::new(MAX_ENTRIES),
        }
    }

    /// The last image seen of an item.
    pub fn get(&self, entity_id: &str, resource: &str) -> Option<Image> {
        keys::with_entity_resource(entity_id, resource, |key| self.entries.get(key))
    }

    /// Remembers the newest image seen of an item.
    pub fn put(&self, entity_id: &str, resource: &str, image: Image) {
        self.entries
            .insert(keys::entity_resource(entity_id, resource), image);
    }

    /// Drops an item's entry (a write moved its `rf`, so the image would only misguide).
    pub fn forget(&self, entity_id: &str, resource: &str) {
        keys::with_entity_resource(entity_id, resource, |key| self.entries.remove(key));
    }

    /// Drops every entry of an entity (it was deleted, its buckets with it).
    pub fn forget_entity(&self, entity_id: &str) {
        let prefix = keys::entity_resource(entity_id, "");
        self.entries.retain(|key, _| !key.starts_with(&prefix));
    }
}
