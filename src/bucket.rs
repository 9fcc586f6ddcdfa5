//! Pure token-bucket arithmetic: no I/O, no clock, no floats.
//!
//! Every token value is in millitokens (tokens x 1000) and every time in epoch milliseconds,
//! so the same inputs give the same result on every node and in every language. Refill is
//! exact: the sub-millitoken remainder of each refill is kept in [`BucketState::refill_carry`],
//! so refilling often accrues exactly as much as refilling once (path independence).
//!
//! ```
//! use zae_limiter::{bucket, Limit};
//!
//! let limit = Limit::per_minute("rpm", 100);
//! let state = bucket::BucketState::from_limit(&limit, 0);
//! let first = bucket::try_consume(&state, 100, 0);
//! assert!(first.success);
//! let second = bucket::try_consume(&first.state, 1, 0);
//! assert!(!second.success);
//! assert_eq!(second.retry_after_ms, 600); // one token every 600 ms
//! ```

use crate::Limit;

/// Millitokens per token.
pub const MILLI: i64 = 1000;

/// The deepest debt a bucket may hold, in millitokens: [`crate::limit::MAX_TOKENS`]
/// tokens below zero. Adjustments that would pass it are refused with a typed error, so
/// stored values (capacity at most the same bound above zero) always fit an `i64` with
/// room to spare, in every language that reads the table.
pub const MIN_TOKENS_MILLI: i64 = -(crate::limit::MAX_TOKENS as i64) * MILLI;

/// The stored state of one token bucket (one limit of one entity and resource).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct BucketState {
    /// Tokens now, in millitokens; negative while the bucket is in debt.
    pub tokens_milli: i64,
    /// When the bucket was last refilled, epoch milliseconds.
    pub last_refill_ms: i64,
    /// Refill accrued but not yet worth a whole millitoken, in millitoken-milliseconds
    /// divided by nothing: the remainder of `elapsed * refill_amount_milli` modulo
    /// `refill_period_ms`. Always in `0..refill_period_ms`.
    pub refill_carry: i64,
    /// Capacity in millitokens.
    pub capacity_milli: i64,
    /// Millitokens added per refill period.
    pub refill_amount_milli: i64,
    /// Length of the refill period in milliseconds.
    pub refill_period_ms: i64,
    /// Net millitokens consumed over the bucket's life (consumption minus refunds).
    pub total_consumed_milli: i64,
}

/// The result of [`try_consume`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsumeResult {
    /// Whether the bucket held enough tokens.
    pub success: bool,
    /// Whole tokens available before consuming (floored, so negative in debt).
    pub available: i64,
    /// On failure, the least number of milliseconds after which refill covers the request.
    pub retry_after_ms: u64,
    /// The refilled state, minus the amount on success.
    pub state: BucketState,
}

impl BucketState {
    /// A full bucket for `limit`, last refilled at `now_ms`, with nothing consumed.
    pub fn from_limit(limit: &Limit, now_ms: i64) -> Self {
        let capacity_milli = to_milli(limit.capacity);
        BucketState {
            tokens_milli: capacity_milli,
            last_refill_ms: now_ms,
            refill_carry: 0,
            capacity_milli,
            refill_amount_milli: to_milli(limit.refill_amount),
            refill_period_ms: i64::try_from(u128::from(limit.refill_period_seconds) * 1000)
                .unwrap_or(i64::MAX),
            total_consumed_milli: 0,
        }
    }

    /// A full bucket for one of `shards` shards of `limit` (the Python library's sharding,
    /// its table contract section 8.4): the capacity and the refill amount are the shard's
    /// share, floored in millitokens; the period is not divided. One shard is
    /// [`Self::from_limit`].
    pub fn for_shard(limit: &Limit, shards: u32, now_ms: i64) -> Self {
        let mut state = Self::from_limit(limit, now_ms);
        if shards <= 1 {
            // The usual unsharded bucket: no division (tens of cycles each) on the hot path.
            return state;
        }
        let shards = i64::from(shards);
        state.capacity_milli /= shards;
        state.refill_amount_milli /= shards;
        state.tokens_milli = state.capacity_milli;
        state
    }

    /// Whether the bucket's parameters allow refill at all (positive amount and period).
    fn refills(&self) -> bool {
        self.refill_amount_milli > 0 && self.refill_period_ms > 0
    }
}

fn to_milli(tokens: u64) -> i64 {
    i64::try_from(i128::from(tokens) * i128::from(MILLI)).unwrap_or(i64::MAX)
}

fn saturate(v: i128) -> i64 {
    v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// Refill `state` lazily up to `now_ms`.
///
/// A clock that went backwards (`now_ms <= last_refill_ms`) refills nothing and leaves the
/// timestamp alone; tokens above capacity (after a capacity cut) are clamped either way.
#[inline]
pub fn refill(state: &BucketState, now_ms: i64) -> BucketState {
    let mut next = *state;
    let elapsed = i128::from(now_ms) - i128::from(state.last_refill_ms);
    if elapsed <= 0 || !state.refills() {
        next.tokens_milli = state.tokens_milli.min(state.capacity_milli);
        if elapsed > 0 {
            next.last_refill_ms = now_ms;
        }
        return next;
    }
    let Some((add, carry)) = accrued(state, elapsed) else {
        // More refill than an i128 holds is more than any bucket's capacity.
        next.last_refill_ms = now_ms;
        next.tokens_milli = state.capacity_milli;
        next.refill_carry = 0;
        return next;
    };
    next.last_refill_ms = now_ms;
    if i128::from(state.tokens_milli) + add >= i128::from(state.capacity_milli) {
        next.tokens_milli = state.capacity_milli;
        next.refill_carry = 0;
    } else {
        next.tokens_milli = saturate(i128::from(state.tokens_milli) + add);
        next.refill_carry = carry as i64;
    }
    next
}

/// What [`refill`] adds to `state` at `now_ms` before the cap, and whether the cap cuts it
/// (the refill then leaves the bucket full, with no carry, whatever its tokens were).
///
/// A write built from an image of a bucket that may be stale needs both: a refill that
/// stays below capacity shifts any stored tokens by the same amount, one that reaches it
/// does not.
pub fn refill_due(state: &BucketState, now_ms: i64) -> (i64, bool) {
    let elapsed = i128::from(now_ms) - i128::from(state.last_refill_ms);
    if elapsed <= 0 || !state.refills() {
        return (0, state.tokens_milli > state.capacity_milli);
    }
    // Past an i128: more than any capacity.
    let add = accrued(state, elapsed).map_or(i128::MAX, |(add, _)| add);
    let capped =
        i128::from(state.tokens_milli).saturating_add(add) >= i128::from(state.capacity_milli);
    (saturate(add), capped)
}

/// The whole millitokens a refill over `elapsed` (> 0) ms adds to `state` before the cap,
/// and the carry left; `None` past what an i128 holds.
#[inline]
fn accrued(state: &BucketState, elapsed: i128) -> Option<(i128, i128)> {
    let accrued = elapsed
        .checked_mul(i128::from(state.refill_amount_milli))?
        .checked_add(i128::from(state.refill_carry))?;
    // Most refills fit in 64 bits, where division is several times cheaper.
    Some(match i64::try_from(accrued) {
        Ok(a) if a >= 0 => {
            let p = state.refill_period_ms;
            (i128::from(a / p), i128::from(a % p))
        }
        _ => {
            let period = i128::from(state.refill_period_ms);
            (accrued.div_euclid(period), accrued.rem_euclid(period))
        }
    })
}

/// Milliseconds until refill covers `deficit_milli`, given the carry already accrued.
fn wait_for(state: &BucketState, deficit_milli: i128) -> u64 {
    if deficit_milli <= 0 {
        return 0;
    }
    if !state.refills() {
        return u64::MAX;
    }
    let amount = i128::from(state.refill_amount_milli);
    let wait = deficit_milli
        .checked_mul(i128::from(state.refill_period_ms))
        .and_then(|n| n.checked_sub(i128::from(state.refill_carry)))
        .and_then(|n| n.checked_add(amount - 1))
        .map_or(i128::MAX, |n| n.div_euclid(amount).max(0));
    u64::try_from(wait).unwrap_or(u64::MAX)
}

/// Refill, then take `amount` whole tokens if the bucket holds them.
#[inline]
pub fn try_consume(state: &BucketState, amount: u64, now_ms: i64) -> ConsumeResult {
    let mut refilled = refill(state, now_ms);
    let available = refilled.tokens_milli.div_euclid(MILLI);
    let wanted = i128::from(amount) * i128::from(MILLI);
    let have = i128::from(refilled.tokens_milli);
    if have >= wanted {
        refilled.tokens_milli = saturate(have - wanted);
        refilled.total_consumed_milli =
            saturate(i128::from(refilled.total_consumed_milli) + wanted);
        ConsumeResult {
            success: true,
            available,
            retry_after_ms: 0,
            state: refilled,
        }
    } else {
        ConsumeResult {
            success: false,
            available,
            retry_after_ms: wait_for(&refilled, wanted - have),
            state: refilled,
        }
    }
}

/// Refill, then subtract `amount` whole tokens with no check: debt is allowed, a negative
/// amount refunds, and a refund never lifts the bucket above capacity.
pub fn force_consume(state: &BucketState, amount: i64, now_ms: i64) -> BucketState {
    let mut next = refill(state, now_ms);
    let delta = i128::from(amount) * i128::from(MILLI);
    let tokens = i128::from(next.tokens_milli) - delta;
    if tokens >= i128::from(next.capacity_milli) {
        next.tokens_milli = next.capacity_milli;
        next.refill_carry = 0;
    } else {
        next.tokens_milli = saturate(tokens);
    }
    next.total_consumed_milli = saturate(i128::from(next.total_consumed_milli) + delta);
    next
}

/// A take from a soft limit (the Python library's `soft`): it never refuses, so the bucket
/// may go into debt, and the request is counted like any other. Only the debt bound
/// ([`MIN_TOKENS_MILLI`], far beyond any real debt) refuses, so the arithmetic never
/// overflows.
pub fn try_consume_soft(state: &BucketState, amount: u64, now_ms: i64) -> ConsumeResult {
    let hard = try_consume(state, amount, now_ms);
    if hard.success {
        return hard;
    }
    let next = force_consume(state, i64::try_from(amount).unwrap_or(i64::MAX), now_ms);
    let fits = next.tokens_milli >= MIN_TOKENS_MILLI;
    ConsumeResult {
        success: fits,
        available: hard.available,
        retry_after_ms: if fits { 0 } else { hard.retry_after_ms },
        state: if fits { next } else { hard.state },
    }
}

/// The take of one limit: [`try_consume`], or [`try_consume_soft`] for a soft limit.
#[inline]
pub fn try_consume_limit(
    limit: &Limit,
    state: &BucketState,
    amount: u64,
    now_ms: i64,
) -> ConsumeResult {
    if limit.soft {
        try_consume_soft(state, amount, now_ms)
    } else {
        try_consume(state, amount, now_ms)
    }
}

/// A bypassed take (the Python library's `disabled = "bypass"`): admitted whatever the
/// balance, counted in `total_consumed_milli`, no tokens taken. The state is refilled to
/// `now_ms`, so the count is the only change a caller stores.
pub fn count_only(state: &BucketState, amount: i64, now_ms: i64) -> ConsumeResult {
    let mut refilled = refill(state, now_ms);
    let available = refilled.tokens_milli.div_euclid(MILLI);
    refilled.total_consumed_milli = saturate(
        i128::from(refilled.total_consumed_milli) + i128::from(amount) * i128::from(MILLI),
    );
    ConsumeResult {
        success: true,
        available,
        retry_after_ms: 0,
        state: refilled,
    }
}

/// Whole tokens available at `now_ms` (floored; negative in debt).
pub fn available(state: &BucketState, now_ms: i64) -> i64 {
    refill(state, now_ms).tokens_milli.div_euclid(MILLI)
}

/// Milliseconds from `now_ms` until the bucket holds `needed` whole tokens (0 if it does).
pub fn time_until_available(state: &BucketState, needed: u64, now_ms: i64) -> u64 {
    let refilled = refill(state, now_ms);
    let deficit = i128::from(needed) * i128::from(MILLI) - i128::from(refilled.tokens_milli);
    wait_for(&refilled, deficit)
}

/// Milliseconds from `now_ms` until the bucket is full again (0 if it is).
pub fn time_until_full(state: &BucketState, now_ms: i64) -> u64 {
    let refilled = refill(state, now_ms);
    let deficit = i128::from(refilled.capacity_milli) - i128::from(refilled.tokens_milli);
    wait_for(&refilled, deficit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worked_values_from_the_reference() {
        let limit = Limit::custom("tokens", 100, 100, 60);
        let mut s = BucketState::from_limit(&limit, 0);
        s.tokens_milli = 0;
        assert_eq!(refill(&s, 30_000).tokens_milli, 50_000);
        let full = BucketState::from_limit(&limit, 0);
        assert_eq!(refill(&full, 120_000).tokens_milli, 100_000);
        let mut debt = s;
        debt.tokens_milli = -50_000;
        assert_eq!(refill(&debt, 30_000).tokens_milli, 0);
    }

    #[test]
    fn time_spent_full_accrues_nothing() {
        let limit = Limit::per_minute("rpm", 60);
        let s = BucketState::from_limit(&limit, 0);
        let later = refill(&s, 10_500);
        assert_eq!(later.tokens_milli, 60_000);
        assert_eq!(later.refill_carry, 0);
    }

    #[test]
    fn refund_is_capped_at_capacity() {
        let limit = Limit::per_minute("rpm", 10);
        let s = BucketState::from_limit(&limit, 0);
        let spent = force_consume(&s, 3, 0);
        let refunded = force_consume(&spent, -5, 0);
        assert_eq!(refunded.tokens_milli, 10_000);
        assert_eq!(refunded.total_consumed_milli, -2_000);
    }

    #[test]
    fn zero_refill_parameters_never_divide_by_zero() {
        let s = BucketState {
            tokens_milli: 0,
            last_refill_ms: 0,
            refill_carry: 0,
            capacity_milli: 1000,
            refill_amount_milli: 0,
            refill_period_ms: 0,
            total_consumed_milli: 0,
        };
        assert_eq!(time_until_available(&s, 1, 10), u64::MAX);
        assert!(!try_consume(&s, 1, 10).success);
    }
}
