//! [`DynamoDbRepositoryBuilder`]: table, namespace, endpoint, credentials, timeouts.

use super::{
    images, owners, table, CallCounter, DynamoDbRepository, Inner, TableError, TableOptions,
    DEFAULT_NAMESPACE, DEFAULT_TABLE,
};
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::Client;

use super::rejections::RejectionCache;

use crate::naming::{self};
use crate::Error;

/// Settings for a [`DynamoDbRepository`]; see [`DynamoDbRepository::builder`].
#[derive(Debug, Clone)]
pub struct DynamoDbRepositoryBuilder {
    pub(super) table: String,
    pub(super) namespace: String,
    pub(super) region: Option<String>,
    pub(super) endpoint_url: Option<String>,
    pub(super) config_cache_ttl: Duration,
    pub(super) timeout: Duration,
    pub(super) attempt_timeout: Option<Duration>,
    pub(super) max_attempts: u32,
    pub(super) client: Option<Client>,
    pub(super) counter: Option<CallCounter>,
    pub(super) table_options: TableOptions,
    pub(super) rejection_cache_max_age: Duration,
    pub(super) bucket_ttl_multiplier: u32,
    pub(super) principal: Option<String>,
}

impl Default for DynamoDbRepositoryBuilder {
    fn default() -> Self {
        DynamoDbRepositoryBuilder {
            table: DEFAULT_TABLE.into(),
            namespace: DEFAULT_NAMESPACE.into(),
            region: None,
            endpoint_url: None,
            config_cache_ttl: Duration::from_secs(60),
            timeout: Duration::from_secs(1),
            attempt_timeout: None,
            max_attempts: 3,
            client: None,
            counter: None,
            table_options: TableOptions::default(),
            rejection_cache_max_age: Duration::from_secs(1),
            bucket_ttl_multiplier: 7,
            principal: std::env::var("ZAE_PRINCIPAL")
                .or_else(|_| std::env::var("USER"))
                .ok(),
        }
    }
}

impl DynamoDbRepositoryBuilder {
    /// The table (default `zae-limiter`).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The namespace (default `default`); namespaces isolate tenants within one table.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = namespace.into();
        self
    }

    /// The AWS region (default: the standard chain; `us-east-1` for a loopback endpoint).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    /// Talk to this endpoint, e.g. DynamoDB Local. A loopback endpoint gets static
    /// credentials unless `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` are set.
    pub fn endpoint_url(mut self, url: impl Into<String>) -> Self {
        self.endpoint_url = Some(url.into());
        self
    }

    /// How long the limiter caches resolved limits (default 60 s; zero disables). Other
    /// processes see a change to stored limits within this time.
    pub fn config_cache_ttl(mut self, ttl: Duration) -> Self {
        self.config_cache_ttl = ttl;
        self
    }

    /// How long a caller waits for one acquire, commit or rollback, every DynamoDB call,
    /// retry and backoff in it included (default 1 s). Past it the operation fails with
    /// [`Error::Unavailable`] (which the outage policy decides on); the work itself goes on
    /// in the background, so a write is never cut off half-way, and an acquire admitted
    /// after its caller gave up is rolled back. Other calls (reads, config writes) are
    /// bounded by [`Self::attempt_timeout`].
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The time limit of one DynamoDB call, the SDK's retries of it included (default: 5 x
    /// [`Self::timeout`], at least 2 s; it only has to catch a connection that hangs, since
    /// callers of acquire, commit and rollback are bounded by the timeout). A write cut
    /// off by it may still have landed: acquire and lease writes then find out (a marker,
    /// an idempotency token) rather than apply twice.
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// How many times the SDK tries a call that failed transiently (default 3; 1 disables
    /// retries), with its standard backoff, within [`Self::timeout`].
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Use this client as it is (region, credentials, endpoint, timeouts and retries all
    /// come from it; the settings above that configure a client are ignored).
    pub fn client(mut self, client: Client) -> Self {
        self.client = Some(client);
        self
    }

    /// Count every DynamoDB call by operation (ignored with [`Self::client`]; add the
    /// counter to that client's config with `.interceptor(counter)` instead).
    pub fn call_counter(mut self, counter: CallCounter) -> Self {
        self.counter = Some(counter);
        self
    }

    /// How the table is created when missing (billing, stream, ...).
    pub fn table_options(mut self, options: TableOptions) -> Self {
        self.table_options = options;
        self
    }

    /// The longest a rejection is remembered to reject further requests for the same
    /// entity and resource without a DynamoDB call (default 1 s; zero disables).
    pub fn rejection_cache_max_age(mut self, max_age: Duration) -> Self {
        self.rejection_cache_max_age = max_age;
        self
    }

    /// Bucket items on shared limits (resource, system, caller's) expire this many times
    /// their time to fill after their last refill (default 7; zero keeps them forever).
    pub fn bucket_ttl_multiplier(mut self, multiplier: u32) -> Self {
        self.bucket_ttl_multiplier = multiplier;
        self
    }

    /// Who is recorded in audit events (default `$ZAE_PRINCIPAL`, else `$USER`).
    pub fn principal(mut self, principal: impl Into<String>) -> Self {
        self.principal = Some(principal.into());
        self
    }

    /// Opens the repository, creating the table, the version record and the namespace
    /// when missing (idempotent; safe when several processes start at once).
    pub async fn build(self) -> Result<DynamoDbRepository, Error> {
        self.validate()?;
        let client = self.make_client().await;
        table::ensure_table(&client, &self.table, &self.table_options).await?;
        table::ensure_version(&client, &self.table).await?;
        let ns = table::ensure_namespace(&client, &self.table, &self.namespace).await?;
        Ok(self.finish(client, ns))
    }

    /// Opens an existing table and namespace without writing anything:
    /// [`TableError::TableNotFound`] without the table, [`TableError::NamespaceNotFound`]
    /// without the namespace.
    pub async fn connect(self) -> Result<DynamoDbRepository, Error> {
        self.validate()?;
        let client = self.make_client().await;
        table::require_table(&client, &self.table).await?;
        table::require_version(&client, &self.table).await?;
        let ns = table::namespace_id(&client, &self.table, &self.namespace)
            .await?
            .ok_or_else(|| TableError::NamespaceNotFound {
                namespace: self.namespace.clone(),
            })?;
        Ok(self.finish(client, ns))
    }

    pub(super) fn finish(self, client: Client, ns: String) -> DynamoDbRepository {
        DynamoDbRepository {
            inner: Arc::new(Inner {
                client,
                table: self.table,
                namespace: self.namespace,
                ns,
                config_cache_ttl: self.config_cache_ttl,
                timeout: self.timeout,
                rejections: RejectionCache::new(
                    i64::try_from(self.rejection_cache_max_age.as_millis()).unwrap_or(i64::MAX),
                ),
                bucket_ttl_multiplier: self.bucket_ttl_multiplier,
                principal: self.principal,
                stream: self.table_options.stream,
                in_doubt: Default::default(),
                images: images::ImageCache::new(),
                owners: owners::OwnerCache::new(),
                shards: super::shards::ShardCounts::new(),
                turns: Default::default(),
            }),
        }
    }

    /// Checks the names before any call.
    pub(super) fn validate(&self) -> Result<(), Error> {
        naming::validate_table_name(&self.table)?;
        naming::validate_namespace(&self.namespace)
    }

    pub(super) async fn make_client(&self) -> Client {
        if let Some(client) = &self.client {
            return client.clone();
        }
        let loopback = self.endpoint_url.as_deref().is_some_and(is_loopback);
        let mut config = if loopback {
            aws_sdk_dynamodb::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new(
                    self.region.clone().unwrap_or_else(|| "us-east-1".into()),
                ))
                .credentials_provider(local_credentials())
        } else {
            let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
            if let Some(region) = &self.region {
                loader = loader.region(Region::new(region.clone()));
            }
            aws_sdk_dynamodb::config::Builder::from(&loader.load().await)
        };
        if let Some(url) = &self.endpoint_url {
            config = config.endpoint_url(url);
        }
        let per_call = self
            .attempt_timeout
            .unwrap_or_else(|| (self.timeout * 5).max(Duration::from_secs(2)));
        config = config
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_timeout(per_call)
                    .connect_timeout(per_call)
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(self.max_attempts));
        if let Some(counter) = &self.counter {
            config = config.interceptor(counter.clone());
        }
        #[cfg(feature = "metrics")]
        {
            config = config.interceptor(super::counter::CallMetrics);
        }
        Client::from_conf(config.build())
    }
}

/// The credentials for DynamoDB Local, which checks none: the environment's when set,
/// else fixed ones (so no AWS profile is needed on a developer's machine).
pub(crate) fn local_credentials() -> Credentials {
    match (
        std::env::var("AWS_ACCESS_KEY_ID"),
        std::env::var("AWS_SECRET_ACCESS_KEY"),
    ) {
        (Ok(id), Ok(secret)) => Credentials::new(id, secret, None, None, "environment"),
        _ => Credentials::new("zaelimiterlocal", "local", None, None, "zae-limiter"),
    }
}

/// Whether an endpoint URL names this machine (DynamoDB Local).
pub(crate) fn is_loopback(url: &str) -> bool {
    let host = url
        .split("://")
        .nth(1)
        .unwrap_or(url)
        .split(['/', '?'])
        .next()
        .unwrap_or("");
    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.chars().all(|c| c.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    pub(super) fn loopback_endpoints() {
        for url in [
            "http://127.0.0.1:8000",
            "http://localhost:8000/",
            "http://[::1]:8000",
            "http://127.0.0.2",
        ] {
            assert!(is_loopback(url), "{url}");
        }
        for url in [
            "https://dynamodb.us-east-1.amazonaws.com",
            "http://10.0.0.1:8000",
        ] {
            assert!(!is_loopback(url), "{url}");
        }
    }
}
