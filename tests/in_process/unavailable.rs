//! The outage policy: `Block` rejects with `Unavailable`, `Allow` admits without writing,
//! and a failed read is never mistaken for "no limits".

use crate::common;

use std::time::Duration;

use common::Switchable;
use zae_limiter::{Error, ErrorCategory, Limit, OnUnavailable, RateLimiter, Repository};

fn rpm() -> Limit {
    Limit::per_minute("rpm", 2)
}

#[tokio::test]
async fn block_is_the_default() {
    let backend = Switchable::default();
    let limiter = RateLimiter::new(backend.clone());
    backend.set_down(true);
    let err = limiter
        .acquire("u1", "api")
        .limits([rpm()])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert_eq!(err.category(), ErrorCategory::Infrastructure);
    assert!(
        std::error::Error::source(&err).is_some(),
        "the cause is kept"
    );
    backend.set_down(false);
    limiter
        .acquire("u1", "api")
        .limits([rpm()])
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
}

#[tokio::test]
async fn allow_admits_without_writing() {
    let backend = Switchable::default();
    let limiter = RateLimiter::builder(backend.clone())
        .on_unavailable(OnUnavailable::Allow)
        .build();
    backend.set_down(true);
    for _ in 0..5 {
        let lease = limiter.acquire("u1", "api").limits([rpm()]).await.unwrap();
        assert!(lease.is_unlimited());
        assert!(lease.statuses().is_empty());
        lease.adjust([("rpm", 10)]).await.unwrap();
        lease.commit().await.unwrap();
    }
    backend.set_down(false);
    assert_eq!(
        limiter
            .available("u1", "api", Some(&[rpm()]))
            .await
            .unwrap()["rpm"],
        2
    );
    // Per call, Block overrides the limiter's Allow.
    backend.set_down(true);
    let err = limiter
        .acquire("u1", "api")
        .limits([rpm()])
        .on_unavailable(OnUnavailable::Block)
        .await;
    assert!(matches!(err, Err(Error::Unavailable { .. })));
}

#[tokio::test]
async fn stored_policy_applies_during_an_outage() {
    let backend = Switchable::default();
    let limiter = RateLimiter::builder(backend.clone())
        .config_cache_ttl(Duration::ZERO)
        .build();
    limiter.set_system_limits(&[rpm()]).await.unwrap();
    limiter
        .set_on_unavailable(Some(OnUnavailable::Allow))
        .await
        .unwrap();
    limiter
        .acquire("u1", "api")
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    backend.set_down(true);
    // The last stored policy read is Allow.
    let lease = limiter.acquire("u1", "api").await.unwrap();
    assert!(lease.is_unlimited());
}

#[tokio::test]
async fn a_failed_config_read_is_not_cached() {
    let backend = Switchable::default();
    let limiter = RateLimiter::builder(backend.clone())
        .config_cache_ttl(Duration::from_secs(60))
        .build();
    limiter.set_resource_limits("api", &[rpm()]).await.unwrap();
    backend.set_down(true);
    assert!(matches!(
        limiter.acquire("u1", "api").await,
        Err(Error::Unavailable { .. })
    ));
    assert_eq!(limiter.cache_stats().size, 0);
    backend.set_down(false);
    let lease = limiter.acquire("u1", "api").await.unwrap();
    assert_eq!(lease.statuses()[0].limit, rpm());
    lease.commit().await.unwrap();
}

#[tokio::test]
async fn a_failed_commit_leaves_the_lease_open_for_rollback() {
    let backend = Switchable::default();
    let limiter = RateLimiter::new(backend.clone());
    let lease = limiter
        .acquire("u1", "api")
        .limits([Limit::per_minute("tpm", 100)])
        .consume([("tpm", 10)])
        .await
        .unwrap();
    lease.adjust([("tpm", 5)]).await.unwrap();
    backend.set_down(true);
    assert!(matches!(
        lease.commit().await,
        Err(Error::Unavailable { .. })
    ));
    assert!(!lease.is_closed());
    backend.set_down(false);
    lease.rollback().await.unwrap();
    let left = limiter
        .available("u1", "api", Some(&[Limit::per_minute("tpm", 100)]))
        .await
        .unwrap();
    assert_eq!(left["tpm"], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acquire_dropped_in_flight_is_rolled_back() {
    use std::future::IntoFuture;

    let backend = Switchable::default();
    backend.set_delay(Duration::from_millis(30));
    let limiter = RateLimiter::new(backend.clone());
    let limits = [Limit::per_minute("rpm", 5)];
    // Timed out while the backend is still deciding.
    let timed_out = tokio::time::timeout(
        Duration::from_millis(5),
        limiter
            .acquire("u1", "api")
            .limits(limits.clone())
            .into_future(),
    )
    .await;
    assert!(timed_out.is_err());
    // Decided at once (in memory) but never polled.
    let memory = RateLimiter::new(zae_limiter::InMemoryRepository::new());
    drop(
        memory
            .acquire("u1", "api")
            .limits(limits.clone())
            .into_future(),
    );
    assert_eq!(
        memory.available("u1", "api", Some(&limits)).await.unwrap()["rpm"],
        5
    );
    // The in-flight one finishes in the background, then returns what it took.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        limiter.available("u1", "api", Some(&limits)).await.unwrap()["rpm"],
        5
    );
    let states = limiter.bucket_states("u1", "api").await.unwrap();
    assert_eq!(states["rpm"].total_consumed_milli, 0);
}

#[tokio::test]
async fn an_awaited_acquire_on_an_async_backend_counts_each_lookup_once() {
    // This backend cannot decide without awaiting, so every acquire first tries the
    // synchronous path, then awaits: the config cache must still count one lookup each.
    let backend = Switchable::default();
    let limiter = RateLimiter::builder(backend)
        .config_cache_ttl(Duration::from_secs(60))
        .build();
    limiter.set_resource_limits("api", &[rpm()]).await.unwrap();
    limiter
        .acquire("u1", "api")
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    limiter
        .acquire("u1", "api")
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    let stats = limiter.cache_stats();
    assert_eq!((stats.hits, stats.misses), (1, 1));
}

#[tokio::test]
async fn dropped_lease_rollback_is_retried_until_the_backend_returns() {
    let backend = Switchable::default();
    let limiter = RateLimiter::new(backend.clone());
    let lease = limiter
        .acquire("u1", "api")
        .limits([rpm()])
        .consume([("rpm", 2)])
        .await
        .unwrap();
    backend.set_down(true);
    drop(lease); // the background rollback fails at first...
    tokio::time::sleep(Duration::from_millis(250)).await;
    backend.set_down(false); // ...and lands on a retry once the backend is back.
    let mut available = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        available = limiter
            .available("u1", "api", Some(&[rpm()]))
            .await
            .unwrap()["rpm"];
        if available == 2 {
            break;
        }
    }
    assert_eq!(
        available, 2,
        "the rollback was retried and returned both tokens"
    );
}

/// A backend that answers only through `acquire_now` (as a third-party in-process backend
/// may), leaving `acquire_now_into` to the trait's default: decided at once, exact over
/// commits, rollbacks and a refusal, each lease carrying only its own checks (leases are
/// reused), and an outage decided at once too.
#[tokio::test]
async fn a_backend_answering_through_acquire_now_alone_is_decided_at_once_and_exact() {
    let backend = Switchable::default();
    backend.set_answer_at_once(true);
    let limiter = RateLimiter::new(backend.clone());
    let rpm = || [Limit::per_minute("rpm", 3)];
    let first = match limiter.acquire("u1", "api").limits(rpm()).try_now() {
        Ok(Ok(lease)) => lease,
        other => panic!("not admitted at once: {other:?}"),
    };
    assert_eq!(first.statuses().len(), 1);
    assert_eq!(first.statuses()[0].available, 3);
    let second = limiter.acquire("u1", "api").limits(rpm()).await.unwrap();
    assert_eq!(second.statuses()[0].available, 2);
    second.rollback().await.unwrap();
    first.commit().await.unwrap();
    for left in [2, 1] {
        let lease = limiter.acquire("u1", "api").limits(rpm()).await.unwrap();
        assert_eq!(lease.statuses()[0].available, left);
        lease.commit().await.unwrap();
    }
    match limiter.acquire("u1", "api").limits(rpm()).await {
        Err(Error::RateLimited(e)) => assert_eq!(e.primary_violation().limit.name, "rpm"),
        other => panic!("expected a refusal: {other:?}"),
    }
    // The next lease (another key) starts clean: one check, its own.
    let other = limiter.acquire("u2", "api").limits(rpm()).await.unwrap();
    assert_eq!(other.statuses().len(), 1);
    assert_eq!(other.statuses()[0].entity_id, "u2");
    assert_eq!(other.statuses()[0].available, 3);
    other.commit().await.unwrap();
    let buckets = backend.inner.get_buckets("u1", "api").await.unwrap();
    let left = buckets["rpm"].tokens_milli;
    assert!(
        (0..1_000).contains(&left),
        "four taken, one given back: no whole token left ({left} millitokens)"
    );

    backend.set_down(true);
    match limiter.acquire("u3", "api").limits(rpm()).try_now() {
        Ok(Err(Error::Unavailable { .. })) => {}
        other => panic!("expected an outage decided at once: {other:?}"),
    }
}
