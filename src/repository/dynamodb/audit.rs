//! Audit events: one record per entity or limits change (who, what, when), listed per
//! subject newest first.

use serde::{Deserialize, Serialize};

use super::codec::{self, attr_to_json, get_i64, get_str, json_to_attr, num, s, Item};
use super::{errors, keys, Inner};
use crate::Error;

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AuditAction {
    /// An entity was created.
    EntityCreated,
    /// An entity was deleted (with its limits and buckets).
    EntityDeleted,
    /// Limits were stored (details: `limits`).
    LimitsSet,
    /// Stored limits were deleted.
    LimitsDeleted,
    /// The system's `on_unavailable` policy was set or cleared.
    OnUnavailableSet,
}

impl AuditAction {
    /// The stored name, e.g. `"limits_set"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            AuditAction::EntityCreated => "entity_created",
            AuditAction::EntityDeleted => "entity_deleted",
            AuditAction::LimitsSet => "limits_set",
            AuditAction::LimitsDeleted => "limits_deleted",
            AuditAction::OnUnavailableSet => "on_unavailable_set",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            AuditAction::EntityCreated,
            AuditAction::EntityDeleted,
            AuditAction::LimitsSet,
            AuditAction::LimitsDeleted,
            AuditAction::OnUnavailableSet,
        ]
        .into_iter()
        .find(|a| a.as_str() == s)
    }
}

/// One recorded change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// A unique id (time-ordered).
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
        let suffix: String = (0..6)
            .map(|_| char::from(b"0123456789abcdefghijklmnopqrstuvwxyz"[rand::random_range(0..36)]))
            .collect();
        let sk = keys::audit_sk(now, &suffix);
        let pk = keys::audit_pk(&self.ns, subject);
        let mut item: Item = codec::key(pk.clone(), sk.clone());
        item.insert("entity_id".into(), s(subject));
        item.insert("event_id".into(), s(format!("{now:013}{suffix}")));
        item.insert("timestamp".into(), num(now));
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
        item.insert("GSI4SK".into(), s(format!("{pk}{sk}")));
        if let Err(e) = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .send()
            .await
        {
            tracing::error!(subject, action = action.as_str(), error = %errors::map("PutItem", &self.table, e), "could not record audit event");
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
        action: AuditAction::parse(get_str(item, "action")?)?,
        principal: get_str(item, "principal").map(str::to_string),
        resource: get_str(item, "resource").map(str::to_string),
        timestamp_ms: get_i64(item, "timestamp").unwrap_or(0),
        details: item.get("details").map(attr_to_json).unwrap_or_default(),
    })
}
