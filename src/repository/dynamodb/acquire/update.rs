//! Update and condition expressions for bucket writes, built from an image: the
//! unlocked deltas and the rf-locked write. Pure, no I/O.

use aws_sdk_dynamodb::types::AttributeValue;

use super::plan::{fresh_window_ms, rf_is_fresh};
use crate::bucket::{self, BucketState, MILLI, MIN_TOKENS_MILLI};
use crate::naming::RESERVED_LIMIT_NAME;
use crate::repository::dynamodb::codec::Image;
use crate::repository::dynamodb::expr::{Expr, Update};
use crate::repository::dynamodb::keys;
use crate::repository::{
    debt_too_deep, reconcile_shard, same_params, shard_params_changed, ItemRequest,
};
use crate::{Entity, Error, Limit};

/// Signed deltas without moving `rf`, so concurrent adjustments of a hot item never
/// conflict on it. The item's `rf` must be fresh (within the window `W`, see
/// [`fresh_window_ms`]) and every limit stored with the configured parameters; per limit:
///
/// - a debit: `ADD`, keeping the debt within [`MIN_TOKENS_MILLI`] (conditioned on a fresh
///   `rf`);
/// - a credit: conditioned on `rf` being the image's `X` (pinned, not moved), so the
///   refill not yet written is known: `refill(now - X)`, up to the carry. If the tokens
///   plus that refill plus the credit stay below capacity, `ADD` the credit (the cap is
///   not met, so refill and credit commute: exact). If they reach capacity, the bucket is
///   full now: `SET` the tokens to capacity and the carry to 0 (crediting at most the
///   refill since `X`, within `W`, as the fresh-`rf` rule allows). The rare band between
///   the two bounds of the carry goes to the rf-locked write.
///
/// The variant is chosen from `image`; a stale image fails a condition and the returned
/// item is used next time.
pub(super) fn unlocked_update(image: &Image, deltas: &[&(Limit, i64)], now: i64) -> (Update, Expr) {
    let mut expr = Expr::default();
    let mut update = Update::default();
    update.conditions.push("attribute_exists(PK)".into());
    let rf = expr.name("rf");
    let window = fresh_window_ms(deltas.iter().map(|(l, _)| l));
    let pinned = image.rf.filter(|_| deltas.iter().any(|(_, d)| *d < 0));
    match pinned {
        Some(x) => {
            let v = expr.num(x);
            update.conditions.push(format!("{rf} = {v}"));
        }
        None => {
            let oldest_rf = expr.num(now.saturating_sub(window));
            update.conditions.push(format!("{rf} >= {oldest_rf}"));
        }
    }
    let since = pinned.map_or(window, |x| now.saturating_sub(x));
    for (limit, delta) in deltas {
        let [tk, tc] = ["tk", "tc"].map(|f| expr.name(&keys::bucket_attr(&limit.name, f)));
        let change = delta.saturating_mul(MILLI);
        let plus = expr.num(change);
        update.add.push(format!("{tc} {plus}"));
        // Debit or credit, the write acts at the lease's parameters: under others, the
        // rf-locked write reconciles them.
        require_params(&mut expr, &mut update, limit);
        if change > 0 {
            let minus = expr.num(change.saturating_neg());
            let floor = expr.num(MIN_TOKENS_MILLI.saturating_add(change));
            update.add.push(format!("{tk} {minus}"));
            update.conditions.push(format!("{tk} >= {floor}"));
            continue;
        }
        let fresh = BucketState::for_shard(limit, image.shards(), now);
        let credit = change.saturating_neg();
        match credit_variant(image.buckets.get(&limit.name), &fresh, credit, since) {
            Some(CreditVariant::Fills { low }) => {
                let rc = expr.name(&keys::bucket_attr(&limit.name, "rc"));
                let cap = expr.num(fresh.capacity_milli);
                let zero = expr.num(0);
                let low = expr.num(low);
                update.set.push(format!("{tk} = {cap}"));
                update.set.push(format!("{rc} = {zero}"));
                update.conditions.push(format!("{tk} >= {low}"));
            }
            // The clear variant (and, should the image show neither, the conservative one:
            // the caller builds this only when `unlocked_fits`).
            variant => {
                let ceiling = match variant {
                    Some(CreditVariant::Clear { ceiling }) => ceiling,
                    _ => credit_bounds(&fresh, credit, since).0,
                };
                let ceiling = expr.num(ceiling);
                let amount = expr.num(credit);
                update.add.push(format!("{tk} {amount}"));
                update.conditions.push(format!("{tk} <= {ceiling}"));
            }
        }
    }
    (update, expr)
}

/// How an unlocked credit is written.
pub(super) enum CreditVariant {
    /// `ADD`: the tokens stay at most `ceiling` before it, so the cap is not met.
    Clear { ceiling: i64 },
    /// `SET` to capacity: the tokens are at least `low` before it, so the bucket is full.
    Fills { low: i64 },
}

/// The bounds of a credit of `credit` millitokens on `stored`, `since_ms` after its `rf`:
/// the refill not yet written lies between `since * ra / rp` (no carry) and that plus one
/// period's worth (any carry), rounded outward.
pub(super) fn credit_bounds(fresh: &BucketState, credit: i64, since_ms: i64) -> (i64, i64) {
    let pending_hi = refill_over(fresh, since_ms);
    let pending_lo = if fresh.refill_period_ms > 0 {
        i64::try_from(
            i128::from(since_ms.max(0)) * i128::from(fresh.refill_amount_milli)
                / i128::from(fresh.refill_period_ms),
        )
        .unwrap_or(i64::MAX)
    } else {
        0
    };
    let ceiling = fresh
        .capacity_milli
        .saturating_sub(credit)
        .saturating_sub(pending_hi);
    let low = fresh
        .capacity_milli
        .saturating_sub(credit)
        .saturating_sub(pending_lo);
    (ceiling, low)
}

/// Which unlocked credit fits `stored` (`None`: neither, the rf-locked write does it).
pub(super) fn credit_variant(
    stored: Option<&BucketState>,
    fresh: &BucketState,
    credit: i64,
    since_ms: i64,
) -> Option<CreditVariant> {
    let stored = stored?;
    let (ceiling, low) = credit_bounds(fresh, credit, since_ms);
    if stored.tokens_milli <= ceiling {
        Some(CreditVariant::Clear { ceiling })
    } else if stored.tokens_milli >= low {
        Some(CreditVariant::Fills { low })
    } else {
        None
    }
}

/// Whether [`unlocked_update`] would pass on `image`: a fresh `rf`, every limit stored
/// with the configured parameters, debits within the debt bound, each credit clearly below
/// or at capacity.
pub(super) fn unlocked_fits(
    image: &Image,
    deltas: &[&(Limit, i64)],
    now: i64,
    window: i64,
) -> bool {
    let since = image.rf.map_or(window, |x| now.saturating_sub(x));
    rf_is_fresh(image, now, window)
        && deltas.iter().all(|(limit, delta)| {
            let Some(stored) = image.buckets.get(&limit.name) else {
                return false;
            };
            let change = delta.saturating_mul(MILLI);
            if change > 0 {
                // A debit adopts the lease's parameters as every write does (the memory
                // backend's too): under others, the rf-locked write reconciles them.
                !shard_params_changed(stored, limit, image.shards())
                    && stored.tokens_milli >= MIN_TOKENS_MILLI.saturating_add(change)
            } else {
                let fresh = BucketState::for_shard(limit, image.shards(), now);
                !shard_params_changed(stored, limit, image.shards())
                    && credit_variant(Some(stored), &fresh, change.saturating_neg(), since)
                        .is_some()
            }
        })
}

/// The most a bucket refills over `window_ms`, carry included, in millitokens (rounded up).
pub(super) fn refill_over(state: &BucketState, window_ms: i64) -> i64 {
    if state.refill_period_ms <= 0 {
        return 0;
    }
    let accrued = i128::from(window_ms.max(0)) * i128::from(state.refill_amount_milli)
        + i128::from(state.refill_period_ms);
    i64::try_from(accrued / i128::from(state.refill_period_ms) + 1).unwrap_or(i64::MAX)
}

/// The rf-locked write of signed deltas on `current`: refilled, charged or credited
/// (capped at capacity), never past the debt bound.
pub(super) fn locked_deltas(
    current: &Image,
    deltas: &[&(Limit, i64)],
    now: i64,
) -> Result<(Update, Expr), Error> {
    let mut changes = Vec::with_capacity(deltas.len());
    for (limit, delta) in deltas {
        let stored = reconcile_shard(
            current.buckets.get(&limit.name),
            limit,
            current.shards(),
            now,
        );
        let state = bucket::force_consume(&stored, *delta, now);
        if state.tokens_milli < MIN_TOKENS_MILLI {
            return Err(debt_too_deep(&limit.name, *delta));
        }
        changes.push(Change {
            limit,
            state,
            consumed: delta.saturating_mul(MILLI),
            must_cover: false,
        });
    }
    Ok(locked_update(current, &changes, Ttl::Keep, now))
}

/// How an rf-locked write moves one limit's tokens from what the image shows (`old`) to
/// `target`, so that it is exact whatever the stored tokens are when it lands: the image
/// is only a guide (speculative takes by this or any other process `ADD` to the tokens
/// without moving `rf`), and the write is conditioned on the stored tokens being in the
/// range where it is exact. Outside it the condition fails and the write is built again
/// from the item it returns.
///
/// The parameters and carry the refill counts from are pinned as well: an unlocked credit
/// may zero the carry without moving `rf`, and a write that moves `rf` within the same
/// millisecond (a lease settling at other parameters) leaves `rf` as it was.
enum TokenMove {
    /// Nothing reaches capacity: the refill (and credit or debit) shifts any stored tokens
    /// alike. `ADD delta`, conditioned on the stored tokens staying below capacity through
    /// the refill and the credit (`hi`).
    Shift { delta: i64, refill: i64 },
    /// The refill (or a credit after it) fills the bucket: the result is `target` whatever
    /// the stored tokens were, as long as they are at least `floor`. `SET`.
    Full { target: i64, floor: i64 },
    /// The parameters changed: exact only on the tokens the image shows.
    Pinned { delta: i64 },
}

impl TokenMove {
    /// `consumed`: the millitokens charged (negative for a credit) after the refill to
    /// `at`, which `target` is the result of.
    fn of(old: &BucketState, target: &BucketState, consumed: i64, at: i64) -> Self {
        let delta = target.tokens_milli.saturating_sub(old.tokens_milli);
        if !same_params(old, target) {
            return TokenMove::Pinned { delta };
        }
        let (refill, refill_fills) = bucket::refill_due(old, at);
        if refill_fills {
            return TokenMove::Full {
                target: target.tokens_milli,
                floor: old.capacity_milli.saturating_sub(refill),
            };
        }
        if consumed < 0 && target.tokens_milli >= target.capacity_milli {
            // The credit filled it: so it does for any tokens within the credit and refill.
            return TokenMove::Full {
                target: target.tokens_milli,
                floor: old
                    .capacity_milli
                    .saturating_sub(refill)
                    .saturating_add(consumed),
            };
        }
        TokenMove::Shift { delta, refill }
    }

    /// Adds the tokens' part of the write. `must_cover`: an acquire, whose take the tokens
    /// must still cover; otherwise a debit keeps the debt in bounds. `shards`: the item's
    /// shard count, which `old`'s capacity and refill amount are shares of.
    fn write(
        &self,
        expr: &mut Expr,
        update: &mut Update,
        name: &str,
        old: &BucketState,
        must_cover: bool,
        shards: i64,
    ) {
        let tk = keys::bucket_attr(name, "tk");
        match *self {
            TokenMove::Shift { delta, refill } => {
                let lo = if must_cover {
                    Some(delta.saturating_neg())
                } else {
                    (delta < 0).then(|| MIN_TOKENS_MILLI.saturating_sub(delta))
                };
                let rise = refill.max(delta);
                let hi = (rise > 0).then(|| old.capacity_milli.saturating_sub(rise));
                // Name `tk` only when it is used: DynamoDB rejects an unused name.
                if delta != 0 || lo.is_some() || hi.is_some() {
                    let tk = expr.name(&tk);
                    if delta != 0 {
                        let d = expr.num(delta);
                        update.add.push(format!("{tk} {d}"));
                    }
                    bound(expr, update, &tk, lo, hi);
                }
                pin_refill(expr, update, name, old, shards);
            }
            TokenMove::Full { target, floor } => {
                let tk = expr.name(&tk);
                let t = expr.num(target);
                update.set.push(format!("{tk} = {t}"));
                bound(expr, update, &tk, Some(floor), None);
                pin_refill(expr, update, name, old, shards);
            }
            TokenMove::Pinned { delta } => {
                let tk = expr.name(&tk);
                if delta != 0 {
                    let d = expr.num(delta);
                    update.add.push(format!("{tk} {d}"));
                }
                let at = expr.num(old.tokens_milli);
                update.conditions.push(format!("{tk} = {at}"));
                pin_refill(expr, update, name, old, shards);
            }
        }
    }
}

/// Conditions a write on the limit's stored parameters and carry being `old`'s (a missing
/// carry reads 0: the Python library does not store it). On a shard of `shards`, the
/// stored capacity and refill amount are the undivided base, of which `old` holds the
/// floored share: any base with that share.
fn pin_refill(expr: &mut Expr, update: &mut Update, name: &str, old: &BucketState, shards: i64) {
    let shares = [
        ("cp", old.capacity_milli, shards),
        ("ra", old.refill_amount_milli, shards),
        ("rp", old.refill_period_ms, 1),
    ];
    for (field, share, shards) in shares {
        let n = expr.name(&keys::bucket_attr(name, field));
        let lo = share.saturating_mul(shards);
        if shards <= 1 {
            let v = expr.num(lo);
            update.conditions.push(format!("{n} = {v}"));
        } else {
            bound(
                expr,
                update,
                &n,
                Some(lo),
                Some(lo.saturating_add(shards - 1)),
            );
        }
    }
    let carry = old.refill_carry;
    let rc = expr.name(&keys::bucket_attr(name, "rc"));
    let v = expr.num(carry);
    if carry == 0 {
        update
            .conditions
            .push(format!("(attribute_not_exists({rc}) OR {rc} = {v})"));
    } else {
        update.conditions.push(format!("{rc} = {v}"));
    }
}

/// One limit's part in an rf-locked write.
pub(super) struct Change<'a> {
    pub(super) limit: &'a Limit,
    /// The state to reach (refilled to the write's time, then charged).
    pub(super) state: BucketState,
    /// Millitokens to add to `tc` (negative for a credit).
    pub(super) consumed: i64,
    /// Whether the stored tokens must still cover the change at write time (an acquire);
    /// false for adjustments, which may go into debt.
    pub(super) must_cover: bool,
}

/// What an rf-locked write does to the item's `ttl`.
pub(super) enum Ttl {
    Set(i64),
    Remove,
    Keep,
}

/// An rf-locked write: moves `rf` to the write's time and, in the same `UpdateItem`,
/// per changed limit `ADD tk (target - stored)`, `ADD tc`, `SET rc` (and the parameters
/// when the config changed; a limit the item lacks is seeded in full), and credits the
/// refill accrued since `rf` to every other limit stored on the item, since moving `rf`
/// would otherwise discard it.
///
/// Conditions: `rf` is the one read (one writer claims each refill window); per limit the
/// stored tokens still cover the change (a speculative write may have drained them since)
/// and the refill does not lift them above capacity (a credit may have landed since).
pub(super) fn locked_update(
    image: &Image,
    changes: &[Change<'_>],
    ttl: Ttl,
    now: i64,
) -> (Update, Expr) {
    let mut expr = Expr::default();
    let mut update = Update::default();
    update.conditions.push("attribute_exists(PK)".into());
    let rf = expr.name("rf");
    match image.rf {
        Some(old) => {
            let v = expr.num(old);
            update.conditions.push(format!("{rf} = {v}"));
        }
        None => update
            .conditions
            .push(format!("attribute_not_exists({rf})")),
    }
    let new_rf = now.max(image.rf.unwrap_or(i64::MIN));
    let v = expr.num(new_rf);
    update.set.push(format!("{rf} = {v}"));
    for change in changes {
        let name = &change.limit.name;
        let rc = expr.name(&keys::bucket_attr(name, "rc"));
        let carry = expr.num(change.state.refill_carry);
        update.set.push(format!("{rc} = {carry}"));
        match image.buckets.get(name) {
            Some(old) => {
                let tokens = TokenMove::of(old, &change.state, change.consumed, now);
                let shards = i64::from(image.shards());
                tokens.write(&mut expr, &mut update, name, old, change.must_cover, shards);
                if change.consumed != 0 {
                    let tc = expr.name(&keys::bucket_attr(name, "tc"));
                    let c = expr.num(change.consumed);
                    update.add.push(format!("{tc} {c}"));
                }
                if !same_params(old, &change.state) {
                    set_params(&mut expr, &mut update, change.limit);
                }
            }
            None => {
                let tk = expr.name(&keys::bucket_attr(name, "tk"));
                let t = expr.num(change.state.tokens_milli);
                update.set.push(format!("{tk} = {t}"));
                let tc = expr.name(&keys::bucket_attr(name, "tc"));
                let zero = expr.num(0);
                let c = expr.num(change.consumed);
                update
                    .set
                    .push(format!("{tc} = if_not_exists({tc}, {zero}) + {c}"));
                update
                    .conditions
                    .push(format!("attribute_not_exists({tk})"));
                set_params(&mut expr, &mut update, change.limit);
            }
        }
    }
    let untouched = image
        .buckets
        .iter()
        .filter(|(name, _)| !changes.iter().any(|c| &c.limit.name == *name))
        .map(|(name, old)| (name.as_str(), old))
        .chain(image.wcu.as_ref().map(|w| (RESERVED_LIMIT_NAME, w)));
    for (name, old) in untouched {
        let refilled = bucket::refill(old, new_rf);
        if refilled == *old {
            continue;
        }
        let rc = expr.name(&keys::bucket_attr(name, "rc"));
        let carry = expr.num(refilled.refill_carry);
        update.set.push(format!("{rc} = {carry}"));
        // `wcu` is per partition, never divided.
        let shards = if name == RESERVED_LIMIT_NAME {
            1
        } else {
            i64::from(image.shards())
        };
        let tokens = TokenMove::of(old, &refilled, 0, new_rf);
        tokens.write(&mut expr, &mut update, name, old, false, shards);
    }
    match ttl {
        Ttl::Set(t) => {
            let n = expr.name("ttl");
            let v = expr.num(t);
            update.set.push(format!("{n} = {v}"));
        }
        Ttl::Remove => {
            let n = expr.name("ttl");
            update.remove.push(n);
        }
        Ttl::Keep => {}
    }
    (update, expr)
}

/// Conditions a stored value to `lo..=hi` (either side optional).
pub(super) fn bound(
    expr: &mut Expr,
    update: &mut Update,
    attr: &str,
    lo: Option<i64>,
    hi: Option<i64>,
) {
    match (lo, hi) {
        (Some(lo), Some(hi)) => {
            let (lo, hi) = (expr.num(lo), expr.num(hi));
            update
                .conditions
                .push(format!("{attr} BETWEEN {lo} AND {hi}"));
        }
        (Some(lo), None) => {
            let lo = expr.num(lo);
            update.conditions.push(format!("{attr} >= {lo}"));
        }
        (None, Some(hi)) => {
            let hi = expr.num(hi);
            update.conditions.push(format!("{attr} <= {hi}"));
        }
        (None, None) => {}
    }
}

/// A limit's parameter attributes (capacity, refill amount, refill period) and the values
/// stored: the undivided base, whatever the shard (Python's contract, section 5).
pub(super) fn params(limit: &Limit) -> [(&'static str, i64); 3] {
    let state = BucketState::from_limit(limit, 0);
    [
        ("cp", state.capacity_milli),
        ("ra", state.refill_amount_milli),
        ("rp", state.refill_period_ms),
    ]
}

/// Conditions the write on the item storing `limit`'s parameters (a write that does not
/// refill must not act on a bucket under other parameters).
pub(super) fn require_params(expr: &mut Expr, update: &mut Update, limit: &Limit) {
    for (field, value) in params(limit) {
        let n = expr.name(&keys::bucket_attr(&limit.name, field));
        let v = expr.num(value);
        update.conditions.push(format!("{n} = {v}"));
    }
}

pub(super) fn set_params(expr: &mut Expr, update: &mut Update, limit: &Limit) {
    for (field, value) in params(limit) {
        let n = expr.name(&keys::bucket_attr(&limit.name, field));
        let v = expr.num(value);
        update.set.push(format!("{n} = {v}"));
    }
}

/// Conditions an acquire's write on the item holding nothing this crate must not write
/// past: the Python library's `disabled` stamp, a live `bypass` stamp (an acquire on it is
/// admitted bypass-shaped instead), or a schedule stamp. A write that
/// fails on one returns the item, and [`refusal`] names why (or the acquire goes
/// bypass-shaped). Soft stamps (`b_{L}_soft`) are Python's cache of its config: this crate
/// decides softness from the config it reads, and leaves the stamps to Python.
pub(in crate::repository::dynamodb) fn require_enforceable(
    now: i64,
    expr: &mut Expr,
    update: &mut Update,
) {
    for attr in ["disabled", "vu"] {
        let n = expr.name(attr);
        update.conditions.push(format!("attribute_not_exists({n})"));
    }
    let bypass = expr.name("bypass");
    let now_v = expr.num(now);
    update.conditions.push(format!(
        "(attribute_not_exists({bypass}) OR {bypass} <= {now_v})"
    ));
}

/// Marks each soft limit of `item` on the bucket item for the Python library, which judges
/// soft-ness by a bucket's `b_{L}_soft` stamp when its config cache served the limits and
/// would otherwise enforce the limit as hard: an expired stamp (`0`) where there is none,
/// so Python's next pass reads the config uncached and stamps a live deadline itself. An
/// expired stamp grants nothing, so it can never make Python admit more; a live stamp of
/// Python's is left alone.
pub(in crate::repository::dynamodb) fn mark_soft(
    item: &ItemRequest,
    expr: &mut Expr,
    update: &mut Update,
) {
    for limit in item.limits.iter().filter(|l| l.soft) {
        let n = expr.name(&keys::bucket_attr(&limit.name, "soft"));
        let zero = expr.num(0);
        update.set.push(format!("{n} = if_not_exists({n}, {zero})"));
    }
}

/// Why an acquire must not go on with this item: it is disabled, or holds a feature this
/// crate does not enforce yet. Refused, never enforced with other numbers.
pub(in crate::repository::dynamodb) fn refusal(image: &Image, item: &ItemRequest) -> Option<Error> {
    let unsupported = |feature: &str| Error::Unsupported {
        feature: feature.to_string(),
        entity_id: item.entity_id.to_string(),
        resource: item.resource.to_string(),
    };
    if image.disabled {
        return Some(Error::ResourceDisabled {
            entity_id: item.entity_id.to_string(),
            resource: item.resource.to_string(),
        });
    }
    image.unsupported.map(unsupported)
}

/// The write-capacity pseudo-limit the Python library keeps on every bucket item (its
/// table contract, section 5): 1,000 writes a second, full at creation. Its fast path
/// requires it, so an item without it costs Python four calls per acquire.
pub(in crate::repository::dynamodb) const WCU_FIELDS: [(&str, i64); 5] = [
    ("tk", 1_000_000),
    ("cp", 1_000_000),
    ("ra", 1_000_000),
    ("rp", 1_000),
    ("tc", 0),
];

/// What an item needs for the Python library's fast path: the full `wcu` pseudo-limit,
/// and its owner's `cascade` policy and `parent_id` (Python reads them from the bucket to
/// decide whether to charge the parent, so an item without them would skip the parent).
/// As `(attribute, value)` pairs, for a new item or a seed.
pub(in crate::repository::dynamodb) fn shared_fields(
    owner: Option<&Entity>,
) -> Vec<(String, AttributeValue)> {
    let mut fields: Vec<(String, AttributeValue)> = WCU_FIELDS
        .iter()
        .map(|(field, value)| {
            (
                keys::bucket_attr(RESERVED_LIMIT_NAME, field),
                AttributeValue::N(value.to_string()),
            )
        })
        .collect();
    fields.extend(owner_fields(
        owner.and_then(|o| o.parent_id.as_deref()),
        owner.is_some_and(|o| o.cascade),
    ));
    fields
}

/// A bucket's copy of its owner's policy: `cascade` (only with a parent) and `parent_id`.
pub(in crate::repository::dynamodb) fn owner_fields(
    parent: Option<&str>,
    cascade: bool,
) -> Vec<(String, AttributeValue)> {
    let mut fields = vec![(
        "cascade".to_string(),
        AttributeValue::Bool(parent.is_some() && cascade),
    )];
    if let Some(parent) = parent {
        fields.push(("parent_id".into(), AttributeValue::S(parent.to_string())));
    }
    fields
}

/// Seeds [`shared_fields`] on an item this crate created before it shared tables with
/// Python (it has no `wcu`), in the same rf-locked write; conditioned on `wcu` still being
/// absent.
pub(in crate::repository::dynamodb) fn seed_shared_fields(
    image: &Image,
    owner: Option<&Entity>,
    expr: &mut Expr,
    update: &mut Update,
) {
    if image.wcu.is_some() {
        return;
    }
    let cp = expr.name(&keys::bucket_attr(RESERVED_LIMIT_NAME, "cp"));
    update
        .conditions
        .push(format!("attribute_not_exists({cp})"));
    for (attr, value) in shared_fields(owner) {
        let n = expr.name(&attr);
        let v = expr.value(value);
        update.set.push(format!("{n} = {v}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100 a minute: 1,666 millitokens a second.
    fn state(tokens: i64) -> BucketState {
        let mut s = BucketState::from_limit(&Limit::per_minute("rpm", 100), 0);
        s.tokens_milli = tokens;
        s
    }

    #[test]
    fn an_unlocked_credit_is_clear_of_the_cap_or_fills_the_bucket() {
        let fresh = state(100_000);
        let credit = 10_000;
        // 600 ms after rf: 1,000 millitokens of refill not yet written.
        let since = 600;
        let (ceiling, low) = credit_bounds(&fresh, credit, since);
        assert!(ceiling < low && low - ceiling <= 3, "{ceiling} {low}");
        // Well below: refill and credit cannot meet the cap, whatever the carry.
        match credit_variant(Some(&state(50_000)), &fresh, credit, since) {
            Some(CreditVariant::Clear { ceiling }) => {
                assert!(ceiling + credit + refill_over(&fresh, since) <= 100_000 + 1_667)
            }
            _ => panic!("expected a clear credit"),
        }
        // Near full: tokens + refill + credit reach capacity, so the bucket is full now.
        assert!(matches!(
            credit_variant(Some(&state(89_500)), &fresh, credit, since),
            Some(CreditVariant::Fills { .. })
        ));
        // Between the bounds of the carry: the rf-locked write decides.
        let between = (ceiling + low) / 2 + 1;
        if between > ceiling && between < low {
            assert!(credit_variant(Some(&state(between)), &fresh, credit, since).is_none());
        }
    }
}
