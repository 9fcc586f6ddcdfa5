//! [`RateLimitLayer`]: holds the layer's configuration.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::Response;
use http_body_util::Full;
use tower_layer::Layer;

use super::extract::{Extractor, SharedExtractor};
use super::response::{PolicyCache, PolicyNaming, Rejection};
use super::service::RateLimit;
use crate::amount::{named_amounts, Amount};
use crate::{Limit, OnUnavailable, RateLimiter};

type Estimator = Arc<dyn Fn(&Parts) -> Vec<(String, i128)> + Send + Sync>;
type RejectionFn = Arc<dyn Fn(&Rejection) -> Response<Full<Bytes>> + Send + Sync>;
type SkipFn = Arc<dyn Fn(&Parts) -> bool + Send + Sync>;

/// What a [`RateLimitLayer`] and its services share.
pub(crate) struct Config {
    pub(crate) limiter: RateLimiter,
    pub(crate) entity: Option<SharedExtractor>,
    pub(crate) fallback_entity: Option<SharedExtractor>,
    pub(crate) resource: SharedExtractor,
    pub(crate) limits: Option<Arc<[Limit]>>,
    pub(crate) fallback_limits: Option<Arc<[Limit]>>,
    pub(crate) route_limits: HashMap<String, Arc<[Limit]>>,
    pub(crate) consume: Option<Estimator>,
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

impl Clone for Config {
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

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let describe = |e: &Option<SharedExtractor>| e.as_ref().map(|e| e.describe());
        f.debug_struct("RateLimitConfig")
            .field("entity", &describe(&self.entity))
            .field("fallback_entity", &describe(&self.fallback_entity))
            .field("resource", &self.resource.describe())
            .field("limits", &self.limits)
            .field("fallback_limits", &self.fallback_limits)
            .field("route_limits", &self.route_limits)
            .field("consume", &self.consume.as_ref().map(|_| "estimator"))
            .field("cascade", &self.cascade)
            .field("on_unavailable", &self.on_unavailable)
            .field("headers_on_success", &self.headers_on_success)
            .field("rollback_on_server_error", &self.rollback_on_server_error)
            .field("skip", &self.skip.as_ref().map(|_| "predicate"))
            .finish_non_exhaustive()
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
/// Extractors, the consume estimator and the skip predicate see the request head only
/// ([`http::request::Parts`]), so one layer serves any request body type.
#[derive(Clone, Debug)]
pub struct RateLimitLayer {
    config: Arc<Config>,
}

impl RateLimitLayer {
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

    fn config_mut(&mut self) -> &mut Config {
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
    pub fn entity(mut self, extractor: impl Extractor) -> Self {
        self.config_mut().entity = Some(Arc::new(extractor));
        self
    }

    /// Tried when the entity extractor finds nothing (e.g. the peer IP for anonymous
    /// requests).
    pub fn fallback_entity(mut self, extractor: impl Extractor) -> Self {
        self.config_mut().fallback_entity = Some(Arc::new(extractor));
        self
    }

    /// How to find the resource (e.g. `extract::matched_path()`, `extract::fixed("chat")`).
    pub fn resource(mut self, extractor: impl Extractor) -> Self {
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

    /// How much each request consumes, estimated from the request head (the true cost can
    /// be reported after with [`super::Usage`]). Default: 1 from every limit.
    ///
    /// An estimate from the body (an LLM prompt's tokens) is made by a middleware in front
    /// of the layer that reads the body and puts the estimate in the request extensions,
    /// where this closure finds it (see `examples/llm_gateway.rs`).
    pub fn consume<F, I, K, N>(mut self, estimate: F) -> Self
    where
        F: Fn(&Parts) -> I + Send + Sync + 'static,
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
    /// let layer = RateLimitLayer::new(RateLimiter::new(InMemoryRepository::new()))
    ///     .entity(extract::secret(extract::header("x-api-key")))
    ///     .limits([Limit::per_minute("rpm", 100)])
    ///     .skip(|head| head.uri.path() == "/healthz");
    /// ```
    pub fn skip(mut self, skip: impl Fn(&Parts) -> bool + Send + Sync + 'static) -> Self {
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

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::new(inner, Arc::clone(&self.config))
    }
}
