//! The declarative limits manifest (`limits plan|diff|apply -f limits.yaml`):
//!
//! ```yaml
//! system:
//!   on_unavailable: block          # optional: allow | block
//!   limits:
//!     rpm: { capacity: 1000 }
//! resources:
//!   gpt-4:
//!     rpm: 500                     # a bare number is the capacity
//!     tpm: { capacity: 100000, burst: 150000 }
//! entities:
//!   key-abc:
//!     _default_:                   # every resource
//!       rpm: { capacity: 100 }
//!     gpt-4:
//!       tpm: { capacity: 20000, refill_amount: 10000, period: 30s }
//! ```
//!
//! Per limit only `capacity` is required: `refill_amount` defaults to the capacity and
//! `period` (seconds, or `30s`/`1m`/`1h`/`1d`) to 60 s; `burst` raises the bucket above the
//! capacity as [`Limit::with_burst`] does; `soft: true` makes it a soft limit
//! ([`Limit::soft`]), charged but never refusing. Everything is validated while the file is read
//! (names, ids, numbers, unknown fields, duplicate keys), so an invalid manifest is
//! rejected with its line and field before anything is written.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use zae_limiter::repository::ConfigScope;
use zae_limiter::{naming, Limit, OnUnavailable};

/// The desired state a manifest describes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Limits by scope (scopes with no limits are absent).
    pub limits: BTreeMap<ConfigScope, Vec<Limit>>,
    /// The system's outage policy (`None`: not set, which blocks).
    pub on_unavailable: Option<OnUnavailable>,
}

/// Reads and validates a manifest. The error names the field and says where it is.
pub fn parse(text: &str) -> Result<Desired, String> {
    let file: File = serde_norway::from_str(text).map_err(|e| e.to_string())?;
    let mut desired = Desired::default();
    if let Some(system) = file.system {
        desired.on_unavailable = system.on_unavailable;
        if let Some(limits) = system.limits {
            desired
                .limits
                .insert(ConfigScope::System, limits.into_limits());
        }
    }
    for (resource, limits) in file.resources.unwrap_or_default().0 {
        desired
            .limits
            .insert(ConfigScope::Resource(resource.0), limits.into_limits());
    }
    for (entity, resources) in file.entities.unwrap_or_default().0 {
        for (resource, limits) in resources.0 {
            desired.limits.insert(
                ConfigScope::Entity {
                    entity_id: entity.0.clone(),
                    resource: resource.0,
                },
                limits.into_limits(),
            );
        }
    }
    desired.limits.retain(|_, l| !l.is_empty());
    Ok(desired)
}

/// A desired state as a manifest (the structure [`parse`] reads), each limit in its
/// shortest form: a bare capacity when it refills its capacity every 60 s.
pub fn render(desired: &Desired) -> serde_json::Value {
    use serde_json::{json, Map, Value};
    let limits = |limits: &[Limit]| -> Value {
        let mut sorted = limits.to_vec();
        sorted.sort_by(|a, b| a.name.cmp(&b.name));
        let mut map = Map::new();
        for l in sorted {
            let spec = if l.refill_amount == l.capacity && l.refill_period_seconds == 60 && !l.soft
            {
                json!(l.capacity)
            } else {
                let mut spec = Map::new();
                spec.insert("capacity".into(), json!(l.capacity));
                if l.refill_amount != l.capacity {
                    spec.insert("refill_amount".into(), json!(l.refill_amount));
                }
                if l.refill_period_seconds != 60 {
                    spec.insert("period".into(), json!(l.refill_period_seconds));
                }
                if l.soft {
                    spec.insert("soft".into(), json!(true));
                }
                Value::Object(spec)
            };
            map.insert(l.name.clone(), spec);
        }
        Value::Object(map)
    };
    let mut system = Map::new();
    let mut resources = Map::new();
    let mut entities: BTreeMap<&str, Map<String, Value>> = BTreeMap::new();
    if let Some(policy) = desired.on_unavailable {
        system.insert("on_unavailable".into(), json!(policy.as_str()));
    }
    for (scope, l) in &desired.limits {
        match scope {
            ConfigScope::System => {
                system.insert("limits".into(), limits(l));
            }
            ConfigScope::Resource(r) => {
                resources.insert(r.clone(), limits(l));
            }
            ConfigScope::Entity {
                entity_id,
                resource,
            } => {
                entities
                    .entry(entity_id)
                    .or_default()
                    .insert(resource.clone(), limits(l));
            }
        }
    }
    let mut out = Map::new();
    if !system.is_empty() {
        out.insert("system".into(), Value::Object(system));
    }
    if !resources.is_empty() {
        out.insert("resources".into(), Value::Object(resources));
    }
    if !entities.is_empty() {
        out.insert(
            "entities".into(),
            Value::Object(
                entities
                    .into_iter()
                    .map(|(id, m)| (id.to_string(), Value::Object(m)))
                    .collect(),
            ),
        );
    }
    Value::Object(out)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    system: Option<System>,
    resources: Option<UniqueMap<ResourceName, LimitMap>>,
    entities: Option<UniqueMap<EntityId, UniqueMap<EntityResource, LimitMap>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct System {
    on_unavailable: Option<OnUnavailable>,
    limits: Option<LimitMap>,
}

/// Limits by name.
type LimitMap = UniqueMap<LimitName, Spec>;

impl LimitMap {
    fn into_limits(self) -> Vec<Limit> {
        self.0
            .into_iter()
            // Both parts were validated: the name as a key, the numbers as a spec.
            .map(|(name, Spec(limit))| {
                let named = Limit::custom(
                    name.0,
                    limit.capacity,
                    limit.refill_amount,
                    limit.refill_period_seconds,
                );
                if limit.soft {
                    named.soft()
                } else {
                    named
                }
            })
            .collect()
    }
}

/// A map that rejects a key written twice (YAML says keys are unique; a silent "last one
/// wins" would drop a limit without a word).
struct UniqueMap<K, V>(BTreeMap<K, V>);

impl<K, V> Default for UniqueMap<K, V> {
    fn default() -> Self {
        UniqueMap(BTreeMap::new())
    }
}

impl<'de, K, V> Deserialize<'de> for UniqueMap<K, V>
where
    K: Deserialize<'de> + Ord + fmt::Display,
    V: Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor<K, V>(PhantomData<(K, V)>);
        impl<'de, K, V> Visitor<'de> for MapVisitor<K, V>
        where
            K: Deserialize<'de> + Ord + fmt::Display,
            V: Deserialize<'de>,
        {
            type Value = UniqueMap<K, V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(UniqueMap(BTreeMap::new()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<K>()? {
                    if out.contains_key(&key) {
                        return Err(de::Error::custom(format_args!(
                            "{key} appears twice; keep one"
                        )));
                    }
                    let value = map.next_value()?;
                    out.insert(key, value);
                }
                Ok(UniqueMap(out))
            }
        }
        deserializer.deserialize_map(MapVisitor(PhantomData))
    }
}

/// A key validated with one of the crate's naming rules.
macro_rules! validated_key {
    ($name:ident, $check:expr) => {
        #[derive(PartialEq, Eq, PartialOrd, Ord)]
        struct $name(String);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = String::deserialize(d)?;
                let check: fn(&str) -> Result<(), zae_limiter::Error> = $check;
                check(&text).map_err(de::Error::custom)?;
                Ok($name(text))
            }
        }
    };
}

validated_key!(LimitName, naming::validate_limit_name);
validated_key!(ResourceName, naming::validate_resource);
validated_key!(EntityId, naming::validate_entity_id);
validated_key!(EntityResource, naming::validate_entity_config_resource);

/// One limit, validated; its name comes from the key it is under.
struct Spec(Limit);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    capacity: u64,
    refill_amount: Option<u64>,
    #[serde(alias = "refill_period_seconds")]
    period: Option<Period>,
    burst: Option<u64>,
    /// A soft limit: charged and reported, never refusing.
    #[serde(default)]
    soft: bool,
}

/// Seconds as a number, or a string with a unit.
#[derive(Deserialize)]
#[serde(untagged)]
enum Period {
    Seconds(u64),
    Text(String),
}

impl Spec {
    /// The limit the fields describe, checked by [`Limit::validate`] (its name is filled in
    /// from the key); the error names the manifest's field.
    fn from_raw(raw: RawSpec) -> Result<Self, String> {
        let period = match raw.period {
            None => 60,
            Some(Period::Seconds(s)) => s,
            Some(Period::Text(t)) => {
                zae_limiter::limit::parse_period_seconds(&t).map_err(|_| {
                    format!("period {t:?} is not a period; write seconds (60) or 30s, 1m, 1h, 1d")
                })?
            }
        };
        let limit = Limit::try_custom(
            "unnamed",
            raw.burst.unwrap_or(raw.capacity),
            raw.refill_amount.unwrap_or(raw.capacity),
            period,
        );
        match limit {
            Ok(limit) => Ok(Spec(if raw.soft { limit.soft() } else { limit })),
            Err(zae_limiter::Error::Validation { field, reason, .. }) => {
                // Which manifest field set the limit's field.
                let named = match field.rsplit('.').next().unwrap_or_default() {
                    "capacity" if raw.burst.is_some() => "burst",
                    "refill_amount" if raw.refill_amount.is_some() => "refill_amount",
                    "refill_period_seconds" => "period",
                    _ => "capacity",
                };
                Err(format!("{named} {reason}"))
            }
            Err(other) => Err(other.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for Spec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SpecVisitor;
        impl<'de> Visitor<'de> for SpecVisitor {
            type Value = Spec;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a capacity, or a mapping with capacity and optionally refill_amount, period, burst and soft")
            }
            fn visit_u64<E: de::Error>(self, capacity: u64) -> Result<Spec, E> {
                Spec::from_raw(RawSpec {
                    capacity,
                    refill_amount: None,
                    period: None,
                    burst: None,
                    soft: false,
                })
                .map_err(E::custom)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Spec, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format_args!(
                        "capacity must be positive, not {v}"
                    ))),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Spec, A::Error> {
                let raw = RawSpec::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Spec::from_raw(raw).map_err(de::Error::custom)
            }
        }
        deserializer.deserialize_any(SpecVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_level_with_defaults() {
        let desired = parse(
            "system:\n  on_unavailable: allow\n  limits:\n    rpm: {capacity: 1000}\nresources:\n  gpt-4:\n    rpm: 500\n    tpm: {capacity: 10000, burst: 15000}\nentities:\n  key-1:\n    _default_:\n      rpm: {capacity: 10, refill_amount: 5, period: 1m}\n",
        )
        .unwrap();
        assert_eq!(desired.on_unavailable, Some(OnUnavailable::Allow));
        assert_eq!(
            desired.limits[&ConfigScope::System],
            vec![Limit::per_minute("rpm", 1000)]
        );
        assert_eq!(
            desired.limits[&ConfigScope::Resource("gpt-4".into())],
            vec![
                Limit::per_minute("rpm", 500),
                Limit::per_minute("tpm", 10_000).with_burst(15_000)
            ]
        );
        assert_eq!(
            desired.limits[&ConfigScope::Entity {
                entity_id: "key-1".into(),
                resource: "_default_".into()
            }],
            vec![Limit::custom("rpm", 10, 5, 60)]
        );
    }

    #[test]
    fn errors_name_line_and_field() {
        for (text, needles) in [
            (
                "resources:\n  gpt-4:\n    tpm:\n      capacity: 0\n",
                vec!["resources.gpt-4.tpm", "capacity must be positive", "line 4"],
            ),
            (
                "system:\n  limits:\n    rpm: {capcity: 5}\n",
                vec!["unknown field `capcity`", "line 3"],
            ),
            (
                "resources:\n  gpt-4:\n    rpm: 1\n    rpm: 2\n",
                vec!["rpm appears twice", "line"],
            ),
            (
                "entities:\n  'bad id!':\n    _default_:\n      rpm: 1\n",
                vec!["entity_id", "line 2"],
            ),
            (
                "resources:\n  r:\n    'bad name': 1\n",
                vec!["limit", "line 3"],
            ),
            (
                "resources:\n  r:\n    rpm: {capacity: 5, period: 5w}\n",
                vec!["period \"5w\"", "line 3"],
            ),
            (
                "resources:\n  r:\n    rpm: -4\n",
                vec!["capacity must be positive", "line 3"],
            ),
            (
                "system:\n  on_unavailable: maybe\n",
                vec!["on_unavailable", "line 2"],
            ),
            ("limits: {}\n", vec!["unknown field `limits`"]),
        ] {
            let err = parse(text).unwrap_err();
            for needle in needles {
                assert!(err.contains(needle), "{text:?}: {err:?} lacks {needle:?}");
            }
        }
    }

    #[test]
    fn render_parses_back_to_the_same_state() {
        let text = "system:\n  on_unavailable: allow\n  limits:\n    rpm: 1000\nresources:\n  openai/gpt-4:\n    tpm: {capacity: 10000, burst: 15000}\n    rph: {capacity: 5, period: 1h}\n    tpd: {capacity: 1000000, period: 1d, soft: true}\nentities:\n  key-1:\n    _default_:\n      rpm: {capacity: 10, refill_amount: 1, period: 6s}\n";
        let desired = parse(text).unwrap();
        let rendered = serde_norway::to_string(&render(&desired)).unwrap();
        assert_eq!(parse(&rendered).unwrap(), desired, "{rendered}");
        assert!(rendered.contains("rpm: 1000"), "{rendered}");
        assert_eq!(render(&Desired::default()), serde_json::json!({}));
    }

    #[test]
    fn empty_file_means_nothing() {
        assert_eq!(parse("").unwrap(), Desired::default());
        assert_eq!(parse("resources:\n").unwrap(), Desired::default());
    }
}
