//! [`Lease`]: consumption written on acquire, adjusted, then committed or rolled back.
//!
//! The acquire writes its consumption before returning, so concurrent callers see it at
//! once. Adjustments are buffered and written by [`Lease::commit`]; [`Lease::rollback`]
//! returns everything written (to the parent too, in a cascade). A lease dropped while open
//! rolls back in the background and logs at `warn`, like an uncommitted transaction.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;

use crate::limiter::{checked_amounts, named_amounts, Amount};
use crate::repository::AdjustRequest;
use crate::{Error, Limit, LimitStatus, RateLimiter};

/// One bucket item a lease charged: the entity's own, or its parent's in a cascade.
#[derive(Debug, Clone)]
pub(crate) struct LeaseItem {
    pub(crate) entity_id: String,
    pub(crate) resource: String,
    pub(crate) limits: Vec<Limit>,
}

#[derive(Debug)]
struct LeaseState {
    /// Per item, per limit: whole tokens written so far (acquire plus committed adjusts).
    written: Vec<Vec<i64>>,
    /// Per item, per limit: adjustments not yet written.
    pending: Vec<Vec<i64>>,
    closed: bool,
}

pub(crate) struct LeaseShared {
    limiter: RateLimiter,
    entity_id: String,
    resource: String,
    items: Vec<LeaseItem>,
    statuses: Vec<LimitStatus>,
    state: Mutex<LeaseState>,
    /// Serialises commit and rollback so their writes never interleave.
    writes: tokio::sync::Mutex<()>,
}

/// An admitted acquire. Commit it when the work is done, roll it back if it failed.
///
/// Dropping an open lease rolls it back in the background (with a `warn` log).
#[must_use = "a lease rolls back when dropped; commit it when the work is done"]
pub struct Lease {
    shared: Arc<LeaseShared>,
    /// Cleared once settling was handed off, so `Drop` does not roll back too.
    settles_on_drop: bool,
}

/// A shared view of a [`Lease`] (for a handler, through the HTTP layer): it can read the
/// lease and buffer adjustments, which the lease's owner writes when it commits.
#[derive(Clone)]
pub struct LeaseHandle {
    shared: Arc<LeaseShared>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shared.fmt_with("Lease", f)
    }
}

impl std::fmt::Debug for LeaseHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shared.fmt_with("LeaseHandle", f)
    }
}

impl LeaseShared {
    fn fmt_with(&self, name: &str, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct(name)
            .field("entity_id", &self.entity_id)
            .field("resource", &self.resource)
            .field("consumed", &self.consumed())
            .field("closed", &self.state.lock().closed)
            .finish()
    }

    fn consumed(&self) -> BTreeMap<String, i64> {
        let state = self.state.lock();
        let Some(item) = self.items.first() else {
            return BTreeMap::new();
        };
        item.limits
            .iter()
            .enumerate()
            .map(|(j, l)| (l.name.clone(), state.written[0][j] + state.pending[0][j]))
            .collect()
    }

    /// Buffers signed deltas by limit name for every item that has the limit.
    fn adjust(&self, deltas: &[(String, i128)]) -> Result<(), Error> {
        let deltas = checked_amounts("adjust", deltas, true)?;
        let mut state = self.state.lock();
        if state.closed {
            return Err(Error::LeaseClosed);
        }
        // Check first, apply after: a refused adjust changes nothing.
        for (name, delta) in &deltas {
            for (i, item) in self.items.iter().enumerate() {
                for (j, l) in item.limits.iter().enumerate() {
                    if &l.name == name
                        && i128::from(state.written[i][j])
                            + i128::from(state.pending[i][j])
                            + i128::from(*delta)
                            < 0
                    {
                        return Err(Error::validation(
                            format!("adjust.{name}"),
                            delta.to_string(),
                            "would refund more than the lease consumed",
                        ));
                    }
                }
            }
        }
        for (name, delta) in &deltas {
            for (i, item) in self.items.iter().enumerate() {
                for (j, l) in item.limits.iter().enumerate() {
                    if &l.name == name {
                        state.pending[i][j] += delta;
                    }
                }
            }
        }
        Ok(())
    }

    async fn write(&self, item: usize, deltas: &[i64]) -> Result<(), Error> {
        let it = &self.items[item];
        let deltas: Vec<(Limit, i64)> = it
            .limits
            .iter()
            .zip(deltas)
            .filter(|(_, d)| **d != 0)
            .map(|(l, d)| (l.clone(), *d))
            .collect();
        if deltas.is_empty() {
            return Ok(());
        }
        let request = AdjustRequest {
            entity_id: it.entity_id.clone(),
            resource: it.resource.clone(),
            deltas,
            now_ms: self.limiter.now_ms(),
        };
        self.limiter.inner.repo.adjust(&request).await
    }

    async fn commit(&self) -> Result<(), Error> {
        let _writing = self.writes.lock().await;
        loop {
            let snapshot = {
                let mut state = self.state.lock();
                if state.closed {
                    return Err(Error::LeaseClosed);
                }
                if state.pending.iter().flatten().all(|d| *d == 0) {
                    // Nothing (left) to write; an adjust racing the writes below was
                    // picked up by another turn of this loop.
                    state.closed = true;
                    return Ok(());
                }
                state.pending.clone()
            };
            for (i, deltas) in snapshot.iter().enumerate() {
                self.write(i, deltas).await?;
                let mut state = self.state.lock();
                for (j, d) in deltas.iter().enumerate() {
                    state.written[i][j] += d;
                    state.pending[i][j] -= d;
                }
            }
        }
    }

    async fn rollback(&self) -> Result<(), Error> {
        let _writing = self.writes.lock().await;
        let snapshot = {
            let state = self.state.lock();
            if state.closed {
                return Err(Error::LeaseClosed);
            }
            state.written.clone()
        };
        for (i, written) in snapshot.iter().enumerate() {
            let refund: Vec<i64> = written.iter().map(|w| -w).collect();
            self.write(i, &refund).await?;
            let mut state = self.state.lock();
            for (j, w) in written.iter().enumerate() {
                state.written[i][j] -= w;
            }
        }
        let mut state = self.state.lock();
        for p in state.pending.iter_mut().flatten() {
            *p = 0;
        }
        state.closed = true;
        Ok(())
    }
}

impl Lease {
    pub(crate) fn new(
        limiter: &RateLimiter,
        items: Vec<LeaseItem>,
        consumed: Vec<Vec<i64>>,
        statuses: Vec<LimitStatus>,
    ) -> Self {
        let pending = items.iter().map(|i| vec![0; i.limits.len()]).collect();
        Lease {
            shared: Arc::new(LeaseShared {
                limiter: limiter.clone(),
                entity_id: items[0].entity_id.clone(),
                resource: items[0].resource.clone(),
                statuses,
                state: Mutex::new(LeaseState {
                    written: consumed,
                    pending,
                    closed: false,
                }),
                items,
                writes: tokio::sync::Mutex::new(()),
            }),
            settles_on_drop: true,
        }
    }

    /// A lease admitted without a backend write (outage with `OnUnavailable::Allow`): it
    /// holds nothing, and every operation on it succeeds without writing.
    pub(crate) fn unlimited(limiter: &RateLimiter, entity_id: &str, resource: &str) -> Self {
        Lease {
            shared: Arc::new(LeaseShared {
                limiter: limiter.clone(),
                entity_id: entity_id.to_string(),
                resource: resource.to_string(),
                items: Vec::new(),
                statuses: Vec::new(),
                state: Mutex::new(LeaseState {
                    written: Vec::new(),
                    pending: Vec::new(),
                    closed: false,
                }),
                writes: tokio::sync::Mutex::new(()),
            }),
            settles_on_drop: true,
        }
    }

    /// The entity the lease charged.
    pub fn entity_id(&self) -> &str {
        &self.shared.entity_id
    }

    /// The resource.
    pub fn resource(&self) -> &str {
        &self.shared.resource
    }

    /// Every limit checked at acquire (child first, then the parent's), with what was
    /// available before this lease's consumption. Empty for a lease admitted during an
    /// outage.
    pub fn statuses(&self) -> &[LimitStatus] {
        &self.shared.statuses
    }

    /// Tokens the lease holds per limit of its entity: the consumption plus adjustments.
    pub fn consumed(&self) -> BTreeMap<String, i64> {
        self.shared.consumed()
    }

    /// Whether the lease was committed or rolled back.
    pub fn is_closed(&self) -> bool {
        self.shared.state.lock().closed
    }

    /// Whether the lease was admitted without a backend write during an outage
    /// (`OnUnavailable::Allow`).
    pub fn is_unlimited(&self) -> bool {
        self.shared.items.is_empty()
    }

    /// Changes the consumption by signed whole-token deltas per limit name: more when the
    /// work cost more than estimated (buckets may go into debt), less when it cost less.
    /// Names that match no limit are ignored. Written on [`Self::commit`].
    ///
    /// Fails with [`Error::LeaseClosed`] after commit or rollback, and with
    /// [`Error::Validation`] for a delta that would refund more than the lease consumed.
    pub async fn adjust<K: Into<String>, N: Amount>(
        &self,
        deltas: impl IntoIterator<Item = (K, N)>,
    ) -> Result<(), Error> {
        self.shared.adjust(&named_amounts(deltas))
    }

    /// Writes pending adjustments and closes the lease. On error the lease stays open
    /// (commit again, or roll back).
    pub async fn commit(&self) -> Result<(), Error> {
        self.shared.commit().await
    }

    /// Returns everything the lease consumed (to the parent too) and closes it. On error
    /// the lease stays open, and a later rollback or drop returns what is left.
    pub async fn rollback(&self) -> Result<(), Error> {
        self.shared.rollback().await
    }

    /// A shared handle for reading the lease and buffering adjustments.
    pub fn handle(&self) -> LeaseHandle {
        LeaseHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Applies the true cost reported after the work: for each named limit, adjusts by
    /// `actual - consumed`.
    pub(crate) fn settle_usage(&self, actual: &BTreeMap<String, u64>) -> Result<(), Error> {
        let consumed = self.consumed();
        let deltas: Vec<(String, i128)> = actual
            .iter()
            .filter_map(|(name, amount)| {
                consumed
                    .get(name)
                    .map(|c| (name.clone(), i128::from(*amount) - i128::from(*c)))
            })
            .filter(|(_, d)| *d != 0)
            .collect();
        self.shared.adjust(&deltas)
    }

    /// Commits (or rolls back) without waiting: done inline when the backend answers at
    /// once, else on the tokio runtime. Failures are logged.
    pub(crate) fn settle_detached(mut self, commit: bool, reason: &'static str) {
        self.settles_on_drop = false;
        let shared = Arc::clone(&self.shared);
        drop(self);
        if shared.items.is_empty() {
            return;
        }
        run_detached(async move {
            let result = if commit {
                shared.commit().await
            } else {
                shared.rollback().await
            };
            match result {
                Ok(()) | Err(Error::LeaseClosed) => {}
                Err(e) => tracing::error!(
                    entity_id = %shared.entity_id,
                    resource = %shared.resource,
                    error = %e,
                    reason,
                    "could not settle rate-limit lease"
                ),
            }
        });
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.settles_on_drop || self.is_unlimited() || self.is_closed() {
            return;
        }
        tracing::warn!(
            entity_id = %self.shared.entity_id,
            resource = %self.shared.resource,
            "lease dropped without commit or rollback; rolling back"
        );
        let shared = Arc::clone(&self.shared);
        run_detached(async move {
            if let Err(e) = shared.rollback().await {
                if !matches!(e, Error::LeaseClosed) {
                    tracing::error!(
                        entity_id = %shared.entity_id,
                        resource = %shared.resource,
                        error = %e,
                        "rollback of dropped lease failed"
                    );
                }
            }
        });
    }
}

impl LeaseHandle {
    /// The entity the lease charged.
    pub fn entity_id(&self) -> &str {
        &self.shared.entity_id
    }

    /// The resource.
    pub fn resource(&self) -> &str {
        &self.shared.resource
    }

    /// See [`Lease::statuses`].
    pub fn statuses(&self) -> &[LimitStatus] {
        &self.shared.statuses
    }

    /// See [`Lease::consumed`].
    pub fn consumed(&self) -> BTreeMap<String, i64> {
        self.shared.consumed()
    }

    /// Buffers signed deltas, as [`Lease::adjust`]; the lease's owner writes them.
    pub fn adjust<K: Into<String>, N: Amount>(
        &self,
        deltas: impl IntoIterator<Item = (K, N)>,
    ) -> Result<(), Error> {
        self.shared.adjust(&named_amounts(deltas))
    }

    /// Whether the lease was committed or rolled back.
    pub fn is_closed(&self) -> bool {
        self.shared.state.lock().closed
    }
}

/// Polls `fut` once inline (the in-memory backend finishes there, so tests see the effect
/// at once); if it is still pending, hands it to the current tokio runtime.
fn run_detached(fut: impl Future<Output = ()> + Send + 'static) {
    let mut fut = Box::pin(fut);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    if let Poll::Ready(()) = fut.as_mut().poll(&mut cx) {
        return;
    }
    match tokio::runtime::Handle::try_current() {
        Ok(handle) => {
            handle.spawn(fut);
        }
        Err(_) => tracing::error!(
            "a lease could not be settled: no tokio runtime to finish the backend write on"
        ),
    }
}
