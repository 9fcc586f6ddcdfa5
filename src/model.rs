//! Plain data types shared by the limiter, the backends and the middleware.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Limit;

/// The outcome of checking one limit of one entity during an acquire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LimitStatus {
    /// The entity whose bucket was checked (the parent's id for a cascaded check).
    pub entity_id: String,
    /// The resource.
    pub resource: String,
    /// The limit, as resolved for this entity.
    pub limit: Limit,
    /// Whole tokens available before consuming (negative in debt).
    pub available: i64,
    /// Tokens the request asked for.
    pub requested: u64,
    /// Whether the request exceeded this limit.
    pub exceeded: bool,
    /// Milliseconds until the request fits this limit: `Some(0)` when it fits now, `None`
    /// when it never can (it asks more than the capacity).
    pub retry_after_ms: Option<u64>,
}

impl LimitStatus {
    /// [`Self::retry_after_ms`] as a `Duration`.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after_ms.map(Duration::from_millis)
    }

    /// [`Self::retry_after_ms`] in seconds.
    pub fn retry_after_seconds(&self) -> Option<f64> {
        self.retry_after_ms.map(|ms| ms as f64 / 1000.0)
    }

    /// Tokens missing: `max(0, requested - available)`.
    pub fn deficit(&self) -> u64 {
        let d = i128::from(self.requested) - i128::from(self.available);
        u64::try_from(d.max(0)).unwrap_or(u64::MAX)
    }

    /// Whole tokens left once this request's amount is taken (never negative).
    pub fn remaining(&self) -> u64 {
        let left = i128::from(self.available)
            - if self.exceeded {
                0
            } else {
                i128::from(self.requested)
            };
        u64::try_from(left.max(0)).unwrap_or(u64::MAX)
    }
}

/// An entity (an API key, a user, a project) that owns buckets.
///
/// An entity with a `parent_id` and `cascade` set charges its parent's buckets too, all or
/// nothing. Entities are optional: an acquire for an id that was never created works, with
/// no parent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entity {
    /// The id (see [`crate::naming`]).
    pub id: String,
    /// A display name; defaults to the id.
    pub name: String,
    /// The parent entity's id, if any (two levels: parent and child).
    pub parent_id: Option<String>,
    /// Whether acquires on this entity also consume from the parent.
    pub cascade: bool,
    /// Free-form string metadata.
    pub metadata: BTreeMap<String, String>,
    /// Creation time, epoch milliseconds.
    pub created_at_ms: i64,
}

impl Entity {
    /// Whether this is a top-level entity (no parent).
    pub fn is_parent(&self) -> bool {
        self.parent_id.is_none()
    }
}

/// Which level of the config hierarchy supplied an acquire's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ConfigSource {
    /// Limits stored for this entity and this resource.
    Entity,
    /// Limits stored for this entity under `_default_` (every resource).
    EntityDefault,
    /// Limits stored for the resource.
    Resource,
    /// Limits stored at system level.
    System,
    /// Limits the caller passed with `.limits(..)`, which override storage.
    Override,
    /// Limits the caller passed with `.fallback_limits(..)`, used because nothing is stored.
    Fallback,
}

/// What an acquire does when the backend cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnUnavailable {
    /// Admit the request without writing anything (logged at `warn`).
    Allow,
    /// Reject with [`crate::Error::Unavailable`] (the HTTP layer answers 503).
    #[default]
    Block,
}

impl OnUnavailable {
    /// `"allow"` or `"block"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            OnUnavailable::Allow => "allow",
            OnUnavailable::Block => "block",
        }
    }
}

impl std::str::FromStr for OnUnavailable {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allow" => Ok(OnUnavailable::Allow),
            "block" => Ok(OnUnavailable::Block),
            other => Err(crate::Error::validation(
                "on_unavailable",
                other,
                "must be \"allow\" or \"block\"",
            )),
        }
    }
}

/// Counters of the resolved-config cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct CacheStats {
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Lookups that went to the backend.
    pub misses: u64,
    /// Entries held now (expired ones included until they are next looked up or swept).
    pub size: u64,
    /// How long an entry lives; zero means caching is off.
    pub ttl: Duration,
}

/// What a backend can do beyond the core [`crate::Repository`] operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct BackendCapabilities {
    /// Records an audit event for every entity and limits change.
    pub supports_audit_logging: bool,
    /// Keeps usage snapshots per time window.
    pub supports_usage_snapshots: bool,
    /// Can create and delete its own storage (tables).
    pub supports_infrastructure_management: bool,
    /// Publishes a change stream.
    pub supports_change_streams: bool,
    /// Reads several records in one call.
    pub supports_batch_operations: bool,
    /// State is shared between processes (false for the in-memory backend).
    pub shared_across_processes: bool,
}
