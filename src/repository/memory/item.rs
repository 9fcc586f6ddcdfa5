//! [`Item`]: the buckets of one entity and resource, stored compactly, since an embedded
//! limiter may hold millions of them.
//!
//! A bucket keeps only what changes (tokens, refill time and carry, consumption); its
//! limit's name and parameters sit in a [`Params`] record shared by every bucket with the
//! same ones ([`ParamsTable`]). The usual single bucket sits inline in the item.

use std::collections::HashMap;
use std::sync::Arc;

use smallvec::SmallVec;

use crate::bucket::{self, BucketState};
use crate::repository::{params_changed, reconcile_bucket, Checks, ItemRequest, LimitCheck};

/// New bucket states for one item's limits: inline for the usual one or two.
pub(super) type States = SmallVec<[BucketState; 2]>;

/// `touched_ms` of an item that eviction (or a delete) took out of the map.
const EVICTED: i64 = i64::MIN;

/// A limit's name and parameters, shared by every bucket that has them.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Params {
    name: Box<str>,
    capacity_milli: i64,
    refill_amount_milli: i64,
    refill_period_ms: i64,
}

impl Params {
    /// Whether these are `limit`'s parameters, as [`BucketState::from_limit`] states them.
    #[inline]
    fn describe(&self, limit: &crate::Limit) -> bool {
        self.same_as(&BucketState::from_limit(limit, 0))
    }

    fn matches(&self, name: &str, state: &BucketState) -> bool {
        *self.name == *name && self.same_as(state)
    }

    /// Whether `state` has these parameters (capacity, refill amount and period).
    #[inline]
    fn same_as(&self, state: &BucketState) -> bool {
        self.capacity_milli == state.capacity_milli
            && self.refill_amount_milli == state.refill_amount_milli
            && self.refill_period_ms == state.refill_period_ms
    }
}

/// The shared [`Params`] records of one repository. Limits are configuration, so the
/// table stays small; records no bucket uses any more are dropped by [`Self::prune`].
#[derive(Debug, Default)]
pub(super) struct ParamsTable {
    by_name: parking_lot::Mutex<HashMap<Box<str>, Variants>>,
}

/// The records of one limit name (usually one; more while its parameters change).
type Variants = SmallVec<[Arc<Params>; 2]>;

impl ParamsTable {
    /// The shared record for `name` with the parameters of `state`.
    fn get(&self, name: &str, state: &BucketState) -> Arc<Params> {
        let mut table = self.by_name.lock();
        let variants = match table.get_mut(name) {
            Some(variants) => variants,
            None => table.entry(name.into()).or_default(),
        };
        if let Some(found) = variants.iter().find(|p| p.matches(name, state)) {
            return Arc::clone(found);
        }
        let params = Arc::new(Params {
            name: name.into(),
            capacity_milli: state.capacity_milli,
            refill_amount_milli: state.refill_amount_milli,
            refill_period_ms: state.refill_period_ms,
        });
        variants.push(Arc::clone(&params));
        params
    }

    /// Drops the records no bucket holds.
    pub(super) fn prune(&self) {
        let mut table = self.by_name.lock();
        table.retain(|_, variants| {
            variants.retain(|p| Arc::strong_count(p) > 1);
            !variants.is_empty()
        });
    }
}

/// One bucket: what changes, plus its shared parameters.
#[derive(Debug)]
struct Stored {
    params: Arc<Params>,
    tokens_milli: i64,
    last_refill_ms: i64,
    refill_carry: i64,
    total_consumed_milli: i64,
}

impl Stored {
    fn state(&self) -> BucketState {
        BucketState {
            tokens_milli: self.tokens_milli,
            last_refill_ms: self.last_refill_ms,
            refill_carry: self.refill_carry,
            capacity_milli: self.params.capacity_milli,
            refill_amount_milli: self.params.refill_amount_milli,
            refill_period_ms: self.params.refill_period_ms,
            total_consumed_milli: self.total_consumed_milli,
        }
    }

    /// Stores what changes of `state` (whose parameters are this bucket's).
    fn set(&mut self, state: &BucketState) {
        self.tokens_milli = state.tokens_milli;
        self.last_refill_ms = state.last_refill_ms;
        self.refill_carry = state.refill_carry;
        self.total_consumed_milli = state.total_consumed_milli;
    }

    fn new(params: Arc<Params>, state: &BucketState) -> Self {
        Stored {
            params,
            tokens_milli: state.tokens_milli,
            last_refill_ms: state.last_refill_ms,
            refill_carry: state.refill_carry,
            total_consumed_milli: state.total_consumed_milli,
        }
    }
}

/// An item's buckets: one inline (the usual case), else a list. The enum costs no tag:
/// the shared record's pointer is never null.
#[derive(Debug)]
enum Buckets {
    One(Stored),
    Many(Vec<Stored>),
}

impl Default for Buckets {
    fn default() -> Self {
        Buckets::Many(Vec::new())
    }
}

impl Buckets {
    fn as_slice(&self) -> &[Stored] {
        match self {
            Buckets::One(one) => std::slice::from_ref(one),
            Buckets::Many(many) => many,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [Stored] {
        match self {
            Buckets::One(one) => std::slice::from_mut(one),
            Buckets::Many(many) => many,
        }
    }

    fn push(&mut self, stored: Stored) {
        match std::mem::take(self) {
            Buckets::Many(many) if many.is_empty() => *self = Buckets::One(stored),
            Buckets::One(one) => *self = Buckets::Many(vec![one, stored]),
            Buckets::Many(mut many) => {
                many.push(stored);
                *self = Buckets::Many(many);
            }
        }
    }
}

/// The buckets of one entity and resource.
#[derive(Debug, Default)]
pub(super) struct Item {
    buckets: Buckets,
    /// The last write, epoch milliseconds ([`EVICTED`] once out of the map): the sweeper
    /// works out from it and the buckets when the item may go, so the hot path only
    /// stores a time.
    touched_ms: i64,
}

impl Item {
    /// The bucket of limit `name`, as stored.
    pub(super) fn get(&self, name: &str) -> Option<BucketState> {
        self.buckets
            .as_slice()
            .iter()
            .find(|b| *b.params.name == *name)
            .map(Stored::state)
    }

    /// Every bucket, by limit name.
    pub(super) fn states(&self) -> impl Iterator<Item = (&str, BucketState)> {
        self.buckets
            .as_slice()
            .iter()
            .map(|b| (&*b.params.name, b.state()))
    }

    /// Stores the bucket of limit `name`.
    pub(super) fn put(&mut self, name: &str, state: BucketState, params: &ParamsTable) {
        match self
            .buckets
            .as_mut_slice()
            .iter_mut()
            .find(|b| *b.params.name == *name)
        {
            Some(stored) => {
                if !stored.params.matches(name, &state) {
                    stored.params = params.get(name, &state);
                }
                stored.set(&state);
            }
            None => self
                .buckets
                .push(Stored::new(params.get(name, &state), &state)),
        }
    }

    /// Tries every limit of `request` against this item's buckets without writing: pushes
    /// one check per limit and returns whether all fit, with the states to write if so.
    pub(super) fn charge(
        &self,
        request: &ItemRequest,
        now: i64,
        checks: &mut Checks,
    ) -> (bool, States) {
        let mut fits = true;
        let mut states = States::new();
        for (limit, amount) in request.limits.iter().zip(request.amounts.iter().copied()) {
            let current = reconcile_bucket(self.get(&limit.name).as_ref(), limit, now);
            let result = take(request, limit, amount, &current, now);
            fits &= result.success;
            checks.push(LimitCheck::from_consume(limit, amount, &result));
            states.push(result.state);
        }
        (fits, states)
    }

    /// One item's acquire, decided and written: every limit taken if all fit (and the item
    /// touched), else nothing taken and changed parameters adopted. Pushes one check per
    /// limit; returns whether all fit.
    pub(super) fn charge_and_write(
        &mut self,
        request: &ItemRequest,
        now: i64,
        checks: &mut Checks,
        params: &ParamsTable,
    ) -> bool {
        match self.charge_one_in_place(request, now, checks, params) {
            Some(admitted) => admitted,
            None => self.charge_and_write_each(request, now, checks, params),
        }
    }

    /// [`Self::charge_and_write`] the general way: check every limit, then write each.
    fn charge_and_write_each(
        &mut self,
        request: &ItemRequest,
        now: i64,
        checks: &mut Checks,
        params: &ParamsTable,
    ) -> bool {
        let (admitted, states) = self.charge(request, now, checks);
        if admitted {
            for (limit, state) in request.limits.iter().zip(states) {
                self.put(&limit.name, state, params);
            }
            self.touch(now);
        } else {
            self.adopt_changed_params(request, now, params);
        }
        admitted
    }

    /// [`Self::charge`] and the write after it in one pass, for the usual request of one
    /// limit whose bucket exists: the bucket is found once and updated in place. `None`
    /// (nothing done) for any other request, which goes the general way.
    fn charge_one_in_place(
        &mut self,
        request: &ItemRequest,
        now: i64,
        checks: &mut Checks,
        params: &ParamsTable,
    ) -> Option<bool> {
        let ([limit], [amount]) = (&*request.limits, &request.amounts[..]) else {
            return None;
        };
        let stored = self
            .buckets
            .as_mut_slice()
            .iter_mut()
            .find(|b| *b.params.name == *limit.name)?;
        // The limit as stored (the usual case): refilled, with no fresh state to build and
        // compare, and the state kept out of memory.
        let changed = !stored.params.describe(limit);
        let current = if changed {
            reconciled(stored, limit, now)
        } else {
            bucket::refill(&stored.state(), now)
        };
        let result = take(request, limit, *amount, &current, now);
        // Stored before the check is pushed (a call that may grow the list): the new state
        // goes from registers to the item, not through the stack.
        if result.success {
            stored.set(&result.state);
        } else if changed {
            // As after any rejection: the new parameters count from now.
            stored.set(&current);
        }
        if changed {
            stored.params = params.get(&limit.name, &current);
        }
        checks.push(LimitCheck::from_consume(limit, *amount, &result));
        if result.success {
            self.touch(now);
        }
        Some(result.success)
    }

    /// After a rejection: stores, refilled to now, the buckets whose limit parameters
    /// changed, so the new rate counts from now (see [`reconcile_bucket`]).
    pub(super) fn adopt_changed_params(
        &mut self,
        request: &ItemRequest,
        now: i64,
        params: &ParamsTable,
    ) {
        for limit in request.limits.iter() {
            if let Some(stored) = self.get(&limit.name).filter(|s| params_changed(s, limit)) {
                let state = reconcile_bucket(Some(&stored), limit, now);
                self.put(&limit.name, state, params);
            }
        }
    }

    /// Records a write at `now_ms`.
    pub(super) fn touch(&mut self, now_ms: i64) {
        self.touched_ms = now_ms;
    }

    /// Whether eviction (or a delete) took the item out of the map: a writer that finds
    /// it so looks the key up again.
    pub(super) fn is_evicted(&self) -> bool {
        self.touched_ms == EVICTED
    }

    /// Marks the item as out of the map.
    pub(super) fn mark_evicted(&mut self) {
        self.touched_ms = EVICTED;
    }

    /// When the item may be evicted: once every bucket is full again, and at least
    /// `multiplier` times the longest time to fill after the last write.
    pub(super) fn evict_at_ms(&self, multiplier: u32) -> i64 {
        let mut keep_ms: u64 = 0;
        for (_, s) in self.states() {
            let fill = fill_time_ms(&s).saturating_mul(u64::from(multiplier));
            keep_ms = keep_ms.max(fill);
            // From zero or more tokens a bucket is full within one time to fill; only a
            // bucket in debt needs longer.
            if s.tokens_milli < 0 {
                keep_ms = keep_ms.max(bucket::time_until_full(&s, self.touched_ms));
            }
        }
        self.touched_ms
            .saturating_add(i64::try_from(keep_ms).unwrap_or(i64::MAX))
    }
}

/// The take of `amount` from one limit's refilled bucket: counted only for a bypassed
/// request, else taken if it fits (or into debt, for a soft limit).
fn take(
    request: &ItemRequest,
    limit: &crate::Limit,
    amount: u64,
    current: &BucketState,
    now: i64,
) -> bucket::ConsumeResult {
    if request.bypass {
        bucket::count_only(current, i64::try_from(amount).unwrap_or(i64::MAX), now)
    } else {
        bucket::try_consume_limit(limit, current, amount, now)
    }
}

/// `stored` under a limit whose parameters changed (see [`reconcile_bucket`]); rare.
#[cold]
#[inline(never)]
fn reconciled(stored: &Stored, limit: &crate::Limit, now: i64) -> BucketState {
    reconcile_bucket(Some(&stored.state()), limit, now)
}

fn fill_time_ms(s: &BucketState) -> u64 {
    if s.refill_amount_milli <= 0 {
        return u64::MAX;
    }
    let (Ok(capacity), Ok(period), Ok(amount)) = (
        u64::try_from(s.capacity_milli),
        u64::try_from(s.refill_period_ms),
        u64::try_from(s.refill_amount_milli),
    ) else {
        return u64::MAX;
    };
    // 64-bit division when the product fits, which it does for any realistic limit.
    if let Some(product) = capacity.checked_mul(period) {
        return product.div_ceil(amount);
    }
    let ms = i128::from(s.capacity_milli) * i128::from(s.refill_period_ms);
    u64::try_from((ms + i128::from(s.refill_amount_milli) - 1) / i128::from(s.refill_amount_milli))
        .unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Limit;

    #[test]
    fn an_item_with_one_bucket_fits_a_small_allocation() {
        // 48 bytes: behind its lock and reference counts, 72 bytes in one 80-byte block.
        assert_eq!(std::mem::size_of::<Buckets>(), 40);
        assert_eq!(std::mem::size_of::<Item>(), 48);
    }

    #[test]
    fn buckets_keep_their_state_and_share_parameters() {
        let table = ParamsTable::default();
        let rps = Limit::per_second("rps", 10);
        let tpm = Limit::per_minute("tpm", 1000);
        let mut a = Item::default();
        let mut b = Item::default();
        let s = BucketState::from_limit(&rps, 5);
        a.put("rps", s, &table);
        b.put("rps", s, &table);
        assert_eq!(a.get("rps"), Some(s));
        assert!(Arc::ptr_eq(
            &a.buckets.as_slice()[0].params,
            &b.buckets.as_slice()[0].params
        ));
        // A second limit, then the first changed: both kept, each with its own state.
        let t = BucketState::from_limit(&tpm, 7);
        a.put("tpm", t, &table);
        let mut changed = BucketState::from_limit(&Limit::per_second("rps", 20), 9);
        changed.tokens_milli = 3;
        a.put("rps", changed, &table);
        assert_eq!(a.get("rps"), Some(changed));
        assert_eq!(a.get("tpm"), Some(t));
        assert_eq!(a.states().count(), 2);
        // The old rps record is still held by b; once b goes, prune drops it.
        drop(b);
        table.prune();
        assert_eq!(table.by_name.lock()["rps"].len(), 1);
    }

    #[test]
    fn eviction_is_marked_apart_from_any_time() {
        let mut item = Item::default();
        item.touch(0);
        assert!(!item.is_evicted());
        item.mark_evicted();
        assert!(item.is_evicted());
    }

    proptest::proptest! {
        /// The one-bucket fast path decides and stores exactly what the general path does,
        /// over histories of takes, idle gaps, limit changes, soft limits and bypasses.
        #[test]
        fn charging_in_place_matches_the_general_path(
            steps in proptest::collection::vec(
                (0u64..12, 0i64..2_500, 0usize..4, proptest::bool::weighted(0.1)),
                1..60,
            )
        ) {
            let table = ParamsTable::default();
            let variants = [
                Limit::per_second("rps", 10),
                Limit::per_second("rps", 4),
                Limit::per_minute("rps", 50).with_burst(60),
                Limit::per_second("rps", 10).soft(),
            ];
            let mut general = Item::default();
            let mut fast = Item::default();
            let mut now = 1_000_000;
            for (amount, gap, variant, bypass) in steps {
                now += gap;
                let request = ItemRequest {
                    entity_id: "k".into(),
                    resource: "api".into(),
                    limits: vec![variants[variant].clone()].into(),
                    amounts: smallvec::smallvec![amount],
                    expires_when_idle: true,
                    owner: None,
                    bypass,
                    shard: Default::default(),
                };
                let mut checks = Checks::new();
                let fits = general.charge_and_write_each(&request, now, &mut checks, &table);
                let mut fast_checks = Checks::new();
                let fast_fits = fast.charge_and_write(&request, now, &mut fast_checks, &table);
                proptest::prop_assert_eq!(fits, fast_fits);
                proptest::prop_assert_eq!(&checks, &fast_checks);
                proptest::prop_assert_eq!(general.get("rps"), fast.get("rps"));
                proptest::prop_assert_eq!(general.touched_ms, fast.touched_ms);
            }
        }
    }
}
