//! The middleware's CPU cost without the network: an axum hello-world router called
//! in-process (`tower::ServiceExt::oneshot`) with no limiter, with `RateLimitLayer`
//! (in-memory, quota never reached) and with `tower_governor` (same never-reached quota),
//! measured side by side. The loopback load test (`--bench http`) adds the network.
//!
//! `cargo bench --bench layer`

mod support;

use std::sync::Arc;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use criterion::Criterion;
use http::Request;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::GovernorLayer;
use zae_limiter::middleware::{extract, RateLimitLayer};
use zae_limiter::{InMemoryRepository, Limit, RateLimiter};

/// Counts heap allocations, so the bench reports how many each request costs.
struct Counting;

static ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

// SAFETY: defers to the system allocator; only counts.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.realloc(ptr, layout, size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The overhead ratios reported: a layer's cost over no limiter against an alternative's.
const OVERHEAD_RATIOS: [(&str, &str); 4] = [
    ("RateLimitLayer", "tower_governor"),
    ("RateLimitLayer", "tower_governor, headers"),
    ("RateLimitLayer, no headers", "tower_governor"),
    ("RateLimitLayer, every request skipped", "tower_governor"),
];

fn routers() -> [(&'static str, Router); 6] {
    let hello = || Router::new().route("/", get(|| async { "Hello, world!" }));
    // As `axum::serve` does: turn handlers into services once, not on every call.
    let ready = |router: Router| router.with_state::<()>(());
    let zae = |headers: bool| {
        RateLimitLayer::new(RateLimiter::new(InMemoryRepository::new()))
            .entity(extract::header("x-api-key"))
            .resource(extract::fixed("hello"))
            .limits([Limit::per_second("rps", 1_000_000_000)])
            .headers_on_success(headers)
    };
    let mut governor = GovernorConfigBuilder::default();
    governor.per_nanosecond(1).burst_size(u32::MAX);
    let mut governor = governor.key_extractor(support::ApiKey);
    let plain = Arc::new(governor.finish().unwrap());
    let with_headers = Arc::new(governor.use_headers().finish().unwrap());
    [
        ("no limiter", ready(hello())),
        ("RateLimitLayer", ready(hello().layer(zae(true)))),
        (
            "RateLimitLayer, no headers",
            ready(hello().layer(zae(false))),
        ),
        // The layer's fixed cost alone: every request skipped, passed on with no lease
        // (what wrapping the service and its body costs, whatever the limiter does).
        (
            "RateLimitLayer, every request skipped",
            ready(hello().layer(zae(false).skip(|_| true))),
        ),
        (
            "tower_governor",
            ready(hello().layer(GovernorLayer::new(plain))),
        ),
        // Like for like with the fields on: tower_governor's `x-ratelimit-*` headers.
        (
            "tower_governor, headers",
            ready(hello().layer(GovernorLayer::new(with_headers))),
        ),
    ]
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let keys: Vec<String> = (0..100).map(|i| format!("key-{i}")).collect();
    let mut g = c.benchmark_group("layer");
    for (name, router) in routers() {
        let mut i = 0;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = std::time::Instant::now();
                    for _ in 0..iters {
                        i = (i + 1) % keys.len();
                        let req = Request::get("/")
                            .header("x-api-key", keys[i].as_str())
                            .body(Body::empty())
                            .unwrap();
                        let resp = router.clone().oneshot(req).await.unwrap();
                        assert!(resp.status().is_success());
                        resp.into_body().collect().await.unwrap();
                    }
                    let e = start.elapsed();
                    support::record(name, e, iters);
                    e
                })
            })
        });
    }
    g.finish();
}

/// Heap allocations per request through each router (the request and response built by
/// the caller included, as for every router alike), over `n` warm requests.
fn allocations(n: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!("\n== heap allocations per request (warm, {n} requests, 100 keys) ==");
    let mut base = 0.0;
    for (name, router) in routers() {
        let per_request = rt.block_on(async {
            let call = |key: String| {
                let router = router.clone();
                async move {
                    let req = Request::get("/")
                        .header("x-api-key", key)
                        .body(Body::empty())
                        .unwrap();
                    let resp = router.oneshot(req).await.unwrap();
                    resp.into_body().collect().await.unwrap();
                }
            };
            let keys: Vec<String> = (0..100).map(|i| format!("key-{i}")).collect();
            for key in &keys {
                call(key.clone()).await;
            }
            let before = ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed);
            for i in 0..n {
                call(keys[i % keys.len()].clone()).await;
            }
            // The key's clone above is the caller's, not the router's.
            (ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed) - before) as f64 / n as f64
                - 1.0
        });
        if name == "no limiter" {
            base = per_request;
        }
        println!(
            "{name:<38} {per_request:>6.2} per request ({:+.2} over no limiter)",
            per_request - base
        );
    }
}

/// `requests` calls of `router` (a clone each, as axum's server makes), cycling through
/// `keys`, each response's body read to its end.
async fn call_each(router: &Router, keys: &[String], requests: usize) {
    for i in 0..requests {
        let req = Request::get("/")
            .header("x-api-key", keys[i % keys.len()].as_str())
            .body(Body::empty())
            .unwrap();
        let resp = router.clone().oneshot(req).await.unwrap();
        resp.into_body().collect().await.unwrap();
    }
}

/// One thread, the routers taking turns: `rounds` rounds of `requests` calls each, the
/// median per router. Criterion measures one subject after another, so on a shared VM
/// whose speed drifts the overheads (small differences of large figures) move by 2x
/// between runs; taking turns puts each router in the same conditions.
fn alternating(rounds: usize, requests: usize) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let routers = routers();
    let keys: Vec<String> = (0..100).map(|i| format!("key-{i}")).collect();
    let run = |router: &Router| {
        let start = std::time::Instant::now();
        rt.block_on(call_each(router, &keys, requests));
        start.elapsed().as_nanos() as f64 / requests as f64
    };
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); routers.len()];
    for (_, router) in &routers {
        run(router);
    }
    for _ in 0..rounds {
        for (at, (_, router)) in routers.iter().enumerate() {
            times[at].push(run(router));
        }
    }
    let medians: Vec<f64> = times.iter_mut().map(|t| support::median(t)).collect();
    let overhead = |name: &str| {
        let at = routers.iter().position(|(n, _)| *n == name).unwrap();
        medians[at] - medians[0]
    };
    println!(
        "\n== one thread, routers taking turns ({rounds} rounds of {requests} requests; medians) =="
    );
    for ((name, _), ns) in routers.iter().zip(&medians) {
        println!(
            "{name:<38} {ns:>8.0} ns ({:+.0} over no limiter)",
            ns - medians[0]
        );
    }
    for (subject, alternative) in OVERHEAD_RATIOS {
        let (s, a) = (overhead(subject), overhead(alternative));
        println!(
            "overhead ratio {subject:<38} / {alternative:<24} {:>5.1}x",
            s / a
        );
    }
}

/// Every core at once, each thread calling its own clone of the router on keys of its
/// own (as a multi-threaded server's workers do): aggregate nanoseconds per request and
/// the overhead over no limiter, for each router, medians of three alternating runs.
fn threads(requests_per_thread: usize) {
    let threads = support::cores();
    let routers = routers();
    let run = |router: &Router| {
        support::on_every_core(requests_per_thread, &|t| {
            let router = router.clone();
            let keys: Vec<String> = (0..100).map(|i| format!("t{t}-key-{i}")).collect();
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(call_each(&router, &keys, requests_per_thread))
        })
    };
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); routers.len()];
    for (_, router) in &routers {
        run(router);
    }
    for _ in 0..3 {
        for (at, (_, router)) in routers.iter().enumerate() {
            times[at].push(run(router));
        }
    }
    let medians: Vec<f64> = times.iter_mut().map(|t| support::median(t)).collect();
    println!(
        "\n== {threads} threads at once, 100 keys each (aggregate ns per request, median of 3) =="
    );
    for ((name, _), ns) in routers.iter().zip(&medians) {
        println!(
            "{name:<38} {ns:>8.0} ns ({:+.0} over no limiter)",
            ns - medians[0]
        );
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    benches(&mut c);
    c.final_summary();
    if !std::env::args().any(|a| a == "--profile-time") {
        allocations(10_000);
        let quick = std::env::args().any(|a| a == "--test");
        if quick {
            alternating(1, 1_000);
        } else {
            alternating(15, 20_000);
        }
        threads(if quick { 1_000 } else { 200_000 });
    }
    support::report(
        "router call in-process, per request",
        &[
            ("RateLimitLayer", "no limiter"),
            ("RateLimitLayer", "tower_governor"),
            ("RateLimitLayer, no headers", "tower_governor"),
            ("RateLimitLayer", "tower_governor, headers"),
            ("tower_governor", "no limiter"),
        ],
    );
    let overhead = |name: &str| support::mean_ns(name) - support::mean_ns("no limiter");
    println!("\n== overhead per request over no limiter, and its ratio ==");
    for (subject, alternative) in OVERHEAD_RATIOS {
        let (s, a) = (overhead(subject), overhead(alternative));
        println!(
            "{subject:<38} {s:>+6.0} ns  {alternative:<24} {a:>+6.0} ns  {:>5.1}x",
            s / a
        );
    }
}
