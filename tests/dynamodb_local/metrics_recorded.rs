//! The DynamoDB backend's call metrics, read back through a recorder (feature `metrics`).

use std::sync::OnceLock;

use metrics_util::debugging::{DebuggingRecorder, Snapshotter};
use zae_limiter::{Limit, RateLimiter};

use crate::dynamo;
use crate::metrics_snapshot::Recorded;

/// One recorder for the whole binary (the SDK's calls go through the global one).
fn snapshotter() -> &'static Snapshotter {
    static SNAPSHOTTER: OnceLock<Snapshotter> = OnceLock::new();
    SNAPSHOTTER.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::set_global_recorder(recorder).expect("no other global recorder");
        snapshotter
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_calls_are_counted_and_timed_by_operation_and_outcome() {
    let snapshotter = snapshotter();
    let repo = dynamo::builder().await.build().await.unwrap();
    // A resource of this test's own: other tests in the binary count too.
    let resource = format!("metrics-{}", std::process::id());
    let limiter = RateLimiter::new(repo);
    limiter
        .set_resource_limits(&resource, &[Limit::per_minute("rpm", 2)])
        .await
        .unwrap();
    // A snapshot drains the counters: what the next one reads happened in between (and,
    // since other tests of the binary run meanwhile, maybe more).
    let _ = Recorded::take(snapshotter);
    for _ in 0..3 {
        if let Ok(lease) = limiter.acquire("k1", &resource).await {
            lease.commit().await.unwrap();
        }
    }
    // A failed condition is an `error` outcome of its call.
    limiter.create_entity("dup").await.unwrap();
    assert!(limiter.create_entity("dup").await.is_err());
    let after = Recorded::take(snapshotter);
    let requests = |outcome: &str| {
        after.counter(
            "zae_limiter_requests_total",
            &[("resource", resource.as_str()), ("outcome", outcome)],
        )
    };
    assert_eq!((requests("admitted"), requests("rejected")), (2, 1));
    let calls = |r: &Recorded, operation: &str, outcome: &str| {
        r.counter(
            "zae_limiter_dynamodb_calls_total",
            &[("operation", operation), ("outcome", outcome)],
        )
    };
    let grew = |operation: &str, outcome: &str| calls(&after, operation, outcome);
    assert!(grew("BatchGetItem", "ok") >= 1, "the config read");
    assert!(
        grew("TransactWriteItems", "ok") + grew("UpdateItem", "ok") >= 2,
        "the bucket's create and writes"
    );
    assert!(grew("PutItem", "error") >= 1, "the second create_entity");
    assert!(
        after.samples(
            "zae_limiter_dynamodb_call_seconds",
            &[("operation", "BatchGetItem")]
        ) >= 1
    );
}
