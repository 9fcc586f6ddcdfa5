//! In-memory acquire + commit, on one hot key and over 10,000 keys, against governor's
//! keyed in-process limiter doing the same checks, measured side by side.
//!
//! `cargo bench --bench limiter`

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
    // A quota never reached: this measures the cost of a decision, not of rejections.
    let limits = [Limit::per_second("rps", 1_000_000_000)];
    let keys: Vec<String> = (0..KEYS).map(|i| format!("key-{i}")).collect();
    let quota = Quota::per_second(NonZeroU32::new(1_000_000_000).unwrap());
    let governor = Governor::keyed(quota);

    let mut g = c.benchmark_group("limiter");
    g.bench_function("zae acquire+commit, 1 key", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let lease = limiter
                        .acquire("hot", "api")
                        .limits(limits.clone())
                        .await
                        .unwrap();
                    lease.commit().await.unwrap();
                }
                let e = start.elapsed();
                support::record("zae acquire+commit, 1 key", e, iters);
                e
            })
        })
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
                        .limits(limits.clone())
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
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
    support::report(
        "in-memory limiter vs governor (keyed)",
        &[
            ("zae acquire+commit, 1 key", "governor check_key, 1 key"),
            (
                "zae acquire+commit, 10k keys",
                "governor check_key, 10k keys",
            ),
        ],
    );
}
