//! One key's reservation state: its demand, the slice it holds, and how big a slice to aim
//! for.

use std::sync::Arc;

use parking_lot::Mutex;
use smallvec::SmallVec;

use super::meter::Meter;
use super::Reservations;
use crate::bucket::BucketState;
use crate::repository::Shard;
use crate::Limit;

/// Whole tokens per limit, in the order of the slice's limits.
pub(super) type Tokens = SmallVec<[i64; 2]>;

/// Tokens this node took from a bucket (shard) and has not admitted yet.
#[derive(Debug, Clone)]
pub(super) struct Slice {
    /// The limits the tokens were taken under; a request under other limits (a changed
    /// config) replaces the slice.
    pub limits: Arc<[Limit]>,
    /// Per limit: whole tokens held.
    pub held: Tokens,
    /// The bucket shard the tokens came from, and go back to.
    pub shard: Shard,
    /// Per limit: what the table had left after this node's last write there.
    pub table_after: Tokens,
    /// When that write was, epoch milliseconds.
    pub table_at_ms: i64,
    /// Per limit: held tokens given up because the table's refill made room for them (see
    /// [`Slice::forfeit`]); still counted as consumed until they go back.
    pub forfeited: Tokens,
}

impl Slice {
    /// A slice of `limits` on `shard`, holding nothing yet.
    pub fn new(limits: Arc<[Limit]>, shard: Shard, table_after: Tokens, now_ms: i64) -> Self {
        let n = limits.len();
        Slice {
            limits,
            held: smallvec::smallvec![0; n],
            shard,
            table_after,
            table_at_ms: now_ms,
            forfeited: smallvec::smallvec![0; n],
        }
    }

    /// The most whole tokens limit `k`'s bucket (this shard's share) can hold at `now_ms`:
    /// what it had after this node's last write plus its refill since, up to its capacity.
    /// Others' consumption only lowers it.
    pub fn table_most(&self, k: usize, now_ms: i64) -> i64 {
        let share = BucketState::for_shard(&self.limits[k], self.shard.count, 0);
        let elapsed = i128::from(now_ms.saturating_sub(self.table_at_ms).max(0));
        let period = i128::from(share.refill_period_ms.max(1));
        let refill_milli = (elapsed * i128::from(share.refill_amount_milli) + period - 1) / period;
        let most = i128::from(self.table_after[k]) * 1000 + refill_milli;
        (most.min(i128::from(share.capacity_milli)) / 1000) as i64
    }

    /// Gives up held tokens the table's refill has made room for, so the table and this
    /// slice never hold more than the capacity between them: a bucket that refilled to full
    /// while a slice was held would otherwise admit a burst of capacity plus the slice.
    /// (Others' slices and credits are not seen here; with several nodes the bound is
    /// close, not exact.) The tokens given up stay counted until they go back.
    pub fn forfeit(&mut self, now_ms: i64) {
        for k in 0..self.held.len() {
            let room = self.room(k, now_ms);
            if self.held[k] > room {
                self.forfeited[k] += self.held[k] - room;
                self.held[k] = room;
            }
        }
    }

    /// What the bucket's refill has left room for beside it: its capacity less the most it
    /// can hold by now.
    fn room(&self, k: usize, now_ms: i64) -> i64 {
        let share = BucketState::for_shard(&self.limits[k], self.shard.count, 0);
        (share.capacity_milli / 1000 - self.table_most(k, now_ms)).max(0)
    }

    /// The tokens of limit `k` that may be admitted at `now_ms`: all that are held, or,
    /// strict, no more than the room [`Slice::forfeit`] would leave (callers forfeit first;
    /// tokens over the room must be given up for good, since a window may start at any
    /// moment the bucket and the slice held more than the capacity between them).
    pub fn usable(&self, k: usize, now_ms: i64, strict: bool) -> i64 {
        let held = self.held[k].max(0);
        if strict {
            held.min(self.room(k, now_ms))
        } else {
            held
        }
    }

    /// Takes the table's word on limit `k` (`available` whole tokens as of a call that
    /// started at `at_ms`): the room is measured from it from now on.
    pub fn observe_table(&mut self, k: usize, available: i64, at_ms: i64) {
        self.table_after[k] = available;
        self.table_at_ms = self.table_at_ms.max(at_ms);
    }

    /// Whether the slice is for exactly these limits.
    pub fn is_for(&self, limits: &Arc<[Limit]>) -> bool {
        Arc::ptr_eq(&self.limits, limits) || *self.limits == **limits
    }

    /// Whether it can admit `amounts` of every limit at `now_ms` (see [`Slice::usable`]).
    pub fn covers(&self, amounts: &[u64], now_ms: i64, strict: bool) -> bool {
        amounts
            .iter()
            .enumerate()
            .all(|(k, a)| u64::try_from(self.usable(k, now_ms, strict)).is_ok_and(|u| u >= *a))
    }

    /// The held tokens as a give-back (negative deltas), or with `forfeited` the given-up
    /// ones, under `limits` (the current definitions where a name is still configured, so
    /// a give-back never reverts a changed limit); `None` when there are none.
    pub fn give_back(
        &self,
        limits: Option<&[Limit]>,
        forfeited: bool,
    ) -> Option<Vec<(Limit, i64)>> {
        let amounts = if forfeited {
            &self.forfeited
        } else {
            &self.held
        };
        let deltas: Vec<(Limit, i64)> = self
            .limits
            .iter()
            .zip(amounts)
            .filter(|(_, back)| **back > 0)
            .map(|(old, back)| {
                let limit = limits
                    .and_then(|l| l.iter().find(|l| l.name == old.name))
                    .unwrap_or(old);
                (limit.clone(), -*back)
            })
            .collect();
        (!deltas.is_empty()).then_some(deltas)
    }
}

/// Everything kept for one entity and resource, under one lock.
#[derive(Debug, Default)]
pub(super) struct KeyState {
    pub meter: Meter,
    pub slice: Option<Slice>,
    /// When a request last used the key, epoch milliseconds (by the limiter's clock).
    pub last_used_ms: i64,
    /// Requests on this key waiting on the table now.
    pub in_flight: u32,
    /// How long a table acquire for the key takes, milliseconds (a moving average).
    pub latency_ms: f64,
    /// Until when top-ups are not tried: the table refused one (it is drained), and asking
    /// for more than a request needs would only cost a second call per request.
    pub short_until_ms: i64,
}

impl KeyState {
    /// Counts one request taking `amounts` at `now_ms` in the demand, and as a use.
    pub fn count_request(&mut self, now_ms: i64, amounts: &[u64]) {
        self.meter.record(now_ms, amounts);
        self.last_used_ms = self.last_used_ms.max(now_ms);
    }

    /// Whether the key is hot under `policy`.
    pub fn is_hot(&self, policy: &Reservations) -> bool {
        self.meter.request_rate() >= policy.hot_rate
    }

    /// Whether to top the slice up at `now_ms`.
    pub fn tops_up(&self, policy: &Reservations, now_ms: i64) -> bool {
        self.is_hot(policy) && now_ms >= self.short_until_ms
    }
}

/// One entity and resource.
#[derive(Debug)]
pub(super) struct Key {
    pub entity_id: String,
    pub resource: String,
    pub state: Mutex<KeyState>,
    /// Held while this node tops the key's slice up, so concurrent misses do not each take
    /// a slice.
    pub gate: tokio::sync::Mutex<()>,
    /// A background top-up is scheduled or running.
    pub prefetching: std::sync::atomic::AtomicBool,
}

impl Key {
    pub fn new(entity_id: &str, resource: &str) -> Self {
        Key {
            entity_id: entity_id.to_string(),
            resource: resource.to_string(),
            state: Mutex::default(),
            gate: tokio::sync::Mutex::new(()),
            prefetching: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// The largest slice of `limit` one node may hold under `policy`.
pub(super) fn bound(policy: &Reservations, limit: &Limit) -> u64 {
    (limit.capacity as f64 * policy.max_fraction).floor() as u64
}

/// The slice to aim for on each limit: `demand_window` of the local demand, at least two of
/// this request (or one per request waiting on the table), at most [`bound`]. `None` when a limit's bound cannot hold this request
/// (such a key is served by the table).
pub(super) fn targets(
    policy: &Reservations,
    state: &KeyState,
    limits: &[Limit],
    amounts: &[u64],
) -> Option<SmallVec<[u64; 2]>> {
    let meter = &state.meter;
    // At least one request for each that is waiting on the table now: the measured rate
    // lags while requests queue behind the table, and a slice sized to it alone would
    // never catch up with the demand.
    let queued = u64::from(state.in_flight).saturating_add(1).max(2);
    let window = policy.demand_window.as_secs_f64();
    limits
        .iter()
        .zip(amounts)
        .enumerate()
        .map(|(k, (limit, amount))| {
            let most = bound(policy, limit);
            if *amount > most {
                return None;
            }
            // Strict, a slice is given up as the bucket refills (see `Slice::forfeit`): it
            // also carries the refill during one table call, so the requests waiting on
            // that call still find their share when it returns.
            let in_call = if policy.strict {
                limit.refill_rate() * state.latency_ms.max(1.0) / 1000.0 * 2.0
            } else {
                0.0
            };
            let demand = (meter.limit_rate(k) * window).ceil();
            let demand = if demand.is_finite() && demand > 0.0 {
                demand.min(u64::MAX as f64) as u64
            } else {
                0
            };
            let queued = amount.saturating_mul(queued);
            let queued = queued.saturating_add(if in_call.is_finite() && in_call > 0.0 {
                in_call.ceil().min(u64::MAX as f64) as u64
            } else {
                0
            });
            Some(demand.max(queued).min(most))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_follow_demand_within_the_bound() {
        // 250 ms, a tenth of capacity; not strict first (no refill-during-a-call margin).
        let policy = Reservations::adaptive().strict(false);
        let limits = [
            Limit::per_second("rps", 10_000),
            Limit::per_minute("tpm", 1_000),
        ];
        let mut state = KeyState::default();
        let start = 5_000_000;
        state.meter.record(start, &[1, 1]);
        for i in 0..200 {
            state.meter.record(start + i / 2, &[1, 1]);
        }
        state.meter.record(start + 100, &[1, 1]);
        // ~2,000 requests a second: 500 for 250 ms on rps (bound 1,000); tpm is bounded to
        // 100.
        let t = targets(&policy, &state, &limits, &[1, 1]).unwrap();
        assert!((490..=520).contains(&t[0]), "{t:?}");
        assert_eq!(t[1], 100);
        // A request bigger than a tenth of a limit gets no slice.
        assert!(targets(&policy, &state, &limits, &[1, 101]).is_none());
        // No demand measured yet: two requests' worth, or one per request waiting.
        let mut idle = KeyState::default();
        let t = targets(&policy, &idle, &limits, &[3, 5]).unwrap();
        assert_eq!(t.as_slice(), &[6, 10]);
        idle.in_flight = 9;
        let t = targets(&policy, &idle, &limits, &[3, 5]).unwrap();
        assert_eq!(t.as_slice(), &[30, 50]);
        // Strict: plus twice the refill during one table call (10 ms: 100 of rps, and
        // 1,000 a minute refills a third of a token).
        idle.latency_ms = 10.0;
        let t = targets(&policy.strict(true), &idle, &limits, &[3, 5]).unwrap();
        assert_eq!(t.as_slice(), &[230, 51]);
    }

    #[test]
    fn a_slice_gives_back_under_the_current_definitions() {
        let old: Arc<[Limit]> =
            [Limit::per_second("rps", 100), Limit::per_second("gone", 5)].into();
        let mut slice = Slice::new(old, Shard::default(), smallvec::smallvec![0, 0], 0);
        slice.held = smallvec::smallvec![7, 2];
        let now = [Limit::per_second("rps", 200)];
        let back = slice.give_back(Some(&now), false).unwrap();
        assert_eq!(back[0], (Limit::per_second("rps", 200), -7));
        assert_eq!(back[1], (Limit::per_second("gone", 5), -2));
        assert!(slice.give_back(None, true).is_none());
        assert!(slice.covers(&[7, 2], 0, false) && !slice.covers(&[8, 0], 0, false));
    }

    #[test]
    fn a_slice_and_the_table_never_hold_more_than_the_capacity() {
        let limits: Arc<[Limit]> = [Limit::per_second("rps", 100)].into();
        // The node took 10, leaving the table 85 of 100 at t = 0.
        let mut slice = Slice::new(limits, Shard::default(), smallvec::smallvec![85], 0);
        slice.held[0] = 10;
        assert_eq!(slice.usable(0, 0, true), 10);
        // 150 ms later the bucket may hold 100: nothing usable (not strict: all of it).
        assert_eq!(slice.usable(0, 150, true), 0);
        assert_eq!(slice.usable(0, 150, false), 10);
        slice.forfeit(0);
        assert_eq!(slice.held[0], 10);
        // 50 ms later the table can hold 90: room for 10 still.
        slice.forfeit(50);
        assert_eq!((slice.held[0], slice.forfeited[0]), (10, 0));
        // 100 ms later it can hold 95: 5 of the slice are given up.
        slice.forfeit(100);
        assert_eq!((slice.held[0], slice.forfeited[0]), (5, 5));
        // Full again: nothing is left to admit, and everything goes back.
        slice.forfeit(1_000);
        assert_eq!((slice.held[0], slice.forfeited[0]), (0, 10));
        assert!(slice.give_back(None, false).is_none());
        assert_eq!(slice.give_back(None, true).unwrap()[0].1, -10);
    }
}
