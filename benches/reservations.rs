//! Reservations on one hot key, on DynamoDB Local, from several OS processes: decisions a
//! second and DynamoDB calls per decision with reservations (strict and not) against
//! reservations off and against raw conditional `UpdateItem`s on the same item, all in one
//! run; then, with demand far above the limit, the most admitted in any window, each
//! process's share, `tc` once the slices are back; then the tokens lost when a process
//! holding slices is killed.
//!
//! ```text
//! cargo bench --bench reservations
//! ZAE_BENCH_SECONDS=5 ZAE_BENCH_TASKS=32 ZAE_BENCH_PROCESSES=2 cargo bench --bench reservations
//! ```
//!
//! Each scenario gets a freshly started DynamoDB Local (it slows down as writes pile up).
//! The coordinator runs each client process as this same binary with `ZAE_RSV_WORKER` set.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use zae_limiter::local::DynamoDbLocal;
use zae_limiter::repository::dynamodb::CallCounter;
use zae_limiter::reservations::Reservations;
use zae_limiter::{DynamoDbRepository, Error, Limit, RateLimiter};

#[path = "support/process.rs"]
mod process;
#[path = "support/raw.rs"]
mod raw;

use process::{cpu_seconds, env_or};

const TABLE: &str = "zae-rsv-bench";
const RESOURCE: &str = "bench";
const ENTITY: &str = "hot";

/// What a client process does.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Debug)]
enum Mode {
    Raw,
    Off,
    Strict,
    Relaxed,
}

/// A client process's orders.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Orders {
    mode: Mode,
    endpoint: String,
    tasks: usize,
    warmup: f64,
    seconds: f64,
    /// Where to append each admission's time (epoch ms), one line each, as it happens.
    log: Option<String>,
}

/// What a client process reports.
#[derive(Serialize, Deserialize, Debug, Default)]
struct Report {
    decisions: u64,
    admitted: u64,
    seconds: f64,
    cpu_seconds: f64,
    calls: u64,
}

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn open(endpoint: &str, calls: &CallCounter) -> DynamoDbRepository {
    DynamoDbRepository::builder()
        .endpoint_url(endpoint)
        .table(TABLE)
        .timeout(Duration::from_secs(10))
        .call_counter(calls.clone())
        .build()
        .await
        .expect("open the repository")
}

/// One client process: `tasks` tasks on the hot key until the deadline.
async fn worker(orders: Orders) -> Report {
    let calls = CallCounter::new();
    let repo = open(&orders.endpoint, &calls).await;
    let builder = RateLimiter::builder(repo.clone());
    let limiter = match orders.mode {
        Mode::Strict => builder.reservations(Reservations::adaptive()),
        Mode::Relaxed => builder.reservations(Reservations::adaptive().strict(false)),
        Mode::Raw | Mode::Off => builder,
    }
    .build();
    let log = orders.log.as_ref().map(|path| {
        Arc::new(parking_lot::Mutex::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("open the admission log"),
        ))
    });
    let run = |seconds: f64| {
        let deadline = Instant::now() + Duration::from_secs_f64(seconds);
        let decisions = Arc::new(AtomicU64::new(0));
        let admitted = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..orders.tasks)
            .map(|_| {
                let (limiter, repo, log) = (limiter.clone(), repo.clone(), log.clone());
                let (decisions, admitted) = (decisions.clone(), admitted.clone());
                let mode = orders.mode;
                tokio::spawn(async move {
                    while Instant::now() < deadline {
                        let ok = if mode == Mode::Raw {
                            raw::update_item(&repo, ENTITY, RESOURCE).await;
                            true
                        } else {
                            match limiter.acquire(ENTITY, RESOURCE).await {
                                Ok(lease) => {
                                    lease.commit().await.expect("commit");
                                    true
                                }
                                Err(Error::RateLimited(_)) => false,
                                Err(e) => panic!("{e}"),
                            }
                        };
                        decisions.fetch_add(1, Ordering::Relaxed);
                        if ok {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            if let Some(log) = &log {
                                writeln!(log.lock(), "{}", epoch_ms()).expect("log");
                            }
                        }
                    }
                })
            })
            .collect();
        async move {
            for h in handles {
                h.await.expect("task");
            }
            (
                decisions.load(Ordering::Relaxed),
                admitted.load(Ordering::Relaxed),
            )
        }
    };
    let (_, warm_admitted) = run(orders.warmup).await;
    let (cpu0, calls0, start) = (cpu_seconds(), calls.total(), Instant::now());
    let (decisions, admitted) = run(orders.seconds).await;
    let report = Report {
        decisions,
        admitted: admitted + warm_admitted,
        seconds: start.elapsed().as_secs_f64(),
        cpu_seconds: cpu_seconds() - cpu0,
        calls: calls.total() - calls0,
    };
    limiter
        .release_reservations()
        .await
        .expect("give the slices back");
    report
}

fn spawn_worker(orders: &Orders) -> Child {
    Command::new(std::env::current_exe().expect("this binary"))
        .env(
            "ZAE_RSV_WORKER",
            serde_json::to_string(orders).expect("orders"),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start a client process")
}

fn report_of(child: Child) -> Report {
    let output = child.wait_with_output().expect("client process");
    assert!(output.status.success(), "a client process failed");
    let text = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(text.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("client printed {text:?}: {e}"))
}

/// A fresh DynamoDB Local with the table, `limit` on the resource, and the hot item
/// written once (the raw `UpdateItem` needs it to exist).
async fn fresh(limit: &Limit) -> (DynamoDbLocal, DynamoDbRepository) {
    let local = DynamoDbLocal::start().await.expect("start DynamoDB Local");
    let repo = open(local.endpoint_url(), &CallCounter::new()).await;
    let limiter = RateLimiter::new(repo.clone());
    limiter
        .set_resource_limits(RESOURCE, std::slice::from_ref(limit))
        .await
        .expect("set the limit");
    limiter
        .acquire(ENTITY, RESOURCE)
        .await
        .expect("first acquire")
        .commit()
        .await
        .expect("commit");
    (local, repo)
}

async fn tc(repo: &DynamoDbRepository, limit: &str) -> i64 {
    let states = RateLimiter::new(repo.clone())
        .bucket_states(ENTITY, RESOURCE)
        .await
        .expect("read the bucket");
    states[limit].total_consumed_milli / 1000
}

/// Scenario 1: decisions a second on one hot key, every mode, same processes and tasks.
fn throughput(runtime: &tokio::runtime::Runtime, processes: usize, tasks: usize, seconds: f64) {
    println!(
        "\n== one hot key, {processes} processes x {tasks} tasks, {seconds} s each, fresh DynamoDB Local per mode =="
    );
    println!(
        "{:>10} | {:>12} {:>10} | {:>14} {:>15} | {:>12}",
        "mode", "decisions/s", "x raw", "calls/decision", "CPU ms/decision", "tc exact"
    );
    // Never reached: every request admitted, so this measures the cost of a decision.
    let limit = Limit::per_minute("rpm", 1_000_000_000);
    let mut raw_rate = None;
    for mode in [Mode::Raw, Mode::Off, Mode::Strict, Mode::Relaxed] {
        let (local, repo) = runtime.block_on(fresh(&limit));
        let before = runtime.block_on(tc(&repo, "rpm"));
        let orders = Orders {
            mode,
            endpoint: local.endpoint_url().to_string(),
            tasks,
            warmup: 1.0,
            seconds,
            log: None,
        };
        let children: Vec<Child> = (0..processes).map(|_| spawn_worker(&orders)).collect();
        let reports: Vec<Report> = children.into_iter().map(report_of).collect();
        let decisions: u64 = reports.iter().map(|r| r.decisions).sum();
        let admitted: u64 = reports.iter().map(|r| r.admitted).sum();
        let rate: f64 = reports.iter().map(|r| r.decisions as f64 / r.seconds).sum();
        let calls: u64 = reports.iter().map(|r| r.calls).sum();
        let cpu: f64 = reports.iter().map(|r| r.cpu_seconds).sum();
        let raw = *raw_rate.get_or_insert(rate);
        let exact = if mode == Mode::Raw {
            "-".to_string()
        } else {
            let counted = runtime.block_on(tc(&repo, "rpm")) - before;
            match counted - admitted as i64 {
                0 => "yes".to_string(),
                off => format!("off by {off}"),
            }
        };
        println!(
            "{:>10} | {:>12.0} {:>9.1}x | {:>14.6} {:>15.4} | {:>12}",
            format!("{mode:?}").to_lowercase(),
            rate,
            rate / raw,
            calls as f64 / decisions.max(1) as f64,
            cpu * 1000.0 / decisions.max(1) as f64,
            exact
        );
    }
    println!("targets: decisions/s at least 10x raw; at most 0.05 DynamoDB calls per decision");
}

/// The most admissions in any window of `window_ms` (sorted times).
fn most_in_window(times: &[i64], window_ms: i64) -> usize {
    let mut most = 0;
    let mut start = 0;
    for end in 0..times.len() {
        while times[end] - times[start] >= window_ms {
            start += 1;
        }
        most = most.max(end - start + 1);
    }
    most
}

fn read_times(path: &std::path::Path) -> Vec<i64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Scenario 2: demand far above the limit from every process; windows, shares, `tc`.
fn exactness(runtime: &tokio::runtime::Runtime, processes: usize, tasks: usize, seconds: f64) {
    // 1,000 at once, then 500 a second.
    let limit = Limit::custom("rps", 1_000, 500, 1);
    println!(
        "\n== demand far above the limit (capacity 1,000, 500/s), {processes} processes x {tasks} tasks, {seconds} s =="
    );
    for mode in [Mode::Off, Mode::Strict, Mode::Relaxed] {
        let (local, repo) = runtime.block_on(fresh(&limit));
        let before = runtime.block_on(tc(&repo, "rps"));
        let dir = std::env::temp_dir().join(format!("zae-rsv-{}-{mode:?}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("log folder");
        let logs: Vec<_> = (0..processes)
            .map(|p| dir.join(format!("p{p}.log")))
            .collect();
        let started = epoch_ms();
        let children: Vec<Child> = logs
            .iter()
            .map(|log| {
                spawn_worker(&Orders {
                    mode,
                    endpoint: local.endpoint_url().to_string(),
                    tasks,
                    warmup: 0.0,
                    seconds,
                    log: Some(log.display().to_string()),
                })
            })
            .collect();
        let reports: Vec<Report> = children.into_iter().map(report_of).collect();
        let ended = epoch_ms();
        let per_process: Vec<Vec<i64>> = logs.iter().map(|l| read_times(l)).collect();
        let mut all: Vec<i64> = per_process.iter().flatten().copied().collect();
        all.sort_unstable();
        let admitted = all.len() as i64;
        let counted = runtime.block_on(tc(&repo, "rps")) - before;
        // From the first admission (the processes take a moment to start) to the end.
        let first = all.first().copied().unwrap_or(started);
        let span_s = (ended - first) as f64 / 1000.0;
        let ceiling = 1_000.0 + 500.0 * span_s;
        print!("{:>8}: ", format!("{mode:?}").to_lowercase());
        for window_ms in [100, 1_000, 3_000] {
            let most = most_in_window(&all, window_ms);
            let allowed = 1_000 + 500 * window_ms / 1_000 + 1;
            print!("max in {window_ms} ms {most} (allowed {allowed}); ");
        }
        let shares: Vec<String> = per_process
            .iter()
            .map(|p| format!("{:.0}%", 100.0 * p.len() as f64 / admitted.max(1) as f64))
            .collect();
        let decisions: u64 = reports.iter().map(|r| r.decisions).sum();
        println!(
            "admitted {admitted} = {:.1}% of capacity + refill ({ceiling:.0}); shares {}; tc {} ({}); {decisions} decisions",
            100.0 * admitted as f64 / ceiling,
            shares.join(" / "),
            counted,
            if counted == admitted { "exact" } else { "NOT exact" }
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("targets: no window above capacity + refill; total at least 95%; no process below 40%; tc exact");
}

/// Scenario 3: a process holding slices is killed; what its slices cost.
fn crash(runtime: &tokio::runtime::Runtime, tasks: usize) {
    // Demand (two processes, paced by the table) below 5,000 a second: slices are held.
    let limit = Limit::per_second("rps", 5_000);
    let (local, repo) = runtime.block_on(fresh(&limit));
    let before = runtime.block_on(tc(&repo, "rps"));
    let dir = std::env::temp_dir().join(format!("zae-rsv-crash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("log folder");
    let (log_a, log_b) = (dir.join("a.log"), dir.join("b.log"));
    let orders = |log: &std::path::Path, seconds: f64| Orders {
        mode: Mode::Strict,
        endpoint: local.endpoint_url().to_string(),
        tasks,
        warmup: 0.0,
        seconds,
        log: Some(log.display().to_string()),
    };
    let mut a = spawn_worker(&orders(&log_a, 30.0));
    let b = spawn_worker(&orders(&log_b, 4.0));
    std::thread::sleep(Duration::from_secs(2));
    a.kill().expect("kill the client process");
    let _ = a.wait();
    report_of(b);
    let admitted = (read_times(&log_a).len() + read_times(&log_b).len()) as i64;
    let counted = runtime.block_on(tc(&repo, "rps")) - before;
    // A tenth of the capacity, the default `max_fraction`.
    let bound = 5_000 / 10;
    println!(
        "\n== a process killed while holding slices (capacity 5,000, strict) ==\nadmitted {admitted}, tc {counted}: {} tokens lost with the killed process (bound: its slice, at most {bound})",
        counted - admitted
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    if let Ok(orders) = std::env::var("ZAE_RSV_WORKER") {
        let orders: Orders = serde_json::from_str(&orders).expect("orders");
        let report = runtime.block_on(worker(orders));
        println!("{}", serde_json::to_string(&report).expect("report"));
        return;
    }
    // `cargo test --benches` runs this in test mode: nothing to measure there.
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return;
    }
    let processes: usize = env_or("ZAE_BENCH_PROCESSES", 2);
    let tasks: usize = env_or("ZAE_BENCH_TASKS", 32);
    let seconds: f64 = env_or("ZAE_BENCH_SECONDS", 5.0);
    let scenarios = std::env::var("ZAE_BENCH_SCENARIOS")
        .unwrap_or_else(|_| "throughput,exactness,crash".into());
    if scenarios.contains("throughput") {
        throughput(&runtime, processes, tasks, seconds);
    }
    if scenarios.contains("exactness") {
        exactness(&runtime, processes, tasks, seconds);
    }
    if scenarios.contains("crash") {
        crash(&runtime, tasks);
    }
}
