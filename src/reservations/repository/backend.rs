//! [`Reserving`] as a [`Repository`]: hot keys' acquires, adjustments and the lease
//! writes go through the reservations; everything else goes straight to the wrapped backend.

use super::hot::Waiting;
use super::*;

#[async_trait]
impl Repository for Reserving {
    fn capabilities(&self) -> BackendCapabilities {
        self.shared.inner.capabilities()
    }

    fn default_config_cache_ttl(&self) -> Duration {
        self.shared.inner.default_config_cache_ttl()
    }

    fn operation_timeout(&self) -> Option<Duration> {
        self.shared.inner.operation_timeout()
    }

    fn config_version(&self) -> Option<u64> {
        self.shared.inner.config_version()
    }

    fn stores_nothing(&self) -> bool {
        self.shared.inner.stores_nothing()
    }

    async fn acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome, Error> {
        let s = &self.shared;
        if request.items.iter().any(|i| i.bypass) {
            s.passed_through.fetch_add(1, Ordering::Relaxed);
            return s.inner.acquire(request).await;
        }
        let keys = s.keys_of(request);
        match s.take_local(request, &keys, true) {
            Local::Admitted(outcome) => Ok(outcome),
            Local::Miss { hot: true } => {
                let _waiting = Waiting::start(&keys);
                s.acquire_hot(request, keys.clone()).await
            }
            Local::Miss { hot: false } => {
                s.passed_through.fetch_add(1, Ordering::Relaxed);
                s.inner.acquire(request).await
            }
        }
    }

    fn acquire_now(&self, request: &AcquireRequest) -> Option<Result<AcquireOutcome, Error>> {
        let mut outcome = AcquireOutcome::default();
        Some(
            self.acquire_now_into(request, &mut outcome)?
                .map(|()| outcome),
        )
    }

    fn acquire_now_into(
        &self,
        request: &AcquireRequest,
        outcome: &mut AcquireOutcome,
    ) -> Option<Result<(), Error>> {
        let s = &self.shared;
        if request.items.iter().any(|i| i.bypass) {
            return s.inner.acquire_now_into(request, outcome);
        }
        // Counted in the demand only once decided here; an undecided request is counted
        // by `acquire`.
        let keys = s.keys_of(request);
        let decided = match s.take_local(request, &keys, false) {
            Local::Admitted(local) => {
                *outcome = local;
                Ok(())
            }
            Local::Miss { hot: true } => return None,
            Local::Miss { hot: false } => {
                let decided = s.inner.acquire_now_into(request, outcome)?;
                s.passed_through.fetch_add(1, Ordering::Relaxed);
                decided
            }
        };
        for (key, item) in keys.iter().zip(&request.items) {
            key.state
                .lock()
                .count_request(request.now_ms, &item.amounts);
        }
        Some(decided)
    }

    async fn adjust(&self, request: &AdjustRequest) -> Result<(), Error> {
        self.shared.adjust(request).await
    }

    async fn get_buckets(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Result<BTreeMap<String, BucketState>, Error> {
        self.shared.inner.get_buckets(entity_id, resource).await
    }

    async fn create_entity(&self, entity: &Entity) -> Result<(), Error> {
        self.shared.inner.create_entity(entity).await
    }

    async fn get_entity(&self, entity_id: &str) -> Result<Option<Entity>, Error> {
        self.shared.inner.get_entity(entity_id).await
    }

    async fn delete_entity(&self, entity_id: &str) -> Result<bool, Error> {
        self.shared.inner.delete_entity(entity_id).await
    }

    async fn get_children(&self, parent_id: &str) -> Result<Vec<Entity>, Error> {
        self.shared.inner.get_children(parent_id).await
    }

    async fn set_limits(&self, scope: &ConfigScope, limits: &[Limit]) -> Result<(), Error> {
        self.shared.inner.set_limits(scope, limits).await
    }

    async fn get_limits(&self, scope: &ConfigScope) -> Result<Option<Vec<Limit>>, Error> {
        self.shared.inner.get_limits(scope).await
    }

    async fn delete_limits(&self, scope: &ConfigScope) -> Result<bool, Error> {
        self.shared.inner.delete_limits(scope).await
    }

    async fn set_on_unavailable(&self, policy: Option<OnUnavailable>) -> Result<(), Error> {
        self.shared.inner.set_on_unavailable(policy).await
    }

    async fn get_on_unavailable(&self) -> Result<Option<OnUnavailable>, Error> {
        self.shared.inner.get_on_unavailable().await
    }

    async fn set_access(
        &self,
        scope: &ConfigScope,
        access: Option<Access>,
    ) -> Result<usize, Error> {
        self.shared.inner.set_access(scope, access).await
    }

    async fn list_limits(&self) -> Result<Vec<(ConfigScope, Vec<Limit>)>, Error> {
        self.shared.inner.list_limits().await
    }

    async fn load_config(&self, entity_id: &str, resource: &str) -> Result<StoredConfig, Error> {
        self.shared.inner.load_config(entity_id, resource).await
    }

    async fn usage_snapshots(&self, query: &UsageQuery) -> Result<UsagePage, Error> {
        self.shared.inner.usage_snapshots(query).await
    }

    async fn resource_buckets(&self, resource: &str) -> Result<Vec<ResourceBucket>, Error> {
        self.shared.inner.resource_buckets(resource).await
    }

    fn load_config_now(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Option<Result<StoredConfig, Error>> {
        self.shared.inner.load_config_now(entity_id, resource)
    }
}
