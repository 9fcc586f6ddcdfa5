//! The conditional writes of an acquire: speculative, create, rf-locked (normal), each
//! marked so a write in doubt is sent again only with a check.

use super::plan::{charged, floor, fresh_window_ms, milli_i64, Plan};
use super::slot;
use super::update::{
    locked_update, mark_soft, params, require_enforceable, require_params, seed_shared_fields,
    shared_fields, Change, Ttl,
};
use super::{Speculative, Updated, Written};
use std::time::Duration;

use aws_sdk_dynamodb::types::{AttributeValue, ReturnValue, ReturnValuesOnConditionCheckFailure};

use crate::bucket::BucketState;
use crate::naming::RESERVED_LIMIT_NAME;
use crate::repository::dynamodb::codec::{self, num, s, Image, Item};
use crate::repository::dynamodb::errors::{build_error, conditional_image};
use crate::repository::dynamodb::expr::{Expr, Update};
use crate::repository::dynamodb::owners::Owner;
use crate::repository::dynamodb::retry::{backoff, no_retries};
use crate::repository::dynamodb::{errors, keys, Inner};
use crate::repository::{reconcile_shard, ItemRequest};
use crate::{Error, Limit};

impl Inner {
    /// The hot path: `ADD` the consumption, conditioned on the stored tokens covering it
    /// (no refill), the stored parameters matching, and the item being unexpired.
    pub(super) async fn speculative(
        &self,
        item: &ItemRequest,
        now: i64,
    ) -> Result<Speculative, Error> {
        let mut expr = Expr::default();
        let mut update = Update::default();
        update.conditions.push("attribute_exists(PK)".into());
        require_enforceable(now, &mut expr, &mut update);
        mark_soft(item, &mut expr, &mut update);
        for (limit, &amount) in item.limits.iter().zip(&item.amounts) {
            let tk = expr.name(&keys::bucket_attr(&limit.name, "tk"));
            let amount_milli = milli_i64(amount);
            if amount > 0 {
                let tc = expr.name(&keys::bucket_attr(&limit.name, "tc"));
                let minus = expr.num(-amount_milli);
                let plus = expr.num(amount_milli);
                update.add.push(format!("{tk} {minus}"));
                update.add.push(format!("{tc} {plus}"));
                // A soft limit may go into debt: only the debt bound holds it.
                let least = expr.num(i64::try_from(floor(limit, amount)).unwrap_or(i64::MAX));
                update.conditions.push(format!("{tk} >= {least}"));
            } else {
                let zero = expr.num(0);
                update.conditions.push(format!("{tk} >= {zero}"));
            }
            require_params(&mut expr, &mut update, limit);
        }
        debit_wcu(&mut expr, &mut update);
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
                    self.bucket_key(&item.entity_id, &slot(item)),
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
    ///
    /// `bypass`: the deadline of a `bypass` stamp to create the item with (a bypassed
    /// acquire's create: the states are full, only `tc` counts the take).
    pub(super) async fn create(
        &self,
        item: &ItemRequest,
        states: &[BucketState],
        bypass: Option<i64>,
        now: i64,
    ) -> Result<Written, Error> {
        let mut attrs = self.new_bucket_item(item, states, now);
        if let Some(deadline) = bypass {
            attrs.insert("bypass".into(), num(deadline));
        }
        match self.owner(&item.entity_id) {
            Some(owner) => self.create_checked(item, attrs, owner).await,
            None => self.put_new(attrs).await,
        }
    }

    /// A create with the owner check (see [`crate::repository::dynamodb::owners`]): the
    /// `Put` and a `ConditionCheck` on the owner's record in one transaction, re-sent with
    /// its token after an unknown outcome (DynamoDB applies it once). A failed owner check
    /// reads the record again and creates the item with the owner as it now is (its
    /// parent, cascade policy and stamps).
    async fn create_checked(
        &self,
        item: &ItemRequest,
        mut attrs: Item,
        owner: Owner,
    ) -> Result<Written, Error> {
        use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
        use aws_sdk_dynamodb::types::{Put, TransactWriteItem};
        let mut owner = owner;
        for _ in 0..OWNER_CHECKS {
            owner.stamp(&mut attrs);
            let put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(attrs.clone()))
                .condition_expression("attribute_not_exists(PK)")
                .return_values_on_condition_check_failure(
                    ReturnValuesOnConditionCheckFailure::AllOld,
                )
                .build()
                .map_err(build_error)?;
            let check = self.owner_check(&item.entity_id, &owner)?;
            let writes = vec![
                TransactWriteItem::builder().put(put).build(),
                TransactWriteItem::builder().condition_check(check).build(),
            ];
            let token = format!("zc{:032x}", rand::random::<u128>());
            let mut resends = Resends::default();
            let error = loop {
                let sent = self
                    .client
                    .transact_write_items()
                    .set_transact_items(Some(writes.clone()))
                    .client_request_token(&token)
                    .customize()
                    .config_override(no_retries())
                    .send()
                    .await;
                let error = match sent {
                    Ok(_) => return Ok(Written::Ok(Some(Image::parse(&attrs)))),
                    Err(e) => e,
                };
                match resends.next(&error) {
                    Some(wait) => tokio::time::sleep(wait).await,
                    None => break error,
                }
            };
            let Some(TransactWriteItemsError::TransactionCanceledException(c)) =
                error.as_service_error()
            else {
                return Err(errors::map("TransactWriteItems", &self.table, error));
            };
            let reasons = c.cancellation_reasons();
            let failed =
                |i: usize| reasons.get(i).and_then(|r| r.code()) == Some("ConditionalCheckFailed");
            if failed(0) {
                let existing = reasons[0]
                    .item()
                    .filter(|i| !i.is_empty())
                    .map(Image::parse);
                return Ok(Written::Conflict(existing));
            }
            if !failed(1) {
                // Another transaction on the item or the record: read and try again.
                return Ok(Written::Conflict(None));
            }
            self.refresh_owner(&item.entity_id).await?;
            owner = self.owner(&item.entity_id).unwrap_or(Owner::Absent);
        }
        Ok(Written::Conflict(None))
    }

    /// A create without the owner check: one `PutItem`, marked like an acquire's update.
    async fn put_new(&self, mut attrs: Item) -> Result<Written, Error> {
        use aws_sdk_dynamodb::operation::put_item::PutItemError;
        let marker = new_marker();
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
    pub(super) fn new_bucket_item(
        &self,
        item: &ItemRequest,
        states: &[BucketState],
        now: i64,
    ) -> Item {
        let pk = keys::bucket_pk(&self.ns, &item.entity_id, &slot(item));
        let mut attrs = codec::key(pk.clone(), keys::STATE_SK);
        attrs.insert("entity_id".into(), s(item.entity_id.as_str()));
        attrs.insert("resource".into(), s(item.resource.as_str()));
        attrs.insert("rf".into(), num(now));
        attrs.insert("shard_count".into(), num(i64::from(item.shard.count)));
        for ((limit, &amount), state) in item.limits.iter().zip(&item.amounts).zip(states) {
            // The tokens are this shard's (its share, less the take); the parameters
            // are the undivided base, as Python stores them on every shard.
            let own = [
                ("tk", state.tokens_milli),
                ("tc", milli_i64(amount)),
                ("rc", state.refill_carry),
            ];
            for (field, value) in own.into_iter().chain(params(limit)) {
                attrs.insert(keys::bucket_attr(&limit.name, field), num(value));
            }
            // An expired soft stamp, for Python (see `mark_soft`).
            if limit.soft {
                attrs.insert(keys::bucket_attr(&limit.name, "soft"), num(0));
            }
        }
        if let Some(ttl) = self.bucket_ttl(item, now) {
            attrs.insert("ttl".into(), num(ttl));
        }
        attrs.extend(shared_fields(item.owner.as_deref()));
        attrs.insert(
            "GSI2PK".into(),
            s(keys::resource_pk(&self.ns, &item.resource)),
        );
        let shard = item.shard.index;
        attrs.insert(
            "GSI2SK".into(),
            s(format!("BUCKET#{}#{shard}", item.entity_id)),
        );
        attrs.insert(
            "GSI3PK".into(),
            s(keys::entity_pk(&self.ns, &item.entity_id)),
        );
        attrs.insert(
            "GSI3SK".into(),
            s(format!("BUCKET#{}#{shard}", item.resource)),
        );
        attrs.insert("GSI4PK".into(), s(&self.ns));
        attrs.insert(
            "GSI4SK".into(),
            s(format!(
                "BUCKET#{}#{}#{shard}",
                item.entity_id, item.resource
            )),
        );
        attrs
    }

    /// When an item on shared limits expires: time to fill x the multiplier after this write.
    pub(super) fn bucket_ttl(&self, item: &ItemRequest, now: i64) -> Option<i64> {
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
    pub(super) async fn normal(
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
                    self.bucket_key(&item.entity_id, &slot(item)),
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
    pub(super) fn normal_update(
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
                must_cover: !limit.soft,
            })
            .collect();
        self.item_update(item, image, &changes, now)
    }

    /// An rf-locked write of `changes` to the item, with the item's TTL.
    pub(super) fn item_update(
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
        let (mut update, mut expr) = locked_update(image, changes, ttl, now);
        seed_shared_fields(image, item.owner.as_deref(), &mut expr, &mut update);
        require_enforceable(now, &mut expr, &mut update);
        mark_soft(item, &mut expr, &mut update);
        // A lapsed `bypass` stamp goes with the write that enforces again (Python's slow
        // path removes it too, so its fast path is not sent to the slow one forever).
        if image.bypass.is_some() {
            let n = expr.name("bypass");
            update.remove.push(n);
        }
        (update, expr)
    }

    /// After a rejection on an item that stores some limit with other parameters than
    /// those now configured: writes the new parameters, refilled to now and consuming
    /// nothing, so the new rate counts from now. A rejection writes nothing otherwise, and
    /// the item would go on refilling at its old rate from its last write: a drained
    /// 1-per-day limit raised to 1,000 a minute would stay shut for up to a day.
    ///
    /// Best effort: a lost race means another writer wrote the item (and with it the new
    /// parameters); a failure leaves the rejection standing and is retried next time.
    pub(super) async fn adopt_params(&self, item: &ItemRequest, image: &Image, now: i64) {
        let changes: Vec<Change<'_>> = item
            .limits
            .iter()
            .map(|limit| Change {
                limit,
                state: reconcile_shard(image.buckets.get(&limit.name), limit, image.shards(), now),
                consumed: 0,
                must_cover: false,
            })
            .collect();
        let (update, expr) = self.item_update(item, image, &changes, now);
        let key = self.bucket_key(&item.entity_id, &slot(item));
        if let Err(e) = self.update_item(key, update, expr, false, false).await {
            tracing::debug!(entity_id = %item.entity_id, resource = %item.resource, error = %e, "could not store changed limit parameters; will retry");
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
    pub(super) async fn update_item(
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
    pub(in crate::repository::dynamodb) fn update_request(
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
}

/// The Python library's write accounting on the hot path (its contract, section 8.1): one
/// write is 1,000 millitokens of the item's `wcu` pseudo-limit, so Python sees the
/// partition's write pressure from both clients and shards a bucket that is too hot.
/// Unconditioned on the balance (this crate does not shard; the rf-locked write refills
/// `wcu`), but only on an item that has the full pseudo-limit: an `ADD` on an item without
/// it would create a `tk` without its capacity and refill.
fn debit_wcu(expr: &mut Expr, update: &mut Update) {
    let [tk, tc, cp] =
        ["tk", "tc", "cp"].map(|f| expr.name(&keys::bucket_attr(RESERVED_LIMIT_NAME, f)));
    let minus = expr.num(-WCU_PER_WRITE);
    let plus = expr.num(WCU_PER_WRITE);
    update.add.push(format!("{tk} {minus}"));
    update.add.push(format!("{tc} {plus}"));
    update.conditions.push(format!("attribute_exists({cp})"));
}

/// Millitokens of `wcu` one write takes.
const WCU_PER_WRITE: i64 = 1_000;

/// Creates sent again after a failed owner check (each with the record read again).
const OWNER_CHECKS: usize = 3;

/// The attribute an acquire's write marks with its id (see `Inner::update_item`).
pub(crate) const MARKER: &str = "lw";

/// Sends of one acquire write after throttling (which certainly did not apply it).
pub(super) const RESENDS: usize = 3;

/// How long an acquire write with an unknown outcome is sent again (marked, or with its
/// token) until its outcome is known: DynamoDB may be restarting. The caller waits at most
/// its timeout; the rest goes on in the background, and an admission found then is rolled
/// back.
pub(super) const RESOLVE_FOR: Duration = Duration::from_secs(60);

/// When an acquire write may be sent again, and after how long.
pub(super) struct Resends {
    started: std::time::Instant,
    attempt: usize,
    /// A send's outcome was unknown: until one is known, keep sending through any passing
    /// failure (DynamoDB restarting refuses connections for a while).
    pub(super) in_doubt: bool,
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
    pub(super) fn next<E: aws_sdk_dynamodb::error::ProvideErrorMetadata>(
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

pub(super) fn new_marker() -> String {
    format!("{:016x}", rand::random::<u64>())
}
