//! [`DynamoDbRepository`]: buckets, entities and limits in one DynamoDB table, shared by
//! every process of a fleet (feature `dynamodb`).
//!
//! The layout is the zae-limiter single-table layout (DESIGN section 9): all limits of an
//! entity and resource live in one bucket item, written with conditional `ADD`s so that
//! concurrent writers in any number of processes never over-admit. A successful acquire on
//! a known item costs one `UpdateItem` and no read; a cascade, two writes at once.
//!
//! ```no_run
//! # async fn demo() -> Result<(), zae_limiter::Error> {
//! use std::time::Duration;
//! use zae_limiter::{DynamoDbRepository, Limit, RateLimiter};
//!
//! let repo = DynamoDbRepository::builder()
//!     .table("zae-limiter")
//!     .namespace("default")
//!     .timeout(Duration::from_millis(500))
//!     .build() // creates the table and namespace when missing
//!     .await?;
//! let limiter = RateLimiter::new(repo);
//! limiter.set_system_limits(&[Limit::per_minute("rpm", 100)]).await?;
//! limiter.acquire("user-1", "api").await?.commit().await?;
//! # Ok(()) }
//! ```

pub(crate) mod acquire;
mod admin;
mod audit;
pub(crate) mod builder;
mod cloudformation;
pub(crate) mod codec;
mod counter;
mod discovery;
pub(crate) mod errors;
pub(crate) mod expr;
mod features;
mod flags;
mod images;
pub(crate) mod keys;
pub(crate) mod lease_writes;
mod listing;
mod migrations;
pub(crate) mod owners;
mod registries;
mod rejections;
mod repository;
pub(crate) mod retry;
mod shards;
mod stamps;
mod table;
mod turns;
mod usage;

pub use aws_sdk_dynamodb;

pub use admin::{check_schema_version, DynamoDbTable};
pub use audit::{AuditAction, AuditEvent};
pub use builder::DynamoDbRepositoryBuilder;
pub use counter::CallCounter;
pub use discovery::LimiterTable;
pub use errors::TableError;
pub use features::FeatureUse;
pub use repository::DynamoDbRepository;
pub use table::{
    Billing, NamespaceInfo, TableOptions, TableStatusReport, CONTRACT_VERSION,
    LEGACY_SCHEMA_VERSION, SCHEMA_VERSION,
};

use repository::Inner;

/// The default table name.
pub const DEFAULT_TABLE: &str = "zae-limiter";
/// The default namespace.
pub const DEFAULT_NAMESPACE: &str = "default";
