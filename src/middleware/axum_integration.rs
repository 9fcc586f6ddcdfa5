//! axum integration: handlers take the [`LeaseHandle`] as an argument, return [`Usage`] as
//! a response part, and a [`Rejection`] is a response.
//!
//! ```
//! use axum::response::IntoResponse;
//! use zae_limiter::middleware::Usage;
//! use zae_limiter::LeaseHandle;
//!
//! // Behind `RateLimitLayer`: the lease of this request, then its true cost.
//! async fn chat(lease: LeaseHandle) -> impl IntoResponse {
//!     let estimate = lease.consumed().get("tpm").copied().unwrap_or(0);
//!     (Usage::new().with("tpm", 812), format!("estimated {estimate}"))
//! }
//! # let _: axum::Router = axum::Router::new().route("/chat", axum::routing::post(chat));
//! ```

use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::response::{IntoResponse, IntoResponseParts, Response, ResponseParts};
use http::request::Parts;
use http::StatusCode;

use super::response::{rejected_headers, PolicyNaming};
use super::{Rejection, Usage};
use crate::LeaseHandle;

/// The rejection of a handler that takes a [`LeaseHandle`] on a route the layer does not
/// cover (or a request it skipped): a server misconfiguration, answered 500 and logged.
#[derive(Debug, Clone, Copy, Default)]
#[non_exhaustive]
pub struct MissingLease;

impl std::fmt::Display for MissingLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the request has no rate-limit lease: is the route behind RateLimitLayer?")
    }
}

impl std::error::Error for MissingLease {}

impl IntoResponse for MissingLease {
    fn into_response(self) -> Response {
        tracing::error!("{self}; answering 500 (take Option<LeaseHandle> where it may be absent)");
        (StatusCode::INTERNAL_SERVER_ERROR, self.to_string()).into_response()
    }
}

/// The lease the layer acquired for this request. Take `Option<LeaseHandle>` on routes
/// where the layer may skip the request or let it pass.
impl<S: Send + Sync> FromRequestParts<S> for LeaseHandle {
    type Rejection = MissingLease;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, MissingLease> {
        parts
            .extensions
            .get::<LeaseHandle>()
            .cloned()
            .ok_or(MissingLease)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for LeaseHandle {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _state: &S,
    ) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<LeaseHandle>().cloned())
    }
}

/// Puts the usage in the response extensions, where the layer reads it.
impl IntoResponseParts for Usage {
    type Error = std::convert::Infallible;

    fn into_response_parts(self, mut res: ResponseParts) -> Result<ResponseParts, Self::Error> {
        res.extensions_mut().insert(self);
        Ok(res)
    }
}

/// The layer's default response for the rejection, with the `RateLimit` fields on a 429:
/// for handlers and `rejection_response` hooks that build on it.
impl IntoResponse for Rejection {
    fn into_response(self) -> Response {
        let (mut parts, body) = self.default_response().into_parts();
        if let Rejection::RateLimited(e) = &self {
            rejected_headers(&mut parts.headers, e, &PolicyNaming::default());
        }
        Response::from_parts(parts, axum::body::Body::new(body))
    }
}
