//! The `disabled` flag (an [`Access`]), written as the Python library writes it (its
//! contract, section 8.5): the config record's flag first, then a stamp on every bucket
//! item it governs, so the fast path of both libraries follows at once. Each item's stamp
//! follows the flag resolved for its entity (an entity's explicit flag overrides the
//! resource's): `disabled`, or a `bypass` deadline, or neither.

use aws_sdk_dynamodb::types::AttributeValue;

use super::codec::{self, get_str, s, Item};
use super::expr::{Expr, Update};
use super::{errors, keys, AuditAction, Inner};
use crate::repository::{Access, ConfigScope, StoredConfig};
use crate::Error;

impl Inner {
    /// Writes the flag at `scope` (`None`: inherit) in its config record, and registers a
    /// resource as Python's flag writes do. A bypass first passes the table's version gate
    /// (see [`super::table::require_readers`]), as Python's does.
    pub(super) async fn write_access_flag(
        &self,
        scope: &ConfigScope,
        access: Option<Access>,
    ) -> Result<(), Error> {
        if matches!(scope, ConfigScope::System) {
            return Err(Error::validation(
                "scope",
                "system",
                "a resource is disabled or bypassed for an entity or for every entity, not system-wide",
            ));
        }
        if access == Some(Access::Bypassed) {
            super::table::require_readers(&self.client, &self.table, NON_ENFORCING_READERS).await?;
        }
        self.update_config(scope, |_, expr, update| {
            let n = expr.name("disabled");
            match access {
                Some(flag) => {
                    let v = expr.value(codec::access_value(flag));
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
    pub(super) async fn audit_access(
        &self,
        scope: &ConfigScope,
        access: Option<Access>,
        stamped: usize,
    ) {
        let (subject, resource) = Inner::subject(scope);
        let flag = access.map_or(serde_json::Value::Null, codec::access_flag);
        self.audit(
            &subject,
            AuditAction::LimitsSet,
            resource,
            serde_json::json!({ "disabled": flag, "buckets_stamped": stamped }),
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

    /// Restamps every bucket item `scope` governs from the config its entity now resolves
    /// to (read consistently, so a flag or limit just written is seen): `stamp` adds one
    /// item's changes to an update that requires the item to exist. Returns how many items
    /// were written (one gone since is skipped).
    pub(super) async fn restamp_governed(
        &self,
        scope: &ConfigScope,
        stamp: impl Fn(&StoredConfig, &mut Expr, &mut Update),
    ) -> Result<usize, Error> {
        let mut stamped = 0;
        for bucket in self.governed_buckets(scope).await? {
            let (Some(pk), Some(sk)) = (get_str(&bucket, "PK"), get_str(&bucket, "SK")) else {
                continue;
            };
            let Some((entity, resource)) = keys::parse_bucket_pk(&self.ns, pk) else {
                continue;
            };
            let config = self.read_config(entity, resource, true).await?;
            let mut expr = Expr::default();
            let mut update = Update::default();
            update.conditions.push("attribute_exists(PK)".into());
            stamp(&config, &mut expr, &mut update);
            if update.set.is_empty() && update.remove.is_empty() {
                continue;
            }
            let sent = self
                .update_request(codec::key(pk, sk), &update, &expr)
                .send()
                .await;
            if errors::written(sent, "UpdateItem", &self.table)? {
                stamped += 1;
            }
        }
        Ok(stamped)
    }

    /// Stamps each governed bucket with the access resolved for its entity (an entity's
    /// own flag overrides the resource's): `SET disabled = true REMOVE bypass`, `SET bypass
    /// = deadline REMOVE disabled`, or `REMOVE disabled, bypass`.
    pub(super) async fn stamp_access(&self, scope: &ConfigScope) -> Result<usize, Error> {
        self.restamp_governed(scope, |config, expr, update| {
            let (disabled, bypass) = (expr.name("disabled"), expr.name("bypass"));
            if config.disabled {
                let v = expr.value(AttributeValue::Bool(true));
                update.set.push(format!("{disabled} = {v}"));
                update.remove.push(bypass);
            } else if config.bypass {
                let v = expr.num(stamp_deadline(super::table::now_ms()));
                update.set.push(format!("{bypass} = {v}"));
                update.remove.push(disabled);
            } else {
                update.remove.push(disabled);
                update.remove.push(bypass);
            }
        })
        .await
    }

    /// Restamps the soft stamps of each governed bucket from the limits its entity now
    /// resolves to, as Python's `_fanout_soft` does after a config write: `SET b_{L}_soft =
    /// deadline` for a soft limit, `REMOVE` for a hard one. Without it, a limit made hard
    /// again would stay soft on Python's fast path until its stamps ran out.
    pub(super) async fn restamp_soft(&self, scope: &ConfigScope) -> Result<usize, Error> {
        self.restamp_governed(scope, |config, expr, update| {
            let Some((limits, _)) = crate::limiter::resolve(config, None, None) else {
                return;
            };
            let deadline = stamp_deadline(super::table::now_ms());
            for limit in limits.iter() {
                let n = expr.name(&keys::bucket_attr(&limit.name, "soft"));
                if limit.soft {
                    let v = expr.num(deadline);
                    update.set.push(format!("{n} = {v}"));
                } else {
                    update.remove.push(n);
                }
            }
        })
        .await
    }
}

/// The release whose readers understand soft limits and bypass (the Python library's
/// `MIN_READER_VERSION_FOR_NON_ENFORCING`).
pub(super) const NON_ENFORCING_READERS: &str = "0.17.0";

/// How long a `bypass` stamp written now stays live at most, as the Python library's
/// default `stamp_ttl`: a stamp outliving a lifted bypass by more than this is impossible.
pub(super) const STAMP_TTL_MS: i64 = 60_000;

/// A stamp's deadline, as Python draws it: `now + T x U(0.8, 1.0)`, so stamps written
/// together are renewed spread out.
pub(super) fn stamp_deadline(now_ms: i64) -> i64 {
    let draw = 0.8 + 0.2 * rand::random::<f64>();
    now_ms.saturating_add((STAMP_TTL_MS as f64 * draw) as i64)
}
