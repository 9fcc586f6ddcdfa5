//! The limiter behaviour suite, written once and run against every backend.
//!
//! A backend's test file calls `limiter_suite!(make_repo)` where `make_repo` is an async
//! expression yielding a fresh, empty `Arc<dyn Repository>`; every case gets its own
//! repository and a manual clock.

#![allow(dead_code)]

pub mod histories;

use std::sync::Arc;
use std::time::Duration;

use zae_limiter::clock::ManualClock;
use zae_limiter::{ConfigSource, Error, Limit, OnUnavailable, RateLimiter, Repository};

/// A fixed start time, so runs are reproducible.
pub const T0: i64 = 1_700_000_000_000;

/// A limiter over `repo` with a manual clock at `T0` and the config cache on.
pub fn limiter(repo: Arc<dyn Repository>) -> (RateLimiter, ManualClock) {
    let clock = ManualClock::new(T0);
    let limiter = RateLimiter::builder_shared(repo)
        .clock(clock.clone())
        .config_cache_ttl(Duration::from_secs(60))
        .build();
    (limiter, clock)
}

/// `limit` changed after construction (the fields are public), past the constructors' checks.
fn changed(mut limit: Limit, change: impl FnOnce(&mut Limit)) -> Limit {
    change(&mut limit);
    limit
}

fn rpm(n: u64) -> Limit {
    Limit::per_minute("rpm", n)
}

fn tpm(n: u64) -> Limit {
    Limit::per_minute("tpm", n)
}

/// Acquires and commits, expecting admission.
pub async fn admit(acquire: zae_limiter::Acquire) {
    acquire.await.unwrap().commit().await.unwrap();
}

fn rejected(result: Result<zae_limiter::Lease, Error>) -> zae_limiter::RateLimitExceeded {
    match result {
        Err(Error::RateLimited(e)) => e,
        Err(other) => panic!("expected a rate-limit rejection, got error {other:?}"),
        Ok(lease) => panic!("expected a rate-limit rejection, got a lease {lease:?}"),
    }
}

pub async fn acquire_and_commit_consumes(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let lease = l
        .acquire("u1", "api")
        .limits([rpm(10)])
        .consume([("rpm", 3)])
        .await
        .unwrap();
    assert_eq!(lease.consumed()["rpm"], 3);
    assert_eq!(lease.statuses()[0].available, 10);
    // Write-on-enter: visible before commit.
    assert_eq!(
        l.available("u1", "api", Some(&[rpm(10)])).await.unwrap()["rpm"],
        7
    );
    lease.commit().await.unwrap();
    assert_eq!(
        l.available("u1", "api", Some(&[rpm(10)])).await.unwrap()["rpm"],
        7
    );
    let states = l.bucket_states("u1", "api").await.unwrap();
    assert_eq!(states["rpm"].total_consumed_milli, 3_000);
}

pub async fn default_consume_is_one_from_every_limit(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    admit(l.acquire("u1", "api").limits([rpm(10), tpm(100)])).await;
    let avail = l
        .available("u1", "api", Some(&[rpm(10), tpm(100)]))
        .await
        .unwrap();
    assert_eq!((avail["rpm"], avail["tpm"]), (9, 99));
}

pub async fn multiple_limits_are_all_or_nothing(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let limits = [rpm(10), tpm(100)];
    let e = rejected(
        l.acquire("u1", "api")
            .limits(limits.clone())
            .consume([("rpm", 1), ("tpm", 101)])
            .await,
    );
    assert_eq!(e.statuses().len(), 2);
    assert_eq!(
        e.violations()
            .map(|s| s.limit.name.as_str())
            .collect::<Vec<_>>(),
        ["tpm"]
    );
    assert_eq!(e.passed().count(), 1);
    // Nothing was consumed from the limit that passed.
    let avail = l.available("u1", "api", Some(&limits)).await.unwrap();
    assert_eq!((avail["rpm"], avail["tpm"]), (10, 100));
}

pub async fn rejection_reports_exact_retry_after(repo: Arc<dyn Repository>) {
    let (l, clock) = limiter(repo);
    let limits = [rpm(60), tpm(600)];
    admit(
        l.acquire("u1", "api")
            .limits(limits.clone())
            .consume([("rpm", 60), ("tpm", 300)]),
    )
    .await;
    let e = rejected(
        l.acquire("u1", "api")
            .limits(limits.clone())
            .consume([("rpm", 2), ("tpm", 1)])
            .await,
    );
    // 2 rpm at 1/s: 2 s.
    assert_eq!(e.retry_after(), Duration::from_secs(2));
    assert_eq!(e.retry_after_header().as_deref(), Some("2"));
    assert_eq!(e.primary_violation().limit.name, "rpm");
    clock.advance(Duration::from_millis(1_999));
    rejected(
        l.acquire("u1", "api")
            .limits(limits.clone())
            .consume([("rpm", 2)])
            .await,
    );
    clock.advance(Duration::from_millis(1));
    admit(l.acquire("u1", "api").limits(limits).consume([("rpm", 2)])).await;
}

pub async fn request_above_capacity_is_unsatisfiable(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let e = rejected(
        l.acquire("u1", "api")
            .limits([tpm(100)])
            .consume([("tpm", 101)])
            .await,
    );
    assert!(!e.is_satisfiable());
    assert_eq!(e.retry_after_header(), None);
    assert_eq!(e.primary_violation().retry_after_ms, None);
}

pub async fn unknown_names_are_ignored_and_negatives_rejected(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let lease = l
        .acquire("u1", "api")
        .limits([rpm(10)])
        .consume([("rpm", 1), ("other", 50)])
        .await
        .unwrap();
    assert_eq!(lease.consumed().len(), 1);
    lease.adjust([("other", 5)]).await.unwrap();
    lease.commit().await.unwrap();
    assert_eq!(
        l.available("u1", "api", Some(&[rpm(10)])).await.unwrap()["rpm"],
        9
    );
    let err = l
        .acquire("u1", "api")
        .limits([rpm(10)])
        .consume([("rpm", -1)])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Validation { field, .. } if field == "consume.rpm"),
        "{err:?}"
    );
    let err = l
        .acquire("u1", "api")
        .limits([rpm(10)])
        .consume([("rpm", u64::MAX)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Validation { .. }), "{err:?}");
    assert_eq!(
        l.available("u1", "api", Some(&[rpm(10)])).await.unwrap()["rpm"],
        9
    );
}

pub async fn invalid_input_is_a_typed_error(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let err = l.acquire("a#b", "api").limits([rpm(1)]).await.unwrap_err();
    assert!(matches!(&err, Error::InvalidIdentifier { field, .. } if field == "entity_id"));
    let err = l.acquire("u1", "api#x").limits([rpm(1)]).await.unwrap_err();
    assert!(matches!(&err, Error::InvalidName { field, .. } if field == "resource"));
    // Constructors refuse an invalid limit; one changed after construction is refused by
    // the acquire, with the same typed error.
    let err = Limit::try_per_minute("wcu", 1).unwrap_err();
    assert!(matches!(&err, Error::InvalidName { field, .. } if field == "limit_name"));
    let err = l
        .acquire("u1", "api")
        .limits([changed(rpm(1), |l| l.name = "wcu".into())])
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::InvalidName { field, .. } if field == "limit_name"));
    let err = Limit::try_custom("rpm", 0, 1, 60).unwrap_err();
    assert!(matches!(&err, Error::Validation { field, .. } if field == "limits.rpm.capacity"));
    let err = l
        .acquire("u1", "api")
        .limits([changed(rpm(1), |l| l.capacity = 0)])
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::Validation { field, .. } if field == "limits.rpm.capacity"));
    let err = l
        .acquire("u1", "api")
        .limits([rpm(1), rpm(2)])
        .await
        .unwrap_err();
    assert!(matches!(&err, Error::Validation { field, .. } if field == "limits"));
    let err = l.set_system_limits(&[]).await.unwrap_err();
    assert!(matches!(err, Error::Validation { .. }));
    assert!(l.bucket_states("u1", "api").await.unwrap().is_empty());
}

pub async fn adjust_may_go_into_debt(repo: Arc<dyn Repository>) {
    let (l, clock) = limiter(repo);
    let lease = l
        .acquire("u1", "api")
        .limits([tpm(100)])
        .consume([("tpm", 50)])
        .await
        .unwrap();
    lease.adjust([("tpm", 100)]).await.unwrap();
    assert_eq!(lease.consumed()["tpm"], 150);
    lease.commit().await.unwrap();
    assert_eq!(
        l.available("u1", "api", Some(&[tpm(100)])).await.unwrap()["tpm"],
        -50
    );
    let e = rejected(
        l.acquire("u1", "api")
            .limits([tpm(100)])
            .consume([("tpm", 1)])
            .await,
    );
    // 51 tokens at 100/min: 30.6 s.
    assert_eq!(e.retry_after(), Duration::from_millis(30_600));
    clock.advance(Duration::from_millis(30_600));
    admit(
        l.acquire("u1", "api")
            .limits([tpm(100)])
            .consume([("tpm", 1)]),
    )
    .await;
}

pub async fn negative_adjust_refunds_but_not_below_zero(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let lease = l
        .acquire("u1", "api")
        .limits([tpm(100)])
        .consume([("tpm", 50)])
        .await
        .unwrap();
    lease.adjust([("tpm", -20)]).await.unwrap();
    let err = lease.adjust([("tpm", -31)]).await.unwrap_err();
    assert!(matches!(err, Error::Validation { .. }));
    lease.commit().await.unwrap();
    assert_eq!(
        l.available("u1", "api", Some(&[tpm(100)])).await.unwrap()["tpm"],
        70
    );
    let states = l.bucket_states("u1", "api").await.unwrap();
    assert_eq!(states["tpm"].total_consumed_milli, 30_000);
}

pub async fn adjust_is_checked_as_a_whole(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let lease = l
        .acquire("u1", "api")
        .limits([tpm(100)])
        .consume([("tpm", 10)])
        .await
        .unwrap();
    // Each half alone would be fine; together they refund more than was consumed.
    let err = lease.adjust([("tpm", -6), ("tpm", -6)]).await.unwrap_err();
    assert!(matches!(err, Error::Validation { .. }), "{err:?}");
    assert_eq!(
        lease.consumed()["tpm"],
        10,
        "a refused adjust changes nothing"
    );
    // Piling up adjustments is bounded, never an overflow.
    let huge = zae_limiter::limit::MAX_TOKENS as i64;
    lease.adjust([("tpm", huge - 10)]).await.unwrap();
    let err = lease.adjust([("tpm", 1)]).await.unwrap_err();
    assert!(matches!(err, Error::Validation { .. }), "{err:?}");
    lease.rollback().await.unwrap();
    assert_eq!(
        l.available("u1", "api", Some(&[tpm(100)])).await.unwrap()["tpm"],
        100
    );
}

pub async fn rollback_returns_everything(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let lease = l
        .acquire("u1", "api")
        .limits([tpm(100)])
        .consume([("tpm", 50)])
        .await
        .unwrap();
    lease.adjust([("tpm", 10)]).await.unwrap();
    lease.rollback().await.unwrap();
    assert!(lease.is_closed());
    assert_eq!(
        l.available("u1", "api", Some(&[tpm(100)])).await.unwrap()["tpm"],
        100
    );
    let states = l.bucket_states("u1", "api").await.unwrap();
    assert_eq!(states["tpm"].total_consumed_milli, 0);
    assert!(matches!(lease.commit().await, Err(Error::LeaseClosed)));
    assert!(matches!(
        lease.adjust([("tpm", 1)]).await,
        Err(Error::LeaseClosed)
    ));
    assert!(matches!(lease.rollback().await, Err(Error::LeaseClosed)));
}

/// A commit is a future like any other: made and dropped unpolled it does nothing, with or
/// without adjustments to write, and it can be awaited on another task.
pub async fn a_commit_does_nothing_until_awaited(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let acquire = || {
        l.acquire("u1", "api")
            .limits([tpm(1000)])
            .consume([("tpm", 100)])
    };
    let untouched = acquire().await.unwrap();
    drop(untouched.commit());
    assert!(!untouched.is_closed());
    let adjusted = acquire().await.unwrap();
    adjusted.adjust([("tpm", 50)]).await.unwrap();
    drop(adjusted.commit());
    assert!(!adjusted.is_closed());
    adjusted.adjust([("tpm", 25)]).await.unwrap();
    let committed = tokio::spawn(async move {
        untouched.commit().await?;
        adjusted.commit().await?;
        Ok::<_, Error>((untouched, adjusted))
    });
    let (untouched, adjusted) = committed.await.unwrap().unwrap();
    assert!(untouched.is_closed() && adjusted.is_closed());
    assert_eq!(
        l.available("u1", "api", Some(&[tpm(1000)])).await.unwrap()["tpm"],
        1000 - 100 - 175
    );
    assert!(matches!(adjusted.commit().await, Err(Error::LeaseClosed)));
}

pub async fn committed_adjustments_are_rolled_back_too(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let lease = l
        .acquire("u1", "api")
        .limits([tpm(1000)])
        .consume([("tpm", 100)])
        .await
        .unwrap();
    lease.adjust([("tpm", 50)]).await.unwrap();
    lease.commit().await.unwrap();
    assert!(matches!(lease.rollback().await, Err(Error::LeaseClosed)));
    assert_eq!(
        l.available("u1", "api", Some(&[tpm(1000)])).await.unwrap()["tpm"],
        850
    );
}

pub async fn dropped_lease_rolls_back(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    {
        let _lease = l
            .acquire("u1", "api")
            .limits([rpm(10)])
            .consume([("rpm", 4)])
            .await
            .unwrap();
        assert_eq!(
            l.available("u1", "api", Some(&[rpm(10)])).await.unwrap()["rpm"],
            6
        );
    }
    // The rollback runs in the background when the backend does not answer at once.
    for _ in 0..200 {
        if l.available("u1", "api", Some(&[rpm(10)])).await.unwrap()["rpm"] == 10 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("dropped lease was not rolled back");
}

pub async fn refunds_never_exceed_capacity(repo: Arc<dyn Repository>) {
    let (l, clock) = limiter(repo);
    let lease = l
        .acquire("u1", "api")
        .limits([rpm(10)])
        .consume([("rpm", 10)])
        .await
        .unwrap();
    // The bucket refills fully while the lease is held...
    clock.advance(Duration::from_secs(60));
    lease.rollback().await.unwrap();
    // ...so the refund must not lift it above capacity.
    assert_eq!(
        l.available("u1", "api", Some(&[rpm(10)])).await.unwrap()["rpm"],
        10
    );
    let states = l.bucket_states("u1", "api").await.unwrap();
    assert!(states["rpm"].tokens_milli <= 10_000);
    for _ in 0..10 {
        admit(l.acquire("u1", "api").limits([rpm(10)])).await;
    }
    rejected(l.acquire("u1", "api").limits([rpm(10)]).await);
}

pub async fn refill_is_exact_under_continuous_admission(repo: Arc<dyn Repository>) {
    // A 100-per-minute key admitting continuously admits 100 a minute plus its capacity.
    let (l, clock) = limiter(repo);
    let mut admitted = 0;
    for _ in 0..(60_000 / 7) {
        match l.acquire("u1", "api").limits([rpm(100)]).await {
            Ok(lease) => {
                lease.commit().await.unwrap();
                admitted += 1;
            }
            Err(Error::RateLimited(_)) => {}
            Err(e) => panic!("{e}"),
        }
        clock.advance(Duration::from_millis(7));
    }
    // 8,571 attempts over 59,997 ms: capacity 100 plus 99 refilled (the 100th lands at 60 s).
    assert_eq!(admitted, 199);
}

pub async fn slow_limit_sharing_an_item_refills_exactly(repo: Arc<dyn Repository>) {
    // A 1-per-day limit on the same item as a 1,000-per-second limit written every 3 ms
    // still regains exactly 1 token a day.
    let (l, clock) = limiter(repo);
    let limits = [Limit::per_day("rpd", 1), Limit::per_second("rps", 1000)];
    admit(
        l.acquire("u1", "api")
            .limits(limits.clone())
            .consume([("rpd", 1)]),
    )
    .await;
    let step = Duration::from_millis(3);
    let day_ms = 86_400_000u64;
    let mut elapsed = 0u64;
    // Busy writes for the first ten seconds, then jump to just before the day is up.
    while elapsed < 10_000 {
        admit(
            l.acquire("u1", "api")
                .limits(limits.clone())
                .consume([("rps", 1)]),
        )
        .await;
        clock.advance(step);
        elapsed += 3;
    }
    clock.advance(Duration::from_millis(day_ms - elapsed - 1));
    admit(
        l.acquire("u1", "api")
            .limits(limits.clone())
            .consume([("rps", 1)]),
    )
    .await;
    rejected(
        l.acquire("u1", "api")
            .limits(limits.clone())
            .consume([("rpd", 1)])
            .await,
    );
    clock.advance(Duration::from_millis(1));
    admit(l.acquire("u1", "api").limits(limits).consume([("rpd", 1)])).await;
}

pub async fn config_hierarchy_precedence(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let err = l.resolve_limits("u1", "api").await.unwrap_err();
    assert!(matches!(&err, Error::Validation { field, .. } if field == "limits"));
    assert!(matches!(
        l.acquire("u1", "api").await,
        Err(Error::Validation { .. })
    ));
    // Fallback only when nothing is stored.
    let lease = l
        .acquire("u1", "api")
        .fallback_limits([rpm(3)])
        .await
        .unwrap();
    assert_eq!(lease.statuses()[0].limit, rpm(3));
    lease.commit().await.unwrap();

    l.set_system_limits(&[rpm(10)]).await.unwrap();
    assert_eq!(
        l.resolve_limits("u1", "api").await.unwrap().2,
        ConfigSource::System
    );
    l.set_resource_limits("api", &[rpm(20)]).await.unwrap();
    assert_eq!(
        l.resolve_limits("u1", "api").await.unwrap().2,
        ConfigSource::Resource
    );
    l.set_entity_limits("u1", "_default_", &[rpm(30)])
        .await
        .unwrap();
    assert_eq!(
        l.resolve_limits("u1", "api").await.unwrap().2,
        ConfigSource::EntityDefault
    );
    l.set_entity_limits("u1", "api", &[rpm(40)]).await.unwrap();
    let (limits, policy, source) = l.resolve_limits("u1", "api").await.unwrap();
    assert_eq!(
        (limits, policy, source),
        (vec![rpm(40)], OnUnavailable::Block, ConfigSource::Entity)
    );
    // Other entities and resources fall through to their own levels.
    assert_eq!(
        l.resolve_limits("u2", "api").await.unwrap().0,
        vec![rpm(20)]
    );
    assert_eq!(
        l.resolve_limits("u1", "other").await.unwrap().0,
        vec![rpm(30)]
    );
    assert_eq!(
        l.resolve_limits("u2", "other").await.unwrap().0,
        vec![rpm(10)]
    );
    // Stored limits beat the fallback; explicit limits beat everything.
    let lease = l
        .acquire("u2", "other")
        .fallback_limits([rpm(3)])
        .await
        .unwrap();
    assert_eq!(lease.statuses()[0].limit, rpm(10));
    lease.commit().await.unwrap();
    let lease = l.acquire("u1", "api").limits([rpm(5)]).await.unwrap();
    assert_eq!(lease.statuses()[0].limit, rpm(5));
    lease.commit().await.unwrap();

    assert_eq!(
        l.get_entity_limits("u1", "api").await.unwrap(),
        Some(vec![rpm(40)])
    );
    assert!(l.delete_entity_limits("u1", "api").await.unwrap());
    assert!(!l.delete_entity_limits("u1", "api").await.unwrap());
    assert_eq!(
        l.resolve_limits("u1", "api").await.unwrap().2,
        ConfigSource::EntityDefault
    );
    assert!(l.delete_entity_limits("u1", "_default_").await.unwrap());
    assert!(l.delete_resource_limits("api").await.unwrap());
    assert_eq!(l.get_resource_limits("api").await.unwrap(), None);
    assert_eq!(l.get_system_limits().await.unwrap(), Some(vec![rpm(10)]));
    assert_eq!(
        l.resolve_limits("u1", "api").await.unwrap().2,
        ConfigSource::System
    );
    assert!(l.delete_system_limits().await.unwrap());
    assert!(l.resolve_limits("u1", "api").await.is_err());
}

pub async fn stored_on_unavailable_is_resolved(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    l.set_system_limits(&[rpm(1)]).await.unwrap();
    assert_eq!(
        l.resolve_limits("u1", "api").await.unwrap().1,
        OnUnavailable::Block
    );
    l.set_on_unavailable(Some(OnUnavailable::Allow))
        .await
        .unwrap();
    assert_eq!(
        l.resolve_limits("u1", "api").await.unwrap().1,
        OnUnavailable::Allow
    );
}

pub async fn stored_limits_are_listed(repo: Arc<dyn Repository>) {
    use zae_limiter::repository::ConfigScope;
    let (l, _) = limiter(repo);
    assert!(l.list_limits().await.unwrap().is_empty());
    assert_eq!(l.get_on_unavailable().await.unwrap(), None);
    l.set_system_limits(&[rpm(100)]).await.unwrap();
    l.set_resource_limits("gpt-4", &[rpm(10), tpm(1000)])
        .await
        .unwrap();
    l.set_resource_limits("openai/gpt-4o", &[rpm(20)])
        .await
        .unwrap();
    l.set_entity_limits("key-1", "_default_", &[rpm(5)])
        .await
        .unwrap();
    l.set_entity_limits("key-1", "gpt-4", &[tpm(50)])
        .await
        .unwrap();
    // Entity records, buckets and audit events are not limits.
    l.create_entity("key-1").await.unwrap();
    admit(l.acquire("key-1", "gpt-4")).await;
    l.set_on_unavailable(Some(OnUnavailable::Allow))
        .await
        .unwrap();
    assert_eq!(
        l.get_on_unavailable().await.unwrap(),
        Some(OnUnavailable::Allow)
    );
    let entity = |r: &str| ConfigScope::Entity {
        entity_id: "key-1".into(),
        resource: r.into(),
    };
    let sorted = |mut v: Vec<Limit>| {
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    };
    let listed: Vec<(ConfigScope, Vec<Limit>)> = l
        .list_limits()
        .await
        .unwrap()
        .into_iter()
        .map(|(s, v)| (s, sorted(v)))
        .collect();
    assert_eq!(
        listed,
        vec![
            (ConfigScope::System, vec![rpm(100)]),
            (
                ConfigScope::Resource("gpt-4".into()),
                vec![rpm(10), tpm(1000)]
            ),
            (ConfigScope::Resource("openai/gpt-4o".into()), vec![rpm(20)]),
            (entity("_default_"), vec![rpm(5)]),
            (entity("gpt-4"), vec![tpm(50)]),
        ]
    );
    // The system record keeps its policy without limits: not listed as limits.
    l.delete_system_limits().await.unwrap();
    l.delete_entity_limits("key-1", "gpt-4").await.unwrap();
    let scopes: Vec<ConfigScope> = l
        .list_limits()
        .await
        .unwrap()
        .into_iter()
        .map(|(s, _)| s)
        .collect();
    assert_eq!(
        scopes,
        vec![
            ConfigScope::Resource("gpt-4".into()),
            ConfigScope::Resource("openai/gpt-4o".into()),
            entity("_default_"),
        ]
    );
    assert_eq!(
        l.get_on_unavailable().await.unwrap(),
        Some(OnUnavailable::Allow)
    );
}

pub async fn config_cache_counts_and_expires(repo: Arc<dyn Repository>) {
    let (l, clock) = limiter(Arc::clone(&repo));
    l.set_resource_limits("api", &[rpm(10)]).await.unwrap();
    admit(l.acquire("u1", "api")).await;
    admit(l.acquire("u1", "api")).await;
    let stats = l.cache_stats();
    assert_eq!((stats.hits, stats.misses, stats.size), (1, 1, 1));
    assert_eq!(stats.ttl, Duration::from_secs(60));
    // A change made elsewhere (another process, another limiter) shows after the TTL, or
    // at once on a backend that reports a config version.
    let versioned = repo.config_version().is_some();
    let (other, _) = limiter(repo);
    other.set_resource_limits("api", &[rpm(1)]).await.unwrap();
    let lease = l.acquire("u1", "api").await.unwrap();
    let before_ttl = if versioned { rpm(1) } else { rpm(10) };
    assert_eq!(lease.statuses()[0].limit, before_ttl);
    lease.commit().await.unwrap();
    clock.advance(Duration::from_secs(60));
    let lease = l.acquire("u1", "api").await.unwrap();
    assert_eq!(lease.statuses()[0].limit, rpm(1));
    lease.rollback().await.unwrap();
    // Changes through this limiter show at once.
    l.set_resource_limits("api", &[rpm(7)]).await.unwrap();
    assert_eq!(l.cache_stats().size, 0);
    assert_eq!(l.resolve_limits("u1", "api").await.unwrap().0, vec![rpm(7)]);
    l.invalidate_config_cache();
    assert_eq!(l.cache_stats().size, 0);
}

pub async fn added_limit_starts_full_and_removed_limit_stops(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    l.set_resource_limits("api", &[rpm(2)]).await.unwrap();
    for _ in 0..2 {
        admit(l.acquire("u1", "api")).await;
    }
    rejected(l.acquire("u1", "api").await);
    // Replace rpm with tpm: rpm is no longer enforced, tpm starts full.
    l.set_resource_limits("api", &[tpm(5)]).await.unwrap();
    let lease = l.acquire("u1", "api").consume([("tpm", 5)]).await.unwrap();
    assert_eq!(lease.statuses().len(), 1);
    assert_eq!(lease.statuses()[0].available, 5);
    lease.commit().await.unwrap();
}

pub async fn raised_limit_applies_from_the_change(repo: Arc<dyn Repository>) {
    // A drained 1-per-day bucket whose limit is raised to 1 per second must refill at the
    // new rate from the moment the new limit is first used, even though every acquire
    // since is rejected (and a rejection consumes nothing).
    let (l, clock) = limiter(repo);
    let daily = [Limit::per_day("calls", 1)];
    let fast = [Limit::per_second("calls", 1)];
    admit(l.acquire("u1", "api").limits(daily.clone())).await;
    clock.advance(Duration::from_secs(1));
    rejected(l.acquire("u1", "api").limits(daily).await);
    let first = rejected(l.acquire("u1", "api").limits(fast.clone()).await);
    assert!(first.retry_after() <= Duration::from_secs(1), "{first:?}");
    clock.advance(Duration::from_millis(1_100));
    admit(l.acquire("u1", "api").limits(fast.clone())).await;
    rejected(l.acquire("u1", "api").limits(fast.clone()).await);
    clock.advance(Duration::from_millis(1_000));
    admit(l.acquire("u1", "api").limits(fast)).await;
}

pub async fn capacity_cut_clamps_tokens(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    admit(
        l.acquire("u1", "api")
            .limits([rpm(100)])
            .consume([("rpm", 1)]),
    )
    .await;
    let avail = l.available("u1", "api", Some(&[rpm(10)])).await.unwrap();
    assert_eq!(avail["rpm"], 10);
    for _ in 0..10 {
        admit(l.acquire("u1", "api").limits([rpm(10)])).await;
    }
    rejected(l.acquire("u1", "api").limits([rpm(10)]).await);
}

pub async fn entities_crud(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let p = l
        .create_entity("proj-1")
        .name("Project One")
        .metadata("tier", "pro")
        .await
        .unwrap();
    assert_eq!((p.name.as_str(), p.is_parent()), ("Project One", true));
    assert_eq!(p.created_at_ms, T0);
    let c = l
        .create_entity("key-1")
        .parent("proj-1")
        .cascade(true)
        .await
        .unwrap();
    assert_eq!(c.name, "key-1");
    l.create_entity("key-2").parent("proj-1").await.unwrap();
    assert!(matches!(
        l.create_entity("key-1").await,
        Err(Error::EntityExists { .. })
    ));
    assert!(matches!(
        l.create_entity("bad#id").await,
        Err(Error::InvalidIdentifier { .. })
    ));
    assert!(matches!(
        l.create_entity("k").parent("-x").await,
        Err(Error::InvalidIdentifier { field, .. }) if field == "parent_id"
    ));
    assert!(matches!(
        l.create_entity("k").parent("k").await,
        Err(Error::Validation { .. })
    ));
    assert_eq!(l.get_entity("proj-1").await.unwrap(), Some(p));
    assert_eq!(l.get_entity("nobody").await.unwrap(), None);
    let children: Vec<String> = l
        .get_children("proj-1")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(children, ["key-1", "key-2"]);
    l.set_entity_limits("key-2", "api", &[rpm(5)])
        .await
        .unwrap();
    admit(l.acquire("key-2", "api")).await;
    l.delete_entity("key-2").await.unwrap();
    assert_eq!(l.get_entity("key-2").await.unwrap(), None);
    assert_eq!(l.get_entity_limits("key-2", "api").await.unwrap(), None);
    assert!(l.bucket_states("key-2", "api").await.unwrap().is_empty());
    assert!(matches!(
        l.delete_entity("key-2").await,
        Err(Error::EntityNotFound { .. })
    ));
    assert_eq!(l.get_children("proj-1").await.unwrap().len(), 1);
}

pub async fn cascade_charges_parent_all_or_nothing(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    l.create_entity("proj").await.unwrap();
    l.create_entity("key-a")
        .parent("proj")
        .cascade(true)
        .await
        .unwrap();
    l.create_entity("key-b")
        .parent("proj")
        .cascade(true)
        .await
        .unwrap();
    l.set_entity_limits("proj", "llm", &[tpm(100)])
        .await
        .unwrap();
    l.set_resource_limits("llm", &[tpm(80)]).await.unwrap();

    let lease = l
        .acquire("key-a", "llm")
        .consume([("tpm", 60)])
        .await
        .unwrap();
    assert_eq!(lease.statuses().len(), 2);
    assert_eq!(lease.statuses()[1].entity_id, "proj");
    assert_eq!(lease.statuses()[1].limit, tpm(100));
    lease.adjust([("tpm", 10)]).await.unwrap();
    lease.commit().await.unwrap();
    assert_eq!(l.available("proj", "llm", None).await.unwrap()["tpm"], 30);
    assert_eq!(l.available("key-a", "llm", None).await.unwrap()["tpm"], 10);

    // key-b has 80 of its own, but the parent has only 30: nothing is consumed anywhere.
    let e = rejected(l.acquire("key-b", "llm").consume([("tpm", 40)]).await);
    let violation = e.primary_violation();
    assert_eq!(violation.entity_id, "proj");
    assert_eq!(l.available("key-b", "llm", None).await.unwrap()["tpm"], 80);
    assert_eq!(l.available("proj", "llm", None).await.unwrap()["tpm"], 30);

    // Rollback returns to both sides.
    let lease = l
        .acquire("key-b", "llm")
        .consume([("tpm", 30)])
        .await
        .unwrap();
    assert_eq!(l.available("proj", "llm", None).await.unwrap()["tpm"], 0);
    lease.rollback().await.unwrap();
    assert_eq!(l.available("proj", "llm", None).await.unwrap()["tpm"], 30);
    assert_eq!(l.available("key-b", "llm", None).await.unwrap()["tpm"], 80);

    // cascade(false) leaves the parent alone.
    admit(
        l.acquire("key-b", "llm")
            .consume([("tpm", 50)])
            .cascade(false),
    )
    .await;
    assert_eq!(l.available("proj", "llm", None).await.unwrap()["tpm"], 30);
}

pub async fn cascade_is_off_unless_set(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    l.create_entity("proj").await.unwrap();
    l.create_entity("key").parent("proj").await.unwrap();
    l.set_system_limits(&[rpm(5)]).await.unwrap();
    let lease = l.acquire("key", "api").await.unwrap();
    assert_eq!(lease.statuses().len(), 1);
    lease.commit().await.unwrap();
    // Forced on per call.
    let lease = l.acquire("key", "api").cascade(true).await.unwrap();
    assert_eq!(lease.statuses().len(), 2);
    lease.commit().await.unwrap();
    // An entity that was never created works, with no parent.
    let lease = l.acquire("ghost", "api").cascade(true).await.unwrap();
    assert_eq!(lease.statuses().len(), 1);
    lease.commit().await.unwrap();
}

pub async fn availability_queries(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let limits = [rpm(60), tpm(6000)];
    assert_eq!(
        l.available("u1", "api", Some(&limits)).await.unwrap()["tpm"],
        6000
    );
    admit(
        l.acquire("u1", "api")
            .limits(limits.clone())
            .consume([("rpm", 60), ("tpm", 3000)]),
    )
    .await;
    let wait = l
        .time_until_available("u1", "api", [("rpm", 3), ("tpm", 3000)], Some(&limits))
        .await
        .unwrap();
    assert_eq!(wait, Duration::from_secs(3));
    let none = l
        .time_until_available("u1", "api", [("tpm", 100)], Some(&limits))
        .await
        .unwrap();
    assert_eq!(none, Duration::ZERO);
    let err = l
        .time_until_available("u1", "api", [("tpm", 6001)], Some(&limits))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Validation { .. }));
}

pub async fn concurrent_leases_with_adjusts_are_exact(repo: Arc<dyn Repository>) {
    // From the reference suite: two concurrent leases with adjusts end at 950 of 1000 and
    // consumed = 50,000 millitokens.
    let (l, _) = limiter(repo);
    let limits = [Limit::per_minute("tpm", 1000)];
    let a = l
        .acquire("u1", "api")
        .limits(limits.clone())
        .consume([("tpm", 10)])
        .await
        .unwrap();
    let b = l
        .acquire("u1", "api")
        .limits(limits.clone())
        .consume([("tpm", 20)])
        .await
        .unwrap();
    a.adjust([("tpm", 5)]).await.unwrap();
    b.adjust([("tpm", 15)]).await.unwrap();
    let (ra, rb) = tokio::join!(a.commit(), b.commit());
    ra.unwrap();
    rb.unwrap();
    assert_eq!(
        l.available("u1", "api", Some(&limits)).await.unwrap()["tpm"],
        950
    );
    assert_eq!(
        l.bucket_states("u1", "api").await.unwrap()["tpm"].total_consumed_milli,
        50_000
    );
}

/// A lease of 10 tokens from u1's `tpm` limit of 100 on `api`.
async fn ten_of_a_hundred(l: &RateLimiter) -> zae_limiter::Lease {
    l.acquire("u1", "api")
        .limits([tpm(100)])
        .consume([("tpm", 10)])
        .await
        .unwrap()
}

pub async fn lease_handle_shares_the_lease(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let lease = ten_of_a_hundred(&l).await;
    let handle = lease.handle();
    handle.adjust([("tpm", 15)]).unwrap();
    assert_eq!(lease.consumed()["tpm"], 25);
    assert_eq!(handle.entity_id(), "u1");
    lease.commit().await.unwrap();
    assert!(handle.is_closed());
    assert!(matches!(
        handle.adjust([("tpm", 1)]),
        Err(Error::LeaseClosed)
    ));
    assert_eq!(
        l.available("u1", "api", Some(&[tpm(100)])).await.unwrap()["tpm"],
        75
    );
}

/// A lease committed with nothing adjusted (closed without its lock) is as closed as any:
/// to a handle made before or after, to a second commit, to a rollback.
pub async fn an_unadjusted_commit_closes_the_lease_for_everyone(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let lease = ten_of_a_hundred(&l).await;
    let before = lease.handle();
    lease.commit().await.unwrap();
    let after = lease.handle();
    assert!(lease.is_closed() && before.is_closed() && after.is_closed());
    for handle in [&before, &after] {
        assert!(matches!(
            handle.adjust([("tpm", 5)]),
            Err(Error::LeaseClosed)
        ));
    }
    assert!(matches!(lease.commit().await, Err(Error::LeaseClosed)));
    assert!(matches!(lease.rollback().await, Err(Error::LeaseClosed)));
    assert!(format!("{lease:?}").contains("closed: true"), "{lease:?}");
    assert_eq!(lease.consumed()["tpm"], 10);
    assert_eq!(
        l.available("u1", "api", Some(&[tpm(100)])).await.unwrap()["tpm"],
        90
    );
}

/// Many tasks at once, each trying `attempts` acquires of 1 at the clock's current time;
/// returns how many were admitted (and committed). Any error but a rejection fails.
async fn burst(l: &RateLimiter, limits: &[Limit], tasks: usize, attempts: usize) -> u64 {
    let mut handles = Vec::new();
    for _ in 0..tasks {
        let (l, limits) = (l.clone(), limits.to_vec());
        handles.push(tokio::spawn(async move {
            let mut admitted = 0u64;
            for _ in 0..attempts {
                match l.acquire("burst", "api").limits(limits.clone()).await {
                    Ok(lease) => {
                        lease.commit().await.unwrap();
                        admitted += 1;
                    }
                    Err(Error::RateLimited(_)) => {}
                    Err(e) => panic!("a burst saw an error that is not a rejection: {e:?}"),
                }
            }
            admitted
        }));
    }
    sum(handles).await
}

/// The sum of what the tasks returned.
async fn sum(handles: Vec<tokio::task::JoinHandle<u64>>) -> u64 {
    let mut total = 0;
    for h in handles {
        total += h.await.unwrap();
    }
    total
}

/// Bursts of 8 tasks every 100 ms for 3 s from the clock's time; returns what was admitted
/// and checks it against capacity + refill over the span (+ the DynamoDB fresh-`rf`
/// slack of max(1 token, 1% of capacity), DESIGN section 9).
async fn burst_for_three_seconds(l: &RateLimiter, clock: &ManualClock, limit: &Limit) -> u64 {
    let mut admitted = 0;
    let rounds = 30;
    for round in 0..rounds {
        admitted += burst(l, std::slice::from_ref(limit), 8, 4).await;
        if round + 1 < rounds {
            clock.advance(Duration::from_millis(100));
        }
    }
    let span_ms = (rounds - 1) * 100;
    let refill = limit.refill_amount * span_ms / (limit.refill_period_seconds * 1000);
    let slack = (limit.capacity / 100).max(1);
    assert!(
        admitted <= limit.capacity + refill + slack,
        "admitted {admitted} over {span_ms} ms where at most {} + {refill} (+{slack}) are due",
        limit.capacity
    );
    assert!(
        admitted >= limit.capacity,
        "admitted only {admitted} of a full bucket of {}",
        limit.capacity
    );
    admitted
}

async fn consumed_milli(l: &RateLimiter, entity: &str, name: &str) -> i64 {
    l.bucket_states(entity, "api").await.unwrap()[name].total_consumed_milli
}

/// Bursts for three seconds (see `burst_for_three_seconds`), then checks that the stored
/// consumption is what the burst admitted plus `kept_before` tokens, exactly.
async fn burst_and_check(l: &RateLimiter, clock: &ManualClock, limit: &Limit, kept_before: i64) {
    let admitted = burst_for_three_seconds(l, clock, limit).await;
    assert_eq!(
        consumed_milli(l, "burst", &limit.name).await,
        (admitted as i64 + kept_before) * 1000
    );
}

pub async fn burst_after_idle_admits_capacity_not_twice(repo: Arc<dyn Repository>) {
    let (l, clock) = limiter(repo);
    let limit = rpm(100);
    admit(l.acquire("burst", "api").limits([limit.clone()])).await;
    clock.advance(Duration::from_secs(65));
    burst_and_check(&l, &clock, &limit, 1).await;
}

pub async fn burst_after_idle_following_a_rollback(repo: Arc<dyn Repository>) {
    let (l, clock) = limiter(repo);
    let limit = rpm(100);
    let lease = l
        .acquire("burst", "api")
        .limits([limit.clone()])
        .consume([("rpm", 30)])
        .await
        .unwrap();
    clock.advance(Duration::from_secs(5));
    lease.rollback().await.unwrap();
    clock.advance(Duration::from_secs(65));
    burst_and_check(&l, &clock, &limit, 0).await;
}

pub async fn burst_after_idle_following_a_debt(repo: Arc<dyn Repository>) {
    let (l, clock) = limiter(repo);
    let limit = rpm(100);
    let lease = l
        .acquire("burst", "api")
        .limits([limit.clone()])
        .await
        .unwrap();
    lease.adjust([("rpm", 149)]).await.unwrap();
    lease.commit().await.unwrap();
    // 50 in debt: 90 s to fill; idle past that.
    clock.advance(Duration::from_secs(95));
    burst_and_check(&l, &clock, &limit, 150).await;
}

pub async fn debit_after_a_long_hold_is_not_forgiven(repo: Arc<dyn Repository>) {
    // A lease held 30 s then charged its true cost: the bucket was full (99 + 50 refilled,
    // capped at 100) when the 99 were taken, so 1 token is left, not 50.
    let (l, clock) = limiter(repo);
    let limit = rpm(100);
    let lease = l
        .acquire("burst", "api")
        .limits([limit.clone()])
        .await
        .unwrap();
    clock.advance(Duration::from_secs(30));
    lease.adjust([("rpm", 99)]).await.unwrap();
    lease.commit().await.unwrap();
    assert_eq!(
        l.available("burst", "api", Some(std::slice::from_ref(&limit)))
            .await
            .unwrap()["rpm"],
        1
    );
    assert_eq!(burst(&l, &[limit], 8, 4).await, 1);
}

pub async fn debt_is_bounded_with_a_typed_error(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let limits = [tpm(100)];
    let max = zae_limiter::limit::MAX_TOKENS as i64;
    // Twelve leases, each then charged the most one lease may hold.
    let mut open = Vec::new();
    for _ in 0..12 {
        let lease = l
            .acquire("u1", "api")
            .limits(limits.clone())
            .consume([("tpm", 1)])
            .await
            .unwrap();
        lease.adjust([("tpm", max - 1)]).await.unwrap();
        open.push(lease);
    }
    let mut refused = 0;
    let mut leases = Vec::new();
    for lease in open {
        match lease.commit().await {
            Ok(()) => {}
            Err(e @ Error::Validation { .. }) => {
                assert!(e.to_string().contains("debt"), "{e}");
                refused += 1;
                leases.push(lease);
            }
            Err(e) => panic!("expected a validation error, got {e:?}"),
        }
    }
    assert_eq!(refused, 11, "debt past the bound was accepted");
    // The bucket is intact: deep in debt, rejecting, never reported full or unavailable.
    let states = l.bucket_states("u1", "api").await.unwrap();
    let state = states.get("tpm").expect("the bucket survives");
    assert!(state.tokens_milli >= zae_limiter::bucket::MIN_TOKENS_MILLI);
    assert!(state.tokens_milli < 0);
    assert!(l.available("u1", "api", Some(&limits)).await.unwrap()["tpm"] < 0);
    rejected(l.acquire("u1", "api").limits(limits.clone()).await);
    // The refused leases still hold their acquire, and roll back cleanly.
    for lease in leases {
        lease.rollback().await.unwrap();
    }
}

pub async fn repeated_names_are_checked_before_any_write(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let max = zae_limiter::limit::MAX_TOKENS;
    let err = l
        .acquire("u1", "api")
        .limits([tpm(100)])
        .consume([("tpm", max), ("tpm", 1)])
        .await
        .unwrap_err();
    match &err {
        Error::Validation { field, .. } => assert_eq!(field, "consume.tpm"),
        other => panic!("expected a validation error, got {other:?}"),
    }
    // The most negative amount there is: a typed error, never an overflow.
    let err = l
        .acquire("u1", "api")
        .limits([tpm(100)])
        .consume([("tpm", i128::MIN)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Validation { .. }), "{err:?}");
    let lease = l
        .acquire("u1", "api")
        .limits([tpm(100)])
        .consume([("tpm", 1)])
        .await
        .unwrap();
    let err = lease.adjust([("tpm", i128::MIN)]).await.unwrap_err();
    assert!(matches!(err, Error::Validation { .. }), "{err:?}");
    lease.rollback().await.unwrap();
    // Repeated names within bounds add up.
    let lease = l
        .acquire("u1", "api")
        .limits([tpm(100)])
        .consume([("tpm", 30), ("tpm", 20)])
        .await
        .unwrap();
    assert_eq!(lease.consumed()["tpm"], 50);
    lease.commit().await.unwrap();
    assert!(l.bucket_states("u1", "api").await.unwrap()["tpm"].total_consumed_milli == 50_000);
}

pub async fn contended_cascade_is_exact_and_never_unavailable(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    l.create_entity("proj").await.unwrap();
    for c in 0..8 {
        l.create_entity(format!("key-{c}"))
            .parent("proj")
            .cascade(true)
            .await
            .unwrap();
    }
    l.set_entity_limits("proj", "api", &[rpm(40)])
        .await
        .unwrap();
    l.set_resource_limits("api", &[rpm(10)]).await.unwrap();
    let mut handles = Vec::new();
    for t in 0..32usize {
        let l = l.clone();
        handles.push(tokio::spawn(async move {
            let key = format!("key-{}", t % 8);
            let mut kept = 0u64;
            for n in 0..4 {
                match l.acquire(key.as_str(), "api").await {
                    Ok(lease) if n % 2 == 0 => lease.rollback().await.unwrap(),
                    Ok(lease) => {
                        lease.commit().await.unwrap();
                        kept += 1;
                    }
                    Err(Error::RateLimited(_)) => {}
                    Err(e) => panic!("contention reported as an error: {e:?}"),
                }
            }
            kept
        }));
    }
    let kept = sum(handles).await;
    assert!(kept <= 40);
    let parent = consumed_milli(&l, "proj", "rpm").await;
    let mut children = 0;
    for c in 0..8 {
        let states = l.bucket_states(&format!("key-{c}"), "api").await.unwrap();
        children += states.get("rpm").map_or(0, |s| s.total_consumed_milli);
    }
    assert_eq!(parent, kept as i64 * 1000, "the parent's tc is exact");
    assert_eq!(children, kept as i64 * 1000, "every give-back landed");
}

pub async fn refund_when_another_limit_refills_by_less_than_a_millitoken(
    repo: Arc<dyn Repository>,
) {
    let (l, clock) = limiter(repo);
    let limits = [Limit::per_day("rpd", 1000), tpm(10_000)];
    for _ in 0..5 {
        let lease = l
            .acquire("u1", "api")
            .limits(limits.clone())
            .consume([("rpd", 1), ("tpm", 500)])
            .await
            .unwrap();
        // 1 ms of a 1,000-per-day refill is a hundredth of a millitoken: only the carry moves.
        clock.advance(Duration::from_millis(1));
        lease.adjust([("tpm", -200)]).await.unwrap();
        lease.commit().await.unwrap();
    }
    let states = l.bucket_states("u1", "api").await.unwrap();
    assert_eq!(states["tpm"].total_consumed_milli, 1_500_000);
    assert_eq!(states["rpd"].total_consumed_milli, 5_000);
}

pub async fn cascade_with_nothing_to_take_from_one_side(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    l.create_entity("proj").await.unwrap();
    l.create_entity("key")
        .parent("proj")
        .cascade(true)
        .await
        .unwrap();
    // The parent's limits are named differently from the child's.
    l.set_entity_limits("proj", "api", &[Limit::per_minute("proj_rpm", 5)])
        .await
        .unwrap();
    l.set_entity_limits("key", "api", &[rpm(3)]).await.unwrap();
    for _ in 0..3 {
        let lease = l.acquire("key", "api").consume([("rpm", 1)]).await.unwrap();
        assert_eq!(lease.statuses().len(), 2);
        lease.commit().await.unwrap();
    }
    rejected(l.acquire("key", "api").consume([("rpm", 1)]).await);
    // And the other way round: only the parent's limit is named.
    let lease = l
        .acquire("key", "api")
        .consume([("proj_rpm", 2)])
        .await
        .unwrap();
    lease.commit().await.unwrap();
    assert_eq!(
        l.available("proj", "api", None).await.unwrap()["proj_rpm"],
        3
    );
    assert_eq!(l.available("key", "api", None).await.unwrap()["rpm"], 0);
}

pub async fn disabled_resources_refuse_until_enabled(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    l.set_resource_limits("api", &[rpm(100)]).await.unwrap();
    l.acquire("k1", "api")
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    let disabled = |r: Result<zae_limiter::Lease, Error>| matches!(r, Err(Error::ResourceDisabled { ref resource, .. }) if resource == "api");
    l.disable_resource("api").await.unwrap();
    assert!(disabled(l.acquire("k1", "api").await));
    assert!(disabled(l.acquire("k2", "api").await));
    // Even with the caller's own limits: the switch is about the resource.
    assert!(disabled(l.acquire("k1", "api").limits([rpm(5)]).await));
    // An entity's explicit flag overrides the resource's, both ways.
    l.enable_entity("k1", "api").await.unwrap();
    l.acquire("k1", "api")
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    assert!(disabled(l.acquire("k2", "api").await));
    l.clear_entity_disabled("k1", "api").await.unwrap();
    assert!(disabled(l.acquire("k1", "api").await));
    l.enable_resource("api").await.unwrap();
    l.disable_entity("k2", "_default_").await.unwrap();
    l.acquire("k1", "api")
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    assert!(disabled(l.acquire("k2", "api").await));
    l.clear_entity_disabled("k2", "_default_").await.unwrap();
    l.clear_resource_disabled("api").await.unwrap();
    l.acquire("k2", "api")
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    // Nothing disabled took a token: 4 admitted in all.
    assert_eq!(l.available("k1", "api", None).await.unwrap()["rpm"], 97);
    assert_eq!(l.available("k2", "api", None).await.unwrap()["rpm"], 99);
}

/// A bypassed resource admits whatever the balance and counts every take (`tc`), taking
/// no tokens; a lease on it adjusts the count only; enabling it enforces the balance it
/// had, with no debt from the bypass.
pub async fn bypassed_resources_admit_and_count_without_taking(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    l.set_resource_limits("api", &[rpm(2)]).await.unwrap();
    admit(l.acquire("k1", "api")).await;
    let consumed = |l: RateLimiter, key: &'static str| async move {
        l.bucket_states(key, "api").await.unwrap()["rpm"].total_consumed_milli
    };
    l.bypass_resource("api").await.unwrap();
    // Five admitted with one token left, and three on a key never seen before.
    for _ in 0..5 {
        admit(l.acquire("k1", "api")).await;
    }
    for _ in 0..3 {
        admit(l.acquire("k2", "api")).await;
    }
    // A lease's changes move the count, never the tokens.
    let lease = l.acquire("k1", "api").await.unwrap();
    lease.adjust([("rpm", 4)]).await.unwrap();
    lease.adjust([("rpm", -2)]).await.unwrap();
    lease.commit().await.unwrap();
    l.acquire("k1", "api")
        .await
        .unwrap()
        .rollback()
        .await
        .unwrap();
    assert_eq!(consumed(l.clone(), "k1").await, (1 + 5 + 3) * 1000);
    assert_eq!(consumed(l.clone(), "k2").await, 3 * 1000);
    assert_eq!(l.available("k1", "api", None).await.unwrap()["rpm"], 1);
    // An entity's own flag overrides the resource's bypass.
    l.disable_entity("k2", "api").await.unwrap();
    assert!(matches!(
        l.acquire("k2", "api").await,
        Err(Error::ResourceDisabled { .. })
    ));
    // Enabled: the balance from before the bypass, no debt.
    l.enable_resource("api").await.unwrap();
    admit(l.acquire("k1", "api")).await;
    assert!(matches!(
        l.acquire("k1", "api").await,
        Err(Error::RateLimited(_))
    ));
    assert_eq!(consumed(l.clone(), "k1").await, 10 * 1000);
}

/// A bypassed child still charges an enforced parent, and is refused with it; a bypassed
/// parent never refuses its child.
pub async fn bypass_is_per_entity_in_a_cascade(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    l.create_entity("proj").await.unwrap();
    l.create_entity("key")
        .parent("proj")
        .cascade(true)
        .await
        .unwrap();
    l.set_entity_limits("key", "api", &[rpm(1)]).await.unwrap();
    l.set_entity_limits("proj", "api", &[rpm(3)]).await.unwrap();
    l.bypass_entity("key", "api").await.unwrap();
    for _ in 0..3 {
        admit(l.acquire("key", "api")).await;
    }
    let rejection = rejected(l.acquire("key", "api").await);
    assert!(
        rejection.violations().all(|s| s.entity_id == "proj"),
        "{rejection:?}"
    );
    assert_eq!(l.available("key", "api", None).await.unwrap()["rpm"], 1);
    assert_eq!(l.available("proj", "api", None).await.unwrap()["rpm"], 0);
    // The parent bypassed instead: the child's own limit decides.
    l.clear_entity_disabled("key", "api").await.unwrap();
    l.bypass_entity("proj", "api").await.unwrap();
    admit(l.acquire("key", "api")).await;
    assert!(matches!(
        l.acquire("key", "api").await,
        Err(Error::RateLimited(_))
    ));
    assert_eq!(
        l.bucket_states("proj", "api").await.unwrap()["rpm"].total_consumed_milli,
        4 * 1000
    );
}

/// A soft limit is charged and reported, into debt, and never refuses; the hard limits
/// beside it still do.
pub async fn soft_limits_charge_into_debt_and_never_refuse(repo: Arc<dyn Repository>) {
    let (l, _) = limiter(repo);
    let tpm_soft = tpm(10).soft();
    l.set_resource_limits("api", &[rpm(2), tpm_soft.clone()])
        .await
        .unwrap();
    assert_eq!(
        l.get_resource_limits("api").await.unwrap().unwrap(),
        vec![rpm(2), tpm_soft]
    );
    for _ in 0..2 {
        admit(l.acquire("k1", "api").consume([("rpm", 1), ("tpm", 8)])).await;
    }
    assert_eq!(l.available("k1", "api", None).await.unwrap()["tpm"], -6);
    // The hard limit refuses; the soft one is no violation.
    let rejection = rejected(
        l.acquire("k1", "api")
            .consume([("rpm", 1), ("tpm", 1)])
            .await,
    );
    assert!(
        rejection.violations().all(|s| s.limit.name == "rpm"),
        "{rejection:?}"
    );
    // A lease's extra charge goes further into debt; a refund comes back.
    let lease = l
        .acquire("k2", "api")
        .consume([("rpm", 1), ("tpm", 4)])
        .await
        .unwrap();
    lease.adjust([("tpm", 20)]).await.unwrap();
    lease.commit().await.unwrap();
    assert_eq!(l.available("k2", "api", None).await.unwrap()["tpm"], -14);
}

/// Declares one `#[tokio::test]` per suite case over a backend factory.
#[macro_export]
macro_rules! limiter_suite {
    ($make:expr) => {
        $crate::limiter_suite!(@cases $make;
            acquire_and_commit_consumes,
            default_consume_is_one_from_every_limit,
            multiple_limits_are_all_or_nothing,
            rejection_reports_exact_retry_after,
            request_above_capacity_is_unsatisfiable,
            unknown_names_are_ignored_and_negatives_rejected,
            invalid_input_is_a_typed_error,
            adjust_may_go_into_debt,
            negative_adjust_refunds_but_not_below_zero,
            adjust_is_checked_as_a_whole,
            rollback_returns_everything,
            committed_adjustments_are_rolled_back_too,
            a_commit_does_nothing_until_awaited,
            dropped_lease_rolls_back,
            refunds_never_exceed_capacity,
            refill_is_exact_under_continuous_admission,
            slow_limit_sharing_an_item_refills_exactly,
            config_hierarchy_precedence,
            stored_on_unavailable_is_resolved,
            stored_limits_are_listed,
            config_cache_counts_and_expires,
            added_limit_starts_full_and_removed_limit_stops,
            raised_limit_applies_from_the_change,
            capacity_cut_clamps_tokens,
            entities_crud,
            cascade_charges_parent_all_or_nothing,
            cascade_is_off_unless_set,
            availability_queries,
            concurrent_leases_with_adjusts_are_exact,
            lease_handle_shares_the_lease,
            an_unadjusted_commit_closes_the_lease_for_everyone,
            burst_after_idle_admits_capacity_not_twice,
            burst_after_idle_following_a_rollback,
            burst_after_idle_following_a_debt,
            debit_after_a_long_hold_is_not_forgiven,
            debt_is_bounded_with_a_typed_error,
            repeated_names_are_checked_before_any_write,
            contended_cascade_is_exact_and_never_unavailable,
            refund_when_another_limit_refills_by_less_than_a_millitoken,
            cascade_with_nothing_to_take_from_one_side,
            disabled_resources_refuse_until_enabled,
            bypassed_resources_admit_and_count_without_taking,
            bypass_is_per_entity_in_a_cascade,
            soft_limits_charge_into_debt_and_never_refuse,
            random_lease_histories_match_an_exact_model,
        );
    };
    (@cases $make:expr; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test]
            async fn $case() {
                let repo: std::sync::Arc<dyn zae_limiter::Repository> = $make.await;
                suite::$case(repo).await;
            }
        )*
    };
}

/// Random histories (fixed seed: the same ones every run; the in-process binary also runs
/// fresh random ones, shrunk on failure) of acquires, cascades, adjustments, commits,
/// rollbacks, dropped leases and abandoned acquires (on limits named by every acquire, or
/// stored with a parent limited by its own), each bucket checked against an exact
/// model after every step (see [`histories::run_fixed`]).
pub async fn random_lease_histories_match_an_exact_model(repo: Arc<dyn Repository>) {
    let (l, clock) = limiter(repo);
    histories::run_fixed(
        std::slice::from_ref(&l),
        &clock,
        "h",
        histories::Waits::OutsideFreshWindow,
    )
    .await;
}
