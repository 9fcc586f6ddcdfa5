//! Bucket arithmetic: `bucket::try_consume` against governor's GCRA decision for one
//! in-process limiter, measured side by side. Target: under 50 ns per `try_consume`.
//!
//! `cargo bench --bench bucket`

mod support;

use std::hint::black_box;
use std::num::NonZeroU32;

use criterion::Criterion;
use governor::{Quota, RateLimiter as Governor};
use zae_limiter::bucket::{self, BucketState};
use zae_limiter::Limit;

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("bucket");
    let limit = Limit::per_minute("rpm", 1_000_000_000);
    let start = BucketState::from_limit(&limit, 1_700_000_000_000);

    g.bench_function("try_consume (refill + take)", |b| {
        b.iter_custom(|iters| {
            let mut state = start;
            let mut now = 1_700_000_000_000i64;
            support::timed("bucket::try_consume", iters, || {
                now += 1;
                let r = bucket::try_consume(black_box(&state), black_box(1), black_box(now));
                state = r.state;
            })
        })
    });

    g.bench_function("try_consume (rejected)", |b| {
        let empty = bucket::force_consume(&start, 1_000_000_000, 1_700_000_000_000);
        b.iter_custom(|iters| {
            support::timed("bucket::try_consume rejected", iters, || {
                black_box(bucket::try_consume(
                    black_box(&empty),
                    black_box(5),
                    black_box(1_700_000_000_001),
                ));
            })
        })
    });

    let quota = Quota::per_minute(NonZeroU32::new(1_000_000_000).unwrap());
    let governor = Governor::direct(quota);
    g.bench_function("governor check (GCRA)", |b| {
        b.iter_custom(|iters| {
            support::timed("governor::check", iters, || {
                black_box(governor.check().is_ok());
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
        "bucket arithmetic vs governor",
        &[
            ("bucket::try_consume", "governor::check"),
            ("bucket::try_consume rejected", "governor::check"),
        ],
    );
}
