//! Properties of the pure bucket arithmetic over the whole input range.

use proptest::prelude::*;
use zae_limiter::bucket::{self, BucketState};
use zae_limiter::limit::{MAX_REFILL_PERIOD_SECONDS, MAX_TOKENS};
use zae_limiter::Limit;

fn any_state() -> impl Strategy<Value = BucketState> {
    (
        any::<i64>(),
        any::<i64>(),
        any::<i64>(),
        any::<i64>(),
        any::<i64>(),
        any::<i64>(),
        any::<i64>(),
    )
        .prop_map(|(t, r, c, cap, ra, rp, tc)| BucketState {
            tokens_milli: t,
            last_refill_ms: r,
            refill_carry: c,
            capacity_milli: cap,
            refill_amount_milli: ra,
            refill_period_ms: rp,
            total_consumed_milli: tc,
        })
}

fn valid_limit() -> impl Strategy<Value = Limit> {
    (
        1..=MAX_TOKENS,
        1..=MAX_TOKENS,
        1..=MAX_REFILL_PERIOD_SECONDS,
    )
        .prop_map(|(c, r, p)| Limit::custom("l", c, r, p))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    /// No input, however absurd, makes any function panic (overflow, division by zero).
    #[test]
    fn never_panics(s in any_state(), now in any::<i64>(), n in any::<u64>(), d in any::<i64>()) {
        let _ = bucket::refill(&s, now);
        let _ = bucket::try_consume(&s, n, now);
        let _ = bucket::force_consume(&s, d, now);
        let _ = bucket::available(&s, now);
        let _ = bucket::time_until_available(&s, n, now);
        let _ = bucket::time_until_full(&s, now);
    }

    /// Refill never lifts a bucket above capacity, from any valid state.
    #[test]
    fn refill_never_exceeds_capacity(limit in valid_limit(), start in 0i64..1 << 45,
                                     spent in 0u64..=MAX_TOKENS, later in 0i64..1 << 40,
                                     refund in 0i64..=MAX_TOKENS as i64) {
        let s = BucketState::from_limit(&limit, start);
        let s = bucket::force_consume(&s, spent as i64, start);
        let r = bucket::refill(&s, start + later);
        prop_assert!(r.tokens_milli <= r.capacity_milli);
        let refunded = bucket::force_consume(&r, -refund, start + later);
        prop_assert!(refunded.tokens_milli <= refunded.capacity_milli);
        prop_assert!(r.refill_carry >= 0 && r.refill_carry < r.refill_period_ms.max(1));
    }

    /// Refilling in many small steps gives exactly what one refill gives.
    #[test]
    fn refill_is_path_independent(limit in valid_limit(), start in 0i64..1 << 40,
                                  steps in proptest::collection::vec(0i64..5_000, 1..50)) {
        let mut s = BucketState::from_limit(&limit, start);
        s.tokens_milli = -s.capacity_milli; // deep in debt, so nothing caps early
        let mut stepped = s;
        let mut now = start;
        for step in &steps {
            now += step;
            stepped = bucket::refill(&stepped, now);
        }
        let once = bucket::refill(&s, now);
        if once.tokens_milli < once.capacity_milli {
            prop_assert_eq!(stepped, once);
        } else {
            prop_assert_eq!(stepped.tokens_milli, once.tokens_milli);
        }
    }

    /// A successful consume followed by a failed one: the failed one's wait is exact (one
    /// millisecond earlier is still not enough; the wait itself is).
    #[test]
    fn retry_after_is_the_least_sufficient_wait(cap in 1u64..1_000_000, rate in 1u64..1_000_000,
                                                period in 1u64..100_000, want in 1u64..1_000_000,
                                                now in 0i64..1 << 40) {
        let limit = Limit::custom("l", cap, rate, period);
        let empty = bucket::force_consume(&BucketState::from_limit(&limit, now), cap as i64, now);
        let want = want.min(cap);
        let r = bucket::try_consume(&empty, want, now);
        prop_assert!(!r.success);
        let wait = r.retry_after_ms as i64;
        prop_assert!(bucket::try_consume(&empty, want, now + wait).success);
        prop_assert!(!bucket::try_consume(&empty, want, now + wait - 1).success);
        prop_assert_eq!(bucket::time_until_available(&empty, want, now), r.retry_after_ms);
    }
}

/// A 100-per-minute limit refilled every millisecond accrues exactly 100 a minute (the
/// reference library's drift compensation gave 180).
#[test]
fn per_millisecond_refill_accrues_exactly_the_rate() {
    for every_ms in [1, 3, 7, 13, 600] {
        let limit = Limit::per_minute("rpm", 100);
        let mut s = BucketState::from_limit(&limit, 0);
        s = bucket::force_consume(&s, 100, 0);
        let mut now = 0;
        let mut admitted = 0;
        while now + every_ms <= 60_000 {
            now += every_ms;
            let r = bucket::try_consume(&s, 1, now);
            if r.success {
                admitted += 1;
            }
            s = r.state;
        }
        // Over 60 s from empty, exactly 100 tokens accrue (the 100th at 60,000 ms).
        let expected = if 60_000 % every_ms == 0 { 100 } else { 99 };
        assert_eq!(admitted, expected, "refilled every {every_ms} ms");
    }
}

/// The largest capacity refilled over a whole day of milliseconds does not overflow.
#[test]
fn extreme_values_do_not_overflow() {
    let limit = Limit::custom("l", MAX_TOKENS, MAX_TOKENS, 1);
    let s = bucket::force_consume(&BucketState::from_limit(&limit, 0), MAX_TOKENS as i64, 0);
    let r = bucket::refill(&s, 86_400_000);
    assert_eq!(r.tokens_milli, r.capacity_milli);
    let slow = Limit::custom("l", MAX_TOKENS, 1, MAX_REFILL_PERIOD_SECONDS);
    let empty = bucket::force_consume(&BucketState::from_limit(&slow, 0), MAX_TOKENS as i64, 0);
    // 10^15 tokens at one per ten years is longer than u64 milliseconds: saturates.
    assert_eq!(
        bucket::time_until_available(&empty, MAX_TOKENS, 0),
        u64::MAX
    );
    assert_eq!(
        bucket::time_until_available(&empty, 1, 0),
        MAX_REFILL_PERIOD_SECONDS * 1000
    );
}
