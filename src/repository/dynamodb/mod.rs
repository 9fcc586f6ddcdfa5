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

mod acquire;
mod admin;
mod audit;
mod cloudformation;
mod codec;
mod counter;
mod errors;
mod expr;
mod images;
mod keys;
mod lease_writes;
mod listing;
mod rejections;
mod table;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
pub use aws_sdk_dynamodb;
use aws_sdk_dynamodb::config::retry::RetryConfig;
use aws_sdk_dynamodb::config::timeout::TimeoutConfig;
use aws_sdk_dynamodb::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValuesOnConditionCheckFailure};
use aws_sdk_dynamodb::Client;

pub use admin::{check_schema_version, DynamoDbTable};
pub use audit::{AuditAction, AuditEvent};
pub use counter::CallCounter;
pub use table::{Billing, NamespaceInfo, TableOptions, TableStatusReport, SCHEMA_VERSION};

use self::codec::{get_i64, num, s, Image, Item};
use self::expr::{Expr, Update};
use self::rejections::RejectionCache;
use super::{AcquireOutcome, AcquireRequest, AdjustRequest, ConfigScope, Repository, StoredConfig};
use crate::bucket::BucketState;
use crate::naming::{self, DEFAULT_RESOURCE};
use crate::{BackendCapabilities, Entity, Error, Limit, OnUnavailable};

/// The default table name.
pub const DEFAULT_TABLE: &str = "zae-limiter";
/// The default namespace.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Buckets, entities and limits in a DynamoDB table. Clones share one client and caches.
#[derive(Clone)]
pub struct DynamoDbRepository {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for DynamoDbRepository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoDbRepository")
            .field("table", &self.inner.table)
            .field("namespace", &self.inner.namespace)
            .field("namespace_id", &self.inner.ns)
            .finish_non_exhaustive()
    }
}

struct Inner {
    client: Client,
    table: String,
    namespace: String,
    /// The namespace's opaque id, the prefix of every key.
    ns: String,
    config_cache_ttl: Duration,
    /// The bound on what a caller waits for one operation.
    timeout: Duration,
    rejections: RejectionCache,
    bucket_ttl_multiplier: u32,
    principal: Option<String>,
    stream: bool,
    /// Lease writes whose outcome is unknown, to be re-sent with their tokens.
    in_doubt: lease_writes::InDoubtWrites,
    /// The last image seen of each item written.
    images: images::ImageCache,
}

/// Settings for a [`DynamoDbRepository`]; see [`DynamoDbRepository::builder`].
#[derive(Debug, Clone)]
pub struct DynamoDbRepositoryBuilder {
    table: String,
    namespace: String,
    region: Option<String>,
    endpoint_url: Option<String>,
    config_cache_ttl: Duration,
    timeout: Duration,
    attempt_timeout: Option<Duration>,
    max_attempts: u32,
    client: Option<Client>,
    counter: Option<CallCounter>,
    table_options: TableOptions,
    rejection_cache_max_age: Duration,
    bucket_ttl_multiplier: u32,
    principal: Option<String>,
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
    /// [`Error::InfrastructureNotFound`] without the table, [`Error::NamespaceNotFound`]
    /// without the namespace.
    pub async fn connect(self) -> Result<DynamoDbRepository, Error> {
        self.validate()?;
        let client = self.make_client().await;
        table::require_table(&client, &self.table).await?;
        match table::stored_version(&client, &self.table).await? {
            Some(v) => table::check_version(&v)?,
            None => {
                return Err(Error::InfrastructureNotFound {
                    resource: format!(
                        "the version record in table {:?} (run `open`/`build` or deploy first)",
                        self.table
                    ),
                })
            }
        }
        let ns = table::namespace_id(&client, &self.table, &self.namespace)
            .await?
            .ok_or_else(|| Error::NamespaceNotFound {
                namespace: self.namespace.clone(),
            })?;
        Ok(self.finish(client, ns))
    }

    fn finish(self, client: Client, ns: String) -> DynamoDbRepository {
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
            }),
        }
    }

    /// Checks the names before any call.
    fn validate(&self) -> Result<(), Error> {
        naming::validate_table_name(&self.table)?;
        naming::validate_namespace(&self.namespace)
    }

    async fn make_client(&self) -> Client {
        if let Some(client) = &self.client {
            return client.clone();
        }
        let loopback = self.endpoint_url.as_deref().is_some_and(is_loopback);
        let mut config = if loopback {
            let credentials = match (
                std::env::var("AWS_ACCESS_KEY_ID"),
                std::env::var("AWS_SECRET_ACCESS_KEY"),
            ) {
                (Ok(id), Ok(secret)) => Credentials::new(id, secret, None, None, "environment"),
                _ => Credentials::new("zaelimiterlocal", "local", None, None, "zae-limiter"),
            };
            aws_sdk_dynamodb::Config::builder()
                .behavior_version(BehaviorVersion::latest())
                .region(Region::new(
                    self.region.clone().unwrap_or_else(|| "us-east-1".into()),
                ))
                .credentials_provider(credentials)
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
        Client::from_conf(config.build())
    }
}

/// Whether an endpoint URL names this machine (DynamoDB Local).
fn is_loopback(url: &str) -> bool {
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

impl DynamoDbRepository {
    /// Settings: table, namespace, endpoint, timeouts, ...
    pub fn builder() -> DynamoDbRepositoryBuilder {
        DynamoDbRepositoryBuilder::default()
    }

    /// Opens `namespace` in the default table with the standard AWS configuration,
    /// creating what is missing (see [`DynamoDbRepositoryBuilder::build`]).
    pub async fn open(namespace: &str) -> Result<Self, Error> {
        Self::builder().namespace(namespace).build().await
    }

    /// Opens an existing `namespace` in the default table without writing (see
    /// [`DynamoDbRepositoryBuilder::connect`]).
    pub async fn connect(namespace: &str) -> Result<Self, Error> {
        Self::builder().namespace(namespace).connect().await
    }

    /// The SDK client.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The table name.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// The namespace name.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The namespace's opaque id (the prefix of its keys).
    pub fn namespace_id(&self) -> &str {
        &self.inner.ns
    }

    /// How many rejections the local rejection cache holds.
    pub fn rejection_cache_len(&self) -> usize {
        self.inner.rejections.len()
    }

    /// How many lease writes are in doubt now: they failed with an unknown outcome and
    /// wait to be re-sent with their idempotency tokens (0 once every one is resolved).
    pub fn writes_in_doubt(&self) -> usize {
        self.inner.in_doubt.len()
    }

    /// The audit events of an entity (or `$SYSTEM`, or `$RESOURCE:{resource}`), newest
    /// first, at most `limit`.
    pub async fn audit_events(
        &self,
        subject: &str,
        limit: usize,
    ) -> Result<Vec<AuditEvent>, Error> {
        if !subject.starts_with('$') {
            naming::validate_entity_id(subject)?;
        }
        self.inner.audit_events(subject, limit).await
    }

    /// Every namespace registered in the table: `(name, id, status)`.
    pub async fn list_namespaces(&self) -> Result<Vec<(String, String, String)>, Error> {
        Ok(
            table::list_namespaces(&self.inner.client, &self.inner.table)
                .await?
                .into_iter()
                .map(|n| (n.name, n.id, n.status))
                .collect(),
        )
    }

    /// Registers another namespace in this table (idempotent) and returns its id.
    pub async fn register_namespace(&self, name: &str) -> Result<String, Error> {
        naming::validate_namespace(name)?;
        table::ensure_namespace(&self.inner.client, &self.inner.table, name).await
    }

    /// Deletes every item of this repository's namespace and its registry entries;
    /// `progress` is called with the running count. Returns how many items went.
    pub async fn purge_namespace(&self, progress: impl FnMut(usize)) -> Result<usize, Error> {
        let inner = &self.inner;
        table::purge_namespace(
            &inner.client,
            &inner.table,
            &inner.namespace,
            &inner.ns,
            progress,
        )
        .await
    }

    /// Deletes the whole table (every namespace).
    pub async fn delete_table(&self) -> Result<(), Error> {
        table::delete_table(&self.inner.client, &self.inner.table).await
    }

    /// The table's state: status, item count, stream, TTL and schema version.
    pub async fn table_status(&self) -> Result<TableStatusReport, Error> {
        table::status(&self.inner.client, &self.inner.table).await
    }
}

impl Inner {
    /// The key of a config record.
    fn config_key(&self, scope: &ConfigScope) -> (String, String) {
        match scope {
            ConfigScope::System => (keys::system_pk(&self.ns), keys::CONFIG_SK.into()),
            ConfigScope::Resource(r) => (keys::resource_pk(&self.ns, r), keys::CONFIG_SK.into()),
            ConfigScope::Entity {
                entity_id,
                resource,
            } => (
                keys::entity_pk(&self.ns, entity_id),
                keys::entity_config_sk(resource),
            ),
        }
    }

    /// The audit subject of a config scope.
    fn subject(scope: &ConfigScope) -> (String, Option<&str>) {
        match scope {
            ConfigScope::System => ("$SYSTEM".into(), None),
            ConfigScope::Resource(r) => (format!("$RESOURCE:{r}"), Some(r)),
            ConfigScope::Entity {
                entity_id,
                resource,
            } => (entity_id.clone(), Some(resource)),
        }
    }

    async fn get_record(&self, pk: &str, sk: &str) -> Result<Option<Item>, Error> {
        table::get_item(&self.client, &self.table, pk, sk).await
    }

    /// Updates a config record under an optimistic lock on its `config_version`, which
    /// moves on every write. `edit` adds the changes, given the record as read.
    async fn update_config(
        &self,
        scope: &ConfigScope,
        mut edit: impl FnMut(Option<&Item>, &mut Expr, &mut Update),
    ) -> Result<(), Error> {
        let (pk, sk) = self.config_key(scope);
        for attempt in 0..8 {
            let current = self.get_record(&pk, &sk).await?;
            let mut expr = Expr::default();
            let mut update = Update::default();
            let version = expr.name("config_version");
            match current.as_ref().and_then(|c| get_i64(c, "config_version")) {
                Some(v) => {
                    let v = expr.num(v);
                    update.conditions.push(format!("{version} = {v}"));
                }
                None => update
                    .conditions
                    .push(format!("attribute_not_exists({version})")),
            }
            let one = expr.num(1);
            update.add.push(format!("{version} {one}"));
            let gsi4pk = expr.name("GSI4PK");
            let gsi4sk = expr.name("GSI4SK");
            let (a, b) = (expr.value(s(&self.ns)), expr.value(s(format!("{pk}{sk}"))));
            update.set.push(format!("{gsi4pk} = {a}"));
            update.set.push(format!("{gsi4sk} = {b}"));
            match scope {
                ConfigScope::System => {}
                ConfigScope::Resource(r) => {
                    let n = expr.name("resource");
                    let v = expr.value(s(r));
                    update.set.push(format!("{n} = {v}"));
                }
                ConfigScope::Entity {
                    entity_id,
                    resource,
                } => {
                    for (attr, value) in [
                        ("entity_id", entity_id.clone()),
                        ("resource", resource.clone()),
                        ("GSI3PK", format!("{}/ENTITY_CONFIG#{resource}", self.ns)),
                        ("GSI3SK", entity_id.clone()),
                    ] {
                        let n = expr.name(attr);
                        let v = expr.value(s(value));
                        update.set.push(format!("{n} = {v}"));
                    }
                }
            }
            edit(current.as_ref(), &mut expr, &mut update);
            let sent = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(codec::key(pk.clone(), sk.clone())))
                .update_expression(update.expression())
                .set_condition_expression(update.condition())
                .set_expression_attribute_names(expr.names())
                .set_expression_attribute_values(expr.values())
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::None)
                .send()
                .await;
            match sent {
                Ok(_) => return Ok(()),
                Err(e)
                    if e.as_service_error()
                        .is_some_and(|s| s.is_conditional_check_failed_exception()) =>
                {
                    tokio::time::sleep(acquire::backoff(attempt)).await;
                }
                Err(e) => return Err(errors::map("UpdateItem", &self.table, e)),
            }
        }
        Err(Error::Unavailable {
            message: "concurrent config writes kept conflicting".into(),
            source: None,
        })
    }
}

#[async_trait]
impl Repository for DynamoDbRepository {
    fn capabilities(&self) -> BackendCapabilities {
        BackendCapabilities {
            supports_audit_logging: true,
            supports_usage_snapshots: false,
            supports_infrastructure_management: true,
            supports_change_streams: self.inner.stream,
            supports_batch_operations: true,
            shared_across_processes: true,
        }
    }

    fn default_config_cache_ttl(&self) -> Duration {
        self.inner.config_cache_ttl
    }

    fn operation_timeout(&self) -> Option<Duration> {
        Some(self.inner.timeout)
    }

    async fn acquire(&self, request: &AcquireRequest) -> Result<AcquireOutcome, Error> {
        self.inner
            .acquire_items(&request.items, request.now_ms)
            .await
    }

    async fn adjust(&self, request: &AdjustRequest) -> Result<(), Error> {
        let fresh_id;
        let write_id = match &request.write_id {
            Some(id) => id.as_str(),
            None => {
                fresh_id = format!("adjust-{:032x}", rand::random::<u128>());
                &fresh_id
            }
        };
        self.inner
            .write_deltas(
                &request.entity_id,
                &request.resource,
                &request.deltas,
                request.now_ms,
                write_id,
            )
            .await
    }

    async fn get_buckets(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Result<BTreeMap<String, BucketState>, Error> {
        Ok(self
            .inner
            .read_bucket(entity_id, resource)
            .await?
            .map(|i: Image| i.buckets)
            .unwrap_or_default())
    }

    async fn create_entity(&self, entity: &Entity) -> Result<(), Error> {
        let inner = &self.inner;
        let sent = inner
            .client
            .put_item()
            .table_name(&inner.table)
            .set_item(Some(codec::entity_item(&inner.ns, entity)))
            .condition_expression("attribute_not_exists(PK)")
            .send()
            .await;
        if let Err(e) = sent {
            return Err(
                if e.as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception())
                {
                    Error::EntityExists {
                        entity_id: entity.id.clone(),
                    }
                } else {
                    errors::map("PutItem", &inner.table, e)
                },
            );
        }
        inner
            .audit(
                &entity.id,
                AuditAction::EntityCreated,
                None,
                serde_json::json!({
                    "name": entity.name,
                    "parent_id": entity.parent_id,
                    "cascade": entity.cascade,
                    "metadata": entity.metadata,
                }),
            )
            .await;
        Ok(())
    }

    async fn get_entity(&self, entity_id: &str) -> Result<Option<Entity>, Error> {
        let inner = &self.inner;
        let item = inner
            .get_record(&keys::entity_pk(&inner.ns, entity_id), keys::META_SK)
            .await?;
        Ok(item.as_ref().and_then(codec::parse_entity))
    }

    async fn delete_entity(&self, entity_id: &str) -> Result<bool, Error> {
        let inner = &self.inner;
        let pk = keys::entity_pk(&inner.ns, entity_id);
        let mut doomed: Vec<Item> = Vec::new();
        let mut existed = false;
        // The entity's partition (record, configs) and, through GSI3, its buckets.
        for index in [None, Some("GSI3")] {
            let mut start = None;
            loop {
                let (pk_attr, consistent) = match index {
                    None => ("PK", true),
                    Some(_) => ("GSI3PK", false),
                };
                let page = inner
                    .client
                    .query()
                    .table_name(&inner.table)
                    .set_index_name(index.map(str::to_string))
                    .key_condition_expression("#pk = :pk")
                    .expression_attribute_names("#pk", pk_attr)
                    .expression_attribute_values(":pk", s(&pk))
                    .consistent_read(consistent)
                    .set_exclusive_start_key(start)
                    .send()
                    .await
                    .map_err(|e| errors::map("Query", &inner.table, e))?;
                for item in page.items() {
                    let (Some(p), Some(k)) =
                        (codec::get_str(item, "PK"), codec::get_str(item, "SK"))
                    else {
                        continue;
                    };
                    existed |= index.is_none() && k == keys::META_SK;
                    doomed.push(codec::key(p, k));
                }
                start = page.last_evaluated_key().cloned();
                if start.is_none() {
                    break;
                }
            }
        }
        // The bucket items by key too, in case the index lags behind a recent write.
        let resources: Vec<String> = doomed
            .iter()
            .filter_map(|k| {
                codec::get_str(k, "SK")?
                    .strip_prefix("#CONFIG#")
                    .map(str::to_string)
            })
            .collect();
        for resource in resources {
            doomed.push(codec::key(
                keys::bucket_pk(&inner.ns, entity_id, &resource),
                keys::STATE_SK,
            ));
        }
        let mut seen = std::collections::HashSet::new();
        doomed.retain(|k| {
            seen.insert((
                codec::get_str(k, "PK").map(str::to_string),
                codec::get_str(k, "SK").map(str::to_string),
            ))
        });
        let records = table::delete_keys(&inner.client, &inner.table, doomed).await?;
        if existed || records > 0 {
            inner.rejections.forget_entity(entity_id);
            inner.images.forget_entity(entity_id);
            inner
                .audit(
                    entity_id,
                    AuditAction::EntityDeleted,
                    None,
                    serde_json::json!({ "records_deleted": records }),
                )
                .await;
        }
        Ok(existed)
    }

    async fn get_children(&self, parent_id: &str) -> Result<Vec<Entity>, Error> {
        let inner = &self.inner;
        let mut children = Vec::new();
        let mut start = None;
        loop {
            let page = inner
                .client
                .query()
                .table_name(&inner.table)
                .index_name("GSI1")
                .key_condition_expression("GSI1PK = :pk")
                .expression_attribute_values(":pk", s(keys::parent_gsi1pk(&inner.ns, parent_id)))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| errors::map("Query", &inner.table, e))?;
            children.extend(page.items().iter().filter_map(codec::parse_entity));
            start = page.last_evaluated_key().cloned();
            if start.is_none() {
                break;
            }
        }
        children.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(children)
    }

    async fn set_limits(&self, scope: &ConfigScope, limits: &[Limit]) -> Result<(), Error> {
        let inner = &self.inner;
        inner
            .update_config(scope, |current, expr, update| {
                let mut keep = Vec::new();
                for limit in limits {
                    for (field, value) in [
                        ("cp", limit.capacity),
                        ("ra", limit.refill_amount),
                        ("rp", limit.refill_period_seconds),
                    ] {
                        let attr = keys::config_attr(&limit.name, field);
                        let n = expr.name(&attr);
                        let v = expr.value(num(value));
                        update.set.push(format!("{n} = {v}"));
                        keep.push(attr);
                    }
                }
                for stale in current.map(codec::config_attr_names).unwrap_or_default() {
                    if !keep.contains(&stale) {
                        update.remove.push(expr.name(&stale));
                    }
                }
            })
            .await?;
        let (subject, resource) = Inner::subject(scope);
        inner
            .audit(
                &subject,
                AuditAction::LimitsSet,
                resource,
                serde_json::json!({ "limits": limits }),
            )
            .await;
        Ok(())
    }

    async fn get_limits(&self, scope: &ConfigScope) -> Result<Option<Vec<Limit>>, Error> {
        let (pk, sk) = self.inner.config_key(scope);
        let item = self.inner.get_record(&pk, &sk).await?;
        Ok(item.as_ref().and_then(codec::config_limits))
    }

    async fn delete_limits(&self, scope: &ConfigScope) -> Result<bool, Error> {
        let inner = &self.inner;
        let (pk, sk) = inner.config_key(scope);
        let Some(current) = inner.get_record(&pk, &sk).await? else {
            return Ok(false);
        };
        let names = codec::config_attr_names(&current);
        if names.is_empty() {
            return Ok(false);
        }
        match scope {
            // The system record also holds the outage policy: remove only the limits.
            ConfigScope::System => {
                inner
                    .update_config(scope, |current, expr, update| {
                        for stale in current.map(codec::config_attr_names).unwrap_or_default() {
                            update.remove.push(expr.name(&stale));
                        }
                    })
                    .await?
            }
            _ => {
                inner
                    .client
                    .delete_item()
                    .table_name(&inner.table)
                    .set_key(Some(codec::key(pk, sk)))
                    .send()
                    .await
                    .map_err(|e| errors::map("DeleteItem", &inner.table, e))?;
            }
        }
        let (subject, resource) = Inner::subject(scope);
        let limit_names: Vec<&str> = names
            .iter()
            .filter_map(|n| n.strip_prefix("l_")?.strip_suffix("_cp"))
            .collect();
        inner
            .audit(
                &subject,
                AuditAction::LimitsDeleted,
                resource,
                serde_json::json!({ "limit_names": limit_names }),
            )
            .await;
        Ok(true)
    }

    async fn get_on_unavailable(&self) -> Result<Option<OnUnavailable>, Error> {
        let (pk, sk) = self.inner.config_key(&ConfigScope::System);
        let item = self.inner.get_record(&pk, &sk).await?;
        Ok(item.as_ref().and_then(codec::on_unavailable))
    }

    async fn list_limits(&self) -> Result<Vec<(ConfigScope, Vec<Limit>)>, Error> {
        self.inner.list_limits().await
    }

    async fn set_on_unavailable(&self, policy: Option<OnUnavailable>) -> Result<(), Error> {
        let inner = &self.inner;
        inner
            .update_config(&ConfigScope::System, |_, expr, update| {
                let n = expr.name("on_unavailable");
                match policy {
                    Some(p) => {
                        let v = expr.value(AttributeValue::S(p.as_str().into()));
                        update.set.push(format!("{n} = {v}"));
                    }
                    None => update.remove.push(n),
                }
            })
            .await?;
        inner
            .audit(
                "$SYSTEM",
                AuditAction::OnUnavailableSet,
                None,
                serde_json::json!({ "on_unavailable": policy.map(|p| p.as_str()) }),
            )
            .await;
        Ok(())
    }

    async fn load_config(&self, entity_id: &str, resource: &str) -> Result<StoredConfig, Error> {
        let inner = &self.inner;
        let entity_pk = keys::entity_pk(&inner.ns, entity_id);
        let mut wanted = vec![
            (entity_pk.clone(), keys::META_SK.to_string()),
            (entity_pk.clone(), keys::entity_config_sk(resource)),
            inner.config_key(&ConfigScope::Resource(resource.into())),
            inner.config_key(&ConfigScope::System),
        ];
        // The namespace's registry row rides along: a limiter opened before its namespace
        // was purged must fail with `NamespaceNotFound` (at the latest when its config
        // cache refreshes), not go on writing orphan buckets.
        wanted.push((
            keys::REGISTRY_PK.to_string(),
            keys::namespace_id_sk(&inner.ns),
        ));
        if resource != DEFAULT_RESOURCE {
            wanted.push((entity_pk.clone(), keys::entity_config_sk(DEFAULT_RESOURCE)));
        }
        let found = inner
            .batch_get(
                wanted.iter().map(|(p, k)| codec::key(p, k)).collect(),
                false,
            )
            .await?;
        let record = |pk: &str, sk: &str| {
            found.iter().find(|i| {
                codec::get_str(i, "PK") == Some(pk) && codec::get_str(i, "SK") == Some(sk)
            })
        };
        let limits_at = |(pk, sk): &(String, String)| -> Option<Arc<[Limit]>> {
            record(pk, sk).and_then(codec::config_limits).map(Arc::from)
        };
        if record(&wanted[4].0, &wanted[4].1).is_none() {
            return Err(Error::NamespaceNotFound {
                namespace: inner.namespace.clone(),
            });
        }
        let system = record(&wanted[3].0, &wanted[3].1);
        Ok(StoredConfig {
            entity: record(&wanted[0].0, &wanted[0].1).and_then(codec::parse_entity),
            entity_limits: limits_at(&wanted[1]),
            entity_default_limits: wanted.get(5).and_then(limits_at),
            resource_limits: limits_at(&wanted[2]),
            system_limits: limits_at(&wanted[3]),
            on_unavailable: system.and_then(codec::on_unavailable),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::is_loopback;

    #[test]
    fn loopback_endpoints() {
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
