//! Runs the example servers as real processes and checks what the README promises.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use axum::body::Body;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

mod dynamo;

/// A running example, killed on drop.
struct Example {
    child: Child,
    base: String,
}

impl Drop for Example {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn example_path(name: &str) -> PathBuf {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    dir.join("examples").join(name)
}

fn start(name: &str, env: &[(&str, String)]) -> Example {
    let path = example_path(name);
    assert!(
        path.exists(),
        "{} was not built (cargo test builds examples)",
        path.display()
    );
    let mut child = Command::new(path)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string();
    Example { child, base }
}

async fn call(
    method: &str,
    url: String,
    headers: &[(&str, &str)],
    body: &str,
) -> (StatusCode, http::HeaderMap, String) {
    let client: Client<_, Body> = Client::builder(TokioExecutor::new()).build_http();
    let mut b = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = client
        .request(b.body(Body::from(body.to_string())).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

/// The environment that points an example at DynamoDB Local.
async fn on_dynamodb() -> Vec<(&'static str, String)> {
    vec![("ZAE_DYNAMODB_ENDPOINT", dynamo::endpoint().await)]
}

#[tokio::test]
async fn quickstart_limits_per_key() {
    quickstart(start("quickstart", &[])).await;
}

#[tokio::test]
async fn quickstart_on_dynamodb() {
    quickstart(start("quickstart", &on_dynamodb().await)).await;
}

#[tokio::test]
async fn llm_gateway_charges_true_token_counts() {
    llm_gateway(start("llm_gateway", &[])).await;
}

#[tokio::test]
async fn llm_gateway_on_dynamodb() {
    llm_gateway(start("llm_gateway", &on_dynamodb().await)).await;
}

#[tokio::test]
async fn fleet_shares_one_limit_between_two_servers() {
    let path = example_path("fleet");
    let out = Command::new(path)
        .envs(on_dynamodb().await)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let summary = text.lines().last().unwrap();
    assert!(
        summary.starts_with("admitted 10 in all (server-a 5, server-b 5), rejected 20"),
        "{text}"
    );
    assert_eq!(text.matches(": 200 ").count(), 10, "{text}");
    assert_eq!(text.matches(": 429 ").count(), 20, "{text}");
}

async fn quickstart(ex: Example) {
    let hello = format!("{}/hello", ex.base);
    for _ in 0..5 {
        let (status, _, body) = call("GET", hello.clone(), &[("x-api-key", "alice")], "").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "Hello, world!\n");
    }
    let (status, headers, body) = call("GET", hello.clone(), &[("x-api-key", "alice")], "").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=12).contains(&retry), "retry-after {retry}");
    assert!(body.contains("rate_limit_exceeded"));
    let (status, _, _) = call("GET", hello.clone(), &[("x-api-key", "bob")], "").await;
    assert_eq!(status, StatusCode::OK);
    let (status, _, _) = call("GET", hello.clone(), &[], "").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // Keys are limited by their digest: the 429 never echoes one.
    let (status, _, body) = call("GET", hello, &[("x-api-key", "alice")], "").await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert!(!body.contains("alice"), "{body}");
    assert!(body.contains(&zae_limiter::middleware::extract::secret_id("alice")));
}

async fn llm_gateway(ex: Example) {
    let auth = [
        ("authorization", "Bearer sk-acme-1"),
        ("content-type", "application/json"),
    ];
    let chat = r#"{"messages":[{"role":"user","content":"Tell me a story about limits"}],"max_tokens":400}"#;
    let (status, headers, body) = call(
        "POST",
        format!("{}/v1/chat/completions", ex.base),
        &auth,
        chat,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["usage"]["total_tokens"], 28);
    assert!(headers["ratelimit-policy"]
        .to_str()
        .unwrap()
        .contains(r#"zae-unit="tokens""#));
    // The estimate was 7 + 400 = 407 tokens; 28 were charged. With 2,000 a minute, six such
    // calls would not fit if the estimate had stuck.
    for _ in 0..10 {
        let (status, _, body) = call(
            "POST",
            format!("{}/v1/chat/completions", ex.base),
            &auth,
            chat,
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    // A streamed answer settles at its end.
    let (status, _, body) = call("POST", format!("{}/v1/chat/stream", ex.base), &auth, chat).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.matches("data: ").count(), 21);
    // A call whose estimate exceeds the key's 2,000 a minute can never succeed.
    let huge = r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":5000}"#;
    let (status, headers, body) = call(
        "POST",
        format!("{}/v1/chat/completions", ex.base),
        &auth,
        huge,
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert!(headers.get("retry-after").is_none());
    // No key: 401. Bad JSON: 400 before any token is charged.
    let (status, _, _) = call(
        "POST",
        format!("{}/v1/chat/completions", ex.base),
        &[],
        chat,
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _, _) = call(
        "POST",
        format!("{}/v1/chat/completions", ex.base),
        &auth,
        "{",
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
