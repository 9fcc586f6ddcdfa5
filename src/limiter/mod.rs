//! [`RateLimiter`]: acquire leases, query availability, manage entities and stored limits.
//!
//! The limiter and its builder live here with limit resolution; [`Acquire`] in `acquire`,
//! entity management in `entities`, stored-limit management in `limits`.

mod acquire;
mod entities;
mod limits;
mod usage;

pub use acquire::{Acquire, AcquireFuture};
pub use entities::CreateEntity;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

use crate::amount::{checked_amounts, named_amounts, Amount};
use crate::bucket::{self, BucketState};
use crate::clock::{Clock, SystemClock};
use crate::config_cache::ConfigCache;
use crate::naming;
use crate::repository::{Repository, StoredConfig};
use crate::{limit, CacheStats, ConfigSource, Error, Limit, OnUnavailable};

/// A boxed future, as returned by the builders' `IntoFuture`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Rate-limits entities (API keys, users) per resource with token buckets held in a
/// [`Repository`]. Cheap to clone; clones share the backend, clock and config cache.
///
/// ```
/// use zae_limiter::{InMemoryRepository, Limit, RateLimiter};
///
/// # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), zae_limiter::Error> {
/// let limiter = RateLimiter::new(InMemoryRepository::new());
/// let lease = limiter
///     .acquire("user-123", "gpt-4")
///     .limits([Limit::per_minute("rpm", 100), Limit::per_minute("tpm", 10_000)])
///     .consume([("rpm", 1), ("tpm", 500)])
///     .await?;
/// lease.adjust([("tpm", 250)]).await?; // the call used 750 tokens, not 500
/// lease.commit().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RateLimiter {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) repo: Arc<dyn Repository>,
    pub(crate) clock: Arc<dyn Clock>,
    cache: ConfigCache,
    on_unavailable: Option<OnUnavailable>,
    /// The system policy last read successfully (0 = none yet, 1 = allow, 2 = block), used
    /// when the backend cannot be read.
    last_policy: AtomicU8,
    /// Outage log lines, once then a count every 10 s.
    outage_log: crate::log_throttle::LogThrottle,
    /// Metric handles (feature `metrics`; nothing without it).
    pub(crate) metrics: crate::metrics::Metrics,
    /// The reservation layer over `repo`, when reservations are on.
    reservations: Option<crate::reservations::Reserving>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("clock", &self.inner.clock)
            .field("config_cache", &self.inner.cache.stats())
            .field("on_unavailable", &self.inner.on_unavailable)
            .finish_non_exhaustive()
    }
}

/// Builder for [`RateLimiter`]: clock, config-cache TTL, unavailability policy.
pub struct RateLimiterBuilder {
    repo: Arc<dyn Repository>,
    clock: Arc<dyn Clock>,
    ttl: Option<Duration>,
    on_unavailable: Option<OnUnavailable>,
    reservations: Option<crate::reservations::Reservations>,
}

impl RateLimiterBuilder {
    /// The clock to read time from (default [`SystemClock`]).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// How long resolved limits are cached (default: the backend's
    /// [`Repository::default_config_cache_ttl`]); zero disables the cache.
    pub fn config_cache_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// What to do when the backend is unavailable, overriding the stored system policy.
    pub fn on_unavailable(mut self, policy: OnUnavailable) -> Self {
        self.on_unavailable = Some(policy);
        self
    }

    /// Admit hot keys' requests from node-local slices of their buckets (see
    /// [`crate::reservations`]): for keys past the per-partition write rate, or to cut
    /// backend calls and their cost. Give the slices back on shutdown with
    /// [`RateLimiter::release_reservations`].
    pub fn reservations(mut self, policy: crate::reservations::Reservations) -> Self {
        self.reservations = Some(policy);
        self
    }

    /// Builds the limiter.
    pub fn build(self) -> RateLimiter {
        let ttl = self
            .ttl
            .unwrap_or_else(|| self.repo.default_config_cache_ttl());
        let reservations = self.reservations.map(|policy| {
            crate::reservations::Reserving::new(self.repo.clone(), policy, self.clock.clone())
        });
        let repo: Arc<dyn Repository> = match &reservations {
            Some(r) => Arc::new(r.clone()),
            None => self.repo,
        };
        RateLimiter {
            inner: Arc::new(Inner {
                reservations,
                repo,
                clock: self.clock,
                cache: ConfigCache::new(ttl),
                on_unavailable: self.on_unavailable,
                last_policy: AtomicU8::new(0),
                outage_log: crate::log_throttle::LogThrottle::new(),
                metrics: crate::metrics::Metrics::new(),
            }),
        }
    }
}

impl RateLimiter {
    /// A limiter over `repo` with the system clock and default settings.
    pub fn new(repo: impl Repository) -> Self {
        Self::builder(repo).build()
    }

    /// A builder over `repo`.
    pub fn builder(repo: impl Repository) -> RateLimiterBuilder {
        Self::builder_shared(Arc::new(repo))
    }

    /// A builder over a backend that is already shared.
    pub fn builder_shared(repo: Arc<dyn Repository>) -> RateLimiterBuilder {
        RateLimiterBuilder {
            repo,
            clock: Arc::new(SystemClock),
            ttl: None,
            on_unavailable: None,
            reservations: None,
        }
    }

    /// The backend.
    pub fn repository(&self) -> &Arc<dyn Repository> {
        &self.inner.repo
    }

    /// The current time by the limiter's clock, epoch milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.inner.clock.now_ms()
    }

    /// Starts an acquire for `entity_id` on `resource`; set options, then `.await` it.
    ///
    /// Without `.limits(..)` the stored limits apply (entity+resource, entity `_default_`,
    /// resource, system, then `.fallback_limits(..)`); without `.consume(..)` it takes 1 from
    /// every limit. Succeeds with a [`Lease`](crate::Lease) once the consumption is written, or fails with
    /// [`Error::RateLimited`] having written nothing.
    #[inline]
    pub fn acquire(
        &self,
        entity_id: impl Into<crate::CompactString>,
        resource: impl Into<crate::CompactString>,
    ) -> Acquire {
        Acquire::new(self.clone(), entity_id.into(), resource.into())
    }

    /// Gives back every reservation slice this limiter holds and waits until the table has
    /// them; returns how many slices went back. Call it on shutdown: from then on the
    /// limiter takes no more slices (every request goes to the table). Without
    /// reservations, `Ok(0)`.
    pub async fn release_reservations(&self) -> Result<usize, Error> {
        match &self.inner.reservations {
            Some(r) => r.release_all().await,
            None => Ok(0),
        }
    }

    /// What this limiter holds in reservations for an entity and resource (`None` without
    /// reservations, or for a key it has not seen lately).
    pub fn reservation(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Option<crate::reservations::ReservationStatus> {
        self.inner
            .reservations
            .as_ref()?
            .status(entity_id, resource)
    }

    /// Counters of the reservations (`None` without them).
    pub fn reservation_stats(&self) -> Option<crate::reservations::ReservationStats> {
        Some(self.inner.reservations.as_ref()?.stats())
    }

    /// Gives back the slices that have been idle for the policy's idle time now, rather
    /// than at the next background pass; returns how many.
    pub fn release_idle_reservations(&self) -> usize {
        self.inner
            .reservations
            .as_ref()
            .map_or(0, |r| r.release_idle())
    }

    /// Counters of the resolved-config cache.
    pub fn cache_stats(&self) -> CacheStats {
        self.inner.cache.stats()
    }

    /// Forgets every cached config, so the next acquire reads stored limits afresh.
    pub fn invalidate_config_cache(&self) {
        self.inner.cache.invalidate();
    }

    /// The stored config for an entity and resource, through the cache.
    pub(crate) async fn stored_config(
        &self,
        entity_id: &str,
        resource: &str,
        now_ms: i64,
    ) -> Result<Arc<StoredConfig>, Error> {
        // Read the version before the config, so a write racing the read leaves the entry
        // stale rather than wrongly fresh.
        let version = self.inner.repo.config_version();
        if let Some(hit) = self
            .inner
            .cache
            .lookup(entity_id, resource, now_ms, version)
        {
            self.inner.cache.count(true);
            return Ok(hit);
        }
        self.inner.cache.count(false);
        let loaded = self.inner.repo.load_config(entity_id, resource).await?;
        Ok(self.remember(entity_id, resource, loaded, now_ms, version))
    }

    /// [`Self::stored_config`] without waiting: `None` when the answer needs I/O. Records
    /// in `lookups` whether it was a cache hit, for the caller to count once the acquire
    /// is decided (an undecided one is looked up, and counted, again when awaited).
    pub(crate) fn stored_config_now(
        &self,
        entity_id: &str,
        resource: &str,
        now_ms: i64,
        lookups: &mut SmallVec<[bool; 2]>,
    ) -> Option<Result<StoredNow, Error>> {
        if self.inner.repo.stores_nothing() {
            // Nothing to look up or cache; the stored policy is none.
            self.note_policy(None);
            return Some(Ok(StoredNow::Nothing));
        }
        let version = self.inner.repo.config_version();
        if let Some(hit) = self
            .inner
            .cache
            .lookup(entity_id, resource, now_ms, version)
        {
            lookups.push(true);
            return Some(Ok(StoredNow::Shared(hit)));
        }
        let loaded = self.inner.repo.load_config_now(entity_id, resource)?;
        lookups.push(false);
        Some(loaded.map(|config| {
            StoredNow::Shared(self.remember(entity_id, resource, config, now_ms, version))
        }))
    }

    fn remember(
        &self,
        entity_id: &str,
        resource: &str,
        config: StoredConfig,
        now_ms: i64,
        version: Option<u64>,
    ) -> Arc<StoredConfig> {
        // Most keys have nothing stored: share one empty config rather than hold a copy
        // per key.
        let empty = config == StoredConfig::default();
        let config = if empty {
            Arc::clone(empty_config())
        } else {
            Arc::new(config)
        };
        self.note_policy(config.on_unavailable);
        // An in-process backend (one that reports a version) re-reads "nothing stored" as
        // cheaply as the cache would answer, so such keys take no cache entry: memory then
        // grows only with the buckets.
        if !(empty && version.is_some()) {
            self.inner
                .cache
                .insert(entity_id, resource, Arc::clone(&config), now_ms, version);
        }
        config
    }

    /// Records the stored outage policy last read.
    fn note_policy(&self, stored: Option<OnUnavailable>) {
        let code = match stored {
            None => 0,
            Some(OnUnavailable::Allow) => 1,
            Some(OnUnavailable::Block) => 2,
        };
        // Read first: a store on every acquire would bounce the line between cores.
        if self.inner.last_policy.load(Ordering::Relaxed) != code {
            self.inner.last_policy.store(code, Ordering::Relaxed);
        }
    }

    /// The policy for an outage: per call, then the limiter's, then the stored one (last
    /// read), then `Block`.
    fn policy(&self, per_call: Option<OnUnavailable>) -> OnUnavailable {
        per_call.or(self.inner.on_unavailable).unwrap_or_else(|| {
            match self.inner.last_policy.load(Ordering::Relaxed) {
                1 => OnUnavailable::Allow,
                _ => OnUnavailable::Block,
            }
        })
    }

    /// The limits that apply to an entity and resource, the unavailability policy, and the
    /// level they came from. [`Error::Validation`] (field `limits`) when none are stored.
    pub async fn resolve_limits(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Result<(Vec<Limit>, OnUnavailable, ConfigSource), Error> {
        naming::validate_entity_id(entity_id)?;
        naming::validate_resource(resource)?;
        let stored = self
            .stored_config(entity_id, resource, self.now_ms())
            .await?;
        let (limits, source) =
            resolve(&stored, None, None).ok_or_else(|| no_limits(entity_id, resource))?;
        let policy = self
            .inner
            .on_unavailable
            .or(stored.on_unavailable)
            .unwrap_or_default();
        Ok((limits.to_vec(), policy, source))
    }

    async fn limits_for(
        &self,
        entity_id: &str,
        resource: &str,
        limits: Option<&[Limit]>,
    ) -> Result<Vec<Limit>, Error> {
        match limits {
            Some(l) => {
                naming::validate_entity_id(entity_id)?;
                naming::validate_resource(resource)?;
                limit::validate_all(l)?;
                Ok(l.to_vec())
            }
            None => Ok(self.resolve_limits(entity_id, resource).await?.0),
        }
    }

    /// Whole tokens available now per limit (negative in debt; a bucket never used reports
    /// its capacity). Uses `limits` if given, else the stored limits.
    pub async fn available(
        &self,
        entity_id: &str,
        resource: &str,
        limits: Option<&[Limit]>,
    ) -> Result<BTreeMap<String, i64>, Error> {
        let limits = self.limits_for(entity_id, resource, limits).await?;
        let stored = self.inner.repo.get_buckets(entity_id, resource).await?;
        let now = self.now_ms();
        Ok(limits
            .iter()
            .map(|l| {
                let state = crate::repository::reconcile_bucket(stored.get(&l.name), l, now);
                (l.name.clone(), bucket::available(&state, now))
            })
            .collect())
    }

    /// How long until every named amount is available at once (zero if it is now).
    /// Names without a limit are ignored; an amount above a limit's capacity is an
    /// [`Error::Validation`], since it never becomes available.
    pub async fn time_until_available<K: Into<String>, N: Amount>(
        &self,
        entity_id: &str,
        resource: &str,
        needed: impl IntoIterator<Item = (K, N)>,
        limits: Option<&[Limit]>,
    ) -> Result<Duration, Error> {
        let needed = checked_amounts("needed", &named_amounts(needed), false)?;
        let limits = self.limits_for(entity_id, resource, limits).await?;
        let stored = self.inner.repo.get_buckets(entity_id, resource).await?;
        let now = self.now_ms();
        let mut wait = 0u64;
        for (name, amount) in needed {
            let Some(limit) = limits.iter().find(|l| l.name == name) else {
                continue;
            };
            let amount = amount as u64;
            if amount > limit.capacity {
                return Err(Error::validation(
                    format!("needed.{name}"),
                    amount.to_string(),
                    format!(
                        "exceeds the capacity {} and can never be available",
                        limit.capacity
                    ),
                ));
            }
            let state = crate::repository::reconcile_bucket(stored.get(&name), limit, now);
            wait = wait.max(bucket::time_until_available(&state, amount, now));
        }
        Ok(Duration::from_millis(wait))
    }

    /// The stored bucket states of an entity and resource by limit name, as last written.
    pub async fn bucket_states(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Result<BTreeMap<String, BucketState>, Error> {
        naming::validate_entity_id(entity_id)?;
        naming::validate_resource(resource)?;
        self.inner.repo.get_buckets(entity_id, resource).await
    }
}

/// The first level with limits, as [`ConfigSource`] says.
pub(crate) fn resolve<'a>(
    stored: &'a StoredConfig,
    explicit: Option<&'a Arc<[Limit]>>,
    fallback: Option<&'a Arc<[Limit]>>,
) -> Option<(&'a Arc<[Limit]>, ConfigSource)> {
    if let Some(l) = explicit {
        return Some((l, ConfigSource::Override));
    }
    let levels = [
        (&stored.entity_limits, ConfigSource::Entity),
        (&stored.entity_default_limits, ConfigSource::EntityDefault),
        (&stored.resource_limits, ConfigSource::Resource),
        (&stored.system_limits, ConfigSource::System),
    ];
    for (level, source) in levels {
        if let Some(l) = level.as_ref().filter(|l| !l.is_empty()) {
            return Some((l, source));
        }
    }
    fallback
        .filter(|l| !l.is_empty())
        .map(|l| (l, ConfigSource::Fallback))
}

pub(super) fn no_limits(entity_id: &str, resource: &str) -> Error {
    Error::validation(
        "limits",
        format!("{entity_id}/{resource}"),
        "no limits are stored at any level and none were passed",
    )
}

/// The config of a key with nothing stored, shared by every such key.
fn empty_config() -> &'static Arc<StoredConfig> {
    static EMPTY: std::sync::OnceLock<Arc<StoredConfig>> = std::sync::OnceLock::new();
    EMPTY.get_or_init(Arc::default)
}

/// A config read without waiting: none stored at all (no reference to count), or a
/// shared one.
pub(crate) enum StoredNow {
    /// The backend stores nothing.
    Nothing,
    /// What the cache or the backend answered.
    Shared(Arc<StoredConfig>),
}

impl std::ops::Deref for StoredNow {
    type Target = StoredConfig;

    fn deref(&self) -> &StoredConfig {
        match self {
            StoredNow::Nothing => empty_config(),
            StoredNow::Shared(config) => config,
        }
    }
}
