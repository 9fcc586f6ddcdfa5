//! The usage aggregator on DynamoDB Local: stream records built from the real bucket items
//! a limiter wrote (the image before and after each acquire, as a `NEW_AND_OLD_IMAGES`
//! stream carries them), counted into snapshots exactly once however they are delivered,
//! and read back by the Python zae-limiter 0.17.

use std::collections::HashMap;

use serde_json::json;
use zae_limiter::aggregator::{Aggregator, BatchReport, ChangeKind, Skip, StreamRecord, Window};
use zae_limiter::repository::dynamodb::aws_sdk_dynamodb::types::AttributeValue;
use zae_limiter::{DynamoDbRepository, Limit, RateLimiter};

use crate::lambda_records::lambda_records;
use crate::{dynamo, python};

type Item = HashMap<String, AttributeValue>;

/// 2026-11-30T10:15:00Z.
const T: i64 = 1_796_033_700_000;
const HOUR: i64 = 3_600_000;

async fn raw(repo: &DynamoDbRepository, pk: String, sk: &str) -> Option<Item> {
    repo.client()
        .get_item()
        .table_name(repo.table())
        .key("PK", AttributeValue::S(pk))
        .key("SK", AttributeValue::S(sk.to_string()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item()
        .cloned()
}

/// A bucket item as stored.
async fn bucket(repo: &DynamoDbRepository, entity: &str, resource: &str) -> Option<Item> {
    let pk = format!("{}/BUCKET#{entity}#{resource}#0", repo.namespace_id());
    raw(repo, pk, "#STATE").await
}

/// A snapshot item as stored.
async fn snapshot(repo: &DynamoDbRepository, entity: &str, sk: &str) -> Item {
    let pk = format!("{}/ENTITY#{entity}", repo.namespace_id());
    raw(repo, pk, sk)
        .await
        .unwrap_or_else(|| panic!("no snapshot {sk}"))
}

fn n(item: &Item, attr: &str) -> i64 {
    match item.get(attr) {
        Some(AttributeValue::N(v)) => v.parse().unwrap(),
        other => panic!("{attr}: {other:?}"),
    }
}

/// Acquires `tokens` (and 1 request) for `entity` and returns the stream record of the
/// write: the item before and after, numbered `seq`, at `at_ms` (`_stream` names the
/// delivery in the test's own words; records are ordered per bucket item).
async fn acquire_recorded(
    limiter: &RateLimiter,
    repo: &DynamoDbRepository,
    entity: &str,
    tokens: u64,
    (_stream, seq, at_ms): (&str, u64, i64),
) -> StreamRecord {
    let before = bucket(repo, entity, "llm").await;
    limiter
        .acquire(entity, "llm")
        .consume([("rpm", 1), ("tpm", tokens)])
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    let after = bucket(repo, entity, "llm").await;
    StreamRecord {
        kind: if before.is_some() {
            ChangeKind::Modify
        } else {
            ChangeKind::Insert
        },
        sequence_number: format!("{seq:021}"),
        created_ms: Some(at_ms),
        old_image: before,
        new_image: after,
    }
}

async fn setup() -> (DynamoDbRepository, RateLimiter, Aggregator) {
    let repo = dynamo::builder().await.build().await.unwrap();
    let limiter = limited(&repo).await;
    let aggregator = Aggregator::new(repo.client().clone(), repo.table());
    (repo, limiter, aggregator)
}

/// A limiter on `repo` with `rpm` and `tpm` stored for resource `llm`.
async fn limited(repo: &DynamoDbRepository) -> RateLimiter {
    let limiter = RateLimiter::new(repo.clone());
    limiter
        .set_resource_limits(
            "llm",
            &[
                Limit::per_minute("rpm", 1_000),
                Limit::per_minute("tpm", 1_000_000),
            ],
        )
        .await
        .unwrap();
    limiter
}

/// A repository on a table of its own with a stream (`table`: one per test, since a
/// consumer reads and keeps positions for the whole table), and its limiter.
async fn stream_setup(table: &str) -> (DynamoDbRepository, RateLimiter) {
    use zae_limiter::repository::dynamodb::TableOptions;
    let repo = dynamo::builder()
        .await
        .table(table)
        .table_options(TableOptions {
            stream: true,
            ..TableOptions::default()
        })
        .build()
        .await
        .unwrap();
    let limiter = limited(&repo).await;
    (repo, limiter)
}

/// A consumer of `repo`'s table stream on the shared DynamoDB Local.
async fn stream_consumer(repo: &DynamoDbRepository) -> zae_limiter::aggregator::StreamConsumer {
    use zae_limiter::aggregator::{streams_client, StreamConsumer};
    StreamConsumer::new(
        repo.client().clone(),
        streams_client(None, Some(&dynamo::endpoint().await)).await,
        repo.table(),
        Aggregator::new(repo.client().clone(), repo.table()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_record_counts_once_however_often_and_in_whatever_batches_it_arrives() {
    let (repo, limiter, aggregator) = setup().await;
    // Six acquires: five in the 10:00 hour, the last at 11:15.
    let mut records = Vec::new();
    for i in 0..6u64 {
        let at = if i < 5 {
            T + i as i64 * 1_000
        } else {
            T + HOUR
        };
        records.push(
            acquire_recorded(&limiter, &repo, "k1", 10 * (i + 1), ("sh-1", 100 + i, at)).await,
        );
    }
    assert_eq!(records[0].kind, ChangeKind::Insert);
    let first = aggregator.process(&records[..4]).await.unwrap();
    assert_eq!(first.deltas, 8, "{first:?}");
    assert_eq!(
        first.snapshot_writes, 2,
        "one write per item per batch: {first:?}"
    );
    // The same batch again (a redelivery), then an overlapping one.
    let again = aggregator.process(&records[..4]).await.unwrap();
    assert_eq!(
        (again.snapshot_writes, again.already_counted),
        (0, 8),
        "{again:?}"
    );
    let overlap = aggregator.process(&records[2..]).await.unwrap();
    assert_eq!(overlap.already_counted, 4, "{overlap:?}");
    assert_eq!(overlap.snapshot_writes, 3, "{overlap:?}");

    let hour10 = snapshot(&repo, "k1", "#USAGE#llm#2026-11-30T10:00:00Z").await;
    assert_eq!(n(&hour10, "rpm"), 5);
    assert_eq!(n(&hour10, "tpm"), 10 + 20 + 30 + 40 + 50);
    assert_eq!(n(&hour10, "total_events"), 10);
    let hour11 = snapshot(&repo, "k1", "#USAGE#llm#2026-11-30T11:00:00Z").await;
    assert_eq!((n(&hour11, "rpm"), n(&hour11, "tpm")), (1, 60));
    let day = snapshot(&repo, "k1", "#USAGE#llm#2026-11-30T00:00:00Z#daily").await;
    assert_eq!((n(&day, "rpm"), n(&day, "tpm")), (6, 210));
    assert_eq!(day["window"], AttributeValue::S("daily".into()));
    // The totals are the buckets' own counters.
    let states = limiter.bucket_states("k1", "llm").await.unwrap();
    assert_eq!(states["tpm"].total_consumed_milli, 210_000);

    // Python's reader sees the same numbers in the items this crate wrote.
    let place = json!({"endpoint": dynamo::endpoint().await, "table": repo.table(),
                       "namespace": repo.namespace(), "op": "usage", "entity": "k1",
                       "resource": "llm"});
    let answer = python::run(place).await;
    assert!(answer.get("error").is_none(), "{answer}");
    let snaps = answer["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 3, "{answer}");
    let daily = snaps.iter().find(|s| s["window"] == "daily").unwrap();
    assert_eq!(daily["counters"], json!({"rpm": 6, "tpm": 210}), "{answer}");
    assert_eq!(daily["window_start"], "2026-11-30T00:00:00Z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_retried_after_a_crash_between_its_writes_counts_once() {
    let (repo, limiter, aggregator) = setup().await;
    let mut records = Vec::new();
    for i in 0..3u64 {
        records.push(acquire_recorded(&limiter, &repo, "k2", 5, ("sh-9", 7 + i, T)).await);
    }
    // The crash: only the hourly item was written before the process died.
    let partial = aggregator
        .clone()
        .windows([Window::Hourly])
        .process(&records)
        .await
        .unwrap();
    assert_eq!(partial.snapshot_writes, 1);
    let retried = aggregator.process(&records).await.unwrap();
    assert_eq!(
        (retried.snapshot_writes, retried.already_counted),
        (1, 3),
        "{retried:?}"
    );
    let hour = snapshot(&repo, "k2", "#USAGE#llm#2026-11-30T10:00:00Z").await;
    let day = snapshot(&repo, "k2", "#USAGE#llm#2026-11-30T00:00:00Z#daily").await;
    assert_eq!((n(&hour, "tpm"), n(&day, "tpm")), (15, 15));
    // Two aggregators on the same batch at once (overlapping deliveries): still once.
    let more: Vec<StreamRecord> = {
        let mut v = Vec::new();
        for i in 0..4u64 {
            v.push(acquire_recorded(&limiter, &repo, "k2", 1, ("sh-9", 20 + i, T)).await);
        }
        v
    };
    let (a, b) = tokio::join!(aggregator.process(&more), aggregator.process(&more));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.already_counted + b.already_counted, 8, "{a:?} {b:?}");
    let hour = snapshot(&repo, "k2", "#USAGE#llm#2026-11-30T10:00:00Z").await;
    assert_eq!(n(&hour, "tpm"), 19);
    assert_eq!(n(&hour, "rpm"), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_are_skipped_and_counted_never_failing_the_batch() {
    let (repo, limiter, aggregator) = setup().await;
    limiter.create_entity("k3").await.unwrap();
    let good = acquire_recorded(&limiter, &repo, "k3", 4, ("sh-2", 1, T)).await;
    let mut second = acquire_recorded(&limiter, &repo, "k3", 4, ("sh-2", 2, T)).await;
    let meta = raw(&repo, format!("{}/ENTITY#k3", repo.namespace_id()), "#META")
        .await
        .unwrap();
    let entity_record = StreamRecord {
        kind: ChangeKind::Modify,
        sequence_number: "3".into(),
        created_ms: Some(T),
        old_image: Some(meta.clone()),
        new_image: Some(meta),
    };
    let removed = StreamRecord {
        kind: ChangeKind::Remove,
        sequence_number: "4".into(),
        old_image: second.new_image.clone(),
        new_image: None,
        ..second.clone()
    };
    let mut anonymous = second.clone();
    anonymous.sequence_number = "5".into();
    anonymous.new_image.as_mut().unwrap().remove("entity_id");
    // A counter of a limit the item does not hold, beside the real ones.
    for image in [&mut second.old_image, &mut second.new_image] {
        image
            .as_mut()
            .unwrap()
            .insert("b_ghost_tc".into(), AttributeValue::N("1000".into()));
    }
    let report: BatchReport = aggregator
        .process(&[good, entity_record, removed, anonymous, second])
        .await
        .unwrap();
    assert_eq!(report.records, 5);
    assert_eq!(report.skipped[&Skip::NotABucket], 1);
    assert_eq!(report.skipped[&Skip::Removed], 1);
    assert_eq!(report.skipped[&Skip::MissingAttributes], 1);
    assert_eq!(report.skipped[&Skip::UnknownLimit], 1);
    let hour = snapshot(&repo, "k3", "#USAGE#llm#2026-11-30T10:00:00Z").await;
    assert_eq!((n(&hour, "rpm"), n(&hour, "tpm")), (2, 8));
    assert!(!hour.contains_key("ghost"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_costs_one_write_per_window_per_batch() {
    let (repo, limiter, aggregator) = setup().await;
    let mut records = Vec::new();
    for i in 0..40u64 {
        records.push(
            acquire_recorded(&limiter, &repo, "hot", 1, ("sh-3", 1_000 + i, T + i as i64)).await,
        );
    }
    let report = aggregator
        .clone()
        .windows([Window::Hourly, Window::Daily, Window::Monthly])
        .process(&records)
        .await
        .unwrap();
    assert_eq!(report.deltas, 80);
    assert_eq!(report.snapshot_writes, 3, "{report:?}");
    let month = snapshot(&repo, "hot", "#USAGE#llm#2026-11-01T00:00:00Z#monthly").await;
    assert_eq!((n(&month, "rpm"), n(&month, "tpm")), (40, 40));
    assert_eq!(n(&month, "total_events"), 80);
    // Counted in the window of when it happened (T, hours ago), not of the bucket's `rf`
    // (now, and moved only by rf-locked writes).
    let rf = n(records.last().unwrap().new_image.as_ref().unwrap(), "rf");
    assert!(rf > T + HOUR);
}

/// Usage totals of `entity`'s hourly snapshots, per limit, read from the table.
async fn hourly_totals(repo: &DynamoDbRepository, entity: &str) -> HashMap<String, i64> {
    let mut totals = HashMap::new();
    for item in usage_items(repo, entity).await {
        if item.get("window") != Some(&AttributeValue::S("hourly".into())) {
            continue;
        }
        for limit in ["rpm", "tpm"] {
            if item.contains_key(limit) {
                *totals.entry(limit.to_string()).or_insert(0) += n(&item, limit);
            }
        }
    }
    totals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_consumer_resumes_where_it_stopped_and_counts_each_record_once() {
    let (repo, limiter) = stream_setup("zae-limiter-stream-test").await;
    // Estimates of 100 tokens, 30 used: the refunds are stream records too.
    let use_tokens = |n: usize| {
        let limiter = limiter.clone();
        async move {
            for _ in 0..n {
                let lease = limiter
                    .acquire("k-stream", "llm")
                    .consume([("rpm", 1), ("tpm", 100)])
                    .await
                    .unwrap();
                lease.adjust([("tpm", -70)]).await.unwrap();
                lease.commit().await.unwrap();
            }
        }
    };
    use_tokens(5).await;
    let first = stream_consumer(&repo).await.poll().await.unwrap();
    assert!(first.batch.records >= 10, "{first:?}");
    assert_eq!(
        hourly_totals(&repo, "k-stream").await,
        HashMap::from([("rpm".to_string(), 5), ("tpm".to_string(), 150)]),
        "{first:?}"
    );
    // A new consumer (a restart) starts where the last one saved its position.
    use_tokens(3).await;
    let resumed = stream_consumer(&repo).await.poll().await.unwrap();
    assert_eq!(resumed.batch.already_counted, 0, "{resumed:?}");
    assert_eq!(
        hourly_totals(&repo, "k-stream").await,
        HashMap::from([("rpm".to_string(), 8), ("tpm".to_string(), 240)])
    );
    // A crash after counting, before saving the position: the records are read again
    // and counted once.
    let positions = repo
        .client()
        .query()
        .table_name(repo.table())
        .key_condition_expression("PK = :pk")
        .expression_attribute_values(":pk", AttributeValue::S("_/AGGREGATOR#".into()))
        .send()
        .await
        .unwrap();
    assert!(!positions.items().is_empty());
    for item in positions.items() {
        repo.client()
            .delete_item()
            .table_name(repo.table())
            .key("PK", item["PK"].clone())
            .key("SK", item["SK"].clone())
            .send()
            .await
            .unwrap();
    }
    let replayed = stream_consumer(&repo).await.poll().await.unwrap();
    assert!(replayed.batch.already_counted > 0, "{replayed:?}");
    assert_eq!(
        hourly_totals(&repo, "k-stream").await,
        HashMap::from([("rpm".to_string(), 8), ("tpm".to_string(), 240)])
    );
    let states = limiter.bucket_states("k-stream", "llm").await.unwrap();
    assert_eq!(
        states["tpm"].total_consumed_milli, 240_000,
        "the buckets agree"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_queried_in_full_pages_summarised_and_capacity_is_reported() {
    use zae_limiter::usage::UsageQuery;
    let (repo, limiter, aggregator) = setup().await;
    // Three hours of use by two keys: k-a every hour, k-b once.
    let mut records = Vec::new();
    for hour in 0..3i64 {
        for i in 0..2u64 {
            let seq = (hour as u64) * 10 + i;
            records.push(
                acquire_recorded(&limiter, &repo, "k-a", 10, ("sh", seq, T + hour * HOUR)).await,
            );
        }
    }
    records.push(acquire_recorded(&limiter, &repo, "k-b", 7, ("sh", 99, T)).await);
    aggregator.process(&records).await.unwrap();

    // Hourly and daily items of k-a: 3 + 1, newest first, one per page.
    let mut query = UsageQuery::entity("k-a").on("llm").page_size(1);
    let mut seen = Vec::new();
    loop {
        let page = limiter.usage_snapshots(&query).await.unwrap();
        assert!(page.snapshots.len() == 1 || page.next_page_token.is_none());
        seen.extend(page.snapshots);
        match page.next_page_token {
            Some(token) => query = query.after(token),
            None => break,
        }
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
    // Filters apply before the page is cut: full pages, not short ones.
    let hourly = limiter
        .usage_snapshots(
            &UsageQuery::entity("k-a")
                .window(Window::Hourly)
                .page_size(2),
        )
        .await
        .unwrap();
    assert_eq!(hourly.snapshots.len(), 2);
    assert_eq!(hourly.snapshots[0].window_start, "2026-11-30T12:00:00Z");
    assert!(hourly.next_page_token.is_some());
    let late = limiter
        .usage_snapshots(
            &UsageQuery::entity("k-a")
                .window(Window::Hourly)
                .between(Some(T + HOUR), None),
        )
        .await
        .unwrap();
    assert_eq!(late.snapshots.len(), 2, "{late:?}");
    // Every entity on the resource (GSI2).
    let by_resource = limiter
        .usage_snapshots(&UsageQuery::resource("llm").window(Window::Daily))
        .await
        .unwrap();
    let mut entities: Vec<&str> = by_resource
        .snapshots
        .iter()
        .map(|s| s.entity_id.as_str())
        .collect();
    entities.sort_unstable();
    assert_eq!(entities, ["k-a", "k-b"]);
    let summary = limiter
        .usage_summary(&UsageQuery::entity("k-a").window(Window::Hourly))
        .await
        .unwrap();
    assert_eq!(summary.snapshots, 3);
    assert_eq!(summary.total["tpm"], 60);
    assert_eq!(summary.average["rpm"], 2.0);

    let capacity = limiter
        .resource_capacity("llm", "tpm", false)
        .await
        .unwrap();
    assert_eq!(capacity.entities.len(), 2);
    assert_eq!(capacity.capacity, 2_000_000);
    // (1,000,000 a minute refills within the test: the arithmetic is checked in memory.)
    assert!(capacity.available <= capacity.capacity, "{capacity:?}");
    let one = limiter
        .entity_capacity("k-b", "llm", "tpm")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(one.capacity, 1_000_000);
}

/// `entity`'s snapshot items as stored.
async fn usage_items(repo: &DynamoDbRepository, entity: &str) -> Vec<Item> {
    repo.client()
        .query()
        .table_name(repo.table())
        .key_condition_expression("PK = :pk AND begins_with(SK, :usage)")
        .expression_attribute_values(
            ":pk",
            AttributeValue::S(format!("{}/ENTITY#{entity}", repo.namespace_id())),
        )
        .expression_attribute_values(":usage", AttributeValue::S("#USAGE#".into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .items()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pythons_own_aggregator_and_this_one_count_the_same_records_alike() {
    use zae_limiter::usage::UsageQuery;
    let (repo, limiter, aggregator) = setup().await;
    // The bucket exists first: Python counts only MODIFY records.
    limiter
        .acquire("k-o", "llm")
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    let mut records = Vec::new();
    for i in 0..8u64 {
        let mut record =
            acquire_recorded(&limiter, &repo, "k-o", 10 * (i + 1), ("sh-o", i, 0)).await;
        // Python attributes by the bucket's `rf`; without a creation time so does this one.
        record.created_ms = None;
        records.push(record);
    }
    // Hourly only: Python's hourly item for midnight and its daily item share a key.
    let answer = python::run(json!({
        "endpoint": dynamo::endpoint().await, "table": repo.table(),
        "namespace": repo.namespace(), "op": "process_records",
        "records": lambda_records(&records), "windows": ["hourly"],
    }))
    .await;
    assert!(answer.get("error").is_none(), "{answer}");
    assert_eq!(answer["errors"], json!([]), "{answer}");
    let read = |limiter: RateLimiter| async move {
        let page = limiter
            .usage_snapshots(&UsageQuery::entity("k-o").on("llm"))
            .await
            .unwrap();
        page.snapshots
            .into_iter()
            .map(|s| ((s.window, s.window_start), (s.counters, s.total_events)))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let pythons = read(limiter.clone()).await;
    assert!(!pythons.is_empty(), "{answer}");
    for item in usage_items(&repo, "k-o").await {
        repo.client()
            .delete_item()
            .table_name(repo.table())
            .key("PK", item["PK"].clone())
            .key("SK", item["SK"].clone())
            .send()
            .await
            .unwrap();
    }
    let report = aggregator
        .clone()
        .windows([Window::Hourly])
        .process(&records)
        .await
        .unwrap();
    assert_eq!(report.deltas, 16);
    let ours = read(limiter.clone()).await;
    assert_eq!(ours, pythons, "the same counters from the same records");
    let total: i64 = ours.values().map(|(c, _)| c["tpm"]).sum();
    assert_eq!(total, (1..=8).map(|i| 10 * i).sum::<i64>());
}

/// Every record the stream of `repo`'s table holds now, as the aggregator reads them.
#[cfg(feature = "lambda")]
async fn captured(repo: &DynamoDbRepository) -> Vec<StreamRecord> {
    use zae_limiter::aggregator::aws_sdk_dynamodbstreams::types::ShardIteratorType;
    use zae_limiter::aggregator::{stream_record, streams_client};
    let streams = streams_client(None, Some(&dynamo::endpoint().await)).await;
    let table = repo
        .client()
        .describe_table()
        .table_name(repo.table())
        .send()
        .await
        .unwrap();
    let arn = table
        .table()
        .unwrap()
        .latest_stream_arn()
        .unwrap()
        .to_string();
    let described = streams
        .describe_stream()
        .stream_arn(&arn)
        .send()
        .await
        .unwrap();
    let mut records = Vec::new();
    for shard in described.stream_description().unwrap().shards() {
        let mut iterator = streams
            .get_shard_iterator()
            .stream_arn(&arn)
            .shard_id(shard.shard_id().unwrap())
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
            .unwrap()
            .shard_iterator()
            .map(str::to_string);
        while let Some(current) = iterator.take() {
            let out = streams
                .get_records()
                .shard_iterator(current)
                .send()
                .await
                .unwrap();
            if out.records().is_empty() {
                break;
            }
            records.extend(out.records().iter().map(stream_record));
            iterator = out.next_shard_iterator().map(str::to_string);
        }
    }
    records
}

#[cfg(feature = "lambda")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lambda_handler_counts_records_captured_from_the_stream_once() {
    use zae_limiter::aggregator::lambda;
    let (repo, limiter) = stream_setup("zae-limiter-lambda-test").await;
    for tokens in [100, 250, 40] {
        limiter
            .acquire("k-lambda", "llm")
            .consume([("tpm", tokens)])
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
    }
    let records = captured(&repo).await;
    assert!(records.iter().any(|r| r.kind == ChangeKind::Insert));
    let event: lambda::aws_lambda_events::event::dynamodb::Event =
        serde_json::from_value(json!({ "Records": lambda_records(&records) })).unwrap();
    let aggregator = Aggregator::new(repo.client().clone(), repo.table());
    let response = lambda::handle(&aggregator, &event).await;
    assert!(response.batch_item_failures.is_empty(), "{response:?}");
    // Lambda delivers again (a retry of the whole batch): counted once.
    let response = lambda::handle(&aggregator, &event).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(hourly_totals(&repo, "k-lambda").await["tpm"], 390);
    // A batch whose writes fail is reported back from its first record, for a retry
    // and, past the mapping's limit, the dead-letter queue.
    let broken = Aggregator::new(repo.client().clone(), "no-such-table");
    let response = lambda::handle(&broken, &event).await;
    assert_eq!(response.batch_item_failures.len(), 1);
    assert_eq!(
        response.batch_item_failures[0].item_identifier.as_deref(),
        Some(records[0].sequence_number.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aggregator_doubles_a_hot_partition_and_propagates_a_grown_count() {
    let (repo, limiter, aggregator) = setup().await;
    let record = acquire_recorded(&limiter, &repo, "hot-p", 10, ("s", 1, T)).await;
    aggregator.process(&[record]).await.unwrap();
    // Shard 0's write capacity spent, seconds into debt, as under well over 1,000 writes a
    // second (deep enough that a slow run cannot refill it past a fifth before the check).
    let before = bucket(&repo, "hot-p", "llm").await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    repo.client()
        .update_item()
        .table_name(repo.table())
        .key("PK", before["PK"].clone())
        .key("SK", before["SK"].clone())
        .update_expression("SET b_wcu_tk = :low, rf = :now")
        .expression_attribute_values(":low", AttributeValue::N("-5000000".into()))
        .expression_attribute_values(":now", AttributeValue::N(now.to_string()))
        .send()
        .await
        .unwrap();
    let after = bucket(&repo, "hot-p", "llm").await.unwrap();
    let hot = StreamRecord {
        kind: ChangeKind::Modify,
        sequence_number: "2".into(),
        created_ms: Some(now),
        old_image: Some(before),
        new_image: Some(after),
    };
    let report = aggregator
        .process(std::slice::from_ref(&hot))
        .await
        .unwrap();
    assert_eq!(
        (report.shards.doubled, report.shards.created),
        (1, 1),
        "{report:?}"
    );
    let shard = |n: u32| {
        let repo = repo.clone();
        async move {
            let pk = format!("{}/BUCKET#hot-p#llm#{n}", repo.namespace_id());
            raw(&repo, pk, "#STATE").await
        }
    };
    assert_eq!(n(&shard(0).await.unwrap(), "shard_count"), 2);
    let one = shard(1).await.expect("shard 1 created");
    assert_eq!(n(&one, "shard_count"), 2);
    assert_eq!(n(&one, "b_tpm_tk"), 500_000_000, "half of 1,000,000 tokens");
    assert_eq!(n(&one, "b_tpm_tc"), 0);
    assert_eq!(one["GSI3SK"], AttributeValue::S("BUCKET#llm#1".into()));
    // Delivered again: nothing more to do.
    let again = aggregator
        .process(std::slice::from_ref(&hot))
        .await
        .unwrap();
    assert_eq!(again.shards, Default::default());

    // Python doubles it again (2 -> 4): the count is stamped on shard 1, and shards 2 and
    // 3 are created. (The write capacity recovered meanwhile: no doubling of our own.)
    let zero = shard(0).await.unwrap();
    repo.client()
        .update_item()
        .table_name(repo.table())
        .key("PK", zero["PK"].clone())
        .key("SK", zero["SK"].clone())
        .update_expression("SET b_wcu_tk = b_wcu_cp")
        .send()
        .await
        .unwrap();
    let before = shard(0).await.unwrap();
    let place = json!({"endpoint": dynamo::endpoint().await, "table": repo.table(),
                       "namespace": repo.namespace(), "op": "bump_shards",
                       "entity": "hot-p", "resource": "llm", "from": [2]});
    let bumped = python::run(place).await;
    assert_eq!(bumped["counts"], json!([4]), "{bumped}");
    let after = shard(0).await.unwrap();
    let grown = StreamRecord {
        kind: ChangeKind::Modify,
        sequence_number: "3".into(),
        created_ms: Some(now),
        old_image: Some(before),
        new_image: Some(after),
    };
    let report = aggregator.process(&[grown]).await.unwrap();
    assert_eq!(report.shards.created, 2, "{report:?}");
    for n_shard in 0..4 {
        assert_eq!(
            n(&shard(n_shard).await.unwrap(), "shard_count"),
            4,
            "shard {n_shard}"
        );
    }
    // The limiter charges the shards, each its share.
    for _ in 0..8 {
        limiter
            .acquire("hot-p", "llm")
            .consume([("tpm", 1)])
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
    }
    let states = limiter.bucket_states("hot-p", "llm").await.unwrap();
    assert_eq!(states["tpm"].capacity_milli, 1_000_000_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_cannot_be_counted_is_dead_lettered_and_the_stream_moves_on() {
    let (repo, limiter) = stream_setup("zae-limiter-dead-letter-test").await;
    let take = |tokens: u64| {
        let limiter = limiter.clone();
        async move {
            limiter
                .acquire("k-ok", "llm")
                .consume([("tpm", tokens)])
                .await
                .unwrap()
                .commit()
                .await
                .unwrap();
        }
    };
    take(5).await;
    // A bucket item with 600 limits: its snapshot write outgrows DynamoDB's 4 KB
    // expression limit, which no retry can fix.
    let poison = |tc: &str| {
        let mut item: Item = HashMap::from([
            (
                "PK".to_string(),
                AttributeValue::S(format!("{}/BUCKET#poison#llm#0", repo.namespace_id())),
            ),
            ("SK".to_string(), AttributeValue::S("#STATE".into())),
            ("entity_id".to_string(), AttributeValue::S("poison".into())),
            ("resource".to_string(), AttributeValue::S("llm".into())),
            ("rf".to_string(), AttributeValue::N("1".into())),
        ]);
        for i in 0..600 {
            for (field, value) in [("tk", "1000"), ("cp", "1000"), ("tc", tc)] {
                item.insert(
                    format!("b_limit-number-{i:04}_{field}"),
                    AttributeValue::N(value.into()),
                );
            }
        }
        item
    };
    for tc in ["0", "1000"] {
        repo.client()
            .put_item()
            .table_name(repo.table())
            .set_item(Some(poison(tc)))
            .send()
            .await
            .unwrap();
    }
    take(7).await;
    let consumer = stream_consumer(&repo).await;
    let report = consumer.poll().await.unwrap();
    assert_eq!(report.dead_lettered, 1, "{report:?}");
    assert_eq!(
        hourly_totals(&repo, "k-ok").await["tpm"],
        12,
        "the records around it were counted"
    );
    let letters = repo
        .client()
        .query()
        .table_name(repo.table())
        .key_condition_expression("PK = :pk AND begins_with(SK, :dead)")
        .expression_attribute_values(":pk", AttributeValue::S("_/AGGREGATOR#".into()))
        .expression_attribute_values(":dead", AttributeValue::S("#DEAD#".into()))
        .send()
        .await
        .unwrap();
    assert_eq!(letters.items().len(), 1);
    let letter = &letters.items()[0];
    assert!(
        matches!(&letter["item"], AttributeValue::S(pk) if pk.ends_with("BUCKET#poison#llm#0"))
    );
    assert!(matches!(&letter["error"], AttributeValue::S(e) if e.contains("Expression size")));
    // The position moved past it: the next pass has nothing to send there again.
    take(1).await;
    let next = consumer.poll().await.unwrap();
    assert_eq!(next.dead_lettered, 0, "{next:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_consumer_counts_as_records_arrive_and_stops_when_told() {
    use std::time::Duration;
    let (repo, limiter) = stream_setup("zae-limiter-consumer-run-test").await;
    let consumer = stream_consumer(&repo)
        .await
        .idle_wait(Duration::from_millis(100));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        consumer
            .run(async {
                let _ = stopped.await;
            })
            .await
    });
    // Used while the consumer runs, in two bursts.
    let total = |repo: DynamoDbRepository| async move {
        hourly_totals(&repo, "k-run")
            .await
            .get("tpm")
            .copied()
            .unwrap_or(0)
    };
    for (burst, expected) in [(3u64, 30i64), (2, 50)] {
        for _ in 0..burst {
            limiter
                .acquire("k-run", "llm")
                .consume([("tpm", 10)])
                .await
                .unwrap()
                .commit()
                .await
                .unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while total(repo.clone()).await != expected {
            assert!(
                std::time::Instant::now() < deadline,
                "counted {} of {expected}",
                total(repo.clone()).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the consumer stops when told")
        .unwrap()
        .unwrap();
}
