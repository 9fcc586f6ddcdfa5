//! The tower layer, driven with `tower::ServiceExt::oneshot` and through a real axum server
//! on a loopback port.

use crate::common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Extension;
use axum::http::request::Parts;
use axum::http::{Request, Response, StatusCode};
use axum::routing::get;
use axum::Router;
use http_body_util::BodyExt;
use tower::ServiceExt;
use zae_limiter::clock::ManualClock;
use zae_limiter::middleware::{
    extract, RateLimitLayer, Rejection, Usage, RATELIMIT, RATELIMIT_POLICY,
};
use zae_limiter::{Error, InMemoryRepository, LeaseHandle, Limit, OnUnavailable, RateLimiter};

fn limiter() -> RateLimiter {
    RateLimiter::builder(InMemoryRepository::new())
        .clock(ManualClock::new(1_700_000_000_000))
        .build()
}

fn hello_app(limiter: &RateLimiter) -> Router {
    Router::new()
        .route("/hello", get(|| async { "hello" }))
        .layer(
            RateLimitLayer::new(limiter.clone())
                .entity(extract::header("x-api-key"))
                .resource(extract::fixed("hello"))
                .limits([Limit::per_minute("rpm", 5)]),
        )
}

fn get_req(uri: &str, key: Option<&str>) -> Request<Body> {
    let mut b = Request::get(uri);
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    b.body(Body::empty()).unwrap()
}

async fn body_json(
    resp: Response<impl http_body::Body<Error = impl std::fmt::Debug>>,
) -> serde_json::Value {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

async fn body_text(resp: Response<impl http_body::Body<Error = impl std::fmt::Debug>>) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

async fn send(app: &Router, req: Request<Body>) -> Response<Body> {
    let resp = app.clone().oneshot(req).await.unwrap();
    // Read the body to its end, as a client would, so the lease settles.
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    Response::from_parts(parts, Body::from(bytes))
}

fn rpm_left(l: &RateLimiter, entity: &str, resource: &str, limit: Limit) -> i64 {
    futures_block(l.available(entity, resource, Some(std::slice::from_ref(&limit)))).unwrap()
        [&limit.name]
}

fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test]
async fn quickstart_behaviour() {
    let l = limiter();
    let app = hello_app(&l);
    for i in 0..5 {
        let resp = send(&app, get_req("/hello", Some("alice"))).await;
        assert_eq!(resp.status(), StatusCode::OK, "request {i}");
        assert_eq!(resp.headers()[&RATELIMIT_POLICY], r#""rpm";q=5;w=60"#);
        assert_eq!(
            resp.headers()[&RATELIMIT].to_str().unwrap(),
            format!(r#""rpm";r={};t={}"#, 4 - i, if i == 4 { 12 } else { 0 })
        );
    }
    let resp = send(&app, get_req("/hello", Some("alice"))).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "12");
    assert_eq!(resp.headers()[&RATELIMIT], r#""rpm";r=0;t=12"#);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let json = body_json(resp).await;
    assert_eq!(json["error"], "rate_limit_exceeded");
    assert_eq!(json["retry_after_ms"], 12_000);
    assert_eq!(json["limits"][0]["limit_name"], "rpm");

    let resp = send(&app, get_req("/hello", Some("bob"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = send(&app, get_req("/hello", None)).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    assert!(body_json(resp).await["message"]
        .as_str()
        .unwrap()
        .contains("x-api-key"));
    let resp = send(&app, get_req("/hello", Some("a#b"))).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(body_json(resp).await["field"], "entity_id");
}

#[tokio::test]
async fn headers_on_success_can_be_turned_off() {
    let l = limiter();
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(l)
            .entity(extract::fixed("k"))
            .limits([Limit::per_minute("rpm", 5)])
            .headers_on_success(false),
    );
    let resp = send(&app, get_req("/", None)).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get(&RATELIMIT).is_none());
}

/// An LLM-style route: the estimate comes from a header, the true count from the handler.
fn llm_app(l: &RateLimiter) -> Router {
    Router::new()
        .route(
            "/chat",
            get(|| async { (Usage::new().with("tpm", 30), "answer") }),
        )
        .route(
            "/adjust",
            get(|lease: LeaseHandle| async move {
                lease.adjust([("tpm", 400)]).unwrap();
                "adjusted"
            }),
        )
        .route("/fail", get(|| async { StatusCode::INTERNAL_SERVER_ERROR }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
        .layer(
            RateLimitLayer::new(l.clone())
                .entity(extract::header("x-api-key"))
                .resource(extract::fixed("llm"))
                .limits([
                    Limit::per_minute("rpm", 100),
                    Limit::per_minute("tpm", 1_000),
                ])
                .unit("tpm", "tokens")
                .consume(|req: &Parts| {
                    let estimate: u64 = req
                        .headers
                        .get("x-estimate")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(100);
                    [("rpm", 1), ("tpm", estimate)]
                }),
        )
}

fn tpm() -> Limit {
    Limit::per_minute("tpm", 1_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_in_the_response_settles_actual_minus_estimate() {
    let l = limiter();
    let app = llm_app(&l);
    let resp = send(&app, get_req("/chat", Some("k"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers()[&RATELIMIT_POLICY]
        .to_str()
        .unwrap()
        .contains(r#""tpm";q=1000;w=60;zae-unit="tokens""#));
    // Estimated 100, used 30.
    assert_eq!(rpm_left(&l, "k", "llm", tpm()), 970);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handler_adjusts_through_the_lease_handle() {
    let l = limiter();
    let app = llm_app(&l);
    let resp = send(&app, get_req("/adjust", Some("k"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(rpm_left(&l, "k", "llm", tpm()), 500);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_roll_back_unless_configured() {
    let l = limiter();
    let app = llm_app(&l);
    let resp = send(&app, get_req("/fail", Some("k"))).await;
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(rpm_left(&l, "k", "llm", tpm()), 1_000);

    let keep = Router::new()
        .route("/fail", get(|| async { StatusCode::BAD_GATEWAY }))
        .layer(
            RateLimitLayer::new(l.clone())
                .entity(extract::fixed("k2"))
                .resource(extract::fixed("llm"))
                .limits([tpm()])
                .rollback_on_server_error(false),
        );
    send(&keep, get_req("/fail", None)).await;
    assert_eq!(rpm_left(&l, "k2", "llm", tpm()), 999);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_goes_away_rolls_back() {
    let l = limiter();
    let app = llm_app(&l);
    let pending = app.clone().oneshot(get_req("/slow", Some("k")));
    let timed_out = tokio::time::timeout(Duration::from_millis(100), pending).await;
    assert!(timed_out.is_err());
    assert_eq!(rpm_left(&l, "k", "llm", tpm()), 1_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inner_errors_roll_back() {
    let l = limiter();
    let svc = tower::ServiceBuilder::new()
        .layer(
            RateLimitLayer::new(l.clone())
                .entity(extract::fixed("k"))
                .resource(extract::fixed("llm"))
                .limits([tpm()]),
        )
        .service_fn(|_req: Request<Body>| async {
            Err::<Response<Body>, std::io::Error>(std::io::Error::other("boom"))
        });
    let err = svc.oneshot(get_req("/", None)).await.unwrap_err();
    assert_eq!(err.to_string(), "boom");
    assert_eq!(rpm_left(&l, "k", "llm", tpm()), 1_000);
}

fn streaming_app(l: &RateLimiter) -> Router {
    Router::new()
        .route(
            "/stream",
            get(|Extension(lease): Extension<LeaseHandle>| async move {
                let chunks = futures_util::stream::iter(0..3).then(move |i| {
                    let lease = lease.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        // Each chunk costs 50 tokens more than estimated.
                        lease.adjust([("tpm", 50)]).unwrap();
                        Ok::<_, Infallible>(format!("chunk {i}\n"))
                    }
                });
                Body::from_stream(chunks)
            }),
        )
        .layer(
            RateLimitLayer::new(l.clone())
                .entity(extract::header("x-api-key"))
                .resource(extract::fixed("llm"))
                .limits([tpm()])
                .consume(|_: &Parts| [("tpm", 100)]),
        )
}

use futures_util::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_body_settles_at_its_end() {
    let l = limiter();
    let app = streaming_app(&l);
    let resp = app
        .clone()
        .oneshot(get_req("/stream", Some("k")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "chunk 0\n");
    // The estimate is consumed; the adjustments wait for the end of the stream.
    assert_eq!(rpm_left(&l, "k", "llm", tpm()), 900);
    while let Some(frame) = body.frame().await {
        frame.unwrap();
    }
    assert_eq!(rpm_left(&l, "k", "llm", tpm()), 750);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_dropped_midway_commits_what_was_used() {
    let l = limiter();
    let app = streaming_app(&l);
    let resp = app
        .clone()
        .oneshot(get_req("/stream", Some("k")))
        .await
        .unwrap();
    let mut body = resp.into_body();
    body.frame().await.unwrap().unwrap();
    // The client goes away after one chunk: the response was produced and one chunk's
    // extra 50 tokens were used, so the lease commits them.
    drop(body);
    assert_eq!(rpm_left(&l, "k", "llm", tpm()), 850);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_requests_are_charged() {
    let l = limiter();
    let app = hello_app(&l);
    let head = Request::head("/hello")
        .header("x-api-key", "h")
        .body(Body::empty())
        .unwrap();
    let resp = app.clone().oneshot(head).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    drop(resp);
    assert_eq!(rpm_left(&l, "h", "hello", Limit::per_minute("rpm", 5)), 4);
}

#[tokio::test]
async fn backend_outage_gives_503_or_admits() {
    let backend = common::Switchable::default();
    let l = RateLimiter::new(backend.clone());
    let layer = RateLimitLayer::new(l.clone())
        .entity(extract::header("x-api-key"))
        .limits([Limit::per_minute("rpm", 5)]);
    let blocked = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(layer.clone());
    let allowed = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(layer.on_unavailable(OnUnavailable::Allow));
    backend.set_down(true);
    let resp = send(&blocked, get_req("/", Some("k"))).await;
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_eq!(body_json(resp).await["error"], "rate_limiter_unavailable");
    let resp = send(&allowed, get_req("/", Some("k"))).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get(&RATELIMIT).is_none());
    backend.set_down(false);
    assert_eq!(
        send(&blocked, get_req("/", Some("k"))).await.status(),
        StatusCode::OK
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_answers_later() {
    let backend = common::Switchable::default();
    backend.set_delay(Duration::from_millis(20));
    let l = RateLimiter::new(backend.clone());
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        )
        .layer(
            RateLimitLayer::new(l.clone())
                .entity(extract::header("x-api-key"))
                .limits([Limit::per_minute("rpm", 2)]),
        );
    let statuses =
        futures_util::future::join_all((0..4).map(|_| send(&app, get_req("/", Some("k")))))
            .await
            .iter()
            .map(|r| r.status().as_u16())
            .collect::<Vec<_>>();
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        2,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        2,
        "{statuses:?}"
    );

    // A client that leaves while the acquire is still in flight is not charged: the
    // acquire finishes in the background and is rolled back.
    let rpm = Limit::per_minute("rpm", 2);
    let gone = tokio::time::timeout(
        Duration::from_millis(5),
        app.clone().oneshot(get_req("/", Some("k2"))),
    )
    .await;
    assert!(gone.is_err());
    // ...nor one that leaves while the handler runs.
    let gone = tokio::time::timeout(
        Duration::from_millis(100),
        app.clone().oneshot(get_req("/slow", Some("k2"))),
    )
    .await;
    assert!(gone.is_err());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let left = l.available("k2", "default", Some(&[rpm])).await.unwrap();
    assert_eq!(left["rpm"], 2);
}

#[tokio::test]
async fn per_route_limits_by_route_layer_and_by_table() {
    let l = limiter();
    let base = RateLimitLayer::new(l.clone())
        .entity(extract::header("x-api-key"))
        .resource(extract::matched_path());
    let by_route_layer = Router::new()
        .route("/a", get(|| async { "a" }))
        .route_layer(base.clone().limits([Limit::per_minute("rpm", 1)]))
        .merge(
            Router::new()
                .route("/b", get(|| async { "b" }))
                .route_layer(base.clone().limits([Limit::per_minute("rpm", 3)])),
        );
    let statuses = |app: Router, path: &'static str, n: usize| async move {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(send(&app, get_req(path, Some("k"))).await.status().as_u16());
        }
        out
    };
    assert_eq!(statuses(by_route_layer.clone(), "/a", 2).await, [200, 429]);
    assert_eq!(
        statuses(by_route_layer.clone(), "/b", 4).await,
        [200, 200, 200, 429]
    );
    // route_layer does not turn unknown paths into 429s.
    assert_eq!(statuses(by_route_layer, "/nope", 1).await, [404]);

    let table = Router::new()
        .route("/c", get(|| async { "c" }))
        .route("/d/{id}", get(|| async { "d" }))
        .layer(
            base.limits([Limit::per_minute("rpm", 1)])
                .route_limits("/d/{id}", [Limit::per_minute("rpm", 2)]),
        );
    assert_eq!(statuses(table.clone(), "/c", 2).await, [200, 429]);
    assert_eq!(statuses(table.clone(), "/d/1", 3).await, [200, 200, 429]);
    // Same matched route, same resource bucket.
    assert_eq!(statuses(table, "/d/2", 1).await, [429]);
}

#[tokio::test]
async fn rejection_response_can_be_replaced() {
    let l = limiter();
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(l)
            .entity(extract::header("x-api-key"))
            .limits([Limit::per_minute("rpm", 1)])
            .rejection_response(|rejection: &Rejection| {
                let mut resp = rejection.default_response();
                if let Rejection::RateLimited(_) = rejection {
                    *resp.body_mut() = http_body_util::Full::new("slow down".into());
                }
                resp.headers_mut().insert("x-custom", "1".parse().unwrap());
                resp
            }),
    );
    send(&app, get_req("/", Some("k"))).await;
    let resp = send(&app, get_req("/", Some("k"))).await;
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["x-custom"], "1");
    assert_eq!(resp.headers()["retry-after"], "60");
    assert!(resp.headers().contains_key(&RATELIMIT));
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(bytes, "slow down");
    let resp = send(&app, get_req("/", None)).await;
    assert_eq!(
        (resp.status(), &resp.headers()["x-custom"]),
        (
            StatusCode::UNAUTHORIZED,
            &"1".parse::<http::HeaderValue>().unwrap()
        )
    );
}

#[tokio::test]
async fn forwarded_client_ip_cannot_be_spoofed_past_trusted_proxies() {
    let l = limiter();
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(l.clone())
            .entity(extract::x_forwarded_for(1))
            .limits([Limit::per_minute("rpm", 1)]),
    );
    let with_xff = |xff: &str| {
        Request::get("/")
            .header("x-forwarded-for", xff)
            .body(Body::empty())
            .unwrap()
    };
    assert_eq!(
        send(&app, with_xff("203.0.113.7")).await.status(),
        StatusCode::OK
    );
    // A client rotating a forged leftmost address is still the same client to the proxy.
    for forged in ["1.1.1.1", "2.2.2.2", "3.3.3.3"] {
        let xff = format!("{forged}, 203.0.113.7");
        assert_eq!(
            send(&app, with_xff(&xff)).await.status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
    // No header at all: the request did not come through the proxy.
    let resp = send(&app, Request::get("/").body(Body::empty()).unwrap()).await;
    assert_eq!(resp.status(), StatusCode::UNAUTHORIZED);
    let body = body_json(resp).await;
    assert_eq!(
        body["message"],
        "the request has no client address in X-Forwarded-For (behind 1 trusted proxies)"
    );

    // Behind a proxy that appends X-Forwarded-For, a client-sent Forwarded header is
    // never read: five forged `for=` values are still one client against a limit of 2.
    let two = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(l)
            .entity(extract::x_forwarded_for(1))
            .limits([Limit::per_minute("rpm", 2)]),
    );
    let mut statuses = Vec::new();
    for i in 0..5 {
        let req = Request::get("/")
            .header("forwarded", format!("for=9.9.9.{i}"))
            .header("x-forwarded-for", "198.51.100.4:5678")
            .body(Body::empty())
            .unwrap();
        statuses.push(send(&two, req).await.status().as_u16());
    }
    assert_eq!(statuses, [200, 200, 429, 429, 429]);
    // A garbage Forwarded next to a valid X-Forwarded-For changes nothing.
    let req = Request::get("/")
        .header("forwarded", "garbage;;==")
        .header("x-forwarded-for", "198.51.100.9")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&two, req).await.status(), StatusCode::OK);
}

#[tokio::test]
async fn secrets_are_digested_and_never_echoed() {
    let l = limiter();
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(l.clone())
            .entity(extract::bearer())
            .limits([Limit::per_minute("rpm", 1)]),
    );
    // A JWT longer than an entity id may be, and a base64 key with + / =.
    let jwt = format!("eyJhbGciOiJIUzI1NiJ9.eyJ{}.c2ln", "x".repeat(400));
    for token in [jwt.as_str(), "sk+live/AbC=="] {
        let req = |t: &str| {
            Request::get("/")
                .header("authorization", format!("Bearer {t}"))
                .body(Body::empty())
                .unwrap()
        };
        assert_eq!(send(&app, req(token)).await.status(), StatusCode::OK);
        let resp = send(&app, req(token)).await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        let text = body_text(resp).await;
        assert!(!text.contains(token), "the 429 echoes the secret: {text}");
        let id = extract::secret(extract::BearerToken).id_of(token);
        assert!(text.contains(&id), "{text}");
        assert_eq!(
            l.available(&id, "default", Some(&[Limit::per_minute("rpm", 1)]))
                .await
                .unwrap()["rpm"],
            0
        );
    }
    // A raw key that is no valid id: 400, naming the rule, not the value.
    let raw = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(l)
            .entity(extract::header("x-api-key"))
            .limits([Limit::per_minute("rpm", 1)]),
    );
    let resp = send(&raw, get_req("/", Some("-secret-key#1"))).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let text = body_text(resp).await;
    assert!(!text.contains("secret-key"), "{text}");
}

#[tokio::test]
async fn unmatched_paths_get_one_resource_or_pass_through() {
    let l = limiter();
    let limited = |l: &RateLimiter, resource: extract::MatchedPathResource| {
        Router::new().route("/known", get(|| async { "ok" })).layer(
            RateLimitLayer::new(l.clone())
                .entity(extract::header("x-api-key"))
                .resource(resource)
                .limits([Limit::per_minute("rpm", 2)]),
        )
    };
    let app = limited(&l, extract::matched_path());
    // Long, distinct paths: one resource between them, never a 500.
    let mut statuses = Vec::new();
    for i in 0..4 {
        let path = format!("/{}/{i}", "x".repeat(80));
        statuses.push(
            send(&app, get_req(&path, Some("k")))
                .await
                .status()
                .as_u16(),
        );
    }
    assert_eq!(statuses, [404, 404, 429, 429]);
    let states = l.bucket_states("k", extract::UNMATCHED).await.unwrap();
    assert_eq!(states["rpm"].total_consumed_milli, 2_000);
    // Passing through: unlimited, and no bucket anywhere.
    let open = limited(&l, extract::matched_path().pass_unmatched());
    for _ in 0..4 {
        let resp = send(&open, get_req("/nowhere", Some("k2"))).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert!(resp.headers().get("ratelimit").is_none());
    }
    assert!(l
        .bucket_states("k2", extract::UNMATCHED)
        .await
        .unwrap()
        .is_empty());
    // An extracted resource that breaks the naming rules is the client's fault: 400.
    let by_query = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(l.clone())
            .entity(extract::header("x-api-key"))
            .resource(extract::query("model"))
            .limits([Limit::per_minute("rpm", 2)]),
    );
    let resp = send(&by_query, get_req("/?model=gpt%234", Some("k"))).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(body_json(resp).await["field"], "resource");
    // And a missing one too.
    let resp = send(&by_query, get_req("/", Some("k"))).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
}

#[test]
fn invalid_limits_fail_when_the_layer_is_built() {
    let l = limiter();
    let err = RateLimitLayer::new(l.clone())
        .try_limits([{
            let mut bad = Limit::per_minute("rpm", 1);
            bad.name = "bad#name".into();
            bad
        }])
        .unwrap_err();
    assert!(matches!(err, Error::InvalidName { .. }), "{err:?}");
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut zero = Limit::per_minute("rpm", 1);
        zero.capacity = 0;
        RateLimitLayer::new(l).limits([zero])
    }))
    .unwrap_err();
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("invalid limit"), "{message}");
}

#[tokio::test]
async fn fallback_entity_and_misconfiguration() {
    let l = limiter();
    let app = Router::new().route("/", get(|| async { "ok" })).layer(
        RateLimitLayer::new(l.clone())
            .entity(extract::header("x-api-key"))
            .fallback_entity(extract::fixed("anonymous"))
            .limits([Limit::per_minute("rpm", 1)]),
    );
    assert_eq!(
        send(&app, get_req("/", None)).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        send(&app, get_req("/", None)).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        send(&app, get_req("/", Some("k"))).await.status(),
        StatusCode::OK
    );

    // No limits anywhere: a server problem, not the client's.
    let unconfigured = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(RateLimitLayer::new(l.clone()).entity(extract::header("x-api-key")));
    let resp = send(&unconfigured, get_req("/", Some("k"))).await;
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    // ...until an operator stores some.
    l.set_resource_limits("default", &[Limit::per_minute("rpm", 1)])
        .await
        .unwrap();
    assert_eq!(
        send(&unconfigured, get_req("/", Some("k2"))).await.status(),
        StatusCode::OK
    );
    let no_entity = Router::new()
        .route("/", get(|| async { "ok" }))
        .layer(RateLimitLayer::new(l).limits([Limit::per_minute("rpm", 1)]));
    assert_eq!(
        send(&no_entity, get_req("/", Some("k"))).await.status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
}

async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
        .unwrap();
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_server_on_loopback() {
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;

    let l = RateLimiter::new(InMemoryRepository::new());
    let app = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route(
            "/ip",
            get(|| async { "ip" }).layer(
                RateLimitLayer::new(l.clone())
                    .entity(extract::peer_ip())
                    .resource(extract::fixed("ip"))
                    .limits([Limit::per_minute("rpm", 2)]),
            ),
        )
        .layer(
            RateLimitLayer::new(l.clone())
                .entity(extract::header("x-api-key"))
                .fallback_entity(extract::peer_ip())
                .resource(extract::matched_path())
                .limits([Limit::per_minute("rpm", 20)]),
        );
    let addr = serve(app).await;
    let client: Client<_, Body> = Client::builder(TokioExecutor::new()).build_http();
    let call = |path: &'static str, key: Option<String>| {
        let client = client.clone();
        async move {
            let mut b = Request::get(format!("http://{addr}{path}"));
            if let Some(k) = key {
                b = b.header("x-api-key", k);
            }
            let resp = client
                .request(b.body(Body::empty()).unwrap())
                .await
                .unwrap();
            let status = resp.status();
            resp.into_body().collect().await.unwrap();
            status
        }
    };
    // 50 concurrent requests for one key against 20 per minute: exactly 20 admitted.
    let results =
        futures_util::future::join_all((0..50).map(|_| call("/hello", Some("k1".into())))).await;
    let ok = results.iter().filter(|s| **s == StatusCode::OK).count();
    let limited = results
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!((ok, limited), (20, 30));
    assert_eq!(call("/hello", Some("k2".into())).await, StatusCode::OK);
    // The peer address, 127.0.0.1, is the entity of the /ip route.
    assert_eq!(call("/ip", Some("k3".into())).await, StatusCode::OK);
    assert_eq!(call("/ip", Some("k4".into())).await, StatusCode::OK);
    assert_eq!(
        call("/ip", Some("k5".into())).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    let left = l
        .available("127.0.0.1", "ip", Some(&[Limit::per_minute("rpm", 2)]))
        .await
        .unwrap();
    assert_eq!(left["rpm"], 0);
}

#[tokio::test]
async fn skipped_requests_pass_untouched() {
    let l = limiter();
    let app = Router::new()
        .route("/", get(|| async { "ok" }))
        .route("/healthz", get(|| async { "healthy" }))
        .layer(
            RateLimitLayer::new(l.clone())
                .entity(extract::header("x-api-key"))
                .limits([Limit::per_minute("rpm", 1)])
                .skip(|head| {
                    head.uri.path() == "/healthz"
                        || head
                            .headers
                            .get("x-api-key")
                            .is_some_and(|k| k == "internal")
                }),
        );
    // Health checks and an allow-listed key: never limited, no lease, no header fields,
    // no bucket written; even without a key.
    for _ in 0..3 {
        let resp = send(&app, get_req("/healthz", None)).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().get("ratelimit").is_none());
        let resp = send(&app, get_req("/", Some("internal"))).await;
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp.headers().get("ratelimit-policy").is_none());
    }
    assert!(l
        .bucket_states("internal", "default")
        .await
        .unwrap()
        .is_empty());
    // Everyone else is limited as before.
    assert_eq!(
        send(&app, get_req("/", Some("k"))).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        send(&app, get_req("/", Some("k"))).await.status(),
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        send(&app, get_req("/", None)).await.status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn handlers_take_the_lease_as_an_argument() {
    let l = limiter();
    let app = Router::new()
        .route(
            "/",
            get(|lease: Option<LeaseHandle>| async move {
                match lease {
                    Some(lease) => format!("lease {}", lease.consumed()["rpm"]),
                    None => "no lease".to_string(),
                }
            }),
        )
        .route(
            "/needs-lease",
            get(|lease: LeaseHandle| async move { lease.entity_id().to_string() }),
        )
        .layer(
            RateLimitLayer::new(l.clone())
                .entity(extract::header("x-api-key"))
                .limits([Limit::per_minute("rpm", 10)])
                .skip(|head| head.headers.contains_key("x-internal")),
        );
    let resp = send(&app, get_req("/", Some("k"))).await;
    assert_eq!(body_text(resp).await, "lease 1");
    // A skipped request has no lease: `Option<LeaseHandle>` is `None`, and a handler that
    // requires one answers 500 naming the misconfiguration.
    let mut skipped = get_req("/", None);
    skipped
        .headers_mut()
        .insert("x-internal", "1".parse().unwrap());
    assert_eq!(body_text(send(&app, skipped).await).await, "no lease");
    let mut skipped = get_req("/needs-lease", None);
    skipped
        .headers_mut()
        .insert("x-internal", "1".parse().unwrap());
    let resp = send(&app, skipped).await;
    assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert!(body_text(resp).await.contains("RateLimitLayer"));
}

#[tokio::test]
async fn a_rejection_is_a_response() {
    use axum::response::IntoResponse;
    let l = limiter();
    let limits = [Limit::per_minute("rpm", 1)];
    l.acquire("k", "api")
        .limits(limits.clone())
        .await
        .unwrap()
        .commit()
        .await
        .unwrap();
    let Err(Error::RateLimited(e)) = l.acquire("k", "api").limits(limits).await else {
        panic!("expected a rejection");
    };
    let resp = Rejection::RateLimited(e).into_response();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(resp.headers()["retry-after"], "60");
    assert!(resp.headers().contains_key(&RATELIMIT));
    assert!(resp.headers().contains_key(&RATELIMIT_POLICY));
    let body = body_text(resp).await;
    assert!(body.contains("rate_limit_exceeded"), "{body}");
}

#[test]
fn layers_and_services_are_clone_and_debug() {
    use tower::Layer;
    let layer = zae_limiter::middleware::RateLimit::layer(limiter())
        .entity(extract::header("x-api-key"))
        .limits([Limit::per_minute("rpm", 10)]);
    let debug = format!("{:?}", layer.clone());
    assert!(
        debug.contains("header x-api-key") && debug.contains("rpm"),
        "{debug}"
    );
    let mut service = layer.layer(tower::service_fn(|_: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(Body::empty()))
    }));
    let _: &mut _ = service.get_mut();
    let service = service.clone();
    assert!(format!("{service:?}").contains("RateLimit"));
    let _inner = service.into_inner();
}

#[test]
fn acquires_and_entity_builders_are_debug() {
    let l = limiter();
    let acquire = format!("{:?}", l.acquire("u1", "api").consume([("rpm", 2)]));
    assert!(
        acquire.contains("u1") && acquire.contains("api"),
        "{acquire}"
    );
    let create = format!("{:?}", l.create_entity("e1").name("E"));
    assert!(create.contains("e1"), "{create}");
}
