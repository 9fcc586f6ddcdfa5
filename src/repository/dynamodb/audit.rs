//! Audit events: one record per entity or limits change (who, what, when), listed per
//! subject newest first.

use serde::{Deserialize, Serialize};

use super::codec::{self, attr_to_json, get_str, json_to_attr, num, s, Item};
use super::{errors, keys, stamps, Inner};
use crate::Error;

/// What changed: the actions the Python zae-limiter 0.17 records (`models.py:
/// AuditAction`), and any other kept as it is, never dropped.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AuditAction {
    /// An entity was created.
    EntityCreated,
    /// An entity was deleted (with its limits and buckets).
    EntityDeleted,
    /// Limits (or, at system level, the outage policy) were stored (details: `limits`,
    /// `on_unavailable`).
    LimitsSet,
    /// Stored limits were deleted.
    LimitsDeleted,
    /// An entity's parent changed (written by Python's `set_parent`).
    EntityParentChanged,
    /// A bucket was reset (written by Python's `reset_bucket`).
    BucketReset,
    /// A bucket was topped up (written by Python's `top_up`).
    BucketToppedUp,
    /// An action this crate does not know, as stored.
    #[serde(untagged)]
    Other(String),
}

impl AuditAction {
    /// The stored name, e.g. `"limits_set"`.
    pub fn as_str(&self) -> &str {
        match self {
            AuditAction::EntityCreated => "entity_created",
            AuditAction::EntityDeleted => "entity_deleted",
            AuditAction::LimitsSet => "limits_set",
            AuditAction::LimitsDeleted => "limits_deleted",
            AuditAction::EntityParentChanged => "entity_parent_changed",
            AuditAction::BucketReset => "bucket_reset",
            AuditAction::BucketToppedUp => "bucket_topped_up",
            AuditAction::Other(name) => name,
        }
    }

    /// The action stored as `name`; one this crate does not know is kept as
    /// [`AuditAction::Other`].
    pub fn parse(name: &str) -> Self {
        [
            AuditAction::EntityCreated,
            AuditAction::EntityDeleted,
            AuditAction::LimitsSet,
            AuditAction::LimitsDeleted,
            AuditAction::EntityParentChanged,
            AuditAction::BucketReset,
            AuditAction::BucketToppedUp,
        ]
        .into_iter()
        .find(|a| a.as_str() == name)
        .unwrap_or_else(|| AuditAction::Other(name.to_string()))
    }
}

/// One recorded change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// A unique id: a ULID, time-ordered across this crate and Python.
    pub event_id: String,
    /// The subject: an entity id, `$SYSTEM`, or `$RESOURCE:{resource}`.
    pub entity_id: String,
    /// What changed.
    pub action: AuditAction,
    /// Who changed it (see [`super::DynamoDbRepositoryBuilder::principal`]).
    pub principal: Option<String>,
    /// The resource concerned, for limits changes.
    pub resource: Option<String>,
    /// When, epoch milliseconds.
    pub timestamp_ms: i64,
    /// Action-specific details (the limits set, the records deleted, ...).
    pub details: serde_json::Value,
}

/// How long audit records are kept.
const AUDIT_RETENTION_DAYS: i64 = 90;

impl Inner {
    /// Records a change. An audit write that fails is logged, not raised: the change it
    /// describes has already been made.
    pub(super) async fn audit(
        &self,
        subject: &str,
        action: AuditAction,
        resource: Option<&str>,
        details: serde_json::Value,
    ) {
        let now = super::table::now_ms();
        let event_id = stamps::audit_id(now);
        let pk = keys::audit_pk(&self.ns, subject);
        let mut item: Item = codec::key(pk.clone(), keys::audit_sk(&event_id));
        item.insert("entity_id".into(), s(subject));
        item.insert("event_id".into(), s(&event_id));
        item.insert("timestamp".into(), s(stamps::iso(now)));
        item.insert("action".into(), s(action.as_str()));
        if let Some(p) = &self.principal {
            item.insert("principal".into(), s(p));
        }
        if let Some(r) = resource {
            item.insert("resource".into(), s(r));
        }
        item.insert("details".into(), json_to_attr(&details));
        item.insert(
            "ttl".into(),
            num(now / 1000 + AUDIT_RETENTION_DAYS * 86_400),
        );
        item.insert("GSI4PK".into(), s(&self.ns));
        item.insert("GSI4SK".into(), s(pk));
        if let Err(e) = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
        {
            tracing::error!(subject, action = %action.as_str(), error = %errors::map("PutItem", &self.table, e), "could not record audit event");
        }
    }

    /// The newest `limit` events of a subject, newest first.
    pub(super) async fn audit_events(
        &self,
        subject: &str,
        limit: usize,
    ) -> Result<Vec<AuditEvent>, Error> {
        let mut events = Vec::new();
        let mut start = None;
        while events.len() < limit {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("PK = :pk AND begins_with(SK, :prefix)")
                .expression_attribute_values(":pk", s(keys::audit_pk(&self.ns, subject)))
                .expression_attribute_values(":prefix", s("#AUDIT#"))
                .scan_index_forward(false)
                .limit(i32::try_from(limit - events.len()).unwrap_or(i32::MAX))
                .set_exclusive_start_key(start)
                .send()
                .await
                .map_err(|e| errors::map("Query", &self.table, e))?;
            events.extend(page.items().iter().filter_map(parse_event));
            start = page.last_evaluated_key().cloned();
            if start.is_none() {
                break;
            }
        }
        events.truncate(limit);
        Ok(events)
    }
}

fn parse_event(item: &Item) -> Option<AuditEvent> {
    Some(AuditEvent {
        event_id: get_str(item, "event_id")?.to_string(),
        entity_id: get_str(item, "entity_id")?.to_string(),
        action: AuditAction::parse(get_str(item, "action")?),
        principal: get_str(item, "principal").map(str::to_string),
        resource: get_str(item, "resource").map(str::to_string),
        timestamp_ms: stamps::time_ms(item, "timestamp").unwrap_or(0),
        details: item.get("details").map(attr_to_json).unwrap_or_default(),
    })
}
