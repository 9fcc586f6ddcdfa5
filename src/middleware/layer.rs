//! [`RateLimitLayer`]: holds the layer's configuration.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use tower_layer::Layer;

use super::extract::{Extractor, SharedExtractor};
use super::response::{PolicyCache, PolicyNaming, Rejection};
use super::service::RateLimit;
use crate::amount::{named_amounts, Amount};
use crate::{Limit, OnUnavailable, RateLimiter};

type Estimator<B> = Arc<dyn Fn(&Request<B>) -> Vec<(String, i128)> + Send + Sync>;
type RejectionFn = Arc<dyn Fn(&Rejection) -> Response<Full<Bytes>> + Send + Sync>;
type SkipFn = Arc<dyn Fn(&http::request::Parts) -> bool + Send + Sync>;

pub(crate) struct Config<B> {
    pub(crate) limiter: RateLimiter,
    pub(crate) entity: Option<SharedExtractor<B>>,
    pub(crate) fallback_entity: Option<SharedExtractor<B>>,
    pub(crate) resource: SharedExtractor<B>,
    pub(crate) limits: Option<Arc<[Limit]>>,
    pub(crate) fallback_limits: Option<Arc<[Limit]>>,
    pub(crate) route_limits: HashMap<String, Arc<[Limit]>>,
    pub(crate) consume: Option<Estimator<B>>,
    pub(crate) cascade: Option<bool>,
    pub(crate) on_unavailable: Option<OnUnavailable>,
    pub(crate) headers_on_success: bool,
    pub(crate) rollback_on_server_error: bool,
    pub(crate) unavailable_retry_after: Duration,
    pub(crate) naming: PolicyNaming,
    pub(crate) policy_cache: Arc<PolicyCache>,
    /// Its 503 log lines, once then a count every 10 s.
    pub(crate) outage_log: Arc<crate::log_throttle::LogThrottle>,
    pub(crate) rejection: Option<RejectionFn>,
    /// Requests that pass through untouched.
    pub(crate) skip: Option<SkipFn>,
}

impl<B> Clone for Config<B> {
    fn clone(&self) -> Self {
        Config {
            limiter: self.limiter.clone(),
            entity: self.entity.clone(),
            fallback_entity: self.fallback_entity.clone(),
            resource: Arc::clone(&self.resource),
            limits: self.limits.clone(),
            fallback_limits: self.fallback_limits.clone(),
            route_limits: self.route_limits.clone(),
            consume: self.consume.clone(),
            cascade: self.cascade,
            on_unavailable: self.on_unavailable,
            headers_on_success: self.headers_on_success,
            rollback_on_server_error: self.rollback_on_server_error,
            unavailable_retry_after: self.unavailable_retry_after,
            naming: self.naming.clone(),
            // A changed configuration may name limits differently: start a new cache.
            policy_cache: Arc::default(),
            outage_log: Arc::clone(&self.outage_log),
            rejection: self.rejection.clone(),
            skip: self.skip.clone(),
        }
    }
}

/// A tower [`Layer`] that rate-limits requests with a [`RateLimiter`].
///
/// For each request it extracts the entity and resource, acquires a lease (answering 429,
/// 401, 400 or 503 itself when it cannot), calls the inner service with a
/// [`crate::LeaseHandle`] in the request extensions, adjusts the lease by the
/// [`super::Usage`] the response reports, and commits when the response body ends (or is
/// dropped: the response was produced, so the work was done). An inner error, a 5xx
/// (configurable), a failing body or a client that goes away before the response rolls the
/// lease back.
///
/// `B` is the request body type; it is inferred where the layer is used.
pub struct RateLimitLayer<B> {
    config: Arc<Config<B>>,
}

impl<B> Clone for RateLimitLayer<B> {
    fn clone(&self) -> Self {
        RateLimitLayer {
            config: Arc::clone(&self.config),
        }
    }
}

impl<B> std::fmt::Debug for RateLimitLayer<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limits", &self.config.limits)
            .field("route_limits", &self.config.route_limits)
            .finish_non_exhaustive()
    }
}

impl<B: 'static> RateLimitLayer<B> {
    /// A layer over `limiter`. Set at least the entity extractor.
    ///
    /// Defaults: resource `"default"`, stored limits, 1 from every limit per request,
    /// `RateLimit` fields on successful responses, rollback on 5xx, `Retry-After: 1` on 503.
    pub fn new(limiter: RateLimiter) -> Self {
        RateLimitLayer {
            config: Arc::new(Config {
                limiter,
                entity: None,
                fallback_entity: None,
                resource: Arc::new(super::extract::fixed("default")),
                limits: None,
                fallback_limits: None,
                route_limits: HashMap::new(),
                consume: None,
                cascade: None,
                on_unavailable: None,
                headers_on_success: true,
                rollback_on_server_error: true,
                unavailable_retry_after: Duration::from_secs(1),
                naming: PolicyNaming::default(),
                policy_cache: Arc::default(),
                outage_log: Arc::default(),
                rejection: None,
                skip: None,
            }),
        }
    }

    fn config_mut(&mut self) -> &mut Config<B> {
        Arc::make_mut(&mut self.config)
    }

    /// Validates a limit list given to the layer, once.
    /// Validates limits given to the layer: a bad one is a startup error, never a 500 on
    /// every request.
    fn checked(limits: impl IntoIterator<Item = Limit>) -> Arc<[Limit]> {
        let limits: Arc<[Limit]> = limits.into_iter().collect();
        if let Err(e) = crate::limit::validate_all(&limits) {
            panic!("RateLimitLayer was given an invalid limit: {e}");
        }
        limits
    }

    /// [`Self::limits`] that returns the validation error instead of panicking, for limits
    /// read from configuration at startup.
    pub fn try_limits(self, limits: impl IntoIterator<Item = Limit>) -> Result<Self, crate::Error> {
        let limits: Vec<Limit> = limits.into_iter().collect();
        crate::limit::validate_all(&limits)?;
        Ok(self.limits(limits))
    }

    /// How to find the entity (e.g. `extract::header("x-api-key")`). A request without it
    /// gets 401 (unless a fallback finds one); an invalid one gets 400.
    pub fn entity(mut self, extractor: impl Extractor<B>) -> Self {
        self.config_mut().entity = Some(Arc::new(extractor));
        self
    }

    /// Tried when the entity extractor finds nothing (e.g. the peer IP for anonymous
    /// requests).
    pub fn fallback_entity(mut self, extractor: impl Extractor<B>) -> Self {
        self.config_mut().fallback_entity = Some(Arc::new(extractor));
        self
    }

    /// How to find the resource (e.g. `extract::matched_path()`, `extract::fixed("chat")`).
    pub fn resource(mut self, extractor: impl Extractor<B>) -> Self {
        self.config_mut().resource = Arc::new(extractor);
        self
    }

    /// Enforce exactly these limits, whatever is stored.
    ///
    /// # Panics
    ///
    /// When a limit is invalid (see [`Limit::validate`]), with the reason: a configuration
    /// error shows at startup. [`Self::try_limits`] returns it instead.
    pub fn limits(mut self, limits: impl IntoIterator<Item = Limit>) -> Self {
        let limits = Self::checked(limits);
        self.config_mut().limits = Some(limits);
        self
    }

    /// Enforce these limits where nothing is stored for the entity, resource or system.
    ///
    /// # Panics
    ///
    /// When a limit is invalid (see [`Limit::validate`]), with the reason: a configuration
    /// error shows at startup. [`Self::try_limits`] returns it instead.
    pub fn fallback_limits(mut self, limits: impl IntoIterator<Item = Limit>) -> Self {
        let limits = Self::checked(limits);
        self.config_mut().fallback_limits = Some(limits);
        self
    }

    /// Per-route limits inside one layer: requests whose route (axum's matched path, else
    /// the URI path) is `route` use these limits instead of the layer's.
    pub fn route_limits(
        mut self,
        route: impl Into<String>,
        limits: impl IntoIterator<Item = Limit>,
    ) -> Self {
        let limits = Self::checked(limits);
        self.config_mut().route_limits.insert(route.into(), limits);
        self
    }

    /// How much each request consumes, estimated from the request (the true cost can be
    /// reported after with [`super::Usage`]). Default: 1 from every limit.
    pub fn consume<F, I, K, N>(mut self, estimate: F) -> Self
    where
        F: Fn(&Request<B>) -> I + Send + Sync + 'static,
        I: IntoIterator<Item = (K, N)>,
        K: Into<String>,
        N: Amount,
    {
        self.config_mut().consume = Some(Arc::new(move |req| named_amounts(estimate(req))));
        self
    }

    /// Lets the requests `skip` picks through untouched: health checks, internal networks,
    /// allow-listed keys. A skipped request reaches the inner service with no lease, no
    /// write and no header fields. The predicate sees the request head only.
    ///
    /// ```
    /// # use zae_limiter::{InMemoryRepository, Limit, RateLimiter};
    /// # use zae_limiter::middleware::{extract, RateLimitLayer};
    /// let layer = RateLimitLayer::<axum::body::Body>::new(RateLimiter::new(InMemoryRepository::new()))
    ///     .entity(extract::secret(extract::header("x-api-key")))
    ///     .limits([Limit::per_minute("rpm", 100)])
    ///     .skip(|head| head.uri.path() == "/healthz");
    /// ```
    pub fn skip(
        mut self,
        skip: impl Fn(&http::request::Parts) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.config_mut().skip = Some(Arc::new(skip));
        self
    }

    /// Charge (or not) the entity's parent, overriding the entity's setting.
    pub fn cascade(mut self, cascade: bool) -> Self {
        self.config_mut().cascade = Some(cascade);
        self
    }

    /// The outage policy for this layer, overriding the limiter's and the stored one.
    pub fn on_unavailable(mut self, policy: OnUnavailable) -> Self {
        self.config_mut().on_unavailable = Some(policy);
        self
    }

    /// Whether admitted responses carry `RateLimit-Policy` and `RateLimit` (default true).
    pub fn headers_on_success(mut self, enabled: bool) -> Self {
        self.config_mut().headers_on_success = enabled;
        self
    }

    /// Whether a 5xx response rolls the lease back (default true).
    pub fn rollback_on_server_error(mut self, enabled: bool) -> Self {
        self.config_mut().rollback_on_server_error = enabled;
        self
    }

    /// The `Retry-After` of a 503 when the backend is down (default 1 s).
    pub fn unavailable_retry_after(mut self, wait: Duration) -> Self {
        self.config_mut().unavailable_retry_after = wait;
        self
    }

    /// Names the unit of a limit that does not count requests (e.g. `("tpm", "tokens")`);
    /// sent in `RateLimit-Policy` as the vendor parameter `zae-unit`.
    pub fn unit(mut self, limit_name: impl Into<String>, unit: impl Into<String>) -> Self {
        self.config_mut()
            .naming
            .units
            .insert(limit_name.into(), unit.into());
        self
    }

    /// Replaces the layer's own responses. Start from [`Rejection::default_response`] to
    /// keep its body and `Retry-After`; the `RateLimit` fields are added to a 429 either way.
    pub fn rejection_response<F>(mut self, respond: F) -> Self
    where
        F: Fn(&Rejection) -> Response<Full<Bytes>> + Send + Sync + 'static,
    {
        self.config_mut().rejection = Some(Arc::new(respond));
        self
    }
}

impl<S, B> Layer<S> for RateLimitLayer<B> {
    type Service = RateLimit<S, B>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, Arc::clone(&self.config))
    }
}
