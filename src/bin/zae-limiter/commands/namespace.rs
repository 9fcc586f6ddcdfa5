//! `namespace list|register|show|delete`.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use zae_limiter::repository::dynamodb::TableError;
use zae_limiter::Error;

use super::confirm;
use crate::args::{Global, NamespaceCommand};
use crate::connect;
use crate::failure::Outcome;
use crate::output::{timestamp, Out};

pub async fn run(global: &Global, command: NamespaceCommand, out: Out) -> Outcome {
    match command {
        NamespaceCommand::List => {
            let table = connect::table(global).await?;
            let rows = table
                .namespaces()
                .await?
                .into_iter()
                .map(|n| {
                    vec![
                        json!(n.name),
                        json!(n.id),
                        json!(n.status),
                        n.created_at_ms.map_or(json!(null), timestamp),
                    ]
                })
                .collect();
            out.table(&["name", "id", "status", "created_at"], rows);
        }
        NamespaceCommand::Register { name } => {
            let table = connect::table(global).await?;
            let id = table.register_namespace(&name).await?;
            out.message(
                format!("Namespace {name} is registered (id {id})."),
                json!({ "name": name, "id": id }),
            );
        }
        NamespaceCommand::Show { name } => {
            let name = name.unwrap_or_else(|| global.namespace.clone());
            let table = connect::table(global).await?;
            let info = table
                .namespace(&name)
                .await?
                .filter(|n| n.status == "active")
                .ok_or(Error::from(TableError::NamespaceNotFound {
                    namespace: name.clone(),
                }))?;
            out.record(vec![
                ("name", json!(info.name)),
                ("id", json!(info.id)),
                ("status", json!(info.status)),
                (
                    "created_at",
                    info.created_at_ms.map_or(json!(null), timestamp),
                ),
                ("table", json!(table.name())),
            ]);
        }
        NamespaceCommand::Delete { name, yes } => {
            let mut scoped = global.clone();
            scoped.namespace = name.clone();
            let repo = connect::builder(&scoped).connect().await?;
            confirm(
                &format!(
                    "delete namespace {name} and every item in it from table {}",
                    repo.table()
                ),
                &name,
                yes,
            )?;
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} deleting namespace items: {pos} [{elapsed}]",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(100));
            let deleted = repo
                .purge_namespace(|count| bar.set_position(count as u64))
                .await;
            bar.finish_and_clear();
            let deleted = deleted?;
            out.message(
                format!("Deleted namespace {name} ({deleted} items)."),
                json!({ "name": name, "items_deleted": deleted }),
            );
        }
    }
    Ok(())
}
