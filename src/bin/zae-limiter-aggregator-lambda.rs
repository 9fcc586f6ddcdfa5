//! The usage aggregator as an AWS Lambda function on the table's stream (feature
//! `lambda`); see [`zae_limiter::aggregator::lambda`] for its settings. Build the package
//! with `cargo lambda build --release --features lambda --bin zae-limiter-aggregator-lambda`
//! (the README has the plain `cargo build` recipe).

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .without_time()
        .init();
    zae_limiter::aggregator::lambda::run().await
}
