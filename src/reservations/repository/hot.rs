//! The table path of hot keys: a request its slices cannot cover waits for the key's one
//! top-up (or makes it), and a slice running low is topped up in the background.

use super::*;

impl Shared {
    /// Tops item `index`'s slice up in the background (one table acquire of the top-up
    /// alone), unless a top-up for the key is under way: requests go on being admitted from
    /// what is left meanwhile.
    pub(super) fn prefetch(
        self: &Arc<Self>,
        request: &AcquireRequest,
        key: &Arc<Key>,
        index: usize,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if self.closed.load(Ordering::Acquire) || key.prefetching.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut item = request.items[index].clone();
        let (this, key) = (Arc::clone(self), Arc::clone(key));
        runtime.spawn(async move {
            let _done = Prefetching(&key.prefetching);
            // A request's own top-up is under way: that one will do.
            let Ok(_gate) = key.gate.try_lock() else {
                return;
            };
            let now = this.clock.now_ms();
            let (top, shard) = {
                let state = key.state.lock();
                let Some(target) = state
                    .tops_up(&this.policy, now)
                    .then(|| targets(&this.policy, &state, &item.limits, &item.amounts))
                    .flatten()
                else {
                    return;
                };
                let slice = state.slice.as_ref().filter(|s| s.is_for(&item.limits));
                let top: SmallVec<[u64; 2]> = target
                    .iter()
                    .enumerate()
                    .map(|(k, t)| t.saturating_sub(slice.map_or(0, |s| s.held[k].max(0) as u64)))
                    .collect();
                (top, slice.map_or(item.shard, |s| s.shard))
            };
            // Nothing to add: the call (of nothing) still brings the table's word, which
            // shows the room again for held tokens the slice could not use.
            item.amounts = top.clone();
            let n = item.amounts.len();
            let single = AcquireRequest {
                items: smallvec::smallvec![item],
                now_ms: now,
            };
            let plan = Plan {
                takes: smallvec::smallvec![smallvec::smallvec![0; n]],
                take_shards: smallvec::smallvec![shard],
                deficits: smallvec::smallvec![smallvec::smallvec![0; n]],
                top_ups: smallvec::smallvec![top],
            };
            this.table_acquires.fetch_add(1, Ordering::Relaxed);
            this.metrics.went_to_table(&single.items[0].resource);
            match this.inner.acquire(&single).await {
                Ok(mut outcome) if outcome.admitted => {
                    this.settle(
                        &single,
                        std::slice::from_ref(&key),
                        &plan,
                        &plan.top_ups,
                        &mut outcome,
                    );
                }
                Ok(outcome) => {
                    this.observe_refusal(&single, std::slice::from_ref(&key), &outcome);
                    key.state.lock().short_until_ms = now + SHORT_BACKOFF_MS;
                }
                Err(e) => tracing::debug!(error = %e, "a background reservation top-up failed"),
            }
        });
    }

    /// A hot key's request the slices could not cover: one table acquire (per key at a
    /// time on this node) that takes the deficit and tops the slices up.
    pub(super) async fn acquire_hot(
        self: &Arc<Self>,
        request: &AcquireRequest,
        keys: SmallVec<[Arc<Key>; 2]>,
    ) -> Result<AcquireOutcome, Error> {
        self.ensure_maintenance();
        // Tasks that would top a slice up go one at a time (the rest wait for the slice);
        // while the table is short, nobody tops up and everyone goes straight to the
        // table, as without reservations.
        let top_up = !self.closed.load(Ordering::Acquire)
            && keys
                .iter()
                .zip(&request.items)
                .any(|(k, i)| !i.bypass && k.state.lock().tops_up(&self.policy, request.now_ms));
        // One top-up per key at a time: a task that finds one under way waits for it (its
        // slice is sized for every request waiting, see `targets`), since a stampede of
        // writes on one item would only slow that top-up down.
        let mut gates = SmallVec::<[_; 2]>::new();
        if top_up {
            for i in lock_order(&keys) {
                gates.push(keys[i].gate.lock().await);
            }
            if let Local::Admitted(outcome) = self.take_local(request, &keys, false) {
                return Ok(outcome);
            }
        }
        let plan = self.plan(request, &keys, top_up);
        let restore = PutBack {
            shared: self,
            request,
            keys: &keys,
            plan: &plan,
            armed: true,
        };
        self.table_acquires.fetch_add(1, Ordering::Relaxed);
        self.metrics.went_to_table(&request.items[0].resource);
        let mut top_ups = plan.top_ups.clone();
        let started = std::time::Instant::now();
        let mut outcome = self.inner.acquire(&plan.request(request, &top_ups)).await?;
        let took = started.elapsed().as_secs_f64() * 1000.0;
        for key in keys.iter() {
            let mut state = key.state.lock();
            state.latency_ms = if state.latency_ms == 0.0 {
                took
            } else {
                0.8 * state.latency_ms + 0.2 * took
            };
        }
        if !outcome.admitted {
            self.observe_refusal(request, &keys, &outcome);
        }
        if !outcome.admitted && plan.has_top_up() {
            // The table is short: no top-ups for a while, then take what is there, then
            // only what the request needs.
            for key in keys.iter() {
                key.state.lock().short_until_ms = request.now_ms + SHORT_BACKOFF_MS;
            }
            let smaller = Self::smaller_top_ups(request, &plan, &outcome);
            let tries = [
                smaller,
                plan.top_ups
                    .iter()
                    .map(|t| t.iter().map(|_| 0).collect())
                    .collect(),
            ];
            for t in tries {
                if t == top_ups {
                    continue;
                }
                top_ups = t;
                self.table_acquires.fetch_add(1, Ordering::Relaxed);
                self.metrics.went_to_table(&request.items[0].resource);
                self.metrics.went_to_table(&request.items[0].resource);
                outcome = self.inner.acquire(&plan.request(request, &top_ups)).await?;
                if outcome.admitted {
                    break;
                }
                self.observe_refusal(request, &keys, &outcome);
            }
        }
        if !outcome.admitted {
            return Ok(outcome);
        }
        let mut restore = restore;
        restore.armed = false;
        self.settle(request, &keys, &plan, &top_ups, &mut outcome);
        drop(gates);
        Ok(outcome)
    }
}

/// Puts a plan's takes back unless disarmed (the table admitted it): on a refusal, an
/// error, or a future dropped part-way.
struct PutBack<'a> {
    shared: &'a Shared,
    request: &'a AcquireRequest,
    keys: &'a [Arc<Key>],
    plan: &'a Plan,
    armed: bool,
}

impl Drop for PutBack<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.shared.put_back(self.request, self.keys, self.plan);
        }
    }
}

/// Counts a request as waiting on the table for its keys (see [`KeyState::in_flight`]).
pub(super) struct Waiting<'a>(&'a [Arc<Key>]);

impl<'a> Waiting<'a> {
    pub(super) fn start(keys: &'a [Arc<Key>]) -> Self {
        for key in keys {
            key.state.lock().in_flight += 1;
        }
        Waiting(keys)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        for key in self.0 {
            let mut state = key.state.lock();
            state.in_flight = state.in_flight.saturating_sub(1);
        }
    }
}

/// Clears a key's prefetch flag when its background top-up ends, however it ends.
struct Prefetching<'a>(&'a AtomicBool);

impl Drop for Prefetching<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}
