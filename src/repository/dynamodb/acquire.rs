//! The write paths on bucket items (DESIGN section 9): speculative, create, normal, the
//! transaction for a cascade that needs the normal path, and signed adjustments.
//!
//! Every path decides with the pure functions of [`crate::bucket`] on an image of the item
//! (read, or returned by a failed conditional write), and writes with `ADD` under conditions
//! that make the decision hold at write time: nothing is ever read, changed and `Put` back.

use std::time::Duration;

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeValue, KeysAndAttributes, Put, ReturnValue, ReturnValuesOnConditionCheckFailure,
    TransactWriteItem, Update as TxUpdate,
};

use super::codec::{self, num, s, Image, Item};
use super::expr::{Expr, Update};
use super::lease_writes::{claim_lane, Sent, Verdict};
use super::{errors, keys, table, Inner};
use crate::bucket::{self, BucketState, MILLI, MIN_TOKENS_MILLI};
use crate::repository::{
    debt_too_deep, params_changed, reconcile_bucket, AcquireOutcome, ItemRequest, LimitCheck,
};
use crate::{Error, Limit};

/// Attempts before an acquire gives up under contention (then `Unavailable`, never a 429;
/// the caller's wait is bounded by the timeout long before).
const MAX_ATTEMPTS: usize = 32;

/// What the arithmetic says about one item.
#[derive(Debug)]
pub(super) struct Plan {
    /// One check per limit.
    pub checks: Vec<LimitCheck>,
    /// Whether every limit fits.
    pub fits: bool,
    /// The state of every limit after this acquire (refilled, reconciled, consumed).
    pub states: Vec<BucketState>,
    /// Whether the stored tokens cover the request without refill, with the stored
    /// parameters equal to the requested ones: a speculative write would succeed.
    pub speculative_ok: bool,
}

/// Decides an item against an image (`None`: the item does not exist).
pub(super) fn evaluate(image: Option<&Image>, item: &ItemRequest, now_ms: i64) -> Plan {
    let window = fresh_window_ms(charged(item));
    let mut plan = Plan {
        checks: Vec::with_capacity(item.limits.len()),
        fits: true,
        states: Vec::with_capacity(item.limits.len()),
        speculative_ok: image
            .is_some_and(|i| !expired(i, now_ms) && rf_is_fresh(i, now_ms, window)),
    };
    for (limit, &amount) in item.limits.iter().zip(&item.amounts) {
        let stored = image.and_then(|i| i.buckets.get(&limit.name));
        plan.speculative_ok &= stored.is_some_and(|s| {
            !params_changed(s, limit) && i128::from(s.tokens_milli) >= milli(amount)
        });
        let current = reconcile_bucket(stored, limit, now_ms);
        let result = bucket::try_consume(&current, amount, now_ms);
        plan.fits &= result.success;
        plan.checks
            .push(LimitCheck::from_consume(limit, amount, &result));
        plan.states.push(result.state);
    }
    plan
}

/// Whether the item stores some requested limit with other parameters (capacity, refill
/// amount or period) than those requested.
fn stale_params(image: &Image, item: &ItemRequest) -> bool {
    item.limits.iter().any(|limit| {
        image
            .buckets
            .get(&limit.name)
            .is_some_and(|stored| params_changed(stored, limit))
    })
}

fn same_params(a: &BucketState, b: &BucketState) -> bool {
    a.capacity_milli == b.capacity_milli
        && a.refill_amount_milli == b.refill_amount_milli
        && a.refill_period_ms == b.refill_period_ms
}

/// Whether an item takes no tokens at all.
fn takes_nothing(item: &ItemRequest) -> bool {
    item.amounts.iter().all(|&a| a == 0)
}

/// The limits an item takes tokens from.
fn charged(item: &ItemRequest) -> impl Iterator<Item = &Limit> {
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
pub(super) fn fresh_window_ms<'a>(limits: impl Iterator<Item = &'a Limit>) -> i64 {
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
fn rf_is_fresh(image: &Image, now_ms: i64, window: i64) -> bool {
    image
        .rf
        .is_some_and(|rf| rf >= now_ms.saturating_sub(window))
}

fn expired(image: &Image, now_ms: i64) -> bool {
    image.ttl.is_some_and(|t| t <= now_ms.div_euclid(1000))
}

/// Whole tokens as millitokens (amounts are at most [`crate::limit::MAX_TOKENS`]).
fn milli(amount: u64) -> i128 {
    i128::from(amount) * i128::from(MILLI)
}

fn milli_i64(amount: u64) -> i64 {
    i64::try_from(milli(amount)).unwrap_or(i64::MAX)
}

/// The checks of a speculative write that succeeded, from the item it left.
fn admitted_checks(new: &Image, item: &ItemRequest, now_ms: i64) -> Vec<LimitCheck> {
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

/// How a speculative write ended.
enum Speculative {
    /// Consumed; the item as it now is.
    Admitted(Image),
    /// A condition failed; the item as it was (`None`: it does not exist).
    Failed(Option<Image>),
}

/// How a conditional `UpdateItem` ended.
enum Updated {
    /// Written; the new item when asked for.
    Ok(Option<Image>),
    /// A condition failed; the item as it was (`None`: it does not exist).
    ConditionFailed(Option<Image>),
}

/// How a conditional write ended.
enum Written {
    /// Written; the new item when DynamoDB returned it.
    Ok(Option<Image>),
    /// A condition failed; the item as it was, when DynamoDB returned it.
    Conflict(Option<Image>),
}

/// The next step of the single-item loop.
enum Step {
    Speculative,
    Create,
    Read,
    /// The rf-locked write from an image (`cached`: remembered, not just returned).
    Normal {
        image: Image,
        cached: bool,
    },
}

impl Inner {
    /// Consumes from one or two items (child, then parent), all or nothing.
    pub(super) async fn acquire_items(
        &self,
        items: &[ItemRequest],
        now_ms: i64,
    ) -> Result<AcquireOutcome, Error> {
        match items {
            [] => Ok(AcquireOutcome {
                admitted: true,
                checks: Vec::new(),
            }),
            [item] => self.acquire_one(item, now_ms).await,
            [child, parent] => self.acquire_cascade(child, parent, now_ms).await,
            _ => Err(Error::validation(
                "items",
                items.len().to_string(),
                "an acquire covers one entity, or a child and its parent",
            )),
        }
    }

    async fn acquire_one(&self, item: &ItemRequest, now: i64) -> Result<AcquireOutcome, Error> {
        if let Some(image) = self.rejections.get(&item.entity_id, &item.resource, now) {
            // A remembered image under other limit parameters is no guide: the item has
            // to learn the new ones (see `adopt_params`).
            if !stale_params(&image, item) {
                let plan = evaluate(Some(&image), item, now);
                if !plan.fits {
                    return Ok(rejected(plan.checks));
                }
            }
            self.rejections.forget(&item.entity_id, &item.resource);
        }
        if takes_nothing(item) {
            // Nothing to write: decide on a consistent read.
            let image = self.read_bucket(&item.entity_id, &item.resource).await?;
            let plan = evaluate(image.as_ref(), item, now);
            return Ok(AcquireOutcome {
                admitted: plan.fits,
                checks: plan.checks,
            });
        }
        let mut step = self.first_step(item, now);
        for attempt in 0..MAX_ATTEMPTS {
            // Writers that keep losing the rf race back off a little, so one busy writer
            // cannot starve the others.
            if attempt >= 3 {
                tokio::time::sleep(backoff((attempt - 3).min(4))).await;
            }
            step = match step {
                Step::Speculative => match self.speculative(item, now).await? {
                    Speculative::Admitted(new) => {
                        let checks = admitted_checks(&new, item, now);
                        self.observe(&item.entity_id, &item.resource, new);
                        return Ok(admitted(checks));
                    }
                    Speculative::Failed(None) => Step::Create,
                    Speculative::Failed(Some(old)) => match self.next_step(old, item, now).await {
                        Ok(step) => step,
                        Err(outcome) => return Ok(outcome),
                    },
                },
                Step::Create => {
                    let plan = evaluate(None, item, now);
                    if !plan.fits {
                        return Ok(rejected(plan.checks));
                    }
                    let written = self.create(item, &plan, now).await?;
                    match self.after_write(written, item, plan.checks, now).await {
                        Ok(step) => step,
                        Err(outcome) => return Ok(outcome),
                    }
                }
                Step::Read => match self.read_bucket(&item.entity_id, &item.resource).await? {
                    None => Step::Create,
                    Some(image) => match self.next_step(image, item, now).await {
                        Ok(step) => step,
                        Err(outcome) => return Ok(outcome),
                    },
                },
                Step::Normal { image, cached } => {
                    let plan = evaluate(Some(&image), item, now);
                    if cached && (!plan.fits || stale_params(&image, item)) {
                        // A remembered image may be behind the table (a refund since):
                        // never reject on it, read instead.
                        Step::Read
                    } else if !plan.fits {
                        if stale_params(&image, item) {
                            self.adopt_params(item, &image, now).await;
                        }
                        return Ok(rejected(plan.checks));
                    } else {
                        let written = self.normal(item, &image, &plan, now).await?;
                        match self.after_write(written, item, plan.checks, now).await {
                            Ok(step) => step,
                            Err(outcome) => return Ok(outcome),
                        }
                    }
                }
            };
        }
        Err(contended(&item.entity_id, &item.resource))
    }

    /// Where a single-item acquire starts: the speculative write, unless the last image
    /// seen of the item shows an `rf` too old for it (the fresh-`rf` rule would refuse
    /// it), in which case the rf-locked write is built from that image straight away.
    fn first_step(&self, item: &ItemRequest, now: i64) -> Step {
        let window = fresh_window_ms(charged(item));
        match self.images.get(&item.entity_id, &item.resource) {
            Some(image) if !expired(&image, now) && !rf_is_fresh(&image, now, window) => {
                Step::Normal {
                    image,
                    cached: true,
                }
            }
            _ => Step::Speculative,
        }
    }

    /// Where a create or rf-locked write leads: admitted (`Err`, the new item remembered),
    /// a read, or the next step from the item it returned.
    async fn after_write(
        &self,
        written: Written,
        item: &ItemRequest,
        checks: Vec<LimitCheck>,
        now: i64,
    ) -> Result<Step, AcquireOutcome> {
        match written {
            Written::Ok(new) => {
                if let Some(new) = new {
                    self.observe(&item.entity_id, &item.resource, new);
                }
                Err(admitted(checks))
            }
            Written::Conflict(None) => Ok(Step::Read),
            Written::Conflict(Some(old)) => self.next_step(old, item, now).await,
        }
    }

    /// From an image: reject (remembering it), or the write to try next.
    async fn next_step(
        &self,
        image: Image,
        item: &ItemRequest,
        now: i64,
    ) -> Result<Step, AcquireOutcome> {
        let plan = evaluate(Some(&image), item, now);
        if !plan.fits {
            if stale_params(&image, item) {
                self.adopt_params(item, &image, now).await;
            } else {
                self.rejections
                    .remember(&item.entity_id, &item.resource, image, &plan.checks, now);
            }
            return Err(rejected(plan.checks));
        }
        self.observe(&item.entity_id, &item.resource, image.clone());
        Ok(if plan.speculative_ok {
            Step::Speculative
        } else {
            Step::Normal {
                image,
                cached: false,
            }
        })
    }

    /// Child and parent: both speculative writes at once, compensating a one-sided success;
    /// else one transaction of normal writes.
    async fn acquire_cascade(
        &self,
        child: &ItemRequest,
        parent: &ItemRequest,
        now: i64,
    ) -> Result<AcquireOutcome, Error> {
        if takes_nothing(child) || takes_nothing(parent) {
            return self.acquire_one_side(child, parent, now).await;
        }
        let (a, b) = tokio::join!(self.speculative(child, now), self.speculative(parent, now));
        let (a, b) = match (a, b) {
            (Ok(Speculative::Admitted(x)), Ok(Speculative::Admitted(y))) => {
                let mut checks = admitted_checks(&x, child, now);
                checks.extend(admitted_checks(&y, parent, now));
                return Ok(admitted(checks));
            }
            other => other,
        };
        // Undo whatever one side took, then decide from what the other side saw.
        let mut error = None;
        let mut checks = Vec::new();
        let mut fits = true;
        let mut stale = Vec::new();
        for (item, result) in [(child, a), (parent, b)] {
            match result {
                Ok(Speculative::Admitted(new)) => {
                    if let Err(e) = self.give_back(item, now).await {
                        tracing::error!(
                            entity_id = %item.entity_id,
                            resource = %item.resource,
                            error = %e,
                            "could not give back a one-sided cascade consumption"
                        );
                        error.get_or_insert(e);
                    }
                    checks.extend(admitted_checks(&new, item, now));
                }
                Ok(Speculative::Failed(image)) => {
                    let plan = evaluate(image.as_ref(), item, now);
                    fits &= plan.fits;
                    checks.extend(plan.checks);
                    stale.extend(image.filter(|i| stale_params(i, item)).map(|i| (item, i)));
                }
                Err(e) => {
                    error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        if !fits {
            for (item, image) in &stale {
                self.adopt_params(item, image, now).await;
            }
            return Ok(rejected(checks));
        }
        self.cascade_transaction(child, parent, now).await
    }

    /// A cascade that takes nothing from one side (its limits are named differently): that
    /// side is only checked, on a consistent read (a write would have nothing in it), and
    /// the other side is charged as a single item.
    async fn acquire_one_side(
        &self,
        child: &ItemRequest,
        parent: &ItemRequest,
        now: i64,
    ) -> Result<AcquireOutcome, Error> {
        let (checked, charged, checked_first) = if takes_nothing(child) {
            (child, parent, true)
        } else {
            (parent, child, false)
        };
        let image = self
            .read_bucket(&checked.entity_id, &checked.resource)
            .await?;
        let check = evaluate(image.as_ref(), checked, now);
        let outcome = if check.fits {
            self.acquire_one(charged, now).await?
        } else {
            let other = self
                .read_bucket(&charged.entity_id, &charged.resource)
                .await?;
            rejected(evaluate(other.as_ref(), charged, now).checks)
        };
        let admitted = check.fits && outcome.admitted;
        let checks = if checked_first {
            check.checks.into_iter().chain(outcome.checks).collect()
        } else {
            outcome.checks.into_iter().chain(check.checks).collect()
        };
        Ok(AcquireOutcome { admitted, checks })
    }

    /// The slow path of a cascade: read both items, decide, write both in one transaction.
    async fn cascade_transaction(
        &self,
        child: &ItemRequest,
        parent: &ItemRequest,
        now: i64,
    ) -> Result<AcquireOutcome, Error> {
        let items = [child, parent];
        for attempt in 0..MAX_ATTEMPTS {
            let images = self.read_buckets(&items).await?;
            let plans: Vec<Plan> = items
                .iter()
                .zip(&images)
                .map(|(item, image)| evaluate(image.as_ref(), item, now))
                .collect();
            if plans.iter().any(|p| !p.fits) {
                for (item, image) in items.iter().zip(&images) {
                    if let Some(image) = image.as_ref().filter(|i| stale_params(i, item)) {
                        self.adopt_params(item, image, now).await;
                    }
                }
                return Ok(rejected(plans.into_iter().flat_map(|p| p.checks).collect()));
            }
            let mut writes = Vec::with_capacity(2);
            for ((item, image), plan) in items.iter().zip(&images).zip(&plans) {
                writes.push(match image {
                    None => {
                        let put = Put::builder()
                            .table_name(&self.table)
                            .set_item(Some(self.new_bucket_item(item, plan, now)))
                            .condition_expression("attribute_not_exists(PK)")
                            .build()
                            .map_err(build_error)?;
                        TransactWriteItem::builder().put(put).build()
                    }
                    Some(image) => {
                        let (update, expr) = self.normal_update(item, image, plan, now);
                        let tx = TxUpdate::builder()
                            .table_name(&self.table)
                            .set_key(Some(self.bucket_key(&item.entity_id, &item.resource)))
                            .update_expression(update.expression())
                            .set_condition_expression(update.condition())
                            .set_expression_attribute_names(expr.names())
                            .set_expression_attribute_values(expr.values())
                            .build()
                            .map_err(build_error)?;
                        TransactWriteItem::builder().update(tx).build()
                    }
                });
            }
            // A token makes a re-send after an unknown outcome safe: DynamoDB applies it
            // once, and answers the re-send as it did the first.
            let token = format!("zl{:032x}", rand::random::<u128>());
            let mut resends = Resends::default();
            let sent = loop {
                let sent = self
                    .client
                    .transact_write_items()
                    .set_transact_items(Some(writes.clone()))
                    .client_request_token(&token)
                    .send()
                    .await;
                match sent {
                    Err(e) if resends.in_doubt || errors::outcome_unknown(&e) => {
                        match resends.next(&e) {
                            Some(wait) => tokio::time::sleep(wait).await,
                            None => break Err(e),
                        }
                    }
                    other => break other,
                }
            };
            match sent {
                Ok(_) => return Ok(admitted(plans.into_iter().flat_map(|p| p.checks).collect())),
                Err(e) => {
                    let reasons: Vec<String> = match e.as_service_error() {
                        Some(TransactWriteItemsError::TransactionCanceledException(c)) => c
                            .cancellation_reasons()
                            .iter()
                            .filter_map(|r| r.code().map(str::to_string))
                            .collect(),
                        _ => return Err(errors::map("TransactWriteItems", &self.table, e)),
                    };
                    // A failed condition means the items moved: read again and decide anew.
                    // A conflict with another transaction is contention: back off and retry;
                    // neither is a rate-limit rejection.
                    if !reasons.iter().any(|r| r == "ConditionalCheckFailed") {
                        tokio::time::sleep(backoff(attempt)).await;
                    }
                }
            }
        }
        Err(contended(&child.entity_id, &child.resource))
    }

    /// The hot path: `ADD` the consumption, conditioned on the stored tokens covering it
    /// (no refill), the stored parameters matching, and the item being unexpired.
    async fn speculative(&self, item: &ItemRequest, now: i64) -> Result<Speculative, Error> {
        let mut expr = Expr::default();
        let mut update = Update::default();
        update.conditions.push("attribute_exists(PK)".into());
        for (limit, &amount) in item.limits.iter().zip(&item.amounts) {
            let fresh = BucketState::from_limit(limit, now);
            let tk = expr.name(&keys::bucket_attr(&limit.name, "tk"));
            let amount_milli = milli_i64(amount);
            if amount > 0 {
                let tc = expr.name(&keys::bucket_attr(&limit.name, "tc"));
                let minus = expr.num(-amount_milli);
                let plus = expr.num(amount_milli);
                update.add.push(format!("{tk} {minus}"));
                update.add.push(format!("{tc} {plus}"));
                update.conditions.push(format!("{tk} >= {plus}"));
            } else {
                let zero = expr.num(0);
                update.conditions.push(format!("{tk} >= {zero}"));
            }
            require_params(&mut expr, &mut update, &limit.name, &fresh);
        }
        // The fresh-`rf` rule (see `fresh_window_ms`): an item idle past the window goes
        // to the rf-locked write, which refills from `rf` before anything is taken.
        let rf = expr.name("rf");
        let oldest_rf = expr.num(now.saturating_sub(fresh_window_ms(charged(item))));
        update.conditions.push(format!("{rf} >= {oldest_rf}"));
        let ttl = expr.name("ttl");
        let now_s = expr.num(now.div_euclid(1000));
        update
            .conditions
            .push(format!("(attribute_not_exists({ttl}) OR {ttl} > {now_s})"));
        // A busy item is not idle: push its expiry on with every write, so a hot key never
        // drops to the slow path just because its TTL came due.
        if let Some(expires) = self.bucket_ttl(item, now) {
            let v = expr.num(expires);
            update.set.push(format!("{ttl} = {v}"));
        }
        // ALL_NEW: the item as it now is gives each limit's exact availability.
        Ok(
            match self
                .update_item(
                    self.bucket_key(&item.entity_id, &item.resource),
                    update,
                    expr,
                    true,
                    true,
                )
                .await?
            {
                Updated::Ok(new) => Speculative::Admitted(new.unwrap_or_default()),
                Updated::ConditionFailed(old) => Speculative::Failed(old),
            },
        )
    }

    /// Creates the item with full buckets minus the consumption.
    ///
    /// Marked like an acquire's update (see [`Self::update_item`]): sent again after an
    /// unknown outcome, the put fails on the existing item, whose marker tells whether it
    /// is this put's own.
    async fn create(&self, item: &ItemRequest, plan: &Plan, now: i64) -> Result<Written, Error> {
        use aws_sdk_dynamodb::operation::put_item::PutItemError;
        let marker = new_marker();
        let mut attrs = self.new_bucket_item(item, plan, now);
        attrs.insert(MARKER.into(), s(&marker));
        let mut resends = Resends::default();
        let mut resending = false;
        loop {
            let sent = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(attrs.clone()))
                .condition_expression("attribute_not_exists(PK)")
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .customize()
                .config_override(no_retries())
                .send()
                .await;
            let error = match sent {
                Ok(_) => return Ok(Written::Ok(Some(Image::parse(&attrs)))),
                Err(e) => e,
            };
            if let Some(PutItemError::ConditionalCheckFailedException(c)) = error.as_service_error()
            {
                let existing = c.item().filter(|i| !i.is_empty()).map(Image::parse);
                if resending && existing.as_ref().and_then(|i| i.marker.as_deref()) == Some(&marker)
                {
                    return Ok(Written::Ok(None));
                }
                return Ok(Written::Conflict(existing));
            }
            if let Some(wait) = resends.next(&error) {
                resending |= errors::outcome_unknown(&error);
                tokio::time::sleep(wait).await;
                continue;
            }
            return Err(errors::map("PutItem", &self.table, error));
        }
    }

    /// The attributes of a new bucket item.
    fn new_bucket_item(&self, item: &ItemRequest, plan: &Plan, now: i64) -> Item {
        let pk = keys::bucket_pk(&self.ns, &item.entity_id, &item.resource);
        let mut attrs = codec::key(pk.clone(), keys::STATE_SK);
        attrs.insert("entity_id".into(), s(&item.entity_id));
        attrs.insert("resource".into(), s(&item.resource));
        attrs.insert("rf".into(), num(now));
        attrs.insert("shard_count".into(), num(1));
        for ((limit, &amount), state) in item.limits.iter().zip(&item.amounts).zip(&plan.states) {
            for (field, value) in [
                ("tk", state.tokens_milli),
                ("cp", state.capacity_milli),
                ("ra", state.refill_amount_milli),
                ("rp", state.refill_period_ms),
                ("tc", milli_i64(amount)),
                ("rc", state.refill_carry),
            ] {
                attrs.insert(keys::bucket_attr(&limit.name, field), num(value));
            }
        }
        if let Some(ttl) = self.bucket_ttl(item, now) {
            attrs.insert("ttl".into(), num(ttl));
        }
        attrs.insert(
            "GSI2PK".into(),
            s(keys::resource_pk(&self.ns, &item.resource)),
        );
        attrs.insert("GSI2SK".into(), s(format!("BUCKET#{}#0", item.entity_id)));
        attrs.insert(
            "GSI3PK".into(),
            s(keys::entity_pk(&self.ns, &item.entity_id)),
        );
        attrs.insert("GSI3SK".into(), s(format!("BUCKET#{}#0", item.resource)));
        attrs.insert("GSI4PK".into(), s(&self.ns));
        attrs.insert("GSI4SK".into(), s(pk));
        attrs
    }

    /// When an item on shared limits expires: time to fill x the multiplier after this write.
    fn bucket_ttl(&self, item: &ItemRequest, now: i64) -> Option<i64> {
        if !item.expires_when_idle || self.bucket_ttl_multiplier == 0 {
            return None;
        }
        let fill_ms = item.limits.iter().map(Limit::time_to_fill_ms).max()?;
        let keep_s = fill_ms
            .saturating_mul(u64::from(self.bucket_ttl_multiplier))
            .div_ceil(1000);
        Some(
            now.div_euclid(1000)
                .saturating_add(i64::try_from(keep_s).unwrap_or(i64::MAX)),
        )
    }

    /// The normal write: claim the refill since the image's `rf` and consume, in one
    /// conditional `UpdateItem`.
    async fn normal(
        &self,
        item: &ItemRequest,
        image: &Image,
        plan: &Plan,
        now: i64,
    ) -> Result<Written, Error> {
        let (update, expr) = self.normal_update(item, image, plan, now);
        Ok(
            match self
                .update_item(
                    self.bucket_key(&item.entity_id, &item.resource),
                    update,
                    expr,
                    true,
                    true,
                )
                .await?
            {
                Updated::Ok(new) => Written::Ok(new),
                Updated::ConditionFailed(old) => Written::Conflict(old),
            },
        )
    }

    /// The normal write's expression (see [`locked_update`]), with this acquire's
    /// consumption and the item's TTL.
    fn normal_update(
        &self,
        item: &ItemRequest,
        image: &Image,
        plan: &Plan,
        now: i64,
    ) -> (Update, Expr) {
        let changes: Vec<Change<'_>> = item
            .limits
            .iter()
            .zip(&item.amounts)
            .zip(&plan.states)
            .map(|((limit, &amount), state)| Change {
                limit,
                state: *state,
                consumed: milli_i64(amount),
                must_cover: true,
            })
            .collect();
        self.item_update(item, image, &changes, now)
    }

    /// An rf-locked write of `changes` to the item, with the item's TTL.
    fn item_update(
        &self,
        item: &ItemRequest,
        image: &Image,
        changes: &[Change<'_>],
        now: i64,
    ) -> (Update, Expr) {
        let ttl = match self.bucket_ttl(item, now) {
            Some(t) => Ttl::Set(t),
            None => Ttl::Remove,
        };
        locked_update(image, changes, ttl, now)
    }

    /// After a rejection on an item that stores some limit with other parameters than
    /// those now configured: writes the new parameters, refilled to now and consuming
    /// nothing, so the new rate counts from now. A rejection writes nothing otherwise, and
    /// the item would go on refilling at its old rate from its last write: a drained
    /// 1-per-day limit raised to 1,000 a minute would stay shut for up to a day.
    ///
    /// Best effort: a lost race means another writer wrote the item (and with it the new
    /// parameters); a failure leaves the rejection standing and is retried next time.
    async fn adopt_params(&self, item: &ItemRequest, image: &Image, now: i64) {
        let changes: Vec<Change<'_>> = item
            .limits
            .iter()
            .map(|limit| Change {
                limit,
                state: reconcile_bucket(image.buckets.get(&limit.name), limit, now),
                consumed: 0,
                must_cover: false,
            })
            .collect();
        let (update, expr) = self.item_update(item, image, &changes, now);
        let key = self.bucket_key(&item.entity_id, &item.resource);
        if let Err(e) = self.update_item(key, update, expr, false, false).await {
            tracing::debug!(entity_id = %item.entity_id, resource = %item.resource, error = %e, "could not store changed limit parameters; will retry");
        }
    }

    /// Signed whole-token changes to one item; `tc` moves by each full amount. Never
    /// creates an item: on a missing one this is a no-op. Lands at most once per
    /// `write_id`, however often it is re-issued (see [`super::lease_writes`]).
    ///
    /// One `ADD` per limit without the rf lock (see [`unlocked_update`]) when the item's
    /// `rf` is fresh: a debit at a stale `rf` would be forgiven by the next refill's cap,
    /// and a credit near capacity could meet refill not yet written. Otherwise an
    /// rf-locked write that refills first, charges (within [`MIN_TOKENS_MILLI`]) or
    /// credits (capped at capacity). A lost race returns the item as it now is, and the
    /// next try uses it: contention delays a write, it never fails it.
    pub(super) async fn write_deltas(
        &self,
        entity_id: &str,
        resource: &str,
        deltas: &[(Limit, i64)],
        now: i64,
        write_id: &str,
    ) -> Result<(), Error> {
        let deltas: Vec<&(Limit, i64)> = deltas.iter().filter(|(_, d)| *d != 0).collect();
        if deltas.is_empty() {
            return Ok(());
        }
        let credit = deltas.iter().any(|(_, d)| *d < 0);
        let window = fresh_window_ms(deltas.iter().map(|(l, _)| l));
        // The write claims the next number of its lane, so it needs the item as last seen
        // (only a guide: every write is conditioned on the item as it is), or a read.
        let mut image = match self.images.get(entity_id, resource) {
            Some(image) => Some(image),
            None => {
                let read = self.read_bucket(entity_id, resource).await?;
                if let Some(read) = &read {
                    self.observe(entity_id, resource, read.clone());
                }
                read
            }
        };
        for attempt in 0..DELTA_ATTEMPTS {
            let Some(current) = image.take() else {
                self.resolved(write_id);
                return skipped(entity_id, resource);
            };
            match self.verdict(&current, write_id) {
                Verdict::Landed => {
                    self.resolved(write_id);
                    return Ok(());
                }
                Verdict::Unknowable if credit => {
                    tracing::warn!(
                        entity_id,
                        resource,
                        write_id,
                        "a refund's outcome stayed unknown until it could no longer be told; \
                         taken as landed (never refunded twice), so its tokens may stay held \
                         until they refill"
                    );
                    self.resolved(write_id);
                    return Ok(());
                }
                Verdict::Unknowable if attempt == 0 => tracing::warn!(
                    entity_id,
                    resource,
                    write_id,
                    "a charge's outcome stayed unknown until it could no longer be told; \
                     applied (an admitted request is always charged), so it may be held twice \
                     until it refills"
                ),
                Verdict::Unknowable | Verdict::Write => {}
            }
            let locked = !unlocked_fits(&current, &deltas, now, window);
            let (mut update, mut expr) = if locked {
                locked_deltas(&current, &deltas, now)?
            } else {
                unlocked_update(&current, &deltas, now)
            };
            let seq = claim_lane(&mut update, &mut expr, Some(&current), write_id);
            match self
                .send_lease_write(write_id, (entity_id, resource), &update, &expr, seq)
                .await?
            {
                Sent::Applied(new) => {
                    self.resolved(write_id);
                    match new {
                        Some(new) => self.observe(entity_id, resource, new),
                        None => self.images.forget(entity_id, resource),
                    }
                    return Ok(());
                }
                Sent::ConditionFailed(None) => {
                    self.resolved(write_id);
                    return skipped(entity_id, resource);
                }
                Sent::ConditionFailed(Some(newer)) => {
                    self.observe(entity_id, resource, newer.clone());
                    image = Some(newer);
                }
            }
            // Writers that lost a race spread out (full jitter), so the next round is not
            // the same stampede and no writer is starved by one that keeps winning.
            if attempt > 0 {
                tokio::time::sleep(jitter(attempt)).await;
            }
        }
        Err(contended(entity_id, resource))
    }

    /// Gives back what a speculative write took (a one-sided cascade success), retrying
    /// until it lands: the caller may be gone (the acquire then finishes in the
    /// background), so nothing else would.
    async fn give_back(&self, item: &ItemRequest, now: i64) -> Result<(), Error> {
        let deltas: Vec<(Limit, i64)> = item
            .limits
            .iter()
            .zip(&item.amounts)
            .filter(|(_, &a)| a > 0)
            .map(|(l, &a)| (l.clone(), -i64::try_from(a).unwrap_or(i64::MAX)))
            .collect();
        let write_id = format!("give-back-{:032x}", rand::random::<u128>());
        let started = std::time::Instant::now();
        let mut attempt = 0;
        loop {
            let result = self
                .write_deltas(&item.entity_id, &item.resource, &deltas, now, &write_id)
                .await;
            match result {
                Ok(()) => return Ok(()),
                Err(e @ Error::Unavailable { .. }) if started.elapsed() < GIVE_BACK_FOR => {
                    if attempt == 0 {
                        tracing::warn!(entity_id = %item.entity_id, resource = %item.resource, error = %e, "giving back a one-sided cascade consumption failed; retrying until it lands");
                    }
                    tokio::time::sleep(backoff(attempt.min(5))).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One conditional `UpdateItem`; on a failed condition, the item as it was (`ALL_OLD`),
    /// and on success, with `return_new`, the item as it now is (`ALL_NEW`).
    ///
    /// A `marked` write (an acquire's: it takes tokens, and is not idempotent) also sets
    /// the item's write marker to an id of its own, and is never re-sent blindly: the SDK
    /// does not retry it, and when its outcome is unknown (a timeout, a lost response) it
    /// is sent again with the extra condition that the marker is not its id. If the first
    /// send landed, that condition fails and the returned item shows the marker: the write
    /// is known to have landed, once. (Only if another write changed the item in between
    /// is the second send applied too: tokens held twice, never an over-admission.)
    async fn update_item(
        &self,
        key: Item,
        mut update: Update,
        mut expr: Expr,
        return_new: bool,
        marked: bool,
    ) -> Result<Updated, Error> {
        let marker = marked.then(|| {
            let id = new_marker();
            let name = expr.name(MARKER);
            let value = expr.value(AttributeValue::S(id.clone()));
            update.set.push(format!("{name} = {value}"));
            (id, name, value)
        });
        let mut resends = Resends::default();
        let mut resending = false;
        loop {
            let request = self
                .update_request(key.clone(), &update, &expr)
                .return_values(if return_new {
                    ReturnValue::AllNew
                } else {
                    ReturnValue::None
                });
            let sent = if marked {
                request
                    .customize()
                    .config_override(no_retries())
                    .send()
                    .await
            } else {
                request.send().await
            };
            let error = match sent {
                Ok(out) => return Ok(Updated::Ok(out.attributes().map(Image::parse))),
                Err(e) => e,
            };
            if let Some(old) = conditional_image(&error) {
                let landed = resending
                    && marker
                        .as_ref()
                        .zip(old.as_ref())
                        .is_some_and(|((id, _, _), image)| image.marker.as_deref() == Some(id));
                if landed {
                    tracing::debug!(
                        "a write whose response was lost had landed; not applied again"
                    );
                    return Ok(Updated::Ok(old.filter(|_| return_new)));
                }
                return Ok(Updated::ConditionFailed(old));
            }
            let unknown = errors::outcome_unknown(&error);
            if marker.is_some() || !unknown {
                if let Some(wait) = resends.next(&error) {
                    if let Some((_, name, value)) = marker.as_ref().filter(|_| unknown) {
                        if !resending {
                            update.conditions.push(format!(
                                "(attribute_not_exists({name}) OR {name} <> {value})"
                            ));
                            resending = true;
                        }
                    }
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            if resending || (marked && unknown) {
                tracing::warn!(
                    error = %errors::map("UpdateItem", &self.table, error),
                    "an acquire's write was left with an unknown outcome; if it landed, its \
                     tokens stay charged until they refill"
                );
                return Err(Error::Unavailable {
                    message: "an acquire's write was left with an unknown outcome".into(),
                    source: None,
                });
            }
            return Err(errors::map("UpdateItem", &self.table, error));
        }
    }

    /// A conditional `UpdateItem` of `update` on the item at `key`, returning the item as
    /// it was when the condition fails.
    pub(super) fn update_request(
        &self,
        key: Item,
        update: &Update,
        expr: &Expr,
    ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .update_expression(update.expression())
            .set_condition_expression(update.condition())
            .set_expression_attribute_names(expr.names())
            .set_expression_attribute_values(expr.values())
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
    }

    /// The key of an entity and resource's bucket record.
    pub(super) fn bucket_key(&self, entity_id: &str, resource: &str) -> Item {
        codec::key(
            keys::bucket_pk(&self.ns, entity_id, resource),
            keys::STATE_SK,
        )
    }

    /// A consistent read of one bucket item.
    pub(super) async fn read_bucket(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Result<Option<Image>, Error> {
        let pk = keys::bucket_pk(&self.ns, entity_id, resource);
        let item = table::get_item(&self.client, &self.table, &pk, keys::STATE_SK).await?;
        Ok(item.as_ref().map(Image::parse))
    }

    /// Consistent reads of several bucket items in one `BatchGetItem`, in order.
    async fn read_buckets(&self, items: &[&ItemRequest]) -> Result<Vec<Option<Image>>, Error> {
        let keys: Vec<Item> = items
            .iter()
            .map(|i| self.bucket_key(&i.entity_id, &i.resource))
            .collect();
        let found = self.batch_get(keys.clone(), true).await?;
        Ok(keys
            .iter()
            .map(|k| {
                found
                    .iter()
                    .find(|f| f.get("PK") == k.get("PK"))
                    .map(Image::parse)
            })
            .collect())
    }

    /// `BatchGetItem` of up to 100 keys, retrying unprocessed keys; never returns a
    /// partial answer (a missing record would read as "nothing stored").
    pub(super) async fn batch_get(
        &self,
        keys: Vec<Item>,
        consistent: bool,
    ) -> Result<Vec<Item>, Error> {
        let mut pending = Some(
            KeysAndAttributes::builder()
                .set_keys(Some(keys))
                .consistent_read(consistent)
                .build()
                .map_err(build_error)?,
        );
        let mut found = Vec::new();
        for attempt in 0..MAX_ATTEMPTS {
            let Some(request) = pending.take() else {
                return Ok(found);
            };
            let out = self
                .client
                .batch_get_item()
                .request_items(&self.table, request)
                .send()
                .await
                .map_err(|e| errors::map("BatchGetItem", &self.table, e))?;
            if let Some(items) = out.responses().and_then(|r| r.get(&self.table)) {
                found.extend(items.iter().cloned());
            }
            pending = out
                .unprocessed_keys()
                .and_then(|u| u.get(&self.table))
                .filter(|k| !k.keys().is_empty())
                .cloned();
            if pending.is_some() {
                tokio::time::sleep(backoff(attempt)).await;
            }
        }
        Err(Error::Unavailable {
            message: "DynamoDB BatchGetItem left keys unprocessed after retries (throttled)".into(),
            source: None,
        })
    }
}

/// The attribute an acquire's write marks with its id (see `Inner::update_item`).
pub(super) const MARKER: &str = "lw";

/// Sends of one acquire write after throttling (which certainly did not apply it).
const RESENDS: usize = 3;

/// How long an acquire write with an unknown outcome is sent again (marked, or with its
/// token) until its outcome is known: DynamoDB may be restarting. The caller waits at most
/// its timeout; the rest goes on in the background, and an admission found then is rolled
/// back.
const RESOLVE_FOR: Duration = Duration::from_secs(60);

/// When an acquire write may be sent again, and after how long.
struct Resends {
    started: std::time::Instant,
    attempt: usize,
    /// A send's outcome was unknown: until one is known, keep sending through any passing
    /// failure (DynamoDB restarting refuses connections for a while).
    in_doubt: bool,
}

impl Default for Resends {
    fn default() -> Self {
        Resends {
            started: std::time::Instant::now(),
            attempt: 0,
            in_doubt: false,
        }
    }
}

impl Resends {
    /// The wait before sending again after `error`, or `None` to give up: throttling a few
    /// times; once an outcome was unknown, any passing failure until [`RESOLVE_FOR`].
    fn next<E: aws_sdk_dynamodb::error::ProvideErrorMetadata>(
        &mut self,
        error: &aws_sdk_dynamodb::error::SdkError<
            E,
            aws_smithy_runtime_api::client::orchestrator::HttpResponse,
        >,
    ) -> Option<Duration> {
        self.in_doubt |= errors::outcome_unknown(error);
        let again = if self.in_doubt {
            errors::transient(error) && self.started.elapsed() < RESOLVE_FOR
        } else {
            errors::retry_as_is(error) && self.attempt < RESENDS
        };
        again.then(|| {
            self.attempt += 1;
            backoff((self.attempt - 1).min(5))
        })
    }
}

fn new_marker() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// A per-request override that turns the SDK's retries off, for writes that must not be
/// sent twice without a check.
pub(super) fn no_retries() -> aws_sdk_dynamodb::config::Builder {
    aws_sdk_dynamodb::config::Builder::default()
        .retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::disabled())
}

/// Attempts of one adjustment (each lost race returns the newer item to try again with).
const DELTA_ATTEMPTS: usize = 200;

/// How long a give-back is retried while DynamoDB is unavailable (its idempotency token's
/// window): past that it is reported, never silently dropped.
const GIVE_BACK_FOR: Duration = Duration::from_secs(9 * 60);

/// An adjustment of an item that is gone: nothing to do (never create a stub item).
fn skipped(entity_id: &str, resource: &str) -> Result<(), Error> {
    tracing::debug!(
        entity_id,
        resource,
        "adjust skipped: the bucket item is gone"
    );
    Ok(())
}

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
fn unlocked_update(image: &Image, deltas: &[&(Limit, i64)], now: i64) -> (Update, Expr) {
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
        if change > 0 {
            let minus = expr.num(change.saturating_neg());
            let floor = expr.num(MIN_TOKENS_MILLI.saturating_add(change));
            update.add.push(format!("{tk} {minus}"));
            update.conditions.push(format!("{tk} >= {floor}"));
            continue;
        }
        let fresh = BucketState::from_limit(limit, now);
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
        require_params(&mut expr, &mut update, &limit.name, &fresh);
    }
    (update, expr)
}

/// How an unlocked credit is written.
enum CreditVariant {
    /// `ADD`: the tokens stay at most `ceiling` before it, so the cap is not met.
    Clear { ceiling: i64 },
    /// `SET` to capacity: the tokens are at least `low` before it, so the bucket is full.
    Fills { low: i64 },
}

/// The bounds of a credit of `credit` millitokens on `stored`, `since_ms` after its `rf`:
/// the refill not yet written lies between `since * ra / rp` (no carry) and that plus one
/// period's worth (any carry), rounded outward.
fn credit_bounds(fresh: &BucketState, credit: i64, since_ms: i64) -> (i64, i64) {
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
fn credit_variant(
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
fn unlocked_fits(image: &Image, deltas: &[&(Limit, i64)], now: i64, window: i64) -> bool {
    let since = image.rf.map_or(window, |x| now.saturating_sub(x));
    rf_is_fresh(image, now, window)
        && deltas.iter().all(|(limit, delta)| {
            let Some(stored) = image.buckets.get(&limit.name) else {
                return false;
            };
            let change = delta.saturating_mul(MILLI);
            if change > 0 {
                stored.tokens_milli >= MIN_TOKENS_MILLI.saturating_add(change)
            } else {
                let fresh = BucketState::from_limit(limit, now);
                !params_changed(stored, limit)
                    && credit_variant(Some(stored), &fresh, change.saturating_neg(), since)
                        .is_some()
            }
        })
}

/// The most a bucket refills over `window_ms`, carry included, in millitokens (rounded up).
fn refill_over(state: &BucketState, window_ms: i64) -> i64 {
    if state.refill_period_ms <= 0 {
        return 0;
    }
    let accrued = i128::from(window_ms.max(0)) * i128::from(state.refill_amount_milli)
        + i128::from(state.refill_period_ms);
    i64::try_from(accrued / i128::from(state.refill_period_ms) + 1).unwrap_or(i64::MAX)
}

/// The rf-locked write of signed deltas on `current`: refilled, charged or credited
/// (capped at capacity), never past the debt bound.
fn locked_deltas(
    current: &Image,
    deltas: &[&(Limit, i64)],
    now: i64,
) -> Result<(Update, Expr), Error> {
    let mut changes = Vec::with_capacity(deltas.len());
    for (limit, delta) in deltas {
        let stored = reconcile_bucket(current.buckets.get(&limit.name), limit, now);
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

/// One limit's part in an rf-locked write.
struct Change<'a> {
    limit: &'a Limit,
    /// The state to reach (refilled to the write's time, then charged).
    state: BucketState,
    /// Millitokens to add to `tc` (negative for a credit).
    consumed: i64,
    /// Whether the stored tokens must still cover the change at write time (an acquire);
    /// false for adjustments, which may go into debt.
    must_cover: bool,
}

/// What an rf-locked write does to the item's `ttl`.
enum Ttl {
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
fn locked_update(image: &Image, changes: &[Change<'_>], ttl: Ttl, now: i64) -> (Update, Expr) {
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
                let delta = change.state.tokens_milli.saturating_sub(old.tokens_milli);
                // An acquire needs the tokens still there; a debit keeps the debt in bounds.
                let lo = if change.must_cover {
                    Some(delta.saturating_neg())
                } else {
                    (delta < 0).then(|| MIN_TOKENS_MILLI.saturating_sub(delta))
                };
                let hi = (delta > 0).then(|| change.state.capacity_milli.saturating_sub(delta));
                // Name `tk` only when it is used: DynamoDB rejects an unused name (a
                // credit on a full bucket, or parameters adopted with no refill due, move
                // no tokens).
                if delta != 0 || lo.is_some() {
                    let tk = expr.name(&keys::bucket_attr(name, "tk"));
                    if delta != 0 {
                        let d = expr.num(delta);
                        update.add.push(format!("{tk} {d}"));
                    }
                    bound(&mut expr, &mut update, &tk, lo, hi);
                }
                if change.consumed != 0 {
                    let tc = expr.name(&keys::bucket_attr(name, "tc"));
                    let c = expr.num(change.consumed);
                    update.add.push(format!("{tc} {c}"));
                }
                if !same_params(old, &change.state) {
                    set_params(&mut expr, &mut update, name, &change.state);
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
                set_params(&mut expr, &mut update, name, &change.state);
            }
        }
    }
    for (name, old) in &image.buckets {
        if changes.iter().any(|c| &c.limit.name == name) {
            continue;
        }
        let refilled = bucket::refill(old, new_rf);
        let delta = refilled.tokens_milli.saturating_sub(old.tokens_milli);
        if delta == 0 && refilled.refill_carry == old.refill_carry {
            continue;
        }
        let rc = expr.name(&keys::bucket_attr(name, "rc"));
        let carry = expr.num(refilled.refill_carry);
        update.set.push(format!("{rc} = {carry}"));
        // Name `tk` only when tokens move: a refill of less than a millitoken changes the
        // carry alone, and DynamoDB rejects a request that names an attribute it never uses.
        if delta != 0 {
            let tk = expr.name(&keys::bucket_attr(name, "tk"));
            let d = expr.num(delta);
            update.add.push(format!("{tk} {d}"));
            let hi = refilled.capacity_milli.saturating_sub(delta);
            bound(&mut expr, &mut update, &tk, None, Some(hi));
        }
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
fn bound(expr: &mut Expr, update: &mut Update, attr: &str, lo: Option<i64>, hi: Option<i64>) {
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

/// A bucket's parameter attributes (capacity, refill amount, refill period) and values.
fn params(state: &BucketState) -> [(&'static str, i64); 3] {
    [
        ("cp", state.capacity_milli),
        ("ra", state.refill_amount_milli),
        ("rp", state.refill_period_ms),
    ]
}

/// Conditions the write on the item storing `state`'s parameters for limit `name` (a write
/// that does not refill must not act on a bucket under other parameters).
fn require_params(expr: &mut Expr, update: &mut Update, name: &str, state: &BucketState) {
    for (field, value) in params(state) {
        let n = expr.name(&keys::bucket_attr(name, field));
        let v = expr.num(value);
        update.conditions.push(format!("{n} = {v}"));
    }
}

fn set_params(expr: &mut Expr, update: &mut Update, name: &str, state: &BucketState) {
    for (field, value) in params(state) {
        let n = expr.name(&keys::bucket_attr(name, field));
        let v = expr.num(value);
        update.set.push(format!("{n} = {v}"));
    }
}

/// The image a failed conditional `UpdateItem` returned: `Some(None)` when the condition
/// failed on a missing item, `None` when the error is not a failed condition.
pub(super) fn conditional_image<R>(
    error: &aws_sdk_dynamodb::error::SdkError<UpdateItemError, R>,
) -> Option<Option<Image>> {
    match error.as_service_error()? {
        UpdateItemError::ConditionalCheckFailedException(c) => {
            Some(c.item().filter(|i| !i.is_empty()).map(Image::parse))
        }
        _ => None,
    }
}

fn admitted(checks: Vec<LimitCheck>) -> AcquireOutcome {
    AcquireOutcome {
        admitted: true,
        checks,
    }
}

fn rejected(checks: Vec<LimitCheck>) -> AcquireOutcome {
    AcquireOutcome {
        admitted: false,
        checks,
    }
}

fn contended(entity_id: &str, resource: &str) -> Error {
    Error::Unavailable {
        message: format!(
            "DynamoDB write contention on {entity_id}/{resource}: gave up after {MAX_ATTEMPTS} attempts"
        ),
        source: None,
    }
}

pub(super) fn build_error(e: aws_sdk_dynamodb::error::BuildError) -> Error {
    Error::Backend {
        message: format!("could not build a DynamoDB request: {e}"),
        source: Some(Box::new(e)),
    }
}

/// Full jitter: a random wait below 2, 4, 8 ... ms, at most 128 ms.
fn jitter(attempt: usize) -> Duration {
    let cap = 2u64 << attempt.min(6);
    Duration::from_micros(rand::random_range(0..cap * 1000))
}

/// Backoff with jitter: 10, 20, 40 ... ms, capped at 320 ms.
pub(super) fn backoff(attempt: usize) -> Duration {
    let base = 10u64 << attempt.min(5);
    Duration::from_millis(base + rand::random_range(0..base))
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
