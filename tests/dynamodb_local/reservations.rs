//! Reservations on DynamoDB Local: a hot key served from slices costs a small fraction of a
//! DynamoDB call per decision, two nodes and the Python zae-limiter 0.17 on one bucket never
//! over-admit, and once the slices are back `tc` equals what was admitted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use zae_limiter::repository::dynamodb::CallCounter;
use zae_limiter::reservations::Reservations;
use zae_limiter::{DynamoDbRepository, Error, Limit, RateLimiter};

use crate::{dynamo, python};

/// A node: its own client (with a call counter) on `namespace`, reservations on for keys
/// past `hot_rate` requests a second.
async fn node(namespace: &str, hot_rate: f64) -> (RateLimiter, CallCounter) {
    let counter = CallCounter::new();
    let repo = DynamoDbRepository::builder()
        .endpoint_url(dynamo::endpoint().await)
        .table(dynamo::TABLE)
        .namespace(namespace)
        .timeout(Duration::from_secs(10))
        .call_counter(counter.clone())
        .build()
        .await
        .expect("open the test repository");
    let limiter = RateLimiter::builder(repo)
        .reservations(Reservations::adaptive().hot_rate(hot_rate))
        .build();
    (limiter, counter)
}

async fn tc(limiter: &RateLimiter, entity: &str, limit: &str) -> i64 {
    let states = limiter.bucket_states(entity, "api").await.unwrap();
    let milli = states[limit].total_consumed_milli;
    assert_eq!(milli % 1000, 0, "{milli}");
    milli / 1000
}

/// `tasks` tasks acquiring on `entity` for `run_for` (each waiting `pace` between
/// requests); returns admitted and decisions.
async fn hammer(
    limiter: &RateLimiter,
    entity: &'static str,
    tasks: usize,
    run_for: Duration,
    pace: Option<Duration>,
) -> (u64, u64) {
    let admitted = Arc::new(AtomicU64::new(0));
    let decided = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (limiter, admitted, decided) = (limiter.clone(), admitted.clone(), decided.clone());
        handles.push(tokio::spawn(async move {
            while started.elapsed() < run_for {
                match limiter.acquire(entity, "api").await {
                    Ok(lease) => {
                        lease.commit().await.unwrap();
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Error::RateLimited(_)) => {}
                    Err(e) => panic!("{e:?}"),
                }
                decided.fetch_add(1, Ordering::Relaxed);
                if let Some(pace) = pace {
                    tokio::time::sleep(pace).await;
                }
            }
        }));
    }
    for h in handles {
        h.await.unwrap();
    }
    (
        admitted.load(Ordering::Relaxed),
        decided.load(Ordering::Relaxed),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_costs_a_small_fraction_of_a_call_per_decision() {
    let namespace = dynamo::unique_namespace("rsv");
    let (limiter, calls) = node(&namespace, 20.0).await;
    // Above what the run asks (16 tasks, each at most 1,000 a second): every request
    // admitted. Not far above it: a slice is only held while the bucket, refilling, has
    // no room for it (see `Slice::forfeit`), so a limit far above the demand keeps the
    // bucket full and slices short-lived.
    limiter
        .set_resource_limits("api", &[Limit::per_second("rps", 20_000)])
        .await
        .unwrap();
    let pace = Some(Duration::from_millis(1));
    // Warm up (the key becomes hot), then measure the steady state.
    let (warm, _) = hammer(&limiter, "hot", 16, Duration::from_millis(500), pace).await;
    let before = calls.total();
    let (admitted, decided) = hammer(&limiter, "hot", 16, Duration::from_secs(2), pace).await;
    let per_decision = (calls.total() - before) as f64 / decided as f64;
    let stats = limiter.reservation_stats().unwrap();
    eprintln!(
        "hot key with reservations on DynamoDB Local: {decided} decisions in 2 s, \
         {per_decision:.4} DynamoDB calls per decision; {stats:?}"
    );
    assert_eq!(admitted, decided);
    assert!(per_decision <= 0.05, "{per_decision} calls per decision");
    // The table counts the slice as consumed until it goes back; then exactly what was
    // admitted.
    let held: i64 = limiter
        .reservation("hot", "api")
        .unwrap()
        .held
        .iter()
        .map(|(_, h)| h)
        .sum();
    let total = (warm + admitted) as i64;
    assert!(tc(&limiter, "hot", "rps").await >= total + held);
    limiter.release_reservations().await.unwrap();
    assert_eq!(tc(&limiter, "hot", "rps").await, total);
}

/// Two nodes with reservations and the Python library, all on one bucket at once, demand
/// far above the limit: never more than capacity plus refill, and `tc` exact once the
/// slices are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_and_python_on_one_bucket_never_over_admit_and_count_exactly() {
    let namespace = dynamo::unique_namespace("rsv");
    let (a, _) = node(&namespace, 20.0).await;
    let (b, _) = node(&namespace, 20.0).await;
    // 1,000 at once, then 100 a second.
    let limit = Limit::custom("rps", 1_000, 100, 1);
    a.set_resource_limits("api", std::slice::from_ref(&limit))
        .await
        .unwrap();
    let place = json!({
        "endpoint": dynamo::endpoint().await,
        "table": dynamo::TABLE,
        "namespace": namespace,
    });
    let mut cmd = place.clone();
    for (k, v) in json!({"op": "acquire", "entity": "hot", "resource": "api",
                          "consume": {"rps": 1}, "n": 400, "tasks": 4,
                          "config_cache_ttl": 60})
    .as_object()
    .unwrap()
    {
        cmd[k] = v.clone();
    }
    let started = Instant::now();
    let python = tokio::spawn(python::run(cmd));
    // Python takes a moment to start: run until it has finished, at least 4 s.
    let run_for = Duration::from_secs(6);
    let (ours_a, ours_b) = tokio::join!(
        hammer(&a, "hot", 8, run_for, None),
        hammer(&b, "hot", 8, run_for, None)
    );
    let answer = python.await.unwrap();
    assert!(answer.get("error").is_none(), "Python failed: {answer}");
    let theirs = answer["outcomes"]["admitted"].as_u64().unwrap_or(0);
    let elapsed = started.elapsed();
    for node in [&a, &b] {
        node.release_reservations().await.unwrap();
    }
    let ours = ours_a.0 + ours_b.0;
    let most = 1_000 + 100 * elapsed.as_millis() as u64 / 1000 + 1;
    eprintln!(
        "two nodes with reservations and Python on one bucket: {} + {} (ours) + {theirs} \
         (Python) admitted of at most {most} in {elapsed:?}; {:?} / {:?}",
        ours_a.0,
        ours_b.0,
        a.reservation_stats(),
        b.reservation_stats()
    );
    assert!(ours_a.0 > 0 && ours_b.0 > 0 && theirs > 0, "all took part");
    assert!(ours + theirs <= most, "over-admission");
    assert!(ours + theirs >= 1_000, "the capacity was there to take");
    assert_eq!(tc(&a, "hot", "rps").await, (ours + theirs) as i64);
}

/// Leases on a hot key over DynamoDB: adjustments draw on the slice, refunds return to
/// it, rollbacks too; `tc` is the net consumption once the slices are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_on_a_hot_key_settle_exactly() {
    let namespace = dynamo::unique_namespace("rsv");
    // Eight writers on one item are slow without slices: hot from 5 a second.
    let (limiter, _) = node(&namespace, 5.0).await;
    // Above what 8 tasks at most 1,000 a second each take.
    let limits = [
        Limit::per_second("rps", 10_000),
        Limit::per_second("tps", 5_000_000),
    ];
    let net = Arc::new(AtomicU64::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let (limiter, limits, net, requests) = (
            limiter.clone(),
            limits.clone(),
            net.clone(),
            requests.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = t;
            while started.elapsed() < Duration::from_secs(2) {
                i += 1;
                let lease = limiter
                    .acquire("llm-key", "api")
                    .limits(limits.clone())
                    .consume([("rps", 1), ("tps", 500)])
                    .await
                    .unwrap();
                let handle = lease.handle();
                match i % 4 {
                    0 => {
                        handle.adjust([("tps", 300)]).unwrap();
                        lease.commit().await.unwrap();
                        net.fetch_add(800, Ordering::Relaxed);
                    }
                    1 => {
                        handle.adjust([("tps", -450)]).unwrap();
                        lease.commit().await.unwrap();
                        net.fetch_add(50, Ordering::Relaxed);
                    }
                    2 => {
                        lease.rollback().await.unwrap();
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        continue;
                    }
                    _ => {
                        lease.commit().await.unwrap();
                        net.fetch_add(500, Ordering::Relaxed);
                    }
                }
                requests.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let stats = limiter.reservation_stats().unwrap();
    assert!(stats.local_admits > stats.table_acquires, "{stats:?}");
    limiter.release_reservations().await.unwrap();
    assert_eq!(
        tc(&limiter, "llm-key", "tps").await,
        net.load(Ordering::Relaxed) as i64
    );
    assert_eq!(
        tc(&limiter, "llm-key", "rps").await,
        requests.load(Ordering::Relaxed) as i64
    );
}
