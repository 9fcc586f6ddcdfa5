//! The owner check on bucket creates (the Python library's contract, section 5): a bucket
//! item is created in one transaction with a `ConditionCheck` that its owner's entity
//! record is still the one the acquire read (same generation `pgen` and incarnation
//! `pinc`), or still absent. An entity deleted and created again meanwhile (a new
//! incarnation, perhaps another parent) fails the check, so no bucket is created with the
//! old owner's parent and cascade policy stamped on it. The new item carries the owner's
//! `pgen`/`pinc`, as Python's creates do.
//!
//! The stamps come from the entity records that config reads fetch anyway; an entity not
//! read lately gets no check, as in Python ("only if the pass read META").

use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck};
use quick_cache::sync::Cache;

use super::acquire::owner_fields;
use super::codec::{get_i64, get_str, num, s, Item};
use super::errors::build_error;
use super::{keys, table, Inner};
use crate::Error;

/// Owners remembered at most.
const MAX_ENTRIES: usize = 10_000;

/// What the last read of an entity record found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Owner {
    /// No record.
    Absent,
    /// The record's generation (0 when absent) and `pinc` (`None` when absent), its
    /// incarnation as Python derives it (`pinc`, else `created_at`, else `-`), and the
    /// parent and cascade policy its buckets carry.
    Found {
        pgen: i64,
        pinc: Option<String>,
        incarnation: String,
        parent_id: Option<String>,
        cascade: bool,
    },
}

impl Owner {
    /// The stamp of an entity record (`None`: there is none).
    pub(super) fn of(meta: Option<&Item>) -> Owner {
        let Some(meta) = meta else {
            return Owner::Absent;
        };
        let pinc = get_str(meta, "pinc").map(str::to_string);
        let incarnation = pinc
            .clone()
            .or_else(|| get_str(meta, "created_at").map(str::to_string))
            .unwrap_or_else(|| "-".to_string());
        let entity = super::codec::parse_entity(meta);
        Owner::Found {
            pgen: get_i64(meta, "pgen").unwrap_or(0),
            pinc,
            incarnation,
            parent_id: entity.as_ref().and_then(|e| e.parent_id.clone()),
            cascade: entity.is_some_and(|e| e.cascade),
        }
    }

    /// The condition on the owner's record, as Python builds it, with its values.
    fn condition(&self) -> (String, Vec<(&'static str, AttributeValue)>) {
        match self {
            Owner::Absent => owner_meta_condition(Some(false), None, None),
            Owner::Found {
                pgen,
                pinc,
                incarnation,
                ..
            } => owner_meta_condition(
                Some(true),
                Some(*pgen),
                pinc.as_ref().map(|_| incarnation.as_str()),
            ),
        }
    }

    /// Puts the owner as read on a new bucket item's attributes, in place of what it was
    /// built with: `pgen`/`pinc` (none when there is no record), the parent and the
    /// cascade policy. The create is checked against this same read.
    pub(super) fn stamp(&self, attrs: &mut Item) {
        for attr in ["pgen", "pinc", "parent_id", "cascade"] {
            attrs.remove(attr);
        }
        match self {
            Owner::Absent => attrs.extend(owner_fields(None, false)),
            Owner::Found {
                pgen,
                incarnation,
                parent_id,
                cascade,
                ..
            } => {
                attrs.insert("pgen".into(), num(*pgen));
                attrs.insert("pinc".into(), s(incarnation));
                attrs.extend(owner_fields(parent_id.as_deref(), *cascade));
            }
        }
    }
}

/// The last stamp read of each entity record.
pub(super) struct OwnerCache {
    entries: Cache<String, Owner>,
}

impl OwnerCache {
    pub fn new() -> Self {
        OwnerCache {
            entries: Cache::new(MAX_ENTRIES),
        }
    }
}

impl Inner {
    /// Remembers what a read of `entity_id`'s record found.
    pub(super) fn remember_owner(&self, entity_id: &str, meta: Option<&Item>) {
        self.owners
            .entries
            .insert(entity_id.to_string(), Owner::of(meta));
    }

    /// The owner stamp last read for `entity_id`, if any was.
    pub(super) fn owner(&self, entity_id: &str) -> Option<Owner> {
        self.owners.entries.get(entity_id)
    }

    /// The `ConditionCheck` for a create of one of `entity_id`'s buckets under `owner`.
    pub(super) fn owner_check(
        &self,
        entity_id: &str,
        owner: &Owner,
    ) -> Result<ConditionCheck, Error> {
        owner_meta_check(&self.table, &self.ns, entity_id, owner.condition())
    }

    /// Reads `entity_id`'s record again (consistently) after a create's check failed on
    /// it, and remembers it: the next create is stamped and checked with it.
    pub(super) async fn refresh_owner(&self, entity_id: &str) -> Result<(), Error> {
        let pk = keys::entity_pk(&self.ns, entity_id);
        let meta = table::get_item(&self.client, &self.table, &pk, keys::META_SK).await?;
        self.remember_owner(entity_id, meta.as_ref());
        Ok(())
    }
}

/// The condition a bucket create pins on its owner's record (Python's
/// `owner_meta_condition`), with its values: `exists` is whether the record was found
/// (`None`: the writer cannot tell, as from a stream image without stamps), `pgen` the
/// generation read (0 also accepts none), `pinc` the incarnation read (matched against
/// `pinc`, else `created_at`; the legacy `-` also against none).
pub(crate) fn owner_meta_condition(
    exists: Option<bool>,
    pgen: Option<i64>,
    pinc: Option<&str>,
) -> (String, Vec<(&'static str, AttributeValue)>) {
    if exists == Some(false) {
        return ("attribute_not_exists(PK)".into(), Vec::new());
    }
    let mut parts = Vec::new();
    let mut values = Vec::new();
    if exists == Some(true) {
        parts.push("attribute_exists(PK)".to_string());
    }
    match pgen {
        None => parts.push("attribute_not_exists(pgen)".into()),
        Some(pgen) => {
            parts.push(if pgen == 0 {
                "(attribute_not_exists(pgen) OR pgen = :pg)".into()
            } else {
                "pgen = :pg".into()
            });
            values.push((":pg", num(pgen)));
        }
    }
    match pinc {
        None => parts.push("attribute_not_exists(pinc)".into()),
        Some(pinc) => {
            let created = if pinc == "-" {
                "(created_at = :inc OR attribute_not_exists(created_at))"
            } else {
                "created_at = :inc"
            };
            parts.push(format!(
                "(pinc = :inc OR (attribute_not_exists(pinc) AND {created}))"
            ));
            values.push((":inc", s(pinc)));
        }
    }
    (parts.join(" AND "), values)
}

/// The check of an owner's record (`{ns}/ENTITY#{id}`, `#META`) against `condition`.
pub(crate) fn owner_meta_check(
    table: &str,
    ns: &str,
    entity_id: &str,
    (condition, values): (String, Vec<(&'static str, AttributeValue)>),
) -> Result<ConditionCheck, Error> {
    let mut check = ConditionCheck::builder()
        .table_name(table)
        .key("PK", s(keys::entity_pk(ns, entity_id)))
        .key("SK", s(keys::META_SK))
        .condition_expression(condition);
    for (name, value) in values {
        check = check.expression_attribute_values(name, value);
    }
    check.build().map_err(build_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn conditions_follow_what_was_read() {
        assert_eq!(Owner::of(None).condition().0, "attribute_not_exists(PK)");
        let meta: Item = HashMap::from([
            ("pgen".to_string(), num(1_764_498_521_000_i64)),
            ("pinc".to_string(), s("70d28dbb31c62d53")),
        ]);
        let owner = Owner::of(Some(&meta));
        let (condition, values) = owner.condition();
        assert!(condition.starts_with("attribute_exists(PK) AND pgen = :pg AND (pinc = :inc"));
        assert_eq!(values.len(), 2);
        let mut attrs = Item::new();
        owner.stamp(&mut attrs);
        assert_eq!(attrs["pinc"], s("70d28dbb31c62d53"));
        // A record from before pgen/pinc: generation 0, no incarnation stamp.
        let legacy: Item = HashMap::from([("created_at".to_string(), s("2025-01-01T00:00:00Z"))]);
        let (condition, _) = Owner::of(Some(&legacy)).condition();
        assert_eq!(
            condition,
            "attribute_exists(PK) AND (attribute_not_exists(pgen) OR pgen = :pg) AND attribute_not_exists(pinc)"
        );
    }
}
