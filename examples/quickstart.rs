//! An axum service limited per `x-api-key` on the in-memory backend, or on DynamoDB.
//!
//! ```text
//! cargo run --example quickstart
//! curl -i -H 'x-api-key: alice' http://127.0.0.1:3000/hello
//! ```
//!
//! With `ZAE_DYNAMODB_ENDPOINT=http://...` the limits hold in that DynamoDB instead (for
//! every server pointed at it); `--dynamodb` alone starts DynamoDB Local for the run.
//!
//! `GET /hello` allows 5 requests a minute per key: the 6th within a minute gets 429, other
//! keys are unaffected, a request without a key gets 401 and a key with `#` gets 400.
//! Serves on `$ADDR` (default `127.0.0.1:3000`).

use axum::{routing::get, Router};
use zae_limiter::middleware::{extract, RateLimitLayer};
use zae_limiter::Limit;

#[path = "support/mod.rs"]
mod support;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    support::init_tracing();

    let backend = support::from_env().await?;
    tracing::info!("rate limits held by the {}", backend.description);
    let limiter = backend.limiter();
    let app = Router::new()
        .route("/hello", get(|| async { "Hello, world!\n" }))
        .layer(
            RateLimitLayer::new(limiter)
                // An API key is a secret: limited by its digest, never stored or echoed.
                .entity(extract::secret(extract::header("x-api-key")))
                .resource(extract::fixed("hello"))
                .limits([Limit::per_minute("rpm", 5)]),
        );

    let addr = std::env::var("ADDR").unwrap_or_else(|_| "127.0.0.1:3000".to_string());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app).await?;
    Ok(())
}
