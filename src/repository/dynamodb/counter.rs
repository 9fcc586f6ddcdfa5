//! [`CallCounter`]: counts DynamoDB calls by operation, through an SDK interceptor.

use std::collections::BTreeMap;
use std::sync::Arc;

use aws_sdk_dynamodb::config::interceptors::BeforeSerializationInterceptorContextRef;
use aws_sdk_dynamodb::config::{ConfigBag, Intercept};
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

    /// Back to zero.
    pub fn reset(&self) {
        self.counts.lock().clear();
    }
}

impl Intercept for CallCounter {
    fn name(&self) -> &'static str {
        "zae_limiter::CallCounter"
    }

    fn read_before_execution(
        &self,
        _context: &BeforeSerializationInterceptorContextRef<'_>,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        if let Some(metadata) = cfg.load::<Metadata>() {
            *self
                .counts
                .lock()
                .entry(metadata.name().to_string())
                .or_default() += 1;
        }
        Ok(())
    }
}
