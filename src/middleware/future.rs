//! [`ResponseFuture`]: acquire, call the inner service, settle.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use super::body::RateLimitBody;
use super::layer::Config;
use super::response::{admitted_headers, rejected_headers, Rejection, RATELIMIT};
use super::Usage;
use crate::{AcquireFuture, Error, Lease};

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        // The rare states are boxed so the future stays as small as the inner call's: it
        // is moved on every request.
        Rejected { rejection: Option<Box<Rejection>> },
        Acquiring { pending: Option<Box<Pending<S, B>>> },
        Calling { #[pin] call: S::Future },
    }
}

/// An acquire still waiting on the backend, with what the inner call needs afterwards.
struct Pending<S, B> {
    acquire: AcquireFuture,
    request: Request<B>,
    inner: S,
}

pin_project! {
    /// The response future of [`super::RateLimit`].
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
        lease: Option<Lease>,
        config: Arc<Config>,
        span: tracing::Span,
    }

    impl<S, B> PinnedDrop for ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before the response: the client went away.
            if let Some(lease) = this.project().lease.take() {
                tracing::debug!("request dropped before its response; rolling back the lease");
                lease.settle_detached(false, "request dropped before its response");
            }
            // An acquire still in flight rolls itself back when dropped (`AcquireFuture`).
        }
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn rejected(config: Arc<Config>, rejection: Rejection) -> Self {
        ResponseFuture {
            state: State::Rejected {
                rejection: Some(Box::new(rejection)),
            },
            lease: None,
            config,
            span: tracing::Span::none(),
        }
    }

    /// The acquire was decided at once and admitted: the inner call is under way.
    pub(crate) fn calling(
        config: Arc<Config>,
        call: S::Future,
        lease: Lease,
        span: tracing::Span,
    ) -> Self {
        ResponseFuture {
            state: State::Calling { call },
            lease: Some(lease),
            config,
            span,
        }
    }

    /// No rate limit applies (a request the resource extractor lets through): the inner
    /// call is under way, with no lease.
    pub(crate) fn passing(config: Arc<Config>, call: S::Future) -> Self {
        ResponseFuture {
            state: State::Calling { call },
            lease: None,
            config,
            span: tracing::Span::none(),
        }
    }

    /// The acquire was decided at once and refused.
    pub(crate) fn failed(config: Arc<Config>, error: Error, span: tracing::Span) -> Self {
        let rejection = rejection_for(error, &config);
        ResponseFuture {
            state: State::Rejected {
                rejection: Some(Box::new(rejection)),
            },
            lease: None,
            config,
            span,
        }
    }

    pub(crate) fn acquiring(
        config: Arc<Config>,
        acquire: AcquireFuture,
        request: Request<B>,
        inner: S,
        span: tracing::Span,
    ) -> Self {
        ResponseFuture {
            state: State::Acquiring {
                pending: Some(Box::new(Pending {
                    acquire,
                    request,
                    inner,
                })),
            },
            lease: None,
            config,
            span,
        }
    }
}

/// The layer's own response, with the `RateLimit` fields on a 429.
fn respond<ResB: Body>(config: &Config, rejection: &Rejection) -> Response<RateLimitBody<ResB>> {
    match rejection {
        // A rejection is normal traffic: `debug`, or a flood would flood the log too.
        Rejection::RateLimited(e) => {
            let primary = e.primary_violation();
            tracing::debug!(
                entity_id = %primary.entity_id,
                resource = %primary.resource,
                limit = %primary.limit.name,
                retry_after_ms = e.retry_after().as_millis() as u64,
                satisfiable = e.is_satisfiable(),
                "rate limited"
            )
        }
        Rejection::Unavailable { error, .. } => {
            config.outage_log.note(|count, first| {
                if first {
                    tracing::warn!(error = %error, "rate limiter unavailable; answering 503");
                } else {
                    tracing::warn!(error = %error, "{count} requests answered 503 in the last 10 s: rate limiter unavailable");
                }
            })
        }
        Rejection::Misconfigured(error) => {
            tracing::error!(error = %error, "rate limiter misconfigured; answering 500")
        }
        Rejection::MissingEntity { expected } => {
            tracing::debug!(expected = %expected, "no rate-limit key; answering 401")
        }
        Rejection::InvalidEntity(error) => tracing::debug!(
            field = error.field().unwrap_or(""),
            reason = error.reason().unwrap_or(""),
            "invalid rate-limit key; answering 400"
        ),
        Rejection::Disabled(error) => {
            tracing::debug!(error = %error, "resource disabled; answering 403")
        }
        Rejection::MissingResource { expected } => {
            tracing::debug!(expected = %expected, "no rate-limit resource; answering 400")
        }
    }
    let response = match &config.rejection {
        Some(custom) => custom(rejection),
        None => rejection.default_response(),
    };
    let (mut parts, body) = response.into_parts();
    if let Rejection::RateLimited(e) = rejection {
        if !parts.headers.contains_key(&RATELIMIT) {
            rejected_headers(&mut parts.headers, e, &config.naming);
        }
    }
    Response::from_parts(parts, RateLimitBody::rejection(body))
}

/// Maps an acquire error to the layer's answer.
fn rejection_for(error: Error, config: &Config) -> Rejection {
    match error {
        Error::RateLimited(e) => Rejection::RateLimited(e),
        e @ Error::Unavailable { .. } => Rejection::Unavailable {
            error: e,
            retry_after: config.unavailable_retry_after,
        },
        e @ Error::ResourceDisabled { .. } => Rejection::Disabled(e),
        e if e.is_invalid_key() => Rejection::InvalidEntity(e),
        e => Rejection::Misconfigured(e),
    }
}

impl<S, B, ResB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes>,
{
    type Output = Result<Response<RateLimitBody<ResB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let _entered = this.span.enter();
        loop {
            match this.state.as_mut().project() {
                StateProj::Rejected { rejection } => {
                    let rejection = rejection
                        .take()
                        .expect("ResponseFuture polled after completion");
                    return Poll::Ready(Ok(respond(this.config, &rejection)));
                }
                StateProj::Acquiring { pending } => {
                    let waiting = pending
                        .as_mut()
                        .expect("ResponseFuture polled after completion");
                    let decided = ready!(Pin::new(&mut waiting.acquire).poll(cx));
                    let Pending {
                        mut request,
                        mut inner,
                        ..
                    } = *pending.take().expect("checked above");
                    let lease = match decided {
                        Ok(lease) => lease,
                        Err(e) => {
                            let rejection = rejection_for(e, this.config);
                            return Poll::Ready(Ok(respond(this.config, &rejection)));
                        }
                    };
                    request.extensions_mut().insert(lease.handle());
                    let call = inner.call(request);
                    *this.lease = Some(lease);
                    this.state.set(State::Calling { call });
                }
                StateProj::Calling { call } => {
                    let result = ready!(call.poll(cx));
                    let lease = this.lease.take();
                    let response = match result {
                        Ok(response) => response,
                        Err(e) => {
                            if let Some(lease) = lease {
                                lease.settle_detached(false, "inner service failed");
                            }
                            return Poll::Ready(Err(e));
                        }
                    };
                    return Poll::Ready(Ok(finish(this.config, response, lease)));
                }
            }
        }
    }
}

/// Settles or hands the lease to the body, and adds the `RateLimit` fields.
fn finish<ResB>(
    config: &Config,
    mut response: Response<ResB>,
    lease: Option<Lease>,
) -> Response<RateLimitBody<ResB>>
where
    ResB: Body,
{
    // Read and changed in place; only the body is swapped for the wrapper at the end.
    let Some(lease) = lease else {
        return response.map(|body| RateLimitBody::inner(body, None));
    };
    let status = response.status();
    if status.is_server_error() && config.rollback_on_server_error {
        tracing::debug!(status = %status, "server error; rolling back the lease");
        lease.settle_detached(false, "server error response");
        return response.map(|body| RateLimitBody::inner(body, None));
    }
    if let Some(usage) = response.extensions().get::<Usage>() {
        if let Err(e) = lease.settle_usage(usage.totals()) {
            tracing::warn!(error = %e, "could not apply the reported usage");
        }
    }
    if config.headers_on_success && !lease.is_unlimited() {
        let (items, checks) = lease.parts();
        admitted_headers(
            response.headers_mut(),
            items,
            checks,
            &config.naming,
            &config.policy_cache,
        );
    }
    response.map(|body| RateLimitBody::inner(body, Some(lease)))
}
