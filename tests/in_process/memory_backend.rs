//! The behaviour suite on the in-memory backend, plus what is specific to it.

use crate::suite;

use std::sync::Arc;
use std::time::Duration;

use zae_limiter::{InMemoryRepository, Limit, Repository};

async fn memory() -> Arc<dyn Repository> {
    Arc::new(InMemoryRepository::new())
}

crate::limiter_suite!(memory());

#[tokio::test]
async fn idle_buckets_are_evicted_and_memory_stays_bounded() {
    let repo = InMemoryRepository::builder().sweep_interval(None).build();
    let (limiter, clock) = suite::limiter(Arc::new(repo.clone()));
    let limits = [Limit::per_second("rps", 10)];
    for i in 0..10_000 {
        suite::admit(
            limiter
                .acquire(format!("ip-{i}"), "api")
                .limits(limits.clone()),
        )
        .await;
    }
    assert_eq!(repo.len(), 10_000);
    // Not yet idle for 7 x time to fill (7 x 1 s).
    clock.advance(Duration::from_millis(6_999));
    suite::admit(limiter.acquire("probe", "api").limits(limits.clone())).await;
    assert_eq!(repo.evict_idle(), 0);
    clock.advance(Duration::from_millis(2));
    suite::admit(limiter.acquire("probe2", "api").limits(limits.clone())).await;
    assert_eq!(repo.evict_idle(), 10_000);
    assert_eq!(repo.len(), 2);
    // An evicted key starts full again, which is what it would have refilled to.
    let a = limiter
        .available("ip-1", "api", Some(&limits))
        .await
        .unwrap();
    assert_eq!(a["rps"], 10);
}

#[tokio::test]
async fn a_bucket_in_debt_is_kept_until_it_is_full_again() {
    let repo = InMemoryRepository::builder()
        .sweep_interval(None)
        .idle_ttl_multiplier(1)
        .build();
    let (limiter, clock) = suite::limiter(Arc::new(repo.clone()));
    let limits = [Limit::per_second("tps", 10)];
    let lease = limiter
        .acquire("k", "api")
        .limits(limits.clone())
        .consume([("tps", 10)])
        .await
        .unwrap();
    lease.adjust([("tps", 90)]).await.unwrap();
    lease.commit().await.unwrap();
    // 90 tokens of debt plus 10 of capacity at 10/s: 10 s to be full again.
    clock.advance(Duration::from_millis(9_999));
    suite::admit(
        limiter
            .acquire("probe", "api")
            .limits(limits.clone())
            .consume([("tps", 0)]),
    )
    .await;
    assert_eq!(repo.evict_idle(), 0, "nothing is idle and full yet");
    // Still in the map: 99.99 tokens refilled since, so 9 whole tokens (an evicted,
    // recreated bucket would report 10).
    assert_eq!(
        limiter.available("k", "api", Some(&limits)).await.unwrap()["tps"],
        9
    );
    clock.advance(Duration::from_millis(1));
    suite::admit(
        limiter
            .acquire("probe", "api")
            .limits(limits.clone())
            .consume([("tps", 0)]),
    )
    .await;
    assert_eq!(repo.evict_idle(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_sweeper_evicts() {
    let repo = InMemoryRepository::builder()
        .sweep_interval(Some(Duration::from_millis(20)))
        .build();
    let (limiter, clock) = suite::limiter(Arc::new(repo.clone()));
    let limits = [Limit::per_second("rps", 1)];
    for i in 0..100 {
        suite::admit(
            limiter
                .acquire(format!("k{i}"), "api")
                .limits(limits.clone()),
        )
        .await;
    }
    clock.advance(Duration::from_secs(10));
    suite::admit(limiter.acquire("probe", "api").limits(limits)).await;
    for _ in 0..100 {
        if repo.len() == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("sweeper did not evict: {} items left", repo.len());
}

#[tokio::test]
async fn config_cache_stays_bounded_under_key_churn() {
    let (limiter, clock) = suite::limiter(Arc::new(InMemoryRepository::new()));
    let limits = [Limit::per_second("rps", 10)];
    // Keys with nothing stored take no cache entry at all on this backend.
    suite::admit(limiter.acquire("plain", "api").limits(limits.clone())).await;
    assert_eq!(limiter.cache_stats().size, 0);
    // With stored limits, every key is cached, and expired entries are swept.
    limiter.set_resource_limits("api", &limits).await.unwrap();
    for i in 0..5_000 {
        suite::admit(limiter.acquire(format!("k{i}"), "api")).await;
    }
    assert_eq!(limiter.cache_stats().size, 5_000);
    // One TTL later the next insert sweeps what expired.
    clock.advance(Duration::from_secs(61));
    suite::admit(limiter.acquire("fresh", "api").limits(limits)).await;
    assert_eq!(limiter.cache_stats().size, 1);
}
