//! Shared by the benches: time each subject with criterion, keep the mean per iteration,
//! and print ratios against the alternative measured in the same run.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::Request;
use tower_governor::key_extractor::KeyExtractor;
use tower_governor::GovernorError;

static MEANS: Mutex<BTreeMap<String, (Duration, u64)>> = Mutex::new(BTreeMap::new());

/// Runs `f` `iters` times, records the time under `name`, and returns it (for
/// `Bencher::iter_custom`).
pub fn timed(name: &str, iters: u64, mut f: impl FnMut()) -> Duration {
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    let elapsed = start.elapsed();
    record(name, elapsed, iters);
    elapsed
}

/// Records `elapsed` for `iters` iterations of `name`.
pub fn record(name: &str, elapsed: Duration, iters: u64) {
    let mut m = MEANS.lock().unwrap();
    let e = m.entry(name.to_string()).or_default();
    e.0 += elapsed;
    e.1 += iters;
}

/// Mean nanoseconds per iteration of `name` over everything recorded.
pub fn mean_ns(name: &str) -> f64 {
    let m = MEANS.lock().unwrap();
    let (t, n) = m.get(name).copied().unwrap_or_default();
    t.as_nanos() as f64 / n.max(1) as f64
}

/// The median of `v` (sorted in place).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The cores this machine offers (2 where it cannot tell).
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Runs `work(t)` on every core at once, one thread each (`t` numbers the thread), and
/// returns the aggregate nanoseconds per operation for `ops_per_thread` operations each.
pub fn on_every_core(ops_per_thread: usize, work: &(dyn Fn(usize) + Sync)) -> f64 {
    let threads = cores();
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            s.spawn(move || work(t));
        }
    });
    start.elapsed().as_nanos() as f64 / (threads * ops_per_thread) as f64
}

/// Prints one line per pair: the subject's and the alternative's mean and their ratio.
pub fn report(title: &str, pairs: &[(&str, &str)]) {
    println!("\n== {title} (means over every criterion sample of this run) ==");
    println!(
        "{:<44} {:>12} {:<36} {:>12} {:>8}",
        "subject", "ns/op", "alternative", "ns/op", "ratio"
    );
    for (subject, alt) in pairs {
        let (s, a) = (mean_ns(subject), mean_ns(alt));
        println!(
            "{subject:<44} {s:>12.1} {alt:<36} {a:>12.1} {:>7.2}x",
            s / a
        );
    }
}

/// tower_governor keyed by the same `x-api-key` header as the zae layer in the benches.
#[derive(Clone)]
pub struct ApiKey;

impl KeyExtractor for ApiKey {
    type Key = String;
    fn extract<T>(&self, req: &Request<T>) -> Result<String, GovernorError> {
        req.headers()
            .get("x-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or(GovernorError::UnableToExtractKey)
    }
}
