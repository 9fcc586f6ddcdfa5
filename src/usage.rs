//! Usage and capacity: what entities consumed per window (the usage snapshots the
//! aggregator writes), and how much of a resource's capacity is in use now.
//!
//! Windows and their keys are written as the Python library writes them: the UTC hour,
//! day or month a moment falls in (`2026-11-30T18:00:00Z`, `2026-11-30T00:00:00Z`,
//! `2026-11-01T00:00:00Z`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::Serialize;

/// How long a usage snapshot counts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Window {
    /// One UTC hour.
    Hourly,
    /// One UTC day.
    Daily,
    /// One UTC calendar month.
    Monthly,
}

impl Window {
    /// Every window, shortest first.
    pub const ALL: [Window; 3] = [Window::Hourly, Window::Daily, Window::Monthly];

    /// The name stored in a snapshot's `window` attribute.
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Hourly => "hourly",
            Window::Daily => "daily",
            Window::Monthly => "monthly",
        }
    }

    /// The start of the window holding `ms` (epoch milliseconds), as stored in a
    /// snapshot's `window_start`.
    pub fn key(self, ms: i64) -> String {
        let (year, month, day, hour) = utc(ms);
        match self {
            Window::Hourly => format!("{year:04}-{month:02}-{day:02}T{hour:02}:00:00Z"),
            Window::Daily => format!("{year:04}-{month:02}-{day:02}T00:00:00Z"),
            Window::Monthly => format!("{year:04}-{month:02}-01T00:00:00Z"),
        }
    }

    /// The last second of the window starting at `start` (a [`Self::key`]), as the Python
    /// library reports it (`…T18:59:59Z`); `start` itself if it is not a window start.
    pub fn end(self, start: &str) -> String {
        let parsed = (|| {
            let year: i64 = start.get(0..4)?.parse().ok()?;
            let month: u32 = start.get(5..7)?.parse().ok()?;
            let day: u32 = start.get(8..10)?.parse().ok()?;
            let hour: u32 = start.get(11..13)?.parse().ok()?;
            Some((year, month, day, hour))
        })();
        let Some((year, month, day, hour)) = parsed else {
            return start.to_string();
        };
        match self {
            Window::Hourly => format!("{year:04}-{month:02}-{day:02}T{hour:02}:59:59Z"),
            Window::Daily => format!("{year:04}-{month:02}-{day:02}T23:59:59Z"),
            Window::Monthly => {
                let last = days_in_month(year, month);
                format!("{year:04}-{month:02}-{last:02}T23:59:59Z")
            }
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Window {
    type Err = crate::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Window::ALL
            .into_iter()
            .find(|w| w.as_str() == s)
            .ok_or_else(|| crate::Error::validation("window", s, "one of hourly, daily, monthly"))
    }
}

/// The UTC year, month, day and hour of epoch milliseconds `ms` (the civil calendar from
/// days since 1970, Howard Hinnant's algorithm).
fn utc(ms: i64) -> (i64, u32, u32, u32) {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let hour = (secs.rem_euclid(86_400) / 3_600) as u32;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day, hour)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// The attributes of a usage snapshot item that are not counters (as the Python
/// library's reader lists them): a limit of one of these names cannot be counted.
#[cfg(feature = "dynamodb")]
pub(crate) const SNAPSHOT_FIELDS: [&str; 10] = [
    "PK",
    "SK",
    "entity_id",
    "resource",
    "window",
    "window_start",
    "total_events",
    "GSI2PK",
    "GSI2SK",
    "ttl",
];

/// Whose usage a query reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UsageScope {
    /// One entity, on one resource or all of them.
    Entity {
        /// The entity.
        entity_id: String,
        /// The resource, or every resource.
        resource: Option<String>,
    },
    /// Every entity on one resource.
    Resource(String),
}

/// A query of usage snapshots: a scope, then optionally a window, a time range, a page
/// size and where the last page ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    /// Whose usage.
    pub scope: UsageScope,
    /// Only snapshots of this window.
    pub window: Option<Window>,
    /// Only windows starting at or after this time (epoch milliseconds).
    pub from_ms: Option<i64>,
    /// Only windows starting at or before this time (epoch milliseconds).
    pub to_ms: Option<i64>,
    /// Snapshots per page (full pages: only the last one is shorter).
    pub page_size: usize,
    /// Where the previous page ended ([`UsagePage::next_page_token`]).
    pub page_token: Option<String>,
}

impl UsageQuery {
    /// An entity's usage, on every resource.
    pub fn entity(entity_id: impl Into<String>) -> Self {
        Self::of(UsageScope::Entity {
            entity_id: entity_id.into(),
            resource: None,
        })
    }

    /// Every entity's usage of a resource.
    pub fn resource(resource: impl Into<String>) -> Self {
        Self::of(UsageScope::Resource(resource.into()))
    }

    fn of(scope: UsageScope) -> Self {
        UsageQuery {
            scope,
            window: None,
            from_ms: None,
            to_ms: None,
            page_size: 100,
            page_token: None,
        }
    }

    /// Narrows an entity query to one resource.
    pub fn on(mut self, resource: impl Into<String>) -> Self {
        if let UsageScope::Entity { resource: r, .. } = &mut self.scope {
            *r = Some(resource.into());
        }
        self
    }

    /// Only snapshots of `window`.
    pub fn window(mut self, window: Window) -> Self {
        self.window = Some(window);
        self
    }

    /// Only windows starting within `from_ms..=to_ms` (epoch milliseconds).
    pub fn between(mut self, from_ms: Option<i64>, to_ms: Option<i64>) -> Self {
        self.from_ms = from_ms;
        self.to_ms = to_ms;
        self
    }

    /// Snapshots per page (at least 1).
    pub fn page_size(mut self, size: usize) -> Self {
        self.page_size = size.max(1);
        self
    }

    /// Continues after the page that returned `token`.
    pub fn after(mut self, token: impl Into<String>) -> Self {
        self.page_token = Some(token.into());
        self
    }
}

/// What an entity consumed of a resource over one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageSnapshot {
    /// The entity.
    pub entity_id: String,
    /// The resource.
    pub resource: String,
    /// The window.
    pub window: Window,
    /// When it starts (ISO, UTC).
    pub window_start: String,
    /// Its last second (ISO, UTC).
    pub window_end: String,
    /// Whole tokens consumed per limit (net of refunds).
    pub counters: BTreeMap<String, i64>,
    /// Per soft limit: how many consumptions left it in debt.
    pub overdrawn: BTreeMap<String, i64>,
    /// Consumptions counted (one per limit per change of the bucket).
    pub total_events: i64,
}

/// One page of snapshots, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsagePage {
    /// The snapshots.
    pub snapshots: Vec<UsageSnapshot>,
    /// Where the next page starts, if there may be one ([`UsageQuery::after`]).
    pub next_page_token: Option<String>,
}

/// Usage over many snapshots.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageSummary {
    /// Snapshots read.
    pub snapshots: usize,
    /// Whole tokens per limit, summed.
    pub total: BTreeMap<String, i64>,
    /// Per limit: the total over the snapshots that hold the limit.
    pub average: BTreeMap<String, f64>,
    /// The earliest window start read.
    pub first_window_start: Option<String>,
    /// The latest window start read.
    pub last_window_start: Option<String>,
}

impl UsageSummary {
    /// The summary of `snapshots`.
    pub fn of<'a>(snapshots: impl IntoIterator<Item = &'a UsageSnapshot>) -> Self {
        let mut summary = UsageSummary {
            snapshots: 0,
            total: BTreeMap::new(),
            average: BTreeMap::new(),
            first_window_start: None,
            last_window_start: None,
        };
        let mut holding: BTreeMap<String, usize> = BTreeMap::new();
        for snapshot in snapshots {
            summary.snapshots += 1;
            for (limit, tokens) in &snapshot.counters {
                *summary.total.entry(limit.clone()).or_default() += tokens;
                *holding.entry(limit.clone()).or_default() += 1;
            }
            let start = &snapshot.window_start;
            if summary
                .first_window_start
                .as_ref()
                .is_none_or(|f| start < f)
            {
                summary.first_window_start = Some(start.clone());
            }
            if summary.last_window_start.as_ref().is_none_or(|l| start > l) {
                summary.last_window_start = Some(start.clone());
            }
        }
        summary.average = summary
            .total
            .iter()
            .map(|(limit, total)| (limit.clone(), *total as f64 / holding[limit] as f64))
            .collect();
        summary
    }
}

/// One entity's share of a limit now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EntityCapacity {
    /// The entity.
    pub entity_id: String,
    /// Its parent, if it has one.
    pub parent_id: Option<String>,
    /// Whole tokens its bucket holds when full (its shards' shares together).
    pub capacity: i64,
    /// Whole tokens available now (refilled to now, at most the capacity).
    pub available: i64,
    /// The share of the capacity in use, in percent.
    pub utilisation: f64,
}

impl EntityCapacity {
    /// An entity's capacity from its bucket's state, refilled to `now_ms`.
    pub fn of(
        entity_id: &str,
        parent_id: Option<String>,
        state: &crate::bucket::BucketState,
        now_ms: i64,
    ) -> Self {
        let refilled = crate::bucket::refill(state, now_ms);
        let capacity = refilled.capacity_milli.div_euclid(1000);
        let available = refilled.tokens_milli.div_euclid(1000).min(capacity);
        EntityCapacity {
            entity_id: entity_id.to_string(),
            parent_id,
            capacity,
            available,
            utilisation: utilisation(capacity, available),
        }
    }
}

/// A limit of a resource across the entities with a bucket for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResourceCapacity {
    /// The resource.
    pub resource: String,
    /// The limit.
    pub limit: String,
    /// Whole tokens, summed over the entities.
    pub capacity: i64,
    /// Whole tokens available now, summed.
    pub available: i64,
    /// The share of the capacity in use, in percent.
    pub utilisation: f64,
    /// Per entity, busiest first.
    pub entities: Vec<EntityCapacity>,
}

impl ResourceCapacity {
    /// The totals over `entities`.
    pub fn of(resource: &str, limit: &str, mut entities: Vec<EntityCapacity>) -> Self {
        entities.sort_by(|a, b| {
            b.utilisation
                .total_cmp(&a.utilisation)
                .then_with(|| a.entity_id.cmp(&b.entity_id))
        });
        let capacity = entities.iter().map(|e| e.capacity).sum();
        let available = entities.iter().map(|e| e.available).sum();
        ResourceCapacity {
            resource: resource.to_string(),
            limit: limit.to_string(),
            capacity,
            available,
            utilisation: utilisation(capacity, available),
            entities,
        }
    }
}

fn utilisation(capacity: i64, available: i64) -> f64 {
    if capacity <= 0 {
        return 0.0;
    }
    (capacity - available) as f64 / capacity as f64 * 100.0
}

/// One entity's buckets for a resource, as a backend lists them for capacity queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceBucket {
    /// The entity.
    pub entity_id: String,
    /// Its parent, if it has one.
    pub parent_id: Option<String>,
    /// Per limit (a sharded bucket's shards together).
    pub states: BTreeMap<String, crate::bucket::BucketState>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_utc_start_of_the_window_as_python_writes_them() {
        // 2026-11-30T18:36:38.500Z
        let ms = 1_796_063_798_500;
        assert_eq!(Window::Hourly.key(ms), "2026-11-30T18:00:00Z");
        assert_eq!(Window::Daily.key(ms), "2026-11-30T00:00:00Z");
        assert_eq!(Window::Monthly.key(ms), "2026-11-01T00:00:00Z");
        assert_eq!(Window::Hourly.key(0), "1970-01-01T00:00:00Z");
        // A leap day, and the last hour of a year.
        assert_eq!(
            Window::Hourly.key(1_709_209_800_000),
            "2024-02-29T12:00:00Z"
        );
        assert_eq!(
            Window::Hourly.key(1_735_689_599_000),
            "2024-12-31T23:00:00Z"
        );
        assert_eq!("daily".parse::<Window>().unwrap(), Window::Daily);
        assert!("weekly".parse::<Window>().is_err());
    }

    #[test]
    fn window_ends_are_their_last_second() {
        assert_eq!(
            Window::Hourly.end("2026-11-30T18:00:00Z"),
            "2026-11-30T18:59:59Z"
        );
        assert_eq!(
            Window::Monthly.end("2024-02-01T00:00:00Z"),
            "2024-02-29T23:59:59Z"
        );
        assert_eq!(Window::Daily.end("junk"), "junk");
    }

    #[test]
    fn a_summary_averages_over_the_snapshots_holding_each_limit() {
        let snap = |start: &str, counters: &[(&str, i64)]| UsageSnapshot {
            entity_id: "k".into(),
            resource: "api".into(),
            window: Window::Hourly,
            window_start: start.into(),
            window_end: Window::Hourly.end(start),
            counters: counters.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            overdrawn: BTreeMap::new(),
            total_events: 1,
        };
        let snaps = [
            snap("2026-11-30T10:00:00Z", &[("rpm", 4), ("tpm", 100)]),
            snap("2026-11-30T09:00:00Z", &[("rpm", 2)]),
        ];
        let summary = UsageSummary::of(&snaps);
        assert_eq!(summary.snapshots, 2);
        assert_eq!(summary.total["rpm"], 6);
        assert_eq!(summary.average["rpm"], 3.0);
        assert_eq!(summary.average["tpm"], 100.0);
        assert_eq!(
            summary.first_window_start.as_deref(),
            Some("2026-11-30T09:00:00Z")
        );
    }

    #[test]
    fn capacity_is_summed_and_utilisation_is_the_share_in_use() {
        let state = |tokens: i64| {
            let mut s =
                crate::bucket::BucketState::from_limit(&crate::Limit::per_hour("rph", 100), 0);
            s.tokens_milli = tokens * 1000;
            s
        };
        let a = EntityCapacity::of("a", None, &state(25), 0);
        assert_eq!((a.capacity, a.available, a.utilisation), (100, 25, 75.0));
        let b = EntityCapacity::of("b", Some("a".into()), &state(100), 0);
        let total = ResourceCapacity::of("api", "rph", vec![b, a]);
        assert_eq!((total.capacity, total.available), (200, 125));
        assert_eq!(total.utilisation, 37.5);
        assert_eq!(total.entities[0].entity_id, "a", "busiest first");
    }
}
