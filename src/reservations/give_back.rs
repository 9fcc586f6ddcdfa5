//! Giving a slice's tokens back to the table: an ordinary credit, sent under one write id
//! and re-sent under the same id until it lands (so it lands once), tracked so a shutdown
//! can wait for the last ones.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::repository::{AdjustRequest, Repository, Shard};
use crate::{Error, Limit};

/// Give-backs in flight, so a shutdown can wait for them.
pub(super) struct GiveBacks {
    repo: Arc<dyn Repository>,
    in_flight: AtomicUsize,
    done: tokio::sync::Notify,
    pub issued: AtomicU64,
    metrics: Arc<crate::metrics::Metrics>,
}

/// One give-back: which item, which shard, and the credits.
#[derive(Debug, Clone)]
pub(super) struct Credit {
    pub entity_id: String,
    pub resource: String,
    pub shard: Shard,
    pub deltas: Vec<(Limit, i64)>,
    /// Moves the consumption count only (a top-up the backend admitted under a bypass
    /// took no tokens, so only its count is taken back).
    pub counts_only: bool,
}

impl Credit {
    /// A give-back of `deltas` (negative: credits) to one item.
    pub fn new(
        entity_id: &str,
        resource: &str,
        shard: Shard,
        deltas: Vec<(Limit, i64)>,
        counts_only: bool,
    ) -> Self {
        Credit {
            entity_id: entity_id.to_string(),
            resource: resource.to_string(),
            shard,
            deltas,
            counts_only,
        }
    }

    /// Takes back what was taken: each limit's amount as a credit.
    pub fn taking_back(
        entity_id: &str,
        resource: &str,
        shard: Shard,
        taken: impl IntoIterator<Item = (Limit, i64)>,
        counts_only: bool,
    ) -> Self {
        let deltas = taken.into_iter().map(|(l, t)| (l, -t)).collect();
        Self::new(entity_id, resource, shard, deltas, counts_only)
    }
}

impl GiveBacks {
    pub fn new(repo: Arc<dyn Repository>, metrics: Arc<crate::metrics::Metrics>) -> Arc<Self> {
        Arc::new(GiveBacks {
            repo,
            in_flight: AtomicUsize::new(0),
            done: tokio::sync::Notify::new(),
            issued: AtomicU64::new(0),
            metrics,
        })
    }

    /// Sends `credit` now and waits until it lands (or is refused for good).
    pub async fn send(self: &Arc<Self>, credit: Credit, now_ms: i64) -> Result<(), Error> {
        let _tracked = InFlight::start(self);
        self.deliver(credit, now_ms).await
    }

    /// Sends `credit` without waiting (polled once inline: an in-process backend lands it
    /// at once).
    pub fn send_detached(self: &Arc<Self>, credit: Credit, now_ms: i64) {
        let this = Arc::clone(self);
        let tracked = InFlight::start(self);
        crate::lease::run_detached(async move {
            let _tracked = tracked;
            if let Err(e) = this.deliver(credit, now_ms).await {
                tracing::error!(error = %e, "a reservation's give-back was refused; its tokens stay consumed until they refill");
            }
        });
    }

    async fn deliver(&self, credit: Credit, now_ms: i64) -> Result<(), Error> {
        self.issued.fetch_add(1, Ordering::Relaxed);
        self.metrics.give_back(&credit.resource);
        let request = AdjustRequest {
            entity_id: credit.entity_id,
            resource: credit.resource,
            deltas: credit.deltas,
            now_ms,
            // A lease id: unique across processes, never repeated in one.
            write_id: Some(format!("rsv-{:016x}", crate::lease::lease_id())),
            counts_only: credit.counts_only,
            shard: credit.shard,
        };
        tracing::debug!(
            entity_id = %request.entity_id,
            resource = %request.resource,
            shard = request.shard.index,
            credits = ?request.deltas.iter().map(|(l, d)| (l.name.as_str(), -d)).collect::<Vec<_>>(),
            "giving back a reservation"
        );
        let started = Instant::now();
        let mut attempt = 0u32;
        loop {
            match self.repo.adjust(&request).await {
                // Retried as a lease's settle is, inside DynamoDB's idempotency window.
                Err(e @ Error::Unavailable { .. })
                    if started.elapsed() < crate::lease::SETTLE_FOR =>
                {
                    if attempt == 0 {
                        tracing::warn!(error = %e, entity_id = %request.entity_id, "giving back a reservation failed; retrying until it lands");
                    }
                    tokio::time::sleep(crate::lease::settle_backoff(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Waits until every give-back sent so far has finished.
    pub async fn settled(&self) {
        loop {
            let notified = self.done.notified();
            if self.in_flight.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Counts a give-back as in flight until dropped.
struct InFlight(Arc<GiveBacks>);

impl InFlight {
    fn start(g: &Arc<GiveBacks>) -> Self {
        g.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(g))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.done.notify_waiters();
        }
    }
}
