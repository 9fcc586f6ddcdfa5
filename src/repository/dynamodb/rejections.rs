//! The local rejection cache: after a rejection, requests for the same entity and resource
//! that the remembered item state proves would fail are rejected from memory, with the
//! exact retry-after and no DynamoDB call, for at most `min(retry-after, max age)`.
//!
//! The remembered state can only be stale in the direction of *more* tokens than the table
//! holds (others consume meanwhile), except for a refund landing in that window, so a
//! rejection it proves is one DynamoDB would give, bar that refund, for at most the max age.

use dashmap::DashMap;

use super::codec::Image;
use crate::repository::LimitCheck;

/// Entries kept at most; when full, expired entries go, then everything.
const MAX_ENTRIES: usize = 10_000;

#[derive(Debug)]
pub(super) struct RejectionCache {
    max_age_ms: i64,
    entries: DashMap<String, (Image, i64), foldhash::fast::RandomState>,
}

impl RejectionCache {
    /// A cache keeping each rejection at most `max_age_ms` (0 disables it).
    pub fn new(max_age_ms: i64) -> Self {
        RejectionCache {
            max_age_ms,
            entries: DashMap::default(),
        }
    }

    /// The remembered image of an item, if still fresh at `now_ms`.
    pub fn get(&self, key: &str, now_ms: i64) -> Option<Image> {
        if self.max_age_ms <= 0 {
            return None;
        }
        let entry = self.entries.get(key)?;
        (entry.1 > now_ms).then(|| entry.0.clone())
    }

    /// Remembers the image behind a rejection, until the wait it reported (or the max age).
    pub fn remember(&self, key: &str, image: Image, checks: &[LimitCheck], now_ms: i64) {
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
        if self.entries.len() >= MAX_ENTRIES {
            self.entries.retain(|_, (_, u)| *u > now_ms);
            if self.entries.len() >= MAX_ENTRIES {
                self.entries.clear();
            }
        }
        self.entries.insert(key.to_string(), (image, until));
    }

    /// Drops an entry (the request it held back now fits).
    pub fn forget(&self, key: &str) {
        self.entries.remove(key);
    }

    /// Entries held now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }
}
