//! [`Lease`]: consumption written on acquire, adjusted, then committed or rolled back.
//!
//! The acquire writes its consumption before returning, so concurrent callers see it at
//! once. Adjustments are buffered and written by [`Lease::commit`]; [`Lease::rollback`]
//! returns everything written (to the parent too, in a cascade). A lease dropped while open
//! rolls back in the background and logs at `warn`, like an uncommitted transaction.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use std::task::Context;
/// A lease's shared part is reference counted without weak references, so checking that
/// nothing else holds it (three times per acquire) is a load, not a compare-and-swap.
use triomphe::Arc as LeaseArc;

use parking_lot::Mutex;
use smallvec::SmallVec;

use crate::amount::{checked_amounts, named_amounts, Amount};
use crate::repository::{
    statuses, AcquireOutcome, AcquireRequest, AdjustRequest, ItemRequest, Items, LimitCheck,
};
use crate::{Error, Limit, LimitStatus, RateLimiter};

/// [`LeaseShared::phase`]: as admitted, nothing has locked the state yet.
const ADMITTED: u8 = 0;
/// [`LeaseShared::phase`]: an adjust, commit or rollback has locked the state.
const TOUCHED: u8 = 1;
/// [`LeaseShared::phase`]: the owner closed the lease before anything touched it.
const CLOSED_UNTOUCHED: u8 = 2;

/// Whole tokens per limit of every item: inline for the usual few limits.
type LeaseAmounts = SmallVec<[i64; 2]>;

/// What [`LeaseShared::try_close_without_write`] did: one byte, so the usual close is
/// answered in a register rather than as a whole `Result` written to memory and read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    /// Closed now, nothing to write.
    Closed,
    /// Closed before (committed or rolled back).
    AlreadyClosed,
    /// A write to do, or one under way to wait for.
    Pending,
}

impl Close {
    /// The commit's result when it closed without a write; `None` if a write is needed.
    #[inline]
    fn result(self) -> Option<Result<(), Error>> {
        match self {
            Close::Closed => Some(Ok(())),
            Close::AlreadyClosed => Some(Err(Error::LeaseClosed)),
            Close::Pending => None,
        }
    }
}

#[derive(Debug)]
struct LeaseState {
    /// Per limit of every item (flattened in item order): whole tokens written so far
    /// (the acquire plus committed adjustments).
    written: LeaseAmounts,
    /// Per limit of every item: adjustments not yet written.
    pending: LeaseAmounts,
    closed: bool,
    /// A write that failed with an unknown outcome: re-issued (same id, same deltas)
    /// before anything else is written, so it lands exactly once.
    /// Boxed: rare, and kept out of every lease's allocation.
    in_doubt: Option<Box<InDoubt>>,
    /// Item writes issued so far (for write ids).
    writes_issued: u32,
    /// Random, for write ids unique across processes: drawn at the first write (a lease
    /// settled without one, the usual in-memory case, never needs it).
    id: Option<u64>,
    /// A commit or rollback holds the writes lock (see [`Settling`]).
    settling: bool,
}

/// Marks a commit or rollback under way for as long as it holds the writes lock, so the
/// lock-free close of [`LeaseShared::try_close_without_write`] never races one.
struct Settling<'a>(&'a LeaseShared);

impl<'a> Settling<'a> {
    fn start(shared: &'a LeaseShared) -> Self {
        let mut state = shared.state.lock();
        shared.touch();
        state.settling = true;
        drop(state);
        Settling(shared)
    }
}

impl Drop for Settling<'_> {
    fn drop(&mut self) {
        self.0.state.lock().settling = false;
    }
}

/// An item write whose outcome is unknown.
#[derive(Debug, Clone)]
struct InDoubt {
    item: usize,
    deltas: LeaseAmounts,
    write_id: String,
    /// A commit moves pending to written; a rollback only moves written.
    commit: bool,
}

pub(crate) struct LeaseShared {
    /// `None` only while a [`Prepared`] lease is decided: the acquire's own limiter is
    /// moved in when it is admitted (a clone would touch the limiter's reference count,
    /// which every thread shares, once more per request).
    limiter: Option<RateLimiter>,
    /// The acquire's request: the items charged (the entity's own, then its parent's in a
    /// cascade). Held whole, so the hot path decides on it in place (see [`Prepared`]).
    request: AcquireRequest,
    /// The backend's answer: written here in place by an in-process backend
    /// ([`crate::Repository::acquire_now_into`]), moved in for an awaited one.
    outcome: AcquireOutcome,
    statuses: OnceLock<Vec<LimitStatus>>,
    /// Set when the [`Lease`] (not a handle) committed or rolled back, so its `Drop` knows
    /// the lease is closed without taking the state's lock (a plain store and load).
    closed_by_owner: AtomicBool,
    /// Set once the [`Lease`] handed its settling off, so its `Drop` does not roll back.
    settle_handed_off: AtomicBool,
    /// [`ADMITTED`] until an adjust, commit or rollback first locks the state
    /// ([`TOUCHED`]), or the owner closes the untouched lease ([`CLOSED_UNTOUCHED`]).
    /// Whichever moves it first wins, so closing a lease with nothing pending needs one
    /// compare-and-swap instead of taking and releasing the state's lock.
    phase: AtomicU8,
    /// Admitted during an outage without a write: holds nothing.
    unlimited: bool,
    state: Mutex<LeaseState>,
    /// Serialises commit and rollback so their writes never interleave.
    writes: tokio::sync::Mutex<()>,
}

/// An admitted acquire. Commit it when the work is done, roll it back if it failed.
///
/// Dropping an open lease rolls it back in the background (with a `warn` log).
#[must_use = "a lease rolls back when dropped; commit it when the work is done"]
pub struct Lease {
    /// Taken only when the lease is dropped (to keep its allocation for the next lease).
    /// The lease is this one pointer: it is moved through every acquire's result.
    shared: Option<LeaseArc<LeaseShared>>,
}

/// The future of [`Lease::commit`]. The usual commit, with nothing to write, closes the
/// lease when first polled, inline in the caller (no future of its own to run, no result
/// written to memory and read back); one with adjustments to write runs the write.
#[must_use = "a commit does nothing until it is awaited"]
pub struct Commit<'a> {
    lease: &'a Lease,
    /// The write, once the lease could not be closed without one.
    writing: Option<crate::limiter::BoxFuture<'a, Result<(), Error>>>,
}

impl std::fmt::Debug for Commit<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commit")
            .field("lease", self.lease)
            .field("writing", &self.writing.is_some())
            .finish()
    }
}

impl Future for Commit<'_> {
    type Output = Result<(), Error>;

    #[inline]
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let lease = self.lease;
        let writing = match &mut self.writing {
            Some(writing) => writing,
            // Closed without a write (`Ok`, or `LeaseClosed`): no failure to count.
            None => match lease.shared().try_close_without_write() {
                Close::Closed => {
                    lease
                        .shared()
                        .closed_by_owner
                        .store(true, Ordering::Relaxed);
                    return std::task::Poll::Ready(Ok(()));
                }
                Close::AlreadyClosed => return std::task::Poll::Ready(Err(Error::LeaseClosed)),
                Close::Pending => self.writing.insert(Box::pin(lease.commit_with_write())),
            },
        };
        let result = std::task::ready!(writing.as_mut().poll(cx));
        self.writing = None;
        std::task::Poll::Ready(result)
    }
}

/// A shared view of a [`Lease`] (for a handler, through the HTTP layer): it can read the
/// lease and buffer adjustments, which the lease's owner writes when it commits.
#[derive(Clone)]
pub struct LeaseHandle {
    shared: LeaseArc<LeaseShared>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.shared().fmt_with("Lease", f)
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
            .field("entity_id", &self.entity_id())
            .field("resource", &self.resource())
            .field("consumed", &self.consumed())
            .field("closed", &self.is_closed())
            .finish()
    }

    fn entity_id(&self) -> &str {
        &self.request.items[0].entity_id
    }

    /// Whether the lease was committed or rolled back: under the state's lock, or by its
    /// owner untouched (see [`Self::try_close_without_write`]).
    fn is_closed(&self) -> bool {
        self.phase.load(Ordering::Acquire) == CLOSED_UNTOUCHED || self.state.lock().closed
    }

    /// [`Self::is_closed`], the state locked and touched (see [`Self::touch`]).
    fn closed_in(&self, state: &LeaseState) -> bool {
        state.closed || self.phase.load(Ordering::Acquire) == CLOSED_UNTOUCHED
    }

    /// Marks the state touched, under its lock, before reading or changing it; from here
    /// on the owner closes the lease only under the lock.
    fn touch(&self) {
        if self.phase.load(Ordering::Acquire) == ADMITTED {
            // Lost to the owner's close: `closed_in` reports the lease closed.
            let _ =
                self.phase
                    .compare_exchange(ADMITTED, TOUCHED, Ordering::AcqRel, Ordering::Acquire);
        }
    }

    /// Clears a settled lease for reuse, to what [`Lease::prepare_empty`] makes (every
    /// field named, so one added later cannot be missed).
    fn clear(&mut self) {
        let LeaseShared {
            limiter,
            request,
            outcome,
            statuses,
            closed_by_owner,
            settle_handed_off,
            phase,
            unlimited,
            state,
            // Unlocked: nothing else holds the lease.
            writes: _,
        } = self;
        *closed_by_owner.get_mut() = false;
        *settle_handed_off.get_mut() = false;
        *phase.get_mut() = ADMITTED;
        *limiter = None;
        request.items.clear();
        outcome.clear();
        statuses.take();
        *unlimited = false;
        let LeaseState {
            written,
            pending,
            closed,
            in_doubt,
            writes_issued,
            id,
            settling,
        } = state.get_mut();
        written.clear();
        pending.clear();
        *closed = false;
        *in_doubt = None;
        *writes_issued = 0;
        *id = None;
        *settling = false;
    }

    /// The limiter that admitted the lease.
    fn limiter(&self) -> &RateLimiter {
        match &self.limiter {
            Some(limiter) => limiter,
            None => unreachable!("a lease is made only once its limiter is set"),
        }
    }

    fn resource(&self) -> &str {
        &self.request.items[0].resource
    }

    fn statuses(&self) -> &[LimitStatus] {
        self.statuses
            .get_or_init(|| statuses(&self.request.items, &self.outcome.checks))
    }

    /// (item, limit, flat index) for every limit of every item.
    fn slots(&self) -> impl Iterator<Item = (usize, &Limit, usize)> {
        self.request
            .items
            .iter()
            .enumerate()
            .flat_map(|(i, item)| item.limits.iter().map(move |l| (i, l)))
            .enumerate()
            .map(|(flat, (i, l))| (i, l, flat))
    }

    fn consumed(&self) -> BTreeMap<String, i64> {
        let state = self.state.lock();
        self.slots()
            .filter(|(i, _, _)| *i == 0)
            .map(|(_, l, k)| (l.name.clone(), state.written[k] + state.pending[k]))
            .collect()
    }

    /// Buffers signed deltas by limit name for every item that has the limit.
    fn adjust(&self, deltas: &[(String, i128)]) -> Result<(), Error> {
        let deltas = checked_amounts("adjust", deltas, true)?;
        let mut state = self.state.lock();
        self.touch();
        if self.closed_in(&state) {
            return Err(Error::LeaseClosed);
        }
        // Compute every new total first and apply after, so a refused adjust changes
        // nothing (a name given twice counts twice).
        let mut next = state.pending.clone();
        for (name, delta) in &deltas {
            for (_, l, k) in self.slots() {
                if &l.name != name {
                    continue;
                }
                let pending = i128::from(next[k]) + i128::from(*delta);
                let total = i128::from(state.written[k]) + pending;
                if total < 0 {
                    return Err(Error::validation(
                        format!("adjust.{name}"),
                        delta.to_string(),
                        "would refund more than the lease consumed",
                    ));
                }
                if total > i128::from(crate::limit::MAX_TOKENS) {
                    return Err(Error::validation(
                        format!("adjust.{name}"),
                        delta.to_string(),
                        format!(
                            "would make the lease hold more than {} tokens",
                            crate::limit::MAX_TOKENS
                        ),
                    ));
                }
                next[k] = pending as i64;
            }
        }
        state.pending = next;
        Ok(())
    }

    /// Writes one item's deltas (those that are not zero) under `write_id`.
    async fn write(&self, item: &ItemRequest, deltas: &[i64], write_id: &str) -> Result<(), Error> {
        let changes: Vec<(Limit, i64)> = item
            .limits
            .iter()
            .zip(deltas)
            .filter(|(_, d)| **d != 0)
            .map(|(l, d)| (l.clone(), *d))
            .collect();
        if changes.is_empty() {
            return Ok(());
        }
        let request = AdjustRequest {
            entity_id: item.entity_id.to_string(),
            resource: item.resource.to_string(),
            deltas: changes,
            now_ms: self.limiter().now_ms(),
            write_id: Some(write_id.to_string()),
            counts_only: item.bypass,
            shard: item.shard,
        };
        self.limiter().inner.repo.adjust(&request).await
    }

    /// Where item `index`'s limits start in the flat amounts.
    fn item_start(&self, index: usize) -> usize {
        self.request.items[..index]
            .iter()
            .map(|i| i.limits.len())
            .sum()
    }

    /// Records a written item's deltas.
    fn record(state: &mut LeaseState, start: usize, deltas: &[i64], commit: bool) {
        for (k, d) in deltas.iter().enumerate() {
            state.written[start + k] += d;
            if commit {
                state.pending[start + k] -= d;
            }
        }
    }

    /// Re-issues a write whose outcome was unknown, same id and deltas, so it lands exactly
    /// once before anything else is written. Still unknown: the error, and it stays.
    async fn resolve_in_doubt(&self) -> Result<(), Error> {
        let Some(doubt) = self.state.lock().in_doubt.clone() else {
            return Ok(());
        };
        let result = self
            .write(
                &self.request.items[doubt.item],
                &doubt.deltas,
                &doubt.write_id,
            )
            .await;
        let mut state = self.state.lock();
        match result {
            Ok(()) => {
                let start = self.item_start(doubt.item);
                Self::record(&mut state, start, &doubt.deltas, doubt.commit);
                state.in_doubt = None;
                Ok(())
            }
            Err(e @ Error::Unavailable { .. }) => Err(e),
            // A definite refusal (the debt bound): it did not land and will not.
            Err(e) => {
                state.in_doubt = None;
                tracing::warn!(error = %e, "a lease write that was in doubt was refused; dropped");
                Ok(())
            }
        }
    }

    /// Closes the lease at once if nothing is pending and no commit or rollback is under
    /// way; [`Close::Pending`] if there is a write to do or to wait for.
    fn try_close_without_write(&self) -> Close {
        // Untouched since admission (no adjust, no commit or rollback begun): nothing is
        // pending or to write, so one compare-and-swap closes it, without the state's lock.
        if self.phase.load(Ordering::Acquire) == ADMITTED
            && self
                .phase
                .compare_exchange(
                    ADMITTED,
                    CLOSED_UNTOUCHED,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Close::Closed;
        }
        // Nothing pending and no commit or rollback under way (the usual commit): closed
        // without the writes lock.
        {
            let mut state = self.state.lock();
            self.touch();
            if !self.closed_in(&state)
                && !state.settling
                && state.in_doubt.is_none()
                && state.pending.iter().all(|d| *d == 0)
            {
                state.closed = true;
                return Close::Closed;
            }
        }
        let Ok(_writing) = self.writes.try_lock() else {
            return Close::Pending;
        };
        let mut state = self.state.lock();
        if self.closed_in(&state) {
            return Close::AlreadyClosed;
        }
        if state.pending.iter().all(|d| *d == 0) {
            state.closed = true;
            return Close::Closed;
        }
        Close::Pending
    }

    async fn commit(&self) -> Result<(), Error> {
        if let Some(done) = self.try_close_without_write().result() {
            return done;
        }
        let _writing = self.writes.lock().await;
        let _settling = Settling::start(self);
        self.resolve_in_doubt().await?;
        loop {
            let snapshot = {
                let mut state = self.state.lock();
                if self.closed_in(&state) {
                    return Err(Error::LeaseClosed);
                }
                if state.pending.iter().all(|d| *d == 0) {
                    // Nothing (left) to write; an adjust racing the writes below was
                    // picked up by another turn of this loop.
                    state.closed = true;
                    return Ok(());
                }
                state.pending.clone()
            };
            self.apply(&snapshot, true).await?;
        }
    }

    /// Writes `deltas` (flat, every item's limits in order) item by item, recording each
    /// item's part once it is written, so a failure part-way leaves an exact account of
    /// what remains. A write that fails with [`Error::Unavailable`] may still have landed:
    /// it is kept in doubt and re-issued before anything else.
    async fn apply(&self, deltas: &[i64], commit: bool) -> Result<(), Error> {
        let mut start = 0;
        for (index, item) in self.request.items.iter().enumerate() {
            let end = start + item.limits.len();
            let part = &deltas[start..end];
            if part.iter().any(|d| *d != 0) {
                let write_id = {
                    let mut state = self.state.lock();
                    state.writes_issued += 1;
                    let id = *state.id.get_or_insert_with(lease_id);
                    format!("{id:016x}-{}", state.writes_issued)
                };
                if let Err(e) = self.write(item, part, &write_id).await {
                    if matches!(e, Error::Unavailable { .. }) {
                        self.state.lock().in_doubt = Some(Box::new(InDoubt {
                            item: index,
                            deltas: part.into(),
                            write_id,
                            commit,
                        }));
                    }
                    return Err(e);
                }
                Self::record(&mut self.state.lock(), start, part, commit);
            }
            start = end;
        }
        Ok(())
    }

    async fn rollback(&self) -> Result<(), Error> {
        let _writing = self.writes.lock().await;
        let _settling = Settling::start(self);
        self.resolve_in_doubt().await?;
        let refund: LeaseAmounts = {
            let state = self.state.lock();
            if self.closed_in(&state) {
                return Err(Error::LeaseClosed);
            }
            state.written.iter().map(|w| -w).collect()
        };
        self.apply(&refund, false).await?;
        let mut state = self.state.lock();
        state.pending.iter_mut().for_each(|p| *p = 0);
        state.closed = true;
        Ok(())
    }
}

impl Lease {
    /// A lease's shared part allocated before the backend decides, with `request` in it,
    /// so an acquire decided at once builds its request once and never moves it again.
    pub(crate) fn prepare(request: AcquireRequest) -> Prepared {
        let mut prepared = Self::prepare_empty(request.now_ms);
        prepared.extend(request.items);
        prepared
    }

    /// [`Self::prepare`] with no item yet: the items are pushed into place after (see
    /// [`Prepared::extend`]), and the limiter is moved in when it is admitted
    /// ([`Prepared::admit`]).
    pub(crate) fn prepare_empty(now_ms: i64) -> Prepared {
        if let Some(mut kept) = spare::take() {
            if let Some(shared) = LeaseArc::get_mut(&mut kept) {
                shared.request.now_ms = now_ms;
                return Prepared(kept);
            }
        }
        Prepared(LeaseArc::new(LeaseShared {
            limiter: None,
            state: Mutex::new(LeaseState {
                pending: LeaseAmounts::new(),
                written: LeaseAmounts::new(),
                closed: false,
                in_doubt: None,
                writes_issued: 0,
                id: None,
                settling: false,
            }),
            request: AcquireRequest {
                items: Items::new(),
                now_ms,
            },
            outcome: AcquireOutcome::default(),
            statuses: OnceLock::new(),
            closed_by_owner: AtomicBool::new(false),
            settle_handed_off: AtomicBool::new(false),
            phase: AtomicU8::new(ADMITTED),
            unlimited: false,
            writes: tokio::sync::Mutex::new(()),
        }))
    }

    /// A lease admitted without a backend write (outage with `OnUnavailable::Allow`): it
    /// holds nothing, and every operation on it succeeds without writing.
    pub(crate) fn unlimited(limiter: &RateLimiter, entity_id: &str, resource: &str) -> Self {
        let item = ItemRequest {
            entity_id: entity_id.into(),
            resource: resource.into(),
            limits: Arc::from(Vec::new()),
            amounts: crate::repository::Amounts::new(),
            expires_when_idle: true,
            owner: None,
            bypass: false,
            shard: Default::default(),
        };
        let mut prepared = Self::prepare_empty(0);
        prepared.extend([item]);
        let shared = prepared.shared_mut();
        shared.unlimited = true;
        shared.limiter = Some(limiter.clone());
        prepared.into_lease()
    }

    /// The items and checks, for the HTTP layer's header fields.
    pub(crate) fn parts(&self) -> (&[ItemRequest], &[LimitCheck]) {
        (&self.shared().request.items, &self.shared().outcome.checks)
    }

    /// The entity the lease charged.
    pub fn entity_id(&self) -> &str {
        self.shared().entity_id()
    }

    /// The resource.
    pub fn resource(&self) -> &str {
        self.shared().resource()
    }

    /// Every limit checked at acquire (child first, then the parent's), with what was
    /// available before this lease's consumption. Empty for a lease admitted during an
    /// outage.
    pub fn statuses(&self) -> &[LimitStatus] {
        self.shared().statuses()
    }

    /// Tokens the lease holds per limit of its entity: the consumption plus adjustments.
    pub fn consumed(&self) -> BTreeMap<String, i64> {
        self.shared().consumed()
    }

    /// Whether the lease was committed or rolled back.
    pub fn is_closed(&self) -> bool {
        self.shared().is_closed()
    }

    /// Whether the lease was admitted without a backend write during an outage
    /// (`OnUnavailable::Allow`).
    pub fn is_unlimited(&self) -> bool {
        self.shared().unlimited
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
        self.shared().adjust(&named_amounts(deltas))
    }

    /// Writes pending adjustments and closes the lease. On error the lease stays open
    /// (commit again, or roll back).
    ///
    /// With a backend that sets an operation timeout (DynamoDB's `.timeout(..)`), the
    /// wait is bounded by it, retries included: past it this returns
    /// [`Error::Unavailable`] while the write goes on in the background and lands at most
    /// once (a later `rollback` then finds the lease closed if it landed).
    #[inline]
    pub fn commit(&self) -> Commit<'_> {
        Commit {
            lease: self,
            writing: None,
        }
    }

    /// [`Self::commit`] with a write to make (or one under way to wait for).
    async fn commit_with_write(&self) -> Result<(), Error> {
        let result = bounded(self.shared(), "commit", |shared| async move {
            shared.commit().await
        })
        .await;
        self.count_failure(&result);
        self.note_closed(&result);
        result
    }

    /// Remembers a commit or rollback of this handle that closed the lease.
    fn note_closed(&self, result: &Result<(), Error>) {
        if result.is_ok() {
            self.shared().closed_by_owner.store(true, Ordering::Relaxed);
        }
    }

    /// Counts a commit or rollback that failed (not one on a lease already closed).
    fn count_failure(&self, result: &Result<(), Error>) {
        if matches!(result, Err(e) if !matches!(e, Error::LeaseClosed)) {
            let shared = self.shared();
            shared
                .limiter()
                .inner
                .metrics
                .settle_failure(shared.resource());
        }
    }

    /// Returns everything the lease consumed (to the parent too) and closes it. On error
    /// the lease stays open, and a later rollback or drop returns what is left.
    ///
    /// Bounded by the backend's operation timeout as [`Self::commit`] is.
    pub async fn rollback(&self) -> Result<(), Error> {
        let result = bounded(self.shared(), "rollback", |shared| async move {
            shared.rollback().await
        })
        .await;
        self.count_failure(&result);
        self.note_closed(&result);
        result
    }

    /// A shared handle for reading the lease and buffering adjustments.
    pub fn handle(&self) -> LeaseHandle {
        LeaseHandle {
            shared: LeaseArc::clone(self.shared()),
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
        self.shared().adjust(&deltas)
    }

    /// Commits (or rolls back) without waiting: done inline when the backend answers at
    /// once, else on the tokio runtime. Failures are logged.
    pub(crate) fn settle_detached(mut self, commit: bool, reason: &'static str) {
        self.shared()
            .settle_handed_off
            .store(true, Ordering::Relaxed);
        if self.shared().unlimited {
            return;
        }
        // The common case, a commit with nothing to write, needs no future at all.
        if commit && self.shared().try_close_without_write() != Close::Pending {
            return;
        }
        let Some(shared) = self.shared.take() else {
            return;
        };
        drop(self);
        run_detached(settle_with_retries(shared, commit, reason));
    }

    /// The shared part (taken only by `Drop`).
    fn shared(&self) -> &LeaseArc<LeaseShared> {
        match &self.shared {
            Some(shared) => shared,
            None => unreachable!("a lease's shared part is taken only when it is dropped"),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        if shared.settle_handed_off.load(Ordering::Relaxed)
            || shared.closed_by_owner.load(Ordering::Relaxed)
            || shared.unlimited
            || shared.state.lock().closed
        {
            spare::keep(shared);
            return;
        }
        tracing::warn!(
            entity_id = %shared.entity_id(),
            resource = %shared.resource(),
            "lease dropped without commit or rollback; rolling back"
        );
        run_detached(settle_with_retries(shared, false, "lease dropped"));
    }
}

/// Settled leases kept for reuse, a few per thread: the next acquire on the thread takes
/// one instead of allocating (and copying) a new one.
mod spare {
    use std::cell::RefCell;

    use super::{LeaseArc, LeaseShared};

    /// Leases kept per thread: about 14 KiB, enough for the leases a thread settles
    /// between its acquires; past it, leases are freed as usual.
    pub(super) const KEPT: usize = 32;

    thread_local! {
        static SPARE: RefCell<Vec<LeaseArc<LeaseShared>>> = const { RefCell::new(Vec::new()) };
    }

    /// Keeps a settled lease's allocation if nothing else holds it (a `LeaseHandle` kept
    /// past the lease, a write still under way), cleared.
    pub(super) fn keep(mut shared: LeaseArc<LeaseShared>) {
        // Not on a thread being torn down, not re-entered, and only while there is room.
        let _ = SPARE.try_with(|spare| {
            let Ok(mut spare) = spare.try_borrow_mut() else {
                return;
            };
            if spare.len() >= KEPT {
                return;
            }
            if let Some(unshared) = LeaseArc::get_mut(&mut shared) {
                unshared.clear();
                spare.push(shared);
            }
        });
    }

    /// How many leases this thread keeps.
    #[cfg(test)]
    pub(super) fn kept() -> usize {
        SPARE.with(|spare| spare.borrow().len())
    }

    /// A kept lease, if this thread has one.
    pub(super) fn take() -> Option<LeaseArc<LeaseShared>> {
        SPARE
            .try_with(|spare| spare.try_borrow_mut().ok()?.pop())
            .ok()
            .flatten()
    }
}

impl LeaseHandle {
    /// The entity the lease charged.
    pub fn entity_id(&self) -> &str {
        self.shared.entity_id()
    }

    /// The resource.
    pub fn resource(&self) -> &str {
        self.shared.resource()
    }

    /// See [`Lease::statuses`].
    pub fn statuses(&self) -> &[LimitStatus] {
        self.shared.statuses()
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
        self.shared.is_closed()
    }
}

/// Runs a lease write, bounded by the backend's operation timeout when it has one: the
/// write runs as a task of its own, so giving up waiting never cancels it half-way (it
/// finishes in the background and records what it wrote).
async fn bounded<F, Fut>(
    shared: &LeaseArc<LeaseShared>,
    what: &'static str,
    write: F,
) -> Result<(), Error>
where
    F: FnOnce(LeaseArc<LeaseShared>) -> Fut,
    Fut: Future<Output = Result<(), Error>> + Send + 'static,
{
    let limit = shared.limiter().inner.repo.operation_timeout();
    match (limit, tokio::runtime::Handle::try_current()) {
        (Some(limit), Ok(runtime)) => {
            let task = runtime.spawn(write(LeaseArc::clone(shared)));
            within(limit, what, task).await
        }
        _ => write(LeaseArc::clone(shared)).await,
    }
}

/// Waits for `task` at most `limit`; past it, [`Error::Unavailable`] (the task goes on).
async fn within<T>(
    limit: std::time::Duration,
    what: &str,
    task: tokio::task::JoinHandle<Result<T, Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, task).await {
        Ok(result) => joined(result, what),
        Err(_) => Err(Error::Unavailable {
            message: format!(
                "the {what} did not finish within the configured timeout of {limit:?}; it goes \
                 on in the background and is applied at most once"
            ),
            source: None,
        }),
    }
}

/// The result of a finished task: its own, a panic passed on, or `Unavailable` when its
/// runtime cancelled it.
pub(crate) fn joined<T>(
    result: Result<Result<T, Error>, tokio::task::JoinError>,
    what: &str,
) -> Result<T, Error> {
    match result {
        Ok(result) => result,
        Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
        Err(join) => Err(Error::unavailable(
            format!("the {what} was cancelled (its runtime is shutting down)"),
            join,
        )),
    }
}

/// Commits or rolls back a lease nobody awaits any more. A write that fails for a passing
/// reason (network, throttling, a timeout) is retried with backoff until it lands, for as
/// long as the backend can still tell a re-sent write from a new one (DynamoDB's ten-minute
/// idempotency window); the lease stays open between tries and re-issues a write in doubt
/// first, so nothing is lost or doubled. Only then is giving up logged, at `error`.
async fn settle_with_retries(shared: LeaseArc<LeaseShared>, commit: bool, reason: &'static str) {
    let started = std::time::Instant::now();
    let mut attempt = 0u32;
    loop {
        let result = if commit {
            shared.commit().await
        } else {
            shared.rollback().await
        };
        match result {
            Ok(()) | Err(Error::LeaseClosed) => {
                if attempt > 0 {
                    tracing::info!(
                        entity_id = %shared.entity_id(),
                        resource = %shared.resource(),
                        attempts = attempt + 1,
                        "settled rate-limit lease after retries"
                    );
                }
                return;
            }
            Err(e @ Error::Unavailable { .. }) if started.elapsed() < SETTLE_FOR => {
                shared
                    .limiter()
                    .inner
                    .metrics
                    .settle_retry(shared.resource());
                // Once per lease at `warn`; the retries after it at `debug`.
                if attempt == 0 {
                    tracing::warn!(
                        entity_id = %shared.entity_id(),
                        resource = %shared.resource(),
                        error = %e,
                        reason,
                        "settling rate-limit lease failed; retrying until it lands"
                    );
                } else {
                    tracing::debug!(error = %e, attempt, "settling rate-limit lease: retrying");
                }
                tokio::time::sleep(settle_backoff(attempt)).await;
                attempt += 1;
            }
            Err(e) => {
                shared
                    .limiter()
                    .inner
                    .metrics
                    .settle_failure(shared.resource());
                tracing::error!(
                    entity_id = %shared.entity_id(),
                    resource = %shared.resource(),
                    error = %e,
                    reason,
                    attempts = attempt + 1,
                    "could not settle rate-limit lease; giving up"
                );
                return;
            }
        }
    }
}

/// How long a background settle keeps retrying a backend that is unavailable.
pub(crate) const SETTLE_FOR: std::time::Duration = std::time::Duration::from_secs(9 * 60);

/// 100 ms, doubling, at most 5 s.
pub(crate) fn settle_backoff(attempt: u32) -> std::time::Duration {
    std::time::Duration::from_millis(100u64.saturating_mul(1 << attempt.min(6)).min(5_000))
}

/// A random lease id (write ids must not collide across processes sharing a table).
/// A lease id: a random per-process base (drawn once, with the process id) mixed with a
/// sequence number unique in the process, so ids differ across processes and never
/// repeat within one. Each thread takes a block of 2^20 numbers from a shared counter
/// and counts through it on its own, so the hot path pays no atomic operation and no
/// system call.
pub(crate) fn lease_id() -> u64 {
    use std::cell::Cell;
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    const BLOCK: u64 = 1 << 20;
    static BASE: OnceLock<u64> = OnceLock::new();
    static BLOCKS: AtomicU64 = AtomicU64::new(0);
    thread_local! {
        /// The next number of this thread's block, and the block's end.
        static NEXT: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    }
    let base = *BASE.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    });
    let sequence = NEXT.with(|next| {
        let (mut at, mut end) = next.get();
        if at == end {
            at = BLOCKS.fetch_add(1, Ordering::Relaxed).wrapping_mul(BLOCK);
            end = at.wrapping_add(BLOCK);
        }
        next.set((at.wrapping_add(1), end));
        at
    });
    // Odd multiplier: distinct sequence numbers give distinct ids.
    base ^ sequence.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Runs `fut` to completion without the caller waiting: polled once inline (the in-memory
/// backend finishes there, so callers see the effect at once), then handed to the current
/// tokio runtime.
///
/// Off any runtime (a lease dropped by blocking code, or after its runtime shut down), the
/// future is polled inside a runtime of its own and finished on a thread of its own: a
/// backend's timers and sockets need a reactor, and polling them without one panics (which,
/// in a drop during unwinding, would abort the process).
pub(crate) fn run_detached(fut: impl Future<Output = ()> + Send + 'static) {
    let mut fut = Box::pin(fut);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        if fut.as_mut().poll(&mut cx).is_pending() {
            handle.spawn(fut);
        }
        return;
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "a lease could not be settled: no tokio runtime could be started to finish the backend write on");
            return;
        }
    };
    let ready = {
        let _context = runtime.enter();
        fut.as_mut().poll(&mut cx).is_ready()
    };
    if ready {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("zae-limiter-settle".into())
        .spawn(move || runtime.block_on(fut));
    if let Err(e) = spawned {
        tracing::error!(error = %e, "a lease could not be settled: no thread could be started to finish the backend write on");
    }
}

/// A lease whose acquire is being decided (see [`Lease::prepare`]): nothing was consumed
/// yet, so dropping it writes nothing.
pub(crate) struct Prepared(LeaseArc<LeaseShared>);

impl Prepared {
    /// The shared part, which nothing else holds before the lease is made.
    fn shared_mut(&mut self) -> &mut LeaseShared {
        match LeaseArc::get_mut(&mut self.0) {
            Some(shared) => shared,
            // `Prepared` is neither cloned nor handed out before it becomes a lease.
            None => unreachable!("a prepared lease is not shared"),
        }
    }

    /// The lease, settled (rolled back) on drop from here on.
    fn into_lease(self) -> Lease {
        Lease {
            shared: Some(self.0),
        }
    }

    /// Adds items to the request.
    pub(crate) fn extend(&mut self, items: impl IntoIterator<Item = ItemRequest>) {
        for item in items {
            self.push(item);
        }
    }

    /// Adds one item to the request, moved into place once.
    #[inline]
    pub(crate) fn push(&mut self, item: ItemRequest) {
        let shared = self.shared_mut();
        let state = shared.state.get_mut();
        for amount in &item.amounts {
            state.written.push(*amount as i64);
            state.pending.push(0);
        }
        shared.request.items.push(item);
    }

    /// The request to decide.
    pub(crate) fn request(&self) -> &AcquireRequest {
        &self.0.request
    }

    /// The backend's answer written in place, next to the request it answers (see
    /// [`crate::Repository::acquire_now_into`]).
    pub(crate) fn decide_in_place<R>(
        &mut self,
        decide: impl FnOnce(&AcquireRequest, &mut AcquireOutcome) -> R,
    ) -> R {
        let shared = self.shared_mut();
        decide(&shared.request, &mut shared.outcome)
    }

    /// The answer [`Self::decide_in_place`] wrote.
    pub(crate) fn outcome(&self) -> &AcquireOutcome {
        &self.0.outcome
    }

    /// The lease for an admitted decision: the backend's checks, and the items it bypassed
    /// or charged on another shard, recorded for the lease's later writes, and the limiter
    /// that admitted it.
    pub(crate) fn admit(mut self, outcome: AcquireOutcome, limiter: RateLimiter) -> Lease {
        self.shared_mut().outcome = outcome;
        self.admit_decided(limiter)
    }

    /// [`Self::admit`] for the answer [`Self::decide_in_place`] wrote.
    pub(crate) fn admit_decided(mut self, limiter: RateLimiter) -> Lease {
        let shared = self.shared_mut();
        shared.limiter = Some(limiter);
        let LeaseShared {
            request, outcome, ..
        } = shared;
        for &i in &outcome.bypassed {
            if let Some(item) = request.items.get_mut(i) {
                item.bypass = true;
            }
        }
        for &(i, shard) in &outcome.shards {
            if let Some(item) = request.items.get_mut(i) {
                item.shard = shard;
            }
        }
        self.into_lease()
    }

    /// The request back, for an acquire not decided here.
    pub(crate) fn into_request(self) -> AcquireRequest {
        match LeaseArc::try_unwrap(self.0) {
            Ok(shared) => shared.request,
            Err(shared) => shared.request.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{lease_id, spare};
    use crate::{InMemoryRepository, Limit, RateLimiter};

    /// A thread keeps at most `KEPT` settled leases, and never one still shared: a handle
    /// that outlives its lease keeps reading it.
    #[tokio::test]
    async fn a_thread_keeps_a_bounded_number_of_unshared_leases() {
        let limiter = RateLimiter::new(InMemoryRepository::new());
        let limits = [Limit::per_second("rps", 1_000)];
        while spare::take().is_some() {}
        let mut leases = Vec::new();
        for i in 0..spare::KEPT + 8 {
            let lease = limiter
                .acquire(format!("key-{i}"), "api")
                .limits(limits.clone())
                .await
                .unwrap();
            leases.push(lease);
        }
        for lease in leases {
            lease.commit().await.unwrap();
        }
        assert_eq!(spare::kept(), spare::KEPT);

        while spare::take().is_some() {}
        let lease = limiter
            .acquire("held", "api")
            .limits(limits.clone())
            .await
            .unwrap();
        let handle = lease.handle();
        lease.commit().await.unwrap();
        drop(lease);
        assert_eq!(
            spare::kept(),
            0,
            "a lease its handle still holds is not kept"
        );
        assert!(handle.is_closed());
        assert_eq!(handle.entity_id(), "held");
        assert_eq!(handle.consumed()["rps"], 1);
    }

    /// A lease taken from the thread's spares starts as a new one: another entity, other
    /// limits, nothing closed, pending, written or in doubt, and exact when adjusted and
    /// rolled back.
    #[tokio::test]
    async fn a_reused_lease_starts_as_a_new_one() {
        // A frozen clock: nothing refills between the checks.
        let limiter = RateLimiter::builder(InMemoryRepository::new())
            .clock(crate::clock::ManualClock::new(1_700_000_000_000))
            .build();
        let two = [
            Limit::per_minute("rpm", 100),
            Limit::per_minute("tpm", 10_000),
        ];
        let first = limiter
            .acquire("first", "api")
            .limits(two.clone())
            .consume([("rpm", 1), ("tpm", 500)])
            .await
            .unwrap();
        first.adjust([("tpm", 250)]).await.unwrap();
        first.commit().await.unwrap();
        let before = spare::kept();
        drop(first);
        assert_eq!(spare::kept(), before + 1, "a settled lease is kept");

        let one = [Limit::per_second("rps", 10)];
        let second = limiter
            .acquire("second", "other")
            .limits(one.clone())
            .await
            .unwrap();
        assert_eq!(spare::kept(), before, "the kept lease is taken");
        assert_eq!(second.entity_id(), "second");
        assert_eq!(second.resource(), "other");
        assert!(!second.is_closed() && !second.is_unlimited());
        let statuses = second.statuses();
        assert_eq!(statuses.len(), 1);
        assert_eq!(statuses[0].limit.name, "rps");
        assert_eq!(statuses[0].available, 10);
        assert_eq!(
            second.consumed(),
            [("rps".to_string(), 1)].into_iter().collect()
        );
        second.adjust([("rps", 2)]).await.unwrap();
        assert_eq!(second.consumed()["rps"], 3);
        second.rollback().await.unwrap();
        assert!(second.is_closed());
        let left = limiter
            .available("second", "other", Some(&one))
            .await
            .unwrap();
        assert_eq!(
            left["rps"], 10,
            "the rollback returned exactly what was written"
        );
        let first_left = limiter.available("first", "api", Some(&two)).await.unwrap();
        assert_eq!((first_left["rpm"], first_left["tpm"]), (99, 9_250));
        drop(second);

        // A lease dropped open still rolls back (it is not kept while its rollback runs).
        let third = limiter
            .acquire("third", "api")
            .limits(one.clone())
            .await
            .unwrap();
        drop(third);
        let left = limiter.available("third", "api", Some(&one)).await.unwrap();
        assert_eq!(left["rps"], 10);
    }

    #[test]
    fn lease_ids_never_repeat_across_threads() {
        let threads: Vec<_> = (0..8)
            .map(|_| std::thread::spawn(|| (0..10_000).map(|_| lease_id()).collect::<Vec<_>>()))
            .collect();
        let mut all = std::collections::HashSet::new();
        for t in threads {
            for id in t.join().expect("thread") {
                assert!(all.insert(id), "lease id {id:x} repeated");
            }
        }
        assert_eq!(all.len(), 80_000);
    }
}
