//! Reading and writing records as DynamoDB attribute maps. Parsing never panics: a value
//! that is missing, mistyped or out of range reads as absent, and attributes this crate
//! does not know (the Python library's `wcu` limit, schedules) are passed over.

use std::collections::{BTreeMap, HashMap};

use aws_sdk_dynamodb::types::AttributeValue;

use super::acquire::MARKER;
use super::keys;
use super::lease_writes::{lane_id_attr, lane_seq_attr, LANES};
use crate::bucket::BucketState;
use crate::naming::RESERVED_LIMIT_NAME;
use crate::repository::Access;
use crate::{Entity, Limit, OnUnavailable};

/// A record as the SDK returns it.
pub(crate) type Item = HashMap<String, AttributeValue>;

/// A number attribute.
pub(crate) fn num(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// A string attribute.
pub(crate) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

/// An integer attribute, if present and in range.
///
/// A number outside the `i64` range (DynamoDB holds 38 digits; another client or an old
/// release may have stored one) saturates rather than vanishing: a bucket deep in debt
/// must read as deep in debt, never as missing (which would read as full).
pub(crate) fn get_i64(item: &Item, name: &str) -> Option<i64> {
    match item.get(name)? {
        AttributeValue::N(n) => parse_saturating(n),
        _ => None,
    }
}

fn parse_saturating(n: &str) -> Option<i64> {
    if let Ok(v) = n.parse::<i64>() {
        return Some(v);
    }
    if let Ok(v) = n.parse::<i128>() {
        return Some(v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64);
    }
    // Decimals and exponents ("1E+20", "2.5"): whole part, saturated.
    n.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .map(|v| v.trunc() as i64)
}

/// A string attribute, if present.
pub(crate) fn get_str<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    match item.get(name)? {
        AttributeValue::S(v) => Some(v),
        _ => None,
    }
}

/// One limit's state in a bucket item, if it holds a usable one.
fn bucket_state(item: &Item, name: &str, rf: Option<i64>) -> Option<BucketState> {
    let field = |f: &str| get_i64(item, &keys::bucket_attr(name, f));
    let (tk, cp, ra, rp) = (field("tk")?, field("cp")?, field("ra")?, field("rp")?);
    if cp <= 0 || ra < 0 || rp <= 0 {
        return None;
    }
    let carry = field("rc").unwrap_or(0);
    Some(BucketState {
        tokens_milli: tk,
        last_refill_ms: rf.unwrap_or(0),
        refill_carry: if (0..rp).contains(&carry) { carry } else { 0 },
        capacity_milli: cp,
        refill_amount_milli: ra,
        refill_period_ms: rp,
        total_consumed_milli: field("tc").unwrap_or(0),
    })
}

/// The first Python library feature stamped on a bucket item that this crate does not
/// enforce yet (its contract, section 5): a schedule (`vu`, `sched`). A soft limit's stamp
/// (`b_{L}_soft`) is only Python's cache of its config, which this crate reads itself.
fn unsupported_stamp(item: &Item) -> Option<&'static str> {
    if item.contains_key("vu") || item.contains_key("sched") {
        return Some("schedules");
    }
    item.keys()
        .any(|k| k.starts_with("b_") && (k.ends_with("_sched") || k.ends_with("_rsched")))
        .then_some("schedules")
}

/// The primary key of a record.
pub(super) fn key(pk: impl Into<String>, sk: impl Into<String>) -> Item {
    HashMap::from([("PK".to_string(), s(pk)), ("SK".to_string(), s(sk))])
}

/// The limit names that have all of `{prefix}{name}_{cp,ra,rp}` in an item, e.g. the `l_`
/// config attributes or the `b_` bucket attributes.
fn names_with(item: &Item, prefix: &str, suffix: &str) -> Vec<String> {
    let mut names: Vec<String> = item
        .keys()
        .filter_map(|k| k.strip_prefix(prefix)?.strip_suffix(suffix))
        .filter(|n| !n.is_empty() && *n != RESERVED_LIMIT_NAME)
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

/// The limits stored in a config record (`l_{limit}_cp` whole tokens, `_ra` whole tokens,
/// `_rp` seconds); `None` when it holds none. Stored limits that fail validation are
/// skipped with a warning rather than enforced wrongly.
pub(super) fn config_limits(item: &Item) -> Option<Vec<Limit>> {
    let mut limits = Vec::new();
    for name in names_with(item, "l_", "_cp") {
        let field = |f: &str| {
            get_i64(item, &keys::config_attr(&name, f)).and_then(|v| u64::try_from(v).ok())
        };
        let (Some(cp), Some(ra), Some(rp)) = (field("cp"), field("ra"), field("rp")) else {
            tracing::warn!(limit = %name, "stored limit lacks capacity or refill; skipped");
            continue;
        };
        let soft = matches!(
            item.get(&keys::config_attr(&name, "soft")),
            Some(AttributeValue::Bool(true))
        );
        match Limit::try_custom(name.as_str(), cp, ra, rp) {
            Ok(limit) => limits.push(if soft { limit.soft() } else { limit }),
            Err(e) => tracing::warn!(limit = %name, error = %e, "stored limit is invalid; skipped"),
        }
    }
    (!limits.is_empty()).then_some(limits)
}

/// A config record's `disabled` flag, as the Python library writes it: `true` (BOOL or
/// string), `false`, or the string `bypass`; `None` when absent (inherit) or unreadable.
pub(super) fn config_access(item: &Item) -> Option<Access> {
    match item.get("disabled")? {
        AttributeValue::Bool(true) => Some(Access::Disabled),
        AttributeValue::Bool(false) => Some(Access::Enabled),
        AttributeValue::S(v) if v == "true" => Some(Access::Disabled),
        AttributeValue::S(v) if v == "false" => Some(Access::Enabled),
        AttributeValue::S(v) if v == "bypass" => Some(Access::Bypassed),
        _ => None,
    }
}

/// An [`Access`] as the Python library's `disabled` flag says it: `true`, `false` or
/// `"bypass"` (in a config record, and in the audit event of a flag write).
pub(super) fn access_flag(access: Access) -> serde_json::Value {
    match access {
        Access::Disabled => true.into(),
        Access::Enabled => false.into(),
        Access::Bypassed => "bypass".into(),
    }
}

/// How a config record stores an [`Access`].
pub(super) fn access_value(access: Access) -> AttributeValue {
    json_to_attr(&access_flag(access))
}

/// Whether a config record holds limits under either of the Python library's prefixes
/// (`l_` and `w_`, its contract section 6): a level with only `w_` limits is not empty.
pub(super) fn config_has_limits(item: &Item) -> bool {
    item.keys()
        .any(|k| (k.starts_with("l_") || k.starts_with("w_")) && k.ends_with("_cp"))
}

/// The first feature in a config record that this crate does not enforce yet: `reset_after`
/// quotas (`w_` limits) or schedules.
pub(super) fn config_unsupported(item: &Item) -> Option<&'static str> {
    for key in item.keys() {
        if key.starts_with("w_") {
            return Some("reset_after quotas");
        }
        if key == "sched_tz" || key.ends_with("_sched") || key.ends_with("_rsched") {
            return Some("schedules");
        }
    }
    None
}

/// The `l_` attribute names a config record holds (to remove the stale ones on a write).
pub(super) fn config_attr_names(item: &Item) -> Vec<String> {
    item.keys()
        .filter(|k| {
            k.starts_with("l_")
                && ["_cp", "_ra", "_rp", "_soft"]
                    .iter()
                    .any(|suffix| k.ends_with(suffix))
        })
        .cloned()
        .collect()
}

/// The system record's `on_unavailable`, if set to a known value.
pub(super) fn on_unavailable(item: &Item) -> Option<OnUnavailable> {
    get_str(item, "on_unavailable")?.parse().ok()
}

/// A bucket item's state: per limit, complete buckets only (a limit without capacity or
/// refill fields reads as absent, so the next write seeds it in full).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Image {
    /// Per limit name.
    pub buckets: BTreeMap<String, BucketState>,
    /// The Python library's write-capacity pseudo-limit, when the item has it: no limit of
    /// this crate's, but refilled by every write that moves `rf`, as Python's writes do.
    pub wcu: Option<BucketState>,
    /// The Python library's `disabled` stamp: the resource is switched off for this item.
    pub disabled: bool,
    /// How many shards the Python library spread the bucket over (1 when absent).
    pub shard_count: i64,
    /// A Python library feature stamped on the item that this crate does not enforce yet
    /// (a soft limit, a schedule), if any.
    pub unsupported: Option<&'static str>,
    /// The `bypass` stamp's deadline, epoch ms: while it is ahead, acquires on the item are
    /// admitted and counted, nothing taken (a non-number reads as long expired).
    pub bypass: Option<i64>,
    /// The shared last-refill time (the optimistic lock of the normal write path).
    pub rf: Option<i64>,
    /// Expiry, epoch seconds.
    pub ttl: Option<i64>,
    /// The id of the last write that marked the item (acquires and debits).
    pub marker: Option<String>,
    /// The write lanes lease writes used (see `lease_writes`): lane, how many writes took
    /// a number, and the id of the last one.
    pub lanes: Vec<(usize, i64, Option<String>)>,
}

impl Image {
    /// How many shards the item's bucket has, as the item says (shard 0's is
    /// authoritative; another shard's may lag until the count is stamped on it).
    pub fn shards(&self) -> u32 {
        u32::try_from(self.shard_count).unwrap_or(u32::MAX)
    }

    /// Whether the item's `bypass` stamp is live at `now` (epoch ms).
    pub fn bypassed(&self, now: i64) -> bool {
        self.bypass.is_some_and(|deadline| deadline > now)
    }

    /// Reads a bucket item.
    ///
    /// On a shard of a sharded bucket, each limit's capacity and refill amount read as the
    /// shard's share (the stored `cp`/`ra` are the undivided base, Python's contract
    /// section 5), so the arithmetic runs on what this item may hold; `wcu` is a
    /// per-partition limit and never divided.
    pub fn parse(item: &Item) -> Self {
        let rf = get_i64(item, "rf");
        let shard_count = get_i64(item, "shard_count").unwrap_or(1).max(1);
        let share = |mut state: BucketState| {
            state.capacity_milli /= shard_count;
            state.refill_amount_milli /= shard_count;
            state
        };
        let buckets = names_with(item, "b_", "_cp")
            .into_iter()
            .filter_map(|name| Some((share(bucket_state(item, &name, rf)?), name)))
            .map(|(state, name)| (name, state))
            .collect();
        Image {
            buckets,
            wcu: bucket_state(item, RESERVED_LIMIT_NAME, rf),
            disabled: item.contains_key("disabled"),
            shard_count,
            unsupported: unsupported_stamp(item),
            bypass: item
                .contains_key("bypass")
                .then(|| get_i64(item, "bypass").unwrap_or(0)),
            rf,
            ttl: get_i64(item, "ttl"),
            marker: get_str(item, MARKER).map(str::to_string),
            lanes: (0..LANES)
                .filter_map(|lane| {
                    let seq = get_i64(item, &lane_seq_attr(lane))?;
                    let id = get_str(item, &lane_id_attr(lane)).map(str::to_string);
                    Some((lane, seq, id))
                })
                .collect(),
        }
    }

    /// How many lease writes took a number of write lane `lane` (0 if none).
    pub fn lane_seq(&self, lane: usize) -> i64 {
        self.lanes
            .iter()
            .find(|(l, _, _)| *l == lane)
            .map_or(0, |(_, seq, _)| *seq)
    }

    /// The id of the last lease write of write lane `lane`.
    pub fn lane_id(&self, lane: usize) -> Option<&str> {
        self.lanes
            .iter()
            .find(|(l, _, _)| *l == lane)
            .and_then(|(_, _, id)| id.as_deref())
    }
}

/// An entity record's attributes.
pub(super) fn entity_item(ns: &str, entity: &Entity) -> Item {
    let pk = keys::entity_pk(ns, &entity.id);
    let mut item = key(pk.clone(), keys::META_SK);
    item.insert("entity_id".into(), s(&entity.id));
    item.insert("name".into(), s(&entity.name));
    item.insert(
        "parent_id".into(),
        match &entity.parent_id {
            Some(p) => s(p),
            None => AttributeValue::Null(true),
        },
    );
    item.insert("cascade".into(), AttributeValue::Bool(entity.cascade));
    item.insert(
        "metadata".into(),
        AttributeValue::M(
            entity
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), s(v)))
                .collect(),
        ),
    );
    item.insert(
        "created_at".into(),
        s(super::stamps::iso(entity.created_at_ms)),
    );
    // The owner's generation and incarnation, which Python's bucket creates pin (its
    // contract, section 4): without them Python cannot acquire for this entity.
    item.insert("pgen".into(), num(entity.created_at_ms));
    item.insert("pinc".into(), s(super::stamps::incarnation()));
    if let Some(parent) = &entity.parent_id {
        item.insert("GSI1PK".into(), s(keys::parent_gsi1pk(ns, parent)));
        item.insert("GSI1SK".into(), s(format!("CHILD#{}", entity.id)));
    }
    item.insert("GSI4PK".into(), s(ns));
    item.insert("GSI4SK".into(), s(pk));
    item
}

/// Reads an entity record; `None` if it lacks an id.
pub(super) fn parse_entity(item: &Item) -> Option<Entity> {
    let id = get_str(item, "entity_id")?.to_string();
    let metadata = match item.get("metadata") {
        Some(AttributeValue::M(m)) => m
            .iter()
            .filter_map(|(k, v)| match v {
                AttributeValue::S(v) => Some((k.clone(), v.clone())),
                _ => None,
            })
            .collect(),
        _ => BTreeMap::new(),
    };
    Some(Entity {
        name: get_str(item, "name").unwrap_or(&id).to_string(),
        parent_id: get_str(item, "parent_id").map(str::to_string),
        cascade: matches!(item.get("cascade"), Some(AttributeValue::Bool(true))),
        metadata,
        created_at_ms: super::stamps::time_ms(item, "created_at").unwrap_or(0),
        id,
    })
}

/// A JSON value as an attribute (audit details).
pub(super) fn json_to_attr(value: &serde_json::Value) -> AttributeValue {
    use serde_json::Value;
    match value {
        Value::Null => AttributeValue::Null(true),
        Value::Bool(b) => AttributeValue::Bool(*b),
        Value::Number(n) => AttributeValue::N(n.to_string()),
        Value::String(v) => AttributeValue::S(v.clone()),
        Value::Array(a) => AttributeValue::L(a.iter().map(json_to_attr).collect()),
        Value::Object(o) => AttributeValue::M(
            o.iter()
                .map(|(k, v)| (k.clone(), json_to_attr(v)))
                .collect(),
        ),
    }
}

/// An attribute as JSON (audit details read back).
pub(super) fn attr_to_json(value: &AttributeValue) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AttributeValue::S(v) => Value::String(v.clone()),
        AttributeValue::N(n) => n
            .parse::<i64>()
            .map(Value::from)
            .or_else(|_| n.parse::<f64>().map(Value::from))
            .unwrap_or_else(|_| Value::String(n.clone())),
        AttributeValue::Bool(b) => Value::Bool(*b),
        AttributeValue::L(l) => Value::Array(l.iter().map(attr_to_json).collect()),
        AttributeValue::M(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (k.clone(), attr_to_json(v)))
                .collect(),
        ),
        AttributeValue::Ss(v) => Value::from(v.clone()),
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shard_reads_as_its_share_of_the_base_and_wcu_stays_whole() {
        let mut item = key("ns/BUCKET#k#api#2", "#STATE");
        for (k, v) in [
            ("rf", "1000"),
            ("shard_count", "3"),
            ("b_rpm_tk", "20000"),
            ("b_rpm_cp", "100000"),
            ("b_rpm_ra", "100000"),
            ("b_rpm_rp", "60000"),
            ("b_rpm_tc", "5000"),
            ("b_wcu_tk", "1000000"),
            ("b_wcu_cp", "1000000"),
            ("b_wcu_ra", "1000000"),
            ("b_wcu_rp", "1000"),
        ] {
            item.insert(k.into(), num(v));
        }
        let image = Image::parse(&item);
        assert_eq!(image.shards(), 3);
        let rpm = image.buckets["rpm"];
        // Floored in millitokens, as Python divides (`cp // shard_count`).
        assert_eq!(
            (rpm.capacity_milli, rpm.refill_amount_milli),
            (33_333, 33_333)
        );
        assert_eq!((rpm.refill_period_ms, rpm.tokens_milli), (60_000, 20_000));
        assert_eq!(image.wcu.unwrap().capacity_milli, 1_000_000);
    }

    #[test]
    fn config_round_trip_skips_foreign_and_broken_attributes() {
        let mut item = key("ns/SYSTEM#", "#CONFIG");
        for (k, v) in [
            ("l_rpm_cp", "100"),
            ("l_rpm_ra", "100"),
            ("l_rpm_rp", "60"),
            ("l_t-k.n_cp", "5"),
            ("l_t-k.n_ra", "1"),
            ("l_t-k.n_rp", "1"),
            ("l_bad_cp", "0"),
            ("l_bad_ra", "1"),
            ("l_bad_rp", "1"),
            ("l_half_cp", "1"),
            ("l_wcu_cp", "1000"),
            ("l_wcu_ra", "1000"),
            ("l_wcu_rp", "1"),
            ("l_huge_cp", "99999999999999999999999"),
            ("l_huge_ra", "1"),
            ("l_huge_rp", "1"),
        ] {
            item.insert(k.into(), num(v));
        }
        item.insert("schedule".into(), s("0 0 * * *"));
        let limits = config_limits(&item).unwrap();
        assert_eq!(
            limits,
            vec![
                Limit::per_minute("rpm", 100),
                Limit::custom("t-k.n", 5, 1, 1)
            ]
        );
    }

    #[test]
    fn bucket_image_reads_complete_limits_only() {
        let mut item = key("ns/BUCKET#a#r#0", "#STATE");
        for (k, v) in [
            ("rf", "1000"),
            ("ttl", "99"),
            ("b_rpm_tk", "5000"),
            ("b_rpm_cp", "10000"),
            ("b_rpm_ra", "10000"),
            ("b_rpm_rp", "60000"),
            ("b_rpm_tc", "5000"),
            ("b_rpm_rc", "7"),
            ("b_stub_tk", "-1000"),
            ("b_zero_tk", "0"),
            ("b_zero_cp", "1000"),
            ("b_zero_ra", "1000"),
            ("b_zero_rp", "0"),
        ] {
            item.insert(k.into(), num(v));
        }
        item.insert("b_bad_tk".into(), s("x"));
        let image = Image::parse(&item);
        assert_eq!(image.rf, Some(1000));
        assert_eq!(
            super::parse_saturating("-11999999999999000000"),
            Some(i64::MIN)
        );
        assert_eq!(super::parse_saturating("1E+3"), Some(1000));
        assert_eq!(super::parse_saturating("x"), None);
        assert_eq!(image.ttl, Some(99));
        assert_eq!(image.buckets.len(), 1);
        let rpm = &image.buckets["rpm"];
        assert_eq!(
            (rpm.tokens_milli, rpm.refill_carry, rpm.total_consumed_milli),
            (5000, 7, 5000)
        );
    }

    #[test]
    fn entity_round_trip() {
        let entity = Entity {
            id: "key-1".into(),
            name: "Key one".into(),
            parent_id: Some("proj".into()),
            cascade: true,
            metadata: BTreeMap::from([("tier".into(), "gold".into())]),
            // Stored as Python stores it: an ISO time, to the second.
            created_at_ms: 1_764_498_521_000,
        };
        let item = entity_item("ns", &entity);
        assert_eq!(get_str(&item, "GSI1PK"), Some("ns/PARENT#proj"));
        assert_eq!(get_str(&item, "created_at"), Some("2025-11-30T10:28:41Z"));
        assert_eq!(get_i64(&item, "pgen"), Some(1_764_498_521_000));
        assert_eq!(get_str(&item, "pinc").map(str::len), Some(16));
        assert_eq!(parse_entity(&item), Some(entity));
    }
}
