//! Turns on the slow path of a cascade: within one process, one writer at a time per
//! parent item (a rejection is decided on a read, without waiting).
//!
//! Every admission on the slow path moves the parent's `rf`, so of N attempts built from
//! the same read, one lands and N-1 fail their condition, read again and retry. With many
//! tasks of one process on one parent, that herd multiplies the calls (each failed attempt
//! is a read and a transaction) and starves the unlucky: measured on DynamoDB Local with
//! 2 x 32 tasks under one parent, attempts took 0.4 to 0.6 s and an acquire ran past 10 s.
//! Taking turns (FIFO, so every waiter gets one) leaves one contender per process, so an
//! attempt fails only on another process's write.
//!
//! A write waits for its turn at most the operation timeout: past it, its caller has
//! given up, and abandoned writes queued behind a busy parent would only add to the load.
//!
//! Striped locks: bounded memory whatever the number of parents, nothing to evict; two
//! parents on one stripe only share turns on this slow path.

use std::hash::BuildHasher;
use std::time::Duration;

use tokio::sync::{Mutex, MutexGuard};

/// Stripes: enough that unrelated hot parents rarely share one.
const STRIPES: usize = 256;

pub(super) struct Turns {
    hasher: foldhash::fast::RandomState,
    stripes: Box<[Mutex<()>]>,
}

impl std::fmt::Debug for Turns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Turns")
            .field("stripes", &self.stripes.len())
            .finish()
    }
}

impl Default for Turns {
    fn default() -> Self {
        Turns {
            hasher: foldhash::fast::RandomState::default(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl Turns {
    /// Waits for this process's turn on the item `(entity_id, slot)`; the turn lasts as
    /// long as the guard (dropping the waiting future gives the place up).
    pub(super) async fn take(&self, entity_id: &str, slot: &str) -> MutexGuard<'_, ()> {
        let stripe = self.hasher.hash_one((entity_id, slot)) as usize % self.stripes.len();
        self.stripes[stripe].lock().await
    }

    /// [`Self::take`], waiting at most `limit` (`None`: the turn did not come in time).
    /// A caller bounded by the same limit has given up by then, and the work still queued
    /// behind its turn would only pile up under load.
    pub(super) async fn take_within(
        &self,
        entity_id: &str,
        slot: &str,
        limit: Duration,
    ) -> Option<MutexGuard<'_, ()>> {
        tokio::time::timeout(limit, self.take(entity_id, slot))
            .await
            .ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_turn_at_a_time_per_item() {
        let turns = Arc::new(Turns::default());
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..32)
            .map(|_| {
                let (turns, inside, most) = (turns.clone(), inside.clone(), most.clone());
                tokio::spawn(async move {
                    for _ in 0..10 {
                        let _turn = turns.take("project", "api").await;
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_wait_past_its_limit_gives_the_place_up() {
        let turns = Turns::default();
        let held = turns.take("project", "api").await;
        let limit = Duration::from_millis(10);
        assert!(
            turns.take_within("project", "api", limit).await.is_none(),
            "a second turn while the first is held"
        );
        drop(held);
        assert!(turns.take_within("project", "api", limit).await.is_some());
    }
}
