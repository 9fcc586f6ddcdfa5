//! Stream records of bucket items, and the consumption each one records: per limit, how
//! far the item's `tc` counter (net millitokens consumed) moved. Pure, no I/O.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::AttributeValue;

use crate::naming::RESERVED_LIMIT_NAME;
use crate::repository::dynamodb::codec::{get_i64, get_str};
use crate::repository::dynamodb::keys;
use crate::usage::SNAPSHOT_FIELDS;

/// What happened to the item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Created (a bucket's first acquire: its consumption counts from zero).
    Insert,
    /// Changed.
    Modify,
    /// Deleted (nothing consumed).
    Remove,
}

/// One change of an item, as a DynamoDB stream delivers it (`NEW_AND_OLD_IMAGES`).
#[derive(Debug, Clone, PartialEq)]
pub struct StreamRecord {
    /// What happened.
    pub kind: ChangeKind,
    /// The record's sequence number (decimal digits): a stream's records of one item are
    /// numbered in the order they happened, across the stream's shards.
    pub sequence_number: String,
    /// When the change happened, epoch milliseconds (the stream's
    /// `ApproximateCreationDateTime`); the usage is counted in the window holding it.
    pub created_ms: Option<i64>,
    /// The item before the change (`MODIFY`, `REMOVE`).
    pub old_image: Option<HashMap<String, AttributeValue>>,
    /// The item after the change (`INSERT`, `MODIFY`).
    pub new_image: Option<HashMap<String, AttributeValue>>,
}

/// Why a record (or one limit of it) was not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Skip {
    /// Not a bucket item (config, entity, audit, snapshot, ...).
    NotABucket,
    /// A bucket item deleted: nothing consumed.
    Removed,
    /// A bucket image without what the count needs (`entity_id`, `tc` in both images, a
    /// readable number, a sequence number).
    MissingAttributes,
    /// A counter for a limit the item does not hold (no `tk` and `cp`), or whose name a
    /// snapshot cannot store as a counter (`ttl`, `window`, ...).
    UnknownLimit,
}

/// One limit's consumption in one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Delta {
    pub limit: String,
    /// Whole tokens, floored per record as the Python aggregator counts them.
    pub tokens: i64,
    /// A soft limit this record left in debt.
    pub overdrawn: bool,
}

/// The consumption a record records: whose, when, and per limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Consumption {
    pub namespace_id: String,
    pub entity_id: String,
    pub resource: String,
    /// The bucket shard the record is of (its PK's last part).
    pub bucket_shard: String,
    pub at_ms: i64,
    pub deltas: Vec<Delta>,
}

/// The consumption `record` records, and the limits of it that were skipped; `Err` when
/// the whole record is skipped.
pub(super) fn consumption(record: &StreamRecord) -> Result<(Consumption, Vec<Skip>), Skip> {
    if record.kind == ChangeKind::Remove {
        let bucket = record.old_image.as_ref().is_some_and(is_bucket);
        return Err(if bucket {
            Skip::Removed
        } else {
            Skip::NotABucket
        });
    }
    let new = record.new_image.as_ref().ok_or(Skip::MissingAttributes)?;
    if !is_bucket(new) {
        return Err(Skip::NotABucket);
    }
    let pk = get_str(new, "PK").ok_or(Skip::NotABucket)?;
    let (namespace_id, _) = pk.split_once('/').ok_or(Skip::NotABucket)?;
    let (_, resource) = keys::parse_bucket_pk(namespace_id, pk).ok_or(Skip::NotABucket)?;
    let bucket_shard = pk.rsplit_once('#').map_or("0", |(_, shard)| shard);
    let entity_id = get_str(new, "entity_id").ok_or(Skip::MissingAttributes)?;
    if record.sequence_number.is_empty() {
        return Err(Skip::MissingAttributes);
    }
    let old = match record.kind {
        ChangeKind::Modify => Some(record.old_image.as_ref().ok_or(Skip::MissingAttributes)?),
        _ => None,
    };
    let at_ms = match record.created_ms {
        Some(ms) => ms,
        None => get_i64(new, "rf").ok_or(Skip::MissingAttributes)?,
    };
    let mut deltas = Vec::new();
    let mut skipped = Vec::new();
    for name in new.keys() {
        let Some(limit) = name
            .strip_prefix("b_")
            .and_then(|rest| rest.strip_suffix("_tc"))
        else {
            continue;
        };
        if limit == RESERVED_LIMIT_NAME {
            continue;
        }
        let known = ["tk", "cp"]
            .iter()
            .all(|f| new.contains_key(&format!("b_{limit}_{f}")));
        if !known || limit.is_empty() || SNAPSHOT_FIELDS.contains(&limit) {
            skipped.push(Skip::UnknownLimit);
            continue;
        }
        let Some(after) = get_i64(new, name) else {
            skipped.push(Skip::MissingAttributes);
            continue;
        };
        let before = match old {
            // A counter the old image lacks was seeded by this write: nothing to compare.
            Some(old) => match get_i64(old, name) {
                Some(v) => v,
                None => {
                    skipped.push(Skip::MissingAttributes);
                    continue;
                }
            },
            None => 0,
        };
        let milli = after.saturating_sub(before);
        if milli == 0 {
            continue;
        }
        let soft = new.contains_key(&format!("b_{limit}_soft"));
        let tokens_left = get_i64(new, &format!("b_{limit}_tk")).unwrap_or(0);
        deltas.push(Delta {
            limit: limit.to_string(),
            tokens: milli.div_euclid(1000),
            overdrawn: soft && milli > 0 && tokens_left < 0,
        });
    }
    deltas.sort_by(|a, b| a.limit.cmp(&b.limit));
    Ok((
        Consumption {
            namespace_id: namespace_id.to_string(),
            entity_id: entity_id.to_string(),
            resource: resource.to_string(),
            bucket_shard: bucket_shard.to_string(),
            at_ms,
            deltas,
        },
        skipped,
    ))
}

fn is_bucket(image: &HashMap<String, AttributeValue>) -> bool {
    get_str(image, "SK") == Some(keys::STATE_SK)
        && get_str(image, "PK").is_some_and(|pk| pk.contains("/BUCKET#"))
}

/// Orders sequence numbers (decimal digits of any length) numerically.
pub(super) fn sequence_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (a, b) = (a.trim_start_matches('0'), b.trim_start_matches('0'));
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(v: i64) -> AttributeValue {
        AttributeValue::N(v.to_string())
    }
    fn s(v: &str) -> AttributeValue {
        AttributeValue::S(v.to_string())
    }

    fn bucket(tc: i64, tk: i64) -> HashMap<String, AttributeValue> {
        HashMap::from([
            ("PK".into(), s("ns1/BUCKET#key-1#api#0")),
            ("SK".into(), s("#STATE")),
            ("entity_id".into(), s("key-1")),
            ("resource".into(), s("api")),
            ("rf".into(), n(1_000)),
            ("b_rpm_tc".into(), n(tc)),
            ("b_rpm_tk".into(), n(tk)),
            ("b_rpm_cp".into(), n(100_000)),
            ("b_wcu_tc".into(), n(tc)),
            ("b_wcu_tk".into(), n(1)),
            ("b_wcu_cp".into(), n(1)),
        ])
    }

    fn record(kind: ChangeKind, old: Option<i64>, new: Option<i64>) -> StreamRecord {
        StreamRecord {
            kind,
            sequence_number: "100".into(),
            created_ms: Some(5_000),
            old_image: old.map(|tc| bucket(tc, 0)),
            new_image: new.map(|tc| bucket(tc, 0)),
        }
    }

    #[test]
    fn a_modify_counts_the_tc_move_per_limit_floored_and_skips_wcu() {
        let (c, skipped) =
            consumption(&record(ChangeKind::Modify, Some(2_000), Some(4_500))).unwrap();
        assert!(skipped.is_empty());
        assert_eq!(
            (
                c.namespace_id.as_str(),
                c.entity_id.as_str(),
                c.resource.as_str(),
                c.at_ms
            ),
            ("ns1", "key-1", "api", 5_000)
        );
        assert_eq!(c.deltas.len(), 1, "wcu is no limit of the user's");
        assert_eq!((c.deltas[0].limit.as_str(), c.deltas[0].tokens), ("rpm", 2));
        // A refund floors downwards, as Python's `//`.
        let (c, _) = consumption(&record(ChangeKind::Modify, Some(4_500), Some(2_000))).unwrap();
        assert_eq!(c.deltas[0].tokens, -3);
    }

    #[test]
    fn a_creation_counts_from_zero_and_a_removal_counts_nothing() {
        let (c, _) = consumption(&record(ChangeKind::Insert, None, Some(3_000))).unwrap();
        assert_eq!(c.deltas[0].tokens, 3);
        assert_eq!(
            consumption(&record(ChangeKind::Remove, Some(3_000), None)),
            Err(Skip::Removed)
        );
    }

    #[test]
    fn bad_records_are_skipped_with_a_reason() {
        let mut config = record(ChangeKind::Modify, Some(1_000), Some(2_000));
        for image in [&mut config.old_image, &mut config.new_image] {
            image
                .as_mut()
                .unwrap()
                .insert("SK".into(), s("#CONFIG#api"));
        }
        assert_eq!(consumption(&config), Err(Skip::NotABucket));
        let mut anonymous = record(ChangeKind::Modify, Some(1_000), Some(2_000));
        anonymous.new_image.as_mut().unwrap().remove("entity_id");
        assert_eq!(consumption(&anonymous), Err(Skip::MissingAttributes));
        let mut stray = record(ChangeKind::Modify, Some(1_000), Some(2_000));
        let new = stray.new_image.as_mut().unwrap();
        new.insert("b_ghost_tc".into(), n(5_000));
        new.insert("b_ttl_tc".into(), n(5_000));
        new.insert("b_ttl_tk".into(), n(5_000));
        new.insert("b_ttl_cp".into(), n(5_000));
        let (c, skipped) = consumption(&stray).unwrap();
        assert_eq!(c.deltas.len(), 1);
        assert_eq!(skipped, [Skip::UnknownLimit, Skip::UnknownLimit]);
        let mut garbled = record(ChangeKind::Modify, Some(1_000), Some(2_000));
        garbled
            .old_image
            .as_mut()
            .unwrap()
            .insert("b_rpm_tc".into(), s("lots"));
        let (c, skipped) = consumption(&garbled).unwrap();
        assert!(c.deltas.is_empty());
        assert_eq!(skipped, [Skip::MissingAttributes]);
    }

    #[test]
    fn a_soft_limit_left_in_debt_is_overdrawn() {
        let mut r = record(ChangeKind::Modify, Some(1_000), Some(9_000));
        let new = r.new_image.as_mut().unwrap();
        new.insert("b_rpm_soft".into(), n(0));
        new.insert("b_rpm_tk".into(), n(-500));
        let (c, _) = consumption(&r).unwrap();
        assert!(c.deltas[0].overdrawn);
    }

    #[test]
    fn sequence_numbers_compare_as_numbers() {
        use std::cmp::Ordering::*;
        assert_eq!(sequence_cmp("900", "1000"), Less);
        assert_eq!(sequence_cmp("000123", "123"), Equal);
        assert_eq!(sequence_cmp("49668", "49667"), Greater);
    }
}
