//! Records this crate wrote before it shared tables with the Python zae-limiter,
//! rewritten once in Python's form: the version record (by `build`, eagerly) and entity
//! records (lazily, when first read).

use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_dynamodb::Client;

use super::codec::{self, num, s, Item};
use super::table::{now_ms, writer, LEGACY_SCHEMA_VERSION, SCHEMA_VERSION};
use super::{errors, keys, stamps, Inner};
use crate::Error;

/// Rewrites this crate's legacy version record in Python's form, once (conditioned on the
/// legacy version, so racing processes rewrite it once).
pub(super) async fn migrate_legacy_version(client: &Client, table: &str) -> Result<(), Error> {
    let sent = client
        .update_item()
        .table_name(table)
        .set_key(Some(codec::key(keys::REGISTRY_PK, keys::VERSION_SK)))
        .update_expression(
            "SET schema_version = :new, updated_at = :at, updated_by = :by, \
             client_min_version = if_not_exists(client_min_version, :min), \
             lambda_version = if_not_exists(lambda_version, :null), GSI4SK = :gsi4sk \
             REMOVE client_version",
        )
        .condition_expression("schema_version = :legacy")
        .expression_attribute_values(":new", s(SCHEMA_VERSION))
        .expression_attribute_values(":legacy", s(LEGACY_SCHEMA_VERSION))
        .expression_attribute_values(":at", s(stamps::iso(now_ms())))
        .expression_attribute_values(":by", s(writer()))
        .expression_attribute_values(":min", s("0.0.0"))
        .expression_attribute_values(":null", AttributeValue::Null(true))
        .expression_attribute_values(":gsi4sk", s(keys::REGISTRY_PK))
        .send()
        .await;
    // A failed condition: another process migrated it first.
    if errors::written(sent, "UpdateItem", table)? {
        tracing::info!(
            table,
            from = LEGACY_SCHEMA_VERSION,
            to = SCHEMA_VERSION,
            "migrated the version record"
        );
    }
    Ok(())
}

impl Inner {
    /// Rewrites an entity record this crate wrote before it shared tables with Python (a
    /// numeric `created_at`, no `pgen`/`pinc`) in Python's form, in the background, once:
    /// Python pins bucket creates on those fields and cannot create buckets for the entity
    /// without them. Conditioned on the number read, so it never overwrites a newer write.
    pub(super) fn migrate_legacy_meta(&self, meta: &Item) {
        let Some(AttributeValue::N(created)) = meta.get("created_at") else {
            return;
        };
        let Ok(ms) = created.parse::<i64>() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let key = codec::key(
            codec::get_str(meta, "PK").unwrap_or_default(),
            keys::META_SK,
        );
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key))
            .update_expression(
                "SET created_at = :iso, pgen = if_not_exists(pgen, :ms), pinc = if_not_exists(pinc, :inc)",
            )
            .condition_expression("created_at = :old")
            .expression_attribute_values(":iso", s(stamps::iso(ms)))
            .expression_attribute_values(":ms", num(ms))
            .expression_attribute_values(":inc", s(stamps::incarnation()))
            .expression_attribute_values(":old", AttributeValue::N(created.clone()));
        let table = self.table.clone();
        runtime.spawn(async move {
            if let Err(e) = errors::written(request.send().await, "UpdateItem", &table) {
                tracing::warn!(error = %e, "could not migrate an entity record to the Python form; retried at its next read");
            }
        });
    }
}
