//! The table and the registry records: creating the table with its indexes, the schema
//! version record, namespace registration, purge and delete.

use std::time::Duration;

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::operation::describe_table::DescribeTableOutput;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, DeleteRequest, GlobalSecondaryIndex,
    KeySchemaElement, KeyType, PointInTimeRecoverySpecification, Projection, ProjectionType,
    ProvisionedThroughput, Put, ScalarAttributeType, StreamSpecification, StreamViewType,
    TableStatus, Tag, TimeToLiveSpecification, TransactWriteItem, WriteRequest,
};
use aws_sdk_dynamodb::Client;

use super::codec::{self, get_str, s, Item};
use super::errors::build_error;
use super::retry::backoff;
use super::{errors, keys, stamps, TableError};
use crate::Error;

/// The schema version this client writes and reads: the one the Python zae-limiter 0.17
/// writes, so each opens the other's tables. A stored version with another major number is
/// [`TableError::IncompatibleSchema`] (both libraries check majors).
pub const SCHEMA_VERSION: &str = "0.10.0";

/// The schema version this crate wrote before it shared tables with Python. Python never
/// wrote a major 1, so a table holding it is this crate's: read as it is by `connect`, and
/// rewritten to [`SCHEMA_VERSION`] by `build` (and `zae-limiter deploy`).
pub const LEGACY_SCHEMA_VERSION: &str = "1.0.0";

/// The Python zae-limiter release whose table contract this crate follows. A table whose
/// `client_min_version` is newer holds features this crate does not know.
pub const CONTRACT_VERSION: &str = "0.17.0";

/// How the table is billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Billing {
    /// Pay per request (on-demand), the default.
    #[default]
    OnDemand,
    /// Provisioned capacity, applied to the table and every index.
    Provisioned {
        /// Read capacity units.
        read: i64,
        /// Write capacity units.
        write: i64,
    },
}

/// Options for creating the table (ignored when it exists).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableOptions {
    /// Billing mode (on-demand by default).
    pub billing: Billing,
    /// Publish a change stream with new and old images, for consumers such as a usage
    /// aggregator. Off by default: a stream costs write throughput (markedly so on DynamoDB
    /// Local), so enable it only where something reads it.
    pub stream: bool,
    /// Turn on point-in-time recovery after creating the table.
    pub point_in_time_recovery: bool,
    /// Protect the table from deletion.
    pub deletion_protection: bool,
    /// Tags for the table.
    pub tags: Vec<(String, String)>,
}

/// What [`super::DynamoDbRepository::table_status`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableStatusReport {
    /// The table's name.
    pub table: String,
    /// `ACTIVE`, `CREATING`, ...
    pub status: String,
    /// DynamoDB's approximate item count (refreshed about every six hours on AWS).
    pub item_count: i64,
    /// Whether a stream is on, and its view type.
    pub stream: Option<String>,
    /// The stored schema version, if the version record exists.
    pub schema_version: Option<String>,
    /// Whether TTL is enabled on the `ttl` attribute.
    pub ttl_enabled: bool,
    /// `PAY_PER_REQUEST` or `PROVISIONED`.
    pub billing: String,
    /// Provisioned read and write capacity of the table, when provisioned.
    pub provisioned: Option<(i64, i64)>,
    /// Whether deletion protection is on.
    pub deletion_protection: bool,
    /// Whether point-in-time recovery is on (`None` when the endpoint cannot tell).
    pub point_in_time_recovery: Option<bool>,
}

/// One namespace registered in a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// The namespace's name.
    pub name: String,
    /// Its opaque id, the prefix of its records' keys.
    pub id: String,
    /// `active`, or `deleted`/`purging` for one on its way out.
    pub status: String,
    /// When it was registered, epoch milliseconds.
    pub created_at_ms: Option<i64>,
}

/// Every key attribute of the table and its indexes (all strings).
pub(super) const KEY_ATTRIBUTES: [&str; 10] = [
    "PK", "SK", "GSI1PK", "GSI1SK", "GSI2PK", "GSI2SK", "GSI3PK", "GSI3SK", "GSI4PK", "GSI4SK",
];

/// A global secondary index of the table.
pub(super) struct IndexDef {
    pub name: &'static str,
    pub pk: &'static str,
    pub sk: &'static str,
    pub projection: ProjectionType,
}

/// The table's indexes: GSI1 children of a parent, GSI2 buckets by resource, GSI3 an
/// entity's buckets and entity configs by resource, GSI4 every record of a namespace.
pub(super) const INDEXES: [IndexDef; 4] = [
    IndexDef {
        name: "GSI1",
        pk: "GSI1PK",
        sk: "GSI1SK",
        projection: ProjectionType::All,
    },
    IndexDef {
        name: "GSI2",
        pk: "GSI2PK",
        sk: "GSI2SK",
        projection: ProjectionType::All,
    },
    IndexDef {
        name: "GSI3",
        pk: "GSI3PK",
        sk: "GSI3SK",
        projection: ProjectionType::KeysOnly,
    },
    IndexDef {
        name: "GSI4",
        pk: "GSI4PK",
        sk: "GSI4SK",
        projection: ProjectionType::KeysOnly,
    },
];

/// The TTL attribute (epoch seconds).
pub(super) const TTL_ATTRIBUTE: &str = "ttl";

fn key_schema(pk: &str, sk: &str) -> Result<Vec<KeySchemaElement>, Error> {
    Ok(vec![
        KeySchemaElement::builder()
            .attribute_name(pk)
            .key_type(KeyType::Hash)
            .build()
            .map_err(build_error)?,
        KeySchemaElement::builder()
            .attribute_name(sk)
            .key_type(KeyType::Range)
            .build()
            .map_err(build_error)?,
    ])
}

/// Creates the table unless it exists, waits until it is active, and enables TTL.
/// Safe when several processes do it at once.
pub(super) async fn ensure_table(
    client: &Client,
    table: &str,
    options: &TableOptions,
) -> Result<(), Error> {
    match describe(client, table).await {
        Ok(_) => return wait_active(client, table).await,
        Err(Error::Table(TableError::TableNotFound { .. })) => {}
        Err(other) => return Err(other),
    }
    let mut attributes = Vec::new();
    for name in KEY_ATTRIBUTES {
        attributes.push(
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(build_error)?,
        );
    }
    let throughput = match options.billing {
        Billing::OnDemand => None,
        Billing::Provisioned { read, write } => Some(
            ProvisionedThroughput::builder()
                .read_capacity_units(read)
                .write_capacity_units(write)
                .build()
                .map_err(build_error)?,
        ),
    };
    let mut indexes = Vec::new();
    for index in INDEXES {
        indexes.push(
            GlobalSecondaryIndex::builder()
                .index_name(index.name)
                .set_key_schema(Some(key_schema(index.pk, index.sk)?))
                .projection(
                    Projection::builder()
                        .projection_type(index.projection.clone())
                        .build(),
                )
                .set_provisioned_throughput(throughput.clone())
                .build()
                .map_err(build_error)?,
        );
    }
    let mut create = client
        .create_table()
        .table_name(table)
        .set_attribute_definitions(Some(attributes))
        .set_key_schema(Some(key_schema("PK", "SK")?))
        .set_global_secondary_indexes(Some(indexes))
        .deletion_protection_enabled(options.deletion_protection);
    create = match options.billing {
        Billing::OnDemand => create.billing_mode(BillingMode::PayPerRequest),
        Billing::Provisioned { .. } => create
            .billing_mode(BillingMode::Provisioned)
            .set_provisioned_throughput(throughput),
    };
    if options.stream {
        create = create.stream_specification(
            StreamSpecification::builder()
                .stream_enabled(true)
                .stream_view_type(StreamViewType::NewAndOldImages)
                .build()
                .map_err(build_error)?,
        );
    }
    for (k, v) in &options.tags {
        create = create.tags(
            Tag::builder()
                .key(k)
                .value(v)
                .build()
                .map_err(build_error)?,
        );
    }
    match create.send().await {
        Ok(_) => tracing::info!(table, "created DynamoDB table"),
        Err(e) => {
            // Another process created it first.
            let in_use = e
                .as_service_error()
                .is_some_and(|s| s.is_resource_in_use_exception());
            if !in_use {
                return Err(errors::map("CreateTable", table, e));
            }
        }
    }
    wait_active(client, table).await?;
    let ttl = client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(
            TimeToLiveSpecification::builder()
                .enabled(true)
                .attribute_name(TTL_ATTRIBUTE)
                .build()
                .map_err(build_error)?,
        )
        .send()
        .await;
    if let Err(e) = ttl {
        // A concurrent creator enabled it already.
        let text = format!("{:?}", e.as_service_error());
        if !text.contains("already enabled") {
            return Err(errors::map("UpdateTimeToLive", table, e));
        }
    }
    if options.point_in_time_recovery {
        enable_pitr(client, table).await?;
    }
    Ok(())
}

/// Turns on point-in-time recovery; on an endpoint without backups (DynamoDB Local) it
/// warns and leaves it off, since everything else about the table is usable.
pub(super) async fn enable_pitr(client: &Client, table: &str) -> Result<(), Error> {
    let sent = client
        .update_continuous_backups()
        .table_name(table)
        .point_in_time_recovery_specification(
            PointInTimeRecoverySpecification::builder()
                .point_in_time_recovery_enabled(true)
                .build()
                .map_err(build_error)?,
        )
        .send()
        .await;
    match sent {
        Ok(_) => Ok(()),
        Err(e) if e.code() == Some("UnknownOperationException") => {
            tracing::warn!(
                table,
                "this endpoint does not support point-in-time recovery (DynamoDB Local); left off"
            );
            Ok(())
        }
        Err(e) => Err(errors::map("UpdateContinuousBackups", table, e)),
    }
}

/// Adds or updates these tags on the table (others are left alone); returns the
/// `key=value` pairs it set.
pub(super) async fn ensure_tags(
    client: &Client,
    table: &str,
    tags: &[(String, String)],
) -> Result<Vec<String>, Error> {
    let arn = describe(client, table)
        .await?
        .table()
        .and_then(|t| t.table_arn())
        .map(str::to_string)
        .ok_or_else(|| Error::Backend {
            message: format!("DescribeTable gave no ARN for table {table:?}"),
            source: None,
        })?;
    let mut live = Vec::new();
    let mut next = None;
    loop {
        let page = match client
            .list_tags_of_resource()
            .resource_arn(&arn)
            .set_next_token(next)
            .send()
            .await
        {
            Ok(page) => page,
            Err(e) if e.code() == Some("UnknownOperationException") => {
                tracing::warn!(
                    table,
                    "this endpoint does not support tags (DynamoDB Local); left as they are"
                );
                return Ok(Vec::new());
            }
            Err(e) => return Err(errors::map("ListTagsOfResource", table, e)),
        };
        live.extend(
            page.tags()
                .iter()
                .map(|t| (t.key().to_string(), t.value().to_string())),
        );
        next = page.next_token().map(str::to_string);
        if next.is_none() {
            break;
        }
    }
    let missing: Vec<&(String, String)> = tags.iter().filter(|t| !live.contains(t)).collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    let mut request = client.tag_resource().resource_arn(&arn);
    for (k, v) in &missing {
        request = request.tags(
            Tag::builder()
                .key(k)
                .value(v)
                .build()
                .map_err(build_error)?,
        );
    }
    request
        .send()
        .await
        .map_err(|e| errors::map("TagResource", table, e))?;
    Ok(missing.iter().map(|(k, v)| format!("{k}={v}")).collect())
}

pub(super) async fn wait_active(client: &Client, table: &str) -> Result<(), Error> {
    for attempt in 0..120 {
        let out = describe(client, table).await?;
        let t = out.table();
        let table_active = t.and_then(|t| t.table_status()) == Some(&TableStatus::Active);
        let indexes_active = t.is_none_or(|t| {
            t.global_secondary_indexes().iter().all(|i| {
                i.index_status()
                    .is_none_or(|s| *s == aws_sdk_dynamodb::types::IndexStatus::Active)
            })
        });
        if table_active && indexes_active {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(if attempt < 10 { 100 } else { 1000 })).await;
    }
    Err(Error::Unavailable {
        message: format!("DynamoDB table {table:?} did not become active"),
        source: None,
    })
}

/// Checks that the table exists (for `connect`).
pub(super) async fn require_table(client: &Client, table: &str) -> Result<(), Error> {
    describe(client, table).await.map(|_| ())
}

/// A strongly consistent read of one record.
pub(super) async fn get_item(
    client: &Client,
    table: &str,
    pk: &str,
    sk: &str,
) -> Result<Option<Item>, Error> {
    let out = client
        .get_item()
        .table_name(table)
        .set_key(Some(codec::key(pk, sk)))
        .consistent_read(true)
        .send()
        .await
        .map_err(|e| errors::map("GetItem", table, e))?;
    Ok(out.item)
}

/// The table's description; [`TableError::TableNotFound`] when it does not exist.
async fn describe(client: &Client, table: &str) -> Result<DescribeTableOutput, Error> {
    client
        .describe_table()
        .table_name(table)
        .send()
        .await
        .map_err(|e| errors::map("DescribeTable", table, e))
}

/// The version record, if the table has one.
pub(super) async fn version_record(client: &Client, table: &str) -> Result<Option<Item>, Error> {
    get_item(client, table, keys::REGISTRY_PK, keys::VERSION_SK).await
}

/// Reads the stored schema version.
pub(super) async fn stored_version(client: &Client, table: &str) -> Result<Option<String>, Error> {
    Ok(version_record(client, table)
        .await?
        .as_ref()
        .and_then(|i| get_str(i, "schema_version"))
        .map(str::to_string))
}

/// `X.Y.Z` as numbers, Python's way (`version.py: parse_version`): a leading `v` and a
/// `+local` part dropped, a pre-release suffix ignored, `X.Y` read as `X.Y.0`.
fn parse_version(text: &str) -> Option<(u64, u64, u64)> {
    let text = text.trim().trim_start_matches('v');
    let text = text.split('+').next()?;
    let mut parts = text.split('.').map(|p| {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        digits.parse::<u64>().ok()
    });
    let major = parts.next()??;
    let minor = parts.next().flatten().unwrap_or(0);
    let patch = parts.next().flatten().unwrap_or(0);
    Some((major, minor, patch))
}

/// Whether a stored schema version can be used by this client: major 0, as Python's
/// 0.x releases write, or this crate's legacy `1.0.0`.
pub(super) fn check_version(stored: &str) -> Result<(), Error> {
    let ours = parse_version(SCHEMA_VERSION).map(|v| v.0);
    if stored == LEGACY_SCHEMA_VERSION || parse_version(stored).map(|v| v.0) == ours {
        Ok(())
    } else {
        Err(TableError::IncompatibleSchema {
            message: format!(
                "the table holds schema version {stored}; this client (zae-limiter {}) reads and writes {SCHEMA_VERSION}, as the Python zae-limiter {CONTRACT_VERSION} does",
                env!("CARGO_PKG_VERSION")
            ),
        }
        .into())
    }
}

/// The Python library's gate before a feature that older readers would misread is stored
/// (its contract, section 2; soft limits and bypass need 0.17.0): refuses when the record
/// names deployed Lambda code older than `minimum` (an aggregator that would misread the
/// feature), then raises `client_min_version` to `minimum`, never lowering it, so older
/// clients refuse the table rather than enforce it wrongly.
///
/// Unlike Python, a `NULL` `lambda_version` passes: this crate writes `NULL` because it
/// deploys no Lambda code, and refusing it would refuse every table this crate created.
pub(super) async fn require_readers(
    client: &Client,
    table: &str,
    minimum: &str,
) -> Result<(), Error> {
    let wanted = parse_version(minimum);
    for _ in 0..8 {
        let Some(record) = version_record(client, table).await? else {
            return Err(TableError::IncompatibleSchema {
                message: "the table has no version record".into(),
            }
            .into());
        };
        if let Some(lambda) = get_str(&record, "lambda_version") {
            if parse_version(lambda).is_none_or(|v| Some(v) < wanted) {
                return Err(TableError::IncompatibleSchema {
                    message: format!(
                        "the table's Lambda code is zae-limiter {lambda}, older than the {minimum} this feature needs; upgrade it first"
                    ),
                }
                .into());
            }
        }
        let stored = get_str(&record, "client_min_version");
        if stored.and_then(parse_version) >= wanted {
            return Ok(());
        }
        let mut request = client
            .update_item()
            .table_name(table)
            .key("PK", s(keys::REGISTRY_PK))
            .key("SK", s(keys::VERSION_SK))
            .update_expression("SET client_min_version = :new")
            .expression_attribute_values(":new", s(minimum));
        request = match stored {
            Some(v) => request
                .condition_expression("attribute_exists(PK) AND client_min_version = :stored")
                .expression_attribute_values(":stored", s(v)),
            None => request.condition_expression(
                "attribute_exists(PK) AND attribute_not_exists(client_min_version)",
            ),
        };
        if errors::written(request.send().await, "UpdateItem", table)? {
            return Ok(());
        }
    }
    Err(Error::unavailable(
        "could not raise client_min_version",
        "the version record kept changing",
    ))
}

/// Checks a version record: its schema, and that it asks for no client newer than the
/// contract this crate follows.
fn check_record(record: &Item) -> Result<(), Error> {
    let Some(schema) = get_str(record, "schema_version") else {
        return Err(TableError::IncompatibleSchema {
            message: "the version record has no schema_version".into(),
        }
        .into());
    };
    check_version(schema)?;
    let min = get_str(record, "client_min_version").unwrap_or("0.0.0");
    match (parse_version(min), parse_version(CONTRACT_VERSION)) {
        (Some(min_v), Some(ours)) if min_v > ours => Err(TableError::IncompatibleSchema {
            message: format!(
                "the table needs clients of zae-limiter {min} or newer (client_min_version); this crate follows the {CONTRACT_VERSION} table contract"
            ),
        }
        .into()),
        _ => Ok(()),
    }
}

/// Reads and checks the version record; [`TableError::TableNotFound`] without one.
pub(super) async fn require_version(client: &Client, table: &str) -> Result<(), Error> {
    match version_record(client, table).await? {
        Some(record) => check_record(&record),
        None => Err(TableError::TableNotFound {
            table: table.to_string(),
            reason: "it holds no version record (run `open`/`build` or deploy first)".into(),
        }
        .into()),
    }
}

/// Who writes a record, as `updated_by` says it.
pub(super) fn writer() -> String {
    format!("zae-limiter-rs:{}", env!("CARGO_PKG_VERSION"))
}

/// Writes the version record unless present (exactly as Python's initializer does, with a
/// NULL `lambda_version`, which never makes Python deploy anything), migrates this crate's
/// legacy record, then checks it.
pub(super) async fn ensure_version(client: &Client, table: &str) -> Result<(), Error> {
    let mut item = codec::key(keys::REGISTRY_PK, keys::VERSION_SK);
    item.insert("schema_version".into(), s(SCHEMA_VERSION));
    item.insert("lambda_version".into(), AttributeValue::Null(true));
    item.insert("client_min_version".into(), s("0.0.0"));
    item.insert("updated_at".into(), s(stamps::iso(now_ms())));
    item.insert("updated_by".into(), s(writer()));
    item.insert("GSI4PK".into(), s("_"));
    item.insert("GSI4SK".into(), s(keys::REGISTRY_PK));
    let put = client
        .put_item()
        .table_name(table)
        .set_item(Some(item))
        .condition_expression("attribute_not_exists(PK)")
        .send()
        .await;
    // Present already: another process (or Python) wrote it.
    errors::written(put, "PutItem", table)?;
    let record = version_record(client, table).await?.unwrap_or_default();
    if get_str(&record, "schema_version") == Some(LEGACY_SCHEMA_VERSION) {
        super::migrations::migrate_legacy_version(client, table).await?;
        return require_version(client, table).await;
    }
    check_record(&record)
}

/// Wall-clock time for record stamps (`created_at`, `updated_at`, audit times).
pub(super) fn now_ms() -> i64 {
    use crate::clock::Clock;
    crate::clock::SystemClock.now_ms()
}

/// The id of a registered, active namespace.
pub(super) async fn namespace_id(
    client: &Client,
    table: &str,
    name: &str,
) -> Result<Option<String>, Error> {
    let item = get_item(client, table, keys::REGISTRY_PK, &keys::namespace_sk(name)).await?;
    Ok(item
        .as_ref()
        .filter(|i| get_str(i, "status").is_none_or(|s| s == "active"))
        .and_then(|i| get_str(i, "namespace_id"))
        .map(str::to_string))
}

/// A new opaque namespace id: 11 URL-safe characters, never starting with `-`.
fn new_namespace_id() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut id = String::with_capacity(11);
    while id.len() < 11 {
        let c = ALPHABET[rand::random_range(0..ALPHABET.len())] as char;
        if id.is_empty() && c == '-' {
            continue;
        }
        id.push(c);
    }
    id
}

/// Registers a namespace unless it is (both registry rows in one transaction); returns its
/// id. When several processes race, all end with the winner's id.
pub(super) async fn ensure_namespace(
    client: &Client,
    table: &str,
    name: &str,
) -> Result<String, Error> {
    for attempt in 0..8 {
        if let Some(id) = namespace_id(client, table, name).await? {
            return Ok(id);
        }
        let id = new_namespace_id();
        let row = |sk: String| -> Result<TransactWriteItem, Error> {
            let mut item: Item = codec::key(keys::REGISTRY_PK, sk.clone());
            item.insert("namespace_id".into(), s(&id));
            item.insert("namespace_name".into(), s(name));
            item.insert("status".into(), s("active"));
            item.insert("created_at".into(), s(stamps::iso(now_ms())));
            item.insert("GSI4PK".into(), s("_"));
            item.insert("GSI4SK".into(), s(keys::REGISTRY_PK));
            let put = Put::builder()
                .table_name(table)
                .set_item(Some(item))
                .condition_expression("attribute_not_exists(PK) OR #st = :deleted")
                .expression_attribute_names("#st", "status")
                .expression_attribute_values(":deleted", s("deleted"))
                .build()
                .map_err(build_error)?;
            Ok(TransactWriteItem::builder().put(put).build())
        };
        let sent = client
            .transact_write_items()
            .transact_items(row(keys::namespace_sk(name))?)
            .transact_items(row(keys::namespace_id_sk(&id))?)
            .send()
            .await;
        match sent {
            Ok(_) => {
                tracing::info!(table, namespace = name, namespace_id = %id, "registered namespace");
                return Ok(id);
            }
            Err(e) => match e.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(_)) => {
                    tokio::time::sleep(backoff(attempt)).await;
                }
                _ => return Err(errors::map("TransactWriteItems", table, e)),
            },
        }
    }
    Err(Error::Unavailable {
        message: format!("could not register namespace {name:?}: contention"),
        source: None,
    })
}

/// Every registered namespace, by name.
pub(super) async fn list_namespaces(
    client: &Client,
    table: &str,
) -> Result<Vec<NamespaceInfo>, Error> {
    let mut out = Vec::new();
    let mut start = None;
    loop {
        let page = client
            .query()
            .table_name(table)
            .key_condition_expression("PK = :pk AND begins_with(SK, :prefix)")
            .expression_attribute_values(":pk", s(keys::REGISTRY_PK))
            .expression_attribute_values(":prefix", s("#NAMESPACE#"))
            .consistent_read(true)
            .set_exclusive_start_key(start)
            .send()
            .await
            .map_err(|e| errors::map("Query", table, e))?;
        for item in page.items() {
            if let (Some(n), Some(i)) = (
                get_str(item, "namespace_name"),
                get_str(item, "namespace_id"),
            ) {
                out.push(NamespaceInfo {
                    name: n.to_string(),
                    id: i.to_string(),
                    status: get_str(item, "status").unwrap_or("active").to_string(),
                    created_at_ms: stamps::time_ms(item, "created_at"),
                });
            }
        }
        start = page.last_evaluated_key().cloned();
        if start.is_none() {
            return Ok(out);
        }
    }
}

/// Deletes every item of a namespace (found through GSI4) and its registry rows; returns
/// how many items went.
pub(super) async fn purge_namespace(
    client: &Client,
    table: &str,
    name: &str,
    ns: &str,
    mut progress: impl FnMut(usize),
) -> Result<usize, Error> {
    let mut deleted = 0;
    loop {
        // The index is eventually consistent: query until it shows nothing left.
        let page = client
            .query()
            .table_name(table)
            .index_name("GSI4")
            .key_condition_expression("GSI4PK = :ns")
            .expression_attribute_values(":ns", s(ns))
            .send()
            .await
            .map_err(|e| errors::map("Query", table, e))?;
        let keys: Vec<Item> = page
            .items()
            .iter()
            .filter_map(|i| Some(codec::key(get_str(i, "PK")?, get_str(i, "SK")?)))
            .collect();
        if keys.is_empty() {
            break;
        }
        deleted += delete_keys(client, table, keys).await?;
        progress(deleted);
    }
    delete_keys(
        client,
        table,
        vec![
            codec::key(keys::REGISTRY_PK, keys::namespace_sk(name)),
            codec::key(keys::REGISTRY_PK, keys::namespace_id_sk(ns)),
        ],
    )
    .await?;
    Ok(deleted)
}

/// Deletes records by key, 25 to a `BatchWriteItem`, retrying unprocessed ones.
pub(super) async fn delete_keys(
    client: &Client,
    table: &str,
    keys: Vec<Item>,
) -> Result<usize, Error> {
    let total = keys.len();
    for chunk in keys.chunks(25) {
        let mut requests: Vec<WriteRequest> = chunk
            .iter()
            .map(|k| {
                Ok(WriteRequest::builder()
                    .delete_request(
                        DeleteRequest::builder()
                            .set_key(Some(k.clone()))
                            .build()
                            .map_err(build_error)?,
                    )
                    .build())
            })
            .collect::<Result<_, Error>>()?;
        for attempt in 0..10 {
            let out = client
                .batch_write_item()
                .request_items(table, requests)
                .send()
                .await
                .map_err(|e| errors::map("BatchWriteItem", table, e))?;
            requests = out
                .unprocessed_items()
                .and_then(|u| u.get(table))
                .cloned()
                .unwrap_or_default();
            if requests.is_empty() {
                break;
            }
            tokio::time::sleep(backoff(attempt)).await;
        }
        if !requests.is_empty() {
            return Err(Error::Unavailable {
                message: "BatchWriteItem left deletes unprocessed after retries".into(),
                source: None,
            });
        }
    }
    Ok(total)
}

/// Deletes the table.
pub(super) async fn delete_table(client: &Client, table: &str) -> Result<(), Error> {
    client
        .delete_table()
        .table_name(table)
        .send()
        .await
        .map(|_| ())
        .map_err(|e| errors::map("DeleteTable", table, e))
}

/// Reports on the table.
pub(super) async fn status(client: &Client, table: &str) -> Result<TableStatusReport, Error> {
    let out = describe(client, table).await?;
    let t = out.table();
    let ttl = client
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .map_err(|e| errors::map("DescribeTimeToLive", table, e))?;
    Ok(TableStatusReport {
        table: table.to_string(),
        status: t
            .and_then(|t| t.table_status())
            .map(|s| s.as_str().to_string())
            .unwrap_or_default(),
        item_count: t.and_then(|t| t.item_count()).unwrap_or(0),
        stream: t
            .and_then(|t| t.stream_specification())
            .filter(|s| s.stream_enabled())
            .map(|s| {
                s.stream_view_type()
                    .map(|v| v.as_str().to_string())
                    .unwrap_or_default()
            }),
        schema_version: stored_version(client, table).await?,
        ttl_enabled: ttl
            .time_to_live_description()
            .and_then(|d| d.time_to_live_status())
            .is_some_and(|s| s.as_str() == "ENABLED"),
        billing: t
            .and_then(|t| t.billing_mode_summary())
            .and_then(|b| b.billing_mode())
            .map_or("PROVISIONED", |m| m.as_str())
            .to_string(),
        provisioned: t
            .and_then(|t| t.provisioned_throughput())
            .and_then(|p| Some((p.read_capacity_units()?, p.write_capacity_units()?)))
            .filter(|(r, w)| *r > 0 || *w > 0),
        deletion_protection: t
            .and_then(|t| t.deletion_protection_enabled())
            .unwrap_or(false),
        point_in_time_recovery: client
            .describe_continuous_backups()
            .table_name(table)
            .send()
            .await
            .ok()
            .and_then(|o| {
                let status = o
                    .continuous_backups_description()?
                    .point_in_time_recovery_description()?
                    .point_in_time_recovery_status()?;
                Some(status.as_str() == "ENABLED")
            }),
    })
}
