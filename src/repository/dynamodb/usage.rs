//! Usage and capacity reads: usage snapshots (an entity's partition, or a resource's on
//! GSI2), in full pages unlike the Python library's client-side filtering; and every
//! entity's buckets for a resource (GSI2), shards added up.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::types::AttributeValue;

use super::codec::{get_str, Image, Item};
use super::{errors, keys, Inner};
use crate::usage::{
    ResourceBucket, UsagePage, UsageQuery, UsageScope, UsageSnapshot, Window, SNAPSHOT_FIELDS,
};
use crate::Error;

/// Items read per `Query` call while filling a page.
const READ_PAGE: i32 = 200;

impl Inner {
    /// One full page of snapshots, newest first.
    pub(super) async fn usage_page(&self, query: &UsageQuery) -> Result<UsagePage, Error> {
        let (index, pk_attr, pk, sk_attr, prefix) = match &query.scope {
            UsageScope::Entity {
                entity_id,
                resource,
            } => (
                None,
                "PK",
                keys::entity_pk(&self.ns, entity_id),
                "SK",
                match resource {
                    Some(r) => format!("#USAGE#{r}#"),
                    None => "#USAGE#".to_string(),
                },
            ),
            UsageScope::Resource(resource) => (
                Some("GSI2"),
                "GSI2PK",
                keys::resource_pk(&self.ns, resource),
                "GSI2SK",
                "USAGE#".to_string(),
            ),
        };
        let mut start = match &query.page_token {
            Some(token) => Some(decode_token(token)?),
            None => None,
        };
        let mut filters = Vec::new();
        let mut values: HashMap<String, AttributeValue> = HashMap::from([
            (":pk".into(), AttributeValue::S(pk)),
            (":prefix".into(), AttributeValue::S(prefix)),
        ]);
        let mut names = HashMap::from([
            ("#pk".to_string(), pk_attr.to_string()),
            ("#sk".to_string(), sk_attr.to_string()),
        ]);
        if let Some(window) = query.window {
            names.insert("#w".into(), "window".into());
            values.insert(":w".into(), AttributeValue::S(window.as_str().into()));
            filters.push("#w = :w");
        }
        for (bound, ms, op) in [(":from", query.from_ms, ">="), (":to", query.to_ms, "<=")] {
            if let Some(ms) = ms {
                names.insert("#ws".into(), "window_start".into());
                values.insert(bound.into(), AttributeValue::S(Window::Hourly.key(ms)));
                filters.push(if op == ">=" {
                    "#ws >= :from"
                } else {
                    "#ws <= :to"
                });
            }
        }
        let filter = (!filters.is_empty()).then(|| filters.join(" AND "));
        let key_attrs: &[&str] = match index {
            Some(_) => &["PK", "SK", "GSI2PK", "GSI2SK"],
            None => &["PK", "SK"],
        };
        let mut snapshots = Vec::new();
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .set_index_name(index.map(str::to_string))
                .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
                .set_filter_expression(filter.clone())
                .set_expression_attribute_names(Some(names.clone()))
                .set_expression_attribute_values(Some(values.clone()))
                .scan_index_forward(false)
                .limit(READ_PAGE)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| errors::map("Query", &self.table, e))?;
            for item in out.items() {
                let Some(snapshot) = parse_snapshot(item) else {
                    continue;
                };
                snapshots.push(snapshot);
                if snapshots.len() == query.page_size {
                    // Full: the next page starts after this item.
                    let key: Item = key_attrs
                        .iter()
                        .filter_map(|k| Some((k.to_string(), item.get(*k)?.clone())))
                        .collect();
                    return Ok(UsagePage {
                        snapshots,
                        next_page_token: Some(encode_token(&key)),
                    });
                }
            }
            match out.last_evaluated_key() {
                Some(key) => start = Some(key.clone()),
                None => {
                    return Ok(UsagePage {
                        snapshots,
                        next_page_token: None,
                    })
                }
            }
        }
    }

    /// Every entity's bucket for `resource`, a sharded one's shards added up.
    pub(super) async fn resource_buckets(
        &self,
        resource: &str,
    ) -> Result<Vec<ResourceBucket>, Error> {
        let mut by_entity: BTreeMap<String, ResourceBucket> = BTreeMap::new();
        let mut start = None;
        loop {
            let out = self
                .client
                .query()
                .table_name(&self.table)
                .index_name("GSI2")
                .key_condition_expression("GSI2PK = :pk AND begins_with(GSI2SK, :prefix)")
                .expression_attribute_values(
                    ":pk",
                    AttributeValue::S(keys::resource_pk(&self.ns, resource)),
                )
                .expression_attribute_values(":prefix", AttributeValue::S("BUCKET#".into()))
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| errors::map("Query", &self.table, e))?;
            for item in out.items() {
                let Some(entity_id) = get_str(item, "entity_id") else {
                    continue;
                };
                let bucket =
                    by_entity
                        .entry(entity_id.to_string())
                        .or_insert_with(|| ResourceBucket {
                            entity_id: entity_id.to_string(),
                            parent_id: get_str(item, "parent_id").map(str::to_string),
                            states: BTreeMap::new(),
                        });
                for (name, state) in Image::parse(item).buckets {
                    bucket
                        .states
                        .entry(name)
                        .and_modify(|total| super::repository::add_shard(total, &state))
                        .or_insert(state);
                }
            }
            match out.last_evaluated_key() {
                Some(key) => start = Some(key.clone()),
                None => return Ok(by_entity.into_values().collect()),
            }
        }
    }
}

/// A snapshot item as both libraries read it; `None` without its identity.
fn parse_snapshot(item: &Item) -> Option<UsageSnapshot> {
    let entity_id = get_str(item, "entity_id")?;
    let resource = get_str(item, "resource")?;
    let window: Window = get_str(item, "window")?.parse().ok()?;
    let window_start = get_str(item, "window_start")?;
    let mut counters = BTreeMap::new();
    let mut overdrawn = BTreeMap::new();
    for (name, value) in item {
        let (Some(n), false) = (
            value.as_n().ok().and_then(|n| n.parse::<i64>().ok()),
            SNAPSHOT_FIELDS.contains(&name.as_str()),
        ) else {
            continue;
        };
        match name.strip_suffix("#od") {
            Some(limit) => overdrawn.insert(limit.to_string(), n),
            None => counters.insert(name.clone(), n),
        };
    }
    Some(UsageSnapshot {
        entity_id: entity_id.to_string(),
        resource: resource.to_string(),
        window,
        window_start: window_start.to_string(),
        window_end: window.end(window_start),
        counters,
        overdrawn,
        total_events: item
            .get("total_events")
            .and_then(|v| v.as_n().ok())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0),
    })
}

/// A page token: the key to start after, as JSON (opaque to callers).
fn encode_token(key: &Item) -> String {
    let strings: BTreeMap<&str, &str> = key
        .iter()
        .filter_map(|(k, v)| Some((k.as_str(), v.as_s().ok()?.as_str())))
        .collect();
    serde_json::to_string(&strings).unwrap_or_default()
}

fn decode_token(token: &str) -> Result<Item, Error> {
    let strings: BTreeMap<String, String> = serde_json::from_str(token)
        .map_err(|_| Error::validation("page_token", token, "not a token this query returned"))?;
    Ok(strings
        .into_iter()
        .map(|(k, v)| (k, AttributeValue::S(v)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_read_counters_and_overdraws_and_skip_marks() {
        let s = |v: &str| AttributeValue::S(v.into());
        let n = |v: i64| AttributeValue::N(v.to_string());
        let item: Item = HashMap::from([
            ("PK".into(), s("ns/ENTITY#k")),
            ("SK".into(), s("#USAGE#api#2026-11-30T10:00:00Z")),
            ("entity_id".into(), s("k")),
            ("resource".into(), s("api")),
            ("window".into(), s("hourly")),
            ("window_start".into(), s("2026-11-30T10:00:00Z")),
            ("ttl".into(), n(99)),
            ("total_events".into(), n(3)),
            ("tpm".into(), n(150)),
            ("tpm#od".into(), n(1)),
            ("seq#shard-1".into(), s("000123")),
        ]);
        let snap = parse_snapshot(&item).unwrap();
        assert_eq!(snap.counters, BTreeMap::from([("tpm".to_string(), 150)]));
        assert_eq!(snap.overdrawn, BTreeMap::from([("tpm".to_string(), 1)]));
        assert_eq!(snap.window_end, "2026-11-30T10:59:59Z");
        let token = encode_token(&item);
        assert_eq!(decode_token(&token).unwrap()["PK"], s("ns/ENTITY#k"));
        assert!(decode_token("nonsense").is_err());
    }
}
