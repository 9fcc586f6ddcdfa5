//! # zae-limiter
//!
//! Token-bucket rate limiting for async Rust and tower/axum services, with buckets and
//! limits held in a backend: in memory (the embedded default) or DynamoDB (for fleets).
//!
//! - Exact integer arithmetic in millitokens ([`bucket`]): same inputs, same result on
//!   every node; refill is exact and never over-admits.
//! - Several limits per acquire (requests *and* tokens per minute), all or nothing.
//! - Leases: consume an estimate up front, [`Lease::adjust`] to the true cost, commit; roll
//!   back on error or drop.
//! - Parent/child entities with cascade (API key under a project).
//! - Limits stored at four levels (entity+resource, entity default, resource, system) and
//!   cached, so operators change them without a deploy.
//! - A tower layer ([`middleware::RateLimitLayer`]) answering 429 with `Retry-After` and the
//!   IETF `RateLimit-Policy` / `RateLimit` fields.
//!
//! ```
//! use zae_limiter::{Error, InMemoryRepository, Limit, RateLimiter};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), Error> {
//! let limiter = RateLimiter::new(InMemoryRepository::new());
//! let limits = [Limit::per_minute("rpm", 2), Limit::per_minute("tpm", 10_000).with_burst(15_000)];
//!
//! // An LLM call: 1 request and an estimate of 500 tokens.
//! let lease = limiter
//!     .acquire("user-123", "gpt-4")
//!     .limits(limits.clone())
//!     .consume([("rpm", 1), ("tpm", 500)])
//!     .await?;
//! lease.adjust([("tpm", 750)]).await?; // it really used 1,250
//! lease.commit().await?;
//!
//! limiter.acquire("user-123", "gpt-4").limits(limits.clone()).consume([("rpm", 1)]).await?.commit().await?;
//! match limiter.acquire("user-123", "gpt-4").limits(limits).consume([("rpm", 1)]).await {
//!     Err(Error::RateLimited(e)) => {
//!         assert_eq!(e.primary_violation().limit.name, "rpm");
//!         assert_eq!(e.retry_after_header().as_deref(), Some("30")); // 2 per minute
//!     }
//!     other => panic!("expected a rejection, got {other:?}"),
//! }
//! # Ok(()) }
//! ```
#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]

#[cfg(feature = "aggregator")]
#[cfg_attr(docsrs, doc(cfg(feature = "aggregator")))]
pub mod aggregator;
mod amount;
#[cfg(feature = "blocking")]
#[cfg_attr(docsrs, doc(cfg(feature = "blocking")))]
pub mod blocking;
pub mod bucket;
pub mod clock;
mod config_cache;
pub mod error;
mod keys;
mod lease;
pub mod limit;
mod limiter;
#[cfg(feature = "local")]
#[cfg_attr(docsrs, doc(cfg(feature = "local")))]
pub mod local;
mod log_throttle;
pub mod metrics;
pub mod middleware;
pub mod model;
pub mod naming;
pub mod repository;
pub mod reservations;
pub mod usage;

pub use amount::Amount;
/// Entity ids and resource names are held as `CompactString`s: inline up to 24 bytes, so
/// the usual ids cost no allocation per request. Anything that converts into one (`&str`,
/// `String`) is accepted where an id is taken.
pub use compact_str::CompactString;
pub use error::{BoxError, Error, ErrorCategory, Field, RateLimitExceeded};
pub use lease::{Commit, Lease, LeaseHandle};
pub use limit::Limit;
pub use limiter::{
    Acquire, AcquireFuture, BoxFuture, CreateEntity, RateLimiter, RateLimiterBuilder,
};
pub use model::{
    BackendCapabilities, CacheStats, ConfigSource, Entity, LimitStatus, OnUnavailable,
};
#[cfg(feature = "dynamodb")]
#[cfg_attr(docsrs, doc(cfg(feature = "dynamodb")))]
pub use repository::dynamodb::{DynamoDbRepository, DynamoDbRepositoryBuilder};
pub use repository::memory::InMemoryRepository;
pub use repository::{Access, Repository};
