//! Outages for real: DynamoDB Local not running, or killed mid-run and started again. The
//! repository answers `Unavailable` within its timeout, `Block` rejects (the layer answers
//! 503), `Allow` admits, and everything recovers when DynamoDB returns.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{Request, StatusCode};
use tower::ServiceExt;
use zae_limiter::local::{free_port, DynamoDbLocal};
use zae_limiter::middleware::{extract, RateLimitLayer};
use zae_limiter::{DynamoDbRepository, Error, Limit, OnUnavailable, RateLimiter};

const TIMEOUT: Duration = Duration::from_secs(2);

fn rpm() -> Limit {
    Limit::per_minute("rpm", 100)
}

fn app(limiter: &RateLimiter) -> Router {
    Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(limiter.clone())
            .entity(extract::header("x-api-key"))
            .resource(extract::fixed("api"))
            .limits([rpm()]),
    )
}

async fn status(app: &Router) -> StatusCode {
    let req = Request::get("/")
        .header("x-api-key", "k")
        .body(Body::empty())
        .unwrap();
    app.clone().oneshot(req).await.unwrap().status()
}

#[tokio::test]
async fn nothing_listening_is_unavailable_within_the_timeout() {
    let port = free_port().unwrap();
    let started = Instant::now();
    let err = DynamoDbRepository::builder()
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .timeout(TIMEOUT)
        .build()
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(started.elapsed() < TIMEOUT * 3, "{:?}", started.elapsed());
    assert!(
        std::error::Error::source(&err).is_some(),
        "the cause is kept"
    );
}

#[tokio::test]
async fn killed_mid_run_then_back() {
    let dir = std::env::temp_dir().join(format!("zae-faults-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = free_port().unwrap();
    let mut local = DynamoDbLocal::builder()
        .port(port)
        .db_path(&dir)
        .start()
        .await
        .unwrap();
    // Set up (and warm the freshly started JVM) with a patient client first.
    let setup = DynamoDbRepository::builder()
        .endpoint_url(local.endpoint_url())
        .timeout(Duration::from_secs(30))
        .build()
        .await
        .unwrap();
    let warm = RateLimiter::new(setup);
    for _ in 0..3 {
        let lease = warm.acquire("warm", "api").limits([rpm()]).await.unwrap();
        lease.commit().await.unwrap();
    }
    let repo = DynamoDbRepository::builder()
        .endpoint_url(local.endpoint_url())
        .timeout(TIMEOUT)
        .max_attempts(2)
        .connect()
        .await
        .unwrap();
    let block = RateLimiter::new(repo.clone());
    let allow = RateLimiter::builder(repo.clone())
        .on_unavailable(OnUnavailable::Allow)
        .build();
    let (block_app, allow_app) = (app(&block), app(&allow));
    assert_eq!(status(&block_app).await, StatusCode::OK);
    block
        .acquire("k", "api")
        .limits([rpm()])
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();

    local.stop();

    let started = Instant::now();
    let err = block.acquire("k", "api").limits([rpm()]).await.unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(started.elapsed() < TIMEOUT * 3, "{:?}", started.elapsed());
    assert_eq!(status(&block_app).await, StatusCode::SERVICE_UNAVAILABLE);
    // Allow admits without writing; so does a per-call override.
    let lease = allow.acquire("k", "api").limits([rpm()]).await.unwrap();
    lease.commit().await.unwrap();
    assert_eq!(status(&allow_app).await, StatusCode::OK);
    block
        .acquire("k", "api")
        .limits([rpm()])
        .on_unavailable(OnUnavailable::Allow)
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();

    // DynamoDB returns (same port, same data): everything works again.
    let _local = DynamoDbLocal::builder()
        .port(port)
        .db_path(&dir)
        .start()
        .await
        .unwrap();
    let mut recovered = false;
    let mut failed = 0;
    for _ in 0..50 {
        if let Ok(lease) = block.acquire("k", "api").limits([rpm()]).await {
            lease.commit().await.unwrap();
            recovered = true;
            break;
        }
        failed += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "acquires succeed again once DynamoDB is back");
    assert_eq!(status(&block_app).await, StatusCode::OK);
    let states = block.bucket_states("k", "api").await.unwrap();
    // Two layer requests and two acquires were admitted and written; the outage wrote
    // nothing. A write that timed out while DynamoDB was starting up may still have
    // landed: it is counted (conservative), never admitted.
    let consumed = states["rpm"].total_consumed_milli;
    assert!(
        (4_000..=4_000 + failed * 1_000).contains(&consumed),
        "consumed {consumed}, failed attempts {failed}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
