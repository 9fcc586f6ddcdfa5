//! In-memory acquire + commit, on one hot key and over 10,000 keys, against governor's
//! keyed in-process limiter doing the same checks, measured side by side.
//!
//! `cargo bench --bench limiter` (`--features metrics` adds the loop with a metrics
//! recorder installed)

mod support;

use std::hint::black_box;
use std::num::NonZeroU32;

use criterion::Criterion;
use governor::{Quota, RateLimiter as Governor};
use zae_limiter::{InMemoryRepository, Limit, RateLimiter};

const KEYS: usize = 10_000;

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let limiter = RateLimiter::new(InMemoryRepository::new());
    // A quota never reached: this measures the cost of a decision, not of rejections. The
    // list is shared, as the HTTP layer shares its limits: building a list per call is
    // the caller's cost, not the limiter's.
    let limits: std::sync::Arc<[Limit]> = [Limit::per_second("rps", 1_000_000_000)].into();
    let keys: Vec<String> = (0..KEYS).map(|i| format!("key-{i}")).collect();
    let quota = Quota::per_second(NonZeroU32::new(1_000_000_000).unwrap());
    let governor = Governor::keyed(quota);

    let mut g = c.benchmark_group("limiter");
    g.bench_function("zae acquire+commit, 1 key", |b| {
        hot_key(b, &rt, &limiter, &limits, "zae acquire+commit, 1 key")
    });
    g.bench_function("governor check_key, 1 key", |b| {
        let key = "hot".to_string();
        b.iter_custom(|iters| {
            support::timed("governor check_key, 1 key", iters, || {
                black_box(governor.check_key(&key).is_ok());
            })
        })
    });
    g.bench_function("zae acquire+commit, 10k keys", |b| {
        let mut i = 0;
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    i = (i + 1) % KEYS;
                    let lease = limiter
                        .acquire(keys[i].as_str(), "api")
                        .shared_limits(limits.clone())
                        .await
                        .unwrap();
                    lease.commit().await.unwrap();
                }
                let e = start.elapsed();
                support::record("zae acquire+commit, 10k keys", e, iters);
                e
            })
        })
    });
    g.bench_function("governor check_key, 10k keys", |b| {
        let mut i = 0;
        b.iter_custom(|iters| {
            support::timed("governor check_key, 10k keys", iters, || {
                i = (i + 1) % KEYS;
                black_box(governor.check_key(&keys[i]).is_ok());
            })
        })
    });
    // With `--features metrics`: the same loop through a limiter whose handles record
    // into an installed recorder (metrics-util's, atomic counters as an exporter's are).
    // The limiter above served its first request before the recorder was installed, so
    // it keeps no-op handles: both run in this one process.
    #[cfg(feature = "metrics")]
    {
        metrics_util::debugging::DebuggingRecorder::new()
            .install()
            .expect("no recorder installed yet");
        let recorded = RateLimiter::new(InMemoryRepository::new());
        let label = "zae acquire+commit, 1 key, metrics recorder";
        g.bench_function(label, |b| hot_key(b, &rt, &recorded, &limits, label));
    }
    g.finish();
}

/// Acquire + commit on one key in a loop, recorded under `label`.
fn hot_key(
    b: &mut criterion::Bencher,
    rt: &tokio::runtime::Runtime,
    limiter: &RateLimiter,
    limits: &std::sync::Arc<[Limit]>,
    label: &'static str,
) {
    b.iter_custom(|iters| {
        rt.block_on(async {
            let start = std::time::Instant::now();
            for _ in 0..iters {
                let lease = limiter
                    .acquire("hot", "api")
                    .shared_limits(limits.clone())
                    .await
                    .unwrap();
                lease.commit().await.unwrap();
            }
            let e = start.elapsed();
            support::record(label, e, iters);
            e
        })
    })
}

/// `ops` acquires and commits, cycling through `keys`, each on the shared `limits`.
async fn acquire_and_commit(
    limiter: &RateLimiter,
    limits: &std::sync::Arc<[Limit]>,
    keys: &[String],
    ops: usize,
) {
    for i in 0..ops {
        let lease = limiter
            .acquire(keys[i % keys.len()].as_str(), "api")
            .shared_limits(limits.clone())
            .await
            .unwrap();
        lease.commit().await.unwrap();
    }
}

/// One thread, zae and governor taking turns on one key and on 10,000: `rounds` rounds of
/// `ops` decisions each, the median per subject. Criterion measures one subject after
/// another, so on a shared VM whose speed drifts its ratios move between runs; taking
/// turns puts both in the same conditions.
fn alternating(rounds: usize, ops: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let limiter = RateLimiter::new(InMemoryRepository::new());
    let limits: std::sync::Arc<[Limit]> = [Limit::per_second("rps", 1_000_000_000)].into();
    let governor = Governor::keyed(Quota::per_second(NonZeroU32::new(1_000_000_000).unwrap()));
    let keys: Vec<String> = (0..KEYS).map(|i| format!("key-{i}")).collect();
    let hot = ["hot".to_string()];
    let zae = |keys: &[String]| {
        let start = std::time::Instant::now();
        rt.block_on(acquire_and_commit(&limiter, &limits, keys, ops));
        start.elapsed().as_nanos() as f64 / ops as f64
    };
    let gov = |keys: &[String]| {
        let start = std::time::Instant::now();
        for i in 0..ops {
            black_box(governor.check_key(&keys[i % keys.len()]).is_ok());
        }
        start.elapsed().as_nanos() as f64 / ops as f64
    };
    let subjects: [(&str, &dyn Fn() -> f64); 4] = [
        ("zae acquire+commit, 1 key", &|| zae(&hot)),
        ("governor check_key, 1 key", &|| gov(&hot)),
        ("zae acquire+commit, 10k keys", &|| zae(&keys)),
        ("governor check_key, 10k keys", &|| gov(&keys)),
    ];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); subjects.len()];
    for (_, run) in &subjects {
        run();
    }
    for _ in 0..rounds {
        for (at, (_, run)) in subjects.iter().enumerate() {
            times[at].push(run());
        }
    }
    let m: Vec<f64> = times.iter_mut().map(|t| support::median(t)).collect();
    println!("\n== one thread, taking turns ({rounds} rounds of {ops} decisions; medians) ==");
    for (name, ns) in subjects.iter().map(|(n, _)| n).zip(&m) {
        println!("{name:<38} {ns:>7.1} ns");
    }
    println!(
        "ratio on 1 key {:.2}x, on 10,000 keys {:.2}x",
        m[0] / m[1],
        m[2] / m[3]
    );
}

/// Resident memory of this process, in bytes (Linux).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Memory under many distinct keys: a million one-off keys through each limiter, then
/// idle eviction (zae, by its idle TTL; governor, by `retain_recent`).
fn memory(keys: usize) {
    use std::time::Duration;
    use zae_limiter::clock::ManualClock;

    // governor first, and kept alive: memory freed by one side is not reused by the other.
    let governor = Governor::keyed(Quota::per_second(NonZeroU32::new(10).unwrap()));
    let before = rss_bytes();
    for i in 0..keys {
        let _ = governor.check_key(&format!("ip-{i}"));
    }
    let gov_per_key = rss_bytes().saturating_sub(before) as f64 / keys as f64;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let limits = [Limit::per_second("rps", 10)];
    let repo = InMemoryRepository::builder().sweep_interval(None).build();
    let clock = ManualClock::new(1_700_000_000_000);
    let limiter = RateLimiter::builder(repo.clone())
        .clock(clock.clone())
        .build();
    let before = rss_bytes();
    rt.block_on(async {
        for i in 0..keys {
            let lease = limiter
                .acquire(format!("ip-{i}"), "api")
                .limits(limits.clone())
                .await
                .unwrap();
            lease.commit().await.unwrap();
        }
    });
    let full = rss_bytes();
    let held = repo.len();
    clock.advance(Duration::from_secs(8));
    rt.block_on(async {
        limiter
            .acquire("tick", "api")
            .limits(limits.clone())
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
    });
    let evicted = repo.evict_idle();
    let zae_per_key = full.saturating_sub(before) as f64 / keys as f64;

    println!("\n== memory under {keys} distinct keys ==");
    println!(
        "zae in-memory: {held} items, {:.0} bytes/key resident; {evicted} evicted once idle 7 x time to fill, {} left",
        zae_per_key,
        repo.len()
    );
    println!(
        "governor keyed: {:.0} bytes/key resident (until retain_recent)",
        gov_per_key
    );
    println!(
        "ratio zae / governor bytes per key: {:.2}",
        zae_per_key / gov_per_key.max(1.0)
    );
}

/// Every core at once, each thread on keys of its own (as a multi-threaded server's
/// workers are): aggregate nanoseconds per decision, zae acquire + commit against
/// governor `check_key`, each run alone. What threads share here (reference counts,
/// map shards) is what stops a limiter scaling with cores.
fn threads(ops_per_thread: usize) {
    let threads = support::cores();
    let limiter = RateLimiter::new(InMemoryRepository::new());
    let limits: std::sync::Arc<[Limit]> = [Limit::per_second("rps", 1_000_000_000)].into();
    let governor = std::sync::Arc::new(Governor::keyed(Quota::per_second(
        NonZeroU32::new(1_000_000_000).unwrap(),
    )));
    let keys = |t: usize| -> Vec<String> { (0..1_000).map(|i| format!("t{t}-key-{i}")).collect() };
    let run = |work: &(dyn Fn(usize) + Sync)| support::on_every_core(ops_per_thread, work);
    let zae = |t: usize| {
        let keys = keys(t);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(acquire_and_commit(&limiter, &limits, &keys, ops_per_thread))
    };
    let gov = |t: usize| {
        let keys = keys(t);
        for i in 0..ops_per_thread {
            black_box(governor.check_key(&keys[i % keys.len()]).is_ok());
        }
    };
    // Warm both (keys created, code paged in), then measure each three times, alternating.
    run(&zae);
    run(&gov);
    let (mut z, mut g) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        z.push(run(&zae));
        g.push(run(&gov));
    }
    let (z, g) = (support::median(&mut z), support::median(&mut g));
    println!("\n== {threads} threads at once, 1,000 keys each (aggregate ns per decision, median of 3) ==");
    println!(
        "zae acquire+commit {z:.1} ns, governor check_key {g:.1} ns, ratio {:.2}x",
        z / g
    );
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
    // `cargo test --benches` runs in test mode: keep that quick.
    let quick = std::env::args().any(|a| a == "--test");
    // Under `--profile-time` (perf, flamegraphs) only the profiled function runs.
    if std::env::args().any(|a| a == "--profile-time") {
        return;
    }
    alternating(
        if quick { 1 } else { 15 },
        if quick { 10_000 } else { 500_000 },
    );
    memory(if quick { 10_000 } else { 1_000_000 });
    threads(if quick { 10_000 } else { 1_000_000 });
    support::report(
        "in-memory limiter vs governor (keyed)",
        &[
            ("zae acquire+commit, 1 key", "governor check_key, 1 key"),
            (
                "zae acquire+commit, 10k keys",
                "governor check_key, 10k keys",
            ),
            #[cfg(feature = "metrics")]
            (
                "zae acquire+commit, 1 key, metrics recorder",
                "zae acquire+commit, 1 key",
            ),
        ],
    );
}
