//! `audit list --entity E`: who changed what, newest first.

use serde_json::json;

use crate::args::{AuditCommand, Global};
use crate::connect;
use crate::failure::{Failure, Outcome};
use crate::output::{timestamp, Out};

pub async fn run(global: &Global, command: AuditCommand, out: Out) -> Outcome {
    let AuditCommand::List { entity, limit } = command;
    if limit == 0 {
        return Err(Failure::bad_arguments("--limit must be at least 1"));
    }
    let repo = connect::builder(global).connect().await?;
    let events = repo.audit_events(&entity, limit).await?;
    let rows = events
        .into_iter()
        .map(|e| {
            vec![
                timestamp(e.timestamp_ms),
                json!(e.action.as_str()),
                json!(e.entity_id),
                json!(e.resource),
                json!(e.principal),
                if out.json() {
                    e.details
                } else {
                    json!(e.details.to_string())
                },
            ]
        })
        .collect();
    out.table(
        &[
            "timestamp",
            "action",
            "entity_id",
            "resource",
            "principal",
            "details",
        ],
        rows,
    );
    Ok(())
}
