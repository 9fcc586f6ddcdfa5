//! The aggregator as an AWS Lambda function (feature `lambda`), for the table stream's
//! event source mapping: the same [`Aggregator::process`] as the stream consumer, fed the
//! event's records.
//!
//! A batch that fails (its writes kept failing) is reported back from its first record
//! (`ReportBatchItemFailures`), so Lambda retries it (the snapshots' marks keep that from
//! counting twice) and, past the mapping's retry limit, sends it to the dead-letter queue
//! while the stream moves on.
//!
//! Settings, from the function's environment: `TABLE_NAME` (required), `SNAPSHOT_WINDOWS`
//! (`hourly,daily` by default, as Python's aggregator) and `SNAPSHOT_TTL_DAYS` (90).

pub use aws_lambda_events;

use std::collections::HashMap;

use aws_lambda_events::event::dynamodb::{Event, EventRecord};
use aws_lambda_events::event::streams::{DynamoDbBatchItemFailure, DynamoDbEventResponse};
use aws_sdk_dynamodb::types::AttributeValue;

use super::{Aggregator, ChangeKind, StreamRecord, Window};
use crate::Error;

/// The event's records as the aggregator reads them.
pub fn stream_records(event: &Event) -> Vec<StreamRecord> {
    event.records.iter().map(stream_record).collect()
}

fn stream_record(record: &EventRecord) -> StreamRecord {
    let change = &record.change;
    let image = |item: &serde_dynamo::Item| -> Option<HashMap<String, AttributeValue>> {
        let map: HashMap<String, AttributeValue> = item.clone().into();
        (!map.is_empty()).then_some(map)
    };
    StreamRecord {
        kind: match record.event_name.as_str() {
            "INSERT" => ChangeKind::Insert,
            "REMOVE" => ChangeKind::Remove,
            _ => ChangeKind::Modify,
        },
        sequence_number: change.sequence_number.clone().unwrap_or_default(),
        // An event without the time reads as the epoch: the item's `rf` stands in then.
        created_ms: Some(change.approximate_creation_date_time.timestamp_millis())
            .filter(|&ms| ms > 0),
        old_image: image(&change.old_image),
        new_image: image(&change.new_image),
    }
}

/// Counts one event; on failure, reports the batch back from its first record.
pub async fn handle(aggregator: &Aggregator, event: &Event) -> DynamoDbEventResponse {
    let records = stream_records(event);
    let mut response = DynamoDbEventResponse::default();
    match aggregator.process(&records).await {
        Ok(report) => tracing::info!(
            records = report.records,
            snapshot_writes = report.snapshot_writes,
            already_counted = report.already_counted,
            skipped = report.skipped.values().sum::<usize>(),
            "stream records counted"
        ),
        Err(e) => {
            tracing::error!(error = %e, records = records.len(), "batch failed; reported for a retry");
            if let Some(first) = records.first() {
                let mut failure = DynamoDbBatchItemFailure::default();
                failure.item_identifier = Some(first.sequence_number.clone());
                response.batch_item_failures.push(failure);
            }
        }
    }
    response
}

/// The aggregator the function's environment describes.
pub async fn from_env() -> Result<Aggregator, Error> {
    let table = std::env::var("TABLE_NAME")
        .map_err(|_| Error::validation("TABLE_NAME", "", "the function needs the table's name"))?;
    let windows = match std::env::var("SNAPSHOT_WINDOWS") {
        Ok(list) => list
            .split(',')
            .map(|w| w.trim().parse::<Window>())
            .collect::<Result<Vec<_>, _>>()?,
        Err(_) => vec![Window::Hourly, Window::Daily],
    };
    let ttl_days = match std::env::var("SNAPSHOT_TTL_DAYS") {
        Ok(days) => days
            .parse()
            .map_err(|_| Error::validation("SNAPSHOT_TTL_DAYS", days, "a whole number of days"))?,
        Err(_) => 90,
    };
    let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    Ok(
        Aggregator::new(aws_sdk_dynamodb::Client::new(&config), table)
            .windows(windows)
            .ttl_days(ttl_days),
    )
}

/// Runs the function: serves Lambda's invocations until the runtime stops it.
pub async fn run() -> Result<(), lambda_runtime::Error> {
    let aggregator = from_env().await?;
    lambda_runtime::run(lambda_runtime::service_fn(
        |event: lambda_runtime::LambdaEvent<Event>| {
            let aggregator = aggregator.clone();
            async move { Ok::<_, lambda_runtime::Error>(handle(&aggregator, &event.payload).await) }
        },
    ))
    .await
}
