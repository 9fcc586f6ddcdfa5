//! The layer reports admissions, rejections and outages through `tracing`.

use crate::common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::routing::get;
use axum::Router;
use tower::ServiceExt;
use zae_limiter::middleware::{extract, RateLimitLayer};
use zae_limiter::{Limit, RateLimiter};

/// Collects everything the subscriber writes.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The tests that capture run one at a time: tracing computes one global level hint and a
/// per-callsite interest from every subscriber alive, so two capturing subscribers set and
/// dropped at once on two threads can leave either deaf to a callsite for a moment.
static CAPTURING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Captures what this thread logs at `level` and above, while the guard lives.
fn capture(level: tracing::Level) -> (Captured, tracing::subscriber::DefaultGuard) {
    let captured = Captured::default();
    let sink = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    // Other tests of this binary, on other threads, may have registered a callsite while
    // this subscriber was being set: recompute every callsite's interest with it in place
    // (tracing caches interest per callsite, and a registration racing `set_default` can
    // cache "never").
    tracing::callsite::rebuild_interest_cache();
    (captured, guard)
}

/// A 1-a-minute app over a backend that can be switched off.
fn app() -> (Router, common::Switchable) {
    let backend = common::Switchable::default();
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(RateLimiter::new(backend.clone()))
            .entity(extract::header("x-api-key"))
            .limits([Limit::per_minute("rpm", 1)]),
    );
    (app, backend)
}

async fn call(app: Router, key: &str) -> StatusCode {
    let req = Request::get("/")
        .header("x-api-key", key)
        .body(Body::empty())
        .unwrap();
    app.oneshot(req).await.unwrap().status()
}

#[tokio::test(flavor = "current_thread")]
async fn admit_reject_and_unavailable_are_traced() {
    let _serial = CAPTURING.lock().await;
    let (captured, _guard) = capture(tracing::Level::DEBUG);
    let (app, backend) = app();
    // A warm-up on a key of its own, so every callsite on the path is registered (tests on
    // other threads register them too, and a registration racing this thread's subscriber
    // can cache "not interested" for a moment); then the interest is computed afresh and
    // only what follows is read.
    assert_eq!(self::call(app.clone(), "warm-up").await, StatusCode::OK);
    tracing::callsite::rebuild_interest_cache();
    captured.0.lock().unwrap().clear();
    let call = |app: Router| call(app, "traced-key");
    assert_eq!(call(app.clone()).await, StatusCode::OK);
    assert_eq!(call(app.clone()).await, StatusCode::TOO_MANY_REQUESTS);
    backend.set_down(true);
    assert_eq!(call(app).await, StatusCode::SERVICE_UNAVAILABLE);

    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("admitted"), "{text}");
    assert!(text.contains("rate limited"), "{text}");
    assert!(text.contains("unavailable"), "{text}");
    assert!(text.contains("rate_limit"), "span name missing: {text}");
    assert!(text.contains("traced-key"), "entity missing: {text}");
}

#[tokio::test(flavor = "current_thread")]
async fn floods_and_outages_do_not_flood_the_log() {
    let _serial = CAPTURING.lock().await;
    let (captured, _guard) = capture(tracing::Level::INFO);
    let (app, backend) = app();
    let call = |app: Router| call(app, "flood-key");
    assert_eq!(call(app.clone()).await, StatusCode::OK);
    // A one-key flood: rejections are normal traffic, logged at debug only.
    for _ in 0..500 {
        assert_eq!(call(app.clone()).await, StatusCode::TOO_MANY_REQUESTS);
    }
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        !text.contains("rate limited"),
        "rejections logged at INFO: {text}"
    );
    // An outage answering every request 503: a line or two, not one per request.
    backend.set_down(true);
    for _ in 0..500 {
        assert_eq!(call(app.clone()).await, StatusCode::SERVICE_UNAVAILABLE);
    }
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let lines = text.lines().filter(|l| l.contains("unavailable")).count();
    assert!(
        (1..=4).contains(&lines),
        "{lines} outage lines for 500 requests:\n{text}"
    );
}
