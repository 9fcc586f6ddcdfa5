//! The aggregator's share of sharding (the Python library's table contract, section 8.4):
//! from the shard-0 images a batch carries,
//!
//! - **proactive doubling** (`try_proactive_shard`): shard 0's `wcu` refilled to now below
//!   20% of its capacity means the partition is near its write ceiling: `SET shard_count
//!   = min(2n, 32)`, conditioned on the count read;
//! - **propagation** (`propagate_shard_count`): a count that grew is stamped on the
//!   shards that exist (`SET shard_count` where it is lower), and the new shards are
//!   cloned from the shard-0 image (keys rewritten, each limit at its share, `tc = 0`),
//!   each clone a `Put` on `attribute_not_exists(PK)` in one transaction with a check
//!   that the owner's record still holds the generation and incarnation the image
//!   carries (a move or a re-creation since skips the clone: a client creates it then).
//!
//! Buckets with quotas (`reset_after` windows, grant counts) are left alone: Python moves
//! their allowance between shards (ADR-145), which this crate does not do. Every write is
//! conditioned, so replays, races with Python's aggregator or clients, and lost races do
//! no harm.

use std::collections::HashMap;

use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{ConditionCheck, Put, TransactWriteItem};

use super::{now_s, Aggregator, ChangeKind, StreamRecord};
use crate::naming::RESERVED_LIMIT_NAME;
use crate::repository::dynamodb::acquire::MARKER;
use crate::repository::dynamodb::codec::{get_i64, get_str, num, s, Item};
use crate::repository::dynamodb::errors;
use crate::repository::dynamodb::lease_writes::{lane_id_attr, lane_seq_attr, LANES};
use crate::repository::dynamodb::owners::{owner_meta_check, owner_meta_condition};
use crate::Error;

/// The Python library's most shards per bucket.
const MAX_SHARDS: i64 = 32;

/// What the upkeep did in one batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShardUpkeep {
    /// Buckets whose shard count was doubled.
    pub doubled: usize,
    /// Existing shards stamped with a grown count.
    pub stamped: usize,
    /// Shards created from shard 0's image.
    pub created: usize,
}

impl Aggregator {
    /// The sharding upkeep of a batch: each bucket's last shard-0 image in it.
    pub(super) async fn upkeep_shards(
        &self,
        records: &[StreamRecord],
    ) -> Result<ShardUpkeep, Error> {
        let mut latest: HashMap<&str, &StreamRecord> = HashMap::new();
        for record in records {
            let Some(new) = record.new_image.as_ref() else {
                continue;
            };
            if record.kind == ChangeKind::Remove || !is_shard_zero(new) || has_quota(new) {
                continue;
            }
            if let Some(pk) = get_str(new, "PK") {
                latest.insert(pk, record);
            }
        }
        let mut done = ShardUpkeep::default();
        for record in latest.values() {
            let Some(image) = record.new_image.as_ref() else {
                continue;
            };
            let before = record.old_image.as_ref().map_or(1, count);
            let mut now_count = count(image);
            if self.doubles(image, now_count).await? {
                done.doubled += 1;
                let doubled = (now_count * 2).min(MAX_SHARDS);
                let (stamped, created) = self.propagate(image, now_count, doubled).await?;
                done.stamped += stamped;
                done.created += created;
                now_count = doubled;
            }
            if now_count > before {
                let (stamped, created) = self.propagate(image, before, now_count).await?;
                done.stamped += stamped;
                done.created += created;
            }
        }
        Ok(done)
    }

    /// Doubles shard 0 when its `wcu`, refilled to now, is under a fifth of capacity;
    /// whether this write did it.
    async fn doubles(&self, image: &Item, shards: i64) -> Result<bool, Error> {
        if shards >= MAX_SHARDS || !write_capacity_low(image, now_s().saturating_mul(1000)) {
            return Ok(false);
        }
        let new = (shards * 2).min(MAX_SHARDS);
        let condition = if shards == 1 {
            "attribute_exists(PK) AND (attribute_not_exists(shard_count) OR shard_count = :old)"
        } else {
            "attribute_exists(PK) AND shard_count = :old"
        };
        let key = key_of(image);
        let sent = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .update_expression("SET shard_count = :new")
            .condition_expression(condition)
            .expression_attribute_values(":old", num(shards))
            .expression_attribute_values(":new", num(new))
            .send()
            .await;
        errors::written(sent, "UpdateItem", &self.table)
    }

    /// Stamps `new` on shards `1..old` and creates shards `old..new` from shard 0's image;
    /// returns how many of each it wrote.
    async fn propagate(&self, image: &Item, old: i64, new: i64) -> Result<(usize, usize), Error> {
        let Some(pk) = get_str(image, "PK") else {
            return Ok((0, 0));
        };
        let Some(base) = pk.strip_suffix("#0") else {
            return Ok((0, 0));
        };
        let mut stamped = 0;
        for shard in 1..old.max(1) {
            let mut key = key_of(image);
            key.insert("PK".into(), s(format!("{base}#{shard}")));
            let sent = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(key))
                .update_expression("SET shard_count = :new")
                .condition_expression(
                    "attribute_exists(PK) AND (attribute_not_exists(shard_count) OR shard_count < :new)",
                )
                .expression_attribute_values(":new", num(new))
                .send()
                .await;
            stamped += usize::from(errors::written(sent, "UpdateItem", &self.table)?);
        }
        let mut created = 0;
        for shard in old.max(1)..new {
            if self.create_clone(image, base, shard, new).await? {
                created += 1;
            }
        }
        Ok((stamped, created))
    }

    /// Creates shard `shard` of `shards` from shard 0's image, unless it exists or its
    /// owner's record moved on since the image.
    async fn create_clone(
        &self,
        image: &Item,
        base: &str,
        shard: i64,
        shards: i64,
    ) -> Result<bool, Error> {
        let clone = clone_item(image, base, shard, shards);
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(clone))
            .condition_expression("attribute_not_exists(PK)")
            .build()
            .map_err(|e| Error::validation("clone", base, e.to_string()))?;
        let mut writes = vec![TransactWriteItem::builder().put(put).build()];
        if let Some(check) = self.owner_check(image, base)? {
            writes.push(TransactWriteItem::builder().condition_check(check).build());
        }
        let sent = self
            .client
            .transact_write_items()
            .set_transact_items(Some(writes))
            .send()
            .await;
        match sent {
            Ok(_) => Ok(true),
            // The shard exists already, or the owner moved: nothing to do.
            Err(e)
                if matches!(
                    e.as_service_error(),
                    Some(TransactWriteItemsError::TransactionCanceledException(_))
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(errors::map("TransactWriteItems", &self.table, e)),
        }
    }

    /// The check that the owner's record still holds the image's generation and
    /// incarnation (Python's `_clone_owner_check`); `None` for an image without an owner.
    fn owner_check(&self, image: &Item, base: &str) -> Result<Option<ConditionCheck>, Error> {
        let (Some(ns), Some(entity)) = (
            base.split_once('/').map(|(ns, _)| ns),
            get_str(image, "entity_id"),
        ) else {
            return Ok(None);
        };
        let pgen = get_i64(image, "pgen");
        let pinc = get_str(image, "pinc");
        let exists = (pgen.is_some() || pinc.is_some()).then_some(true);
        owner_meta_check(
            &self.table,
            ns,
            entity,
            owner_meta_condition(exists, pgen, pinc),
        )
        .map(Some)
    }
}

/// A new shard from shard 0's image: keys rewritten, the count stamped, each limit at its
/// share (`wcu` whole) with nothing consumed, and none of this crate's write marks.
fn clone_item(image: &Item, base: &str, shard: i64, shards: i64) -> Item {
    let mut item: Item = image
        .iter()
        .filter(|(name, _)| !is_write_mark(name) && !name.ends_with("_wtc"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    item.insert("PK".into(), s(format!("{base}#{shard}")));
    item.insert("shard_count".into(), num(shards));
    for index in ["GSI2SK", "GSI3SK", "GSI4SK"] {
        if let Some(sk) = get_str(image, index) {
            if let Some((head, _)) = sk.rsplit_once('#') {
                item.insert(index.into(), s(format!("{head}#{shard}")));
            }
        }
    }
    let limits: Vec<String> = image
        .keys()
        .filter_map(|k| {
            k.strip_prefix("b_")?
                .strip_suffix("_cp")
                .map(str::to_string)
        })
        .collect();
    for limit in limits {
        let Some(cp) = get_i64(image, &format!("b_{limit}_cp")) else {
            continue;
        };
        let share = if limit == RESERVED_LIMIT_NAME {
            cp
        } else {
            cp / shards
        };
        item.insert(format!("b_{limit}_tk"), num(share));
        item.insert(format!("b_{limit}_tc"), num(0));
        item.remove(&format!("b_{limit}_rc"));
    }
    item
}

/// Whether `wcu`, refilled from `rf` to `now_ms`, is under a fifth of its capacity.
fn write_capacity_low(image: &Item, now_ms: i64) -> bool {
    let field = |f: &str| get_i64(image, &format!("b_{RESERVED_LIMIT_NAME}_{f}"));
    let (Some(tk), Some(cp), Some(ra), Some(rp)) =
        (field("tk"), field("cp"), field("ra"), field("rp"))
    else {
        return false;
    };
    if cp <= 0 || rp <= 0 {
        return false;
    }
    let rf = get_i64(image, "rf").unwrap_or(now_ms);
    let elapsed = i128::from(now_ms.saturating_sub(rf).max(0));
    let refilled = (i128::from(tk) + elapsed * i128::from(ra) / i128::from(rp)).min(i128::from(cp));
    refilled * 5 < i128::from(cp)
}

fn is_shard_zero(image: &Item) -> bool {
    get_str(image, "SK") == Some("#STATE")
        && get_str(image, "PK").is_some_and(|pk| pk.contains("/BUCKET#") && pk.ends_with("#0"))
}

fn has_quota(image: &Item) -> bool {
    image
        .keys()
        .any(|k| k.starts_with("b_") && (k.ends_with("_rsa") || k.ends_with("_gc")))
}

/// This crate's write marks (the write marker and the lease write lanes): they prove
/// writes to shard 0, and mean nothing on another item.
fn is_write_mark(name: &str) -> bool {
    name == MARKER
        || (0..LANES).any(|lane| name == lane_seq_attr(lane) || name == lane_id_attr(lane))
}

fn count(image: &Item) -> i64 {
    get_i64(image, "shard_count").unwrap_or(1).max(1)
}

fn key_of(image: &Item) -> Item {
    ["PK", "SK"]
        .iter()
        .filter_map(|k| Some((k.to_string(), image.get(*k)?.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> Item {
        HashMap::from([
            ("PK".into(), s("ns/BUCKET#k#api#0")),
            ("SK".into(), s("#STATE")),
            ("entity_id".into(), s("k")),
            ("rf".into(), num(1_000_000)),
            ("shard_count".into(), num(1)),
            ("GSI2SK".into(), s("BUCKET#k#0")),
            ("GSI3SK".into(), s("BUCKET#api#0")),
            ("GSI4SK".into(), s("BUCKET#k#api#0")),
            ("b_rpm_tk".into(), num(3_000)),
            ("b_rpm_cp".into(), num(100_000)),
            ("b_rpm_tc".into(), num(97_000)),
            ("b_rpm_wtc".into(), num(5)),
            ("b_wcu_tk".into(), num(100_000)),
            ("b_wcu_cp".into(), num(1_000_000)),
            ("b_wcu_ra".into(), num(1_000_000)),
            ("b_wcu_rp".into(), num(1_000)),
            ("lw".into(), s("marker")),
            ("ws0".into(), num(3)),
        ])
    }

    #[test]
    fn a_clone_holds_its_share_under_its_own_keys() {
        let clone = clone_item(&image(), "ns/BUCKET#k#api", 3, 4);
        assert_eq!(clone["PK"], s("ns/BUCKET#k#api#3"));
        assert_eq!(clone["GSI2SK"], s("BUCKET#k#3"));
        assert_eq!(clone["GSI3SK"], s("BUCKET#api#3"));
        assert_eq!(clone["GSI4SK"], s("BUCKET#k#api#3"));
        assert_eq!(clone["shard_count"], num(4));
        assert_eq!(clone["b_rpm_tk"], num(25_000));
        assert_eq!(clone["b_rpm_tc"], num(0));
        assert_eq!(
            clone["b_wcu_tk"],
            num(1_000_000),
            "wcu is per partition, whole"
        );
        assert!(!clone.contains_key("b_rpm_wtc") && !clone.contains_key("lw"));
        assert!(!clone.contains_key("ws0"));
    }

    #[test]
    fn write_capacity_is_low_below_a_fifth_after_refill() {
        let img = image();
        // 10% at rf; 50 ms later 5% more: still low. A second later: full.
        assert!(write_capacity_low(&img, 1_000_050));
        assert!(!write_capacity_low(&img, 1_001_000));
        assert!(is_shard_zero(&img) && !has_quota(&img));
    }
}
