//! [`InMemoryRepository`]: the embedded backend, for a single process.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use ecow::EcoString;
use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;

mod item;

use item::{Item, ParamsTable, States};

/// An item, shared with whoever locks it outside the map. Counted without weak
/// references, so "nobody else holds it" is a load (see [`Inner::with_item`]).
type SharedItem = triomphe::Arc<Mutex<Item>>;

use super::{
    debt_too_deep, reconcile_bucket, Access, AcquireOutcome, AcquireRequest, AdjustRequest,
    ConfigScope, ItemRequest, Repository, StoredConfig,
};
use crate::bucket::{self, BucketState};
use crate::keys;
use crate::naming::DEFAULT_RESOURCE;
use crate::{BackendCapabilities, Entity, Error, Limit, OnUnavailable};

/// How many idle-time-to-fill periods a bucket is kept after its last write, by default.
pub const DEFAULT_IDLE_TTL_MULTIPLIER: u32 = 7;

/// Buckets, entities and limits held in this process's memory.
///
/// Every bucket item (one entity and resource) has its own lock inside a map of 64 shards;
/// the usual acquire holds its item's shard for the arithmetic alone, so tasks hitting one
/// key, or keys of one shard, wait only for each other's arithmetic. Idle items are evicted
/// once they have been idle for `time_to_fill x 7` (and are full again), by a background
/// thread that lives as long as the repository, so memory stays bounded however many
/// distinct keys pass through.
///
/// Clones share the same state. Nothing is shared between processes: use the DynamoDB
/// backend for a fleet.
#[derive(Clone, Debug)]
pub struct InMemoryRepository {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Per `{entity}#{resource}`: keys of up to 15 bytes (an address and a short
    /// resource) inline in the map's 16-byte slot, no block of their own.
    buckets: DashMap<EcoString, SharedItem, foldhash::fast::RandomState>,
    entities: RwLock<HashMap<String, Entity>>,
    configs: RwLock<HashMap<ConfigScope, Arc<[Limit]>>>,
    /// Moves on every entity or config write (see [`Repository::config_version`]).
    version: AtomicU64,
    /// No entity, limits or policy is stored (the common embedded case).
    nothing_stored: AtomicBool,
    /// Serialises [`Inner::bump`], so the last writer's view of emptiness is the one kept.
    bump_lock: Mutex<()>,
    on_unavailable: RwLock<Option<OnUnavailable>>,
    /// Explicit access flags by level (entity+resource, entity `_default_`, resource).
    access: RwLock<HashMap<ConfigScope, Access>>,
    /// The latest time any call has passed in; eviction measures idleness against it, so it
    /// follows a manual clock in tests.
    latest_now_ms: AtomicI64,
    idle_ttl_multiplier: u32,
    /// The limit names and parameters the buckets share.
    params: ParamsTable,
}

/// Builder for [`InMemoryRepository`].
#[derive(Debug, Clone)]
pub struct InMemoryRepositoryBuilder {
    idle_ttl_multiplier: u32,
    sweep_interval: Option<Duration>,
}

impl InMemoryRepositoryBuilder {
    /// How many times its time to fill an idle item is kept (default 7, at least 1).
    pub fn idle_ttl_multiplier(mut self, multiplier: u32) -> Self {
        self.idle_ttl_multiplier = multiplier.max(1);
        self
    }

    /// How often the background thread evicts idle items (default 1 s); `None` runs no
    /// thread, leaving eviction to [`InMemoryRepository::evict_idle`].
    pub fn sweep_interval(mut self, interval: Option<Duration>) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// Builds the repository (and starts its sweeper thread, if any).
    pub fn build(self) -> InMemoryRepository {
        let inner = Arc::new(Inner {
            // foldhash: fast, and seeded per process, so keys cannot be chosen to collide.
            buckets: DashMap::with_hasher_and_shard_amount(
                foldhash::fast::RandomState::default(),
                64,
            ),
            entities: RwLock::default(),
            configs: RwLock::default(),
            version: AtomicU64::new(0),
            nothing_stored: AtomicBool::new(true),
            bump_lock: Mutex::new(()),
            on_unavailable: RwLock::default(),
            access: RwLock::default(),
            latest_now_ms: AtomicI64::new(i64::MIN),
            idle_ttl_multiplier: self.idle_ttl_multiplier,
            params: ParamsTable::default(),
        });
        if let Some(interval) = self.sweep_interval {
            spawn_sweeper(Arc::downgrade(&inner), interval);
        }
        InMemoryRepository { inner }
    }
}

/// The sweeper holds only a weak reference and ends once the repository is dropped.
fn spawn_sweeper(inner: Weak<Inner>, interval: Duration) {
    let spawned = std::thread::Builder::new()
        .name("zae-limiter-sweeper".into())
        .spawn(move || loop {
            std::thread::sleep(interval);
            match inner.upgrade() {
                Some(inner) => {
                    inner.evict_idle();
                }
                None => return,
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the in-memory sweeper; idle buckets are evicted only by evict_idle()");
    }
}

impl Default for InMemoryRepository {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryRepository {
    /// A repository with default settings and a background sweeper.
    pub fn new() -> Self {
        Self::builder().build()
    }

    /// A builder for non-default settings.
    pub fn builder() -> InMemoryRepositoryBuilder {
        InMemoryRepositoryBuilder {
            idle_ttl_multiplier: DEFAULT_IDLE_TTL_MULTIPLIER,
            sweep_interval: Some(Duration::from_secs(1)),
        }
    }

    /// How many bucket items (entity and resource pairs) are held.
    pub fn len(&self) -> usize {
        self.inner.buckets.len()
    }

    /// Whether no bucket item is held.
    pub fn is_empty(&self) -> bool {
        self.inner.buckets.is_empty()
    }

    /// Evicts every idle item now; returns how many were evicted.
    pub fn evict_idle(&self) -> usize {
        self.inner.evict_idle()
    }
}

impl Inner {
    /// Records a write of entities, limits or the policy.
    fn bump(&self) {
        let _serial = self.bump_lock.lock();
        let empty = read(&self.configs).is_empty()
            && read(&self.entities).is_empty()
            && read(&self.on_unavailable).is_none()
            && read(&self.access).is_empty();
        self.nothing_stored.store(empty, Ordering::Release);
        self.version.fetch_add(1, Ordering::AcqRel);
    }

    fn observe(&self, now_ms: i64) {
        // Read first: the value moves once a millisecond, and writing it on every call
        // would bounce its cache line between cores.
        if self.latest_now_ms.load(Ordering::Relaxed) < now_ms {
            self.latest_now_ms.fetch_max(now_ms, Ordering::Relaxed);
        }
    }

    fn evict_idle(&self) -> usize {
        let now = self.latest_now_ms.load(Ordering::Relaxed);
        let before = self.buckets.len();
        self.buckets.retain(|_, item| {
            // An item someone holds is in use: keep it.
            let Some(mut guard) = item.try_lock() else {
                return true;
            };
            if guard.evict_at_ms(self.idle_ttl_multiplier) <= now {
                guard.mark_evicted();
                false
            } else {
                true
            }
        });
        self.params.prune();
        before.saturating_sub(self.buckets.len())
    }

    fn item(&self, entity_id: &str, resource: &str) -> SharedItem {
        let found = keys::with_entity_resource(entity_id, resource, |key| {
            self.buckets.get(key).map(|item| SharedItem::clone(&item))
        });
        found.unwrap_or_else(|| {
            SharedItem::clone(
                &self
                    .buckets
                    .entry(EcoString::from(keys::entity_resource(entity_id, resource)))
                    .or_default(),
            )
        })
    }

    /// Runs `f` on one item, locked, creating the item if it is missing.
    ///
    /// The usual case holds the map's shard exclusively: no other thread can then reach
    /// the item through the map, so if the map holds its only reference it is used without
    /// its own lock (two atomic instructions fewer), else its lock is *tried*. Waiting for
    /// an item while holding a shard could deadlock with a cascade that holds that item and
    /// waits for the shard, so a busy item is locked the slow way, through its own
    /// reference.
    fn with_item<T>(&self, entity_id: &str, resource: &str, f: impl FnOnce(&mut Item) -> T) -> T {
        let mut f = Some(f);
        let fast = keys::with_entity_resource(entity_id, resource, |key| {
            let mut found = self.buckets.get_mut(key)?;
            let shared = found.value_mut();
            // Removed items are marked after they left the map: never seen here.
            if let Some(alone) = SharedItem::get_mut(shared) {
                return f.take().map(|f| f(alone.get_mut()));
            }
            let mut item = shared.try_lock()?;
            f.take().map(|f| f(&mut item))
        });
        match (fast, f) {
            (Some(done), _) => done,
            (None, Some(f)) => self.with_locked(&[(entity_id, resource)], |items| f(items[0])),
            (None, None) => unreachable!("f runs only when it returns"),
        }
    }

    /// Runs `f` on the items for `keys` (entity, resource; already in lock order and
    /// distinct), each locked through its own reference, retrying any that eviction removed
    /// between lookup and lock.
    fn with_locked<T>(&self, keys: &[(&str, &str)], f: impl FnOnce(&mut [&mut Item]) -> T) -> T {
        loop {
            let shared: SmallVec<[SharedItem; 2]> =
                keys.iter().map(|(e, r)| self.item(e, r)).collect();
            let mut guards: SmallVec<[MutexGuard<'_, Item>; 2]> =
                shared.iter().map(|item| item.lock()).collect();
            if guards.iter().all(|g| !g.is_evicted()) {
                let mut items: SmallVec<[&mut Item; 2]> =
                    guards.iter_mut().map(|g| &mut **g).collect();
                return f(&mut items);
            }
        }
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

#[async_trait]
impl Repository for InMemoryRepository {
    fn capabilities(&self) -> BackendCapabilities {
        BackendCapabilities {
            supports_batch_operations: true,
            ..BackendCapabilities::default()
        }
    }

    fn config_version(&self) -> Option<u64> {
        Some(self.inner.version.load(Ordering::Acquire))
    }

    fn stores_nothing(&self) -> bool {
        self.inner.nothing_stored.load(Ordering::Acquire)
    }

    async fn acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome, Error> {
        Ok(self.decide(request))
    }

    fn acquire_now(&self, request: &AcquireRequest) -> Option<Result<AcquireOutcome, Error>> {
        Some(Ok(self.decide(request)))
    }

    fn acquire_now_into(
        &self,
        request: &AcquireRequest,
        outcome: &mut AcquireOutcome,
    ) -> Option<Result<(), Error>> {
        self.decide_into(request, outcome);
        Some(Ok(()))
    }

    fn load_config_now(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Option<Result<StoredConfig, Error>> {
        Some(Ok(self.read_config(entity_id, resource)))
    }

    async fn adjust(&self, request: &AdjustRequest) -> Result<(), Error> {
        self.adjust_now(request)
    }

    async fn get_buckets(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Result<BTreeMap<String, BucketState>, Error> {
        let item = keys::with_entity_resource(entity_id, resource, |key| {
            self.inner.buckets.get(key).map(|i| SharedItem::clone(&i))
        });
        let Some(item) = item else {
            return Ok(BTreeMap::new());
        };
        let guard = item.lock();
        Ok(guard
            .states()
            .map(|(name, state)| (name.to_string(), state))
            .collect())
    }

    async fn create_entity(&self, entity: &Entity) -> Result<(), Error> {
        let mut entities = write(&self.inner.entities);
        if entities.contains_key(&entity.id) {
            return Err(Error::EntityExists {
                entity_id: entity.id.clone(),
            });
        }
        entities.insert(entity.id.clone(), entity.clone());
        drop(entities);
        self.inner.bump();
        Ok(())
    }

    async fn resource_buckets(
        &self,
        resource: &str,
    ) -> Result<Vec<crate::usage::ResourceBucket>, Error> {
        crate::naming::validate_resource(resource)?;
        // Never block on an item lock while holding a map shard: collect, then lock.
        let suffix = format!("#{resource}");
        let items: Vec<(String, SharedItem)> = self
            .inner
            .buckets
            .iter()
            .filter_map(|e| {
                // Entity ids cannot hold `#`: the key splits at its only `#`.
                let entity = e.key().strip_suffix(suffix.as_str())?;
                (!entity.contains('#')).then(|| (entity.to_string(), SharedItem::clone(e.value())))
            })
            .collect();
        let entities = read(&self.inner.entities);
        let mut found: Vec<crate::usage::ResourceBucket> = items
            .into_iter()
            .filter_map(|(entity_id, item)| {
                let item = item.lock();
                (!item.is_evicted()).then(|| crate::usage::ResourceBucket {
                    parent_id: entities.get(&entity_id).and_then(|e| e.parent_id.clone()),
                    states: item
                        .states()
                        .map(|(name, state)| (name.to_string(), state))
                        .collect(),
                    entity_id,
                })
            })
            .collect();
        found.sort_by(|a, b| a.entity_id.cmp(&b.entity_id));
        Ok(found)
    }

    async fn get_entity(&self, entity_id: &str) -> Result<Option<Entity>, Error> {
        Ok(read(&self.inner.entities).get(entity_id).cloned())
    }

    async fn delete_entity(&self, entity_id: &str) -> Result<bool, Error> {
        let existed = write(&self.inner.entities).remove(entity_id).is_some();
        write(&self.inner.configs).retain(
            |scope, _| !matches!(scope, ConfigScope::Entity { entity_id: e, .. } if e == entity_id),
        );
        // Never block on an item lock while holding a map shard: collect, remove, then mark.
        let prefix = keys::entity_resource(entity_id, "");
        let keys: Vec<EcoString> = self
            .inner
            .buckets
            .iter()
            .filter(|e| e.key().starts_with(&prefix))
            .map(|e| e.key().clone())
            .collect();
        for key in keys {
            if let Some((_, item)) = self.inner.buckets.remove(&key) {
                item.lock().mark_evicted();
            }
        }
        Ok(existed)
    }

    async fn get_children(&self, parent_id: &str) -> Result<Vec<Entity>, Error> {
        let mut children: Vec<Entity> = read(&self.inner.entities)
            .values()
            .filter(|e| e.parent_id.as_deref() == Some(parent_id))
            .cloned()
            .collect();
        children.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(children)
    }

    async fn set_limits(&self, scope: &ConfigScope, limits: &[Limit]) -> Result<(), Error> {
        write(&self.inner.configs).insert(scope.clone(), limits.into());
        self.inner.bump();
        Ok(())
    }

    async fn get_limits(&self, scope: &ConfigScope) -> Result<Option<Vec<Limit>>, Error> {
        Ok(read(&self.inner.configs).get(scope).map(|l| l.to_vec()))
    }

    async fn delete_limits(&self, scope: &ConfigScope) -> Result<bool, Error> {
        let removed = write(&self.inner.configs).remove(scope).is_some();
        self.inner.bump();
        Ok(removed)
    }

    async fn set_on_unavailable(&self, policy: Option<OnUnavailable>) -> Result<(), Error> {
        *write(&self.inner.on_unavailable) = policy;
        self.inner.bump();
        Ok(())
    }

    async fn get_on_unavailable(&self) -> Result<Option<OnUnavailable>, Error> {
        Ok(*read(&self.inner.on_unavailable))
    }

    async fn set_access(
        &self,
        scope: &ConfigScope,
        access: Option<Access>,
    ) -> Result<usize, Error> {
        let mut flags = write(&self.inner.access);
        match access {
            Some(flag) => flags.insert(scope.clone(), flag),
            None => flags.remove(scope),
        };
        drop(flags);
        self.inner.bump();
        // Every acquire reads the flags afresh: nothing to stamp.
        Ok(0)
    }

    async fn list_limits(&self) -> Result<Vec<(ConfigScope, Vec<Limit>)>, Error> {
        let mut all: Vec<(ConfigScope, Vec<Limit>)> = read(&self.inner.configs)
            .iter()
            .map(|(scope, limits)| (scope.clone(), limits.to_vec()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(all)
    }

    async fn load_config(&self, entity_id: &str, resource: &str) -> Result<StoredConfig, Error> {
        Ok(self.read_config(entity_id, resource))
    }
}

impl InMemoryRepository {
    fn read_config(&self, entity_id: &str, resource: &str) -> StoredConfig {
        // Nothing stored at all (limits passed in code): no key to look up, and no shared
        // lock touched.
        if self.inner.nothing_stored.load(Ordering::Acquire) {
            return StoredConfig::default();
        }
        let configs = read(&self.inner.configs);
        let entity_scope = |r: &str| ConfigScope::Entity {
            entity_id: entity_id.to_string(),
            resource: r.to_string(),
        };
        // Most stores hold no flag: build no scope keys for them.
        let access = {
            let flags = read(&self.inner.access);
            if flags.is_empty() {
                None
            } else {
                [
                    entity_scope(resource),
                    entity_scope(DEFAULT_RESOURCE),
                    ConfigScope::Resource(resource.to_string()),
                ]
                .iter()
                .find_map(|scope| flags.get(scope).copied())
            }
        };
        StoredConfig {
            entity: read(&self.inner.entities)
                .get(entity_id)
                .cloned()
                .map(Arc::new),
            entity_limits: configs.get(&entity_scope(resource)).cloned(),
            entity_default_limits: if resource == DEFAULT_RESOURCE {
                None
            } else {
                configs.get(&entity_scope(DEFAULT_RESOURCE)).cloned()
            },
            resource_limits: configs
                .get(&ConfigScope::Resource(resource.to_string()))
                .cloned(),
            system_limits: configs.get(&ConfigScope::System).cloned(),
            on_unavailable: *read(&self.inner.on_unavailable),
            disabled: access == Some(Access::Disabled),
            bypass: access == Some(Access::Bypassed),
            ..StoredConfig::default()
        }
    }

    fn decide(&self, request: &AcquireRequest) -> AcquireOutcome {
        let mut outcome = AcquireOutcome::default();
        self.decide_into(request, &mut outcome);
        outcome
    }

    /// [`Self::decide`], the answer written into `outcome`, which arrives cleared (a new
    /// one, or a reused lease's, cleared when it was kept: see
    /// [`Repository::acquire_now_into`]).
    fn decide_into(&self, request: &AcquireRequest, outcome: &mut AcquireOutcome) {
        let now = request.now_ms;
        self.inner.observe(now);
        let items = &request.items;
        if let [item] = items.as_slice() {
            return self.decide_one(item, now, outcome);
        }
        // Lock in key order so two cascades over the same pair cannot deadlock.
        let mut order: SmallVec<[usize; 2]> = (0..items.len()).collect();
        let key_of = |i: usize| (items[i].entity_id.as_str(), items[i].resource.as_str());
        order.sort_by(|a, b| key_of(*a).cmp(&key_of(*b)));
        order.dedup_by(|a, b| key_of(*a) == key_of(*b));
        let keys: SmallVec<[(&str, &str); 2]> = order.iter().map(|i| key_of(*i)).collect();
        let guard_of = |item: usize| {
            keys.iter()
                .position(|k| *k == key_of(item))
                .expect("every key was locked")
        };
        let params = &self.inner.params;
        // Check everything first; write only if every limit of every item fits.
        let total: usize = items.iter().map(|i| i.limits.len()).sum();
        let checks = &mut outcome.checks;
        checks.reserve(total);
        let admitted = self.inner.with_locked(&keys, |guards| {
            let mut admitted = true;
            let mut charged: SmallVec<[(usize, States); 2]> = SmallVec::new();
            for (i, item) in items.iter().enumerate() {
                let g = guard_of(i);
                let (fits, states) = guards[g].charge(item, now, checks);
                admitted &= fits;
                charged.push((g, states));
            }
            if admitted {
                for ((g, states), item) in charged.into_iter().zip(items) {
                    for (limit, state) in item.limits.iter().zip(states) {
                        guards[g].put(&limit.name, state, params);
                    }
                }
                for g in guards.iter_mut() {
                    g.touch(now);
                }
            } else {
                for (i, item) in items.iter().enumerate() {
                    guards[guard_of(i)].adopt_changed_params(item, now, params);
                }
            }
            admitted
        });
        outcome.admitted = admitted;
        outcome
            .bypassed
            .extend((0..items.len()).filter(|&i| items[i].bypass));
    }

    /// [`Self::decide_into`] for the usual single item (no cascade), without the
    /// bookkeeping that ordering several locks needs (measurably cheaper on the hot path).
    fn decide_one(&self, item: &ItemRequest, now: i64, outcome: &mut AcquireOutcome) {
        let checks = &mut outcome.checks;
        checks.reserve(item.limits.len());
        let params = &self.inner.params;
        outcome.admitted = self
            .inner
            .with_item(&item.entity_id, &item.resource, |guard| {
                guard.charge_and_write(item, now, checks, params)
            });
        if item.bypass {
            outcome.bypassed.push(0);
        }
    }

    /// Applies every delta or none: one that would pass the debt bound refuses the lot.
    fn adjust_now(&self, request: &AdjustRequest) -> Result<(), Error> {
        let now = request.now_ms;
        self.inner.observe(now);
        let params = &self.inner.params;
        self.inner
            .with_item(&request.entity_id, &request.resource, |item| {
                let mut next: SmallVec<[BucketState; 4]> = SmallVec::new();
                for (limit, delta) in &request.deltas {
                    let current = reconcile_bucket(item.get(&limit.name).as_ref(), limit, now);
                    if request.counts_only {
                        next.push(bucket::count_only(&current, *delta, now).state);
                        continue;
                    }
                    let state = bucket::force_consume(&current, *delta, now);
                    if state.tokens_milli < bucket::MIN_TOKENS_MILLI {
                        return Err(debt_too_deep(&limit.name, *delta));
                    }
                    next.push(state);
                }
                for ((limit, _), state) in request.deltas.iter().zip(next) {
                    item.put(&limit.name, state, params);
                }
                item.touch(now);
                Ok(())
            })
    }
}
