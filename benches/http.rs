//! The whole HTTP path: an axum hello-world with no limiter, with `RateLimitLayer`
//! (in-memory, quota never reached; with and without the `RateLimit` fields on responses)
//! and with `tower_governor` (same never-reached quota),
//! each served by a child process and loaded from this process over loopback, in
//! interleaved rounds so the three see the same machine conditions.
//!
//! `cargo bench --bench http` (env `ZAE_BENCH_SECONDS` per round, default 3;
//! `ZAE_BENCH_ROUNDS`, default 3; `ZAE_BENCH_CONNECTIONS`, default 32)

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::get;
use axum::Router;
use http::Request;
use http_body_util::{BodyExt, Empty};
use tower_governor::governor::GovernorConfigBuilder;
use tower_governor::GovernorLayer;
use zae_limiter::middleware::{extract, RateLimitLayer};
use zae_limiter::{InMemoryRepository, Limit, RateLimiter};

const MODES: [&str; 4] = [
    "none",
    "zae-limiter",
    "zae-limiter-no-headers",
    "tower_governor",
];
const KEYS: usize = 100;

fn app(mode: &str) -> Router {
    let router = Router::new().route("/", get(|| async { "Hello, world!" }));
    match mode {
        "none" => router,
        "zae-limiter" | "zae-limiter-no-headers" => router.layer(
            RateLimitLayer::new(RateLimiter::new(InMemoryRepository::new()))
                .entity(extract::header("x-api-key"))
                .resource(extract::fixed("hello"))
                .limits([Limit::per_second("rps", 1_000_000_000)])
                .headers_on_success(mode == "zae-limiter"),
        ),
        "tower_governor" => {
            let config = GovernorConfigBuilder::default()
                .per_nanosecond(1)
                .burst_size(u32::MAX)
                .key_extractor(support::ApiKey)
                .finish()
                .unwrap();
            router.layer(GovernorLayer::new(Arc::new(config)))
        }
        other => panic!("unknown mode {other}"),
    }
}

/// The server process: one worker thread, so the limiter's cost is not hidden by spare
/// cores; prints its address, serves until killed.
fn serve(mode: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("{}", listener.local_addr().unwrap());
        axum::serve(listener, app(mode)).await.unwrap();
    });
}

/// Loads `addr` over `connections` keep-alive HTTP/1.1 connections for `duration`;
/// returns successful responses per second.
async fn load(addr: SocketAddr, connections: usize, duration: Duration) -> f64 {
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (ok, failed) = (ok.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let io = hyper_util::rt::TokioIo::new(stream);
            let (mut send, conn) =
                hyper::client::conn::http1::handshake::<_, Empty<bytes::Bytes>>(io)
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut i = c;
            while Instant::now() < deadline {
                i += connections;
                let req = Request::get("/")
                    .header("host", "bench")
                    .header("x-api-key", format!("key-{}", i % KEYS))
                    .body(Empty::new())
                    .unwrap();
                let resp = send.send_request(req).await.unwrap();
                let good = resp.status().is_success();
                resp.into_body().collect().await.unwrap();
                if good {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "a quota was reached or a request failed"
    );
    ok.load(Ordering::Relaxed) as f64 / duration.as_secs_f64()
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if let Ok(mode) = std::env::var("ZAE_BENCH_HTTP_SERVER") {
        return serve(&mode);
    }
    // `cargo test --benches` runs benches in test mode: keep it quick.
    let quick = std::env::args().any(|a| a == "--test");
    let seconds = if quick {
        1
    } else {
        env_or("ZAE_BENCH_SECONDS", 3)
    };
    let rounds = if quick {
        1
    } else {
        env_or("ZAE_BENCH_ROUNDS", 3)
    };
    let connections = env_or("ZAE_BENCH_CONNECTIONS", 32) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // Load a server started elsewhere (e.g. under a profiler) and stop.
    if let Ok(target) = std::env::var("ZAE_BENCH_HTTP_TARGET") {
        let rps = rt.block_on(load(
            target.parse().unwrap(),
            connections,
            Duration::from_secs(seconds),
        ));
        println!("{target}: {rps:.0} req/s");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); MODES.len()];
    for round in 0..rounds {
        for (m, mode) in MODES.iter().enumerate() {
            let mut child = Command::new(&exe)
                .env("ZAE_BENCH_HTTP_SERVER", mode)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let addr: SocketAddr = line.trim().parse().unwrap();
            // Warm up, then measure.
            rt.block_on(load(addr, connections, Duration::from_millis(300)));
            let rps = rt.block_on(load(addr, connections, Duration::from_secs(seconds)));
            let _ = child.kill();
            let _ = child.wait();
            println!("round {} {mode:<24} {rps:>10.0} req/s", round + 1);
            results[m].push(rps);
        }
    }
    let med: Vec<f64> = results.iter_mut().map(|r| support::median(r)).collect();
    println!("\n== HTTP hello-world, {connections} connections, {rounds} rounds of {seconds} s, medians ==");
    for (m, mode) in MODES.iter().enumerate() {
        println!("{mode:<24} {:>10.0} req/s", med[m]);
    }
    let ratios = [
        ("zae-limiter / no limiter", med[1] / med[0]),
        ("zae-limiter / tower_governor", med[1] / med[3]),
        ("zae-limiter, no headers / no limiter", med[2] / med[0]),
        ("zae-limiter, no headers / tower_governor", med[2] / med[3]),
        ("tower_governor / no limiter", med[3] / med[0]),
    ];
    for (what, ratio) in ratios {
        println!("{what:<42} {ratio:.3}");
    }
}
