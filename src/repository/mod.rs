//! The [`Repository`] trait every backend implements, and the backends.
//!
//! A backend stores four things: bucket items (all limits of one entity and resource in one
//! record), entities, stored limits at four levels, and the system's `on_unavailable`
//! policy. The [`crate::RateLimiter`] does everything else (validation, config resolution and
//! caching, cascade, leases), so a backend only has to make each operation atomic.
//!
//! The one hard requirement: [`Repository::acquire`] is all-or-nothing across every item and
//! limit it is given, and never admits more than the buckets hold under any number of
//! concurrent callers, in this process or (for shared backends) any other.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use smallvec::SmallVec;

use crate::bucket::{BucketState, ConsumeResult};
use crate::usage::{ResourceBucket, UsagePage, UsageQuery};
use crate::{BackendCapabilities, Entity, Error, Limit, LimitStatus, OnUnavailable};

/// The error of an operation `repo` does not support.
fn not_supported<R: Repository + ?Sized>(repo: &R, operation: &str) -> Error {
    let backend = if repo.capabilities().shared_across_processes {
        "shared"
    } else {
        "in-memory"
    };
    Error::NotSupported {
        operation: operation.to_string(),
        backend: backend.to_string(),
    }
}

#[cfg(feature = "dynamodb")]
#[cfg_attr(docsrs, doc(cfg(feature = "dynamodb")))]
pub mod dynamodb;
pub mod memory;

/// The whole tokens to take from each limit of an item: inline for up to two limits (say
/// requests and tokens per minute), so an acquire allocates nothing for them.
pub type Amounts = SmallVec<[u64; 2]>;

/// One check per limit of every item of an acquire: inline for up to two.
pub type Checks = SmallVec<[LimitCheck; 2]>;

/// The items of an acquire: inline for one (a cascade, rarer, allocates).
pub type Items = SmallVec<[ItemRequest; 1]>;

/// One bucket item to charge in an acquire: the limits of one entity and resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemRequest {
    /// The entity.
    pub entity_id: crate::CompactString,
    /// The resource.
    pub resource: crate::CompactString,
    /// The limits to enforce.
    pub limits: Arc<[Limit]>,
    /// The whole tokens to take from each limit, in the same order (zero allowed).
    pub amounts: Amounts,
    /// Whether the limits come from a shared level (resource, system, or the caller's), so
    /// a backend may expire the item once idle; false when they are stored for this entity,
    /// whose buckets are kept (DESIGN section 9, bucket `ttl`).
    pub expires_when_idle: bool,
    /// The entity's record, when it was created: a backend whose items carry their owner's
    /// parent and cascade policy (DynamoDB, for the Python library's fast path) reads it.
    pub owner: Option<Arc<Entity>>,
    /// The resource is bypassed for this entity (the Python library's `disabled = "bypass"`
    /// flag): admit whatever the balance and count the consumption (`tc`) without taking
    /// tokens. A backend may also bypass an item whose store says so (a live `bypass`
    /// stamp) and reports it in [`AcquireOutcome::bypassed`].
    pub bypass: bool,
    /// The shard of the bucket to charge. Callers leave the default (the first of one); a
    /// backend whose store spreads a hot bucket over several items picks one and reports
    /// it in [`AcquireOutcome::shards`], so a lease's later changes go to the same item.
    pub shard: Shard,
}

/// Which of a bucket's shards an item addresses: the Python library spreads a hot bucket
/// over `count` items (`{ns}/BUCKET#{entity}#{resource}#{index}`), each holding an equal
/// share of every limit's capacity and refill (its table contract, section 8.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shard {
    /// This shard, `0..count`; shard 0 is the authoritative one.
    pub index: u32,
    /// How many shards the bucket has (1: not sharded).
    pub count: u32,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { index: 0, count: 1 }
    }
}

/// An all-or-nothing consumption over one item, or two (child and parent in a cascade).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireRequest {
    /// The items, child first.
    pub items: Items,
    /// The time of the request, epoch milliseconds.
    pub now_ms: i64,
}

/// What [`Repository::acquire`] decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AcquireOutcome {
    /// Whether everything was consumed (else nothing was).
    pub admitted: bool,
    /// One check per limit of every item, in request order.
    pub checks: Checks,
    /// The items (by index) admitted under a bypass: nothing was taken from them, so a
    /// lease's later changes to them move the count only ([`AdjustRequest::counts_only`]).
    pub bypassed: Vec<usize>,
    /// The items (by index) charged on a shard other than the request's
    /// ([`ItemRequest::shard`]), and that shard: a lease's later changes go there.
    pub shards: Vec<(usize, Shard)>,
}

impl AcquireOutcome {
    /// Back to no answer, keeping the buffers.
    pub(crate) fn clear(&mut self) {
        let AcquireOutcome {
            admitted,
            checks,
            bypassed,
            shards,
        } = self;
        *admitted = false;
        checks.clear();
        bypassed.clear();
        shards.clear();
    }
}

/// How one limit fared in an acquire (the limiter turns these into
/// [`crate::LimitStatus`]es, naming the entity and limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitCheck {
    /// Whole tokens available before consuming (negative in debt).
    pub available: i64,
    /// Whether the bucket lacked the amount.
    pub exceeded: bool,
    /// Milliseconds until the amount fits: `Some(0)` when it fits now, `None` when it never
    /// can (it is above the capacity).
    pub retry_after_ms: Option<u64>,
}

impl LimitCheck {
    /// The check of one limit from a [`crate::bucket::try_consume`] result.
    ///
    /// A request larger than the capacity is reported as never satisfiable
    /// (`retry_after_ms: None`) rather than with the arithmetic's finite wait.
    pub fn from_consume(limit: &Limit, requested: u64, result: &ConsumeResult) -> Self {
        let retry_after_ms = if result.success {
            Some(0)
        } else if requested > limit.capacity {
            None
        } else {
            Some(result.retry_after_ms)
        };
        LimitCheck {
            available: result.available,
            exceeded: !result.success,
            retry_after_ms,
        }
    }
}

/// Signed changes to one item's buckets: positive debits (debt allowed), negative credits
/// (never above capacity). Each carries its limit so a backend can seed a missing bucket
/// in full rather than create a record without capacity and refill fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdjustRequest {
    /// The entity.
    pub entity_id: String,
    /// The resource.
    pub resource: String,
    /// The limit and the whole-token delta.
    pub deltas: Vec<(Limit, i64)>,
    /// The time of the change, epoch milliseconds.
    pub now_ms: i64,
    /// Identifies this write across re-sends: a backend whose writes can end with an
    /// unknown outcome (a timeout) applies a write at most once per id, so a caller may
    /// re-issue the same request after an [`Error::Unavailable`] without it landing twice.
    /// [`crate::Lease`] sets it; `None` means the request is not re-issued.
    pub write_id: Option<String>,
    /// The item was admitted under a bypass ([`AcquireOutcome::bypassed`]): the deltas
    /// change the consumption count (`tc`) only, never the tokens, which were not taken.
    pub counts_only: bool,
    /// The shard the acquire charged ([`AcquireOutcome::shards`]).
    pub shard: Shard,
}

/// Where a set of stored limits lives in the config hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ConfigScope {
    /// System-wide limits.
    System,
    /// Limits for one resource.
    Resource(String),
    /// Limits for one entity and resource (`_default_` for every resource).
    Entity {
        /// The entity.
        entity_id: String,
        /// The resource, or [`crate::naming::DEFAULT_RESOURCE`].
        resource: String,
    },
}

/// Whether a resource is enforced, switched off or bypassed: the Python library's
/// `disabled` flag on an entity's or a resource's config (`true`, `false`, `"bypass"`).
/// The first level that sets one wins (entity and resource, entity `_default_`,
/// resource); none set means enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Acquires fail with [`Error::ResourceDisabled`] (the layer answers 403).
    Disabled,
    /// Enforced, explicitly: overrides a flag on a level above.
    Enabled,
    /// Admitted whatever the balance and counted, nothing taken: for an incident, or a
    /// trusted caller, without deleting the limits.
    Bypassed,
}

/// Everything an acquire needs to know about an entity and resource, read in one call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StoredConfig {
    /// The entity record, if it was created.
    pub entity: Option<Arc<Entity>>,
    /// Limits stored for the entity and this resource.
    pub entity_limits: Option<Arc<[Limit]>>,
    /// Limits stored for the entity under `_default_`.
    pub entity_default_limits: Option<Arc<[Limit]>>,
    /// Limits stored for the resource.
    pub resource_limits: Option<Arc<[Limit]>>,
    /// Limits stored at system level.
    pub system_limits: Option<Arc<[Limit]>>,
    /// The system's `on_unavailable` policy, if set.
    pub on_unavailable: Option<OnUnavailable>,
    /// Whether the resource is switched off for the entity (the Python library's
    /// `disabled` flag on the entity's config for the resource, its `_default_`, or the
    /// resource; the first explicit value wins): acquires fail with
    /// [`Error::ResourceDisabled`].
    pub disabled: bool,
    /// Whether the resource is bypassed for the entity (the Python library's
    /// `disabled = "bypass"`, resolved like [`Self::disabled`]): acquires are admitted and
    /// counted, nothing is taken.
    pub bypass: bool,
    /// A stored feature this crate does not enforce yet on the level whose limits apply
    /// (schedules, `reset_after` quotas, soft limits, bypass): acquires on stored limits
    /// fail with [`Error::Unsupported`] rather than enforce other numbers.
    pub unsupported: Option<String>,
}

/// A storage backend for buckets, entities and limits.
///
/// Implement it to run the limiter on another store (Redis, Postgres, ...). Bucket values
/// are handled with the pure functions of [`crate::bucket`]; use
/// [`LimitCheck::from_consume`] so every backend reports alike.
#[async_trait]
pub trait Repository: Send + Sync + 'static {
    /// What this backend supports.
    fn capabilities(&self) -> BackendCapabilities;

    /// How long the limiter should cache resolved limits by default.
    fn default_config_cache_ttl(&self) -> Duration {
        Duration::from_secs(60)
    }

    /// How long a caller may wait for one acquire, commit or rollback, retries and
    /// backoff included; the limiter enforces it (the work itself then finishes in the
    /// background, so no write is cut off half-way). `None` (the default): no bound, as
    /// for a backend that answers at once.
    fn operation_timeout(&self) -> Option<Duration> {
        None
    }

    /// A number that changes whenever an entity or stored limit changes, for backends that
    /// can tell cheaply (in-process ones). When it is `Some`, the limiter's config cache is
    /// exact (an entry lives until the version moves or the TTL runs out), and keys with
    /// nothing stored are not cached at all, since such a backend re-reads them as cheaply.
    fn config_version(&self) -> Option<u64> {
        None
    }

    /// Whether the backend knows, without I/O, that nothing at all is stored (no entity,
    /// limits, flag or policy): limits then come from the caller alone, and the limiter
    /// skips the config lookup. Only an in-process backend can tell; the default is
    /// `false` (look up as usual).
    fn stores_nothing(&self) -> bool {
        false
    }

    /// Consumes from every limit of every item, or from none; see the module docs.
    async fn acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome, Error>;

    /// [`Self::acquire`] for a backend that can answer without waiting (an in-process
    /// one): `Some` with the answer, or `None` (the default) to be awaited instead. Lets
    /// the limiter decide without allocating a future.
    fn acquire_now(&self, _request: &AcquireRequest) -> Option<Result<AcquireOutcome, Error>> {
        None
    }

    /// [`Self::acquire_now`] with the answer written into `outcome` rather than returned
    /// (`outcome` arrives cleared, with the buffers of an earlier answer): the limiter
    /// passes the lease's own record, so the answer is written where the lease keeps it
    /// instead of being copied there. The default moves [`Self::acquire_now`]'s answer in;
    /// an in-process backend overrides it to write in place.
    fn acquire_now_into(
        &self,
        request: &AcquireRequest,
        outcome: &mut AcquireOutcome,
    ) -> Option<Result<(), Error>> {
        Some(self.acquire_now(request)?.map(|answer| *outcome = answer))
    }

    /// Applies signed deltas to one item (adjust, commit of adjustments, rollback).
    async fn adjust(&self, request: &AdjustRequest) -> Result<(), Error>;

    /// The stored bucket states of one item by limit name, as last written (not refilled).
    async fn get_buckets(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Result<BTreeMap<String, BucketState>, Error>;

    /// Stores a new entity; [`Error::EntityExists`] if the id is taken.
    async fn create_entity(&self, entity: &Entity) -> Result<(), Error>;

    /// Reads an entity.
    async fn get_entity(&self, entity_id: &str) -> Result<Option<Entity>, Error>;

    /// Deletes an entity with its stored limits and buckets; false if it did not exist.
    async fn delete_entity(&self, entity_id: &str) -> Result<bool, Error>;

    /// The entities whose parent is `parent_id`.
    async fn get_children(&self, parent_id: &str) -> Result<Vec<Entity>, Error>;

    /// Stores limits at a level, replacing what was there.
    async fn set_limits(&self, scope: &ConfigScope, limits: &[Limit]) -> Result<(), Error>;

    /// Reads the limits stored at a level.
    async fn get_limits(&self, scope: &ConfigScope) -> Result<Option<Vec<Limit>>, Error>;

    /// Deletes the limits stored at a level; false if there were none.
    async fn delete_limits(&self, scope: &ConfigScope) -> Result<bool, Error>;

    /// Stores (or with `None` clears) the system's `on_unavailable` policy.
    async fn set_on_unavailable(&self, policy: Option<OnUnavailable>) -> Result<(), Error>;

    /// Reads the system's `on_unavailable` policy, if one is stored.
    async fn get_on_unavailable(&self) -> Result<Option<OnUnavailable>, Error>;

    /// Sets a resource's [`Access`] (or with `None` goes back to inheriting it), for one
    /// entity ([`ConfigScope::Entity`], its resource or `_default_`) or every entity
    /// ([`ConfigScope::Resource`]), as the Python library's `disabled` flag. Returns how
    /// many bucket items it stamped. The default says the backend cannot.
    async fn set_access(
        &self,
        scope: &ConfigScope,
        access: Option<Access>,
    ) -> Result<usize, Error> {
        let _ = (scope, access);
        Err(Error::Backend {
            message: "this backend cannot disable resources".into(),
            source: None,
        })
    }

    /// Every level that has limits stored, with its limits, for tools that export or
    /// compare the whole configuration. The default says the backend cannot list.
    async fn list_limits(&self) -> Result<Vec<(ConfigScope, Vec<Limit>)>, Error> {
        Err(Error::Backend {
            message: "this backend cannot list its stored limits".into(),
            source: None,
        })
    }

    /// Reads the entity and the four config levels for an acquire, in one call.
    async fn load_config(&self, entity_id: &str, resource: &str) -> Result<StoredConfig, Error>;

    /// Usage snapshots (written by [`crate::aggregator`] or the Python aggregator), newest
    /// first, in full pages. A backend that keeps none answers [`Error::NotSupported`].
    async fn usage_snapshots(&self, query: &UsageQuery) -> Result<UsagePage, Error> {
        let _ = query;
        Err(not_supported(self, "usage snapshots"))
    }

    /// Every entity's buckets for `resource` (for capacity queries). A backend that
    /// cannot list them answers [`Error::NotSupported`].
    async fn resource_buckets(&self, resource: &str) -> Result<Vec<ResourceBucket>, Error> {
        let _ = resource;
        Err(not_supported(self, "listing a resource's buckets"))
    }

    /// [`Self::load_config`] without waiting, as [`Self::acquire_now`].
    fn load_config_now(
        &self,
        _entity_id: &str,
        _resource: &str,
    ) -> Option<Result<StoredConfig, Error>> {
        None
    }
}

/// Brings a stored bucket in line with the limit now configured: refills it to `now_ms` under
/// its stored parameters, then adopts the new capacity and rate (clamping tokens to the new
/// capacity). A limit newly added to the config starts full.
///
/// A backend must store the reconciled state once a limit's parameters changed, even when
/// it rejects the acquire: otherwise the bucket goes on refilling at its old rate from its
/// last write (a drained 1-per-day limit raised to 1,000 a minute would stay shut for up
/// to a day). [`params_changed`] tells when.
pub fn reconcile_bucket(stored: Option<&BucketState>, limit: &Limit, now_ms: i64) -> BucketState {
    reconcile_shard(stored, limit, 1, now_ms)
}

/// [`reconcile_bucket`] for one of `shards` shards: `stored` and the result hold the
/// shard's share of the limit (see [`BucketState::for_shard`]).
pub fn reconcile_shard(
    stored: Option<&BucketState>,
    limit: &Limit,
    shards: u32,
    now_ms: i64,
) -> BucketState {
    let fresh = BucketState::for_shard(limit, shards, now_ms);
    let Some(stored) = stored else {
        return fresh;
    };
    let mut state = crate::bucket::refill(stored, now_ms);
    if !same_params(stored, &fresh) {
        state.capacity_milli = fresh.capacity_milli;
        state.refill_amount_milli = fresh.refill_amount_milli;
        state.refill_period_ms = fresh.refill_period_ms;
        state.refill_carry = 0;
        state.tokens_milli = state.tokens_milli.min(state.capacity_milli);
    }
    state
}

/// The error for an adjustment that would put a bucket deeper in debt than
/// [`crate::bucket::MIN_TOKENS_MILLI`]; nothing of it is written.
pub fn debt_too_deep(limit_name: &str, delta: i64) -> Error {
    Error::validation(
        format!("adjust.{limit_name}"),
        delta.to_string(),
        format!(
            "would put the bucket more than {} tokens in debt",
            crate::limit::MAX_TOKENS
        ),
    )
}

/// Whether a stored bucket's capacity, refill amount or period differ from `limit`'s.
pub fn params_changed(stored: &BucketState, limit: &Limit) -> bool {
    shard_params_changed(stored, limit, 1)
}

/// [`params_changed`] for one of `shards` shards, whose `stored` state holds its share.
pub fn shard_params_changed(stored: &BucketState, limit: &Limit, shards: u32) -> bool {
    !same_params(stored, &BucketState::for_shard(limit, shards, 0))
}

/// Whether two states have the same capacity, refill amount and period.
pub fn same_params(a: &BucketState, b: &BucketState) -> bool {
    a.capacity_milli == b.capacity_milli
        && a.refill_amount_milli == b.refill_amount_milli
        && a.refill_period_ms == b.refill_period_ms
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
            entity_id: item.entity_id.to_string(),
            resource: item.resource.to_string(),
            limit: limit.clone(),
            available: check.available,
            requested,
            exceeded: check.exceeded,
            retry_after_ms: check.retry_after_ms,
        })
        .collect()
}
