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

impl TableOptions {
    /// [`Self::cloudformation_template`] with the usage aggregator as a Lambda function on
    /// the table's stream (which the table then gets, whatever `stream` says): the
    /// function (the `zae-limiter-aggregator-lambda` binary, from a zip in S3 named by the
    /// `AggregatorCodeBucket` and `AggregatorCodeKey` parameters), its role, the event
    /// source mapping, a dead-letter queue for batches that keep failing, and an alarm on
    /// that queue.
    ///
    /// The mapping takes bucket items' `INSERT` and `MODIFY` records only (a filter on
    /// `SK = #STATE`), up to 100 a batch within 5 s, retries a failing batch 3 times
    /// bisecting it, reports failures per item, and drops records older than an hour to
    /// the queue, as the Python library's stack does (plus `INSERT`, which this
    /// aggregator counts).
    ///
    /// ```
    /// use zae_limiter::repository::dynamodb::TableOptions;
    ///
    /// let template = TableOptions::default().cloudformation_template_with_aggregator("t");
    /// let resources = &template["Resources"];
    /// assert_eq!(resources["AggregatorFunction"]["Type"], "AWS::Lambda::Function");
    /// assert!(resources["RateLimitTable"]["Properties"]["StreamSpecification"].is_object());
    /// ```
    pub fn cloudformation_template_with_aggregator(&self, table: &str) -> Value {
        let mut options = self.clone();
        options.stream = true;
        let mut template = options.cloudformation_template(table);
        let stream_arn = json!({ "Fn::GetAtt": ["RateLimitTable", "StreamArn"] });
        let table_arn = json!({ "Fn::GetAtt": ["RateLimitTable", "Arn"] });
        let dlq_arn = json!({ "Fn::GetAtt": ["AggregatorDeadLetterQueue", "Arn"] });
        let parameters = template["Parameters"]
            .as_object_mut()
            .expect("the template has parameters");
        for (name, description, default) in [
            (
                "AggregatorCodeBucket",
                "S3 bucket holding the aggregator's zip (a `bootstrap` binary)",
                None,
            ),
            ("AggregatorCodeKey", "S3 key of the aggregator's zip", None),
            (
                "AggregatorArchitecture",
                "The binary's architecture: arm64 or x86_64",
                Some("arm64"),
            ),
            (
                "SnapshotWindows",
                "Usage windows to keep: hourly, daily, monthly",
                Some("hourly,daily"),
            ),
            (
                "SnapshotTtlDays",
                "Days a usage snapshot is kept",
                Some("90"),
            ),
        ] {
            let mut parameter = json!({ "Type": "String", "Description": description });
            if let Some(default) = default {
                parameter["Default"] = json!(default);
            }
            parameters.insert(name.into(), parameter);
        }
        let resources = template["Resources"]
            .as_object_mut()
            .expect("the template has resources");
        resources.insert(
            "AggregatorDeadLetterQueue".into(),
            json!({
                "Type": "AWS::SQS::Queue",
                "Properties": { "MessageRetentionPeriod": 1_209_600 },
            }),
        );
        resources.insert(
            "AggregatorRole".into(),
            json!({
                "Type": "AWS::IAM::Role",
                "Properties": {
                    "AssumeRolePolicyDocument": {
                        "Version": "2012-10-17",
                        "Statement": [{
                            "Effect": "Allow",
                            "Principal": { "Service": "lambda.amazonaws.com" },
                            "Action": "sts:AssumeRole",
                        }],
                    },
                    "ManagedPolicyArns": [
                        "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole"
                    ],
                    "Policies": [{
                        "PolicyName": "zae-limiter-aggregator",
                        "PolicyDocument": {
                            "Version": "2012-10-17",
                            "Statement": [
                                {
                                    "Effect": "Allow",
                                    "Action": [
                                        "dynamodb:DescribeStream",
                                        "dynamodb:GetRecords",
                                        "dynamodb:GetShardIterator",
                                        "dynamodb:ListStreams",
                                    ],
                                    "Resource": stream_arn.clone(),
                                },
                                {
                                    "Effect": "Allow",
                                    "Action": [
                                        "dynamodb:BatchGetItem",
                                        "dynamodb:GetItem",
                                        "dynamodb:UpdateItem",
                                    ],
                                    "Resource": table_arn,
                                },
                                {
                                    "Effect": "Allow",
                                    "Action": "sqs:SendMessage",
                                    "Resource": dlq_arn.clone(),
                                },
                            ],
                        },
                    }],
                },
            }),
        );
        resources.insert(
            "AggregatorFunction".into(),
            json!({
                "Type": "AWS::Lambda::Function",
                "Properties": {
                    "Description": "zae-limiter usage aggregator: stream records into usage snapshots",
                    "Runtime": "provided.al2023",
                    "Handler": "bootstrap",
                    "Architectures": [{ "Ref": "AggregatorArchitecture" }],
                    "MemorySize": 256,
                    "Timeout": 60,
                    "Role": { "Fn::GetAtt": ["AggregatorRole", "Arn"] },
                    "Code": {
                        "S3Bucket": { "Ref": "AggregatorCodeBucket" },
                        "S3Key": { "Ref": "AggregatorCodeKey" },
                    },
                    "Environment": {
                        "Variables": {
                            "TABLE_NAME": { "Ref": "RateLimitTable" },
                            "SNAPSHOT_WINDOWS": { "Ref": "SnapshotWindows" },
                            "SNAPSHOT_TTL_DAYS": { "Ref": "SnapshotTtlDays" },
                        },
                    },
                },
            }),
        );
        let bucket_records = json!({
            "eventName": ["INSERT", "MODIFY"],
            "dynamodb": { "NewImage": { "SK": { "S": ["#STATE"] } } },
        });
        resources.insert(
            "AggregatorEventSourceMapping".into(),
            json!({
                "Type": "AWS::Lambda::EventSourceMapping",
                "Properties": {
                    "EventSourceArn": stream_arn,
                    "FunctionName": { "Ref": "AggregatorFunction" },
                    "StartingPosition": "TRIM_HORIZON",
                    "BatchSize": 100,
                    "MaximumBatchingWindowInSeconds": 5,
                    "MaximumRetryAttempts": 3,
                    "MaximumRecordAgeInSeconds": 3600,
                    "BisectBatchOnFunctionError": true,
                    "FunctionResponseTypes": ["ReportBatchItemFailures"],
                    "DestinationConfig": { "OnFailure": { "Destination": dlq_arn } },
                    "FilterCriteria": {
                        "Filters": [{ "Pattern": bucket_records.to_string() }],
                    },
                },
            }),
        );
        resources.insert(
            "AggregatorDeadLetterAlarm".into(),
            json!({
                "Type": "AWS::CloudWatch::Alarm",
                "Properties": {
                    "AlarmDescription": "zae-limiter aggregator batches reached the dead-letter queue: usage snapshots miss them",
                    "Namespace": "AWS/SQS",
                    "MetricName": "ApproximateNumberOfMessagesVisible",
                    "Dimensions": [{
                        "Name": "QueueName",
                        "Value": { "Fn::GetAtt": ["AggregatorDeadLetterQueue", "QueueName"] },
                    }],
                    "Statistic": "Maximum",
                    "Period": 300,
                    "EvaluationPeriods": 1,
                    "Threshold": 0,
                    "ComparisonOperator": "GreaterThanThreshold",
                    "TreatMissingData": "notBreaching",
                },
            }),
        );
        template["Outputs"]["AggregatorFunctionArn"] =
            json!({ "Value": { "Fn::GetAtt": ["AggregatorFunction", "Arn"] } });
        template["Outputs"]["AggregatorDeadLetterQueueUrl"] =
            json!({ "Value": { "Ref": "AggregatorDeadLetterQueue" } });
        template
    }
}
