//! The tower layer: rate-limit any `tower::Service` over HTTP, such as an axum `Router`.
//!
//! ```
//! use axum::{routing::get, Router};
//! use zae_limiter::middleware::{extract, RateLimitLayer};
//! use zae_limiter::{InMemoryRepository, Limit, RateLimiter};
//!
//! let limiter = RateLimiter::new(InMemoryRepository::new());
//! let app: Router = Router::new().route("/hello", get(|| async { "hi" })).layer(
//!     RateLimitLayer::new(limiter)
//!         .entity(extract::secret(extract::header("x-api-key")))
//!         .resource(extract::matched_path())
//!         .limits([Limit::per_minute("rpm", 100)]),
//! );
//! ```
//!
//! The pieces, in the tower-http manner: [`RateLimitLayer`] holds the configuration,
//! [`RateLimit`] wraps the inner service, [`ResponseFuture`] acquires then calls it, and
//! [`RateLimitBody`] commits the lease when the response body ends. Extractors see the
//! request head only, so the layer is not generic over the body type.
//!
//! With the `axum` feature a handler takes the request's [`crate::LeaseHandle`] as an
//! argument (`Option<LeaseHandle>` where the layer may skip the request), returns [`Usage`]
//! as a response part, and a [`Rejection`] is an `IntoResponse`.
//!
//! [`RateLimit`] is not `tower::limit::RateLimit`: that one makes callers wait in
//! `poll_ready`; this one answers 429 per entity (see [`RateLimit`]).
//!
//! | situation | answer |
//! |---|---|
//! | no entity in the request | 401, JSON naming what was expected |
//! | entity fails validation | 400, JSON naming the field |
//! | resource disabled (the Python library's `disabled` flag) | 403, JSON |
//! | a limit exceeded | 429, JSON from [`crate::RateLimitExceeded::as_json`], `Retry-After`, `RateLimit-Policy`, `RateLimit` |
//! | backend down, policy `Block` | 503 with `Retry-After` |
//! | no limits anywhere, bad resource | 500 (logged at `error`) |
//! | admitted | the inner response, with `RateLimit-Policy` and `RateLimit` (configurable) |

use std::collections::BTreeMap;

#[cfg(feature = "axum")]
mod axum_integration;
mod body;
pub mod extract;
mod future;
mod layer;
mod response;
mod service;

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use axum_integration::MissingLease;
pub use body::RateLimitBody;
pub use future::ResponseFuture;
pub use layer::RateLimitLayer;
pub use response::{Rejection, RATELIMIT, RATELIMIT_POLICY};
pub use service::RateLimit;

/// The true cost of a request, reported by the handler in the *response* extensions: the
/// layer adjusts the lease by `actual - estimate` for each named limit before committing.
/// With the `axum` feature it is a response part of its own.
///
/// ```
/// use axum::response::IntoResponse;
/// use zae_limiter::middleware::Usage;
///
/// async fn chat() -> impl IntoResponse {
///     let tokens_used = 812;
///     (Usage::new().with("tpm", tokens_used), "answer")
/// }
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    totals: BTreeMap<String, u64>,
}

impl Usage {
    /// No usage reported yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the actual total for a limit.
    pub fn with(mut self, limit_name: impl Into<String>, total: u64) -> Self {
        self.totals.insert(limit_name.into(), total);
        self
    }

    /// The totals by limit name.
    pub fn totals(&self) -> &BTreeMap<String, u64> {
        &self.totals
    }
}

impl<K: Into<String>> FromIterator<(K, u64)> for Usage {
    fn from_iter<I: IntoIterator<Item = (K, u64)>>(iter: I) -> Self {
        Usage {
            totals: iter.into_iter().map(|(k, v)| (k.into(), v)).collect(),
        }
    }
}
