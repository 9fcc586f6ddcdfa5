//! The namespace's registries, as the Python library keeps them (its contract, section
//! 7): `#RESOURCES`, the set of resources with stored limits, and
//! `#ENTITY_CONFIG_RESOURCES`, a count of entity configs per resource. Python's
//! `list_resources_with_defaults()` and `list_resources_with_entity_configs()` read them.
//! Also the lazy migration of entity records written before this crate followed Python.

use aws_sdk_dynamodb::types::AttributeValue;

use super::codec::{self, num, s, Item};
use super::{errors, keys, Inner};
use crate::repository::ConfigScope;
use crate::Error;

/// The sort key of the resource registry.
const RESOURCES_SK: &str = "#RESOURCES";
/// The sort key of the entity-config count per resource.
const ENTITY_CONFIG_RESOURCES_SK: &str = "#ENTITY_CONFIG_RESOURCES";

impl Inner {
    /// Keeps the registries in step with a config write: `stored` after a set (`changed`:
    /// the record was created), or after a delete.
    pub(super) async fn update_registries(
        &self,
        scope: &ConfigScope,
        changed: bool,
        stored: bool,
    ) -> Result<(), Error> {
        match scope {
            ConfigScope::System => Ok(()),
            ConfigScope::Resource(resource) => self.register_resource(resource, stored).await,
            ConfigScope::Entity { resource, .. } if changed => {
                self.count_entity_config(resource, if stored { 1 } else { -1 })
                    .await
            }
            ConfigScope::Entity { .. } => Ok(()),
        }
    }

    /// Adds `resource` to the resource registry, or (`present` false) removes it.
    pub(super) async fn register_resource(
        &self,
        resource: &str,
        present: bool,
    ) -> Result<(), Error> {
        let pk = keys::system_pk(&self.ns);
        let verb = if present { "ADD" } else { "DELETE" };
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(codec::key(&pk, RESOURCES_SK)))
            .update_expression(format!(
                "{verb} resources :r SET GSI4PK = if_not_exists(GSI4PK, :ns), GSI4SK = if_not_exists(GSI4SK, :pk)"
            ))
            .expression_attribute_values(":r", AttributeValue::Ss(vec![resource.to_string()]))
            .expression_attribute_values(":ns", s(&self.ns))
            .expression_attribute_values(":pk", s(&pk))
            .send()
            .await
            .map_err(|e| errors::map("UpdateItem", &self.table, e))?;
        Ok(())
    }

    /// Counts an entity config created (`+1`) or deleted (`-1`) for `resource`; a count
    /// that falls to zero is removed, so the resource drops out of the listing.
    pub(super) async fn count_entity_config(
        &self,
        resource: &str,
        delta: i64,
    ) -> Result<(), Error> {
        let pk = keys::system_pk(&self.ns);
        let key = codec::key(&pk, ENTITY_CONFIG_RESOURCES_SK);
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key.clone()))
            .update_expression(
                "ADD #res :d SET GSI4PK = if_not_exists(GSI4PK, :ns), GSI4SK = if_not_exists(GSI4SK, :pk)",
            )
            .expression_attribute_names("#res", resource)
            .expression_attribute_values(":d", AttributeValue::N(delta.to_string()))
            .expression_attribute_values(":ns", s(&self.ns))
            .expression_attribute_values(":pk", s(&pk))
            .send()
            .await
            .map_err(|e| errors::map("UpdateItem", &self.table, e))?;
        if delta < 0 {
            let removed = self
                .client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(key))
                .update_expression("REMOVE #res")
                .condition_expression("#res <= :zero")
                .expression_attribute_names("#res", resource)
                .expression_attribute_values(":zero", AttributeValue::N("0".into()))
                .send()
                .await;
            if let Err(e) = removed {
                if !e
                    .as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception())
                {
                    return Err(errors::map("UpdateItem", &self.table, e));
                }
            }
        }
        Ok(())
    }

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
            .expression_attribute_values(":iso", s(super::stamps::iso(ms)))
            .expression_attribute_values(":ms", num(ms))
            .expression_attribute_values(":inc", s(super::stamps::incarnation()))
            .expression_attribute_values(":old", AttributeValue::N(created.clone()));
        let table = self.table.clone();
        runtime.spawn(async move {
            if let Err(e) = request.send().await {
                if !e
                    .as_service_error()
                    .is_some_and(|s| s.is_conditional_check_failed_exception())
                {
                    tracing::warn!(error = %errors::map("UpdateItem", &table, e), "could not migrate an entity record to the Python form; retried at its next read");
                }
            }
        });
    }
}
