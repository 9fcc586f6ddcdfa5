//! [`Acquire`]: one acquire being set up, decided now when it can be, else awaited.

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use compact_str::CompactString;
use smallvec::SmallVec;

use super::{no_limits, resolve, BoxFuture, RateLimiter};
use crate::amount::{checked_amounts, named_amounts, Amount};
use crate::lease::{Lease, Prepared};
use crate::repository::{
    statuses, AcquireOutcome, AcquireRequest, Amounts, ItemRequest, Items, StoredConfig,
};
use crate::{limit, naming, ConfigSource, Error, Limit, OnUnavailable, RateLimitExceeded};

/// An acquire being set up: `.limits`, `.fallback_limits`, `.consume`, `.cascade`,
/// `.on_unavailable`, then `.await`.
#[must_use = "an acquire does nothing until it is awaited"]
#[derive(Clone, Debug)]
pub struct Acquire {
    limiter: RateLimiter,
    entity_id: CompactString,
    resource: CompactString,
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
    #[inline]
    pub(super) fn new(
        limiter: RateLimiter,
        entity_id: CompactString,
        resource: CompactString,
    ) -> Self {
        Acquire {
            limiter,
            entity_id,
            resource,
            limits: None,
            fallback: None,
            lists_checked: false,
            undecided: false,
            consume: None,
            cascade: None,
            on_unavailable: None,
        }
    }

    /// An acquire set up in one step by the HTTP layer, from lists it validated once
    /// (no builder call moving the acquire per option).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn checked(
        limiter: RateLimiter,
        entity_id: CompactString,
        resource: CompactString,
        limits: Option<Arc<[Limit]>>,
        fallback: Option<Arc<[Limit]>>,
        consume: Option<Vec<(String, i128)>>,
        cascade: Option<bool>,
        on_unavailable: Option<OnUnavailable>,
    ) -> Self {
        Acquire {
            limiter,
            entity_id,
            resource,
            limits,
            fallback,
            lists_checked: true,
            undecided: false,
            consume,
            cascade,
            on_unavailable,
        }
    }

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
    #[inline]
    pub fn shared_limits(mut self, limits: Arc<[Limit]>) -> Self {
        self.limits = Some(limits);
        self
    }

    /// [`Self::fallback_limits`] from a list shared with other acquires (no copy).
    #[inline]
    pub fn shared_fallback_limits(mut self, limits: Arc<[Limit]>) -> Self {
        self.fallback = Some(limits);
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
    #[inline]
    pub fn cascade(mut self, cascade: bool) -> Self {
        self.cascade = Some(cascade);
        self
    }

    /// The outage policy for this call, overriding the limiter's and the stored one.
    #[inline]
    pub fn on_unavailable(mut self, policy: OnUnavailable) -> Self {
        self.on_unavailable = Some(policy);
        self
    }

    /// Validates the input; returns the checked consume amounts.
    fn validate(&self) -> Result<Option<Vec<(String, i64)>>, Error> {
        self.validate_names()?;
        self.checked_consume()
    }

    /// Validates the entity, the resource and the limit lists. Apart from
    /// [`Self::checked_consume`] so the usual acquire (no amounts named) reads one
    /// small result rather than a large one just written.
    fn validate_names(&self) -> Result<(), Error> {
        naming::validate_entity_id(&self.entity_id)?;
        naming::validate_resource(&self.resource)?;
        if !self.lists_checked {
            if let Some(l) = &self.limits {
                limit::validate_shared(l)?;
            }
            if let Some(l) = &self.fallback {
                limit::validate_shared(l)?;
            }
        }
        Ok(())
    }

    /// The consume amounts, checked (`None`: 1 from every limit).
    fn checked_consume(&self) -> Result<Option<Vec<(String, i64)>>, Error> {
        match &self.consume {
            Some(c) => Ok(Some(checked_amounts("consume", c, false)?)),
            None => Ok(None),
        }
    }

    /// Applies the outage policy to a decision. The outage is logged once, then as a
    /// count every 10 s (a line per request would flood the log when it matters most).
    fn apply_policy(&self, decision: Result<Lease, Error>) -> Result<Lease, Error> {
        if matches!(decision, Err(Error::Unavailable { .. })) {
            self.limiter.inner.metrics.decided(
                &self.resource,
                crate::metrics::Outcome::Unavailable,
                &[],
                &[],
            );
        }
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

    /// An entity's limits as resolved from `stored`, whether its item may expire once
    /// idle, and whether the list is this acquire's own (`.limits`).
    fn charges<'a>(&'a self, stored: &'a StoredConfig) -> Option<(&'a Arc<[Limit]>, bool, bool)> {
        let (limits, source) = resolve(stored, self.limits.as_ref(), self.fallback.as_ref())?;
        // Limits stored for this entity (for this resource or all of them) keep its
        // buckets; shared levels let an idle item expire.
        let own = matches!(source, ConfigSource::Entity | ConfigSource::EntityDefault);
        let explicit = matches!(source, ConfigSource::Override);
        Some((limits, !own, explicit))
    }

    /// The parent's item for a cascade, if its limits resolve.
    fn parent_item(
        &self,
        parent_id: &str,
        stored: &StoredConfig,
        consume: Option<&[(String, i64)]>,
    ) -> Option<ItemRequest> {
        let (limits, expires_when_idle, _) = self.charges(stored)?;
        Some(ItemRequest {
            entity_id: parent_id.into(),
            resource: self.resource.clone(),
            limits: Arc::clone(limits),
            amounts: amounts_for(limits, consume),
            expires_when_idle,
            owner: stored.entity.clone(),
            bypass: stored.bypass,
            shard: Default::default(),
        })
    }

    /// The entity's own limits (`None`: this acquire's own list, `.limits`, which the
    /// caller moves or clones), and the parent to charge too (if it cascades).
    #[allow(clippy::type_complexity)]
    fn own_charges<'s>(
        &self,
        stored: &'s StoredConfig,
    ) -> Result<(Option<Arc<[Limit]>>, bool, Option<&'s str>), Error> {
        if stored.disabled {
            self.limiter.inner.metrics.decided(
                &self.resource,
                crate::metrics::Outcome::Disabled,
                &[],
                &[],
            );
            return Err(Error::ResourceDisabled {
                entity_id: self.entity_id.to_string(),
                resource: self.resource.to_string(),
            });
        }
        if let (Some(feature), None) = (&stored.unsupported, &self.limits) {
            return Err(Error::Unsupported {
                feature: feature.clone(),
                entity_id: self.entity_id.to_string(),
                resource: self.resource.to_string(),
            });
        }
        let (limits, expires, explicit) = self
            .charges(stored)
            .ok_or_else(|| no_limits(&self.entity_id, &self.resource))?;
        let limits = (!explicit).then(|| Arc::clone(limits));
        let entity = stored.entity.as_ref();
        let cascade = self
            .cascade
            .unwrap_or_else(|| entity.is_some_and(|e| e.cascade));
        let parent = entity
            .and_then(|e| e.parent_id.as_deref())
            .filter(|_| cascade);
        Ok((limits, expires, parent))
    }

    /// Turns the backend's answer into a lease or a rejection.
    fn finish(&self, request: AcquireRequest, outcome: AcquireOutcome) -> Result<Lease, Error> {
        self.judge(&request, &outcome)?;
        Ok(Lease::prepare(request).admit(outcome, self.limiter.clone()))
    }

    /// Counts the backend's answer, and turns a refusal into the rejection.
    fn judge(&self, request: &AcquireRequest, outcome: &AcquireOutcome) -> Result<(), Error> {
        self.limiter.inner.metrics.decided(
            &request.items[0].resource,
            if outcome.admitted {
                crate::metrics::Outcome::Admitted
            } else {
                crate::metrics::Outcome::Rejected
            },
            &request.items,
            &outcome.checks,
        );
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
        Ok(())
    }

    async fn decide(&self, consume: Option<&[(String, i64)]>) -> Result<Lease, Error> {
        let limiter = &self.limiter;
        let now = limiter.now_ms();
        let stored = limiter
            .stored_config(&self.entity_id, &self.resource, now)
            .await?;
        let (limits, expires_when_idle, parent) = self.own_charges(&stored)?;
        let limits = limits
            .or_else(|| self.limits.clone())
            .ok_or_else(|| no_limits(&self.entity_id, &self.resource))?;
        let mut items: Items = smallvec::smallvec![ItemRequest {
            entity_id: self.entity_id.clone(),
            resource: self.resource.clone(),
            amounts: amounts_for(&limits, consume),
            limits,
            expires_when_idle,
            owner: stored.entity.clone(),
            bypass: stored.bypass,
            shard: Default::default(),
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

    /// [`Self::decide`] without waiting, consuming the acquire: the lease or the error
    /// (the outage policy applied), or the acquire back as soon as a step would wait for
    /// I/O. Admitted, the acquire's limiter moves into the lease (no reference count
    /// touched), and the backend's answer is read where it lands rather than passed on.
    ///
    /// The entity id and resource move into the request (the lease keeps them) rather
    /// than being copied; they are put back whenever the acquire is not decided here.
    fn decide_now(
        mut self,
        consume: Option<&[(String, i64)]>,
    ) -> Result<Result<Lease, Error>, Self> {
        let mut lookups = SmallVec::new();
        let decided = match self.prepare_now(consume, &mut lookups) {
            None => None,
            Some(Err(e)) => Some(Err(e)),
            Some(Ok((mut prepared, moved_limits))) => {
                // Answered in place: the outcome is written in the lease, never moved.
                let repo = &self.limiter.inner.repo;
                match prepared
                    .decide_in_place(|request, outcome| repo.acquire_now_into(request, outcome))
                {
                    Some(Ok(())) => match self.judge(prepared.request(), prepared.outcome()) {
                        Ok(()) => {
                            self.count_lookups(lookups);
                            return Ok(Ok(prepared.admit_decided(self.limiter)));
                        }
                        // Refused: the entity and resource come back for the error's
                        // handling (an outage admitted under `Allow` names them).
                        Err(e) => {
                            self.take_back(&mut prepared.into_request(), moved_limits);
                            Some(Err(e))
                        }
                    },
                    Some(Err(e)) => {
                        self.take_back(&mut prepared.into_request(), moved_limits);
                        Some(Err(e))
                    }
                    None => {
                        self.take_back(&mut prepared.into_request(), moved_limits);
                        None
                    }
                }
            }
        };
        match decided {
            Some(decision) => {
                self.count_lookups(lookups);
                Ok(self.apply_policy(decision))
            }
            None => {
                self.undecided = true;
                Err(self)
            }
        }
    }

    /// Counts the config cache lookups of a decided acquire.
    fn count_lookups(&self, lookups: SmallVec<[bool; 2]>) {
        for hit in lookups {
            self.limiter.inner.cache.count(hit);
        }
    }

    /// The lease prepared with the request to decide (and whether this acquire's own
    /// limit list moved into it), or the error; `None` if the config needs I/O.
    fn prepare_now(
        &mut self,
        consume: Option<&[(String, i64)]>,
        lookups: &mut SmallVec<[bool; 2]>,
    ) -> Option<Result<(Prepared, bool), Error>> {
        let limiter = &self.limiter;
        let now = limiter.now_ms();
        let stored =
            match limiter.stored_config_now(&self.entity_id, &self.resource, now, lookups)? {
                Ok(stored) => stored,
                Err(e) => return Some(Err(e)),
            };
        let (limits, expires_when_idle, parent) = match self.own_charges(&stored) {
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
        // This acquire's own list moves into the request (no reference counted).
        let moved_limits = limits.is_none();
        let Some(limits) = limits.or_else(|| self.limits.take()) else {
            return Some(Err(no_limits(&self.entity_id, &self.resource)));
        };
        // The lease is allocated first and the request built in it: decided at once, the
        // request is never moved again.
        let mut prepared = Lease::prepare_empty(now);
        prepared.push(ItemRequest {
            entity_id: std::mem::take(&mut self.entity_id),
            resource: std::mem::take(&mut self.resource),
            amounts: amounts_for(&limits, consume),
            limits,
            expires_when_idle,
            owner: stored.entity.clone(),
            bypass: stored.bypass,
            shard: Default::default(),
        });
        if let Some(parent) = parent_item {
            prepared.push(parent);
        }
        Some(Ok((prepared, moved_limits)))
    }

    /// Moves the entity id and resource (and this acquire's own limit list, if it moved)
    /// back from a request that was not decided.
    fn take_back(&mut self, request: &mut AcquireRequest, limits_moved: bool) {
        let own = request.items.swap_remove(0);
        self.entity_id = own.entity_id;
        self.resource = own.resource;
        if limits_moved {
            self.limits = Some(own.limits);
        }
    }

    /// Decides at once when the backend can answer without I/O (the in-memory backend
    /// always can), else hands the acquire back to be awaited. Lets a caller on a hot path
    /// skip the boxed future; `.await` does the same internally.
    pub fn try_now(self) -> Result<Result<Lease, Error>, Self> {
        if self.undecided {
            return Err(self);
        }
        if let Err(e) = self.validate_names() {
            return Ok(Err(e));
        }
        if self.consume.is_none() {
            return self.decide_now(None);
        }
        match self.checked_consume() {
            Ok(consume) => self.decide_now(consume.as_deref()),
            Err(e) => Ok(Err(e)),
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

/// The amount to take from each of `limits`: 1 from every limit by default, else what
/// `consume` names (0 for a limit it does not name). Computed where the item is built, so
/// the amounts are written once, in place.
#[inline]
fn amounts_for(limits: &[Limit], consume: Option<&[(String, i64)]>) -> Amounts {
    match consume {
        // The usual one or two written as one block, which the moves that follow read
        // back whole.
        None if limits.len() <= 2 => Amounts::from_buf_and_len([1, 1], limits.len()),
        None => smallvec::smallvec![1; limits.len()],
        Some(c) => limits
            .iter()
            .map(|l| {
                c.iter()
                    .filter(|(n, _)| *n == l.name)
                    .fold(0u64, |sum, (_, a)| sum.saturating_add(*a as u64))
            })
            .collect(),
    }
}

impl IntoFuture for Acquire {
    type Output = Result<Lease, Error>;
    type IntoFuture = AcquireFuture;

    #[inline]
    fn into_future(self) -> Self::IntoFuture {
        let decision = match self.try_now() {
            // Admitted without waiting (the in-memory backend): no future to allocate, and
            // only the lease's pointer to move from here to the caller.
            Ok(Ok(lease)) => {
                return AcquireFuture {
                    admitted: Some(lease),
                    decision: None,
                }
            }
            Ok(Err(e)) => Decision::Failed(e),
            Err(pending) => Decision::Pending(Box::pin(pending.run())),
        };
        AcquireFuture {
            admitted: None,
            decision: Some(decision),
        }
    }
}

/// Where an [`AcquireFuture`] stands.
enum Decision {
    /// Refused (or failed) at once; one admitted at once is [`AcquireFuture::admitted`].
    Failed(Error),
    /// Waiting for the backend.
    Pending(BoxFuture<'static, Result<Lease, Error>>),
}

/// The future of an [`Acquire`]: resolves to the [`Lease`] or the rejection.
///
/// Dropping it before it resolves is safe: a backend may already have written the
/// consumption, so the acquire is finished in the background and its lease rolled back,
/// never leaked (as with `tokio::select!` or a timeout around `.await`).
#[must_use = "an acquire does nothing until it is awaited"]
pub struct AcquireFuture {
    /// Admitted at once: kept apart from [`Decision`], so the usual path moves a pointer
    /// rather than a whole result.
    admitted: Option<Lease>,
    decision: Option<Decision>,
}

impl std::fmt::Debug for AcquireFuture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcquireFuture")
            .field(
                "done",
                &(self.admitted.is_none() && self.decision.is_none()),
            )
            .finish()
    }
}

impl Future for AcquireFuture {
    type Output = Result<Lease, Error>;

    #[inline]
    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if let Some(lease) = self.admitted.take() {
            return std::task::Poll::Ready(Ok(lease));
        }
        let out = match self.decision.as_mut() {
            None => return std::task::Poll::Ready(Err(Error::LeaseClosed)),
            Some(Decision::Pending(pending)) => std::task::ready!(pending.as_mut().poll(cx)),
            Some(Decision::Failed(_)) => match self.decision.take() {
                Some(Decision::Failed(e)) => return std::task::Poll::Ready(Err(e)),
                _ => unreachable!("matched Failed just above"),
            },
        };
        self.decision = None;
        std::task::Poll::Ready(out)
    }
}

impl Drop for AcquireFuture {
    fn drop(&mut self) {
        // An admitted lease never returned rolls back when dropped.
        drop(self.admitted.take());
        // Looked at in place first: the usual future (admitted at once) holds no
        // decision, and taking one moves a whole error's worth of bytes.
        if !matches!(self.decision, Some(Decision::Pending(_))) {
            return;
        }
        match self.decision.take() {
            Some(Decision::Pending(decision)) => crate::lease::run_detached(async move {
                if let Ok(lease) = decision.await {
                    tracing::debug!(
                        entity_id = %lease.entity_id(),
                        "acquire dropped before it returned; rolling back"
                    );
                    lease.settle_detached(false, "acquire dropped before it returned");
                }
            }),
            Some(Decision::Failed(_)) | None => {}
        }
    }
}
