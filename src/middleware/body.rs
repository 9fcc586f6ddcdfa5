//! [`RateLimitBody`]: the response body, which settles the lease when it ends.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;

use crate::Lease;

/// Holds a lease until the body it belongs to ends: committed at the end of the stream (with
/// whatever the handler adjusted while streaming), rolled back if the body fails.
///
/// A body dropped before its end is committed too: the response was produced, so the work
/// was done (and a server drops the body of a `HEAD` response without reading it). Only a
/// request dropped before its response rolls back.
#[derive(Debug)]
pub(crate) struct SettleOnEnd {
    lease: Option<Lease>,
}

impl SettleOnEnd {
    pub(crate) fn new(lease: Lease) -> Self {
        SettleOnEnd { lease: Some(lease) }
    }

    fn finish(&mut self, commit: bool, reason: &'static str) {
        if let Some(lease) = self.lease.take() {
            lease.settle_detached(commit, reason);
        }
    }
}

impl Drop for SettleOnEnd {
    fn drop(&mut self) {
        if self.lease.is_some() {
            tracing::debug!("response body dropped before its end; committing the lease");
            self.finish(true, "response body dropped before its end");
        }
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner {
            #[pin]
            body: B,
            settle: Option<SettleOnEnd>,
        },
        Rejection {
            #[pin]
            body: Full<Bytes>,
        },
    }
}

pin_project! {
    /// The layer's response body: the inner service's body (settling the lease when it
    /// ends), or one of the layer's own responses.
    pub struct RateLimitBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

impl<B> std::fmt::Debug for RateLimitBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimitBody").finish_non_exhaustive()
    }
}

impl<B: Body> RateLimitBody<B> {
    pub(crate) fn inner(body: B, lease: Option<Lease>) -> Self {
        let mut settle = lease.map(SettleOnEnd::new);
        if body.is_end_stream() {
            if let Some(s) = settle.as_mut() {
                s.finish(true, "empty response body");
            }
            settle = None;
        }
        RateLimitBody {
            kind: Kind::Inner { body, settle },
        }
    }

    pub(crate) fn rejection(body: Full<Bytes>) -> Self {
        RateLimitBody {
            kind: Kind::Rejection { body },
        }
    }
}

impl<B> Body for RateLimitBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { mut body, settle } => {
                // The inner body's answer is handed on as it came (only its variant read
                // here), not taken apart and rebuilt: frames pass through untouched.
                let frame = body.as_mut().poll_frame(cx);
                if settle.is_some() {
                    let end = match &frame {
                        Poll::Pending => None,
                        Poll::Ready(None) => Some((true, "end of response body")),
                        Poll::Ready(Some(Err(_))) => Some((false, "response body failed")),
                        // Servers stop polling once a body says it has ended, so settle on
                        // the last frame rather than waiting for a `None` that never comes.
                        Poll::Ready(Some(Ok(_))) => body
                            .is_end_stream()
                            .then_some((true, "end of response body")),
                    };
                    if let Some((commit, reason)) = end {
                        if let Some(mut s) = settle.take() {
                            s.finish(commit, reason);
                        }
                    }
                }
                frame
            }
            KindProj::Rejection { body } => body
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(|never| match never {}))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body, .. } => body.is_end_stream(),
            Kind::Rejection { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body, .. } => body.size_hint(),
            Kind::Rejection { body } => body.size_hint(),
        }
    }
}
