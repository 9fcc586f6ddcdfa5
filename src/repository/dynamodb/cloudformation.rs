//! A CloudFormation template for the table, for teams that deploy infrastructure with their
//! own pipeline. It is built from the same key and index definitions that
//! [`super::DynamoDbRepositoryBuilder::build`] creates the table from, so the two cannot
//! drift apart.

use serde_json::{json, Map, Value};

use super::table::{Billing, TableOptions, INDEXES, KEY_ATTRIBUTES, SCHEMA_VERSION, TTL_ATTRIBUTE};

impl TableOptions {
    /// A CloudFormation template (as JSON; YAML is a rendering of the same value) creating
    /// a table with these options. The table name is a parameter defaulting to `table`.
    ///
    /// The stack creates the table only: run `zae-limiter deploy` (or open a repository
    /// with `build()`) once afterwards to write the schema version record and register
    /// the namespace.
    ///
    /// ```
    /// use zae_limiter::repository::dynamodb::TableOptions;
    ///
    /// let template = TableOptions::default().cloudformation_template("zae-limiter");
    /// let table = &template["Resources"]["RateLimitTable"];
    /// assert_eq!(table["Type"], "AWS::DynamoDB::Table");
    /// assert_eq!(table["Properties"]["BillingMode"], "PAY_PER_REQUEST");
    /// ```
    pub fn cloudformation_template(&self, table: &str) -> Value {
        let throughput = match self.billing {
            Billing::OnDemand => None,
            Billing::Provisioned { read, write } => Some(json!({
                "ReadCapacityUnits": read,
                "WriteCapacityUnits": write,
            })),
        };
        let key_schema = |pk: &str, sk: &str| {
            json!([
                { "AttributeName": pk, "KeyType": "HASH" },
                { "AttributeName": sk, "KeyType": "RANGE" },
            ])
        };
        let indexes: Vec<Value> = INDEXES
            .iter()
            .map(|index| {
                let mut gsi = json!({
                    "IndexName": index.name,
                    "KeySchema": key_schema(index.pk, index.sk),
                    "Projection": { "ProjectionType": index.projection.as_str() },
                });
                if let Some(t) = &throughput {
                    gsi["ProvisionedThroughput"] = t.clone();
                }
                gsi
            })
            .collect();
        let mut properties = Map::new();
        properties.insert("TableName".into(), json!({ "Ref": "TableName" }));
        properties.insert(
            "AttributeDefinitions".into(),
            KEY_ATTRIBUTES
                .iter()
                .map(|a| json!({ "AttributeName": a, "AttributeType": "S" }))
                .collect(),
        );
        properties.insert("KeySchema".into(), key_schema("PK", "SK"));
        properties.insert("GlobalSecondaryIndexes".into(), Value::Array(indexes));
        match &throughput {
            None => {
                properties.insert("BillingMode".into(), json!("PAY_PER_REQUEST"));
            }
            Some(t) => {
                properties.insert("BillingMode".into(), json!("PROVISIONED"));
                properties.insert("ProvisionedThroughput".into(), t.clone());
            }
        }
        properties.insert(
            "TimeToLiveSpecification".into(),
            json!({ "AttributeName": TTL_ATTRIBUTE, "Enabled": true }),
        );
        if self.stream {
            properties.insert(
                "StreamSpecification".into(),
                json!({ "StreamViewType": "NEW_AND_OLD_IMAGES" }),
            );
        }
        if self.point_in_time_recovery {
            properties.insert(
                "PointInTimeRecoverySpecification".into(),
                json!({ "PointInTimeRecoveryEnabled": true }),
            );
        }
        properties.insert(
            "DeletionProtectionEnabled".into(),
            json!(self.deletion_protection),
        );
        if !self.tags.is_empty() {
            properties.insert(
                "Tags".into(),
                self.tags
                    .iter()
                    .map(|(k, v)| json!({ "Key": k, "Value": v }))
                    .collect(),
            );
        }
        let mut outputs = json!({
            "TableName": { "Value": { "Ref": "RateLimitTable" } },
            "TableArn": { "Value": { "Fn::GetAtt": ["RateLimitTable", "Arn"] } },
        });
        if self.stream {
            outputs["StreamArn"] =
                json!({ "Value": { "Fn::GetAtt": ["RateLimitTable", "StreamArn"] } });
        }
        json!({
            "AWSTemplateFormatVersion": "2010-09-09",
            "Description": format!(
                "zae-limiter rate limit table (schema {SCHEMA_VERSION}). After the stack is up, run `zae-limiter deploy` once to write the version record and register the namespace."
            ),
            "Parameters": {
                "TableName": {
                    "Type": "String",
                    "Default": table,
                    "Description": "The DynamoDB table name",
                },
            },
            "Resources": {
                "RateLimitTable": {
                    "Type": "AWS::DynamoDB::Table",
                    "DeletionPolicy": "Retain",
                    "UpdateReplacePolicy": "Retain",
                    "Properties": Value::Object(properties),
                },
            },
            "Outputs": outputs,
        })
    }
}
