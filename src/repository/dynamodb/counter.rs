//! [`CallCounter`]: counts DynamoDB calls by operation, through an SDK interceptor.

use std::collections::BTreeMap;
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};

use aws_sdk_dynamodb::config::interceptors::{
    BeforeSerializationInterceptorContextRef, FinalizerInterceptorContextRef,
};
use aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use parking_lot::Mutex;

/// Counts every DynamoDB call a client makes, by operation name (`UpdateItem`,
/// `BatchGetItem`, ...). SDK retries of one call count once.
///
/// Pass it to [`super::DynamoDbRepositoryBuilder::call_counter`], or to an SDK config
/// builder's `.interceptor(..)`. Clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct CallCounter {
    counts: Arc<Mutex<BTreeMap<String, u64>>>,
    in_flight: Arc<AtomicU64>,
    max_in_flight: Arc<AtomicU64>,
}

impl CallCounter {
    /// A counter at zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls of one operation so far.
    pub fn get(&self, operation: &str) -> u64 {
        self.counts.lock().get(operation).copied().unwrap_or(0)
    }

    /// All counts so far, by operation.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts.lock().clone()
    }

    /// Calls of every operation so far.
    pub fn total(&self) -> u64 {
        self.counts.lock().values().sum()
    }

    /// The most calls that were in flight at one time since the last reset (2 when a
    /// cascade's writes go out together, 1 when they go one after the other).
    pub fn max_in_flight(&self) -> u64 {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// Back to zero.
    pub fn reset(&self) {
        self.counts.lock().clear();
        self.max_in_flight
            .store(self.in_flight.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Intercept for CallCounter {
    fn name(&self) -> &'static str {
        "zae_limiter::CallCounter"
    }

    fn read_before_serialization(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(metadata) = cfg.load::<Metadata>() {
            *self
                .counts
                .lock()
                .entry(metadata.name().to_string())
                .or_default() += 1;
        }
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        Ok(())
    }

    fn read_after_execution(
        &self,
        _context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Records every DynamoDB call of a repository's client in the `metrics` facade (see
/// [`crate::metrics`]): `zae_limiter_dynamodb_calls_total` by operation and outcome, and
/// `zae_limiter_dynamodb_call_seconds`, SDK retries included.
#[cfg(feature = "metrics")]
#[derive(Debug, Default)]
pub(super) struct CallMetrics;

/// When a call started, kept in the call's config bag.
#[cfg(feature = "metrics")]
#[derive(Debug, Clone)]
struct CallStart(std::time::Instant);

#[cfg(feature = "metrics")]
impl aws_smithy_types::config_bag::Storable for CallStart {
    type Storer = aws_smithy_types::config_bag::StoreReplace<Self>;
}

#[cfg(feature = "metrics")]
impl Intercept for CallMetrics {
    fn name(&self) -> &'static str {
        "zae_limiter::CallMetrics"
    }

    fn read_before_execution(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state()
            .store_put(CallStart(std::time::Instant::now()));
        Ok(())
    }

    fn read_after_execution(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = cfg.load::<Metadata>().map_or("unknown", |m| m.name());
        let ok = matches!(context.output_or_error(), Some(Ok(_)));
        let seconds = cfg
            .load::<CallStart>()
            .map_or(0.0, |start| start.0.elapsed().as_secs_f64());
        crate::metrics::dynamodb_call(operation, ok, seconds);
        Ok(())
    }
}
