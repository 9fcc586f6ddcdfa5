//! `loadtest`: many tasks acquire and commit against the table (or memory) for a while,
//! with a live progress bar; then throughput, admitted/rejected counts, latency
//! percentiles (HDR histogram) and DynamoDB calls per acquire.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng;
use serde_json::json;
use zae_limiter::repository::dynamodb::CallCounter;
use zae_limiter::{Error, InMemoryRepository, Limit, RateLimiter};

use crate::args::{Global, LoadtestArgs};
use crate::connect;
use crate::failure::{Failure, Outcome};
use crate::output::Out;

/// The limits used when neither `-l` nor stored limits give any.
fn default_limits() -> Vec<Limit> {
    vec![Limit::per_minute("rpm", 600)]
}

#[derive(Default)]
struct Counts {
    admitted: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
}

impl Counts {
    fn total(&self) -> u64 {
        self.admitted.load(Ordering::Relaxed)
            + self.rejected.load(Ordering::Relaxed)
            + self.errors.load(Ordering::Relaxed)
    }
}

pub async fn run(global: &Global, args: LoadtestArgs, out: Out) -> Outcome {
    if args.concurrency == 0 || args.entities == 0 {
        return Err(Failure::bad_arguments(
            "--concurrency and --entities must be at least 1",
        ));
    }
    if args.duration.is_zero() {
        return Err(Failure::bad_arguments("--duration must be longer than 0s"));
    }
    zae_limiter::naming::validate_resource(&args.resource)?;
    let counter = CallCounter::new();
    let limiter = if args.memory {
        RateLimiter::new(InMemoryRepository::new())
    } else {
        let repo = connect::builder(global)
            .call_counter(counter.clone())
            .connect()
            .await?;
        RateLimiter::new(repo)
    };
    counter.reset();
    let explicit = !args.limits.is_empty();
    let limits: Arc<[Limit]> = if explicit {
        args.limits.clone().into()
    } else {
        default_limits().into()
    };
    let counts = Arc::new(Counts::default());
    let first_error: Arc<parking_lot::Mutex<Option<String>>> = Arc::default();
    // Warm-up runs the same load unmeasured (first touches: config reads, item creation).
    let started = Instant::now() + args.warmup;
    let deadline = started + args.duration;
    let stop = Arc::new(tokio::sync::Notify::new());

    let mut tasks = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        let limiter = limiter.clone();
        let limits = Arc::clone(&limits);
        let counts = Arc::clone(&counts);
        let first_error = Arc::clone(&first_error);
        let resource = args.resource.clone();
        let entities = args.entities;
        let stopped = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut histogram =
                Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
            for round in 0u64.. {
                if Instant::now() >= deadline {
                    break;
                }
                // An in-memory acquire never waits, so it never gives the runtime back:
                // yield now and then, or the progress bar and timers would stall.
                if round % 64 == 63 {
                    tokio::task::yield_now().await;
                }
                let entity = format!("lt-{}", rand::rng().random_range(0..entities));
                let begun = Instant::now();
                let acquire = limiter.acquire(entity, resource.as_str());
                let acquire = if explicit {
                    acquire.shared_limits(Arc::clone(&limits))
                } else {
                    acquire.shared_fallback_limits(Arc::clone(&limits))
                };
                let result = tokio::select! {
                    r = acquire => r,
                    () = stopped.notified() => break,
                };
                let outcome = match result {
                    Ok(lease) => lease.commit().await.map(|()| true),
                    Err(e) => Err(e),
                };
                if begun < started {
                    continue;
                }
                let micros = u64::try_from(begun.elapsed().as_micros()).unwrap_or(u64::MAX);
                let _ = histogram.record(micros.clamp(1, 60_000_000));
                match outcome {
                    Ok(_) => counts.admitted.fetch_add(1, Ordering::Relaxed),
                    Err(Error::RateLimited(_)) => counts.rejected.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        first_error.lock().get_or_insert_with(|| e.to_string());
                        counts.errors.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            histogram
        }));
    }

    if !args.warmup.is_zero() {
        let warming = ProgressBar::new_spinner();
        warming.set_message(format!("warming up for {:?}", args.warmup));
        warming.enable_steady_tick(Duration::from_millis(100));
        tokio::select! {
            () = tokio::time::sleep_until(started.into()) => {}
            _ = tokio::signal::ctrl_c() => stop.notify_waiters(),
        }
        warming.finish_and_clear();
        // Calls made during warm-up are not counted (nor are those of an acquire still in
        // flight at its end, at most one per task).
        counter.reset();
    }
    let bar = ProgressBar::new(args.duration.as_secs().max(1));
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len}s {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    loop {
        let elapsed = Instant::now().saturating_duration_since(started);
        bar.set_position(elapsed.as_secs().min(args.duration.as_secs()));
        let done = counts.total();
        bar.set_message(format!(
            "{done} acquires ({:.0}/s), {} admitted, {} rejected, {} errors",
            done as f64 / elapsed.as_secs_f64().max(0.001),
            counts.admitted.load(Ordering::Relaxed),
            counts.rejected.load(Ordering::Relaxed),
            counts.errors.load(Ordering::Relaxed),
        ));
        if Instant::now() >= deadline {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = tokio::signal::ctrl_c() => {
                stop.notify_waiters();
                break;
            }
        }
    }
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
    for task in tasks {
        if let Ok(h) = task.await {
            let _ = histogram.add(h);
        }
    }
    bar.finish_and_clear();
    let elapsed = Instant::now()
        .saturating_duration_since(started)
        .as_secs_f64();
    let total = counts.total();
    let calls = counter.total();
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let calls_per_acquire = (!args.memory && total > 0).then(|| calls as f64 / total as f64);
    let limits_text = if explicit {
        limits
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        format!(
            "stored, else {}",
            limits
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    out.record(vec![
        (
            "backend",
            json!(if args.memory {
                "memory".to_string()
            } else {
                format!("dynamodb table {}", global.table)
            }),
        ),
        ("duration_s", json!(round(elapsed))),
        ("warmup_s", json!(args.warmup.as_secs_f64())),
        ("concurrency", json!(args.concurrency)),
        ("entities", json!(args.entities)),
        ("limits", json!(limits_text)),
        ("acquires", json!(total)),
        (
            "throughput_per_s",
            json!(round(total as f64 / elapsed.max(0.001))),
        ),
        ("admitted", json!(counts.admitted.load(Ordering::Relaxed))),
        ("rejected", json!(counts.rejected.load(Ordering::Relaxed))),
        ("errors", json!(counts.errors.load(Ordering::Relaxed))),
        ("first_error", json!(first_error.lock().clone())),
        ("latency_p50_ms", json!(ms(0.50))),
        ("latency_p90_ms", json!(ms(0.90))),
        ("latency_p99_ms", json!(ms(0.99))),
        ("latency_p999_ms", json!(ms(0.999))),
        ("latency_max_ms", json!(histogram.max() as f64 / 1000.0)),
        (
            "dynamodb_calls",
            if args.memory {
                json!(null)
            } else {
                json!(counter.snapshot())
            },
        ),
        (
            "dynamodb_calls_per_acquire",
            json!(calls_per_acquire.map(round)),
        ),
    ]);
    Ok(())
}
