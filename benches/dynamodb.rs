//! The DynamoDB backend against DynamoDB Local: acquire + commit throughput and latency
//! next to the ceiling no DynamoDB limiter can pass, raw conditional `UpdateItem` calls with
//! `ADD` from the same SDK on the same table (same indexes, same stream setting, same items).
//!
//! ```text
//! cargo bench --bench dynamodb
//! ZAE_BENCH_SECONDS=5 ZAE_BENCH_CONCURRENCY=32 ZAE_BENCH_TABLES=plain cargo bench --bench dynamodb
//! ```
//!
//! Every measured run gets a freshly started DynamoDB Local (it slows down as writes pile
//! up, markedly on a table with a stream), on a plain table and on one with a stream, over
//! 1 hot entity and over 1,000 entities, at 1, 8, 32 and 64 concurrent tasks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zae_limiter::local::DynamoDbLocal;
use zae_limiter::repository::dynamodb::{CallCounter, TableOptions};
use zae_limiter::{DynamoDbRepository, Limit, RateLimiter};

#[path = "support/raw.rs"]
mod raw;

const RESOURCE: &str = "bench";

fn limits() -> [Limit; 1] {
    // Never exhausted: every acquire takes the hot path, as the raw write always succeeds.
    // (Per minute: items on shared limits expire 7 x time to fill after their last write,
    // and one that expired takes the slow path once; with a per-second limit that would be
    // every 7 s per entity.)
    [Limit::per_minute("rpm", 1_000_000_000)]
}

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

#[derive(Clone, Copy)]
enum Subject {
    Raw,
    Limiter,
}

struct Measured {
    calls_per_op: f64,
    ops: u64,
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// A fresh DynamoDB Local with the table created and every bucket item written once.
async fn setup(
    stream: bool,
    entities: usize,
    calls: &CallCounter,
) -> (DynamoDbLocal, DynamoDbRepository, RateLimiter) {
    let local = DynamoDbLocal::start().await.expect("start DynamoDB Local");
    let repo = DynamoDbRepository::builder()
        .call_counter(calls.clone())
        .endpoint_url(local.endpoint_url())
        .table("zae-bench")
        .table_options(TableOptions {
            stream,
            ..TableOptions::default()
        })
        .timeout(Duration::from_secs(5))
        .build()
        .await
        .expect("open the repository");
    let limiter = RateLimiter::new(repo.clone());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut warm = Vec::new();
    for _ in 0..16 {
        let (limiter, next) = (limiter.clone(), next.clone());
        warm.push(tokio::spawn(async move {
            loop {
                let e = next.fetch_add(1, Ordering::Relaxed);
                if e >= entities {
                    break;
                }
                limiter
                    .acquire(format!("e{e}"), RESOURCE)
                    .limits(limits())
                    .await
                    .unwrap()
                    .commit()
                    .await
                    .unwrap();
            }
        }));
    }
    for w in warm {
        w.await.unwrap();
    }
    (local, repo, limiter)
}

async fn measure(
    subject: Subject,
    stream: bool,
    entities: usize,
    tasks: usize,
    seconds: f64,
) -> Measured {
    let calls = CallCounter::new();
    let (_local, repo, limiter) = setup(stream, entities, &calls).await;
    // Let the JVM compile its hot paths before anything is measured.
    let _ = run(subject, &repo, &limiter, entities, tasks, warmup_seconds()).await;
    calls.reset();
    let mut measured = run(subject, &repo, &limiter, entities, tasks, seconds).await;
    measured.calls_per_op = calls.total() as f64 / measured.ops as f64;
    measured
}

fn warmup_seconds() -> f64 {
    std::env::var("ZAE_BENCH_WARMUP_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2.0)
}

async fn run(
    subject: Subject,
    repo: &DynamoDbRepository,
    limiter: &RateLimiter,
    entities: usize,
    tasks: usize,
    seconds: f64,
) -> Measured {
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    let start = Instant::now();
    for t in 0..tasks {
        let (repo, limiter, stop) = (repo.clone(), limiter.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = t;
            while !stop.load(Ordering::Relaxed) {
                let entity = format!("e{}", n % entities);
                let began = Instant::now();
                match subject {
                    Subject::Raw => raw::update_item(&repo, &entity, RESOURCE).await,
                    Subject::Limiter => limiter
                        .acquire(entity, RESOURCE)
                        .limits(limits())
                        .await
                        .expect("acquire")
                        .commit()
                        .await
                        .expect("commit"),
                }
                latencies.push(began.elapsed().as_micros() as u32);
                n += tasks;
            }
            latencies
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for h in handles {
        all.extend(h.await.unwrap());
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as f64 / 1000.0;
    Measured {
        calls_per_op: 0.0,
        ops: all.len() as u64,
        ops_per_sec: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    }
}

fn main() {
    // criterion-style filter arguments (`cargo bench -- x`) are accepted and ignored.
    let seconds: f64 = std::env::var("ZAE_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let concurrency: Vec<usize> = env_list("ZAE_BENCH_CONCURRENCY", "1,8,32,64")
        .iter()
        .map(|c| c.parse().expect("ZAE_BENCH_CONCURRENCY: numbers"))
        .collect();
    let entity_counts: Vec<usize> = env_list("ZAE_BENCH_ENTITIES", "1,1000")
        .iter()
        .map(|c| c.parse().expect("ZAE_BENCH_ENTITIES: numbers"))
        .collect();
    let tables = env_list("ZAE_BENCH_TABLES", "plain,stream");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "\n== DynamoDB Local: acquire+commit vs raw conditional UpdateItem ({seconds} s per run, fresh DynamoDB Local per run) =="
    );
    println!(
        "{:<7} {:>8} {:>6} | {:>9} {:>8} {:>8} | {:>9} {:>8} {:>8} {:>6} | {:>6}",
        "table",
        "entities",
        "tasks",
        "raw op/s",
        "p50 ms",
        "p99 ms",
        "zae op/s",
        "p50 ms",
        "p99 ms",
        "calls",
        "ratio"
    );
    for table in &tables {
        let stream = match table.as_str() {
            "plain" => false,
            "stream" => true,
            other => panic!("ZAE_BENCH_TABLES: plain or stream, not {other}"),
        };
        for &entities in &entity_counts {
            for &tasks in &concurrency {
                let raw = runtime.block_on(measure(Subject::Raw, stream, entities, tasks, seconds));
                let zae =
                    runtime.block_on(measure(Subject::Limiter, stream, entities, tasks, seconds));
                println!(
                    "{table:<7} {entities:>8} {tasks:>6} | {:>9.0} {:>8.2} {:>8.2} | {:>9.0} {:>8.2} {:>8.2} {:>6.2} | {:>5.2}x",
                    raw.ops_per_sec,
                    raw.p50_ms,
                    raw.p99_ms,
                    zae.ops_per_sec,
                    zae.p50_ms,
                    zae.p99_ms,
                    zae.calls_per_op,
                    zae.ops_per_sec / raw.ops_per_sec
                );
            }
        }
    }
    println!("target: zae op/s at least 0.80x of raw at 32 tasks over 1,000 entities");
}
