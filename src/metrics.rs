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
    use crate::Limit;

    /// A limit's name and its `passed` and `exceeded` counters.
    type LimitHandles = (Box<str>, Counter, Counter);

    /// A shared limit list and its limits' handles, in its order.
    type ListHandles = (Arc<[Limit]>, Box<[LimitHandles]>);

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
        /// The handles of the first shared limit list counted, in its order, found by the
        /// list's identity (the HTTP layer passes one list to every acquire): no name
        /// compared per limit. Holding the list keeps its address from being reused.
        first_list: std::sync::OnceLock<ListHandles>,
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
                first_list: std::sync::OnceLock::new(),
                limits: RwLock::new(Vec::new()),
                resource: r,
            }
        }

        /// Counts the checks of one item's `limits`, in their order.
        fn checks(&self, limits: &Arc<[Limit]>, checks: &[LimitCheck]) {
            if let Some((_, handles)) = self
                .first_list
                .get()
                .filter(|(l, _)| Arc::ptr_eq(l, limits))
            {
                for (handles, check) in handles.iter().zip(checks) {
                    pick(handles, check.exceeded);
                }
                return;
            }
            for (limit, check) in limits.iter().zip(checks) {
                self.check(&limit.name, check.exceeded);
            }
            if self.first_list.get().is_none() {
                let handles = limits.iter().map(|l| self.limit_handles(&l.name)).collect();
                let _ = self.first_list.set((Arc::clone(limits), handles));
            }
        }

        /// The handles of one limit, registered the first time.
        fn limit_handles(&self, limit: &str) -> LimitHandles {
            self.check_with(limit, |handles| handles.clone())
        }

        /// Counts one limit's check, registering its handles the first time.
        fn check(&self, limit: &str, exceeded: bool) {
            if let Some(first) = self
                .first_limit
                .get()
                .filter(|(n, _, _)| short_eq(n, limit))
            {
                pick(first, exceeded);
                return;
            }
            self.check_with(limit, |handles| pick(handles, exceeded))
        }

        /// Runs `f` on one limit's handles (registered the first time), found by name.
        fn check_with<T>(&self, limit: &str, f: impl FnOnce(&LimitHandles) -> T) -> T {
            if let Some(found) = self.limits.read().iter().find(|(n, _, _)| &**n == limit) {
                return f(found);
            }
            let mut limits = self.limits.write();
            let index = match limits.iter().position(|(n, _, _)| &**n == limit) {
                Some(index) => index,
                None => {
                    let handle = |outcome: &'static str| {
                        counter!(
                            "zae_limiter_limit_checks_total",
                            "resource" => self.resource.to_string(),
                            "limit" => limit.to_string(),
                            "outcome" => outcome
                        )
                    };
                    let handles: LimitHandles =
                        (limit.into(), handle("passed"), handle("exceeded"));
                    // The first limit is also kept apart, for the lock-free read above.
                    let _ = self.first_limit.set(handles.clone());
                    limits.push(handles);
                    limits.len() - 1
                }
            };
            f(&limits[index])
        }
    }

    /// Counts a check on a limit's `passed` or `exceeded` counter.
    #[inline]
    fn pick((_, passed, over): &LimitHandles, exceeded: bool) {
        if exceeded {
            over.increment(1)
        } else {
            passed.increment(1)
        }
    }

    /// `a == b` for the short names of resources and limits without a call into libc:
    /// a length check and at most two overlapping word compares up to 16 bytes.
    #[inline]
    fn short_eq(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let word = |s: &[u8], at: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&s[at..at + 8]);
            u64::from_ne_bytes(w)
        };
        match a.len() {
            0 => true,
            len @ 8..=16 => word(a, 0) == word(b, 0) && word(a, len - 8) == word(b, len - 8),
            len if len < 8 => a.iter().zip(b).all(|(x, y)| x == y),
            _ => a == b,
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
            if let Some(first) = self.first.get().filter(|h| short_eq(&h.resource, resource)) {
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
                let mut checks = checks;
                for item in items {
                    let (mine, rest) = checks.split_at(item.limits.len().min(checks.len()));
                    handles.checks(&item.limits, mine);
                    checks = rest;
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
