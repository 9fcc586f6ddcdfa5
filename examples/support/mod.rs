//! How the examples pick their backend: DynamoDB when `ZAE_DYNAMODB_ENDPOINT` is set or
//! `--dynamodb` is passed (starting DynamoDB Local when no endpoint is given), else the
//! in-memory backend. DynamoDB needs the `dynamodb` and `local` features
//! (`cargo run --features dynamodb,local --example quickstart -- --dynamodb`).

#[cfg(feature = "local")]
use zae_limiter::local::DynamoDbLocal;
#[cfg(feature = "local")]
use zae_limiter::DynamoDbRepository;
use zae_limiter::{Error, InMemoryRepository, RateLimiter, Repository};

/// The chosen backend, with the DynamoDB Local it started (stopped on drop).
pub struct Backend {
    /// The repository to build limiters on.
    pub repo: std::sync::Arc<dyn Repository>,
    /// What was chosen, for the log.
    pub description: String,
    #[cfg(feature = "local")]
    _local: Option<DynamoDbLocal>,
}

impl Backend {
    /// A limiter over the backend.
    pub fn limiter(&self) -> RateLimiter {
        RateLimiter::builder_shared(self.repo.clone()).build()
    }
}

/// The in-memory backend.
fn in_memory() -> Backend {
    Backend {
        repo: std::sync::Arc::new(InMemoryRepository::new()),
        description: "in-memory backend".into(),
        #[cfg(feature = "local")]
        _local: None,
    }
}

/// Reads `ZAE_DYNAMODB_ENDPOINT` and `--dynamodb`.
#[cfg(not(feature = "local"))]
pub async fn from_env() -> Result<Backend, Box<dyn std::error::Error>> {
    if std::env::var_os("ZAE_DYNAMODB_ENDPOINT").is_some()
        || std::env::args().any(|a| a == "--dynamodb")
    {
        return Err(
            "DynamoDB needs the crate's `dynamodb` and `local` features: \
                    cargo run --features dynamodb,local --example <name>"
                .into(),
        );
    }
    Ok(in_memory())
}

/// Reads `ZAE_DYNAMODB_ENDPOINT` and `--dynamodb`.
#[cfg(feature = "local")]
pub async fn from_env() -> Result<Backend, Box<dyn std::error::Error>> {
    let endpoint = std::env::var("ZAE_DYNAMODB_ENDPOINT").ok();
    let flag = std::env::args().any(|a| a == "--dynamodb");
    let (endpoint, local) = match (endpoint, flag) {
        (Some(url), _) => (url, None),
        (None, true) => {
            let local = DynamoDbLocal::start().await?;
            (local.endpoint_url().to_string(), Some(local))
        }
        (None, false) => return Ok(in_memory()),
    };
    // A patient timeout: a just-started DynamoDB Local answers its first calls slowly.
    let repo = DynamoDbRepository::builder()
        .endpoint_url(&endpoint)
        .timeout(std::time::Duration::from_secs(5))
        .build()
        .await?;
    Ok(Backend {
        description: format!(
            "DynamoDB at {endpoint} (table {}, namespace {})",
            repo.table(),
            repo.namespace()
        ),
        repo: std::sync::Arc::new(repo),
        _local: local,
    })
}

/// Logs to stderr at `RUST_LOG` (default `info`), keeping stdout for the address line.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,zae_limiter=info".into()),
        )
        .init();
}

/// `Ok` if the entity was created or already exists (a second run on DynamoDB).
#[allow(dead_code)]
pub fn created_or_exists<T>(result: Result<T, Error>) -> Result<(), Error> {
    match result {
        Ok(_) | Err(Error::EntityExists { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}
