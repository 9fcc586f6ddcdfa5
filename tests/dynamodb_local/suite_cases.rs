//! The behaviour suite on the DynamoDB backend, against DynamoDB Local.

use crate::dynamo;
use crate::suite;

use std::sync::Arc;

use zae_limiter::Repository;

/// A fresh namespace. The suite runs on a manual clock in the past, so buckets get no TTL
/// here (DynamoDB Local would expire them); TTL has tests of its own.
async fn dynamodb() -> Arc<dyn Repository> {
    let repo = dynamo::builder()
        .await
        .bucket_ttl_multiplier(0)
        .build()
        .await
        .expect("open the test repository");
    Arc::new(repo)
}

crate::limiter_suite!(dynamodb());
