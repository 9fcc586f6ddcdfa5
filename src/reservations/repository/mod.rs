//! [`Reserving`]: a [`Repository`] that admits hot keys' requests from node-local slices and
//! hands everything else to the backend it wraps.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use async_trait::async_trait;
use dashmap::DashMap;
use parking_lot::{Mutex, MutexGuard};
use smallvec::SmallVec;

use super::give_back::{Credit, GiveBacks};
use super::slice::{bound, targets, Key, KeyState, Slice, Tokens};
use super::{ReservationStats, ReservationStatus, Reservations};
use crate::bucket::BucketState;
use crate::clock::Clock;
use crate::repository::{
    Access, AcquireOutcome, AcquireRequest, AdjustRequest, ConfigScope, LimitCheck, Repository,
    Shard, StoredConfig,
};
use crate::usage::{ResourceBucket, UsagePage, UsageQuery};
use crate::{keys, BackendCapabilities, Entity, Error, Limit, OnUnavailable};

mod backend;
mod hot;

/// How long a key nobody uses and that holds no slice keeps its demand measure.
const FORGET_KEY_AFTER_MS: i64 = 30_000;

/// How long the table part of a lease write whose outcome was unknown is remembered for
/// its re-send (the backend's idempotency window).
const REMEMBER_DOUBT_MS: i64 = 10 * 60_000;

/// Signed whole-token changes per limit, as a lease write carries them.
type Deltas = Vec<(Limit, i64)>;

/// How long a key whose top-up the table refused goes without top-ups.
const SHORT_BACKOFF_MS: i64 = 100;

/// Per item of a request, per limit.
type PerItem<T> = SmallVec<[SmallVec<[T; 2]>; 2]>;

/// The reservation layer over a backend (see [`super`]).
#[derive(Clone)]
pub(crate) struct Reserving {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Arc<dyn Repository>,
    policy: Reservations,
    clock: Arc<dyn Clock>,
    keys: DashMap<Box<str>, Arc<Key>, foldhash::fast::RandomState>,
    give_backs: Arc<GiveBacks>,
    /// Counters through the `metrics` facade (nothing without the feature).
    metrics: Arc<crate::metrics::Metrics>,
    maintenance: AtomicBool,
    /// Set by [`Reserving::release_all`] (shutdown): no slice is taken from then on, and a
    /// top-up that lands afterwards goes straight back.
    closed: AtomicBool,
    /// Lease writes whose table part had an unknown outcome, by write id, with that part
    /// and when: a re-send carries exactly it (the slice part was applied once already).
    doubts: Mutex<HashMap<String, (i64, Deltas)>>,
    local_admits: AtomicU64,
    table_acquires: AtomicU64,
    passed_through: AtomicU64,
}

/// What the slices could do for a request.
enum Local {
    Admitted(AcquireOutcome),
    /// Not covered; whether some item's key is hot.
    Miss {
        hot: bool,
    },
}

/// A request that goes to the table: what each item takes from its slice, what it still
/// needs, and what it tops its slice up by.
struct Plan {
    takes: PerItem<u64>,
    /// The shard each item's takes came from.
    take_shards: SmallVec<[Shard; 2]>,
    deficits: PerItem<u64>,
    top_ups: PerItem<u64>,
}

impl Plan {
    fn has_top_up(&self) -> bool {
        self.top_ups.iter().flatten().any(|t| *t > 0)
    }

    /// The table request: each item's deficit plus `top_ups`.
    fn request(&self, request: &AcquireRequest, top_ups: &PerItem<u64>) -> AcquireRequest {
        let mut table = request.clone();
        for ((item, deficit), top) in table.items.iter_mut().zip(&self.deficits).zip(top_ups) {
            item.amounts = deficit
                .iter()
                .zip(top)
                .map(|(d, t)| d.saturating_add(*t))
                .collect();
        }
        table
    }
}

impl Reserving {
    pub fn new(inner: Arc<dyn Repository>, policy: Reservations, clock: Arc<dyn Clock>) -> Self {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        Reserving {
            shared: Arc::new(Shared {
                give_backs: GiveBacks::new(Arc::clone(&inner), Arc::clone(&metrics)),
                metrics,
                inner,
                policy,
                clock,
                keys: DashMap::with_hasher(foldhash::fast::RandomState::default()),
                maintenance: AtomicBool::new(false),
                closed: AtomicBool::new(false),
                doubts: Mutex::default(),
                local_admits: AtomicU64::new(0),
                table_acquires: AtomicU64::new(0),
                passed_through: AtomicU64::new(0),
            }),
        }
    }

    /// Gives every slice back and waits until every give-back has landed; returns how many
    /// slices went back.
    pub async fn release_all(&self) -> Result<usize, Error> {
        let s = &self.shared;
        s.closed.store(true, Ordering::Release);
        // Top-ups under way land first (they go straight back once closed).
        while s
            .all_keys()
            .iter()
            .any(|k| k.prefetching.load(Ordering::Acquire) || k.gate.try_lock().is_err())
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let now = s.clock.now_ms();
        let credits: Vec<Credit> = s
            .all_keys()
            .iter()
            .filter_map(|key| {
                let slice = key.state.lock().slice.take()?;
                Some(credit_for(key, slice, None, now, s.policy.strict))
            })
            .flatten()
            .collect();
        let count = credits.iter().filter(|c| !c.counts_only).count();
        let sent = futures_util::future::join_all(
            credits
                .into_iter()
                .map(|c| s.give_backs.send(c, now))
                .collect::<Vec<_>>(),
        )
        .await;
        s.give_backs.settled().await;
        sent.into_iter().collect::<Result<Vec<()>, Error>>()?;
        Ok(count)
    }

    /// Gives back the slices unused for the policy's idle time; returns how many.
    pub fn release_idle(&self) -> usize {
        self.shared.release_idle()
    }

    /// What this node holds for an entity and resource.
    pub fn status(&self, entity_id: &str, resource: &str) -> Option<ReservationStatus> {
        let key = self.shared.existing_key(entity_id, resource)?;
        let state = key.state.lock();
        // Per limit name, from the slice if there is one.
        let named = |pick: fn(&Slice) -> &Tokens| -> Vec<(String, i64)> {
            state.slice.as_ref().map_or_else(Vec::new, |s| {
                s.limits
                    .iter()
                    .zip(pick(s))
                    .map(|(l, t)| (l.name.clone(), *t))
                    .collect()
            })
        };
        Some(ReservationStatus {
            held: named(|s| &s.held),
            given_up: named(|s| &s.forfeited),
            request_rate: state.meter.request_rate().round() as u64,
            hot: state.is_hot(&self.shared.policy),
        })
    }

    /// The counters so far.
    pub fn stats(&self) -> ReservationStats {
        let s = &self.shared;
        ReservationStats {
            local_admits: s.local_admits.load(Ordering::Relaxed),
            table_acquires: s.table_acquires.load(Ordering::Relaxed),
            passed_through: s.passed_through.load(Ordering::Relaxed),
            give_backs: s.give_backs.issued.load(Ordering::Relaxed),
            slices: s
                .all_keys()
                .iter()
                .filter(|k| k.state.lock().slice.is_some())
                .count() as u64,
            keys: s.keys.len() as u64,
        }
    }
}

/// The give-back of a slice taken from its key: first what the table's refill made room
/// for is given up ([`Slice::forfeit`]), then the tokens still held go back as a credit and
/// the given-up ones as a count only (they were never spent, but crediting them to a bucket
/// that refilled meanwhile would let them be spent twice).
fn credit_for(
    key: &Key,
    mut slice: Slice,
    limits: Option<&[Limit]>,
    now_ms: i64,
    strict: bool,
) -> SmallVec<[Credit; 2]> {
    if strict {
        slice.forfeit(now_ms);
    }
    [false, true]
        .into_iter()
        .filter_map(|forfeited| {
            Some(Credit::new(
                &key.entity_id,
                &key.resource,
                slice.shard,
                slice.give_back(limits, forfeited)?,
                forfeited,
            ))
        })
        .collect()
}

/// The limits with a non-zero amount, as whole-token deltas.
fn nonzero(limits: &[Limit], amounts: &[u64]) -> Vec<(Limit, i64)> {
    limits
        .iter()
        .zip(amounts)
        .filter(|(_, a)| **a > 0)
        .map(|(l, a)| (l.clone(), i64::try_from(*a).unwrap_or(i64::MAX)))
        .collect()
}

/// The item indices of `keys` in lock order (by entity, then resource), so two cascades
/// over the same pair never wait on each other crosswise.
fn lock_order(keys: &[Arc<Key>]) -> SmallVec<[usize; 2]> {
    let mut order: SmallVec<[usize; 2]> = (0..keys.len()).collect();
    order.sort_by(|a, b| {
        (&keys[*a].entity_id, &keys[*a].resource).cmp(&(&keys[*b].entity_id, &keys[*b].resource))
    });
    order
}

/// Locks every key's state (in lock order) and returns the guards in item order.
fn lock_states(keys: &[Arc<Key>]) -> SmallVec<[MutexGuard<'_, KeyState>; 2]> {
    let mut guards: SmallVec<[Option<MutexGuard<'_, KeyState>>; 2]> =
        keys.iter().map(|_| None).collect();
    for i in lock_order(keys) {
        guards[i] = Some(keys[i].state.lock());
    }
    guards.into_iter().flatten().collect()
}

impl Shared {
    fn all_keys(&self) -> Vec<Arc<Key>> {
        self.keys.iter().map(|e| Arc::clone(e.value())).collect()
    }

    fn existing_key(&self, entity_id: &str, resource: &str) -> Option<Arc<Key>> {
        keys::with_entity_resource(entity_id, resource, |k| {
            self.keys.get(k).map(|e| Arc::clone(e.value()))
        })
    }

    /// The key's state, created on first sight (which starts the background pass that
    /// forgets keys unused for a while, so cold keys do not pile up).
    fn key(self: &Arc<Self>, entity_id: &str, resource: &str) -> Arc<Key> {
        self.existing_key(entity_id, resource).unwrap_or_else(|| {
            self.ensure_maintenance();
            Arc::clone(
                &self
                    .keys
                    .entry(keys::entity_resource(entity_id, resource).into_boxed_str())
                    .or_insert_with(|| Arc::new(Key::new(entity_id, resource))),
            )
        })
    }

    fn keys_of(self: &Arc<Self>, request: &AcquireRequest) -> SmallVec<[Arc<Key>; 2]> {
        request
            .items
            .iter()
            .map(|i| self.key(&i.entity_id, &i.resource))
            .collect()
    }

    /// Admits `request` from the slices if every item's slice covers it (taking the
    /// tokens); counts the request in the keys' demand when `meter`.
    fn take_local(
        self: &Arc<Self>,
        request: &AcquireRequest,
        keys: &[Arc<Key>],
        meter: bool,
    ) -> Local {
        let now = request.now_ms;
        let mut replaced: SmallVec<[Credit; 1]> = SmallVec::new();
        let mut guards = lock_states(keys);
        let mut hot = false;
        let mut covered = true;
        for (state, (item, key)) in guards.iter_mut().zip(request.items.iter().zip(keys)) {
            if meter {
                state.count_request(now, &item.amounts);
            }
            hot |= state.is_hot(&self.policy);
            // Another limit now (a config refresh): the old slice goes back whole.
            if state
                .slice
                .as_ref()
                .is_some_and(|s| !s.is_for(&item.limits))
            {
                if let Some(old) = state.slice.take() {
                    tracing::debug!(entity_id = %item.entity_id, resource = %item.resource, "limits changed; replacing the reservation");
                    replaced.extend(credit_for(
                        key,
                        old,
                        Some(&item.limits),
                        now,
                        self.policy.strict,
                    ));
                }
            }
            if let Some(slice) = state.slice.as_mut().filter(|_| self.policy.strict) {
                slice.forfeit(now);
                // Given up tokens go back once they add up to a slice's bound.
                let full = slice
                    .limits
                    .iter()
                    .zip(&slice.forfeited)
                    .any(|(l, f)| *f > 0 && *f as u64 >= bound(&self.policy, l).max(1));
                if full {
                    replaced.extend(slice.give_back(None, true).map(|deltas| {
                        Credit::new(&key.entity_id, &key.resource, slice.shard, deltas, true)
                    }));
                    slice.forfeited.iter_mut().for_each(|f| *f = 0);
                }
            }
            covered &= state
                .slice
                .as_ref()
                .is_some_and(|s| s.covers(&item.amounts, now, self.policy.strict));
        }
        let mut low: SmallVec<[usize; 2]> = SmallVec::new();
        let outcome = covered.then(|| {
            let mut checks = crate::repository::Checks::new();
            let mut shards = Vec::new();
            for (i, (state, item)) in guards.iter_mut().zip(&request.items).enumerate() {
                let tops_up = state.tops_up(&self.policy, now);
                let target = tops_up
                    .then(|| targets(&self.policy, state, &item.limits, &item.amounts))
                    .flatten();
                let Some(slice) = state.slice.as_mut() else {
                    continue;
                };
                for (k, amount) in item.amounts.iter().enumerate() {
                    let before = slice.held[k];
                    slice.held[k] -= *amount as i64;
                    checks.push(LimitCheck {
                        available: slice.table_most(k, now).saturating_add(before),
                        exceeded: false,
                        retry_after_ms: Some(0),
                    });
                }
                // Under half the target: top up in the background, before it runs dry.
                if target.is_some_and(|t| {
                    t.iter().enumerate().any(|(k, t)| {
                        slice.usable(k, now, self.policy.strict).max(0) as u64 * 2 < *t
                    })
                }) {
                    low.push(i);
                }
                if slice.shard != item.shard {
                    shards.push((i, slice.shard));
                }
            }
            AcquireOutcome {
                admitted: true,
                checks,
                bypassed: Vec::new(),
                shards,
            }
        });
        drop(guards);
        self.send_detached(replaced, now);
        for i in low {
            self.prefetch(request, &keys[i], i);
        }
        match outcome {
            Some(outcome) => {
                self.local_admits.fetch_add(1, Ordering::Relaxed);
                self.metrics.admitted_from_slice(&request.items[0].resource);
                Local::Admitted(outcome)
            }
            None => Local::Miss { hot },
        }
    }

    fn send_detached(&self, credits: impl IntoIterator<Item = Credit>, now_ms: i64) {
        for credit in credits {
            self.give_backs.send_detached(credit, now_ms);
        }
    }

    /// Takes what each item's slice holds toward the request and works out what the table
    /// must provide, and by how much to top each hot key's slice up.
    fn plan(&self, request: &AcquireRequest, keys: &[Arc<Key>], top_up: bool) -> Plan {
        let mut guards = lock_states(keys);
        let mut plan = Plan {
            takes: PerItem::new(),
            take_shards: SmallVec::new(),
            deficits: PerItem::new(),
            top_ups: PerItem::new(),
        };
        for (state, item) in guards.iter_mut().zip(&request.items) {
            let target = (top_up && state.tops_up(&self.policy, request.now_ms) && !item.bypass)
                .then(|| targets(&self.policy, state, &item.limits, &item.amounts))
                .flatten();
            let slice = state.slice.as_mut().filter(|s| s.is_for(&item.limits));
            let mut takes = SmallVec::new();
            let mut deficits = SmallVec::new();
            let mut tops = SmallVec::new();
            plan.take_shards
                .push(slice.as_ref().map_or(item.shard, |s| s.shard));
            let mut slice = slice;
            for (k, amount) in item.amounts.iter().enumerate() {
                let held = slice.as_ref().map_or(0, |s| s.held[k].max(0) as u64);
                let usable = slice.as_ref().map_or(0, |s| {
                    s.usable(k, request.now_ms, self.policy.strict).max(0) as u64
                });
                let take = usable.min(*amount);
                if let Some(s) = slice.as_mut() {
                    s.held[k] -= take as i64;
                }
                takes.push(take);
                deficits.push(amount - take);
                let left = held - take;
                tops.push(target.as_ref().map_or(0, |t| t[k].saturating_sub(left)));
            }
            plan.takes.push(takes);
            plan.deficits.push(deficits);
            plan.top_ups.push(tops);
        }
        plan
    }

    /// Puts a plan's takes back (its table acquire failed or was refused): into the slice
    /// they came from if it is still there, else to the table.
    fn put_back(&self, request: &AcquireRequest, keys: &[Arc<Key>], plan: &Plan) {
        let mut credits: SmallVec<[Credit; 1]> = SmallVec::new();
        for (i, (item, key)) in request.items.iter().zip(keys).enumerate() {
            let takes = &plan.takes[i];
            if takes.iter().all(|t| *t == 0) {
                continue;
            }
            let mut state = key.state.lock();
            match state
                .slice
                .as_mut()
                .filter(|s| s.is_for(&item.limits) && s.shard == plan.take_shards[i])
            {
                Some(slice) => {
                    for (h, t) in slice.held.iter_mut().zip(takes) {
                        *h += *t as i64;
                    }
                }
                // The slice went back meanwhile (idle, or replaced): these tokens are
                // counted back but not credited (the bucket may have refilled into their
                // room meanwhile; never spend them twice).
                None => credits.push(Credit::taking_back(
                    &item.entity_id,
                    &item.resource,
                    plan.take_shards[i],
                    nonzero(&item.limits, takes),
                    true,
                )),
            }
        }
        self.send_detached(credits, request.now_ms);
    }

    /// After the table admitted a plan: the top-ups become (or join) the slices, the
    /// checks report what the request saw, and the lease is pointed at the right shards.
    fn settle(
        &self,
        request: &AcquireRequest,
        keys: &[Arc<Key>],
        plan: &Plan,
        top_ups: &PerItem<u64>,
        outcome: &mut AcquireOutcome,
    ) {
        let now = request.now_ms;
        let mut credits: SmallVec<[Credit; 1]> = SmallVec::new();
        let mut offset = 0;
        for (i, (item, key)) in request.items.iter().zip(keys).enumerate() {
            let n = item.limits.len();
            let placed = outcome
                .shards
                .iter()
                .find(|(k, _)| *k == i)
                .map_or(item.shard, |(_, s)| *s);
            let checks = &mut outcome.checks[offset..offset + n];
            offset += n;
            let top = &top_ups[i];
            let table_after: Tokens = checks
                .iter()
                .zip(plan.deficits[i].iter().zip(top))
                .map(|(c, (d, t))| c.available.saturating_sub(d.saturating_add(*t) as i64))
                .collect();
            for (c, t) in checks.iter_mut().zip(&plan.takes[i]) {
                c.available = c.available.saturating_add(*t as i64);
            }
            let tops = nonzero(&item.limits, top);
            // Admitted without taking tokens (a bypass): the top-up holds nothing, and only
            // its count is taken back. Released meanwhile: it goes straight back.
            let bypassed = outcome.bypassed.contains(&i);
            if bypassed || (self.closed.load(Ordering::Acquire) && !tops.is_empty()) {
                if !tops.is_empty() {
                    credits.push(Credit::taking_back(
                        &item.entity_id,
                        &item.resource,
                        placed,
                        tops,
                        bypassed,
                    ));
                }
                continue;
            }
            let mut state = key.state.lock();
            let current = match state.slice.take() {
                Some(s) if s.is_for(&item.limits) && s.shard == placed => Some(s),
                // Tokens from another shard (a sharded bucket placed this request
                // elsewhere) or under other limits: they go back where they came from.
                Some(stale) => {
                    credits.extend(credit_for(
                        key,
                        stale,
                        Some(&item.limits),
                        now,
                        self.policy.strict,
                    ));
                    None
                }
                None => None,
            };
            let mut slice = match current {
                Some(s) => s,
                None => {
                    if tops.is_empty() {
                        continue;
                    }
                    Slice::new(Arc::clone(&item.limits), placed, table_after.clone(), now)
                }
            };
            for (h, t) in slice.held.iter_mut().zip(top) {
                *h += *t as i64;
            }
            if self.policy.strict {
                slice.forfeit(now);
            }
            slice.table_after = table_after;
            slice.table_at_ms = now;
            if !tops.is_empty() {
                tracing::debug!(
                    entity_id = %item.entity_id,
                    resource = %item.resource,
                    shard = placed.index,
                    held = ?slice.limits.iter().zip(&slice.held).map(|(l, h)| (l.name.as_str(), *h)).collect::<Vec<_>>(),
                    request_rate = state.meter.request_rate(),
                    "reserved a slice"
                );
            }
            state.slice = Some(slice);
        }
        self.send_detached(credits, now);
    }

    /// The second try after a top-up was refused: each limit's top-up cut to what the
    /// table said it had beyond the deficit ("take what is there").
    fn smaller_top_ups(
        request: &AcquireRequest,
        plan: &Plan,
        refused: &AcquireOutcome,
    ) -> PerItem<u64> {
        let mut offset = 0;
        request
            .items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let n = item.limits.len();
                let checks = refused.checks.get(offset..offset + n).unwrap_or(&[]);
                offset += n;
                plan.top_ups[i]
                    .iter()
                    .enumerate()
                    .map(|(k, top)| {
                        let available = checks.get(k).map_or(0, |c| c.available.max(0) as u64);
                        (*top).min(available.saturating_sub(plan.deficits[i][k]))
                    })
                    .collect()
            })
            .collect()
    }

    /// Takes a refusal's word on what the table holds, so slices measure their room from
    /// it (see [`Slice::usable`]).
    fn observe_refusal(
        &self,
        request: &AcquireRequest,
        keys: &[Arc<Key>],
        refused: &AcquireOutcome,
    ) {
        let mut offset = 0;
        for (item, key) in request.items.iter().zip(keys) {
            let n = item.limits.len();
            let checks = refused.checks.get(offset..offset + n).unwrap_or(&[]);
            offset += n;
            let mut state = key.state.lock();
            if let Some(slice) = state.slice.as_mut().filter(|s| s.is_for(&item.limits)) {
                // What the old word no longer leaves room for is given up first: room seen
                // again later never brings given-up tokens back.
                if self.policy.strict {
                    slice.forfeit(request.now_ms);
                }
                for (k, check) in checks.iter().enumerate() {
                    slice.observe_table(k, check.available, request.now_ms);
                }
            }
        }
    }

    /// Starts the task that gives idle slices back and forgets unused keys (on the first
    /// key seen from a tokio runtime).
    fn ensure_maintenance(self: &Arc<Self>) {
        if self.maintenance.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.maintenance.store(false, Ordering::Release);
            return;
        };
        let weak = Arc::downgrade(self);
        let every = (self.policy.idle_return / 2)
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        runtime.spawn(maintain(weak, every));
    }

    fn release_idle(&self) -> usize {
        let now = self.clock.now_ms();
        let idle_ms = i64::try_from(self.policy.idle_return.as_millis()).unwrap_or(i64::MAX);
        let mut credits = Vec::new();
        let mut count = 0;
        for key in self.all_keys() {
            let mut state = key.state.lock();
            if now.saturating_sub(state.last_used_ms) < idle_ms {
                continue;
            }
            if let Some(slice) = state.slice.take() {
                tracing::debug!(entity_id = %key.entity_id, resource = %key.resource, "reservation idle; giving it back");
                credits.extend(credit_for(&key, slice, None, now, self.policy.strict));
                count += 1;
            }
        }
        self.send_detached(credits, now);
        // Keys nobody holds, without a slice, unused for a while: forgotten. Checked under
        // the map's lock, so nobody can pick one up while it goes.
        self.keys.retain(|_, key| {
            Arc::strong_count(key) > 1
                || key.state.try_lock().is_none_or(|s| {
                    s.slice.is_some() || now.saturating_sub(s.last_used_ms) < FORGET_KEY_AFTER_MS
                })
        });
        self.doubts
            .lock()
            .retain(|_, (since, _)| now.saturating_sub(*since) < REMEMBER_DOUBT_MS);
        count
    }

    /// A lease write: drawn on the slice (debits) or returned to it (credits) when the key
    /// holds one for the shard, the rest sent to the table under the same write id.
    async fn adjust(&self, request: &AdjustRequest) -> Result<(), Error> {
        if request.counts_only {
            return self.inner.adjust(request).await;
        }
        // A re-send of a write whose table part had an unknown outcome: exactly that part.
        if let Some(id) = &request.write_id {
            let known = self.doubts.lock().get(id).map(|(_, part)| part.clone());
            if let Some(part) = known {
                return self.send_table_part(request, part).await;
            }
        }
        let Some(key) = self.existing_key(&request.entity_id, &request.resource) else {
            return self.send_table_part(request, request.deltas.clone()).await;
        };
        let mut excess: SmallVec<[Credit; 1]> = SmallVec::new();
        let table_part = {
            let mut state = key.state.lock();
            match state.slice.as_mut().filter(|s| s.shard == request.shard) {
                None => request.deltas.clone(),
                Some(slice) => {
                    let mut rest = Vec::new();
                    let mut over = Vec::new();
                    for (limit, delta) in &request.deltas {
                        let Some(k) = slice.limits.iter().position(|l| l == limit) else {
                            rest.push((limit.clone(), *delta));
                            continue;
                        };
                        if *delta > 0 {
                            let take = slice.held[k].clamp(0, *delta);
                            slice.held[k] -= take;
                            if *delta > take {
                                rest.push((limit.clone(), delta - take));
                            }
                        } else {
                            slice.held[k] = slice.held[k].saturating_sub(*delta);
                            let most =
                                i64::try_from(bound(&self.policy, limit)).unwrap_or(i64::MAX);
                            if slice.held[k] > most {
                                over.push((limit.clone(), most - slice.held[k]));
                                slice.held[k] = most;
                            }
                        }
                    }
                    if !over.is_empty() {
                        excess.push(Credit::new(
                            &key.entity_id,
                            &key.resource,
                            slice.shard,
                            over,
                            false,
                        ));
                    }
                    rest
                }
            }
        };
        self.send_detached(excess, request.now_ms);
        self.send_table_part(request, table_part).await
    }

    async fn send_table_part(
        &self,
        request: &AdjustRequest,
        part: Vec<(Limit, i64)>,
    ) -> Result<(), Error> {
        if part.is_empty() {
            if let Some(id) = &request.write_id {
                self.doubts.lock().remove(id);
            }
            return Ok(());
        }
        let table = AdjustRequest {
            deltas: part,
            ..request.clone()
        };
        let result = self.inner.adjust(&table).await;
        if let Some(id) = &request.write_id {
            let mut doubts = self.doubts.lock();
            match &result {
                Err(Error::Unavailable { .. }) => {
                    doubts
                        .entry(id.clone())
                        .or_insert((request.now_ms, table.deltas));
                }
                _ => {
                    doubts.remove(id);
                }
            }
        }
        result
    }
}

async fn maintain(shared: Weak<Shared>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.release_idle();
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The limiter is gone: what it still holds goes back (best effort, detached).
        let now = self.clock.now_ms();
        let credits: Vec<Credit> = self
            .keys
            .iter()
            .filter_map(|e| {
                let key = e.value();
                let slice = key.state.lock().slice.take()?;
                Some(credit_for(key, slice, None, now, self.policy.strict))
            })
            .flatten()
            .collect();
        self.send_detached(credits, now);
    }
}
