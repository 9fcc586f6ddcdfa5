//! Bypassed acquires (the Python library's `disabled = "bypass"`, its contract section
//! 8.5): admitted whatever the balance, the take counted in `tc`, no tokens taken, no
//! refill and no `rf` move, so lifting the bypass leaves no debt and needs no reset.
//!
//! The item's `bypass` stamp (a deadline) is what both libraries' writes go by: a write
//! whose config says bypass renews it, conditioned on it still being there (an enable
//! since removed it, and the acquire is enforced); a write on a live stamp alone (config
//! not yet caught up) is bypassed without renewing it. A stamp that is missing although the
//! config says bypass (an item created before, or a fan-out that has not reached it) is
//! written only after a consistent read of the config confirms it.

use super::{Updated, Written};
use crate::bucket::{self, BucketState};
use crate::repository::dynamodb::codec::Image;
use crate::repository::dynamodb::expr::{Expr, Update};
use crate::repository::dynamodb::flags::stamp_deadline;
use crate::repository::dynamodb::{keys, Inner};
use crate::repository::{reconcile_bucket, AcquireOutcome, ItemRequest, LimitCheck};
use crate::Error;

/// Which stamp a bypassed write requires.
#[derive(Clone, Copy)]
enum Stamp {
    /// The config says bypass: any stamp (renewed by the write).
    Renew,
    /// No config behind it: a stamp live at the write's time.
    Live,
    /// The config says bypass, confirmed by a consistent read: none (the write stamps).
    Confirmed,
}

impl Inner {
    /// A bypassed acquire of one item: `Some` admitted outcome, or `None` when the item is
    /// no longer bypassed (the stamp lapsed or was lifted) and must be enforced.
    /// `by_config`: the resolved config says bypass (else only the item's stamp does).
    pub(super) async fn acquire_bypassed(
        &self,
        item: &ItemRequest,
        now: i64,
        by_config: bool,
    ) -> Result<Option<AcquireOutcome>, Error> {
        let mut stamp = if by_config { Stamp::Renew } else { Stamp::Live };
        for _ in 0..3 {
            let (update, expr) = bypass_update(item, stamp, now);
            let key = self.bucket_key(&item.entity_id, &super::slot(item));
            let old = match self.update_item(key, update, expr, true, true).await? {
                Updated::Ok(new) => {
                    let image = new.unwrap_or_default();
                    let outcome = bypassed_outcome(Some(&image), item, now);
                    self.observe(&item.entity_id, &super::slot(item), image);
                    return Ok(Some(outcome));
                }
                Updated::ConditionFailed(old) => old,
            };
            if matches!(stamp, Stamp::Live) || !self.bypass_confirmed(item).await? {
                return Ok(None);
            }
            if old.is_some() {
                stamp = Stamp::Confirmed;
                continue;
            }
            // No item yet: create it full, stamped, with the take counted.
            let states: Vec<BucketState> = item
                .limits
                .iter()
                .map(|limit| BucketState::from_limit(limit, now))
                .collect();
            let deadline = stamp_deadline(now);
            match self.create(item, &states, Some(deadline), now).await? {
                Written::Ok(new) => {
                    let outcome = bypassed_outcome(new.as_ref(), item, now);
                    if let Some(new) = new {
                        self.observe(&item.entity_id, &super::slot(item), new);
                    }
                    return Ok(Some(outcome));
                }
                // Created by another writer meanwhile: stamp it.
                Written::Conflict(_) => stamp = Stamp::Confirmed,
            }
        }
        Ok(None)
    }

    /// Whether a consistent read of the config still says bypass for the item.
    async fn bypass_confirmed(&self, item: &ItemRequest) -> Result<bool, Error> {
        let config = self
            .read_config(&item.entity_id, &item.resource, true)
            .await?;
        Ok(config.bypass)
    }
}

/// The bypass-shaped write: `ADD tc` per limit taken from, and under [`Stamp::Renew`] or
/// [`Stamp::Confirmed`] `SET bypass = deadline` (confirmed: `REMOVE disabled` too, as the
/// config read says).
fn bypass_update(item: &ItemRequest, stamp: Stamp, now: i64) -> (Update, Expr) {
    let mut expr = Expr::default();
    let mut update = Update::default();
    update.conditions.push("attribute_exists(PK)".into());
    let bypass = expr.name("bypass");
    match stamp {
        Stamp::Renew => update
            .conditions
            .push(format!("attribute_exists({bypass})")),
        Stamp::Live => {
            let v = expr.num(now);
            update.conditions.push(format!("{bypass} > {v}"));
        }
        Stamp::Confirmed => {
            let disabled = expr.name("disabled");
            update.remove.push(disabled);
        }
    }
    if !matches!(stamp, Stamp::Live) {
        let v = expr.num(stamp_deadline(now));
        update.set.push(format!("{bypass} = {v}"));
    }
    for (limit, &amount) in item.limits.iter().zip(&item.amounts) {
        if amount == 0 {
            continue;
        }
        let tc = expr.name(&keys::bucket_attr(&limit.name, "tc"));
        let v = expr.num(
            i64::try_from(amount)
                .unwrap_or(i64::MAX)
                .saturating_mul(bucket::MILLI),
        );
        update.add.push(format!("{tc} {v}"));
    }
    (update, expr)
}

/// A bypassed item's outcome: admitted, each limit reporting what the bucket holds.
pub(super) fn bypassed_outcome(
    image: Option<&Image>,
    item: &ItemRequest,
    now: i64,
) -> AcquireOutcome {
    let checks = item
        .limits
        .iter()
        .zip(&item.amounts)
        .map(|(limit, &amount)| {
            let stored = image.and_then(|i| i.buckets.get(&limit.name));
            let current = reconcile_bucket(stored, limit, now);
            let result = bucket::count_only(&current, 0, now);
            LimitCheck::from_consume(limit, amount, &result)
        })
        .collect();
    AcquireOutcome {
        admitted: true,
        checks,
        bypassed: vec![0],
        shards: Vec::new(),
    }
}
