//! [`DynamoDbRepository`] and the [`Repository`] operations on its table.

use super::{
    codec, errors, flags, images, keys, lease_writes, owners, retry, table, AuditAction,
    AuditEvent, DynamoDbRepositoryBuilder, TableError, TableStatusReport,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnValuesOnConditionCheckFailure};
use aws_sdk_dynamodb::Client;

use super::codec::{get_i64, num, s, Image, Item};
use super::expr::{Expr, Update};
use super::rejections::RejectionCache;

use crate::bucket::BucketState;
use crate::naming::{self, DEFAULT_RESOURCE};
use crate::repository::{
    Access, AcquireOutcome, AcquireRequest, AdjustRequest, ConfigScope, Repository, StoredConfig,
};
use crate::{BackendCapabilities, Entity, Error, Limit, OnUnavailable};

/// Buckets, entities and limits in a DynamoDB table. Clones share one client and caches.
#[derive(Clone)]
pub struct DynamoDbRepository {
    pub(super) inner: Arc<Inner>,
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

pub(super) struct Inner {
    pub(super) client: Client,
    pub(super) table: String,
    pub(super) namespace: String,
    /// The namespace's opaque id, the prefix of every key.
    pub(super) ns: String,
    pub(super) config_cache_ttl: Duration,
    /// The bound on what a caller waits for one operation.
    pub(super) timeout: Duration,
    pub(super) rejections: RejectionCache,
    pub(super) bucket_ttl_multiplier: u32,
    pub(super) principal: Option<String>,
    pub(super) stream: bool,
    /// Lease writes whose outcome is unknown, to be re-sent with their tokens.
    pub(super) in_doubt: lease_writes::InDoubtWrites,
    /// The last image seen of each item written.
    pub(super) images: images::ImageCache,
    /// The last owner stamp read of each entity (for the owner check on bucket creates).
    pub(super) owners: owners::OwnerCache,
    /// The shard counts of the sharded buckets seen.
    pub(super) shards: super::shards::ShardCounts,
    /// Turns on a parent's slow path, so this process's tasks do not race each other.
    pub(super) turns: super::turns::Turns,
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
    pub(super) fn config_key(&self, scope: &ConfigScope) -> (String, String) {
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
    pub(super) fn subject(scope: &ConfigScope) -> (String, Option<&str>) {
        match scope {
            ConfigScope::System => ("$SYSTEM".into(), None),
            ConfigScope::Resource(r) => (format!("$RESOURCE:{r}"), Some(r)),
            ConfigScope::Entity {
                entity_id,
                resource,
            } => (entity_id.clone(), Some(resource)),
        }
    }

    pub(super) async fn get_record(&self, pk: &str, sk: &str) -> Result<Option<Item>, Error> {
        table::get_item(&self.client, &self.table, pk, sk).await
    }

    /// Updates a config record under an optimistic lock on its `config_version`, which
    /// moves on every write. `edit` adds the changes, given the record as read.
    pub(super) async fn update_config(
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
            // As Python writes them: the namespace, and the record's partition key.
            let (a, b) = (expr.value(s(&self.ns)), expr.value(s(&pk)));
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
                    tokio::time::sleep(retry::backoff(attempt)).await;
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
            supports_usage_snapshots: true,
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
                &keys::slot(&request.resource, request.shard.index),
                &request.deltas,
                request.now_ms,
                write_id,
                request.counts_only,
            )
            .await
    }

    async fn usage_snapshots(
        &self,
        query: &crate::usage::UsageQuery,
    ) -> Result<crate::usage::UsagePage, Error> {
        self.inner.usage_page(query).await
    }

    async fn resource_buckets(
        &self,
        resource: &str,
    ) -> Result<Vec<crate::usage::ResourceBucket>, Error> {
        naming::validate_resource(resource)?;
        self.inner.resource_buckets(resource).await
    }

    async fn get_buckets(
        &self,
        entity_id: &str,
        resource: &str,
    ) -> Result<BTreeMap<String, BucketState>, Error> {
        let Some(first) = self.inner.read_bucket(entity_id, resource).await? else {
            return Ok(BTreeMap::new());
        };
        if first.shards() <= 1 {
            return Ok(first.buckets);
        }
        // A sharded bucket: what its shards hold together (each its share).
        let others: Vec<Item> = (1..first.shards())
            .map(|k| self.inner.bucket_key(entity_id, &keys::slot(resource, k)))
            .collect();
        let mut buckets = first.buckets;
        for item in self.inner.batch_get(others, true).await? {
            for (name, shard) in Image::parse(&item).buckets {
                buckets
                    .entry(name)
                    .and_modify(|total| add_shard(total, &shard))
                    .or_insert(shard);
            }
        }
        Ok(buckets)
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
            inner.shards.forget_entity(entity_id);
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
        if limits.iter().any(|l| l.soft) {
            // Readers before 0.17 would enforce a soft limit: keep them out, as Python does.
            table::require_readers(&inner.client, &inner.table, flags::NON_ENFORCING_READERS)
                .await?;
        }
        let created = std::sync::atomic::AtomicBool::new(false);
        let had_soft = std::sync::atomic::AtomicBool::new(false);
        inner
            .update_config(scope, |current, expr, update| {
                created.store(current.is_none(), std::sync::atomic::Ordering::Relaxed);
                had_soft.store(
                    current
                        .and_then(codec::config_limits)
                        .is_some_and(|l| l.iter().any(|l| l.soft)),
                    std::sync::atomic::Ordering::Relaxed,
                );
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
                    if limit.soft {
                        let attr = keys::config_attr(&limit.name, "soft");
                        let n = expr.name(&attr);
                        let v = expr.value(AttributeValue::Bool(true));
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
        let created = created.load(std::sync::atomic::Ordering::Relaxed);
        inner.update_registries(scope, created, true).await?;
        // Soft-ness changed, or may have: restamp the buckets, as Python does.
        if limits.iter().any(|l| l.soft) || had_soft.load(std::sync::atomic::Ordering::Relaxed) {
            inner.restamp_soft(scope).await?;
        }
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
        let had_soft = codec::config_limits(&current).is_some_and(|l| l.iter().any(|l| l.soft));
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
        inner.update_registries(scope, true, false).await?;
        if had_soft {
            // The buckets fall back to another level's limits: restamp them from it.
            inner.restamp_soft(scope).await?;
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

    async fn set_access(
        &self,
        scope: &ConfigScope,
        access: Option<Access>,
    ) -> Result<usize, Error> {
        let inner = &self.inner;
        inner.write_access_flag(scope, access).await?;
        let stamped = inner.stamp_access(scope).await?;
        inner.audit_access(scope, access, stamped).await;
        Ok(stamped)
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
                // Python records the system policy with the system's limits.
                AuditAction::LimitsSet,
                None,
                serde_json::json!({ "on_unavailable": policy.map(|p| p.as_str()) }),
            )
            .await;
        Ok(())
    }

    async fn load_config(&self, entity_id: &str, resource: &str) -> Result<StoredConfig, Error> {
        self.inner.read_config(entity_id, resource, false).await
    }
}

impl Inner {
    /// [`Repository::load_config`], with consistent reads when `consistent` (a flag just
    /// written must be seen).
    pub(super) async fn read_config(
        &self,
        entity_id: &str,
        resource: &str,
        consistent: bool,
    ) -> Result<StoredConfig, Error> {
        let inner = self;
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
                consistent,
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
            return Err(TableError::NamespaceNotFound {
                namespace: inner.namespace.clone(),
            }
            .into());
        }
        let meta = record(&wanted[0].0, &wanted[0].1);
        inner.remember_owner(entity_id, meta);
        if let Some(meta) = meta {
            inner.migrate_legacy_meta(meta);
        }
        let system = record(&wanted[3].0, &wanted[3].1);
        // The levels in resolution order: entity+resource, entity default, resource, system.
        let levels: Vec<Option<&Item>> = [Some(1), wanted.get(5).map(|_| 5), Some(2), Some(3)]
            .into_iter()
            .flatten()
            .map(|i| record(&wanted[i].0, &wanted[i].1))
            .collect();
        // `disabled` walks the first three levels (not the system's); the first explicit
        // value wins, as in the Python library.
        let flag = levels[..levels.len() - 1]
            .iter()
            .flatten()
            .find(|item| item.contains_key("disabled"));
        let access = flag.and_then(|item| codec::config_access(item));
        let unsupported = levels
            .iter()
            .flatten()
            .find(|item| codec::config_has_limits(item))
            .and_then(|item| codec::config_unsupported(item));
        Ok(StoredConfig {
            entity: record(&wanted[0].0, &wanted[0].1)
                .and_then(codec::parse_entity)
                .map(Arc::new),
            entity_limits: limits_at(&wanted[1]),
            entity_default_limits: wanted.get(5).and_then(limits_at),
            resource_limits: limits_at(&wanted[2]),
            system_limits: limits_at(&wanted[3]),
            on_unavailable: system.and_then(codec::on_unavailable),
            disabled: access == Some(Access::Disabled),
            bypass: access == Some(Access::Bypassed),
            unsupported: unsupported.map(str::to_string),
        })
    }
}

/// Adds one shard's state to the total of a sharded bucket's shards: both refilled to the
/// later of their refill times, then tokens, capacity, refill and consumption add up.
pub(super) fn add_shard(total: &mut BucketState, shard: &BucketState) {
    let now = total.last_refill_ms.max(shard.last_refill_ms);
    let (mut a, b) = (
        crate::bucket::refill(total, now),
        crate::bucket::refill(shard, now),
    );
    a.tokens_milli = a.tokens_milli.saturating_add(b.tokens_milli);
    a.capacity_milli = a.capacity_milli.saturating_add(b.capacity_milli);
    a.refill_amount_milli = a.refill_amount_milli.saturating_add(b.refill_amount_milli);
    a.total_consumed_milli = a
        .total_consumed_milli
        .saturating_add(b.total_consumed_milli);
    a.refill_carry = 0;
    *total = a;
}
