//! [`DynamoDbTable`]: operations on the table as a whole, which need no namespace (status,
//! the namespace registry, the schema version, deleting the table). The command-line tool's
//! `status`, `namespace` and `delete` commands are built on it.

use aws_sdk_dynamodb::Client;

use super::table::{self, NamespaceInfo, TableOptions, TableStatusReport};
use super::{errors, DynamoDbRepositoryBuilder};
use crate::{naming, Error};

/// A handle on an existing zae-limiter table, for administration. Writes nothing until
/// asked; see [`DynamoDbRepositoryBuilder::connect_table`].
#[derive(Debug, Clone)]
pub struct DynamoDbTable {
    client: Client,
    table: String,
}

impl DynamoDbRepositoryBuilder {
    /// Opens the table (the builder's table, region, endpoint and timeouts; its namespace
    /// is ignored) for table-level administration. Reads only:
    /// [`TableError::TableNotFound`](super::TableError::TableNotFound) when the table does not
    /// exist.
    pub async fn connect_table(self) -> Result<DynamoDbTable, Error> {
        naming::validate_table_name(&self.table)?;
        let client = self.make_client().await;
        table::require_table(&client, &self.table).await?;
        Ok(DynamoDbTable {
            client,
            table: self.table,
        })
    }
}

/// Whether a table holding schema `stored` can be used by this client (same major
/// version as [`super::SCHEMA_VERSION`]); [`TableError::IncompatibleSchema`](super::TableError::IncompatibleSchema) says why not.
pub fn check_schema_version(stored: &str) -> Result<(), Error> {
    table::check_version(stored)
}

impl DynamoDbTable {
    pub(super) fn new(client: Client, table: String) -> Self {
        DynamoDbTable { client, table }
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.table
    }

    /// The SDK client.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The table's state: status, billing, item count, stream, TTL, PITR, deletion
    /// protection and schema version.
    pub async fn status(&self) -> Result<TableStatusReport, Error> {
        table::status(&self.client, &self.table).await
    }

    /// The schema version stored in the table, if its version record exists.
    pub async fn schema_version(&self) -> Result<Option<String>, Error> {
        table::stored_version(&self.client, &self.table).await
    }

    /// Every registered namespace, by name.
    pub async fn namespaces(&self) -> Result<Vec<NamespaceInfo>, Error> {
        table::list_namespaces(&self.client, &self.table).await
    }

    /// One registered namespace; `None` if no namespace has this name.
    pub async fn namespace(&self, name: &str) -> Result<Option<NamespaceInfo>, Error> {
        naming::validate_namespace(name)?;
        Ok(self
            .namespaces()
            .await?
            .into_iter()
            .find(|n| n.name == name))
    }

    /// Registers a namespace (idempotent) and returns its id. Writes the schema version
    /// record first if the table lacks it (a table created by CloudFormation).
    pub async fn register_namespace(&self, name: &str) -> Result<String, Error> {
        naming::validate_namespace(name)?;
        table::ensure_version(&self.client, &self.table).await?;
        table::ensure_namespace(&self.client, &self.table, name).await
    }

    /// Turns on what `options` asks for and the existing table lacks, where that is safe on
    /// a live table: point-in-time recovery, deletion protection and tags (added or
    /// updated, never removed). It never turns anything off, and leaves billing and stream
    /// changes to the operator. Returns what it changed, for people.
    pub async fn enable_options(&self, options: &TableOptions) -> Result<Vec<String>, Error> {
        let live = self.status().await?;
        let mut changed = Vec::new();
        if options.point_in_time_recovery && live.point_in_time_recovery == Some(false) {
            table::enable_pitr(&self.client, &self.table).await?;
            changed.push("point-in-time recovery turned on".to_string());
        }
        if options.deletion_protection && !live.deletion_protection {
            self.client
                .update_table()
                .table_name(&self.table)
                .deletion_protection_enabled(true)
                .send()
                .await
                .map_err(|e| errors::map("UpdateTable", &self.table, e))?;
            table::wait_active(&self.client, &self.table).await?;
            changed.push("deletion protection turned on".to_string());
        }
        if !options.tags.is_empty() {
            let tagged = table::ensure_tags(&self.client, &self.table, &options.tags).await?;
            if !tagged.is_empty() {
                changed.push(format!("tags set: {}", tagged.join(", ")));
            }
        }
        Ok(changed)
    }

    /// Deletes the whole table, every namespace with it. Fails with [`Error::Backend`]
    /// while deletion protection is on.
    pub async fn delete(&self) -> Result<(), Error> {
        table::delete_table(&self.client, &self.table).await
    }
}
