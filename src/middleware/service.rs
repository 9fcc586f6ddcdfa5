//! [`RateLimit`]: the service that wraps `inner`.

use std::future::IntoFuture;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::body::RateLimitBody;
use super::future::ResponseFuture;
use super::layer::Config;
use super::response::Rejection;
use super::RateLimitLayer;
use crate::{Error, RateLimiter};

/// Rate-limits requests to `S`; made by [`RateLimitLayer`] (or [`RateLimit::layer`]).
///
/// # Differences from `tower::limit::RateLimit`
///
/// The names clash, the behaviour does not: tower's `RateLimit` counts requests per
/// service instance and makes callers *wait* in `poll_ready` until the next window. This
/// one decides per request, per entity (API key, user, address) and resource, against
/// buckets shared by every instance and process using the same backend, and *answers*
/// `429 Too Many Requests` (with `Retry-After` and the `RateLimit` fields) instead of
/// waiting; `poll_ready` only waits for the inner service. Import one of them under
/// another name if both are in scope.
#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    config: Arc<Config>,
}

impl RateLimit<()> {
    /// A [`RateLimitLayer`] over `limiter`, as tower-http services offer (`Timeout::layer`).
    pub fn layer(limiter: RateLimiter) -> RateLimitLayer {
        RateLimitLayer::new(limiter)
    }
}

impl<S> RateLimit<S> {
    pub(crate) fn new(inner: S, config: Arc<Config>) -> Self {
        RateLimit { inner, config }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Where the request's route limits are looked up: axum's matched path, else the path.
    fn route_key(head: &Parts) -> &str {
        #[cfg(feature = "axum")]
        if let Some(m) = head.extensions.get::<axum::extract::MatchedPath>() {
            return m.as_str();
        }
        head.uri.path()
    }
}

impl<S, B, ResB> Service<Request<B>> for RateLimit<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
    ResB: Body<Data = Bytes>,
{
    type Response = Response<RateLimitBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let config = Arc::clone(&self.config);
        // Extractors, the estimator and the skip predicate read the head; the request is
        // put back together once, for the inner service.
        let (head, body) = req.into_parts();
        if config.skip.as_ref().is_some_and(|skip| skip(&head)) {
            let call = self.inner.call(Request::from_parts(head, body));
            return ResponseFuture::passing(config, call);
        }
        let entity = config
            .entity
            .as_ref()
            .and_then(|e| e.extract(&head))
            .or_else(|| {
                config
                    .fallback_entity
                    .as_ref()
                    .and_then(|e| e.extract(&head))
            });
        let Some(entity) = entity else {
            let rejection = match &config.entity {
                Some(e) => Rejection::MissingEntity {
                    expected: e.describe(),
                },
                None => Rejection::Misconfigured(Error::validation(
                    "entity",
                    "",
                    "RateLimitLayer has no entity extractor; call .entity(..)",
                )),
            };
            return ResponseFuture::rejected(config, rejection);
        };
        // The acquire validates the entity and the resource (invalid ones become a 400).
        let Some(resource) = config.resource.extract(&head) else {
            if config.resource.pass_through_when_missing() {
                let call = self.inner.call(Request::from_parts(head, body));
                return ResponseFuture::passing(config, call);
            }
            let rejection = Rejection::MissingResource {
                expected: config.resource.describe(),
            };
            return ResponseFuture::rejected(config, rejection);
        };
        // Only when a subscriber wants it: a disabled span still costs a `log` fallback
        // (when tracing's `log` feature is on, as tower turns it on) on every request.
        let span = if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug_span!("rate_limit", entity_id = %entity, resource = %resource)
        } else {
            tracing::Span::none()
        };
        let route_limits = if config.route_limits.is_empty() {
            None
        } else {
            config.route_limits.get(Self::route_key(&head))
        };
        let acquire = crate::Acquire::checked(
            config.limiter.clone(),
            entity,
            resource,
            route_limits.or(config.limits.as_ref()).cloned(),
            config.fallback_limits.clone(),
            config.consume.as_ref().map(|estimate| estimate(&head)),
            config.cascade,
            config.on_unavailable,
        );
        // A backend that answers at once (in memory) is decided here, so the inner service is
        // called directly: no boxed future, and no clone of the inner service (an axum
        // `Route` is a boxed service).
        let decided = {
            let _entered = span.enter();
            acquire.try_now()
        };
        let mut req = Request::from_parts(head, body);
        match decided {
            Ok(Ok(lease)) => {
                req.extensions_mut().insert(lease.handle());
                let call = self.inner.call(req);
                ResponseFuture::calling(config, call, lease, span)
            }
            Ok(Err(e)) => ResponseFuture::failed(config, e, span),
            Err(pending) => {
                // The inner service was made ready by `poll_ready`; take it and leave a
                // clone, to be called once the acquire completes.
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                ResponseFuture::acquiring(config, pending.into_future(), req, inner, span)
            }
        }
    }
}
