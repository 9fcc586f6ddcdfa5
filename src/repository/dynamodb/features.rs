//! Which records of a table use Python library features this crate does not enforce yet
//! (schedules, `reset_after` quotas): acquires on them fail
//! closed with [`crate::Error::Unsupported`], and `zae-limiter check` lists them so an
//! operator knows before a request does.

use super::admin::DynamoDbTable;
use super::codec::{self, get_str, Image, Item};
use super::{errors, keys};
use crate::Error;

/// One record using a feature this crate does not enforce yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureUse {
    /// The feature, as [`crate::Error::Unsupported`] names it.
    pub feature: String,
    /// The namespace id the record belongs to (the prefix of its key).
    pub namespace_id: String,
    /// The kind of record: `config` or `bucket`.
    pub record: &'static str,
    /// What the record is about: `entity/resource`, `resource`, or `system`.
    pub subject: String,
}

impl DynamoDbTable {
    /// Every record that uses a feature this crate does not enforce yet, in key order of
    /// the scan. Reads the whole table (a `Scan`, paginated): an operator's check, not
    /// something to run per request.
    pub async fn unsupported_features(&self) -> Result<Vec<FeatureUse>, Error> {
        let items: Vec<Item> = self
            .client()
            .scan()
            .table_name(self.name())
            .into_paginator()
            .items()
            .send()
            .collect::<Result<Vec<Item>, _>>()
            .await
            .map_err(|e| errors::map("Scan", self.name(), e))?;
        Ok(items.iter().filter_map(feature_use).collect())
    }
}

/// The feature a record uses that this crate does not enforce yet, if any.
fn feature_use(item: &Item) -> Option<FeatureUse> {
    let pk = get_str(item, "PK")?;
    let sk = get_str(item, "SK")?;
    let (namespace_id, partition) = pk.split_once('/')?;
    let (record, feature, subject) = if sk == keys::STATE_SK {
        let image = Image::parse(item);
        let feature = image.unsupported?;
        let entity = get_str(item, "entity_id").unwrap_or("?");
        let resource = get_str(item, "resource").unwrap_or("?");
        ("bucket", feature, format!("{entity}/{resource}"))
    } else if sk.starts_with(keys::CONFIG_SK) {
        let feature = codec::config_unsupported(item)?;
        let subject = if let Some(entity) = partition.strip_prefix("ENTITY#") {
            let resource = sk.strip_prefix("#CONFIG#").unwrap_or("?");
            format!("{entity}/{resource}")
        } else if let Some(resource) = partition.strip_prefix("RESOURCE#") {
            resource.to_string()
        } else {
            "system".to_string()
        };
        ("config", feature, subject)
    } else {
        return None;
    };
    Some(FeatureUse {
        feature: feature.to_string(),
        namespace_id: namespace_id.to_string(),
        record,
        subject,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repository::dynamodb::codec::{num, s};
    use aws_sdk_dynamodb::types::AttributeValue;
    use std::collections::HashMap;

    fn item(pairs: &[(&str, AttributeValue)]) -> Item {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<HashMap<_, _>>()
    }

    #[test]
    fn configs_and_buckets_name_their_feature_and_subject() {
        let config = item(&[
            ("PK", s("ns1/ENTITY#k1")),
            ("SK", s("#CONFIG#api")),
            ("l_rpm_cp", num(5)),
            ("l_rpm_sched", s("1h9-17s500")),
        ]);
        let found = feature_use(&config).unwrap();
        assert_eq!(
            (found.feature.as_str(), found.record, found.subject.as_str()),
            ("schedules", "config", "k1/api")
        );
        assert_eq!(found.namespace_id, "ns1");
        let resource = item(&[
            ("PK", s("ns1/RESOURCE#api")),
            ("SK", s("#CONFIG")),
            ("w_s_cp", num(50)),
        ]);
        assert_eq!(feature_use(&resource).unwrap().subject, "api");
        let bucket = item(&[
            ("PK", s("ns1/BUCKET#k1#api#0")),
            ("SK", s("#STATE")),
            ("entity_id", s("k1")),
            ("resource", s("api")),
            ("shard_count", num(4)),
        ]);
        // Shards are enforced (each its share); only features this crate lacks are listed.
        assert!(feature_use(&bucket).is_none());
        let plain = item(&[("PK", s("ns1/BUCKET#k2#api#0")), ("SK", s("#STATE"))]);
        assert!(feature_use(&plain).is_none());
    }
}
