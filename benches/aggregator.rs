//! The usage aggregator against the Python zae-limiter 0.17's own processor
//! (`process_stream_records`, from the PyPI package), on the same stream records and the
//! same DynamoDB Local, side by side: records counted per second and DynamoDB writes per
//! 1,000 records, in batches of 100 (the event source mapping's batch size).
//!
//! Two workloads, each from real bucket writes (the item before and after each acquire):
//! one hot key, and the same number of records spread over 200 keys.
//!
//! ```text
//! cargo bench --bench aggregator --features aggregator,local
//! ZAE_BENCH_RECORDS=4000 cargo bench --bench aggregator --features aggregator,local
//! ```
//!
//! Python's processor also refills the buckets it sees and checks them for sharding (its
//! share of that upkeep, which this aggregator does not do yet): its calls are reported
//! by operation, and the write ratio counts its snapshot writes only.

#[path = "../tests/common/lambda_records.rs"]
mod lambda_records;
#[path = "../tests/python/mod.rs"]
mod python;

use std::collections::HashMap;
use std::time::Instant;

use lambda_records::lambda_records;
use serde_json::json;
use zae_limiter::aggregator::{Aggregator, ChangeKind, StreamRecord};
use zae_limiter::local::DynamoDbLocal;
use zae_limiter::repository::dynamodb::aws_sdk_dynamodb::types::AttributeValue;
use zae_limiter::repository::dynamodb::CallCounter;
use zae_limiter::{DynamoDbRepository, Limit, RateLimiter};

const BATCH: usize = 100;

type Item = HashMap<String, AttributeValue>;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn bucket(repo: &DynamoDbRepository, entity: &str) -> Option<Item> {
    repo.client()
        .get_item()
        .table_name(repo.table())
        .key(
            "PK",
            AttributeValue::S(format!("{}/BUCKET#{entity}#llm#0", repo.namespace_id())),
        )
        .key("SK", AttributeValue::S("#STATE".into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item()
        .cloned()
}

/// `n` records of acquires over `keys` keys (MODIFY only: every key is used once first,
/// since Python counts no creations), numbered from `seq`.
async fn workload(
    limiter: &RateLimiter,
    repo: &DynamoDbRepository,
    prefix: &str,
    keys: usize,
    n: usize,
) -> Vec<StreamRecord> {
    for k in 0..keys {
        let entity = format!("{prefix}-{k}");
        limiter
            .acquire(&entity, "llm")
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
    }
    let mut records = Vec::with_capacity(n);
    for i in 0..n {
        let entity = format!("{prefix}-{}", i % keys);
        let before = bucket(repo, &entity).await;
        limiter
            .acquire(&entity, "llm")
            .consume([("rpm", 1), ("tpm", 100 + (i % 50) as u64)])
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
        let after = bucket(repo, &entity).await;
        records.push(StreamRecord {
            kind: ChangeKind::Modify,
            sequence_number: format!("{:021}", i + 1),
            // Both sides attribute by the bucket's `rf` then (Python always does).
            created_ms: None,
            old_image: before,
            new_image: after,
        });
    }
    records
}

struct Side {
    records_per_sec: f64,
    writes_per_1000: f64,
    calls: String,
}

async fn ours(repo: &DynamoDbRepository, counter: &CallCounter, records: &[StreamRecord]) -> Side {
    let aggregator = Aggregator::new(repo.client().clone(), repo.table());
    let before = counter.snapshot();
    let started = Instant::now();
    for batch in records.chunks(BATCH) {
        aggregator.process(batch).await.unwrap();
    }
    let seconds = started.elapsed().as_secs_f64();
    let calls: std::collections::BTreeMap<String, u64> = counter
        .snapshot()
        .into_iter()
        .map(|(op, n)| {
            let was = before.get(&op).copied().unwrap_or(0);
            (op, n - was)
        })
        .filter(|(_, n)| *n > 0)
        .collect();
    let writes = calls.get("UpdateItem").copied().unwrap_or(0);
    Side {
        records_per_sec: records.len() as f64 / seconds,
        writes_per_1000: writes as f64 * 1000.0 / records.len() as f64,
        calls: format!("{calls:?}"),
    }
}

async fn pythons(endpoint: &str, repo: &DynamoDbRepository, records: &[StreamRecord]) -> Side {
    let answer = python::run(json!({
        "endpoint": endpoint, "table": repo.table(), "namespace": repo.namespace(),
        "op": "process_records", "records": lambda_records(records),
        "windows": ["hourly", "daily"], "batch": BATCH,
    }))
    .await;
    assert!(answer.get("error").is_none(), "Python failed: {answer}");
    let seconds = answer["seconds"].as_f64().unwrap();
    // Its snapshot writes (one per consumption per window); its other calls refill and
    // check the buckets.
    let writes = answer["snapshots_updated"].as_f64().unwrap();
    Side {
        records_per_sec: records.len() as f64 / seconds,
        writes_per_1000: writes * 1000.0 / records.len() as f64,
        calls: answer["calls"].to_string(),
    }
}

fn main() {
    // `cargo test --benches` runs benches in test mode: nothing to measure there.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let n = env_or("ZAE_BENCH_RECORDS", 2_000);
        let local = DynamoDbLocal::start().await.expect("DynamoDB Local");
        let endpoint = local.endpoint_url().to_string();
        let counter = CallCounter::new();
        let repo = DynamoDbRepository::builder()
            .endpoint_url(&endpoint)
            .table("zae-aggregator-bench")
            .call_counter(counter.clone())
            .build()
            .await
            .unwrap();
        let limiter = RateLimiter::new(repo.clone());
        limiter
            .set_resource_limits(
                "llm",
                &[
                    Limit::per_minute("rpm", 1_000_000_000),
                    Limit::per_minute("tpm", 1_000_000_000),
                ],
            )
            .await
            .unwrap();
        println!("\n== usage aggregator vs Python 0.17's processor: {n} records, batches of {BATCH}, windows hourly + daily ==");
        for (name, keys) in [("hot key", 1), ("200 keys", 200)] {
            let records = workload(&limiter, &repo, name.replace(' ', "-").as_str(), keys, n).await;
            let python = pythons(&endpoint, &repo, &records).await;
            let rust = ours(&repo, &counter, &records).await;
            println!("{name}:");
            println!(
                "  zae-limiter: {:>8.0} records/s, {:>7.1} writes per 1,000 records  calls {}",
                rust.records_per_sec, rust.writes_per_1000, rust.calls
            );
            println!(
                "  python 0.17: {:>8.0} records/s, {:>7.1} writes per 1,000 records  calls {}",
                python.records_per_sec, python.writes_per_1000, python.calls
            );
            println!(
                "  ratio: {:.1}x the records per second, {:.1}x fewer snapshot writes",
                rust.records_per_sec / python.records_per_sec,
                python.writes_per_1000 / rust.writes_per_1000.max(f64::MIN_POSITIVE)
            );
        }
    });
}
