//! The limiter's counters, read back through a recorder (feature `metrics`).

use std::time::Duration;

use zae_limiter::{Error, Limit, OnUnavailable, RateLimiter};

use crate::common::Switchable;
use crate::metrics_snapshot::recording;

#[test]
fn decisions_limits_and_outages_are_counted_per_resource_and_limit() {
    let ((), recorded) = recording(|| async {
        let backend = Switchable::default();
        let limiter = RateLimiter::builder(backend.clone())
            .config_cache_ttl(Duration::ZERO)
            .build();
        let limits = [Limit::per_minute("rpm", 2), Limit::per_minute("tpm", 100)];
        let mut outcomes = Vec::new();
        for _ in 0..3 {
            let result = limiter
                .acquire("k1", "api")
                .limits(limits.clone())
                .consume([("rpm", 1), ("tpm", 10)])
                .await;
            outcomes.push(match result {
                Ok(lease) => {
                    lease.commit().await.unwrap();
                    "admitted"
                }
                Err(Error::RateLimited(_)) => "rejected",
                Err(e) => panic!("{e:?}"),
            });
        }
        assert_eq!(outcomes, ["admitted", "admitted", "rejected"]);
        // Another resource has counters of its own.
        limiter
            .acquire("k1", "search")
            .limits([Limit::per_minute("rpm", 5)])
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
        // Switched off: refused with its own outcome.
        limiter.disable_resource("api").await.unwrap();
        assert!(matches!(
            limiter.acquire("k2", "api").limits(limits.clone()).await,
            Err(Error::ResourceDisabled { .. })
        ));
        limiter.clear_resource_disabled("api").await.unwrap();
        // An outage: counted whether the policy admits or not.
        backend.set_down(true);
        let allowed = limiter
            .acquire("k3", "api")
            .limits(limits.clone())
            .on_unavailable(OnUnavailable::Allow)
            .await
            .unwrap();
        assert!(allowed.is_unlimited());
        assert!(limiter
            .acquire("k3", "api")
            .limits(limits.clone())
            .on_unavailable(OnUnavailable::Block)
            .await
            .is_err());
        // A lease whose rollback fails for good is a settle failure.
        backend.set_down(false);
        let lease = limiter
            .acquire("k4", "api")
            .limits([Limit::per_minute("rpm", 9)])
            .await
            .unwrap();
        backend.set_down(true);
        assert!(lease.rollback().await.is_err());
        backend.set_down(false);
        lease.rollback().await.unwrap();
    });
    let requests = |resource: &str, outcome: &str| {
        recorded.counter(
            "zae_limiter_requests_total",
            &[("resource", resource), ("outcome", outcome)],
        )
    };
    assert_eq!(requests("api", "admitted"), 3);
    assert_eq!(requests("api", "rejected"), 1);
    assert_eq!(requests("api", "disabled"), 1);
    assert_eq!(requests("api", "unavailable"), 2);
    assert_eq!(requests("search", "admitted"), 1);
    let checks = |limit: &str, outcome: &str| {
        recorded.counter(
            "zae_limiter_limit_checks_total",
            &[("resource", "api"), ("limit", limit), ("outcome", outcome)],
        )
    };
    // Three decided on rpm:2 + tpm, one more on rpm:9.
    assert_eq!(checks("rpm", "passed"), 3);
    assert_eq!(checks("rpm", "exceeded"), 1);
    assert_eq!(checks("tpm", "passed"), 3);
    assert_eq!(checks("tpm", "exceeded"), 0);
    assert_eq!(
        recorded.counter(
            "zae_limiter_lease_settle_failures_total",
            &[("resource", "api")]
        ),
        1
    );
}

#[test]
fn reservations_count_slice_admits_table_acquires_and_give_backs() {
    use zae_limiter::clock::ManualClock;
    use zae_limiter::reservations::Reservations;
    use zae_limiter::InMemoryRepository;

    let (stats, recorded) = recording(|| async {
        let clock = ManualClock::new(1_700_000_000_000);
        let limiter = RateLimiter::builder(InMemoryRepository::new())
            .clock(clock.clone())
            .reservations(Reservations::adaptive().hot_rate(10.0))
            .build();
        for _ in 0..500 {
            clock.advance(Duration::from_millis(1));
            limiter
                .acquire("hot", "api")
                .limits([Limit::per_second("rps", 1_000)])
                .await
                .unwrap()
                .commit()
                .await
                .unwrap();
        }
        limiter.release_reservations().await.unwrap();
        limiter.reservation_stats().unwrap()
    });
    let decisions = "zae_limiter_reservation_decisions_total";
    assert_eq!(
        recorded.counter(decisions, &[("resource", "api"), ("source", "slice")]),
        stats.local_admits
    );
    assert_eq!(
        recorded.counter(decisions, &[("resource", "api"), ("source", "table")]),
        stats.table_acquires
    );
    assert!(stats.local_admits > 300, "{stats:?}");
    assert!(
        recorded.counter(
            "zae_limiter_reservation_give_backs_total",
            &[("resource", "api")]
        ) >= 1
    );
}

/// Checks counted through a shared limit list (found by its identity, as the HTTP layer's
/// is) land on the same series as the same names counted one by one, in its order.
#[test]
fn a_shared_limit_list_counts_each_limit_on_its_own_series() {
    use std::sync::Arc;
    use zae_limiter::InMemoryRepository;

    let ((), recorded) = recording(|| async {
        let limiter = RateLimiter::new(InMemoryRepository::new());
        // tpm first: the list's order is not the names' order.
        let shared: Arc<[Limit]> =
            [Limit::per_minute("tpm", 100), Limit::per_minute("rpm", 3)].into();
        for _ in 0..4 {
            if let Ok(lease) = limiter
                .acquire("k1", "api")
                .shared_limits(Arc::clone(&shared))
                .await
            {
                lease.commit().await.unwrap();
            }
        }
        // A list of its own with the same names, and one with another name first.
        let own = [Limit::per_minute("rpm", 3), Limit::per_minute("tpm", 100)];
        limiter
            .acquire("k2", "api")
            .limits(own)
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
        let other = [Limit::per_minute("rph", 10), Limit::per_minute("tpm", 100)];
        limiter
            .acquire("k3", "api")
            .limits(other)
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
    });
    let checks = |limit: &str, outcome: &str| {
        recorded.counter(
            "zae_limiter_limit_checks_total",
            &[("resource", "api"), ("limit", limit), ("outcome", outcome)],
        )
    };
    // k1: three admitted, the fourth refused by rpm (tpm passed on all four).
    assert_eq!(checks("rpm", "passed"), 3 + 1);
    assert_eq!(checks("rpm", "exceeded"), 1);
    assert_eq!(checks("tpm", "passed"), 4 + 1 + 1);
    assert_eq!(checks("tpm", "exceeded"), 0);
    assert_eq!(checks("rph", "passed"), 1);
    let admitted = recorded.counter(
        "zae_limiter_requests_total",
        &[("resource", "api"), ("outcome", "admitted")],
    );
    assert_eq!(admitted, 5);
}
