//! The write paths on bucket items (DESIGN section 9): speculative, create, normal, the
//! transaction for a cascade that needs the normal path, and signed adjustments.
//!
//! Every path decides with the pure functions of [`crate::bucket`] on an image of the item
//! (read, or returned by a failed conditional write), and writes with `ADD` under conditions
//! that make the decision hold at write time: nothing is ever read, changed and `Put` back.
//!
//! - `plan`: the pure decision on an image (no I/O), unit-tested;
//! - `update`: the pure building of update and condition expressions;
//! - `write`: the conditional writes of an acquire (speculative, create, rf-locked);
//! - `deltas`: adjustments and give-backs of leases;
//! - `read`: reads of bucket items;
//! - `bypass`: bypassed acquires (the Python library's `bypass` flag and stamp).
//!
//! This module drives them: one item, or a cascade of two.

mod bypass;
mod deltas;
mod plan;
mod read;
mod update;
mod write;

#[cfg(feature = "aggregator")]
pub(crate) use read::batch_get;
pub(super) use update::owner_fields;
pub(crate) use write::MARKER;

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{Put, TransactWriteItem, Update as TxUpdate};
use plan::{
    admitted_checks, charged, evaluate, expired, fresh_window_ms, rf_is_fresh, stale_params,
    takes_nothing, Plan,
};
use update::refusal;
use write::Resends;

use crate::repository::dynamodb::codec::Image;
use crate::repository::dynamodb::errors::build_error;
use crate::repository::dynamodb::retry::backoff;
use crate::repository::dynamodb::shards::shard_order;
use crate::repository::dynamodb::{errors, keys, Inner};
use crate::repository::{AcquireOutcome, Checks, ItemRequest, LimitCheck, Shard};
use crate::Error;
use smallvec::SmallVec;

/// Attempts before an acquire gives up under contention (then `Unavailable`, never a 429;
/// the caller's wait is bounded by the timeout long before).
const MAX_ATTEMPTS: usize = 32;

/// How a speculative write ended.
pub(super) enum Speculative {
    /// Consumed; the item as it now is.
    Admitted(Image),
    /// A condition failed; the item as it was (`None`: it does not exist).
    Failed(Option<Image>),
}

/// How a conditional `UpdateItem` ended.
pub(super) enum Updated {
    /// Written; the new item when asked for.
    Ok(Option<Image>),
    /// A condition failed; the item as it was (`None`: it does not exist).
    ConditionFailed(Option<Image>),
}

/// How a conditional write ended.
pub(super) enum Written {
    /// Written; the new item when DynamoDB returned it.
    Ok(Option<Image>),
    /// A condition failed; the item as it was, when DynamoDB returned it.
    Conflict(Option<Image>),
}

/// How a single-item acquire ended before its next write: decided, or refused.
type Done = Result<AcquireOutcome, Error>;

/// The next step of the single-item loop.
pub(super) enum Step {
    /// The item's `bypass` stamp is live: admitted bypass-shaped.
    Bypass,
    Speculative,
    Create,
    Read,
    /// The rf-locked write from an image (`cached`: remembered, not just returned).
    Normal {
        image: Box<Image>,
        cached: bool,
    },
}

impl Inner {
    /// Consumes from one or two items (child, then parent), all or nothing, each on one of
    /// its bucket's shards (see [`crate::repository::dynamodb::shards`]).
    pub(in crate::repository::dynamodb) async fn acquire_items(
        &self,
        items: &[ItemRequest],
        now_ms: i64,
    ) -> Result<AcquireOutcome, Error> {
        let counts: SmallVec<[u32; 2]> = items
            .iter()
            .map(|i| self.shards.count(&i.entity_id, &i.resource))
            .collect();
        if counts.iter().all(|&c| c <= 1) {
            return self.acquire_placed(items, now_ms).await;
        }
        self.acquire_sharded(items, &counts, now_ms).await
    }

    /// An acquire touching a sharded bucket: each such item on a shard drawn at random,
    /// and after a rejection, the items that ran short on their next shard, until one
    /// placement admits or every shard of a short item was tried (each shard holds its own
    /// share, so one short shard says nothing of the others). A rejection reports the
    /// placement that fits soonest.
    async fn acquire_sharded(
        &self,
        items: &[ItemRequest],
        counts: &[u32],
        now_ms: i64,
    ) -> Result<AcquireOutcome, Error> {
        let orders: Vec<Vec<Shard>> = counts.iter().map(|&c| shard_order(c).collect()).collect();
        let mut next = vec![0; items.len()];
        let mut placed = items.to_vec();
        let mut best: Option<AcquireOutcome> = None;
        loop {
            for ((item, order), &k) in placed.iter_mut().zip(&orders).zip(&next) {
                item.shard = order[k];
            }
            let mut outcome = self.acquire_placed(&placed, now_ms).await?;
            if outcome.admitted {
                outcome.shards = placed
                    .iter()
                    .zip(items)
                    .enumerate()
                    .filter(|(_, (p, i))| p.shard != i.shard)
                    .map(|(k, (p, _))| (k, p.shard))
                    .collect();
                return Ok(outcome);
            }
            let mut moved = false;
            for k in short_items(&placed, &outcome.checks) {
                if next[k] + 1 < orders[k].len() {
                    next[k] += 1;
                    moved = true;
                }
            }
            best = Some(match best {
                Some(b) if wait_ms(&b) <= wait_ms(&outcome) => b,
                _ => outcome,
            });
            if !moved {
                return Ok(best.unwrap_or_else(|| rejected(Checks::new())));
            }
        }
    }

    /// Consumes from one or two items, each on the shard it names.
    async fn acquire_placed(
        &self,
        items: &[ItemRequest],
        now_ms: i64,
    ) -> Result<AcquireOutcome, Error> {
        match items {
            [] => Ok(admitted(Checks::new())),
            [item] => self.acquire_one(item, now_ms).await,
            [child, parent] if child.bypass || parent.bypass => {
                self.acquire_in_turn(child, parent, now_ms).await
            }
            [child, parent] => self.acquire_cascade(child, parent, now_ms).await,
            _ => Err(Error::validation(
                "items",
                items.len().to_string(),
                "an acquire covers one entity, or a child and its parent",
            )),
        }
    }

    pub(super) async fn acquire_one(
        &self,
        item: &ItemRequest,
        now: i64,
    ) -> Result<AcquireOutcome, Error> {
        if takes_nothing(item) {
            // Nothing to write: decide on a consistent read.
            let image = self.read_bucket(&item.entity_id, &slot(item)).await?;
            if item.bypass || image.as_ref().is_some_and(|i| i.bypassed(now)) {
                return Ok(bypass::bypassed_outcome(image.as_ref(), item, now));
            }
            let plan = evaluate(image.as_ref(), item, now);
            return Ok(AcquireOutcome {
                admitted: plan.fits,
                checks: plan.checks,
                bypassed: Vec::new(),
                shards: Vec::new(),
            });
        }
        if item.bypass {
            if let Some(outcome) = self.acquire_bypassed(item, now, true).await? {
                return Ok(outcome);
            }
            // The bypass was lifted since the config was read: enforced.
        }
        if let Some(image) = self.rejections.get(&item.entity_id, &slot(item), now) {
            // A remembered image under other limit parameters is no guide: the item has
            // to learn the new ones (see `adopt_params`).
            if !stale_params(&image, item) {
                let plan = evaluate(Some(&image), item, now);
                if !plan.fits {
                    return Ok(rejected(plan.checks));
                }
            }
            self.rejections.forget(&item.entity_id, &slot(item));
        }
        let mut step = self.first_step(item, now);
        for attempt in 0..MAX_ATTEMPTS {
            // Writers that keep losing the rf race back off a little, so one busy writer
            // cannot starve the others.
            if attempt >= 3 {
                tokio::time::sleep(backoff((attempt - 3).min(4))).await;
            }
            step = match step {
                Step::Bypass => match self.acquire_bypassed(item, now, false).await? {
                    Some(outcome) => return Ok(outcome),
                    None => Step::Read,
                },
                Step::Speculative => match self.speculative(item, now).await? {
                    Speculative::Admitted(new) => {
                        let checks = admitted_checks(&new, item, now);
                        self.observe(&item.entity_id, &slot(item), new);
                        return Ok(admitted(checks));
                    }
                    Speculative::Failed(None) => Step::Create,
                    Speculative::Failed(Some(old)) => match self.next_step(old, item, now).await {
                        Ok(step) => step,
                        Err(done) => return done,
                    },
                },
                Step::Create => {
                    let plan = evaluate(None, item, now);
                    if !plan.fits {
                        return Ok(rejected(plan.checks));
                    }
                    let written = self.create(item, &plan.states, None, now).await?;
                    match self.after_write(written, item, plan.checks, now).await {
                        Ok(step) => step,
                        Err(done) => return done,
                    }
                }
                Step::Read => match self.read_bucket(&item.entity_id, &slot(item)).await? {
                    None => Step::Create,
                    Some(image) => match self.next_step(image, item, now).await {
                        Ok(step) => step,
                        Err(done) => return done,
                    },
                },
                Step::Normal { image, cached } => {
                    if let Some(refused) = refusal(&image, item) {
                        return Err(refused);
                    }
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
                            Err(done) => return done,
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
    pub(super) fn first_step(&self, item: &ItemRequest, now: i64) -> Step {
        let window = fresh_window_ms(charged(item));
        match self.images.get(&item.entity_id, &slot(item)) {
            Some(image) if image.bypassed(now) => Step::Bypass,
            Some(image) if !expired(&image, now) && !rf_is_fresh(&image, now, window) => {
                Step::Normal {
                    image: Box::new(image),
                    cached: true,
                }
            }
            _ => Step::Speculative,
        }
    }

    /// Where a create or rf-locked write leads: admitted (`Err`, the new item remembered),
    /// a read, or the next step from the item it returned.
    pub(super) async fn after_write(
        &self,
        written: Written,
        item: &ItemRequest,
        checks: Checks,
        now: i64,
    ) -> Result<Step, Done> {
        match written {
            Written::Ok(new) => {
                if let Some(new) = new {
                    self.observe(&item.entity_id, &slot(item), new);
                }
                Err(Ok(admitted(checks)))
            }
            Written::Conflict(None) => Ok(Step::Read),
            Written::Conflict(Some(old)) => self.next_step(old, item, now).await,
        }
    }

    /// From an image: reject (remembering it), or the write to try next.
    pub(super) async fn next_step(
        &self,
        image: Image,
        item: &ItemRequest,
        now: i64,
    ) -> Result<Step, Done> {
        self.shards.learn(&item.entity_id, &slot(item), &image);
        if let Some(refused) = refusal(&image, item) {
            return Err(Err(refused));
        }
        if image.bypassed(now) {
            return Ok(Step::Bypass);
        }
        let plan = evaluate(Some(&image), item, now);
        if !plan.fits {
            if stale_params(&image, item) {
                self.adopt_params(item, &image, now).await;
            } else {
                self.rejections
                    .remember(&item.entity_id, &slot(item), image, &plan.checks, now);
            }
            return Err(Ok(rejected(plan.checks)));
        }
        self.observe(&item.entity_id, &slot(item), image.clone());
        Ok(if plan.speculative_ok {
            Step::Speculative
        } else {
            Step::Normal {
                image: Box::new(image),
                cached: false,
            }
        })
    }

    /// Child and parent: both speculative writes at once, compensating a one-sided success;
    /// else one transaction of normal writes.
    pub(super) async fn acquire_cascade(
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
        let mut checks = Checks::new();
        let mut fits = true;
        let mut stale = Vec::new();
        let mut stamped = false;
        for (item, result) in [(child, a), (parent, b)] {
            match result {
                Ok(Speculative::Admitted(new)) => {
                    if let Err(e) = self.give_back(item, now, false).await {
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
                    stamped |= image.as_ref().is_some_and(|i| i.bypassed(now));
                    if let Some(refused) = image.as_ref().and_then(|i| refusal(i, item)) {
                        error.get_or_insert(refused);
                    }
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
        if stamped {
            // A side is bypassed by its stamp: each side on its own path.
            return self.acquire_in_turn(child, parent, now).await;
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
    pub(super) async fn acquire_one_side(
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
        let image = self.read_bucket(&checked.entity_id, &slot(checked)).await?;
        let check = evaluate(image.as_ref(), checked, now);
        let outcome = if check.fits {
            self.acquire_one(charged, now).await?
        } else {
            let other = self.read_bucket(&charged.entity_id, &slot(charged)).await?;
            rejected(evaluate(other.as_ref(), charged, now).checks)
        };
        let admitted = check.fits && outcome.admitted;
        let checks = if checked_first {
            check.checks.into_iter().chain(outcome.checks).collect()
        } else {
            outcome.checks.into_iter().chain(check.checks).collect()
        };
        Ok(AcquireOutcome {
            admitted,
            checks,
            bypassed: Vec::new(),
            shards: Vec::new(),
        })
    }

    /// A cascade with a bypassed side: the enforced side first (it may reject), then the
    /// other, which is admitted unless its bypass was lifted meanwhile; a rejection of the
    /// second gives the first back. All or nothing, as the one-transaction cascade.
    pub(super) async fn acquire_in_turn(
        &self,
        child: &ItemRequest,
        parent: &ItemRequest,
        now: i64,
    ) -> Result<AcquireOutcome, Error> {
        let child_first = !child.bypass || parent.bypass;
        let (first, second) = if child_first {
            (child, parent)
        } else {
            (parent, child)
        };
        let a = self.acquire_one(first, now).await?;
        let b = if a.admitted {
            let b = match self.acquire_one(second, now).await {
                Ok(b) => b,
                Err(e) => {
                    self.give_back(first, now, !a.bypassed.is_empty()).await?;
                    return Err(e);
                }
            };
            if !b.admitted {
                self.give_back(first, now, !a.bypassed.is_empty()).await?;
            }
            b
        } else {
            // Rejected on the first side: the other side's state, for the statuses.
            let image = self.read_bucket(&second.entity_id, &slot(second)).await?;
            if second.bypass {
                bypass::bypassed_outcome(image.as_ref(), second, now)
            } else {
                rejected(evaluate(image.as_ref(), second, now).checks)
            }
        };
        let admitted = a.admitted && b.admitted;
        let (child_out, parent_out) = if child_first { (a, b) } else { (b, a) };
        let bypassed = [(0, &child_out), (1, &parent_out)]
            .into_iter()
            .filter(|(_, o)| admitted && !o.bypassed.is_empty())
            .map(|(i, _)| i)
            .collect();
        Ok(AcquireOutcome {
            admitted,
            checks: child_out
                .checks
                .into_iter()
                .chain(parent_out.checks)
                .collect(),
            bypassed,
            shards: Vec::new(),
        })
    }

    /// The slow path of a cascade: read both items, decide, write both in one transaction.
    pub(super) async fn cascade_transaction(
        &self,
        child: &ItemRequest,
        parent: &ItemRequest,
        now: i64,
    ) -> Result<AcquireOutcome, Error> {
        match self.cascade_attempts(child, parent, now).await? {
            Some(outcome) => Ok(outcome),
            // A side is bypassed by its stamp: each side on its own path.
            None => self.acquire_in_turn(child, parent, now).await,
        }
    }

    /// [`Self::cascade_transaction`]'s attempts: the outcome, or `None` when a side turns
    /// out to be bypassed.
    ///
    /// A rejection is decided on a read at once; a write waits for this process's turn on
    /// the parent (see `turns`), reads again in it (the wait may have outdated the first
    /// read) and keeps the turn until it lands or is rejected, so a task that lost to
    /// another process's write goes again first.
    async fn cascade_attempts(
        &self,
        child: &ItemRequest,
        parent: &ItemRequest,
        now: i64,
    ) -> Result<Option<AcquireOutcome>, Error> {
        let items = [child, parent];
        let mut turn = None;
        for attempt in 0..MAX_ATTEMPTS {
            let images = self.read_buckets(&items).await?;
            for (item, image) in items.iter().zip(&images) {
                if let Some(refused) = image.as_ref().and_then(|i| refusal(i, item)) {
                    return Err(refused);
                }
            }
            if images.iter().flatten().any(|i| i.bypassed(now)) {
                return Ok(None);
            }
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
                return Ok(Some(rejected(
                    plans.into_iter().flat_map(|p| p.checks).collect(),
                )));
            }
            if turn.is_none() {
                match self
                    .turns
                    .take_within(&parent.entity_id, &slot(parent), self.timeout)
                    .await
                {
                    Some(t) => turn = Some(t),
                    None => return Err(turn_not_come(parent, self.timeout)),
                }
                continue;
            }
            let mut writes = Vec::with_capacity(4);
            // The owner checks of the creates (see `owners`), after the writes.
            let mut checks = Vec::new();
            for ((item, image), plan) in items.iter().zip(&images).zip(&plans) {
                writes.push(match image {
                    None => {
                        let mut attrs = self.new_bucket_item(item, &plan.states, now);
                        if let Some(owner) = self.owner(&item.entity_id) {
                            owner.stamp(&mut attrs);
                            let check = self.owner_check(&item.entity_id, &owner)?;
                            checks.push((
                                item.entity_id.as_str(),
                                TransactWriteItem::builder().condition_check(check).build(),
                            ));
                        }
                        let put = Put::builder()
                            .table_name(&self.table)
                            .set_item(Some(attrs))
                            .condition_expression("attribute_not_exists(PK)")
                            .build()
                            .map_err(build_error)?;
                        TransactWriteItem::builder().put(put).build()
                    }
                    Some(image) => {
                        let (update, expr) = self.normal_update(item, image, plan, now);
                        let tx = TxUpdate::builder()
                            .table_name(&self.table)
                            .set_key(Some(self.bucket_key(&item.entity_id, &slot(item))))
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
            let owners: Vec<&str> = checks.iter().map(|(id, _)| *id).collect();
            writes.extend(checks.into_iter().map(|(_, check)| check));
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
                Ok(_) => {
                    return Ok(Some(admitted(
                        plans.into_iter().flat_map(|p| p.checks).collect(),
                    )))
                }
                Err(e) => {
                    let reasons: Vec<String> = match e.as_service_error() {
                        Some(TransactWriteItemsError::TransactionCanceledException(c)) => c
                            .cancellation_reasons()
                            .iter()
                            .map(|r| r.code().unwrap_or("None").to_string())
                            .collect(),
                        _ => return Err(errors::map("TransactWriteItems", &self.table, e)),
                    };
                    // A failed owner check: the entity record changed; read it again.
                    for (owner, reason) in owners.iter().zip(reasons.iter().skip(items.len())) {
                        if reason == "ConditionalCheckFailed" {
                            self.refresh_owner(owner).await?;
                        }
                    }
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
}

/// A write that waited past the operation timeout for its process's turn on the parent
/// (see `turns`): its caller has given up (see the limiter's `decide_within`), so it is
/// not made.
fn turn_not_come(parent: &ItemRequest, limit: std::time::Duration) -> Error {
    Error::Unavailable {
        message: format!(
            "the acquire's turn on {}/{} did not come within the configured timeout of \
             {limit:?} (this process's cascades on that parent are queued)",
            parent.entity_id, parent.resource
        ),
        source: None,
    }
}

/// The items (by index) with a limit that ran short, from an outcome's checks.
fn short_items(items: &[ItemRequest], checks: &[LimitCheck]) -> Vec<usize> {
    let mut start = 0;
    let mut short = Vec::new();
    for (k, item) in items.iter().enumerate() {
        let end = (start + item.limits.len()).min(checks.len());
        if checks[start.min(end)..end].iter().any(|c| c.exceeded) {
            short.push(k);
        }
        start = end;
    }
    short
}

/// How long a rejection says to wait (the longest of its exceeded limits; never: max).
fn wait_ms(outcome: &AcquireOutcome) -> u64 {
    outcome
        .checks
        .iter()
        .filter(|c| c.exceeded)
        .map(|c| c.retry_after_ms.unwrap_or(u64::MAX))
        .max()
        .unwrap_or(0)
}

/// The slot of an item's bucket item (see [`keys::slot`]): its resource, on its shard.
pub(super) fn slot(item: &ItemRequest) -> std::borrow::Cow<'_, str> {
    keys::slot(&item.resource, item.shard.index)
}

pub(super) fn admitted(checks: Checks) -> AcquireOutcome {
    AcquireOutcome {
        admitted: true,
        checks,
        bypassed: Vec::new(),
        shards: Vec::new(),
    }
}

pub(super) fn rejected(checks: Checks) -> AcquireOutcome {
    AcquireOutcome {
        admitted: false,
        checks,
        bypassed: Vec::new(),
        shards: Vec::new(),
    }
}

pub(super) fn contended(entity_id: &str, resource: &str) -> Error {
    Error::Unavailable {
        message: format!(
            "DynamoDB write contention on {entity_id}/{resource}: gave up after {MAX_ATTEMPTS} attempts"
        ),
        source: None,
    }
}
