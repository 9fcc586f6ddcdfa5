//! Capacity queries on the in-memory backend: a resource's limit across its entities, one
//! entity's share; usage snapshots are a typed "not supported" here.

use zae_limiter::usage::UsageQuery;
use zae_limiter::{Error, InMemoryRepository, Limit, RateLimiter};

#[tokio::test]
async fn resource_capacity_sums_the_entities_and_reports_each() {
    let limiter = RateLimiter::new(InMemoryRepository::new());
    limiter
        .set_resource_limits("api", &[Limit::per_hour("rph", 100)])
        .await
        .unwrap();
    limiter.create_entity("org").await.unwrap();
    limiter.create_entity("key").parent("org").await.unwrap();
    for (entity, n) in [("org", 10), ("key", 60), ("solo", 30)] {
        limiter
            .acquire(entity, "api")
            .consume([("rph", n)])
            .await
            .unwrap()
            .commit()
            .await
            .unwrap();
    }
    // Another resource's bucket is not counted.
    limiter
        .acquire("org", "other")
        .limits([Limit::per_hour("rph", 5)])
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    let all = limiter
        .resource_capacity("api", "rph", false)
        .await
        .unwrap();
    assert_eq!((all.capacity, all.available), (300, 200));
    assert!((all.utilisation - 100.0 / 3.0).abs() < 1e-9);
    let ids: Vec<&str> = all.entities.iter().map(|e| e.entity_id.as_str()).collect();
    assert_eq!(ids, ["key", "solo", "org"], "busiest first");
    assert_eq!(all.entities[0].parent_id.as_deref(), Some("org"));
    let parents = limiter.resource_capacity("api", "rph", true).await.unwrap();
    assert_eq!(parents.entities.len(), 2);
    assert_eq!((parents.capacity, parents.available), (200, 160));
    // A limit no bucket holds: nothing in use.
    let none = limiter
        .resource_capacity("api", "tpm", false)
        .await
        .unwrap();
    assert!(none.entities.is_empty() && none.utilisation == 0.0);

    let key = limiter
        .entity_capacity("key", "api", "rph")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (key.capacity, key.available, key.utilisation),
        (100, 40, 60.0)
    );
    assert!(limiter
        .entity_capacity("ghost", "api", "rph")
        .await
        .unwrap()
        .is_none());
    assert!(matches!(
        limiter.resource_capacity("bad#name", "rph", false).await,
        Err(Error::InvalidName { .. })
    ));
}

#[tokio::test]
async fn usage_snapshots_are_a_typed_not_supported_in_memory() {
    let limiter = RateLimiter::new(InMemoryRepository::new());
    let err = limiter
        .usage_snapshots(&UsageQuery::entity("k"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::NotSupported { operation, backend } if operation == "usage snapshots" && backend == "in-memory"),
        "{err:?}"
    );
    assert!(!limiter.repository().capabilities().supports_usage_snapshots);
}
