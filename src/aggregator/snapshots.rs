//! Usage snapshot items: their keys, the marks that make a batch count once, and the
//! coalesced conditional write of one item.
//!
//! Format (the Python library's `update_snapshot`, its table contract section 7): in the
//! entity's partition, `SET entity_id, GSI2PK, GSI2SK`, `resource`, `window`,
//! `window_start`, `GSI4PK/SK` and `ttl` if absent, `ADD` one number per limit (whole
//! tokens), `total_events`, and `{limit}#od` for a soft limit left in debt.
//!
//! Beyond Python:
//! - **Marks**: per bucket item the snapshot counts (a sharded bucket has several), the
//!   sequence number of its last record counted into the item, as a string attribute
//!   `seq#{bucket shard}` (Python's readers take every number attribute of a snapshot for
//!   a counter, and skip strings). A stream numbers one item's records in order, whichever
//!   stream shard carries them, and a Lambda event does not name the stream shard: the
//!   bucket item is the unit both ways of running see. A record at or below the mark was
//!   counted already; the write is conditioned on the marks it read, so two deliveries of
//!   one batch, overlapping batches, or a batch redelivered after a crash between its
//!   writes count each record once.
//! - **Keys**: an hourly item keeps Python's `#USAGE#{resource}#{window start}`; daily and
//!   monthly items add `#{window}`, because Python's hourly item for midnight and its daily
//!   item share a key and add into one another. Python's readers find both (they read the
//!   window from the `window` attribute).

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::types::AttributeValue;

use super::record::{sequence_cmp, Delta};
use crate::repository::dynamodb::codec::s;
use crate::repository::dynamodb::expr::{Expr, Update};
use crate::repository::dynamodb::keys;
use crate::usage::Window;

/// One snapshot item: an entity's use of a resource over one window.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct Target {
    pub namespace_id: String,
    pub entity_id: String,
    pub resource: String,
    pub window: Window,
    /// The window's start (`window_start`).
    pub start: String,
}

impl Target {
    /// The item's key.
    pub fn key(&self) -> HashMap<String, AttributeValue> {
        HashMap::from([
            ("PK".into(), s(self.pk())),
            (
                "SK".into(),
                s(sort_key(&self.resource, &self.start, self.window)),
            ),
        ])
    }

    fn pk(&self) -> String {
        keys::entity_pk(&self.namespace_id, &self.entity_id)
    }
}

/// A snapshot's sort key (see the module docs for the window suffix).
pub(crate) fn sort_key(resource: &str, start: &str, window: Window) -> String {
    match window {
        Window::Hourly => format!("#USAGE#{resource}#{start}"),
        other => format!("#USAGE#{resource}#{start}#{other}"),
    }
}

/// One record's part in one snapshot item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Contribution {
    /// The bucket shard the record is of: whose mark orders it.
    pub source: String,
    pub sequence_number: String,
    pub deltas: Vec<Delta>,
}

/// The attribute holding the mark of a bucket shard's records.
pub(super) fn mark_attr(source: &str) -> String {
    format!("seq#{source}")
}

/// The marks an item holds, per bucket shard.
pub(super) fn marks(item: &HashMap<String, AttributeValue>) -> BTreeMap<String, String> {
    item.iter()
        .filter_map(|(name, value)| {
            let shard = name.strip_prefix("seq#")?;
            Some((shard.to_string(), value.as_s().ok()?.clone()))
        })
        .collect()
}

/// The write of the contributions not yet counted under `marks`: `None` when every one
/// was (a redelivery), else the update, its aliases, and how many were new.
pub(super) fn update(
    target: &Target,
    contributions: &[Contribution],
    marks: &BTreeMap<String, String>,
    ttl_s: i64,
) -> Option<(Update, Expr, usize)> {
    let fresh: Vec<&Contribution> = contributions
        .iter()
        .filter(|c| {
            marks.get(&c.source).is_none_or(|mark| {
                sequence_cmp(&c.sequence_number, mark) == std::cmp::Ordering::Greater
            })
        })
        .collect();
    if fresh.is_empty() {
        return None;
    }
    let mut counters: BTreeMap<&str, i64> = BTreeMap::new();
    let mut overdrawn: BTreeMap<&str, i64> = BTreeMap::new();
    let mut events = 0i64;
    let mut new_marks: BTreeMap<&str, &str> = BTreeMap::new();
    for c in &fresh {
        for d in &c.deltas {
            *counters.entry(&d.limit).or_default() += d.tokens;
            if d.overdrawn {
                *overdrawn.entry(&d.limit).or_default() += 1;
            }
            events += 1;
        }
        let mark = new_marks.entry(&c.source).or_insert(&c.sequence_number);
        if sequence_cmp(&c.sequence_number, mark) == std::cmp::Ordering::Greater {
            *mark = &c.sequence_number;
        }
    }
    let mut expr = Expr::default();
    let mut update = Update::default();
    let mut set = |expr: &mut Expr, attr: &str, value: AttributeValue| {
        let (n, v) = (expr.name(attr), expr.value(value));
        update.set.push(format!("{n} = {v}"));
    };
    set(&mut expr, "entity_id", s(&target.entity_id));
    set(
        &mut expr,
        "GSI2PK",
        s(keys::resource_pk(&target.namespace_id, &target.resource)),
    );
    set(
        &mut expr,
        "GSI2SK",
        s(format!("USAGE#{}#{}", target.start, target.entity_id)),
    );
    for (attr, value) in [
        ("resource", s(&target.resource)),
        ("window", s(target.window.as_str())),
        ("window_start", s(&target.start)),
        ("GSI4PK", s(&target.namespace_id)),
        ("GSI4SK", s(target.pk())),
        ("ttl", AttributeValue::N(ttl_s.to_string())),
    ] {
        let (n, v) = (expr.name(attr), expr.value(value));
        update.set.push(format!("{n} = if_not_exists({n}, {v})"));
    }
    for (shard, mark) in &new_marks {
        let n = expr.name(&mark_attr(shard));
        let v = expr.value(s(*mark));
        update.set.push(format!("{n} = {v}"));
        // The marks read are still the item's: nothing was counted since.
        match marks.get(*shard) {
            Some(read) => {
                let r = expr.value(s(read));
                update.conditions.push(format!("{n} = {r}"));
            }
            None => update.conditions.push(format!("attribute_not_exists({n})")),
        }
    }
    for (limit, tokens) in &counters {
        let (n, v) = (expr.name(limit), expr.num(*tokens));
        update.add.push(format!("{n} {v}"));
    }
    for (limit, count) in &overdrawn {
        let (n, v) = (expr.name(&format!("{limit}#od")), expr.num(*count));
        update.add.push(format!("{n} {v}"));
    }
    let (n, v) = (expr.name("total_events"), expr.num(events));
    update.add.push(format!("{n} {v}"));
    Some((update, expr, fresh.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            namespace_id: "ns1".into(),
            entity_id: "k".into(),
            resource: "api".into(),
            window: Window::Daily,
            start: "2026-11-30T00:00:00Z".into(),
        }
    }

    fn contribution(seq: &str, tokens: i64) -> Contribution {
        Contribution {
            source: "0".into(),
            sequence_number: seq.into(),
            deltas: vec![Delta {
                limit: "rpm".into(),
                tokens,
                overdrawn: false,
            }],
        }
    }

    #[test]
    fn records_at_or_below_the_mark_are_not_counted_again() {
        let batch = [
            contribution("90", 1),
            contribution("100", 2),
            contribution("110", 4),
        ];
        let (_, _, fresh) = update(&target(), &batch, &BTreeMap::new(), 0).unwrap();
        assert_eq!(fresh, 3);
        let marked = BTreeMap::from([("0".to_string(), "100".to_string())]);
        let (update, expr, fresh) = update(&target(), &batch, &marked, 0).unwrap();
        assert_eq!(fresh, 1);
        let values = expr.values().unwrap();
        assert!(values
            .values()
            .any(|v| v.as_n().ok().map(String::as_str) == Some("4")));
        assert!(!values
            .values()
            .any(|v| v.as_n().ok().map(String::as_str) == Some("6")));
        // Conditioned on the mark read, and moving it to the last record counted.
        assert!(update.condition().unwrap().contains('='));
        assert!(values
            .values()
            .any(|v| v.as_s().ok().map(String::as_str) == Some("110")));
        let all = BTreeMap::from([("0".to_string(), "110".to_string())]);
        assert!(super::update(&target(), &batch, &all, 0).is_none());
    }

    #[test]
    fn hourly_keys_are_pythons_and_longer_windows_are_told_apart() {
        assert_eq!(
            sort_key("api", "2026-11-30T00:00:00Z", Window::Hourly),
            "#USAGE#api#2026-11-30T00:00:00Z"
        );
        assert_eq!(
            sort_key("api", "2026-11-30T00:00:00Z", Window::Daily),
            "#USAGE#api#2026-11-30T00:00:00Z#daily"
        );
        assert_eq!(target().key()["PK"], s("ns1/ENTITY#k"));
    }
}
