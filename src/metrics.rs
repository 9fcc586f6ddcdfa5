//! Operational metrics through the [`metrics`](https://docs.rs/metrics) facade (feature
//! `metrics`): the application installs a recorder (an exporter such as
//! `metrics-exporter-prometheus`, before it builds the limiter) and scrapes these.
//!
//! | name | kind | labels | what |
//! |---|---|---|---|
//! | `zae_limiter_requests_total` | counter | `resource`, `outcome` | acquires by outcome: `admitted`, `rejected`, `disabled`, `unavailable` (the backend failed; admitted or not by the outage policy) |
//! | `zae_limiter_limit_checks_total` | counter | `resource`, `limit`, `outcome` | per limit of each decided acquire: `passed` or `exceeded` |
//! | `zae_limiter_lease_settle_retries_total` | counter | `resource` | background commits and rollbacks sent again after an outage |
//! | `zae_limiter_lease_settle_failures_total` | counter | `resource` | commits and rollbacks that failed for good |
//! | `zae_limiter_reservation_decisions_total` | counter | `resource`, `source` | with reservations on, admits from a node's slice (`slice`) and backend acquires for hot keys (`table`) |
//! | `zae_limiter_reservation_give_backs_total` | counter | `resource` | slices (or their given-up tokens) given back |
//! | `zae_limiter_dynamodb_calls_total` | counter | `operation`, `outcome` | DynamoDB calls (`ok` or `error`, a failed condition included) |
//! | `zae_limiter_dynamodb_call_seconds` | histogram | `operation` | their latency, SDK retries included |
//!
//! Entity ids are never labels (unbounded cardinality); resources and limit names are
//! configuration, so bounded. The handles are registered once per resource and limit and
//! kept, so the hot path pays an increment, not a registry lookup: a recorder installed
//! after the limiter served its first request is not seen by that limiter.
//!
//! Without the feature every function here compiles to nothing.

#[cfg(feature = "metrics")]
pub(crate) use enabled::*;

#[cfg(not(feature = "metrics"))]
pub(crate) use disabled::*;

/// How an acquire ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) enum Outcome {
    Admitted,
    Rejected,
    Disabled,
    Unavailable,
}

#[cfg(feature = "metrics")]
mod enabled {
    use std::sync::Arc;

    use ::metrics::{counter, Counter};
    use dashmap::DashMap;
    use parking_lot::RwLock;

    use super::Outcome;
    use crate::repository::{ItemRequest, LimitCheck};

    /// A limit's name and its `passed` and `exceeded` counters.
    type LimitHandles = (Box<str>, Counter, Counter);

    /// The handles of one resource, registered on first use.
    struct ResourceHandles {
        admitted: Counter,
        rejected: Counter,
        disabled: Counter,
        unavailable: Counter,
        settle_retries: Counter,
        settle_failures: Counter,
        from_slices: Counter,
        from_table: Counter,
        give_backs: Counter,
        /// The first limit counted, read without a lock (most resources have one or two).
        first_limit: std::sync::OnceLock<LimitHandles>,
        /// Per limit name: passed, exceeded.
        limits: RwLock<Vec<LimitHandles>>,
        resource: Arc<str>,
    }

    impl ResourceHandles {
        fn new(resource: &str) -> Self {
            let r: Arc<str> = resource.into();
            let request = |outcome: &'static str| counter!("zae_limiter_requests_total", "resource" => r.to_string(), "outcome" => outcome);
            ResourceHandles {
                admitted: request("admitted"),
                rejected: request("rejected"),
                disabled: request("disabled"),
                unavailable: request("unavailable"),
                settle_retries: counter!("zae_limiter_lease_settle_retries_total", "resource" => r.to_string()),
                settle_failures: counter!("zae_limiter_lease_settle_failures_total", "resource" => r.to_string()),
                from_slices: counter!("zae_limiter_reservation_decisions_total", "resource" => r.to_string(), "source" => "slice"),
                from_table: counter!("zae_limiter_reservation_decisions_total", "resource" => r.to_string(), "source" => "table"),
                give_backs: counter!("zae_limiter_reservation_give_backs_total", "resource" => r.to_string()),
                first_limit: std::sync::OnceLock::new(),
                limits: RwLock::new(Vec::new()),
                resource: r,
            }
        }

        /// Counts one limit's check, registering its handles the first time.
        fn check(&self, limit: &str, exceeded: bool) {
            let pick = |(_, passed, over): &LimitHandles| {
                if exceeded {
                    over.increment(1)
                } else {
                    passed.increment(1)
                }
            };
            if let Some(first) = self.first_limit.get().filter(|(n, _, _)| &**n == limit) {
                pick(first);
                return;
            }
            if let Some(found) = self.limits.read().iter().find(|(n, _, _)| &**n == limit) {
                pick(found);
                return;
            }
            let mut limits = self.limits.write();
            if !limits.iter().any(|(n, _, _)| &**n == limit) {
                let handle = |outcome: &'static str| {
                    counter!(
                        "zae_limiter_limit_checks_total",
                        "resource" => self.resource.to_string(),
                        "limit" => limit.to_string(),
                        "outcome" => outcome
                    )
                };
                let handles: LimitHandles = (limit.into(), handle("passed"), handle("exceeded"));
                // The first limit is also kept apart, for the lock-free read above.
                let _ = self.first_limit.set(handles.clone());
                limits.push(handles);
            }
            if let Some(found) = limits.iter().find(|(n, _, _)| &**n == limit) {
                pick(found);
            }
        }
    }

    /// A limiter's metric handles.
    #[derive(Default)]
    pub(crate) struct Metrics {
        /// The first resource counted, read without a lock or a hash: most limiters
        /// serve one or a few resources, and this is the hot path's lookup.
        first: std::sync::OnceLock<Arc<ResourceHandles>>,
        resources: DashMap<String, Arc<ResourceHandles>, foldhash::fast::RandomState>,
    }

    impl std::fmt::Debug for Metrics {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Metrics")
                .field("resources", &self.resources.len())
                .finish()
        }
    }

    impl Metrics {
        pub(crate) fn new() -> Self {
            Self::default()
        }

        fn handles(&self, resource: &str) -> Arc<ResourceHandles> {
            self.with_handles(resource, Arc::clone)
        }

        /// Runs `f` on the handles of `resource` (registered the first time) without
        /// taking a reference of its own: the hot path's counts move no reference count.
        fn with_handles<T>(&self, resource: &str, f: impl FnOnce(&Arc<ResourceHandles>) -> T) -> T {
            if let Some(first) = self.first.get().filter(|h| *h.resource == *resource) {
                return f(first);
            }
            if let Some(found) = self.resources.get(resource) {
                return f(&found);
            }
            let handles = Arc::clone(
                &self
                    .resources
                    .entry(resource.to_string())
                    .or_insert_with(|| Arc::new(ResourceHandles::new(resource))),
            );
            // The same handles: counts through either land in the same series.
            let _ = self.first.set(Arc::clone(&handles));
            f(&handles)
        }

        /// One decided acquire: its outcome and, when the backend decided it, each
        /// limit's check (`checks` in the items' limit order).
        pub(crate) fn decided(
            &self,
            resource: &str,
            outcome: Outcome,
            items: &[ItemRequest],
            checks: &[LimitCheck],
        ) {
            self.with_handles(resource, |handles| {
                match outcome {
                    Outcome::Admitted => handles.admitted.increment(1),
                    Outcome::Rejected => handles.rejected.increment(1),
                    Outcome::Disabled => handles.disabled.increment(1),
                    Outcome::Unavailable => handles.unavailable.increment(1),
                }
                let limits = items.iter().flat_map(|i| i.limits.iter());
                for (limit, check) in limits.zip(checks) {
                    handles.check(&limit.name, check.exceeded);
                }
            })
        }

        /// A background settle of a lease on `resource` sent again.
        pub(crate) fn settle_retry(&self, resource: &str) {
            self.handles(resource).settle_retries.increment(1);
        }

        /// A commit or rollback of a lease on `resource` that failed for good.
        pub(crate) fn settle_failure(&self, resource: &str) {
            self.handles(resource).settle_failures.increment(1);
        }

        /// An acquire on `resource` admitted from a reservation slice.
        pub(crate) fn admitted_from_slice(&self, resource: &str) {
            self.handles(resource).from_slices.increment(1);
        }

        /// A backend acquire for a hot key on `resource` (a top-up, or a request a slice
        /// could not cover).
        pub(crate) fn went_to_table(&self, resource: &str) {
            self.handles(resource).from_table.increment(1);
        }

        /// A give-back of reserved tokens on `resource`.
        pub(crate) fn give_back(&self, resource: &str) {
            self.handles(resource).give_backs.increment(1);
        }
    }

    /// One DynamoDB call: its operation, whether it succeeded, and how long it took.
    #[cfg(feature = "dynamodb")]
    pub(crate) fn dynamodb_call(operation: &str, ok: bool, seconds: f64) {
        let outcome = if ok { "ok" } else { "error" };
        counter!("zae_limiter_dynamodb_calls_total", "operation" => operation.to_string(), "outcome" => outcome)
            .increment(1);
        ::metrics::histogram!("zae_limiter_dynamodb_call_seconds", "operation" => operation.to_string())
            .record(seconds);
    }
}

#[cfg(not(feature = "metrics"))]
mod disabled {
    use super::Outcome;
    use crate::repository::{ItemRequest, LimitCheck};

    /// Without the `metrics` feature: nothing is recorded.
    #[derive(Debug)]
    pub(crate) struct Metrics;

    impl Metrics {
        pub(crate) fn new() -> Self {
            Metrics
        }

        #[inline(always)]
        pub(crate) fn decided(&self, _: &str, _: Outcome, _: &[ItemRequest], _: &[LimitCheck]) {}

        #[inline(always)]
        pub(crate) fn settle_retry(&self, _: &str) {}

        #[inline(always)]
        pub(crate) fn settle_failure(&self, _: &str) {}

        #[inline(always)]
        pub(crate) fn admitted_from_slice(&self, _: &str) {}

        #[inline(always)]
        pub(crate) fn went_to_table(&self, _: &str) {}

        #[inline(always)]
        pub(crate) fn give_back(&self, _: &str) {}
    }
}
