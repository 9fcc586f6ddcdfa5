//! [`RateLimiter`]: acquire leases, query availability, manage entities and stored limits.

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use smallvec::SmallVec;

use crate::bucket::{self, BucketState};
use crate::clock::{Clock, SystemClock};
use crate::config_cache::ConfigCache;
use crate::lease::Lease;
use crate::naming;
use crate::repository::{
    AcquireOutcome, AcquireRequest, ConfigScope, ItemRequest, LimitCheck, Repository, StoredConfig,
};
use crate::{
    limit, CacheStats, ConfigSource, Entity, Error, Limit, LimitStatus, OnUnavailable,
    RateLimitExceeded,
};

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

    /// Builds the limiter.
    pub fn build(self) -> RateLimiter {
        let ttl = self
            .ttl
            .unwrap_or_else(|| self.repo.default_config_cache_ttl());
        RateLimiter {
            inner: Arc::new(Inner {
                repo: self.repo,
                clock: self.clock,
                cache: ConfigCache::new(ttl),
                on_unavailable: self.on_unavailable,
                last_policy: AtomicU8::new(0),
                outage_log: crate::log_throttle::LogThrottle::new(),
            }),
        }
    }
}

/// A whole-token amount for `consume`, `adjust` and `time_until_available`: any primitive
/// integer. Range and sign are checked where it is used, with a typed error.
pub trait Amount: Copy {
    /// The amount, widened.
    fn to_i128(self) -> i128;
}

macro_rules! amount {
    ($($t:ty),*) => {$(impl Amount for $t { fn to_i128(self) -> i128 { self as i128 } })*};
}
amount!(i8, i16, i32, i64, i128, isize, u8, u16, u32, u64, usize);

pub(crate) fn named_amounts<K: Into<String>, N: Amount>(
    pairs: impl IntoIterator<Item = (K, N)>,
) -> Vec<(String, i128)> {
    pairs
        .into_iter()
        .map(|(k, n)| (k.into(), n.to_i128()))
        .collect()
}

/// Checks names and that amounts are within `0..=MAX_TOKENS` (or `-MAX..=MAX` if signed),
/// each alone and summed per name (a name given twice counts twice), so an over-large
/// request is a [`Error::Validation`] before any write, never a rejection after one.
pub(crate) fn checked_amounts(
    field: &str,
    pairs: &[(String, i128)],
    signed: bool,
) -> Result<Vec<(String, i64)>, Error> {
    let max = limit::MAX_TOKENS;
    let too_big = |name: &str, n: i128, reason: String| {
        Error::validation(format!("{field}.{name}"), n.to_string(), reason)
    };
    let mut checked = Vec::with_capacity(pairs.len());
    for (name, n) in pairs {
        naming::validate_limit_name(name)?;
        if !signed && *n < 0 {
            return Err(too_big(name, *n, "must not be negative".into()));
        }
        if n.unsigned_abs() > u128::from(max) {
            return Err(too_big(
                name,
                *n,
                format!("must be at most {max} in magnitude"),
            ));
        }
        // Every amount so far is within `MAX_TOKENS`, so the sum cannot overflow.
        let total: i128 = pairs
            .iter()
            .filter(|(other, _)| other == name)
            .map(|(_, a)| (*a).clamp(-i128::from(max) - 1, i128::from(max) + 1))
            .sum();
        if total.unsigned_abs() > u128::from(max) {
            return Err(too_big(
                name,
                total,
                format!("the amounts given for {name:?} add up to more than {max}"),
            ));
        }
        checked.push((name.clone(), *n as i64));
    }
    Ok(checked)
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
    /// every limit. Succeeds with a [`Lease`] once the consumption is written, or fails with
    /// [`Error::RateLimited`] having written nothing.
    pub fn acquire(&self, entity_id: impl Into<String>, resource: impl Into<String>) -> Acquire {
        Acquire {
            limiter: self.clone(),
            entity_id: entity_id.into(),
            resource: resource.into(),
            limits: None,
            fallback: None,
            lists_checked: false,
            undecided: false,
            consume: None,
            cascade: None,
            on_unavailable: None,
        }
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
    ) -> Option<Result<Arc<StoredConfig>, Error>> {
        let version = self.inner.repo.config_version();
        if let Some(hit) = self
            .inner
            .cache
            .lookup(entity_id, resource, now_ms, version)
        {
            lookups.push(true);
            return Some(Ok(hit));
        }
        let loaded = self.inner.repo.load_config_now(entity_id, resource)?;
        lookups.push(false);
        Some(loaded.map(|config| self.remember(entity_id, resource, config, now_ms, version)))
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
        static EMPTY: std::sync::OnceLock<Arc<StoredConfig>> = std::sync::OnceLock::new();
        let config = if config == StoredConfig::default() {
            Arc::clone(EMPTY.get_or_init(Arc::default))
        } else {
            Arc::new(config)
        };
        let code = match config.on_unavailable {
            None => 0,
            Some(OnUnavailable::Allow) => 1,
            Some(OnUnavailable::Block) => 2,
        };
        self.inner.last_policy.store(code, Ordering::Relaxed);
        // An in-process backend (one that reports a version) re-reads "nothing stored" as
        // cheaply as the cache would answer, so such keys take no cache entry: memory then
        // grows only with the buckets.
        let empty = Arc::ptr_eq(&config, EMPTY.get_or_init(Arc::default));
        if !(empty && version.is_some()) {
            self.inner
                .cache
                .insert(entity_id, resource, Arc::clone(&config), now_ms, version);
        }
        config
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

    /// Starts creating an entity; set options, then `.await` it.
    pub fn create_entity(&self, entity_id: impl Into<String>) -> CreateEntity {
        CreateEntity {
            limiter: self.clone(),
            id: entity_id.into(),
            name: None,
            parent_id: None,
            cascade: false,
            metadata: BTreeMap::new(),
        }
    }

    /// Reads an entity.
    pub async fn get_entity(&self, entity_id: &str) -> Result<Option<Entity>, Error> {
        naming::validate_entity_id(entity_id)?;
        self.inner.repo.get_entity(entity_id).await
    }

    /// Deletes an entity with its stored limits and buckets; [`Error::EntityNotFound`] if
    /// it does not exist. Its children keep their `parent_id` but cascade to nothing.
    pub async fn delete_entity(&self, entity_id: &str) -> Result<(), Error> {
        naming::validate_entity_id(entity_id)?;
        let existed = self.inner.repo.delete_entity(entity_id).await?;
        self.invalidate_config_cache();
        if existed {
            Ok(())
        } else {
            Err(Error::EntityNotFound {
                entity_id: entity_id.to_string(),
            })
        }
    }

    /// The entities whose parent is `parent_id`, by id.
    pub async fn get_children(&self, parent_id: &str) -> Result<Vec<Entity>, Error> {
        naming::validate_identifier("parent_id", parent_id)?;
        self.inner.repo.get_children(parent_id).await
    }

    async fn set_scope(&self, scope: ConfigScope, limits: &[Limit]) -> Result<(), Error> {
        if limits.is_empty() {
            return Err(Error::validation(
                "limits",
                "[]",
                "must not be empty; delete the limits instead",
            ));
        }
        limit::validate_all(limits)?;
        self.inner.repo.set_limits(&scope, limits).await?;
        self.invalidate_config_cache();
        Ok(())
    }

    async fn delete_scope(&self, scope: ConfigScope) -> Result<bool, Error> {
        let deleted = self.inner.repo.delete_limits(&scope).await?;
        self.invalidate_config_cache();
        Ok(deleted)
    }

    fn entity_scope(entity_id: &str, resource: &str) -> Result<ConfigScope, Error> {
        naming::validate_entity_id(entity_id)?;
        naming::validate_entity_config_resource(resource)?;
        Ok(ConfigScope::Entity {
            entity_id: entity_id.to_string(),
            resource: resource.to_string(),
        })
    }

    fn resource_scope(resource: &str) -> Result<ConfigScope, Error> {
        naming::validate_resource(resource)?;
        Ok(ConfigScope::Resource(resource.to_string()))
    }

    /// Stores system-wide limits (the lowest stored level).
    pub async fn set_system_limits(&self, limits: &[Limit]) -> Result<(), Error> {
        self.set_scope(ConfigScope::System, limits).await
    }

    /// Reads the system-wide limits.
    pub async fn get_system_limits(&self) -> Result<Option<Vec<Limit>>, Error> {
        self.inner.repo.get_limits(&ConfigScope::System).await
    }

    /// Deletes the system-wide limits; false if there were none.
    pub async fn delete_system_limits(&self) -> Result<bool, Error> {
        self.delete_scope(ConfigScope::System).await
    }

    /// Stores the system's policy for backend outages (`None` clears it: `Block`).
    pub async fn set_on_unavailable(&self, policy: Option<OnUnavailable>) -> Result<(), Error> {
        self.inner.repo.set_on_unavailable(policy).await?;
        self.invalidate_config_cache();
        Ok(())
    }

    /// Reads the system's policy for backend outages, if one is stored.
    pub async fn get_on_unavailable(&self) -> Result<Option<OnUnavailable>, Error> {
        self.inner.repo.get_on_unavailable().await
    }

    /// Every level that has limits stored (system, resources, entities), sorted by scope:
    /// the whole stored configuration, for export and comparison.
    pub async fn list_limits(&self) -> Result<Vec<(ConfigScope, Vec<Limit>)>, Error> {
        self.inner.repo.list_limits().await
    }

    /// Stores limits for a resource, for every entity without its own.
    pub async fn set_resource_limits(&self, resource: &str, limits: &[Limit]) -> Result<(), Error> {
        self.set_scope(Self::resource_scope(resource)?, limits)
            .await
    }

    /// Reads a resource's limits.
    pub async fn get_resource_limits(&self, resource: &str) -> Result<Option<Vec<Limit>>, Error> {
        self.inner
            .repo
            .get_limits(&Self::resource_scope(resource)?)
            .await
    }

    /// Deletes a resource's limits; false if there were none.
    pub async fn delete_resource_limits(&self, resource: &str) -> Result<bool, Error> {
        self.delete_scope(Self::resource_scope(resource)?).await
    }

    /// Stores limits for an entity on a resource; resource `"_default_"` means every
    /// resource without entity limits of its own.
    pub async fn set_entity_limits(
        &self,
        entity_id: &str,
        resource: &str,
        limits: &[Limit],
    ) -> Result<(), Error> {
        self.set_scope(Self::entity_scope(entity_id, resource)?, limits)
            .await
    }

    /// Reads an entity's limits for a resource (or `"_default_"`).
    pub async fn get_entity_limits(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Result<Option<Vec<Limit>>, Error> {
        self.inner
            .repo
            .get_limits(&Self::entity_scope(entity_id, resource)?)
            .await
    }

    /// Deletes an entity's limits for a resource (or `"_default_"`); false if none.
    pub async fn delete_entity_limits(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Result<bool, Error> {
        self.delete_scope(Self::entity_scope(entity_id, resource)?)
            .await
    }
}

/// The first level with limits, as [`ConfigSource`] says.
fn resolve(
    stored: &StoredConfig,
    explicit: Option<&Arc<[Limit]>>,
    fallback: Option<&Arc<[Limit]>>,
) -> Option<(Arc<[Limit]>, ConfigSource)> {
    if let Some(l) = explicit {
        return Some((Arc::clone(l), ConfigSource::Override));
    }
    let levels = [
        (&stored.entity_limits, ConfigSource::Entity),
        (&stored.entity_default_limits, ConfigSource::EntityDefault),
        (&stored.resource_limits, ConfigSource::Resource),
        (&stored.system_limits, ConfigSource::System),
    ];
    for (level, source) in levels {
        if let Some(l) = level.as_ref().filter(|l| !l.is_empty()) {
            return Some((Arc::clone(l), source));
        }
    }
    fallback
        .filter(|l| !l.is_empty())
        .map(|l| (Arc::clone(l), ConfigSource::Fallback))
}

/// Names each check: the statuses of an acquire, child first.
pub(crate) fn statuses(items: &[ItemRequest], checks: &[LimitCheck]) -> Vec<LimitStatus> {
    items
        .iter()
        .flat_map(|item| {
            item.limits
                .iter()
                .zip(&item.amounts)
                .map(move |(limit, amount)| (item, limit, *amount))
        })
        .zip(checks)
        .map(|((item, limit, requested), check)| LimitStatus {
            entity_id: item.entity_id.clone(),
            resource: item.resource.clone(),
            limit: limit.clone(),
            available: check.available,
            requested,
            exceeded: check.exceeded,
            retry_after_ms: check.retry_after_ms,
        })
        .collect()
}

fn no_limits(entity_id: &str, resource: &str) -> Error {
    Error::validation(
        "limits",
        format!("{entity_id}/{resource}"),
        "no limits are stored at any level and none were passed",
    )
}

/// An acquire being set up: `.limits`, `.fallback_limits`, `.consume`, `.cascade`,
/// `.on_unavailable`, then `.await`.
#[must_use = "an acquire does nothing until it is awaited"]
#[derive(Clone, Debug)]
pub struct Acquire {
    limiter: RateLimiter,
    entity_id: String,
    resource: String,
    limits: Option<Arc<[Limit]>>,
    fallback: Option<Arc<[Limit]>>,
    /// The limit lists were validated by whoever built them (the HTTP layer, once).
    lists_checked: bool,
    /// Set by [`Acquire::try_now`] when the backend could not decide at once, so awaiting
    /// goes straight to the backend instead of trying again.
    undecided: bool,
    consume: Option<Vec<(String, i128)>>,
    cascade: Option<bool>,
    on_unavailable: Option<OnUnavailable>,
}

impl Acquire {
    /// Enforce exactly these limits, ignoring stored ones.
    pub fn limits(mut self, limits: impl IntoIterator<Item = Limit>) -> Self {
        self.limits = Some(limits.into_iter().collect());
        self
    }

    /// Enforce these limits only when no level stores any.
    pub fn fallback_limits(mut self, limits: impl IntoIterator<Item = Limit>) -> Self {
        self.fallback = Some(limits.into_iter().collect());
        self
    }

    /// [`Self::limits`] from a list shared with other acquires (no copy).
    pub fn shared_limits(mut self, limits: Arc<[Limit]>) -> Self {
        self.limits = Some(limits);
        self
    }

    /// [`Self::fallback_limits`] from a list shared with other acquires (no copy).
    pub fn shared_fallback_limits(mut self, limits: Arc<[Limit]>) -> Self {
        self.fallback = Some(limits);
        self
    }

    /// Marks the limit lists as validated already (by a caller that checked them once).
    pub(crate) fn lists_checked(mut self) -> Self {
        self.lists_checked = true;
        self
    }

    /// The amount to take from each limit by name; limits not named take 0, names that
    /// match no limit are ignored. Default: 1 from every limit.
    pub fn consume<K: Into<String>, N: Amount>(
        mut self,
        amounts: impl IntoIterator<Item = (K, N)>,
    ) -> Self {
        self.consume = Some(named_amounts(amounts));
        self
    }

    /// Whether to charge the parent too, overriding the entity's `cascade` setting.
    pub fn cascade(mut self, cascade: bool) -> Self {
        self.cascade = Some(cascade);
        self
    }

    /// The outage policy for this call, overriding the limiter's and the stored one.
    pub fn on_unavailable(mut self, policy: OnUnavailable) -> Self {
        self.on_unavailable = Some(policy);
        self
    }

    /// Validates the input; returns the checked consume amounts.
    fn validate(&self) -> Result<Option<Vec<(String, i64)>>, Error> {
        naming::validate_entity_id(&self.entity_id)?;
        naming::validate_resource(&self.resource)?;
        if !self.lists_checked {
            if let Some(l) = &self.limits {
                limit::validate_all(l)?;
            }
            if let Some(l) = &self.fallback {
                limit::validate_all(l)?;
            }
        }
        match &self.consume {
            Some(c) => Ok(Some(checked_amounts("consume", c, false)?)),
            None => Ok(None),
        }
    }

    /// Applies the outage policy to a decision. The outage is logged once, then as a
    /// count every 10 s (a line per request would flood the log when it matters most).
    fn apply_policy(&self, decision: Result<Lease, Error>) -> Result<Lease, Error> {
        match decision {
            Err(Error::Unavailable { message, source })
                if self.limiter.policy(self.on_unavailable) == OnUnavailable::Allow =>
            {
                self.limiter.inner.outage_log.note(|count, _| {
                    tracing::warn!(
                        error = %message,
                        cause = ?source,
                        requests = count,
                        "rate limiter backend unavailable; admitting (on_unavailable = allow)"
                    )
                });
                Ok(Lease::unlimited(
                    &self.limiter,
                    &self.entity_id,
                    &self.resource,
                ))
            }
            Err(e @ Error::Unavailable { .. }) => {
                self.limiter.inner.outage_log.note(|count, _| {
                    tracing::warn!(
                        error = %e,
                        requests = count,
                        "rate limiter backend unavailable; rejecting (on_unavailable = block)"
                    )
                });
                Err(e)
            }
            other => other,
        }
    }

    /// An entity's limits as resolved from `stored`, with the amount to take from each.
    fn charges(
        &self,
        stored: &StoredConfig,
        consume: Option<&[(String, i64)]>,
    ) -> Option<(Arc<[Limit]>, Vec<u64>, bool)> {
        let (limits, source) = resolve(stored, self.limits.as_ref(), self.fallback.as_ref())?;
        let amounts = limits
            .iter()
            .map(|l| match consume {
                None => 1,
                Some(c) => c
                    .iter()
                    .filter(|(n, _)| *n == l.name)
                    .fold(0u64, |sum, (_, a)| sum.saturating_add(*a as u64)),
            })
            .collect();
        // Limits stored for this entity (for this resource or all of them) keep its
        // buckets; shared levels let an idle item expire.
        let own = matches!(source, ConfigSource::Entity | ConfigSource::EntityDefault);
        Some((limits, amounts, !own))
    }

    /// The parent's item for a cascade, if its limits resolve.
    fn parent_item(
        &self,
        parent_id: &str,
        stored: &StoredConfig,
        consume: Option<&[(String, i64)]>,
    ) -> Option<ItemRequest> {
        let (limits, amounts, expires_when_idle) = self.charges(stored, consume)?;
        Some(ItemRequest {
            entity_id: parent_id.to_string(),
            resource: self.resource.clone(),
            limits,
            amounts,
            expires_when_idle,
        })
    }

    /// The entity's own limits and amounts, and the parent to charge too (if it cascades).
    #[allow(clippy::type_complexity)]
    fn own_charges<'s>(
        &self,
        stored: &'s StoredConfig,
        consume: Option<&[(String, i64)]>,
    ) -> Result<(Arc<[Limit]>, Vec<u64>, bool, Option<&'s str>), Error> {
        let (limits, amounts, expires) = self
            .charges(stored, consume)
            .ok_or_else(|| no_limits(&self.entity_id, &self.resource))?;
        let entity = stored.entity.as_ref();
        let cascade = self
            .cascade
            .unwrap_or_else(|| entity.is_some_and(|e| e.cascade));
        let parent = entity
            .and_then(|e| e.parent_id.as_deref())
            .filter(|_| cascade);
        Ok((limits, amounts, expires, parent))
    }

    /// Turns the backend's answer into a lease or a rejection.
    fn finish(&self, request: AcquireRequest, outcome: AcquireOutcome) -> Result<Lease, Error> {
        if !outcome.admitted {
            let rejection = RateLimitExceeded::new(statuses(&request.items, &outcome.checks))
                .ok_or_else(|| {
                    Error::unavailable(
                        "backend rejected an acquire without reporting an exceeded limit",
                        "inconsistent AcquireOutcome",
                    )
                })?;
            tracing::debug!(
                entity_id = %request.items[0].entity_id,
                resource = %request.items[0].resource,
                retry_after_ms = rejection.retry_after().as_millis() as u64,
                "rate limit exceeded"
            );
            return Err(Error::RateLimited(rejection));
        }
        tracing::debug!(
            entity_id = %request.items[0].entity_id,
            resource = %request.items[0].resource,
            "admitted"
        );
        Ok(Lease::new(&self.limiter, request.items, outcome.checks))
    }

    async fn decide(&self, consume: Option<&[(String, i64)]>) -> Result<Lease, Error> {
        let limiter = &self.limiter;
        let now = limiter.now_ms();
        let stored = limiter
            .stored_config(&self.entity_id, &self.resource, now)
            .await?;
        let (limits, amounts, expires_when_idle, parent) = self.own_charges(&stored, consume)?;
        let mut items = vec![ItemRequest {
            entity_id: self.entity_id.clone(),
            resource: self.resource.clone(),
            limits,
            amounts,
            expires_when_idle,
        }];
        if let Some(parent_id) = parent {
            let parent_stored = limiter
                .stored_config(parent_id, &self.resource, now)
                .await?;
            items.extend(self.parent_item(parent_id, &parent_stored, consume));
        }
        let request = AcquireRequest { items, now_ms: now };
        let outcome = limiter.inner.repo.acquire(&request).await?;
        self.finish(request, outcome)
    }

    /// [`Self::decide`] without waiting: `None` as soon as a step would wait for I/O.
    ///
    /// The entity id and resource move into the request (the lease keeps them) rather
    /// than being copied; they are put back whenever the acquire is not decided here.
    fn decide_now(&mut self, consume: Option<&[(String, i64)]>) -> Option<Result<Lease, Error>> {
        let mut lookups = SmallVec::new();
        let decided = self.decide_now_counting(consume, &mut lookups)?;
        for hit in lookups {
            self.limiter.inner.cache.count(hit);
        }
        Some(decided)
    }

    fn decide_now_counting(
        &mut self,
        consume: Option<&[(String, i64)]>,
        lookups: &mut SmallVec<[bool; 2]>,
    ) -> Option<Result<Lease, Error>> {
        let limiter = self.limiter.clone();
        let now = limiter.now_ms();
        let stored =
            match limiter.stored_config_now(&self.entity_id, &self.resource, now, lookups)? {
                Ok(stored) => stored,
                Err(e) => return Some(Err(e)),
            };
        let (limits, amounts, expires_when_idle, parent) = match self.own_charges(&stored, consume)
        {
            Ok(found) => found,
            Err(e) => return Some(Err(e)),
        };
        let parent_item = match parent {
            None => None,
            Some(parent_id) => {
                match limiter.stored_config_now(parent_id, &self.resource, now, lookups)? {
                    Ok(parent_stored) => self.parent_item(parent_id, &parent_stored, consume),
                    Err(e) => return Some(Err(e)),
                }
            }
        };
        let mut items = Vec::with_capacity(1 + usize::from(parent_item.is_some()));
        items.push(ItemRequest {
            entity_id: std::mem::take(&mut self.entity_id),
            resource: std::mem::take(&mut self.resource),
            limits,
            amounts,
            expires_when_idle,
        });
        items.extend(parent_item);
        let mut request = AcquireRequest { items, now_ms: now };
        match limiter.inner.repo.acquire_now(&request) {
            Some(Ok(outcome)) => Some(self.finish(request, outcome)),
            Some(Err(e)) => {
                self.take_back(&mut request);
                Some(Err(e))
            }
            None => {
                self.take_back(&mut request);
                None
            }
        }
    }

    /// Moves the entity id and resource back from a request that was not decided.
    fn take_back(&mut self, request: &mut AcquireRequest) {
        let own = request.items.swap_remove(0);
        self.entity_id = own.entity_id;
        self.resource = own.resource;
    }

    /// Decides at once when the backend can answer without I/O (the in-memory backend
    /// always can), else hands the acquire back to be awaited. Lets a caller on a hot path
    /// skip the boxed future; `.await` does the same internally.
    pub fn try_now(mut self) -> Result<Result<Lease, Error>, Self> {
        if self.undecided {
            return Err(self);
        }
        let consume = match self.validate() {
            Ok(consume) => consume,
            Err(e) => return Ok(Err(e)),
        };
        match self.decide_now(consume.as_deref()) {
            Some(decision) => Ok(self.apply_policy(decision)),
            None => {
                self.undecided = true;
                Err(self)
            }
        }
    }

    async fn run(self) -> Result<Lease, Error> {
        let consume = self.validate()?;
        let limit = self.limiter.inner.repo.operation_timeout();
        let decision = match (limit, tokio::runtime::Handle::try_current()) {
            (Some(limit), Ok(runtime)) => self.decide_within(consume, limit, &runtime).await,
            _ => self.decide(consume.as_deref()).await,
        };
        self.apply_policy(decision)
    }

    /// [`Self::decide`] bounded by the backend's operation timeout, retries and backoff
    /// included. The decision runs as a task of its own, so giving up waiting never cuts
    /// a write off half-way: it finishes in the background, and a lease it admits after
    /// the caller gave up is rolled back (its tokens are given back, once).
    async fn decide_within(
        &self,
        consume: Option<Vec<(String, i64)>>,
        limit: Duration,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Lease, Error> {
        let worker = self.clone();
        let mut task = runtime.spawn(async move { worker.decide(consume.as_deref()).await });
        match tokio::time::timeout(limit, &mut task).await {
            Ok(result) => crate::lease::joined(result, "acquire"),
            Err(_) => {
                runtime.spawn(async move {
                    if let Ok(Ok(lease)) = task.await {
                        tracing::debug!(
                            entity_id = %lease.entity_id(),
                            "an acquire admitted after its caller timed out; rolling back"
                        );
                        lease.settle_detached(false, "acquire timed out");
                    }
                });
                Err(Error::Unavailable {
                    message: format!(
                        "the acquire for {}/{} did not finish within the configured timeout \
                         of {limit:?}",
                        self.entity_id, self.resource
                    ),
                    source: None,
                })
            }
        }
    }
}

impl IntoFuture for Acquire {
    type Output = Result<Lease, Error>;
    type IntoFuture = AcquireFuture;

    fn into_future(self) -> Self::IntoFuture {
        let decision: BoxFuture<'static, Self::Output> = match self.try_now() {
            Ok(decided) => Box::pin(std::future::ready(decided)),
            Err(pending) => Box::pin(pending.run()),
        };
        AcquireFuture {
            decision: Some(decision),
        }
    }
}

/// The future of an [`Acquire`]: resolves to the [`Lease`] or the rejection.
///
/// Dropping it before it resolves is safe: a backend may already have written the
/// consumption, so the acquire is finished in the background and its lease rolled back,
/// never leaked (as with `tokio::select!` or a timeout around `.await`).
#[must_use = "an acquire does nothing until it is awaited"]
pub struct AcquireFuture {
    decision: Option<BoxFuture<'static, Result<Lease, Error>>>,
}

impl std::fmt::Debug for AcquireFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcquireFuture")
            .field("done", &self.decision.is_none())
            .finish()
    }
}

impl Future for AcquireFuture {
    type Output = Result<Lease, Error>;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let Some(decision) = self.decision.as_mut() else {
            return std::task::Poll::Ready(Err(Error::LeaseClosed));
        };
        let out = std::task::ready!(decision.as_mut().poll(cx));
        self.decision = None;
        std::task::Poll::Ready(out)
    }
}

impl Drop for AcquireFuture {
    fn drop(&mut self) {
        if let Some(decision) = self.decision.take() {
            crate::lease::run_detached(async move {
                if let Ok(lease) = decision.await {
                    tracing::debug!(
                        entity_id = %lease.entity_id(),
                        "acquire dropped before it returned; rolling back"
                    );
                    lease.settle_detached(false, "acquire dropped before it returned");
                }
            });
        }
    }
}

/// An entity being created: `.name`, `.parent`, `.cascade`, `.metadata`, then `.await`.
#[must_use = "nothing is created until it is awaited"]
#[derive(Debug)]
pub struct CreateEntity {
    limiter: RateLimiter,
    id: String,
    name: Option<String>,
    parent_id: Option<String>,
    cascade: bool,
    metadata: BTreeMap<String, String>,
}

impl CreateEntity {
    /// A display name (default: the id).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The parent entity.
    pub fn parent(mut self, parent_id: impl Into<String>) -> Self {
        self.parent_id = Some(parent_id.into());
        self
    }

    /// Whether acquires also charge the parent (default false).
    pub fn cascade(mut self, cascade: bool) -> Self {
        self.cascade = cascade;
        self
    }

    /// Adds a metadata entry.
    pub fn metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    async fn run(self) -> Result<Entity, Error> {
        naming::validate_entity_id(&self.id)?;
        if let Some(parent) = &self.parent_id {
            naming::validate_identifier("parent_id", parent)?;
            if parent == &self.id {
                return Err(Error::validation(
                    "parent_id",
                    parent.clone(),
                    "an entity cannot be its own parent",
                ));
            }
        }
        let entity = Entity {
            name: self.name.unwrap_or_else(|| self.id.clone()),
            id: self.id,
            parent_id: self.parent_id,
            cascade: self.cascade,
            metadata: self.metadata,
            created_at_ms: self.limiter.now_ms(),
        };
        self.limiter.inner.repo.create_entity(&entity).await?;
        self.limiter.invalidate_config_cache();
        Ok(entity)
    }
}

impl IntoFuture for CreateEntity {
    type Output = Result<Entity, Error>;
    type IntoFuture = BoxFuture<'static, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.run())
    }
}
