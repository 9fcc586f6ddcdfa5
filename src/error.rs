//! [`Error`], the crate's one error enum, and [`RateLimitExceeded`].

use std::time::Duration;

use serde::Serialize;

use crate::LimitStatus;

/// A boxed error from a backend, kept as the cause of [`Error::Unavailable`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The broad kind of an [`Error`], for callers that map errors to responses or metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCategory {
    /// A limit was exceeded, or a lease was used after it closed.
    RateLimit,
    /// The backend could not be reached or is not set up.
    Infrastructure,
    /// An entity does not exist, or exists already.
    Entity,
    /// The stored schema does not match this client.
    Version,
    /// The caller passed bad input.
    Validation,
}

/// Everything that can go wrong. Match on [`Error::category`] for the broad kind.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A limit was exceeded; nothing was consumed.
    #[error(transparent)]
    RateLimited(#[from] RateLimitExceeded),
    /// The backend failed (network, throttling, timeout). With [`crate::OnUnavailable::Block`]
    /// the acquire is rejected with this error.
    #[error("rate limiter backend unavailable: {message}")]
    Unavailable {
        /// What failed.
        message: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The backend refused a request for a reason that retrying will not fix (access
    /// denied, a malformed request). Unlike [`Error::Unavailable`] it never falls under
    /// [`crate::OnUnavailable::Allow`]: a permissions error must not open the gate.
    #[error("rate limiter backend refused the request: {message}")]
    Backend {
        /// What was refused, and why.
        message: String,
        /// The underlying error.
        #[source]
        source: Option<BoxError>,
    },
    /// No entity with this id.
    #[error("entity not found: {entity_id}")]
    EntityNotFound {
        /// The id looked up.
        entity_id: String,
    },
    /// An entity with this id exists already.
    #[error("entity already exists: {entity_id}")]
    EntityExists {
        /// The id that was taken.
        entity_id: String,
    },
    /// An entity id or parent id breaks the identifier rules (see [`crate::naming`]).
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidIdentifier {
        /// Which input was wrong ([`Field::EntityId`], [`Field::ParentId`]).
        field: Field,
        /// The value, truncated to 50 characters.
        value: String,
        /// What rule it broke.
        reason: String,
    },
    /// A limit name, resource, namespace or table name breaks the naming rules.
    #[error("invalid {field} {value:?}: {reason}")]
    InvalidName {
        /// Which input was wrong ([`Field::LimitName`], [`Field::Resource`], ...).
        field: Field,
        /// The value, truncated to 50 characters.
        value: String,
        /// What rule it broke.
        reason: String,
    },
    /// Any other bad input: numbers out of range, no limits configured, and so on.
    #[error("invalid {field} {value:?}: {reason}")]
    Validation {
        /// Which input was wrong.
        field: String,
        /// The value, as text.
        value: String,
        /// What rule it broke.
        reason: String,
    },
    /// The DynamoDB table or namespace is missing or not usable by this client.
    #[cfg(feature = "dynamodb")]
    #[cfg_attr(docsrs, doc(cfg(feature = "dynamodb")))]
    #[error(transparent)]
    Table(#[from] crate::repository::dynamodb::TableError),
    /// The resource is switched off for this entity (the Python library's `disabled` flag,
    /// on the resource or the entity): nothing is admitted until it is enabled again.
    #[error("resource {resource} is disabled for {entity_id}")]
    ResourceDisabled {
        /// The entity.
        entity_id: String,
        /// The resource.
        resource: String,
    },
    /// The stored configuration uses a feature this crate does not enforce yet (the
    /// Python library's schedules and `reset_after` quotas):
    /// refused rather than enforced with other numbers.
    #[error("unsupported {feature} on {entity_id}/{resource}: this crate does not enforce it yet, so it refuses the acquire rather than enforce other numbers")]
    Unsupported {
        /// The feature, e.g. `schedules`.
        feature: String,
        /// The entity.
        entity_id: String,
        /// The resource.
        resource: String,
    },
    /// The lease was already committed or rolled back.
    #[error("lease is no longer active (already committed or rolled back)")]
    LeaseClosed,
    /// The backend does not keep what the call asks for (usage snapshots in memory).
    #[error("{operation} is not supported by the {backend} backend")]
    NotSupported {
        /// What was asked, e.g. `usage snapshots`.
        operation: String,
        /// The backend, e.g. `in-memory`.
        backend: String,
    },
}

impl Error {
    /// The broad kind of this error.
    pub fn category(&self) -> ErrorCategory {
        match self {
            Error::RateLimited(_) | Error::LeaseClosed => ErrorCategory::RateLimit,
            Error::Unavailable { .. } | Error::Backend { .. } | Error::NotSupported { .. } => {
                ErrorCategory::Infrastructure
            }
            #[cfg(feature = "dynamodb")]
            Error::Table(e) => e.category(),
            Error::EntityNotFound { .. } | Error::EntityExists { .. } => ErrorCategory::Entity,
            Error::ResourceDisabled { .. } => ErrorCategory::RateLimit,
            Error::Unsupported { .. } => ErrorCategory::Version,
            Error::InvalidIdentifier { .. }
            | Error::InvalidName { .. }
            | Error::Validation { .. } => ErrorCategory::Validation,
        }
    }

    /// What rule the input broke, for the validation errors (without the value, which may
    /// be a secret).
    pub fn reason(&self) -> Option<&str> {
        match self {
            Error::InvalidIdentifier { reason, .. }
            | Error::InvalidName { reason, .. }
            | Error::Validation { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// Builds an [`Error::Validation`].
    pub fn validation(
        field: impl Into<String>,
        value: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Error::Validation {
            field: field.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }

    /// Builds an [`Error::Unavailable`] with a cause.
    pub fn unavailable(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Unavailable {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// The field at fault, for validation errors (`entity_id`, `limits.rpm.capacity`, ...).
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::InvalidIdentifier { field, .. } | Error::InvalidName { field, .. } => {
                Some(field.as_str())
            }
            Error::Validation { field, .. } => Some(field),
            _ => None,
        }
    }

    /// Whether the error is about the request's entity id or resource: the client's input
    /// (an HTTP layer answers 400), not the server's configuration.
    pub fn is_invalid_key(&self) -> bool {
        matches!(
            self,
            Error::InvalidIdentifier {
                field: Field::EntityId,
                ..
            } | Error::InvalidName {
                field: Field::Resource,
                ..
            }
        )
    }
}

/// The input an [`Error::InvalidIdentifier`] or [`Error::InvalidName`] is about.
///
/// Compares equal to its name (`field == "entity_id"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Field {
    /// An entity id.
    EntityId,
    /// A parent entity id.
    ParentId,
    /// A resource.
    Resource,
    /// A limit name.
    LimitName,
    /// A namespace name.
    Namespace,
    /// A DynamoDB table name.
    Table,
}

impl Field {
    /// The field's name as errors and responses show it: `entity_id`, `parent_id`,
    /// `resource`, `limit_name`, `namespace`, `table`.
    pub fn as_str(self) -> &'static str {
        match self {
            Field::EntityId => "entity_id",
            Field::ParentId => "parent_id",
            Field::Resource => "resource",
            Field::LimitName => "limit_name",
            Field::Namespace => "namespace",
            Field::Table => "table",
        }
    }
}

impl std::fmt::Display for Field {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<str> for Field {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Field {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A rejected acquire: every limit checked, and which ones were exceeded.
///
/// Nothing was consumed. The wait is that of the *primary violation* (the longest wait);
/// a request larger than a limit's capacity can never succeed, and is reported as such
/// ([`RateLimitExceeded::is_satisfiable`] is false) rather than with a wait that never
/// comes true.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitExceeded {
    statuses: Vec<LimitStatus>,
}

impl RateLimitExceeded {
    /// Builds the rejection from every status checked; `None` unless at least one is exceeded.
    pub fn new(statuses: Vec<LimitStatus>) -> Option<Self> {
        statuses
            .iter()
            .any(|s| s.exceeded)
            .then_some(RateLimitExceeded { statuses })
    }

    /// Every limit checked, child first, then the parent's in a cascade.
    pub fn statuses(&self) -> &[LimitStatus] {
        &self.statuses
    }

    /// The limits that were exceeded.
    pub fn violations(&self) -> impl Iterator<Item = &LimitStatus> {
        self.statuses.iter().filter(|s| s.exceeded)
    }

    /// The limits that had enough tokens.
    pub fn passed(&self) -> impl Iterator<Item = &LimitStatus> {
        self.statuses.iter().filter(|s| !s.exceeded)
    }

    /// The violation with the longest wait (an unsatisfiable one counts as longest; the
    /// first on ties).
    pub fn primary_violation(&self) -> &LimitStatus {
        let mut best: Option<&LimitStatus> = None;
        for v in self.violations() {
            let wait = v.retry_after_ms.unwrap_or(u64::MAX);
            if best.is_none_or(|b| wait > b.retry_after_ms.unwrap_or(u64::MAX)) {
                best = Some(v);
            }
        }
        best.expect("RateLimitExceeded always holds a violation")
    }

    /// Whether waiting can ever help: false when a request asks more than a capacity.
    pub fn is_satisfiable(&self) -> bool {
        self.violations().all(|v| v.retry_after_ms.is_some())
    }

    /// How long to wait before the same request can succeed; [`Duration::MAX`] when it
    /// never can (see [`Self::is_satisfiable`]).
    pub fn retry_after(&self) -> Duration {
        self.primary_violation()
            .retry_after_ms
            .map_or(Duration::MAX, Duration::from_millis)
    }

    /// [`Self::retry_after`] in seconds; infinite when the request can never succeed.
    pub fn retry_after_seconds(&self) -> f64 {
        self.primary_violation()
            .retry_after_ms
            .map_or(f64::INFINITY, |ms| ms as f64 / 1000.0)
    }

    /// The `Retry-After` header value: whole seconds, rounded up, at least 1. `None` when
    /// the request can never succeed, so no retry time should be advertised.
    pub fn retry_after_header(&self) -> Option<String> {
        self.primary_violation()
            .retry_after_ms
            .map(|ms| ms.div_ceil(1000).max(1).to_string())
    }

    /// The JSON body of a 429 response.
    ///
    /// Keys: `error` (`"rate_limit_exceeded"`), `message`, `retry_after_seconds`,
    /// `retry_after_ms` (both `null` when the request can never succeed), and `limits`, one
    /// object per status with `entity_id`, `resource`, `limit_name`, `capacity`,
    /// `refill_amount`, `refill_period_seconds`, `available`, `requested`, `exceeded` and
    /// `retry_after_seconds`.
    pub fn as_json(&self) -> serde_json::Value {
        #[derive(Serialize)]
        struct Body<'a> {
            error: &'static str,
            message: String,
            retry_after_seconds: Option<f64>,
            retry_after_ms: Option<u64>,
            limits: Vec<StatusJson<'a>>,
        }
        #[derive(Serialize)]
        struct StatusJson<'a> {
            entity_id: &'a str,
            resource: &'a str,
            limit_name: &'a str,
            capacity: u64,
            refill_amount: u64,
            refill_period_seconds: u64,
            available: i64,
            requested: u64,
            exceeded: bool,
            retry_after_seconds: Option<f64>,
        }
        let primary = self.primary_violation();
        let body = Body {
            error: "rate_limit_exceeded",
            message: self.to_string(),
            retry_after_seconds: primary.retry_after_seconds(),
            retry_after_ms: primary.retry_after_ms,
            limits: self
                .statuses
                .iter()
                .map(|s| StatusJson {
                    entity_id: &s.entity_id,
                    resource: &s.resource,
                    limit_name: &s.limit.name,
                    capacity: s.limit.capacity,
                    refill_amount: s.limit.refill_amount,
                    refill_period_seconds: s.limit.refill_period_seconds,
                    available: s.available,
                    requested: s.requested,
                    exceeded: s.exceeded,
                    retry_after_seconds: s.retry_after_seconds(),
                })
                .collect(),
        };
        serde_json::to_value(body).unwrap_or_default()
    }
}

impl std::fmt::Display for RateLimitExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let primary = self.primary_violation();
        let names: Vec<&str> = self.violations().map(|s| s.limit.name.as_str()).collect();
        write!(
            f,
            "Rate limit exceeded for {}/{}: [{}]. ",
            primary.entity_id,
            primary.resource,
            names.join(", ")
        )?;
        match primary.retry_after_ms {
            Some(ms) => write!(f, "Retry after {:.1}s", ms as f64 / 1000.0),
            None => write!(
                f,
                "The request asks more than the limit's capacity and can never succeed"
            ),
        }
    }
}

impl std::error::Error for RateLimitExceeded {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Limit;

    fn status(name: &str, exceeded: bool, retry: Option<u64>) -> LimitStatus {
        LimitStatus {
            entity_id: "u1".into(),
            resource: "api".into(),
            limit: Limit::per_minute(name, 10),
            available: 0,
            requested: 1,
            exceeded,
            retry_after_ms: retry,
        }
    }

    #[test]
    fn needs_a_violation() {
        assert!(RateLimitExceeded::new(vec![status("rpm", false, Some(0))]).is_none());
    }

    #[test]
    fn primary_is_longest_wait_and_header_rounds_up() {
        let e = RateLimitExceeded::new(vec![
            status("rpm", true, Some(1_001)),
            status("tpm", true, Some(6_000)),
            status("rph", false, Some(0)),
        ])
        .unwrap();
        assert_eq!(e.primary_violation().limit.name, "tpm");
        assert_eq!(e.retry_after(), Duration::from_millis(6_000));
        assert_eq!(e.retry_after_header().as_deref(), Some("6"));
        assert_eq!(e.violations().count(), 2);
        assert_eq!(e.passed().count(), 1);
        let one = RateLimitExceeded::new(vec![status("rpm", true, Some(1_001))]).unwrap();
        assert_eq!(one.retry_after_header().as_deref(), Some("2"));
        let zero = RateLimitExceeded::new(vec![status("rpm", true, Some(0))]).unwrap();
        assert_eq!(zero.retry_after_header().as_deref(), Some("1"));
    }

    #[test]
    fn json_shape() {
        let e = RateLimitExceeded::new(vec![status("rpm", true, Some(1_001))]).unwrap();
        let j = e.as_json();
        assert_eq!(j["error"], "rate_limit_exceeded");
        assert_eq!(j["retry_after_ms"], 1001);
        assert_eq!(j["retry_after_seconds"], 1.001);
        assert_eq!(j["limits"][0]["limit_name"], "rpm");
        assert_eq!(j["limits"][0]["refill_period_seconds"], 60);
        assert!(j["message"].as_str().unwrap().contains("u1/api: [rpm]"));
    }

    #[test]
    fn unsatisfiable_is_reported_as_such() {
        let e = RateLimitExceeded::new(vec![
            status("rpm", true, Some(5_000)),
            status("tpm", true, None),
        ])
        .unwrap();
        assert!(!e.is_satisfiable());
        assert_eq!(e.primary_violation().limit.name, "tpm");
        assert_eq!(e.retry_after(), Duration::MAX);
        assert_eq!(e.retry_after_header(), None);
        assert!(e.as_json()["retry_after_ms"].is_null());
        assert!(e.to_string().contains("never succeed"));
    }

    #[test]
    fn categories() {
        assert_eq!(Error::LeaseClosed.category(), ErrorCategory::RateLimit);
        assert_eq!(
            Error::validation("f", "v", "r").category(),
            ErrorCategory::Validation
        );
    }
}
