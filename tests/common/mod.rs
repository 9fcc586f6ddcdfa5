//! Test helpers shared by several test files.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use zae_limiter::bucket::BucketState;
use zae_limiter::repository::{
    AcquireOutcome, AcquireRequest, AdjustRequest, ConfigScope, StoredConfig,
};
use zae_limiter::{
    BackendCapabilities, Entity, Error, InMemoryRepository, Limit, OnUnavailable, Repository,
};

/// The in-memory backend behind a switch that makes every call fail as an unreachable
/// backend would, to exercise the outage policy (the DynamoDB backend's own outage tests
/// stop DynamoDB Local for real).
///
/// It can also answer after a delay, as a remote backend does, so the layer's path for an
/// acquire that is not decided at once is exercised for real, and lose the answer of a
/// lease write after applying it, as a timeout does (writes apply once per write id, as
/// DynamoDB's write lanes make them, so the re-sent write is not applied twice).
///
/// Switched to answer at once, it decides through `acquire_now` only, as a third-party
/// in-process backend would, leaving `acquire_now_into` to the trait's default.
#[derive(Clone, Default)]
pub struct Switchable {
    pub inner: InMemoryRepository,
    down: Arc<AtomicBool>,
    at_once: Arc<AtomicBool>,
    delay_ms: Arc<AtomicU64>,
    lose_next_answer: Arc<AtomicBool>,
    applied: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Switchable {
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Acquires are answered through `acquire_now` (no future), not awaited.
    pub fn set_answer_at_once(&self, at_once: bool) {
        self.at_once.store(at_once, Ordering::SeqCst);
    }

    /// Every acquire waits this long before it is decided.
    pub fn set_delay(&self, delay: Duration) {
        self.delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// The next lease write is applied, then answered with `Error::Unavailable`.
    pub fn lose_next_answer(&self) {
        self.lose_next_answer.store(true, Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), Error> {
        if self.down.load(Ordering::SeqCst) {
            Err(Error::unavailable(
                "backend switched off",
                "connection refused",
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Repository for Switchable {
    fn capabilities(&self) -> BackendCapabilities {
        self.inner.capabilities()
    }
    async fn acquire(&self, r: &AcquireRequest) -> Result<AcquireOutcome, Error> {
        self.check()?;
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.inner.acquire(r).await
    }
    fn acquire_now(&self, r: &AcquireRequest) -> Option<Result<AcquireOutcome, Error>> {
        if !self.at_once.load(Ordering::SeqCst) {
            return None;
        }
        if let Err(e) = self.check() {
            return Some(Err(e));
        }
        self.inner.acquire_now(r)
    }
    fn load_config_now(&self, e: &str, r: &str) -> Option<Result<StoredConfig, Error>> {
        if !self.at_once.load(Ordering::SeqCst) {
            return None;
        }
        if let Err(err) = self.check() {
            return Some(Err(err));
        }
        self.inner.load_config_now(e, r)
    }
    async fn adjust(&self, r: &AdjustRequest) -> Result<(), Error> {
        self.check()?;
        if let Some(id) = &r.write_id {
            if self.applied.lock().unwrap().contains(id) {
                return Ok(());
            }
        }
        self.inner.adjust(r).await?;
        if let Some(id) = &r.write_id {
            self.applied.lock().unwrap().insert(id.clone());
        }
        if self.lose_next_answer.swap(false, Ordering::SeqCst) {
            return Err(Error::unavailable(
                "the answer was lost",
                "connection reset after the write",
            ));
        }
        Ok(())
    }
    async fn get_buckets(&self, e: &str, r: &str) -> Result<BTreeMap<String, BucketState>, Error> {
        self.check()?;
        self.inner.get_buckets(e, r).await
    }
    async fn create_entity(&self, e: &Entity) -> Result<(), Error> {
        self.check()?;
        self.inner.create_entity(e).await
    }
    async fn get_entity(&self, e: &str) -> Result<Option<Entity>, Error> {
        self.check()?;
        self.inner.get_entity(e).await
    }
    async fn delete_entity(&self, e: &str) -> Result<bool, Error> {
        self.check()?;
        self.inner.delete_entity(e).await
    }
    async fn get_children(&self, p: &str) -> Result<Vec<Entity>, Error> {
        self.check()?;
        self.inner.get_children(p).await
    }
    async fn set_limits(&self, s: &ConfigScope, l: &[Limit]) -> Result<(), Error> {
        self.check()?;
        self.inner.set_limits(s, l).await
    }
    async fn get_limits(&self, s: &ConfigScope) -> Result<Option<Vec<Limit>>, Error> {
        self.check()?;
        self.inner.get_limits(s).await
    }
    async fn delete_limits(&self, s: &ConfigScope) -> Result<bool, Error> {
        self.check()?;
        self.inner.delete_limits(s).await
    }
    async fn set_on_unavailable(&self, p: Option<OnUnavailable>) -> Result<(), Error> {
        self.check()?;
        self.inner.set_on_unavailable(p).await
    }
    async fn get_on_unavailable(&self) -> Result<Option<OnUnavailable>, Error> {
        self.check()?;
        self.inner.get_on_unavailable().await
    }
    async fn set_access(
        &self,
        s: &ConfigScope,
        a: Option<zae_limiter::Access>,
    ) -> Result<usize, Error> {
        self.check()?;
        self.inner.set_access(s, a).await
    }
    async fn load_config(&self, e: &str, r: &str) -> Result<StoredConfig, Error> {
        self.check()?;
        self.inner.load_config(e, r).await
    }
}
