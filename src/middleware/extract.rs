//! Extractors: how the layer finds the entity (API key, user, client IP) and the resource of
//! a request.
//!
//! An extractor returns `None` when the request does not carry what it looks for; the layer
//! then tries its fallback extractor, or answers 401. Any closure
//! `Fn(&Request<B>) -> Option<String>` is an extractor too.

use std::net::IpAddr;
use std::sync::Arc;

use headers::authorization::Bearer;
use headers::{Authorization, HeaderMapExt};
use http::header::{HeaderName, FORWARDED};
use http::Request;

/// Finds a key (an entity id or a resource) in a request.
pub trait Extractor<B>: Send + Sync + 'static {
    /// The key, or `None` if the request does not carry it.
    fn extract(&self, req: &Request<B>) -> Option<String>;

    /// What the extractor looks for, for error messages (e.g. `header x-api-key`).
    fn describe(&self) -> String {
        "the rate-limit key".into()
    }
}

impl<B, F> Extractor<B> for F
where
    F: Fn(&Request<B>) -> Option<String> + Send + Sync + 'static,
{
    fn extract(&self, req: &Request<B>) -> Option<String> {
        self(req)
    }
}

/// A shared, type-erased extractor.
pub type SharedExtractor<B> = Arc<dyn Extractor<B>>;

/// The value of a request header (the first one, if repeated).
#[derive(Debug, Clone)]
pub struct Header {
    name: Option<HeaderName>,
    raw: String,
}

/// The value of header `name`, e.g. `header("x-api-key")`. An invalid header name is logged
/// once here and never matches.
pub fn header(name: impl AsRef<str>) -> Header {
    let raw = name.as_ref().to_string();
    let parsed = HeaderName::from_bytes(raw.to_ascii_lowercase().as_bytes()).ok();
    if parsed.is_none() {
        tracing::error!(header = %raw, "invalid header name for a rate-limit extractor; it never matches");
    }
    Header { name: parsed, raw }
}

impl<B> Extractor<B> for Header {
    fn extract(&self, req: &Request<B>) -> Option<String> {
        let value = req.headers().get(self.name.as_ref()?)?;
        let text = value.to_str().ok()?.trim();
        (!text.is_empty()).then(|| text.to_string())
    }

    fn describe(&self) -> String {
        format!("header {}", self.raw)
    }
}

/// The value of a query-string parameter.
#[derive(Debug, Clone)]
pub struct Query {
    name: String,
}

/// The value of query parameter `name` (percent-decoded), e.g. `query("api_key")`.
pub fn query(name: impl Into<String>) -> Query {
    Query { name: name.into() }
}

impl<B> Extractor<B> for Query {
    fn extract(&self, req: &Request<B>) -> Option<String> {
        let q = req.uri().query()?;
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == &self.name)
            .map(|(_, v)| v.into_owned())
            .filter(|v| !v.is_empty())
    }

    fn describe(&self) -> String {
        format!("query parameter {}", self.name)
    }
}

/// The token of an `Authorization: Bearer ...` header.
#[derive(Debug, Clone, Copy, Default)]
pub struct BearerToken;

/// The token of an `Authorization: Bearer ...` header.
pub fn bearer() -> BearerToken {
    BearerToken
}

impl<B> Extractor<B> for BearerToken {
    fn extract(&self, req: &Request<B>) -> Option<String> {
        let auth: Authorization<Bearer> = req.headers().typed_get()?;
        let token = auth.token().trim();
        (!token.is_empty()).then(|| token.to_string())
    }

    fn describe(&self) -> String {
        "an Authorization: Bearer token".into()
    }
}

/// The same value for every request (e.g. one resource name for a whole router).
#[derive(Debug, Clone)]
pub struct Fixed {
    value: String,
}

/// Always `value`.
pub fn fixed(value: impl Into<String>) -> Fixed {
    Fixed {
        value: value.into(),
    }
}

impl<B> Extractor<B> for Fixed {
    fn extract(&self, _req: &Request<B>) -> Option<String> {
        Some(self.value.clone())
    }

    fn describe(&self) -> String {
        format!("the fixed value {}", self.value)
    }
}

/// Formats an IP address as a valid entity id: IPv4 as usual, IPv4-mapped IPv6 as IPv4,
/// other IPv6 with every group written out (`0:0:0:0:0:0:0:1`), since an id may not start
/// with `:`.
pub fn ip_entity_id(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => v6
                .segments()
                .iter()
                .map(|s| format!("{s:x}"))
                .collect::<Vec<_>>()
                .join(":"),
        },
    }
}

/// The client's IP address from `Forwarded` (preferred) or `X-Forwarded-For`, behind
/// a known number of trusted proxies.
///
/// Each proxy appends the address it received the request from, so with `n` trusted proxies
/// in front of the service the client is the `n`-th address from the right. The leftmost
/// address is whatever the client sent and is never trusted. With fewer than `n` addresses
/// the request did not pass through the proxies, and nothing is extracted.
#[derive(Debug, Clone, Copy)]
pub struct ForwardedIp {
    trusted_proxies: usize,
}

/// See [`ForwardedIp`]; `trusted_proxies` must be at least 1 (0 extracts nothing: use
/// `peer_ip` for a service without proxies).
pub fn forwarded_ip(trusted_proxies: usize) -> ForwardedIp {
    ForwardedIp { trusted_proxies }
}

impl ForwardedIp {
    fn chain<B>(req: &Request<B>) -> Option<Vec<Option<IpAddr>>> {
        let joined = |name: &HeaderName| -> Option<String> {
            let parts: Vec<&str> = req
                .headers()
                .get_all(name)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            (!parts.is_empty()).then(|| parts.join(", "))
        };
        use forwarded_header_value::ForwardedHeaderValue;
        if let Some(value) = joined(&FORWARDED) {
            let parsed = ForwardedHeaderValue::from_forwarded(&value).ok()?;
            return Some(parsed.iter().map(|s| s.forwarded_for_ip()).collect());
        }
        let xff = HeaderName::from_static("x-forwarded-for");
        let value = joined(&xff)?;
        let parsed = ForwardedHeaderValue::from_x_forwarded_for(&value).ok()?;
        Some(parsed.iter().map(|s| s.forwarded_for_ip()).collect())
    }
}

impl<B> Extractor<B> for ForwardedIp {
    fn extract(&self, req: &Request<B>) -> Option<String> {
        if self.trusted_proxies == 0 {
            return None;
        }
        let chain = Self::chain(req)?;
        let index = chain.len().checked_sub(self.trusted_proxies)?;
        chain[index].map(ip_entity_id)
    }

    fn describe(&self) -> String {
        format!(
            "the client address in Forwarded / X-Forwarded-For behind {} trusted proxies",
            self.trusted_proxies
        )
    }
}

#[cfg(feature = "axum")]
mod axum_extractors {
    use std::net::SocketAddr;

    use axum::extract::{ConnectInfo, MatchedPath};

    use super::*;

    /// The route pattern axum matched (`/v1/chat/{id}`), as a resource name: the leading
    /// `/` dropped, `{`, `}`, `*` and `:` replaced by `_`, and `root` for `/`. Requests that
    /// matched no route use their URI path the same way.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct MatchedPathResource;

    /// See [`MatchedPathResource`].
    pub fn matched_path() -> MatchedPathResource {
        MatchedPathResource
    }

    /// Turns a path into a valid resource name.
    pub fn path_resource(path: &str) -> String {
        let trimmed = path.trim_matches('/');
        if trimmed.is_empty() {
            return "root".into();
        }
        let mut out: String = trimmed
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/') {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if !out.starts_with(|c: char| c.is_ascii_alphabetic()) {
            out.insert_str(0, "r/");
        }
        out
    }

    impl<B> Extractor<B> for MatchedPathResource {
        fn extract(&self, req: &Request<B>) -> Option<String> {
            let path = req
                .extensions()
                .get::<MatchedPath>()
                .map_or_else(|| req.uri().path(), |m| m.as_str());
            Some(path_resource(path))
        }

        fn describe(&self) -> String {
            "the matched route".into()
        }
    }

    /// The peer's IP address from axum's `ConnectInfo<SocketAddr>` (serve with
    /// `into_make_service_with_connect_info::<SocketAddr>()`).
    #[derive(Debug, Clone, Copy, Default)]
    pub struct PeerIp;

    /// See [`PeerIp`].
    pub fn peer_ip() -> PeerIp {
        PeerIp
    }

    impl<B> Extractor<B> for PeerIp {
        fn extract(&self, req: &Request<B>) -> Option<String> {
            let info = req.extensions().get::<ConnectInfo<SocketAddr>>()?;
            Some(ip_entity_id(info.0.ip()))
        }

        fn describe(&self) -> String {
            "the peer address (ConnectInfo)".into()
        }
    }
}

#[cfg(feature = "axum")]
pub use axum_extractors::{matched_path, path_resource, peer_ip, MatchedPathResource, PeerIp};

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)], uri: &str) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn header_query_bearer_fixed() {
        let r = req(
            &[("X-Api-Key", " k1 "), ("authorization", "Bearer tok")],
            "/a?x=1&api_key=q%201",
        );
        assert_eq!(header("x-api-key").extract(&r).as_deref(), Some("k1"));
        assert_eq!(header("X-API-KEY").extract(&r).as_deref(), Some("k1"));
        assert_eq!(Extractor::<()>::extract(&header("missing"), &r), None);
        assert_eq!(query("api_key").extract(&r).as_deref(), Some("q 1"));
        assert_eq!(query("nope").extract(&r), None);
        assert_eq!(bearer().extract(&r).as_deref(), Some("tok"));
        assert_eq!(fixed("api").extract(&r).as_deref(), Some("api"));
        assert_eq!(Extractor::<()>::extract(&header("bad name"), &r), None);
        let basic = req(&[("authorization", "Basic abc")], "/");
        assert_eq!(bearer().extract(&basic), None);
    }

    #[test]
    fn forwarded_ip_takes_nth_from_right() {
        let r = req(&[("x-forwarded-for", "6.6.6.6, 1.1.1.1, 10.0.0.1")], "/");
        assert_eq!(forwarded_ip(1).extract(&r).as_deref(), Some("10.0.0.1"));
        assert_eq!(forwarded_ip(2).extract(&r).as_deref(), Some("1.1.1.1"));
        assert_eq!(forwarded_ip(3).extract(&r).as_deref(), Some("6.6.6.6"));
        assert_eq!(forwarded_ip(4).extract(&r), None);
        assert_eq!(forwarded_ip(0).extract(&r), None);
        // Repeated header lines count in order.
        let split = req(
            &[
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-for", "1.1.1.1"),
            ],
            "/",
        );
        assert_eq!(forwarded_ip(1).extract(&split).as_deref(), Some("1.1.1.1"));
        let fwd = req(
            &[
                (
                    "forwarded",
                    "for=6.6.6.6, for=\"[2001:db8::1]:4711\";proto=https",
                ),
                ("x-forwarded-for", "9.9.9.9"),
            ],
            "/",
        );
        assert_eq!(
            forwarded_ip(1).extract(&fwd).as_deref(),
            Some("2001:db8:0:0:0:0:0:1")
        );
        let garbage = req(&[("x-forwarded-for", "not-an-ip")], "/");
        assert_eq!(forwarded_ip(1).extract(&garbage), None);
    }

    #[test]
    fn ip_ids_are_valid_identifiers() {
        for ip in ["::1", "::ffff:1.2.3.4", "fe80::1", "127.0.0.1"] {
            let id = ip_entity_id(ip.parse().unwrap());
            crate::naming::validate_entity_id(&id).unwrap();
        }
        assert_eq!(ip_entity_id("::ffff:1.2.3.4".parse().unwrap()), "1.2.3.4");
    }

    #[cfg(feature = "axum")]
    #[test]
    fn path_resources_are_valid() {
        for (path, want) in [
            ("/", "root"),
            ("/v1/chat/{id}", "v1/chat/_id_"),
            ("/123", "r/123"),
            ("/files/{*rest}", "files/__rest_"),
        ] {
            let got = path_resource(path);
            assert_eq!(got, want);
            crate::naming::validate_resource(&got).unwrap();
        }
    }
}
