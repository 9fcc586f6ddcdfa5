//! Stream records as DynamoDB JSON in the shape of a Lambda event's records (what an event
//! source mapping delivers, and what the Python aggregator's processor reads).

#![allow(dead_code)]

use std::collections::HashMap;

use serde_json::{json, Value};
use zae_limiter::aggregator::{ChangeKind, StreamRecord};
use zae_limiter::repository::dynamodb::aws_sdk_dynamodb::types::AttributeValue;

/// An item as DynamoDB JSON.
pub fn dynamo_json(item: &HashMap<String, AttributeValue>) -> Value {
    Value::Object(
        item.iter()
            .map(|(k, v)| (k.clone(), value_json(v)))
            .collect(),
    )
}

fn value_json(v: &AttributeValue) -> Value {
    match v {
        AttributeValue::S(s) => json!({ "S": s }),
        AttributeValue::N(n) => json!({ "N": n }),
        AttributeValue::Bool(b) => json!({ "BOOL": b }),
        AttributeValue::M(m) => json!({ "M": dynamo_json(m) }),
        AttributeValue::L(l) => json!({ "L": l.iter().map(value_json).collect::<Vec<_>>() }),
        AttributeValue::Ss(v) => json!({ "SS": v }),
        AttributeValue::Ns(v) => json!({ "NS": v }),
        _ => json!({ "NULL": true }),
    }
}

/// The records of a Lambda event (`{"Records": [...]}`'s array).
pub fn lambda_records(records: &[StreamRecord]) -> Vec<Value> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let mut change = json!({
                "SequenceNumber": r.sequence_number,
                "SizeBytes": 100,
                "StreamViewType": "NEW_AND_OLD_IMAGES",
            });
            if let Some(ms) = r.created_ms {
                change["ApproximateCreationDateTime"] = json!(ms as f64 / 1000.0);
            }
            if let Some(image) = &r.new_image {
                change["NewImage"] = dynamo_json(image);
            }
            if let Some(image) = &r.old_image {
                change["OldImage"] = dynamo_json(image);
            }
            let kind = match r.kind {
                ChangeKind::Insert => "INSERT",
                ChangeKind::Modify => "MODIFY",
                ChangeKind::Remove => "REMOVE",
            };
            json!({
                "awsRegion": "us-east-1", "eventID": format!("e{i}"),
                "eventName": kind, "eventSource": "aws:dynamodb",
                "eventVersion": "1.1", "dynamodb": change,
            })
        })
        .collect()
}
