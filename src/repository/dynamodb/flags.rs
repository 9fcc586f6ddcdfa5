//! The `disabled` flag, written as the Python library writes it (its contract, section
//! 8.5): the config record's flag first, then a stamp on every bucket item it governs, so
//! the fast path of both libraries refuses at once. Each item's stamp follows the flag
//! resolved for its entity (an entity's explicit flag overrides the resource's).

use aws_sdk_dynamodb::types::AttributeValue;

use super::codec::{self, get_str, s, Item};
use super::{errors, keys, AuditAction, Inner};
use crate::repository::ConfigScope;
use crate::Error;

impl Inner {
    /// Writes the flag at `scope` (`None`: inherit) in its config record, and registers a
    /// resource as Python's flag writes do.
    pub(super) async fn write_disabled_flag(
        &self,
        scope: &ConfigScope,
        disabled: Option<bool>,
    ) -> Result<(), Error> {
        if matches!(scope, ConfigScope::System) {
            return Err(Error::validation(
                "scope",
                "system",
                "a resource is disabled for an entity or for every entity, not system-wide",
            ));
        }
        self.update_config(scope, |_, expr, update| {
            let n = expr.name("disabled");
            match disabled {
                Some(flag) => {
                    let v = expr.value(AttributeValue::Bool(flag));
                    update.set.push(format!("{n} = {v}"));
                }
                None => update.remove.push(n),
            }
        })
        .await?;
        if let ConfigScope::Resource(r) = scope {
            self.register_resource(r, true).await?;
        }
        Ok(())
    }

    /// Records a flag write, as Python does (`limits_set` with the flag and the count).
    pub(super) async fn audit_disabled(
        &self,
        scope: &ConfigScope,
        disabled: Option<bool>,
        stamped: usize,
    ) {
        let (subject, resource) = Inner::subject(scope);
        self.audit(
            &subject,
            AuditAction::LimitsSet,
            resource,
            serde_json::json!({ "disabled": disabled, "buckets_stamped": stamped }),
        )
        .await;
    }

    /// The keys of the bucket items a flag at `scope` governs (the indexes project keys
    /// only for entities): every
    /// bucket of the resource, of the entity on the resource, or of the entity (its
    /// `_default_`).
    pub(super) async fn governed_buckets(&self, scope: &ConfigScope) -> Result<Vec<Item>, Error> {
        let (index, pk_attr, pk, sk_prefix) = match scope {
            ConfigScope::System => return Ok(Vec::new()),
            ConfigScope::Resource(r) => (
                "GSI2",
                "GSI2PK",
                keys::resource_pk(&self.ns, r),
                "BUCKET#".to_string(),
            ),
            ConfigScope::Entity {
                entity_id,
                resource,
            } => (
                "GSI3",
                "GSI3PK",
                keys::entity_pk(&self.ns, entity_id),
                if resource == crate::naming::DEFAULT_RESOURCE {
                    "BUCKET#".to_string()
                } else {
                    format!("BUCKET#{resource}#")
                },
            ),
        };
        let sk_attr = if index == "GSI2" { "GSI2SK" } else { "GSI3SK" };
        self.client
            .query()
            .table_name(&self.table)
            .index_name(index)
            .key_condition_expression("#pk = :pk AND begins_with(#sk, :prefix)")
            .expression_attribute_names("#pk", pk_attr)
            .expression_attribute_names("#sk", sk_attr)
            .expression_attribute_values(":pk", s(&pk))
            .expression_attribute_values(":prefix", s(&sk_prefix))
            .into_paginator()
            .items()
            .send()
            .collect::<Result<Vec<Item>, _>>()
            .await
            .map_err(|e| errors::map("Query", &self.table, e))
    }

    /// Stamps one bucket item: `SET disabled = true REMOVE bypass`, or `REMOVE disabled,
    /// bypass`; only on an item that exists. False if it was gone.
    pub(super) async fn stamp_disabled(&self, bucket: &Item, off: bool) -> Result<bool, Error> {
        let (Some(pk), Some(sk)) = (get_str(bucket, "PK"), get_str(bucket, "SK")) else {
            return Ok(false);
        };
        let request = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(codec::key(pk, sk)))
            .condition_expression("attribute_exists(PK)");
        let request = if off {
            request
                .update_expression("SET disabled = :t REMOVE bypass")
                .expression_attribute_values(":t", AttributeValue::Bool(true))
        } else {
            request.update_expression("REMOVE disabled, bypass")
        };
        errors::written(request.send().await, "UpdateItem", &self.table)
    }
}
