//! The blocking limiter, from plain threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use zae_limiter::blocking;
use zae_limiter::clock::ManualClock;
use zae_limiter::{Error, InMemoryRepository, Limit, RateLimiter};

fn limiter() -> blocking::RateLimiter {
    blocking::RateLimiter::from_async(
        RateLimiter::builder(InMemoryRepository::new())
            .clock(ManualClock::new(1_000_000))
            .build(),
    )
    .unwrap()
}

#[test]
fn acquire_adjust_commit_rollback() {
    let l = limiter();
    let limits = [Limit::per_minute("tpm", 100)];
    let lease = l
        .acquire("u1", "api")
        .limits(limits.clone())
        .consume([("tpm", 40)])
        .call()
        .unwrap();
    lease.adjust([("tpm", 10)]).unwrap();
    lease.commit().unwrap();
    assert_eq!(l.available("u1", "api", Some(&limits)).unwrap()["tpm"], 50);
    let lease = l
        .acquire("u1", "api")
        .limits(limits.clone())
        .consume([("tpm", 50)])
        .call()
        .unwrap();
    lease.rollback().unwrap();
    assert!(matches!(lease.commit(), Err(Error::LeaseClosed)));
    match l
        .acquire("u1", "api")
        .limits(limits.clone())
        .consume([("tpm", 51)])
        .call()
    {
        Err(Error::RateLimited(e)) => assert_eq!(e.retry_after().as_millis(), 600),
        other => panic!("{other:?}"),
    }
    {
        let _dropped = l
            .acquire("u1", "api")
            .limits(limits.clone())
            .consume([("tpm", 5)])
            .call()
            .unwrap();
    }
    assert_eq!(l.available("u1", "api", Some(&limits)).unwrap()["tpm"], 50);
}

#[test]
fn entities_and_stored_limits() {
    let l = limiter();
    l.create_entity("proj", None, false).unwrap();
    l.create_entity("key", Some("proj"), true).unwrap();
    l.set_entity_limits("proj", "api", &[Limit::per_minute("rpm", 1)])
        .unwrap();
    l.set_resource_limits("api", &[Limit::per_minute("rpm", 10)])
        .unwrap();
    assert_eq!(l.get_children("proj").unwrap().len(), 1);
    l.acquire("key", "api").call().unwrap().commit().unwrap();
    assert!(matches!(
        l.acquire("key", "api").call(),
        Err(Error::RateLimited(_))
    ));
    assert_eq!(l.resolve_limits("key", "api").unwrap().0[0].capacity, 10);
    assert_eq!(
        l.bucket_states("proj", "api").unwrap()["rpm"].total_consumed_milli,
        1000
    );
    l.delete_entity("key").unwrap();
    assert_eq!(l.get_entity("key").unwrap(), None);
}

#[test]
fn many_threads_share_one_limiter() {
    let l = limiter();
    let admitted = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (l, admitted) = (l.clone(), admitted.clone());
            std::thread::spawn(move || {
                for _ in 0..50 {
                    if let Ok(lease) = l
                        .acquire("hot", "api")
                        .limits([Limit::per_minute("rpm", 300)])
                        .call()
                    {
                        lease.commit().unwrap();
                        admitted.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(admitted.load(Ordering::Relaxed), 300);
}
