//! [`RateLimiter`] and [`Lease`]: the limiter for code without an async runtime, named
//! after the async types they front (as `reqwest::blocking::Client` is).
//!
//! The limiter owns a small tokio runtime (one worker thread) and blocks on it. Do not call
//! it from inside an async task; use [`crate::RateLimiter`] there.
//!
//! ```
//! use zae_limiter::blocking::RateLimiter;
//! use zae_limiter::{InMemoryRepository, Limit};
//!
//! let limiter = RateLimiter::new(InMemoryRepository::new())?;
//! let lease = limiter
//!     .acquire("user-1", "reports")
//!     .limits([Limit::per_minute("rpm", 10)])
//!     .call()?;
//! lease.commit()?;
//! assert_eq!(limiter.available("user-1", "reports", Some(&[Limit::per_minute("rpm", 10)]))?["rpm"], 9);
//! # Ok::<(), zae_limiter::Error>(())
//! ```

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Runtime;

use crate::bucket::BucketState;
use crate::{
    Acquire as AsyncAcquire, Amount, CacheStats, ConfigSource, Entity, Error, Lease as AsyncLease,
    Limit, LimitStatus, OnUnavailable, RateLimiter as AsyncRateLimiter, Repository,
};

/// A blocking front to [`crate::RateLimiter`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    limiter: AsyncRateLimiter,
    runtime: Arc<Runtime>,
}

/// A blocking front to [`crate::Lease`]. Dropping it open rolls back before returning.
#[must_use = "a lease rolls back when dropped; commit it when the work is done"]
#[derive(Debug)]
pub struct Lease {
    lease: AsyncLease,
    runtime: Arc<Runtime>,
}

/// A blocking acquire being set up; finish with [`Acquire::call`].
#[must_use = "an acquire does nothing until it is called"]
#[derive(Debug)]
pub struct Acquire {
    acquire: AsyncAcquire,
    runtime: Arc<Runtime>,
}

fn runtime() -> Result<Runtime, Error> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("zae-limiter-blocking")
        .enable_all()
        .build()
        .map_err(|e| Error::unavailable("could not start the blocking limiter's runtime", e))
}

impl RateLimiter {
    /// A blocking limiter over `repo` with default settings.
    pub fn new(repo: impl Repository) -> Result<Self, Error> {
        Self::from_async(AsyncRateLimiter::new(repo))
    }

    /// Wraps a configured [`crate::RateLimiter`] (see [`crate::RateLimiter::builder`]).
    pub fn from_async(limiter: AsyncRateLimiter) -> Result<Self, Error> {
        Ok(RateLimiter {
            limiter,
            runtime: Arc::new(runtime()?),
        })
    }

    /// The async limiter underneath.
    pub fn inner(&self) -> &AsyncRateLimiter {
        &self.limiter
    }

    /// Runs any future (e.g. another [`crate::RateLimiter`] method) to completion.
    pub fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.runtime.block_on(fut)
    }

    /// Starts an acquire; see [`crate::RateLimiter::acquire`].
    pub fn acquire(
        &self,
        entity_id: impl Into<crate::CompactString>,
        resource: impl Into<crate::CompactString>,
    ) -> Acquire {
        Acquire {
            acquire: self.limiter.acquire(entity_id, resource),
            runtime: Arc::clone(&self.runtime),
        }
    }

    /// See [`crate::RateLimiter::available`].
    pub fn available(
        &self,
        entity_id: &str,
        resource: &str,
        limits: Option<&[Limit]>,
    ) -> Result<BTreeMap<String, i64>, Error> {
        self.block_on(self.limiter.available(entity_id, resource, limits))
    }

    /// See [`crate::RateLimiter::time_until_available`].
    pub fn time_until_available<K: Into<String>, N: Amount>(
        &self,
        entity_id: &str,
        resource: &str,
        needed: impl IntoIterator<Item = (K, N)>,
        limits: Option<&[Limit]>,
    ) -> Result<Duration, Error> {
        self.block_on(
            self.limiter
                .time_until_available(entity_id, resource, needed, limits),
        )
    }

    /// See [`crate::RateLimiter::resolve_limits`].
    pub fn resolve_limits(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Result<(Vec<Limit>, OnUnavailable, ConfigSource), Error> {
        self.block_on(self.limiter.resolve_limits(entity_id, resource))
    }

    /// See [`crate::RateLimiter::bucket_states`].
    pub fn bucket_states(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Result<BTreeMap<String, BucketState>, Error> {
        self.block_on(self.limiter.bucket_states(entity_id, resource))
    }

    /// Creates an entity; see [`crate::RateLimiter::create_entity`] for the options.
    pub fn create_entity(
        &self,
        entity_id: &str,
        parent_id: Option<&str>,
        cascade: bool,
    ) -> Result<Entity, Error> {
        let mut create = self.limiter.create_entity(entity_id).cascade(cascade);
        if let Some(parent) = parent_id {
            create = create.parent(parent);
        }
        self.block_on(create.into_future())
    }

    /// See [`crate::RateLimiter::get_entity`].
    pub fn get_entity(&self, entity_id: &str) -> Result<Option<Entity>, Error> {
        self.block_on(self.limiter.get_entity(entity_id))
    }

    /// See [`crate::RateLimiter::delete_entity`].
    pub fn delete_entity(&self, entity_id: &str) -> Result<(), Error> {
        self.block_on(self.limiter.delete_entity(entity_id))
    }

    /// See [`crate::RateLimiter::get_children`].
    pub fn get_children(&self, parent_id: &str) -> Result<Vec<Entity>, Error> {
        self.block_on(self.limiter.get_children(parent_id))
    }

    /// See [`crate::RateLimiter::set_system_limits`].
    pub fn set_system_limits(&self, limits: &[Limit]) -> Result<(), Error> {
        self.block_on(self.limiter.set_system_limits(limits))
    }

    /// See [`crate::RateLimiter::set_resource_limits`].
    pub fn set_resource_limits(&self, resource: &str, limits: &[Limit]) -> Result<(), Error> {
        self.block_on(self.limiter.set_resource_limits(resource, limits))
    }

    /// See [`crate::RateLimiter::set_entity_limits`].
    pub fn set_entity_limits(
        &self,
        entity_id: &str,
        resource: &str,
        limits: &[Limit],
    ) -> Result<(), Error> {
        self.block_on(self.limiter.set_entity_limits(entity_id, resource, limits))
    }

    /// See [`crate::RateLimiter::cache_stats`].
    pub fn cache_stats(&self) -> CacheStats {
        self.limiter.cache_stats()
    }
}

impl Acquire {
    /// See [`Acquire::limits`].
    pub fn limits(mut self, limits: impl IntoIterator<Item = Limit>) -> Self {
        self.acquire = self.acquire.limits(limits);
        self
    }

    /// See [`Acquire::fallback_limits`].
    pub fn fallback_limits(mut self, limits: impl IntoIterator<Item = Limit>) -> Self {
        self.acquire = self.acquire.fallback_limits(limits);
        self
    }

    /// See [`Acquire::consume`].
    pub fn consume<K: Into<String>, N: Amount>(
        mut self,
        amounts: impl IntoIterator<Item = (K, N)>,
    ) -> Self {
        self.acquire = self.acquire.consume(amounts);
        self
    }

    /// See [`Acquire::cascade`].
    pub fn cascade(mut self, cascade: bool) -> Self {
        self.acquire = self.acquire.cascade(cascade);
        self
    }

    /// See [`Acquire::on_unavailable`].
    pub fn on_unavailable(mut self, policy: OnUnavailable) -> Self {
        self.acquire = self.acquire.on_unavailable(policy);
        self
    }

    /// Runs the acquire, blocking until it is decided.
    pub fn call(self) -> Result<Lease, Error> {
        let lease = self.runtime.block_on(self.acquire.into_future())?;
        Ok(Lease {
            lease,
            runtime: self.runtime,
        })
    }
}

impl Lease {
    /// See [`crate::Lease::adjust`].
    pub fn adjust<K: Into<String>, N: Amount>(
        &self,
        deltas: impl IntoIterator<Item = (K, N)>,
    ) -> Result<(), Error> {
        self.runtime.block_on(self.lease.adjust(deltas))
    }

    /// See [`crate::Lease::commit`].
    pub fn commit(&self) -> Result<(), Error> {
        self.runtime.block_on(self.lease.commit())
    }

    /// See [`crate::Lease::rollback`].
    pub fn rollback(&self) -> Result<(), Error> {
        self.runtime.block_on(self.lease.rollback())
    }

    /// See [`crate::Lease::consumed`].
    pub fn consumed(&self) -> BTreeMap<String, i64> {
        self.lease.consumed()
    }

    /// See [`crate::Lease::statuses`].
    pub fn statuses(&self) -> &[LimitStatus] {
        self.lease.statuses()
    }

    /// See [`crate::Lease::is_closed`].
    pub fn is_closed(&self) -> bool {
        self.lease.is_closed()
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.lease.is_closed() || self.lease.is_unlimited() {
            return;
        }
        tracing::warn!(
            entity_id = %self.lease.entity_id(),
            resource = %self.lease.resource(),
            "lease dropped without commit or rollback; rolling back"
        );
        if let Err(e) = self.runtime.block_on(self.lease.rollback()) {
            tracing::error!(error = %e, "rollback of dropped lease failed");
        }
    }
}
