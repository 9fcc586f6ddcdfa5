//! The namespace's registries, as the Python library keeps them (its contract, section
//! 7): `#RESOURCES`, the set of resources with stored limits, and
//! `#ENTITY_CONFIG_RESOURCES`, a count of entity configs per resource. Python's
//! `list_resources_with_defaults()` and `list_resources_with_entity_configs()` read them.

use aws_sdk_dynamodb::types::AttributeValue;

use super::codec::{self, s};
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
            // A count still above zero stays.
            errors::written(removed, "UpdateItem", &self.table)?;
        }
        Ok(())
    }
}
