//! [`RateLimit`]: the service that wraps `inner`.

use std::future::IntoFuture;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use tower_service::Service;

use super::body::RateLimitBody;
use super::future::ResponseFuture;
use super::layer::Config;
use super::response::Rejection;
use crate::Error;

/// Rate-limits requests to `S`; made by [`super::RateLimitLayer`].
pub struct RateLimit<S, B> {
    inner: S,
    config: Arc<Config<B>>,
}

impl<S: Clone, B> Clone for RateLimit<S, B> {
    fn clone(&self) -> Self {
        RateLimit {
            inner: self.inner.clone(),
            config: Arc::clone(&self.config),
        }
    }
}

impl<S: std::fmt::Debug, B> std::fmt::Debug for RateLimit<S, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, B> RateLimit<S, B> {
    pub(crate) fn new(inner: S, config: Arc<Config<B>>) -> Self {
        RateLimit { inner, config }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Where the request's route limits are looked up: axum's matched path, else the path.
    fn route_key(req: &Request<B>) -> &str {
        #[cfg(feature = "axum")]
        if let Some(m) = req.extensions().get::<axum::extract::MatchedPath>() {
            return m.as_str();
        }
        req.uri().path()
    }
}

impl<S, B, ResB> Service<Request<B>> for RateLimit<S, B>
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
        let req = match &config.skip {
            Some(skip) => {
                let (head, body) = req.into_parts();
                let skipped = skip(&head);
                let req = Request::from_parts(head, body);
                if skipped {
                    let call = self.inner.call(req);
                    return ResponseFuture::passing(config, call);
                }
                req
            }
            None => req,
        };
        let entity = config
            .entity
            .as_ref()
            .and_then(|e| e.extract(&req))
            .or_else(|| {
                config
                    .fallback_entity
                    .as_ref()
                    .and_then(|e| e.extract(&req))
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
        let Some(resource) = config.resource.extract(&req) else {
            if config.resource.pass_through_when_missing() {
                let call = self.inner.call(req);
                return ResponseFuture::passing(config, call);
            }
            let rejection = Rejection::MissingResource {
                expected: config.resource.describe(),
            };
            return ResponseFuture::rejected(config, rejection);
        };
        let span = tracing::debug_span!("rate_limit", entity_id = %entity, resource = %resource);
        let mut acquire = config.limiter.acquire(entity, resource).lists_checked();
        let route_limits = if config.route_limits.is_empty() {
            None
        } else {
            config.route_limits.get(Self::route_key(&req))
        };
        if let Some(limits) = route_limits.or(config.limits.as_ref()) {
            acquire = acquire.shared_limits(Arc::clone(limits));
        }
        if let Some(limits) = &config.fallback_limits {
            acquire = acquire.shared_fallback_limits(Arc::clone(limits));
        }
        if let Some(estimate) = &config.consume {
            acquire = acquire.consume(estimate(&req));
        }
        if let Some(cascade) = config.cascade {
            acquire = acquire.cascade(cascade);
        }
        if let Some(policy) = config.on_unavailable {
            acquire = acquire.on_unavailable(policy);
        }
        // A backend that answers at once (in memory) is decided here, so the inner service is
        // called directly: no boxed future, and no clone of the inner service (an axum
        // `Route` is a boxed service).
        let decided = {
            let _entered = span.enter();
            acquire.try_now()
        };
        match decided {
            Ok(Ok(lease)) => {
                let mut req = req;
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
