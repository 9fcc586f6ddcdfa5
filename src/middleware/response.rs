//! The layer's own responses (401, 400, 429, 500, 503) and the IETF `RateLimit-Policy` /
//! `RateLimit` header fields (draft-ietf-httpapi-ratelimit-headers-10, structured-field
//! lists per RFC 9651).

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use sfv::{KeyRef, ListSerializer, StringRef};

use crate::{Error, LimitStatus, RateLimitExceeded};

/// The `RateLimit-Policy` header field name.
pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
/// The `RateLimit` header field name.
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The largest integer a structured field can carry.
const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

/// Why the layer answered a request itself instead of passing it on.
#[derive(Debug)]
#[non_exhaustive]
pub enum Rejection {
    /// The request carried no entity (401).
    MissingEntity {
        /// What the entity extractor looked for.
        expected: String,
    },
    /// The entity failed validation (400).
    InvalidEntity(Error),
    /// A limit was exceeded (429).
    RateLimited(RateLimitExceeded),
    /// The backend is down and the policy is `Block` (503).
    Unavailable {
        /// The backend error.
        error: Error,
        /// The wait advertised in `Retry-After`.
        retry_after: Duration,
    },
    /// The layer is misconfigured: no resource, an invalid resource or limits, no limits
    /// stored anywhere (500). Logged at `error`.
    Misconfigured(Error),
}

impl Rejection {
    /// The status code of the default response.
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::MissingEntity { .. } => StatusCode::UNAUTHORIZED,
            Rejection::InvalidEntity(_) => StatusCode::BAD_REQUEST,
            Rejection::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Rejection::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Rejection::Misconfigured(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The default response: a JSON body naming what was wrong, and `Retry-After` on 429
    /// (unless the request can never succeed) and 503. The layer adds the `RateLimit`
    /// header fields to a 429.
    pub fn default_response(&self) -> Response<Full<Bytes>> {
        let body = match self {
            Rejection::MissingEntity { expected } => serde_json::json!({
                "error": "missing_rate_limit_key",
                "message": format!("the request has no {expected}"),
            }),
            Rejection::InvalidEntity(e) => serde_json::json!({
                "error": "invalid_rate_limit_key",
                "field": e.field(),
                "message": e.to_string(),
            }),
            Rejection::RateLimited(e) => e.as_json(),
            Rejection::Unavailable { .. } => serde_json::json!({
                "error": "rate_limiter_unavailable",
                "message": "the rate limiter's backend is unavailable; try again shortly",
            }),
            Rejection::Misconfigured(_) => serde_json::json!({
                "error": "rate_limiter_misconfigured",
                "message": "the server's rate limiter is misconfigured",
            }),
        };
        let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let retry = match self {
            Rejection::RateLimited(e) => e.retry_after_header(),
            Rejection::Unavailable { retry_after, .. } => {
                Some(retry_after.as_secs().max(1).to_string())
            }
            _ => None,
        };
        if let Some(value) = retry.and_then(|r| HeaderValue::from_str(&r).ok()) {
            headers.insert(RETRY_AFTER, value);
        }
        response
    }
}

/// How the layer names limits in the header fields.
#[derive(Debug, Clone, Default)]
pub(crate) struct PolicyNaming {
    /// Limit name -> unit (e.g. `tpm` -> `tokens`), sent as the vendor parameter `zae-unit`.
    pub(crate) units: HashMap<String, String>,
}

fn sf_int(v: u64) -> sfv::Integer {
    sfv::Integer::try_from(v.min(SF_INTEGER_MAX)).unwrap_or(sfv::Integer::MAX)
}

/// A structured-field string for a policy name: the child's limits by name, the parent's
/// as `parent:{name}`. Limit names are validated ASCII, so this never fails.
fn policy_name(status: &LimitStatus, entity_id: &str) -> String {
    if status.entity_id == entity_id {
        status.limit.name.clone()
    } else {
        format!("parent:{}", status.limit.name)
    }
}

fn key(k: &'static str) -> &'static KeyRef {
    KeyRef::constant(k)
}

/// Builds `RateLimit-Policy` and `RateLimit` for `statuses`, where `remaining` and
/// `reset_seconds` give each status's `r` and `t`.
pub(crate) fn ratelimit_headers(
    headers: &mut HeaderMap,
    statuses: &[LimitStatus],
    entity_id: &str,
    naming: &PolicyNaming,
    remaining: impl Fn(&LimitStatus) -> u64,
    reset_seconds: impl Fn(&LimitStatus) -> Option<u64>,
) {
    if statuses.is_empty() {
        return;
    }
    let mut policy = ListSerializer::new();
    let mut current = ListSerializer::new();
    for status in statuses {
        let name = policy_name(status, entity_id);
        let Ok(name) = StringRef::from_str(&name) else {
            continue;
        };
        let limit = &status.limit;
        let mut p = policy
            .bare_item(name)
            .parameter(key("q"), sf_int(limit.refill_amount))
            .parameter(key("w"), sf_int(limit.refill_period_seconds));
        if limit.capacity != limit.refill_amount {
            p = p.parameter(key("zae-burst"), sf_int(limit.capacity));
        }
        if let Some(unit) = naming
            .units
            .get(&limit.name)
            .and_then(|u| StringRef::from_str(u).ok())
        {
            p = p.parameter(key("zae-unit"), unit);
        }
        let _ = p.finish();
        let mut c = current
            .bare_item(name)
            .parameter(key("r"), sf_int(remaining(status)));
        if let Some(t) = reset_seconds(status) {
            c = c.parameter(key("t"), sf_int(t));
        }
        let _ = c.finish();
    }
    for (field, list) in [(&RATELIMIT_POLICY, policy), (&RATELIMIT, current)] {
        if let Some(value) = list.finish().and_then(|v| HeaderValue::from_str(&v).ok()) {
            headers.insert(field.clone(), value);
        }
    }
}

/// The fields for a 429: `r` is what is available, `t` the wait for violated limits (0 for
/// the others; absent where the request can never succeed).
pub(crate) fn rejected_headers(
    headers: &mut HeaderMap,
    rejection: &RateLimitExceeded,
    naming: &PolicyNaming,
) {
    let entity = rejection
        .statuses()
        .first()
        .map(|s| s.entity_id.clone())
        .unwrap_or_default();
    ratelimit_headers(
        headers,
        rejection.statuses(),
        &entity,
        naming,
        |s| u64::try_from(s.available.max(0)).unwrap_or(0),
        |s| {
            if s.exceeded {
                s.retry_after_ms.map(|ms| ms.div_ceil(1000))
            } else {
                Some(0)
            }
        },
    );
}

/// The fields for an admitted request: `r` is what is left after this request, `t` the
/// seconds until one more token returns when none is left (else 0).
pub(crate) fn admitted_headers(
    headers: &mut HeaderMap,
    statuses: &[LimitStatus],
    entity_id: &str,
    naming: &PolicyNaming,
) {
    ratelimit_headers(
        headers,
        statuses,
        entity_id,
        naming,
        LimitStatus::remaining,
        |s| {
            if s.remaining() > 0 {
                return Some(0);
            }
            let l = &s.limit;
            // Time for one token, from the worst case of an empty bucket.
            let ms = (u128::from(l.refill_period_seconds) * 1000)
                .div_ceil(u128::from(l.refill_amount.max(1)));
            Some(u64::try_from(ms.div_ceil(1000)).unwrap_or(u64::MAX))
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Limit;

    fn status(
        entity: &str,
        limit: Limit,
        available: i64,
        requested: u64,
        exceeded: bool,
        retry: Option<u64>,
    ) -> LimitStatus {
        LimitStatus {
            entity_id: entity.into(),
            resource: "api".into(),
            limit,
            available,
            requested,
            exceeded,
            retry_after_ms: retry,
        }
    }

    #[test]
    fn draft_10_syntax() {
        let naming = PolicyNaming {
            units: [("tpm".to_string(), "tokens".to_string())].into(),
        };
        let e = RateLimitExceeded::new(vec![
            status("k", Limit::per_minute("rpm", 100), 0, 1, true, Some(11_200)),
            status(
                "k",
                Limit::per_minute("tpm", 10_000).with_burst(15_000),
                900,
                500,
                false,
                Some(0),
            ),
            status("p", Limit::per_minute("rpm", 1000), 10, 1, false, Some(0)),
        ])
        .unwrap();
        let mut h = HeaderMap::new();
        rejected_headers(&mut h, &e, &naming);
        assert_eq!(
            h[&RATELIMIT_POLICY],
            r#""rpm";q=100;w=60, "tpm";q=10000;w=60;zae-burst=15000;zae-unit="tokens", "parent:rpm";q=1000;w=60"#
        );
        assert_eq!(
            h[&RATELIMIT],
            r#""rpm";r=0;t=12, "tpm";r=900;t=0, "parent:rpm";r=10;t=0"#
        );
        // Retry-After is never earlier than any advertised t.
        let resp = Rejection::RateLimited(e).default_response();
        assert_eq!(resp.headers()[RETRY_AFTER], "12");
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn admitted_remaining() {
        let mut h = HeaderMap::new();
        let s = [status(
            "k",
            Limit::per_minute("rpm", 5),
            1,
            1,
            false,
            Some(0),
        )];
        admitted_headers(&mut h, &s, "k", &PolicyNaming::default());
        assert_eq!(h[&RATELIMIT], r#""rpm";r=0;t=12"#);
    }

    #[test]
    fn unsatisfiable_has_no_retry_after() {
        let e = RateLimitExceeded::new(vec![status(
            "k",
            Limit::per_minute("tpm", 10),
            10,
            50,
            true,
            None,
        )])
        .unwrap();
        let resp = Rejection::RateLimited(e).default_response();
        assert!(resp.headers().get(RETRY_AFTER).is_none());
    }
}
