//! The single-table key layout (DESIGN section 9). Identifiers never contain `#`, so no
//! value can forge another record's key.

/// The partition of table-level records (namespace registry, schema version).
pub(super) const REGISTRY_PK: &str = "_/SYSTEM#";
/// The schema-version record's sort key.
pub(super) const VERSION_SK: &str = "#VERSION";
/// The sort key of config records of the system and resources.
pub(super) const CONFIG_SK: &str = "#CONFIG";
/// The sort key of entity records.
pub(super) const META_SK: &str = "#META";
/// The sort key of bucket items.
pub(crate) const STATE_SK: &str = "#STATE";

/// Forward registry row: namespace name to id.
pub(super) fn namespace_sk(name: &str) -> String {
    format!("#NAMESPACE#{name}")
}

/// Reverse registry row: namespace id to name.
pub(super) fn namespace_id_sk(id: &str) -> String {
    format!("#NSID#{id}")
}

/// The system config record's partition.
pub(super) fn system_pk(ns: &str) -> String {
    format!("{ns}/SYSTEM#")
}

/// A resource config record's partition.
pub(crate) fn resource_pk(ns: &str, resource: &str) -> String {
    format!("{ns}/RESOURCE#{resource}")
}

/// An entity's partition (its record, its configs).
pub(crate) fn entity_pk(ns: &str, entity_id: &str) -> String {
    format!("{ns}/ENTITY#{entity_id}")
}

/// An entity config record's sort key.
pub(super) fn entity_config_sk(resource: &str) -> String {
    format!("#CONFIG#{resource}")
}

/// A bucket item's partition, from its slot (see [`slot`]): `{ns}/BUCKET#{id}#{res}#{n}`.
pub(super) fn bucket_pk(ns: &str, entity_id: &str, slot: &str) -> String {
    let (resource, shard) = split_slot(slot);
    format!("{ns}/BUCKET#{entity_id}#{resource}#{shard}")
}

/// The name this process gives one bucket item of an entity (its caches, its reads and
/// writes): the resource for shard 0, `{resource}#{shard}` for another shard of a bucket
/// the Python library sharded. Resource names cannot contain `#`, so no two items share a
/// slot, and an entity's slots all start with `{entity}#` in the caches.
pub(super) fn slot(resource: &str, shard: u32) -> std::borrow::Cow<'_, str> {
    if shard == 0 {
        std::borrow::Cow::Borrowed(resource)
    } else {
        std::borrow::Cow::Owned(format!("{resource}#{shard}"))
    }
}

/// The resource and shard of a slot.
pub(super) fn split_slot(slot: &str) -> (&str, u32) {
    match slot.split_once('#') {
        Some((resource, shard)) => (resource, shard.parse().unwrap_or(0)),
        None => (slot, 0),
    }
}

/// The entity and resource of a bucket item's key, as the Python library reads them: the
/// shard after the last `#`, the entity before the first (keys-only index results carry
/// nothing else).
pub(crate) fn parse_bucket_pk<'a>(ns: &str, pk: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = pk.strip_prefix(ns)?.strip_prefix("/BUCKET#")?;
    let (rest, _shard) = rest.rsplit_once('#')?;
    rest.split_once('#')
}

/// The GSI1 partition listing a parent's children.
pub(super) fn parent_gsi1pk(ns: &str, parent_id: &str) -> String {
    format!("{ns}/PARENT#{parent_id}")
}

/// An audit partition: an entity id, `$SYSTEM` or `$RESOURCE:{resource}`.
pub(super) fn audit_pk(ns: &str, subject: &str) -> String {
    format!("{ns}/AUDIT#{subject}")
}

/// An audit event's sort key: `#AUDIT#` and its ULID, so events sort by time (and this
/// crate's and Python's interleave in order).
pub(super) fn audit_sk(event_id: &str) -> String {
    format!("#AUDIT#{event_id}")
}

/// Attribute names of one limit in a bucket item: `b_{limit}_{field}`.
pub(super) fn bucket_attr(limit: &str, field: &str) -> String {
    format!("b_{limit}_{field}")
}

/// Attribute names of one limit in a config record: `l_{limit}_{field}`.
pub(super) fn config_attr(limit: &str, field: &str) -> String {
    format!("l_{limit}_{field}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_keys_parse_back_as_python_reads_them() {
        let pk = bucket_pk("ns1", "user-1", "openai/gpt-4");
        assert_eq!(
            parse_bucket_pk("ns1", &pk),
            Some(("user-1", "openai/gpt-4"))
        );
        // A shard above 0, as the Python library writes it.
        assert_eq!(
            parse_bucket_pk("ns1", "ns1/BUCKET#k#api#3"),
            Some(("k", "api"))
        );
        assert_eq!(bucket_pk("ns1", "k", &slot("api", 3)), "ns1/BUCKET#k#api#3");
        assert_eq!(split_slot(&slot("api", 3)), ("api", 3));
        assert_eq!(split_slot(&slot("api", 0)), ("api", 0));
        assert_eq!(pk, "ns1/BUCKET#user-1#openai/gpt-4#0");
        assert_eq!(parse_bucket_pk("other", &pk), None);
        assert_eq!(parse_bucket_pk("ns1", "ns1/ENTITY#k"), None);
    }
}
