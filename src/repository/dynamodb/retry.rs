//! Waits between attempts: backoff for contention and throttling, and the per-request
//! override that turns the SDK's own retries off.

use std::time::Duration;

/// Full jitter: a random wait below 2, 4, 8 ... ms, at most 128 ms.
pub(super) fn jitter(attempt: usize) -> Duration {
    let cap = 2u64 << attempt.min(6);
    Duration::from_micros(rand::random_range(0..cap * 1000))
}

/// Backoff with jitter: 10, 20, 40 ... ms, capped at 320 ms.
pub(crate) fn backoff(attempt: usize) -> Duration {
    let base = 10u64 << attempt.min(5);
    Duration::from_millis(base + rand::random_range(0..base))
}

/// A per-request override that turns the SDK's retries off, for writes that must not be
/// sent twice without a check.
pub(super) fn no_retries() -> aws_sdk_dynamodb::config::Builder {
    aws_sdk_dynamodb::config::Builder::default()
        .retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::disabled())
}
