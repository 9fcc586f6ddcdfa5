//! The pure decision on one item's image: what fits, and whether a speculative write
//! would succeed. No I/O.

use crate::bucket::{self, BucketState, MILLI};
use crate::repository::dynamodb::codec::Image;
use crate::repository::{reconcile_shard, shard_params_changed, Checks, ItemRequest, LimitCheck};
use crate::Limit;

/// What the arithmetic says about one item.
#[derive(Debug)]
pub(in crate::repository::dynamodb) struct Plan {
    /// One check per limit.
    pub checks: Checks,
    /// Whether every limit fits.
    pub fits: bool,
    /// The state of every limit after this acquire (refilled, reconciled, consumed).
    pub states: Vec<BucketState>,
    /// Whether the stored tokens cover the request without refill, with the stored
    /// parameters equal to the requested ones: a speculative write would succeed.
    pub speculative_ok: bool,
}

/// Decides an item against an image (`None`: the item does not exist).
pub(in crate::repository::dynamodb) fn evaluate(
    image: Option<&Image>,
    item: &ItemRequest,
    now_ms: i64,
) -> Plan {
    let window = fresh_window_ms(charged(item));
    // The shard's own count (a new shard is created at the count drawn with).
    let shards = image.map_or(item.shard.count, Image::shards);
    let mut plan = Plan {
        checks: Checks::with_capacity(item.limits.len()),
        fits: true,
        states: Vec::with_capacity(item.limits.len()),
        // An item without the `wcu` pseudo-limit (written before tables were shared with
        // Python) fails the speculative write's `wcu` term: the rf-locked write seeds it.
        speculative_ok: image.is_some_and(|i| {
            !expired(i, now_ms) && rf_is_fresh(i, now_ms, window) && i.wcu.is_some()
        }),
    };
    for (limit, &amount) in item.limits.iter().zip(&item.amounts) {
        let stored = image.and_then(|i| i.buckets.get(&limit.name));
        plan.speculative_ok &= stored.is_some_and(|s| {
            !shard_params_changed(s, limit, shards)
                && i128::from(s.tokens_milli) >= floor(limit, amount)
        });
        let current = reconcile_shard(stored, limit, shards, now_ms);
        let result = bucket::try_consume_limit(limit, &current, amount, now_ms);
        plan.fits &= result.success;
        let mut check = LimitCheck::from_consume(limit, amount, &result);
        if !result.success && milli(amount) > i128::from(current.capacity_milli) {
            // More than a shard can ever hold: no wait makes it fit.
            check.retry_after_ms = None;
        }
        plan.checks.push(check);
        plan.states.push(result.state);
    }
    plan
}

/// The least a limit's stored tokens must be for a take of `amount` without refill: the
/// amount, or for a soft limit (which may go into debt) the amount below the debt bound.
pub(super) fn floor(limit: &Limit, amount: u64) -> i128 {
    if limit.soft {
        i128::from(bucket::MIN_TOKENS_MILLI) + milli(amount)
    } else {
        milli(amount)
    }
}

/// Whether the item stores some requested limit with other parameters (capacity, refill
/// amount or period) than those requested.
pub(super) fn stale_params(image: &Image, item: &ItemRequest) -> bool {
    item.limits.iter().any(|limit| {
        image
            .buckets
            .get(&limit.name)
            .is_some_and(|stored| shard_params_changed(stored, limit, image.shards()))
    })
}

/// Whether an item takes no tokens at all.
pub(super) fn takes_nothing(item: &ItemRequest) -> bool {
    item.amounts.iter().all(|&a| a == 0)
}

/// The limits an item takes tokens from.
pub(super) fn charged(item: &ItemRequest) -> impl Iterator<Item = &Limit> {
    item.limits
        .iter()
        .zip(&item.amounts)
        .filter(|(_, &a)| a > 0)
        .map(|(l, _)| l)
}

/// The fresh-`rf` window `W` of DESIGN section 9: how far behind `now` an item's `rf` may
/// be for a write that takes tokens without refilling (speculative writes and debits).
///
/// Such a write leaves `rf` where it was, so the next rf-locked write refills over the
/// whole span since `rf` and caps at capacity, crediting time the bucket sat full *before*
/// the take. Requiring `rf >= now - W` keeps that credit within the refill over `W`:
/// `W = max(time for one token, time to fill / 100)`, the least over the limits taken
/// from (so the excess in any window is at most max(1 token, 1% of capacity)).
pub(in crate::repository::dynamodb) fn fresh_window_ms<'a>(
    limits: impl Iterator<Item = &'a Limit>,
) -> i64 {
    limits
        .map(|l| {
            let period_ms = u128::from(l.refill_period_seconds) * 1000;
            let amount = u128::from(l.refill_amount.max(1));
            let token_ms = period_ms / amount;
            let fill_ms = u128::from(l.capacity) * period_ms / amount;
            i64::try_from(token_ms.max(fill_ms / 100)).unwrap_or(i64::MAX)
        })
        .min()
        .unwrap_or(i64::MAX)
        .max(1)
}

/// Whether the image's `rf` lies within `window` of `now` (a write that takes without
/// refilling may go ahead).
pub(super) fn rf_is_fresh(image: &Image, now_ms: i64, window: i64) -> bool {
    image
        .rf
        .is_some_and(|rf| rf >= now_ms.saturating_sub(window))
}

pub(super) fn expired(image: &Image, now_ms: i64) -> bool {
    image.ttl.is_some_and(|t| t <= now_ms.div_euclid(1000))
}

/// Whole tokens as millitokens (amounts are at most [`crate::limit::MAX_TOKENS`]).
pub(super) fn milli(amount: u64) -> i128 {
    i128::from(amount) * i128::from(MILLI)
}

pub(super) fn milli_i64(amount: u64) -> i64 {
    i64::try_from(milli(amount)).unwrap_or(i64::MAX)
}

/// The checks of a speculative write that succeeded, from the item it left.
pub(super) fn admitted_checks(new: &Image, item: &ItemRequest, now_ms: i64) -> Checks {
    item.limits
        .iter()
        .zip(&item.amounts)
        .map(|(limit, &amount)| {
            let available = new.buckets.get(&limit.name).map_or(0, |state| {
                let mut before = *state;
                before.tokens_milli = before.tokens_milli.saturating_add(milli_i64(amount));
                bucket::available(&before, now_ms)
            });
            LimitCheck {
                available,
                exceeded: false,
                retry_after_ms: Some(0),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;

    const NOW: i64 = 1_000_000;

    fn item(limits: &[Limit], amounts: &[u64]) -> ItemRequest {
        ItemRequest {
            entity_id: "e".into(),
            resource: "r".into(),
            limits: Arc::from(limits),
            amounts: amounts.into(),
            expires_when_idle: true,
            owner: None,
            bypass: false,
            shard: Default::default(),
        }
    }

    /// An image storing each limit with `tokens` whole tokens, refilled at `rf`.
    fn image(limits: &[Limit], tokens: i64, rf: i64) -> Image {
        let buckets: BTreeMap<String, BucketState> = limits
            .iter()
            .map(|l| {
                let mut state = BucketState::from_limit(l, rf);
                state.tokens_milli = tokens * MILLI;
                (l.name.clone(), state)
            })
            .collect();
        let wcu = BucketState::from_limit(&Limit::per_second("writes", 1_000), rf);
        Image {
            buckets,
            wcu: Some(wcu),
            rf: Some(rf),
            ..Image::default()
        }
    }

    #[test]
    fn a_missing_item_fits_from_full_and_is_never_speculative() {
        let rpm = [Limit::per_minute("rpm", 10)];
        let plan = evaluate(None, &item(&rpm, &[3]), NOW);
        assert!(plan.fits && !plan.speculative_ok);
        assert_eq!(plan.states[0].tokens_milli, 7 * MILLI);
        assert_eq!(plan.checks[0].available, 10);
    }

    #[test]
    fn stored_tokens_that_cover_the_take_with_a_fresh_rf_go_speculative() {
        let rpm = [Limit::per_minute("rpm", 10)];
        let plan = evaluate(Some(&image(&rpm, 5, NOW - 100)), &item(&rpm, &[5]), NOW);
        assert!(plan.fits && plan.speculative_ok);
        // One more than stored: refill since rf may cover it, but not without refilling.
        let plan = evaluate(Some(&image(&rpm, 5, NOW - 100)), &item(&rpm, &[6]), NOW);
        assert!(!plan.fits && !plan.speculative_ok);
    }

    #[test]
    fn an_old_rf_refills_on_the_locked_path_never_speculatively() {
        // 10 a minute: W = 6 s. An rf a minute old is stale: the bucket refills to full
        // first (so the take fits), on the rf-locked write.
        let rpm = [Limit::per_minute("rpm", 10)];
        let plan = evaluate(Some(&image(&rpm, 0, NOW - 60_000)), &item(&rpm, &[10]), NOW);
        assert!(plan.fits && !plan.speculative_ok);
        assert_eq!(plan.states[0].tokens_milli, 0);
    }

    #[test]
    fn changed_parameters_and_expired_items_are_not_speculative() {
        let stored = [Limit::per_minute("rpm", 10)];
        let wanted = [Limit::per_minute("rpm", 20)];
        let image_old = image(&stored, 10, NOW);
        assert!(stale_params(&image_old, &item(&wanted, &[1])));
        assert!(!evaluate(Some(&image_old), &item(&wanted, &[1]), NOW).speculative_ok);
        let mut expiring = image(&stored, 10, NOW);
        expiring.ttl = Some(NOW / 1000);
        assert!(!evaluate(Some(&expiring), &item(&stored, &[1]), NOW).speculative_ok);
    }

    #[test]
    fn an_item_without_the_wcu_pseudo_limit_is_seeded_on_the_locked_path() {
        let rpm = [Limit::per_minute("rpm", 10)];
        let mut legacy = image(&rpm, 10, NOW);
        legacy.wcu = None;
        let plan = evaluate(Some(&legacy), &item(&rpm, &[1]), NOW);
        assert!(plan.fits && !plan.speculative_ok);
    }

    #[test]
    fn every_limit_must_fit_and_each_is_checked() {
        let limits = [Limit::per_minute("rpm", 10), Limit::per_minute("tpm", 100)];
        let plan = evaluate(
            Some(&image(&limits, 10, NOW)),
            &item(&limits, &[1, 500]),
            NOW,
        );
        assert!(!plan.fits);
        assert!(!plan.checks[0].exceeded && plan.checks[1].exceeded);
        // A limit taken nothing from does not narrow the fresh window.
        assert!(takes_nothing(&item(&limits, &[0, 0])));
        assert_eq!(charged(&item(&limits, &[0, 5])).count(), 1);
    }

    #[test]
    fn a_shard_holds_its_share_and_refuses_more_than_a_share_for_good() {
        // 100 a minute over 4 shards: each holds 25 and refills 25 a minute.
        let rpm = [Limit::per_minute("rpm", 100)];
        let mut shard = image(&rpm, 0, NOW);
        shard.shard_count = 4;
        for state in shard.buckets.values_mut() {
            *state = BucketState::for_shard(&rpm[0], 4, NOW);
        }
        let plan = evaluate(Some(&shard), &item(&rpm, &[25]), NOW);
        assert!(plan.fits && plan.speculative_ok);
        assert_eq!(plan.checks[0].available, 25);
        // More than a share never fits on any shard: no wait helps.
        let plan = evaluate(Some(&shard), &item(&rpm, &[26]), NOW);
        assert!(!plan.fits);
        assert_eq!(plan.checks[0].retry_after_ms, None);
        // The stored parameters are the base: the shard's share is not a change of limit.
        assert!(!stale_params(&shard, &item(&rpm, &[1])));
        // A new shard starts at its share, at the count it is created with.
        let mut new = item(&rpm, &[5]);
        new.shard = crate::repository::Shard { index: 3, count: 4 };
        let plan = evaluate(None, &new, NOW);
        assert_eq!(plan.states[0].tokens_milli, 20 * MILLI);
        assert_eq!(plan.states[0].capacity_milli, 25 * MILLI);
    }

    #[test]
    fn admitted_checks_report_what_was_available_before_the_take() {
        let rpm = [Limit::per_minute("rpm", 10)];
        let after = image(&rpm, 4, NOW);
        let checks = admitted_checks(&after, &item(&rpm, &[2]), NOW);
        assert_eq!(checks[0].available, 6);
        assert!(!checks[0].exceeded);
    }

    #[test]
    fn the_fresh_window_is_one_token_or_a_hundredth_of_the_fill() {
        // 100 a minute: a token every 600 ms, full in 60 s: W = 600 ms.
        assert_eq!(fresh_window_ms([Limit::per_minute("rpm", 100)].iter()), 600);
        // 10,000 a minute with a burst of 50,000: full in 300 s, W = 3 s.
        let tpm = Limit::per_minute("tpm", 10_000).with_burst(50_000);
        assert_eq!(fresh_window_ms([tpm.clone()].iter()), 3_000);
        // The least over the limits taken from.
        assert_eq!(
            fresh_window_ms([tpm, Limit::per_minute("rpm", 100)].iter()),
            600
        );
        // 1 a day: the time for one token, a day, is longer than a hundredth of the fill.
        assert_eq!(
            fresh_window_ms([Limit::per_day("rpd", 1)].iter()),
            86_400_000
        );
    }
}
