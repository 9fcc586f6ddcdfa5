//! This crate against the Python zae-limiter it follows (0.17.0 from PyPI, in a throwaway
//! virtual environment), on the same DynamoDB Local with the same workload: acquire +
//! commit from N tasks over 1,000 entities for a fixed time, after the same unmeasured
//! warm-up. Prints the ratio of throughput and of client CPU time per acquire (getrusage of
//! each client process, over the measured window only), and, for scale, the CPU time one
//! raw `UpdateItem` costs through the same SDK client.
//!
//! Both clients are single-threaded event loops: asyncio for Python, a current-thread tokio
//! runtime for Rust.
//!
//! ```text
//! cargo bench --bench python_comparison
//! ZAE_BENCH_SECONDS=10 ZAE_BENCH_CONCURRENCY=32 cargo bench --bench python_comparison
//! # one hot key, this crate with reservations
//! ZAE_BENCH_ENTITIES=1 ZAE_BENCH_RESERVATIONS=strict cargo bench --bench python_comparison
//! ```
//!
//! Needs python3 with venv and pip, and network access to PyPI. DynamoDB Local is started
//! afresh for each measured run. It caps both clients on a small machine, so the
//! throughput ratio says less than the CPU ratio.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use zae_limiter::local::DynamoDbLocal;
use zae_limiter::{DynamoDbRepository, Limit, RateLimiter};

#[path = "support/process.rs"]
mod process;
#[path = "support/raw.rs"]
mod raw;

use process::{cpu_seconds, env_or};

const PYTHON_PACKAGE: &str = "zae-limiter==0.17.0";
const TABLE: &str = "zae-compare";
const RESOURCE: &str = "bench";

/// What one client process reports.
#[derive(serde::Deserialize, Debug)]
struct Report {
    acquires: u64,
    seconds: f64,
    cpu_seconds: f64,
}

impl Report {
    fn per_second(&self) -> f64 {
        self.acquires as f64 / self.seconds
    }
    fn cpu_ms_per_acquire(&self) -> f64 {
        self.cpu_seconds * 1000.0 / self.acquires.max(1) as f64
    }
}

/// What the Rust client drives.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// Acquire + commit through the limiter.
    Limiter,
    /// The raw conditional `UpdateItem` the hot path is made of, through the same client.
    RawUpdateItem,
}

async fn one(load: Load, limiter: &RateLimiter, repo: &DynamoDbRepository, entity: String) {
    match load {
        Load::Limiter => limiter
            .acquire(entity, RESOURCE)
            .limits([Limit::per_minute("rpm", 1_000_000_000)])
            .await
            .unwrap()
            .commit()
            .await
            .unwrap(),
        Load::RawUpdateItem => raw::update_item(repo, &entity, RESOURCE).await,
    }
}

/// Runs `load` from `tasks` tasks until `deadline`; returns how many completed.
async fn drive(
    load: Load,
    limiter: &RateLimiter,
    repo: &DynamoDbRepository,
    tasks: usize,
    entities: usize,
    deadline: Instant,
) -> u64 {
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (limiter, repo) = (limiter.clone(), repo.clone());
        handles.push(tokio::spawn(async move {
            let (mut n, mut done) = (t, 0u64);
            while Instant::now() < deadline {
                one(load, &limiter, &repo, format!("e{}", n % entities)).await;
                done += 1;
                n += tasks;
            }
            done
        }));
    }
    let mut done = 0;
    for h in handles {
        done += h.await.unwrap();
    }
    done
}

/// The Rust client: the same workload as `benches/python/zae_client.py`.
async fn rust_client(
    load: Load,
    endpoint: &str,
    tasks: usize,
    seconds: f64,
    entities: usize,
    warmup: f64,
) -> Report {
    let repo = DynamoDbRepository::builder()
        .endpoint_url(endpoint)
        .table(TABLE)
        .timeout(Duration::from_secs(10))
        .build()
        .await
        .expect("open the repository");
    // `ZAE_BENCH_RESERVATIONS=strict|relaxed`: the Rust client admits hot keys from
    // node-local slices (the hot-key variant: `ZAE_BENCH_ENTITIES=1`).
    let limiter = match std::env::var("ZAE_BENCH_RESERVATIONS").as_deref() {
        Ok("strict") => RateLimiter::builder(repo.clone())
            .reservations(zae_limiter::reservations::Reservations::adaptive())
            .build(),
        Ok("relaxed") => RateLimiter::builder(repo.clone())
            .reservations(zae_limiter::reservations::Reservations::adaptive().strict(false))
            .build(),
        _ => RateLimiter::new(repo.clone()),
    };
    for e in 0..entities {
        one(Load::Limiter, &limiter, &repo, format!("e{e}")).await;
    }
    let warm = Instant::now() + Duration::from_secs_f64(warmup);
    drive(load, &limiter, &repo, tasks, entities, warm).await;
    let cpu0 = cpu_seconds();
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let acquires = drive(load, &limiter, &repo, tasks, entities, deadline).await;
    Report {
        acquires,
        seconds: start.elapsed().as_secs_f64(),
        cpu_seconds: cpu_seconds() - cpu0,
    }
}

/// A virtual environment with the Python library, removed when dropped.
struct Venv(PathBuf);

impl Venv {
    fn create() -> Venv {
        let dir = std::env::temp_dir().join(format!("zae-python-compare-{}", std::process::id()));
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&dir)
            .status()
            .expect("python3 is needed for this comparison");
        assert!(ok.success(), "python3 -m venv failed");
        let ok = Command::new(dir.join("bin/pip"))
            .args([
                "install",
                "--quiet",
                "--disable-pip-version-check",
                PYTHON_PACKAGE,
            ])
            .status()
            .expect("pip");
        assert!(ok.success(), "pip install {PYTHON_PACKAGE} failed");
        Venv(dir)
    }

    fn python(&self) -> PathBuf {
        self.0.join("bin/python")
    }
}

impl Drop for Venv {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn parse(output: std::process::Output, who: &str) -> Report {
    assert!(
        output.status.success(),
        "{who} client failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{who} client printed {text:?}: {e}"))
}

fn run_python(
    venv: &Venv,
    endpoint: &str,
    tasks: usize,
    seconds: f64,
    entities: usize,
    warmup: f64,
) -> Report {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/python/zae_client.py");
    let output = Command::new(venv.python())
        .arg(script)
        .args([
            endpoint,
            TABLE,
            &tasks.to_string(),
            &seconds.to_string(),
            &entities.to_string(),
            &warmup.to_string(),
        ])
        .env("AWS_ACCESS_KEY_ID", "zaecompare")
        .env("AWS_SECRET_ACCESS_KEY", "local")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .output()
        .expect("run the Python client");
    parse(output, "Python")
}

fn run_rust(
    raw: bool,
    endpoint: &str,
    tasks: usize,
    seconds: f64,
    entities: usize,
    warmup: f64,
) -> Report {
    let output = Command::new(std::env::current_exe().unwrap())
        .env(
            "ZAE_RUST_CLIENT",
            format!("{raw},{endpoint},{tasks},{seconds},{entities},{warmup}"),
        )
        .output()
        .expect("run the Rust client");
    parse(output, "Rust")
}

fn main() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Ok(spec) = std::env::var("ZAE_RUST_CLIENT") {
        let p: Vec<&str> = spec.split(',').collect();
        let load = if p[0] == "true" {
            Load::RawUpdateItem
        } else {
            Load::Limiter
        };
        let report = runtime.block_on(rust_client(
            load,
            p[1],
            p[2].parse().unwrap(),
            p[3].parse().unwrap(),
            p[4].parse().unwrap(),
            p[5].parse().unwrap(),
        ));
        println!(
            "{}",
            serde_json::json!({"acquires": report.acquires, "seconds": report.seconds, "cpu_seconds": report.cpu_seconds})
        );
        return;
    }
    let seconds: f64 = env_or("ZAE_BENCH_SECONDS", 5.0);
    let entities: usize = env_or("ZAE_BENCH_ENTITIES", 1000);
    let warmup: f64 = env_or("ZAE_BENCH_WARMUP_SECONDS", 10.0);
    let concurrency: Vec<usize> = std::env::var("ZAE_BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "8,32".into())
        .split(',')
        .map(|c| c.trim().parse().expect("ZAE_BENCH_CONCURRENCY: numbers"))
        .collect();
    println!("installing {PYTHON_PACKAGE} into a throwaway virtual environment...");
    let venv = Venv::create();
    println!(
        "\n== Python zae-limiter 0.17.0 vs zae-limiter (Rust): acquire+commit over {entities} entities, {seconds} s per run, fresh DynamoDB Local per run =="
    );
    println!(
        "{:>6} | {:>10} {:>14} | {:>10} {:>14} | {:>16} {:>15} | {:>22}",
        "tasks",
        "py op/s",
        "py CPU ms/acq",
        "rs op/s",
        "rs CPU ms/acq",
        "throughput rs/py",
        "CPU/acq rs/py",
        "raw UpdateItem CPU ms"
    );
    for &tasks in &concurrency {
        let fresh = || {
            runtime
                .block_on(DynamoDbLocal::start())
                .expect("DynamoDB Local")
        };
        let python = {
            let local = fresh();
            run_python(
                &venv,
                local.endpoint_url(),
                tasks,
                seconds,
                entities,
                warmup,
            )
        };
        let rust = {
            let local = fresh();
            run_rust(
                false,
                local.endpoint_url(),
                tasks,
                seconds,
                entities,
                warmup,
            )
        };
        let raw = {
            let local = fresh();
            run_rust(true, local.endpoint_url(), tasks, seconds, entities, warmup)
        };
        println!(
            "{tasks:>6} | {:>10.0} {:>14.3} | {:>10.0} {:>14.3} | {:>15.2}x {:>14.4}x | {:>22.3}",
            python.per_second(),
            python.cpu_ms_per_acquire(),
            rust.per_second(),
            rust.cpu_ms_per_acquire(),
            rust.per_second() / python.per_second(),
            rust.cpu_ms_per_acquire() / python.cpu_ms_per_acquire(),
            raw.cpu_ms_per_acquire()
        );
    }
    println!("targets at 32 tasks: throughput at least 5x, CPU per acquire at most 0.05x");
}
