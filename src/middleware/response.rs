//! The layer's own responses (401, 400, 429, 500, 503) and the IETF `RateLimit-Policy` /
//! `RateLimit` header fields (draft-ietf-httpapi-ratelimit-headers-10, structured-field
//! lists per RFC 9651).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use parking_lot::Mutex;
use sfv::{KeyRef, ListSerializer, StringRef};

use crate::repository::{ItemRequest, LimitCheck};
use crate::{Error, Limit, RateLimitExceeded};

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
    /// The request carried no resource where the resource extractor looks (400).
    MissingResource {
        /// What the resource extractor looked for.
        expected: String,
    },
    /// The entity or the resource failed validation (400): the client's input, not the
    /// server's configuration.
    InvalidEntity(Error),
    /// A limit was exceeded (429).
    RateLimited(RateLimitExceeded),
    /// The resource is disabled for the entity (403): [`Error::ResourceDisabled`].
    Disabled(Error),
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
            Rejection::MissingResource { .. } | Rejection::InvalidEntity(_) => {
                StatusCode::BAD_REQUEST
            }
            Rejection::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            Rejection::Disabled(_) => StatusCode::FORBIDDEN,
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
            Rejection::MissingResource { expected } => serde_json::json!({
                "error": "missing_rate_limit_resource",
                "message": format!("the request has no {expected}"),
            }),
            // The value is never echoed: it may be a secret (an API key sent raw).
            Rejection::InvalidEntity(e) => serde_json::json!({
                "error": "invalid_rate_limit_key",
                "field": e.field(),
                "message": format!(
                    "invalid {}: {}",
                    e.field().unwrap_or("key"),
                    e.reason().unwrap_or("it breaks the naming rules")
                ),
            }),
            Rejection::RateLimited(e) => e.as_json(),
            Rejection::Disabled(_) => serde_json::json!({
                "error": "resource_disabled",
                "message": "this resource is disabled for the caller",
            }),
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

fn key(k: &'static str) -> &'static KeyRef {
    KeyRef::constant(k)
}

/// One limit as the header fields show it.
pub(crate) struct Entry<'a> {
    /// Whether it is the parent's limit (named `parent:{name}`).
    pub(crate) parent: bool,
    pub(crate) limit: &'a Limit,
    /// `r`: whole tokens remaining.
    pub(crate) remaining: u64,
    /// `t`: seconds until more quota, if it will ever come.
    pub(crate) reset: Option<u64>,
}

fn header_value(text: String) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(Bytes::from(text)).ok()
}

/// The `RateLimit-Policy` value for these members (parent flag, limit), in order.
fn policy_value<'a>(
    members: impl IntoIterator<Item = (bool, &'a Limit)>,
    naming: &PolicyNaming,
) -> Option<HeaderValue> {
    let mut policy = ListSerializer::new();
    for (parent, limit) in members {
        // Limit names are validated ASCII, so they are always valid strings.
        let name = member_name(parent, limit);
        let Ok(name) = StringRef::from_str(&name) else {
            continue;
        };
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
    }
    policy.finish().and_then(header_value)
}

/// Sets `RateLimit-Policy` and `RateLimit`, one list member per entry.
pub(crate) fn ratelimit_headers(
    headers: &mut HeaderMap,
    entries: &[Entry<'_>],
    naming: &PolicyNaming,
) {
    if let Some(value) = policy_value(entries.iter().map(|e| (e.parent, e.limit)), naming) {
        headers.insert(RATELIMIT_POLICY.clone(), value);
    }
    let mut current = ListSerializer::new();
    for entry in entries {
        let name = member_name(entry.parent, entry.limit);
        let Ok(name) = StringRef::from_str(&name) else {
            continue;
        };
        let mut c = current
            .bare_item(name)
            .parameter(key("r"), sf_int(entry.remaining));
        if let Some(t) = entry.reset {
            c = c.parameter(key("t"), sf_int(t));
        }
        let _ = c.finish();
    }
    if let Some(value) = current.finish().and_then(header_value) {
        headers.insert(RATELIMIT.clone(), value);
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
        .map(|s| s.entity_id.as_str())
        .unwrap_or_default();
    let entries: Vec<Entry<'_>> = rejection
        .statuses()
        .iter()
        .map(|s| Entry {
            parent: s.entity_id != entity,
            limit: &s.limit,
            remaining: u64::try_from(s.available.max(0)).unwrap_or(0),
            reset: if s.exceeded {
                s.retry_after_ms.map(|ms| ms.div_ceil(1000))
            } else {
                Some(0)
            },
        })
        .collect();
    ratelimit_headers(headers, &entries, naming);
}

/// Seconds until one token returns to an empty bucket of `limit`.
fn one_token_seconds(limit: &Limit) -> u64 {
    let ms = (u128::from(limit.refill_period_seconds) * 1000)
        .div_ceil(u128::from(limit.refill_amount.max(1)));
    u64::try_from(ms.div_ceil(1000)).unwrap_or(u64::MAX)
}

/// `RateLimit-Policy` and the serialized member names for one set of limit lists: the same
/// for every request that resolves to the same lists, so built once and reused.
#[derive(Debug)]
struct PolicyFields {
    lists: Vec<Arc<[Limit]>>,
    policy: HeaderValue,
    /// Each member's start in the `RateLimit` field: the separator (but for the first),
    /// its name serialized as a structured-field string, and `;r=`.
    heads: Vec<Box<[u8]>>,
    /// Each member's `t` when its bucket is empty: seconds until one token returns.
    empty_resets: Vec<u64>,
}

/// The [`PolicyFields`] built last, reused while requests hit the same limits: serializing
/// the policy is most of the cost of the header fields. Lists match by content, not by
/// pointer, so entities with stored limits (each its own copy) share one entry; a few
/// entries are kept, most recent first, for layers whose requests alternate between lists.
#[derive(Debug, Default)]
pub(crate) struct PolicyCache {
    /// The first fields built, read without a lock: most layers serve one list.
    first: std::sync::OnceLock<Arc<PolicyFields>>,
    recent: Mutex<Vec<Arc<PolicyFields>>>,
}

/// Fields from a [`PolicyCache`]: borrowed from its first entry, or shared from the others.
enum CachedFields<'a> {
    First(&'a PolicyFields),
    Recent(Arc<PolicyFields>),
}

impl std::ops::Deref for CachedFields<'_> {
    type Target = PolicyFields;

    fn deref(&self) -> &PolicyFields {
        match self {
            CachedFields::First(fields) => fields,
            CachedFields::Recent(fields) => fields,
        }
    }
}

/// Entries a [`PolicyCache`] keeps.
const POLICY_CACHE_ENTRIES: usize = 8;

impl PolicyCache {
    fn fields(&self, items: &[ItemRequest], naming: &PolicyNaming) -> Option<CachedFields<'_>> {
        let same = |f: &PolicyFields| {
            f.lists.len() == items.len()
                && f.lists
                    .iter()
                    .zip(items)
                    .all(|(l, i)| Arc::ptr_eq(l, &i.limits) || **l == *i.limits)
        };
        if let Some(first) = self.first.get().filter(|f| same(f)) {
            return Some(CachedFields::First(first));
        }
        {
            let mut recent = self.recent.lock();
            if let Some(at) = recent.iter().position(|f| same(f)) {
                let hit = Arc::clone(&recent[at]);
                if at > 0 {
                    recent[..=at].rotate_right(1);
                }
                return Some(CachedFields::Recent(hit));
            }
        }
        let members = || {
            items
                .iter()
                .enumerate()
                .flat_map(|(i, item)| item.limits.iter().map(move |l| (i > 0, l)))
        };
        let policy = policy_value(members(), naming)?;
        let heads = members()
            .enumerate()
            .map(|(at, (parent, limit))| {
                let mut list = ListSerializer::new();
                let name = member_name(parent, limit);
                if let Ok(name) = StringRef::from_str(&name) {
                    let _ = list.bare_item(name);
                }
                let separator = if at == 0 { "" } else { ", " };
                let name = list.finish().unwrap_or_default();
                format!("{separator}{name};r=")
                    .into_bytes()
                    .into_boxed_slice()
            })
            .collect();
        let empty_resets = members()
            .map(|(_, limit)| one_token_seconds(limit).min(SF_INTEGER_MAX))
            .collect();
        let fields = Arc::new(PolicyFields {
            lists: items.iter().map(|i| Arc::clone(&i.limits)).collect(),
            policy,
            heads,
            empty_resets,
        });
        if self.first.set(Arc::clone(&fields)).is_ok() {
            return Some(CachedFields::Recent(fields));
        }
        let mut recent = self.recent.lock();
        recent.insert(0, Arc::clone(&fields));
        recent.truncate(POLICY_CACHE_ENTRIES);
        Some(CachedFields::Recent(fields))
    }
}

fn member_name(parent: bool, limit: &Limit) -> String {
    if parent {
        format!("parent:{}", limit.name)
    } else {
        limit.name.clone()
    }
}

/// The fields for an admitted request: `r` is what is left after this request, `t` the
/// seconds until one more token returns when none is left (else 0).
pub(crate) fn admitted_headers(
    headers: &mut HeaderMap,
    items: &[ItemRequest],
    checks: &[LimitCheck],
    naming: &PolicyNaming,
    cache: &PolicyCache,
) {
    let Some(fields) = cache.fields(items, naming) else {
        return;
    };
    let amounts = items.iter().flat_map(|item| item.amounts.iter());
    // The member names come serialized from the cache; the parameters are integers, whose
    // structured-field form is plain decimal digits.
    let mut digits = itoa::Buffer::new();
    let members = fields.heads.iter().zip(&fields.empty_resets);
    let value = field_value(|value| {
        for (((head, empty_reset), amount), check) in members.zip(amounts).zip(checks) {
            let left = i128::from(check.available) - i128::from(*amount);
            let remaining = u64::try_from(left.max(0)).unwrap_or(0);
            value.extend_from_slice(head);
            value.extend_from_slice(digits.format(remaining.min(SF_INTEGER_MAX)).as_bytes());
            if remaining > 0 {
                value.extend_from_slice(b";t=0");
            } else {
                value.extend_from_slice(b";t=");
                value.extend_from_slice(digits.format(*empty_reset).as_bytes());
            }
        }
    });
    headers.insert(RATELIMIT_POLICY.clone(), fields.policy.clone());
    if let Some(value) = value {
        headers.insert(RATELIMIT.clone(), value);
    }
}

/// Bytes of one thread's `RateLimit` values, taken [`VALUE_BLOCK`] at a time.
const VALUE_BLOCK: usize = 4096;

/// Room left in a block below which the next value starts a new one.
const VALUE_ROOM: usize = 256;

thread_local! {
    /// Room for this thread's next `RateLimit` values: each is written at the front and
    /// split off, sharing the block (a reference count), so responses take one allocation
    /// per block (about a hundred values) instead of one each. A block is freed once the
    /// last value cut from it is dropped.
    static FIELD_VALUES: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// The header value `write` writes, cut from this thread's block (a value longer than the
/// room left grows its own); `None` if it is not a valid header value.
fn field_value(write: impl FnOnce(&mut BytesMut)) -> Option<HeaderValue> {
    FIELD_VALUES.with(|block| match block.try_borrow_mut() {
        Ok(mut block) => {
            if block.capacity() < VALUE_ROOM {
                *block = BytesMut::with_capacity(VALUE_BLOCK);
            }
            write(&mut block);
            HeaderValue::from_maybe_shared(block.split().freeze()).ok()
        }
        // Re-entered (never on the layer's path): a value of its own.
        Err(_) => {
            let mut own = BytesMut::new();
            write(&mut own);
            HeaderValue::from_maybe_shared(own.freeze()).ok()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Limit, LimitStatus};

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

    /// [`field_value`] of bytes written at once.
    fn value_of(bytes: &[u8]) -> Option<HeaderValue> {
        field_value(|value| value.extend_from_slice(bytes))
    }

    #[test]
    fn field_values_cut_from_shared_blocks_stay_intact() {
        // Enough values to use up several blocks, all held at once, then some dropped
        // while the rest are read again: each keeps exactly its own bytes.
        let texts: Vec<String> = (0..1_000)
            .map(|i| format!("\"rps\";r={};t={}", i * 7919, i % 13))
            .collect();
        let values: Vec<HeaderValue> = texts
            .iter()
            .map(|t| value_of(t.as_bytes()).unwrap())
            .collect();
        let total: usize = texts.iter().map(String::len).sum();
        assert!(total > 3 * VALUE_BLOCK);
        for (v, t) in values.iter().zip(&texts) {
            assert_eq!(v.as_bytes(), t.as_bytes());
        }
        let kept: Vec<(HeaderValue, &String)> = values.into_iter().zip(&texts).step_by(3).collect();
        let late = value_of(b"\"rpm\";r=1;t=0").unwrap();
        for (v, t) in &kept {
            assert_eq!(v.as_bytes(), t.as_bytes());
        }
        assert_eq!(late, "\"rpm\";r=1;t=0");
        // A value longer than the room left grows a block of its own.
        let long = "x".repeat(VALUE_BLOCK + 10);
        assert_eq!(
            value_of(long.as_bytes()).unwrap().as_bytes(),
            long.as_bytes()
        );
        // Bytes a header value cannot hold are refused.
        assert!(value_of(b"bad\nvalue").is_none());
    }

    #[test]
    fn a_field_value_of_many_pieces_stays_whole() {
        let mut expected = Vec::new();
        let w = field_value(|value| {
            for i in 0..40 {
                let piece = format!("\"limit-{i}\";r={i};t=0, ");
                value.extend_from_slice(piece.as_bytes());
                expected.extend_from_slice(piece.as_bytes());
            }
        })
        .unwrap();
        assert!(expected.len() > 192);
        assert_eq!(w.as_bytes(), &expected[..]);
        let short = value_of(b"\"rps\";r=9;t=0").unwrap();
        assert_eq!(short.as_bytes(), b"\"rps\";r=9;t=0");
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
        let items = [
            ItemRequest {
                entity_id: "k".into(),
                resource: "api".into(),
                limits: vec![Limit::per_minute("rpm", 5), Limit::per_hour("rph", 100)].into(),
                amounts: smallvec::smallvec![1, 1],
                expires_when_idle: true,
                owner: None,
                bypass: false,
                shard: Default::default(),
            },
            ItemRequest {
                entity_id: "p".into(),
                resource: "api".into(),
                limits: vec![Limit::per_minute("rpm", 50)].into(),
                amounts: smallvec::smallvec![1],
                expires_when_idle: true,
                owner: None,
                bypass: false,
                shard: Default::default(),
            },
        ];
        let check = |available| LimitCheck {
            available,
            exceeded: false,
            retry_after_ms: Some(0),
        };
        let checks = [check(1), check(100), check(20)];
        let cache = PolicyCache::default();
        admitted_headers(&mut h, &items, &checks, &PolicyNaming::default(), &cache);
        let policy = h[&RATELIMIT_POLICY].clone();
        // Cached: the same lists give the same policy, new numbers.
        let again = [check(5), check(3), check(1)];
        let mut h2 = HeaderMap::new();
        admitted_headers(&mut h2, &items, &again, &PolicyNaming::default(), &cache);
        assert_eq!(h2[&RATELIMIT_POLICY], policy);
        assert_eq!(
            h2[&RATELIMIT],
            r#""rpm";r=4;t=0, "rph";r=2;t=0, "parent:rpm";r=0;t=2"#
        );
        assert_eq!(
            h[&RATELIMIT],
            r#""rpm";r=0;t=12, "rph";r=99;t=0, "parent:rpm";r=19;t=0"#
        );
    }

    #[test]
    fn equal_lists_share_a_cache_entry() {
        let cache = PolicyCache::default();
        let item = |limits: Arc<[Limit]>| ItemRequest {
            entity_id: "k".into(),
            resource: "api".into(),
            limits,
            amounts: smallvec::smallvec![1],
            expires_when_idle: false,
            owner: None,
            bypass: false,
            shard: Default::default(),
        };
        // Two entities' stored limits: equal, but separate allocations.
        let a = [item(vec![Limit::per_minute("rpm", 10)].into())];
        let b = [item(vec![Limit::per_minute("rpm", 10)].into())];
        let first: *const PolicyFields = &*cache.fields(&a, &PolicyNaming::default()).unwrap();
        let second: *const PolicyFields = &*cache.fields(&b, &PolicyNaming::default()).unwrap();
        assert!(std::ptr::eq(first, second), "rebuilt for equal limits");
        let other = [item(vec![Limit::per_minute("rpm", 20)].into())];
        let third: *const PolicyFields = &*cache.fields(&other, &PolicyNaming::default()).unwrap();
        assert!(!std::ptr::eq(first, third));
        // Both stay cached: the first read without a lock, the other among the recent.
        assert!(std::ptr::eq(
            &*cache.fields(&a, &PolicyNaming::default()).unwrap(),
            first
        ));
        assert!(std::ptr::eq(
            &*cache.fields(&other, &PolicyNaming::default()).unwrap(),
            third
        ));
        assert!(cache.first.get().is_some());
        assert_eq!(cache.recent.lock().len(), 1);
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
