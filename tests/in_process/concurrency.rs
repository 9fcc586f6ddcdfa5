//! Many tasks hammering one key never admit more than capacity plus refill, and the
//! consumed counter is exact.

use std::future::IntoFuture;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zae_limiter::clock::ManualClock;
use zae_limiter::{Error, InMemoryRepository, Limit, RateLimiter};

const TASKS: usize = 64;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn frozen_clock_admits_exactly_capacity() {
    let limiter = RateLimiter::builder(InMemoryRepository::new())
        .clock(ManualClock::new(1_000_000))
        .build();
    let limits = [Limit::per_minute("rpm", 1_000)];
    let admitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (limiter, limits, admitted) = (limiter.clone(), limits.clone(), admitted.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..100 {
                match limiter.acquire("hot", "api").limits(limits.clone()).await {
                    Ok(lease) => {
                        lease.commit().await.unwrap();
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Error::RateLimited(_)) => {}
                    Err(e) => panic!("{e}"),
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 1_000);
    let states = limiter.bucket_states("hot", "api").await.unwrap();
    assert_eq!(states["rpm"].total_consumed_milli, 1_000_000);
    assert_eq!(states["rpm"].tokens_milli, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn real_clock_never_admits_more_than_capacity_plus_refill() {
    let limiter = RateLimiter::new(InMemoryRepository::new());
    let limit = Limit::per_second("rps", 200);
    let committed = Arc::new(AtomicU64::new(0));
    let rolled_back = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let run_for = Duration::from_millis(1_500);
    let mut tasks = Vec::new();
    for task in 0..TASKS {
        let (limiter, limit) = (limiter.clone(), limit.clone());
        let (committed, rolled_back) = (committed.clone(), rolled_back.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < run_for {
                match limiter.acquire("hot", "api").limits([limit.clone()]).await {
                    // Every third admission of every other task is rolled back.
                    Ok(lease) if task % 2 == 0 && n % 3 == 0 => {
                        lease.rollback().await.unwrap();
                        rolled_back.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(lease) => {
                        lease.commit().await.unwrap();
                        committed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(Error::RateLimited(_)) => {}
                    Err(e) => panic!("{e}"),
                }
                n += 1;
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let committed = committed.load(Ordering::Relaxed);
    let rolled_back = rolled_back.load(Ordering::Relaxed);
    // Rolled-back tokens return to the bucket and may be admitted again, so the bound is
    // on what stayed consumed.
    let ceiling = 200 + (200.0 * elapsed.as_secs_f64()).ceil() as u64;
    assert!(
        committed <= ceiling,
        "committed {committed} > ceiling {ceiling}"
    );
    assert!(
        committed >= 200,
        "only {committed} admitted: the limiter starved callers"
    );
    assert!(rolled_back > 0);
    let states = limiter.bucket_states("hot", "api").await.unwrap();
    assert_eq!(states["rps"].total_consumed_milli, committed as i64 * 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cascading_children_never_overdraw_the_parent() {
    let limiter = RateLimiter::builder(InMemoryRepository::new())
        .clock(ManualClock::new(5_000_000))
        .build();
    project_with_children(&limiter, 500, 100, 16).await;
    let admitted = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (limiter, admitted) = (limiter.clone(), admitted.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                match limiter
                    .acquire(format!("key-{}", t % 16), "llm")
                    .consume([("tpm", 3)])
                    .await
                {
                    Ok(lease) => {
                        lease.commit().await.unwrap();
                        admitted.fetch_add(3, Ordering::Relaxed);
                    }
                    Err(Error::RateLimited(_)) => {}
                    Err(e) => panic!("{e}"),
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // 500 / 3 = 166 admissions fit in the parent.
    assert_eq!(admitted.load(Ordering::Relaxed), 498);
    let parent = limiter.bucket_states("proj", "llm").await.unwrap();
    assert_eq!(parent["tpm"].total_consumed_milli, 498_000);
    let children = children_consumed(&limiter, 16).await;
    assert_eq!(children, 498_000);
}

/// The in-memory backend's lock paths at once: single-item acquires and refunds on a
/// parent (its item used under the map's shard, held exclusively) racing cascades that
/// lock child and parent together through their own references, while a thread sweeps the
/// map (which locks shards for writing) and another reads the parent's buckets (holding a
/// reference to its item, and its lock, meanwhile). With the clock frozen every count is
/// exact, and nothing deadlocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_items_cascades_refunds_and_sweeps_stay_exact() {
    let repo = InMemoryRepository::builder().sweep_interval(None).build();
    let limiter = RateLimiter::builder(repo.clone())
        .clock(ManualClock::new(9_000_000))
        .build();
    project_with_children(&limiter, 600, 1_000, 8).await;
    let sweeping = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sweeps = Arc::new(AtomicU64::new(0));
    let sweeper = {
        let (repo, sweeping, sweeps) = (repo.clone(), sweeping.clone(), sweeps.clone());
        std::thread::spawn(move || {
            while sweeping.load(Ordering::Relaxed) {
                repo.evict_idle();
                sweeps.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // A reader takes references to the parent's item and locks it meanwhile, so acquires
    // also find it shared (locked under the shard only if free, else the slow way).
    let reads = Arc::new(AtomicU64::new(0));
    let reader = {
        let (limiter, sweeping, reads) = (limiter.clone(), sweeping.clone(), reads.clone());
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            while sweeping.load(Ordering::Relaxed) {
                runtime
                    .block_on(limiter.bucket_states("proj", "llm"))
                    .unwrap();
                reads.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // The sweeper and the reader are under way before the acquires start (they can all
    // finish before a new thread is first scheduled).
    while sweeps.load(Ordering::Relaxed) == 0 || reads.load(Ordering::Relaxed) == 0 {
        tokio::task::yield_now().await;
    }
    // Net tokens charged to the parent directly and through children.
    let direct = Arc::new(AtomicU64::new(0));
    let cascaded = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let (limiter, direct, cascaded) = (limiter.clone(), direct.clone(), cascaded.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..40 {
                let through_child = t % 2 == 0;
                let entity = if through_child {
                    format!("key-{}", t % 8)
                } else {
                    "proj".to_string()
                };
                match limiter.acquire(entity, "llm").consume([("tpm", 3)]).await {
                    Ok(lease) => {
                        // Every third lease gives one token back before it commits.
                        let refund = u64::from(n % 3 == 0);
                        if refund == 1 {
                            lease.adjust([("tpm", -1)]).await.unwrap();
                        }
                        lease.commit().await.unwrap();
                        let counter = if through_child { &cascaded } else { &direct };
                        counter.fetch_add(3 - refund, Ordering::Relaxed);
                    }
                    Err(Error::RateLimited(_)) => {}
                    Err(e) => panic!("{e}"),
                }
                tokio::task::yield_now().await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    sweeping.store(false, Ordering::Relaxed);
    sweeper.join().unwrap();
    reader.join().unwrap();
    let (direct, cascaded) = (
        direct.load(Ordering::Relaxed),
        cascaded.load(Ordering::Relaxed),
    );
    let parent = limiter.bucket_states("proj", "llm").await.unwrap();
    assert_eq!(
        parent["tpm"].total_consumed_milli as u64,
        (direct + cascaded) * 1_000
    );
    assert_eq!(
        parent["tpm"].tokens_milli,
        600_000 - (direct + cascaded) as i64 * 1_000
    );
    // Drained, never past empty: what is left is under one request's worth, plus at most
    // one refund per task that came after the others had stopped asking.
    let left = parent["tpm"].tokens_milli;
    assert!((0..(3 + TASKS as i64) * 1_000).contains(&left), "{left}");
    let children = children_consumed(&limiter, 8).await;
    assert_eq!(children as u64, cascaded * 1_000);
}

/// An adjust through a handle on another thread racing the owner's commit either lands
/// (written by the commit) or is refused with `LeaseClosed`: never accepted and lost. The
/// bucket's consumed total is exactly the acquires plus the adjusts accepted.
#[test]
fn handle_adjusts_racing_commits_are_written_or_refused() {
    let limiter = RateLimiter::builder(InMemoryRepository::new())
        .clock(ManualClock::new(5_000_000))
        .build();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let limits: Arc<[Limit]> = [Limit::per_minute("tpm", 1_000_000)].into();
    const LEASES: u64 = 5_000;
    // One adjuster thread; both sides meet at the barrier, then adjust and commit at once.
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let (send, receive) = std::sync::mpsc::channel::<zae_limiter::LeaseHandle>();
    let adjuster = {
        let barrier = barrier.clone();
        std::thread::spawn(move || {
            let (mut accepted, mut refused) = (0u64, 0u64);
            for handle in receive {
                barrier.wait();
                match handle.adjust([("tpm", 2)]) {
                    Ok(()) => accepted += 2,
                    Err(Error::LeaseClosed) => refused += 1,
                    Err(e) => panic!("{e}"),
                }
            }
            (accepted, refused)
        })
    };
    for _ in 0..LEASES {
        let lease = runtime
            .block_on(
                limiter
                    .acquire("hot", "api")
                    .shared_limits(limits.clone())
                    .into_future(),
            )
            .unwrap();
        send.send(lease.handle()).unwrap();
        barrier.wait();
        runtime.block_on(lease.commit()).unwrap();
    }
    drop(send);
    let (accepted, refused) = adjuster.join().unwrap();
    assert_eq!(accepted / 2 + refused, LEASES);
    let states = runtime
        .block_on(limiter.bucket_states("hot", "api"))
        .unwrap();
    assert_eq!(
        states["tpm"].total_consumed_milli as u64,
        (LEASES + accepted) * 1_000
    );
}

/// A project `proj` with `tpm` per minute on `llm`, and `children` keys (`key-{i}`,
/// cascading to it) under a resource default of `child_tpm`.
async fn project_with_children(limiter: &RateLimiter, tpm: u64, child_tpm: u64, children: usize) {
    limiter.create_entity("proj").await.unwrap();
    limiter
        .set_entity_limits("proj", "llm", &[Limit::per_minute("tpm", tpm)])
        .await
        .unwrap();
    limiter
        .set_resource_limits("llm", &[Limit::per_minute("tpm", child_tpm)])
        .await
        .unwrap();
    for i in 0..children {
        limiter
            .create_entity(format!("key-{i}"))
            .parent("proj")
            .cascade(true)
            .await
            .unwrap();
    }
}

/// The `tpm` millitokens consumed over the first `children` keys.
async fn children_consumed(limiter: &RateLimiter, children: usize) -> i64 {
    let mut total = 0;
    for i in 0..children {
        let s = limiter
            .bucket_states(&format!("key-{i}"), "llm")
            .await
            .unwrap();
        total += s.get("tpm").map_or(0, |b| b.total_consumed_milli);
    }
    total
}
