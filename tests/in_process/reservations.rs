//! Reservations over the in-memory backend (the same layer runs over DynamoDB; see the
//! DynamoDB Local tests): hot keys are served from slices, nothing is ever admitted past
//! capacity plus refill, and once the slices are back the consumed counter equals what was
//! admitted, through idle periods, refunds, rollbacks, limit changes and cascades.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use zae_limiter::clock::ManualClock;
use zae_limiter::reservations::Reservations;
use zae_limiter::{Error, InMemoryRepository, Limit, RateLimiter, Repository};

use crate::common::Switchable;

const START_MS: i64 = 1_700_000_000_000;

/// A limiter with reservations over `repo` (kept by the caller to read the table's side),
/// hot from 10 requests a second.
fn reserving(repo: &InMemoryRepository, clock: &ManualClock) -> RateLimiter {
    RateLimiter::builder(repo.clone())
        .clock(clock.clone())
        .reservations(Reservations::adaptive().hot_rate(10.0))
        .build()
}

fn repo() -> InMemoryRepository {
    InMemoryRepository::builder().sweep_interval(None).build()
}

/// The backend's consumed counter for one limit, in whole tokens (exact: milli / 1000
/// with no remainder).
async fn consumed(repo: &InMemoryRepository, entity: &str, resource: &str, limit: &str) -> i64 {
    let states = repo.get_buckets(entity, resource).await.unwrap();
    let tc = states[limit].total_consumed_milli;
    assert_eq!(tc % 1000, 0, "{limit}: {tc} millitokens");
    tc / 1000
}

/// One acquire of 1 from `limits`, committed; whether it was admitted.
async fn take(limiter: &RateLimiter, entity: &str, limits: &[Limit]) -> bool {
    match limiter.acquire(entity, "api").limits(limits.to_vec()).await {
        Ok(lease) => {
            lease.commit().await.unwrap();
            true
        }
        Err(Error::RateLimited(_)) => false,
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn a_hot_key_is_served_from_slices_and_the_count_is_exact_once_they_are_back() {
    let (repo, clock) = (repo(), ManualClock::new(START_MS));
    let limiter = reserving(&repo, &clock);
    let limits = [Limit::per_second("rps", 1_000)];
    let mut admitted = 0;
    // Half the limit for 2 s: every request admitted, nearly all from slices.
    for _ in 0..2_000 {
        clock.advance(Duration::from_millis(2));
        assert!(take(&limiter, "key", &limits).await);
        admitted += 1;
    }
    let stats = limiter.reservation_stats().unwrap();
    assert!(
        stats.table_acquires * 20 < stats.local_admits,
        "{stats:?}: more than 0.05 backend acquires per decision"
    );
    // Then twice the limit for 3 s.
    let start = limiter.reservation_stats().unwrap();
    let mut requests = 0;
    let mut burst = 0;
    for _ in 0..3_000 {
        clock.advance(Duration::from_millis(1));
        for _ in 0..2 {
            requests += 1;
            burst += i64::from(take(&limiter, "key", &limits).await);
        }
    }
    // Never more than the capacity plus refill (the bucket was near full); at least 95%
    // of the refill (one node: nothing to share the slices with).
    assert!(burst <= 1_000 + 3_000, "{burst}");
    assert!(burst >= 2_850, "{burst}");
    // Drained, the table is asked about once per request the slices cannot cover, not
    // twice.
    let stats = limiter.reservation_stats().unwrap();
    let calls = stats.table_acquires - start.table_acquires;
    let local = stats.local_admits - start.local_admits;
    assert!(calls <= (requests - local) + 3_000 / 100 * 2, "{stats:?}");
    admitted += burst;
    let held = limiter.reservation("key", "api").unwrap().held;
    let returned = limiter.release_reservations().await.unwrap();
    assert!(returned <= 1, "{returned}");
    assert_eq!(
        consumed(&repo, "key", "api", "rps").await,
        admitted,
        "held {held:?}"
    );
    assert!(limiter.reservation("key", "api").unwrap().held.is_empty());
}

#[tokio::test]
async fn a_cold_key_goes_to_the_backend_as_without_reservations() {
    let (repo, clock) = (repo(), ManualClock::new(START_MS));
    let limiter = reserving(&repo, &clock);
    let limits = [Limit::per_minute("rpm", 100)];
    for _ in 0..5 {
        clock.advance(Duration::from_secs(1));
        assert!(take(&limiter, "quiet", &limits).await);
    }
    let stats = limiter.reservation_stats().unwrap();
    assert_eq!(stats.local_admits, 0, "{stats:?}");
    assert_eq!(stats.passed_through, 5, "{stats:?}");
    assert_eq!(stats.slices, 0);
    assert_eq!(consumed(&repo, "quiet", "api", "rpm").await, 5);
}

#[tokio::test]
async fn a_drained_bucket_admits_exactly_its_capacity_and_retry_after_is_the_tables() {
    let (repo, clock) = (repo(), ManualClock::new(START_MS));
    let limiter = reserving(&repo, &clock);
    // 500 a minute (one token every 120 ms): a slice holds at most 50.
    let limits = [Limit::per_minute("rpm", 500)];
    let mut admitted = 0;
    let mut rejection = None;
    for _ in 0..1_000 {
        clock.advance(Duration::from_millis(1));
        match limiter.acquire("key", "api").limits(limits.to_vec()).await {
            Ok(lease) => {
                lease.commit().await.unwrap();
                admitted += 1;
            }
            Err(Error::RateLimited(e)) => rejection = Some(e),
            Err(e) => panic!("{e}"),
        }
    }
    // 1 s passed: 8 tokens refilled; every one of them admitted, none more (a slice is
    // given up as the bucket refills into its room, never spent on top of it).
    assert!((500..=508).contains(&admitted), "{admitted}");
    let stats = limiter.reservation_stats().unwrap();
    assert!(stats.local_admits > 100, "{stats:?}");
    let rejection = rejection.unwrap();
    // The wait is the table's: one refill interval (120 ms) at most.
    let wait = rejection.retry_after();
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_millis(120),
        "{wait:?}"
    );
    limiter.release_reservations().await.unwrap();
    assert_eq!(consumed(&repo, "key", "api", "rpm").await, admitted);
}

#[tokio::test]
async fn leases_draw_on_the_slice_and_refunds_return_to_it() {
    let (repo, clock) = (repo(), ManualClock::new(START_MS));
    let limiter = reserving(&repo, &clock);
    let limits = [
        Limit::per_minute("rpm", 100_000),
        Limit::per_minute("tpm", 10_000_000),
    ];
    let mut net_tokens = 0i64;
    let mut requests = 0i64;
    for i in 0..2_000i64 {
        clock.advance(Duration::from_millis(1));
        let lease = limiter
            .acquire("key", "llm")
            .limits(limits.to_vec())
            .consume([("rpm", 1), ("tpm", 500)])
            .await
            .unwrap();
        requests += 1;
        match i % 4 {
            // The call cost more than estimated.
            0 => {
                lease.adjust([("tpm", 300)]).await.unwrap();
                lease.commit().await.unwrap();
                net_tokens += 800;
            }
            // It cost less: the rest is refunded.
            1 => {
                lease.adjust([("tpm", -450)]).await.unwrap();
                lease.commit().await.unwrap();
                net_tokens += 50;
            }
            // It failed: everything goes back.
            2 => {
                lease.rollback().await.unwrap();
                requests -= 1;
            }
            _ => {
                lease.commit().await.unwrap();
                net_tokens += 500;
            }
        }
    }
    let stats = limiter.reservation_stats().unwrap();
    assert!(stats.local_admits > 1_500, "{stats:?}");
    let status = limiter.reservation("key", "llm").unwrap();
    assert!(status.hot, "{status:?}");
    let held: i64 = status.held.iter().map(|(_, h)| h).sum();
    assert!(held > 0, "{status:?}");
    // Before the give-back the table counts what the slice holds (and what it gave up
    // as the bucket refilled) as consumed.
    let of = |list: &[(String, i64)]| list.iter().find(|(n, _)| n == "tpm").map_or(0, |x| x.1);
    assert_eq!(
        consumed(&repo, "key", "llm", "tpm").await,
        net_tokens + of(&status.held) + of(&status.given_up)
    );
    limiter.release_reservations().await.unwrap();
    assert_eq!(consumed(&repo, "key", "llm", "tpm").await, net_tokens);
    assert_eq!(consumed(&repo, "key", "llm", "rpm").await, requests);
}

#[tokio::test]
async fn a_changed_limit_replaces_the_slice() {
    let (repo, clock) = (repo(), ManualClock::new(START_MS));
    let limiter = reserving(&repo, &clock);
    let before = [Limit::per_second("rps", 1_000)];
    let after = [Limit::per_second("rps", 500)];
    let mut admitted = 0;
    for _ in 0..500 {
        clock.advance(Duration::from_millis(1));
        admitted += i64::from(take(&limiter, "key", &before).await);
    }
    let held_before = limiter.reservation("key", "api").unwrap().held;
    assert!(
        !held_before.is_empty() && held_before[0].1 > 0,
        "{held_before:?}"
    );
    // The config changed: the first request under the new limit gives the old slice back
    // and the key reserves under the new one (at most a tenth of 500).
    for _ in 0..500 {
        clock.advance(Duration::from_millis(1));
        admitted += i64::from(take(&limiter, "key", &after).await);
    }
    let held = limiter.reservation("key", "api").unwrap().held;
    assert!(held[0].1 <= 50, "{held:?}");
    limiter.release_reservations().await.unwrap();
    assert_eq!(consumed(&repo, "key", "api", "rps").await, admitted);
    let states = repo.get_buckets("key", "api").await.unwrap();
    assert_eq!(states["rps"].capacity_milli, 500_000, "the new limit stays");
}

#[tokio::test]
async fn idle_slices_go_back() {
    let (repo, clock) = (repo(), ManualClock::new(START_MS));
    let limiter = reserving(&repo, &clock);
    let limits = [Limit::per_minute("rpm", 10_000)];
    for _ in 0..200 {
        clock.advance(Duration::from_millis(2));
        assert!(take(&limiter, "key", &limits).await);
    }
    assert!(limiter.reservation_stats().unwrap().slices == 1);
    // Not idle long enough yet.
    clock.advance(Duration::from_millis(500));
    assert_eq!(limiter.release_idle_reservations(), 0);
    clock.advance(Duration::from_millis(600));
    assert_eq!(limiter.release_idle_reservations(), 1);
    assert!(limiter.reservation("key", "api").unwrap().held.is_empty());
    assert_eq!(consumed(&repo, "key", "api", "rpm").await, 200);
}

#[tokio::test]
async fn a_cascade_reserves_on_the_child_and_the_parent() {
    let (repo, clock) = (repo(), ManualClock::new(START_MS));
    let limiter = reserving(&repo, &clock);
    limiter.create_entity("project").await.unwrap();
    limiter
        .create_entity("key-a")
        .parent("project")
        .cascade(true)
        .await
        .unwrap();
    limiter
        .create_entity("key-b")
        .parent("project")
        .cascade(true)
        .await
        .unwrap();
    // The parent allows 300 a second; each key 1,000.
    let limits = [Limit::per_second("rps", 1_000)];
    limiter
        .set_entity_limits("project", "api", &[Limit::per_second("rps", 300)])
        .await
        .unwrap();
    limiter
        .set_entity_limits("key-a", "api", &limits)
        .await
        .unwrap();
    limiter
        .set_entity_limits("key-b", "api", &limits)
        .await
        .unwrap();
    let (mut a, mut b) = (0i64, 0i64);
    for _ in 0..2_000 {
        clock.advance(Duration::from_millis(1));
        for (entity, count) in [("key-a", &mut a), ("key-b", &mut b)] {
            match limiter.acquire(entity, "api").await {
                Ok(lease) => {
                    lease.commit().await.unwrap();
                    *count += 1;
                }
                Err(Error::RateLimited(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
    }
    // The parent bounds both: 300 + 300 a second over 2 s.
    assert!(a + b <= 300 + 600, "{a} + {b}");
    assert!(a + b >= 850, "{a} + {b}");
    assert!(limiter.reservation("project", "api").is_some());
    limiter.release_reservations().await.unwrap();
    assert_eq!(consumed(&repo, "project", "api", "rps").await, a + b);
    assert_eq!(consumed(&repo, "key-a", "api", "rps").await, a);
    assert_eq!(consumed(&repo, "key-b", "api", "rps").await, b);
}

/// Two limiters ("nodes") on one store, many tasks each, the real clock: the total
/// admitted stays within capacity plus refill, and the count is exact once both gave
/// their slices back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_many_tasks_never_over_admit() {
    let repo = repo();
    let nodes: Vec<RateLimiter> = (0..2)
        .map(|_| {
            RateLimiter::builder(repo.clone())
                .reservations(Reservations::adaptive().hot_rate(10.0))
                .build()
        })
        .collect();
    let limit = Limit::per_second("rps", 2_000);
    let admitted = Arc::new(AtomicU64::new(0));
    let first_ms = Arc::new(AtomicI64::new(i64::MAX));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for node in &nodes {
        for _ in 0..16 {
            let (node, limit, admitted) = (node.clone(), limit.clone(), admitted.clone());
            let first_ms = first_ms.clone();
            tasks.push(tokio::spawn(async move {
                while started.elapsed() < Duration::from_millis(1_500) {
                    let now = node.now_ms();
                    match node.acquire("hot", "api").limits([limit.clone()]).await {
                        Ok(lease) => {
                            first_ms.fetch_min(now, Ordering::Relaxed);
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
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed_ms = nodes[0].now_ms() - first_ms.load(Ordering::Relaxed);
    let admitted = admitted.load(Ordering::Relaxed) as i64;
    // Capacity plus the refill over the whole run (2 a millisecond), plus one.
    let most = 2_000 + 2 * (elapsed_ms + 1);
    assert!(admitted <= most, "{admitted} admitted, at most {most}");
    for node in &nodes {
        node.release_reservations().await.unwrap();
    }
    assert_eq!(consumed(&repo, "hot", "api", "rps").await, admitted);
}

/// The history that broke the first release: busy, then idle (here for less than the
/// idle give-back, so both nodes still hold slices while the bucket refills to full), then
/// a burst. The burst gets at most the capacity: a slice held while the bucket refilled is
/// given up, not spent on top of a full bucket.
#[tokio::test]
async fn a_burst_after_an_idle_period_admits_at_most_the_capacity() {
    let (repo, clock) = (repo(), ManualClock::new(START_MS));
    let nodes = [reserving(&repo, &clock), reserving(&repo, &clock)];
    let limits = [Limit::per_second("rps", 1_000)];
    let mut admitted = 0;
    // Busy: 400 a second from each node (under the refill: the bucket stays near full).
    for _ in 0..1_000 {
        clock.advance(Duration::from_micros(2_500));
        for node in &nodes {
            admitted += i64::from(take(node, "key", &limits).await);
        }
    }
    // Until both hold tokens in their slices (a slice is empty for a moment before each
    // top-up).
    let holds = |n: &RateLimiter| {
        n.reservation("key", "api")
            .is_some_and(|r| r.held.iter().any(|(_, h)| *h > 0))
    };
    let mut tries = 0;
    while !nodes.iter().all(holds) {
        tries += 1;
        assert!(
            tries < 1_000,
            "the nodes never both held a slice: {:?}",
            nodes
                .iter()
                .map(|n| (n.reservation("key", "api"), n.reservation_stats()))
                .collect::<Vec<_>>()
        );
        clock.advance(Duration::from_micros(2_500));
        for node in nodes.iter().filter(|n| !holds(n)) {
            admitted += i64::from(take(node, "key", &limits).await);
        }
    }
    // Idle for 600 ms: the bucket is full again; the slices are not yet given back.
    clock.advance(Duration::from_millis(600));
    // A burst of 3,000 within one millisecond.
    let mut burst = 0;
    for i in 0..3_000 {
        burst += i64::from(take(&nodes[i % 2], "key", &limits).await);
    }
    assert!(
        burst <= 1_000 + 1,
        "a burst after idle admitted {burst} of 1,000"
    );
    assert!(burst >= 950, "{burst}");
    admitted += burst;
    for node in &nodes {
        node.release_reservations().await.unwrap();
    }
    assert_eq!(consumed(&repo, "key", "api", "rps").await, admitted);
}

/// The layer over a limiter with reservations: a hot key's requests are admitted from its
/// slice, the 429 that ends the run carries the table's `Retry-After`, and the count is
/// exact once the slice is back.
#[tokio::test]
async fn the_layer_serves_a_hot_key_from_its_slice_and_answers_429_from_the_table() {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::routing::get;
    use tower::ServiceExt;
    use zae_limiter::middleware::{extract, RateLimitLayer};

    let (repo, clock) = (repo(), ManualClock::new(START_MS));
    let limiter = reserving(&repo, &clock);
    let app = axum::Router::new()
        .route("/hello", get(|| async { "hello" }))
        .layer(
            RateLimitLayer::new(limiter.clone())
                .entity(extract::header("x-api-key"))
                .resource(extract::fixed("api"))
                .limits([Limit::per_minute("rpm", 600)]),
        );
    let (mut ok, mut limited) = (0, None);
    for _ in 0..700 {
        clock.advance(Duration::from_millis(1));
        let resp = app
            .clone()
            .oneshot(
                Request::get("/hello")
                    .header("x-api-key", "k1")
                    .body(Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        match resp.status() {
            StatusCode::OK => ok += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                limited = resp
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().to_string())
            }
            other => panic!("{other}"),
        }
    }
    // 700 ms: 7 tokens refilled (one every 100 ms).
    assert!((600..=608).contains(&ok), "{ok}");
    let stats = limiter.reservation_stats().unwrap();
    assert!(
        stats.local_admits > 400,
        "{stats:?} {:?}",
        limiter.reservation("k1", "api")
    );
    assert_eq!(
        limited.as_deref(),
        Some("1"),
        "one token refills within 100 ms"
    );
    limiter.release_reservations().await.unwrap();
    assert_eq!(consumed(&repo, "k1", "api", "rpm").await, ok);
}

/// A lease write that draws on the slice and sends the rest to the table loses its answer;
/// the lease sends it again: the slice part is not drawn twice and the table part lands
/// once, so the count is exact.
#[tokio::test]
async fn a_lease_write_sent_again_draws_on_the_slice_once() {
    let backend = Switchable::default();
    let clock = ManualClock::new(START_MS);
    let limiter = RateLimiter::builder(backend.clone())
        .clock(clock.clone())
        .reservations(Reservations::adaptive().hot_rate(10.0))
        .build();
    let limits = [Limit::per_second("tps", 10_000)];
    // `n` leases of 10, a millisecond apart; the tokens they keep.
    let spend = |n: usize| {
        let (limiter, clock, limits) = (&limiter, &clock, &limits);
        async move {
            for _ in 0..n {
                clock.advance(Duration::from_millis(1));
                let lease = limiter
                    .acquire("key", "llm")
                    .limits(limits.to_vec())
                    .consume([("tps", 10)])
                    .await
                    .unwrap();
                lease.commit().await.unwrap();
            }
            n as i64 * 10
        }
    };
    let mut net = spend(300).await;
    let held = limiter.reservation("key", "llm").unwrap().held[0].1;
    assert!(held > 0, "the key holds a slice");
    let lease = limiter
        .acquire("key", "llm")
        .limits(limits.to_vec())
        .consume([("tps", 10)])
        .await
        .unwrap();
    // More than the slice holds: part from the slice, the rest from the table.
    lease.adjust([("tps", 2_000)]).await.unwrap();
    backend.lose_next_answer();
    assert!(matches!(
        lease.commit().await,
        Err(Error::Unavailable { .. })
    ));
    // The slice is topped up again before the lease sends the write again.
    net += spend(100).await;
    assert!(limiter.reservation("key", "llm").unwrap().held[0].1 > 0);
    lease.commit().await.unwrap();
    net += 2_010;
    limiter.release_reservations().await.unwrap();
    assert_eq!(consumed(&backend.inner, "key", "llm", "tps").await, net);
}

/// Every key is measured, hot or not; keys unused for 30 s without a slice are forgotten,
/// so a stream of one-off keys does not grow the limiter's memory.
#[tokio::test]
async fn cold_keys_are_forgotten_once_unused() {
    let (repo, clock) = (repo(), ManualClock::new(START_MS));
    let limiter = reserving(&repo, &clock);
    let limits = [Limit::per_minute("rpm", 100)];
    for i in 0..1_000 {
        assert!(take(&limiter, &format!("one-off-{i}"), &limits).await);
    }
    assert_eq!(limiter.reservation_stats().unwrap().keys, 1_000);
    clock.advance(Duration::from_secs(20));
    limiter.release_idle_reservations();
    assert_eq!(limiter.reservation_stats().unwrap().keys, 1_000);
    clock.advance(Duration::from_secs(11));
    limiter.release_idle_reservations();
    assert_eq!(limiter.reservation_stats().unwrap().keys, 0);
}
