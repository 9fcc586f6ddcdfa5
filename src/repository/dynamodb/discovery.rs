//! Discovery (the Python library's `list_deployed`): the zae-limiter tables of a region,
//! found by the version record each holds, with what an operator asks first of each.

use aws_sdk_dynamodb::types::AttributeValue;
use serde::Serialize;

use super::admin::DynamoDbTable;
use super::codec::get_str;
use super::{errors, table, DynamoDbRepositoryBuilder, TableError};
use crate::Error;

/// A zae-limiter table found in a region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimiterTable {
    /// The table.
    pub table: String,
    /// The schema version its version record holds.
    pub schema_version: String,
    /// Whether this client can use it (same schema major).
    pub compatible: bool,
    /// The Python aggregator Lambda's version, when Python deployed one (`lambda_version`).
    pub lambda_version: Option<String>,
    /// The namespaces registered in it.
    pub namespaces: Vec<String>,
    /// The stream's view type, when a stream is on.
    pub stream: Option<String>,
    /// Who keeps usage snapshots: `stream consumer` (this crate's `aggregator run` saved
    /// positions in the table), `python lambda` (Python deployed its aggregator), or
    /// `None`. A Lambda of this crate's is seen by its event source mapping, which a table
    /// does not record.
    pub aggregator: Option<String>,
}

impl DynamoDbRepositoryBuilder {
    /// Every table in the builder's region (and endpoint) that holds a zae-limiter version
    /// record, by name. Tables this client may not read are left out (logged at `debug`).
    pub async fn discover_tables(self) -> Result<Vec<LimiterTable>, Error> {
        let client = self.make_client().await;
        let mut names = Vec::new();
        let mut start = None;
        loop {
            let out = client
                .list_tables()
                .set_exclusive_start_table_name(start.take())
                .send()
                .await
                .map_err(|e| errors::map("ListTables", "*", e))?;
            names.extend(out.table_names().iter().cloned());
            match out.last_evaluated_table_name() {
                Some(last) => start = Some(last.to_string()),
                None => break,
            }
        }
        let mut found = Vec::new();
        for name in names {
            match describe(DynamoDbTable::new(client.clone(), name.clone())).await {
                Ok(Some(info)) => found.push(info),
                Ok(None) => {}
                Err(Error::Table(TableError::TableNotFound { .. })) => {}
                Err(e) => tracing::debug!(table = %name, error = %e, "skipped in discovery"),
            }
        }
        Ok(found)
    }
}

/// What discovery reports of one table; `None` when it holds no version record.
async fn describe(handle: DynamoDbTable) -> Result<Option<LimiterTable>, Error> {
    let client = handle.client();
    let Some(record) = table::version_record(client, handle.name()).await? else {
        return Ok(None);
    };
    let Some(schema_version) = get_str(&record, "schema_version").map(str::to_string) else {
        return Ok(None);
    };
    let namespaces = handle
        .namespaces()
        .await?
        .into_iter()
        .filter(|n| n.status == "active")
        .map(|n| n.name)
        .collect();
    let stream = handle.status().await?.stream;
    let lambda_version = get_str(&record, "lambda_version").map(str::to_string);
    let positions = client
        .query()
        .table_name(handle.name())
        .key_condition_expression("PK = :pk")
        .expression_attribute_values(":pk", AttributeValue::S("_/AGGREGATOR#".into()))
        .limit(1)
        .send()
        .await
        .map_err(|e| errors::map("Query", handle.name(), e))?;
    let aggregator = if positions.count() > 0 {
        Some("stream consumer".to_string())
    } else {
        lambda_version.as_ref().map(|_| "python lambda".to_string())
    };
    Ok(Some(LimiterTable {
        compatible: table::check_version(&schema_version).is_ok(),
        table: handle.name().to_string(),
        schema_version,
        lambda_version,
        namespaces,
        stream,
        aggregator,
    }))
}
