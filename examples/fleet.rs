//! Two servers, one limit: what the DynamoDB backend is for.
//!
//! ```text
//! cargo run --example fleet                       # starts DynamoDB Local for the run
//! ZAE_DYNAMODB_ENDPOINT=http://127.0.0.1:8000 cargo run --example fleet
//! ```
//!
//! Starts two axum servers, each with its own `DynamoDbRepository` (its own client and
//! caches, as two machines would have), both limiting `x-api-key` to 10 requests a minute,
//! stored once in the table. Then 30 requests for one key go round-robin to both servers:
//! 10 are admitted in all, not 10 per server, and the rest get 429 from whichever server
//! they reach. Prints one line per request and a summary.

use std::time::Duration;

use axum::body::Body;
use axum::routing::get;
use axum::Router;
use http::{Request, StatusCode};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use zae_limiter::local::DynamoDbLocal;
use zae_limiter::middleware::{extract, RateLimitLayer};
use zae_limiter::{DynamoDbRepository, Limit, RateLimiter};

/// One server of the fleet: its own repository on the shared table.
async fn server(endpoint: &str, name: &'static str) -> Result<String, Box<dyn std::error::Error>> {
    let repo = DynamoDbRepository::builder()
        .endpoint_url(endpoint)
        .namespace("fleet-example")
        .timeout(Duration::from_secs(5))
        .build()
        .await?;
    let app = Router::new()
        .route(
            "/",
            get(move || async move { format!("hello from {name}\n") }),
        )
        .layer(
            RateLimitLayer::new(RateLimiter::new(repo))
                // An API key is a secret: limited by its digest, never stored or echoed.
                .entity(extract::secret(extract::header("x-api-key")))
                .resource(extract::fixed("fleet")),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (endpoint, _local) = match std::env::var("ZAE_DYNAMODB_ENDPOINT") {
        Ok(url) => (url, None),
        Err(_) => {
            let local = DynamoDbLocal::start().await?;
            (local.endpoint_url().to_string(), Some(local))
        }
    };

    // The operator stores the limit once, for every server (a run-unique key keeps repeated
    // runs against one table apart).
    let admin = RateLimiter::new(
        DynamoDbRepository::builder()
            .endpoint_url(&endpoint)
            .namespace("fleet-example")
            .timeout(Duration::from_secs(5))
            .build()
            .await?,
    );
    admin
        .set_resource_limits("fleet", &[Limit::per_minute("rpm", 10)])
        .await?;
    let key = format!(
        "key-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );

    let servers = [
        server(&endpoint, "server-a").await?,
        server(&endpoint, "server-b").await?,
    ];
    println!(
        "DynamoDB at {endpoint}; servers {} and {}",
        servers[0], servers[1]
    );

    let client = Client::builder(TokioExecutor::new()).build_http::<Body>();
    let mut admitted = [0u32; 2];
    let mut rejected = [0u32; 2];
    for i in 0..30 {
        let which = i % 2;
        let request = Request::get(&servers[which])
            .header("x-api-key", &key)
            .body(Body::empty())?;
        let response = client.request(request).await?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        let _ = response.into_body().collect().await?;
        match status {
            StatusCode::OK => admitted[which] += 1,
            StatusCode::TOO_MANY_REQUESTS => rejected[which] += 1,
            other => return Err(format!("unexpected status {other}").into()),
        }
        println!(
            "request {:>2} -> server-{}: {} (retry-after {retry_after})",
            i + 1,
            ["a", "b"][which],
            status.as_u16()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "admitted {} in all (server-a {}, server-b {}), rejected {} (server-a {}, server-b {}); the limit is 10 a minute for the whole fleet",
        admitted[0] + admitted[1],
        admitted[0],
        admitted[1],
        rejected[0] + rejected[1],
        rejected[0],
        rejected[1]
    );
    Ok(())
}
