//! Two OS processes with 32 tasks each hammer one entity through DynamoDB Local for several
//! refill periods. Together they must admit no more than the capacity plus the refill over
//! the time they ran, and the stored consumption counter must equal what they admitted.
//!
//! The test binary is its own worker (`harness = false`): run plainly it orchestrates, and
//! it re-runs itself with `ZAE_WORKER` set for each worker process.

use std::process::{Command, Stdio};
use std::time::Duration;

use zae_limiter::local::DynamoDbLocal;
use zae_limiter::{DynamoDbRepository, Error, Limit, RateLimiter};

const TABLE: &str = "zae-limiter-over-admission";
const ENTITY: &str = "hot-key";
const RESOURCE: &str = "api";
const PROCESSES: usize = 2;
const TASKS: usize = 32;
const RUN_MS: i64 = 4_000;

/// 20 burst, 10 a second: four seconds is four refill periods on top of the burst.
fn limit() -> Limit {
    Limit::custom("rps", 20, 10, 1)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    if let Ok(spec) = std::env::var("ZAE_WORKER") {
        runtime.block_on(worker(&spec));
    } else {
        println!("\nrunning 1 test");
        runtime.block_on(orchestrate());
        println!("test two_processes_never_over_admit ... ok\n");
        println!("test result: ok. 1 passed; 0 failed");
    }
}

async fn repo(endpoint: &str, namespace: &str) -> DynamoDbRepository {
    DynamoDbRepository::builder()
        .endpoint_url(endpoint)
        .table(TABLE)
        .namespace(namespace)
        .timeout(Duration::from_secs(10))
        .build()
        .await
        .expect("open the repository")
}

/// One worker process: `TASKS` tasks acquire and commit until the deadline; prints how many
/// it admitted and the first start and last end of an admitted acquire.
async fn worker(spec: &str) {
    let parts: Vec<&str> = spec.split(',').collect();
    let (endpoint, namespace, start_at) = (parts[0], parts[1], parts[2].parse::<i64>().unwrap());
    let limiter = RateLimiter::new(repo(endpoint, namespace).await);
    let wait = start_at - now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    let deadline = start_at + RUN_MS;
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let limiter = limiter.clone();
        tasks.push(tokio::spawn(async move {
            let (mut admitted, mut first, mut last) = (0u64, i64::MAX, i64::MIN);
            while now_ms() < deadline {
                let started = now_ms();
                match limiter.acquire(ENTITY, RESOURCE).await {
                    Ok(lease) => {
                        let ended = now_ms();
                        lease.commit().await.expect("commit");
                        admitted += 1;
                        first = first.min(started);
                        last = last.max(ended);
                    }
                    Err(Error::RateLimited(e)) => {
                        let pause = e.retry_after().min(Duration::from_millis(50));
                        tokio::time::sleep(pause).await;
                    }
                    Err(e) => panic!("worker acquire failed: {e}"),
                }
            }
            (admitted, first, last)
        }));
    }
    let (mut admitted, mut first, mut last) = (0, i64::MAX, i64::MIN);
    for t in tasks {
        let (a, f, l) = t.await.unwrap();
        admitted += a;
        first = first.min(f);
        last = last.max(l);
    }
    println!("{admitted} {first} {last}");
}

async fn orchestrate() {
    let (_local, endpoint) = match std::env::var("ZAE_DYNAMODB_ENDPOINT") {
        Ok(url) => (None, url),
        Err(_) => {
            let local = DynamoDbLocal::start()
                .await
                .unwrap_or_else(|e| panic!("DynamoDB Local is needed for this test: {e}"));
            let url = local.endpoint_url().to_string();
            (Some(local), url)
        }
    };
    let namespace = format!("over-{}", std::process::id());
    let setup = RateLimiter::new(repo(&endpoint, &namespace).await);
    setup
        .set_entity_limits(ENTITY, RESOURCE, &[limit()])
        .await
        .unwrap();

    let start_at = now_ms() + 2_000;
    let exe = std::env::current_exe().unwrap();
    let workers: Vec<_> = (0..PROCESSES)
        .map(|_| {
            Command::new(&exe)
                .env("ZAE_WORKER", format!("{endpoint},{namespace},{start_at}"))
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap()
        })
        .collect();
    let (mut admitted, mut first, mut last) = (0u64, i64::MAX, i64::MIN);
    for w in workers {
        let out = w.wait_with_output().unwrap();
        assert!(out.status.success(), "a worker failed: {}", out.status);
        let text = String::from_utf8(out.stdout).unwrap();
        let nums: Vec<i64> = text
            .split_whitespace()
            .map(|n| n.parse().unwrap())
            .collect();
        admitted += nums[0] as u64;
        first = first.min(nums[1]);
        last = last.max(nums[2]);
    }
    let l = limit();
    let span = (last - first).max(0) as u64;
    // Capacity plus the refill over the span between the first admitted acquire's start
    // and the last one's end (rounded up).
    let bound = l.capacity + (l.refill_amount * span).div_ceil(l.refill_period_seconds * 1000);
    let states = setup.bucket_states(ENTITY, RESOURCE).await.unwrap();
    let tc = states["rps"].total_consumed_milli;
    println!(
        "{PROCESSES} processes x {TASKS} tasks: admitted {admitted} over {span} ms (bound {bound}), tc {tc}"
    );
    assert!(admitted <= bound, "over-admission: {admitted} > {bound}");
    assert!(
        admitted >= l.capacity + l.refill_amount * 2,
        "the run is too short to prove anything: {admitted} admitted"
    );
    assert_eq!(
        tc,
        admitted as i64 * 1000,
        "tc equals the admitted total exactly"
    );
}
