//! Opening the table or a namespace from the global options.

use zae_limiter::repository::dynamodb::{DynamoDbRepositoryBuilder, DynamoDbTable};
use zae_limiter::{DynamoDbRepository, RateLimiter};

use crate::args::Global;
use crate::failure::Failure;

/// A repository builder with the global options applied.
pub fn builder(global: &Global) -> DynamoDbRepositoryBuilder {
    let mut builder = DynamoDbRepository::builder()
        .table(&global.table)
        .namespace(&global.namespace)
        .timeout(global.timeout);
    if let Some(region) = &global.region {
        builder = builder.region(region);
    }
    if let Some(url) = &global.endpoint_url {
        builder = builder.endpoint_url(url);
    }
    builder
}

/// The existing table, for table-level commands.
pub async fn table(global: &Global) -> Result<DynamoDbTable, Failure> {
    Ok(builder(global).connect_table().await?)
}

/// A limiter over the existing table and namespace, reading config fresh every time.
pub async fn limiter(global: &Global) -> Result<RateLimiter, Failure> {
    let repo = builder(global)
        .config_cache_ttl(std::time::Duration::ZERO)
        .connect()
        .await?;
    Ok(RateLimiter::new(repo))
}
