//! Extractors: how the layer finds the entity (API key, user, client IP) and the resource of
//! a request.
//!
//! An extractor sees the request head only ([`Parts`]: method, URI, headers, extensions),
//! as axum's `FromRequestParts` does, so it works whatever the body type. It returns `None`
//! when the request does not carry what it looks for; the layer then tries its fallback
//! extractor, or answers 401. Any closure `Fn(&Parts) -> Option<K>` is an extractor
//! too, for any `K: Into<CompactString>` (`String`, `&str`): keys of up to 24 bytes are
//! held inline, so extracting one costs no allocation.

use std::net::IpAddr;
use std::sync::Arc;

use compact_str::CompactString;
use headers::authorization::Bearer;
use headers::{Authorization, HeaderMapExt};
use http::header::{HeaderName, FORWARDED};
use http::request::Parts;

/// Finds a key (an entity id or a resource) in a request.
pub trait Extractor: Send + Sync + 'static {
    /// The key, or `None` if the request does not carry it.
    fn extract(&self, req: &Parts) -> Option<CompactString>;

    /// What the extractor looks for, for error messages (e.g. `header x-api-key`), read
    /// after "the request has no".
    fn describe(&self) -> String {
        "rate-limit key".into()
    }

    /// For a resource extractor: whether a request it finds nothing in passes through
    /// unlimited (rather than being answered 400).
    fn pass_through_when_missing(&self) -> bool {
        false
    }
}

impl<F, K> Extractor for F
where
    F: Fn(&Parts) -> Option<K> + Send + Sync + 'static,
    K: Into<CompactString>,
{
    fn extract(&self, req: &Parts) -> Option<CompactString> {
        self(req).map(Into::into)
    }
}

/// A shared, type-erased extractor.
pub type SharedExtractor = Arc<dyn Extractor>;

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

impl Extractor for Header {
    fn extract(&self, req: &Parts) -> Option<CompactString> {
        let value = req.headers.get(self.name.as_ref()?)?;
        // `to_str` admits visible ASCII only, so trimming ASCII whitespace trims it all.
        let text = value.to_str().ok()?.trim_ascii();
        (!text.is_empty()).then(|| CompactString::from(text))
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

impl Extractor for Query {
    fn extract(&self, req: &Parts) -> Option<CompactString> {
        let q = req.uri.query()?;
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == &self.name)
            .map(|(_, v)| CompactString::from(v))
            .filter(|v| !v.is_empty())
    }

    fn describe(&self) -> String {
        format!("query parameter {}", self.name)
    }
}

/// The token of an `Authorization: Bearer ...` header, as it is. A token is a secret:
/// use [`bearer`] (its digest) as an entity id, never this raw value.
#[derive(Debug, Clone, Copy, Default)]
pub struct BearerToken;

/// The digest of the `Authorization: Bearer ...` token (see [`secret`]): a stable entity
/// id per token, whatever its length or alphabet (JWTs, base64 keys), and never the
/// secret itself in a table key, a response or a log.
pub fn bearer() -> Secret<BearerToken> {
    secret(BearerToken)
}

impl Extractor for BearerToken {
    fn extract(&self, req: &Parts) -> Option<CompactString> {
        let auth: Authorization<Bearer> = req.headers.typed_get()?;
        let token = auth.token().trim();
        (!token.is_empty()).then(|| CompactString::from(token))
    }

    fn describe(&self) -> String {
        "Authorization: Bearer token".into()
    }
}

/// An extractor of secrets (API keys, bearer tokens) turned into stable entity ids: the
/// SHA-256 digest of the value (keyed with HMAC when [`Secret::keyed`] is given a key),
/// as `k` and 32 hex digits. The same secret always gives the same id, in every process;
/// the secret itself never reaches a table key, a response body or a log line.
///
/// ```
/// use zae_limiter::middleware::extract::{self, Extractor};
///
/// let api_key = extract::secret(extract::header("x-api-key"));
/// let (head, _body) = http::Request::builder()
///     .header("x-api-key", "sk-live/abc+def==")
///     .body(())
///     .unwrap()
///     .into_parts();
/// let id = api_key.extract(&head).unwrap();
/// assert!(id.starts_with('k') && id.len() == 33 && !id.contains("sk-live"));
/// ```
#[derive(Clone)]
pub struct Secret<E> {
    inner: E,
    key: Option<Arc<[u8]>>,
}

impl<E: std::fmt::Debug> std::fmt::Debug for Secret<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("inner", &self.inner)
            .field("keyed", &self.key.is_some())
            .finish()
    }
}

/// The entity id [`secret`] (unkeyed) and [`bearer`] derive from `secret`: for
/// provisioning an entity (its limits, its parent) ahead of its first request.
pub fn secret_id(secret: &str) -> String {
    Secret {
        inner: (),
        key: None,
    }
    .id_of(secret)
}

/// Turns what `inner` extracts (a secret) into its digest; see [`Secret`].
pub fn secret<E>(inner: E) -> Secret<E> {
    Secret { inner, key: None }
}

impl<E> Secret<E> {
    /// Keys the digest (HMAC-SHA-256 with `key`), so ids cannot be recomputed from a
    /// leaked or guessed secret without the key. Every process must use the same key.
    pub fn keyed(mut self, key: impl AsRef<[u8]>) -> Self {
        self.key = Some(Arc::from(key.as_ref()));
        self
    }

    /// The entity id of `secret`.
    pub fn id_of(&self, secret: &str) -> String {
        use hmac::{KeyInit, Mac};
        use sha2::Digest;
        let digest: Vec<u8> = match &self.key {
            Some(key) => {
                let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key)
                    .expect("HMAC takes a key of any length");
                mac.update(secret.as_bytes());
                mac.finalize().into_bytes().to_vec()
            }
            None => sha2::Sha256::digest(secret.as_bytes()).to_vec(),
        };
        use std::fmt::Write;
        let mut id = String::with_capacity(33);
        id.push('k');
        for byte in &digest[..16] {
            let _ = write!(id, "{byte:02x}");
        }
        id
    }
}

impl<E: Extractor> Extractor for Secret<E> {
    fn extract(&self, req: &Parts) -> Option<CompactString> {
        self.inner
            .extract(req)
            .map(|value| self.id_of(&value).into())
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

/// The same value for every request (e.g. one resource name for a whole router).
#[derive(Debug, Clone)]
pub struct Fixed {
    value: CompactString,
}

/// Always `value`.
pub fn fixed(value: impl Into<String>) -> Fixed {
    Fixed {
        value: value.into().into(),
    }
}

impl Extractor for Fixed {
    fn extract(&self, _req: &Parts) -> Option<CompactString> {
        Some(self.value.clone())
    }

    fn describe(&self) -> String {
        format!("fixed value {}", self.value)
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

/// The client's IP address from the `Forwarded` header (RFC 7239), behind a known number
/// of trusted proxies that write it. `X-Forwarded-For` is never read (a client could send
/// it): use [`x_forwarded_for`] when the proxies write that header instead.
///
/// Each proxy appends the address it received the request from, so with `n` trusted proxies
/// in front of the service the client is the `n`-th address from the right. The leftmost
/// address is whatever the client sent and is never trusted. With fewer than `n` addresses
/// the request did not pass through the proxies, and nothing is extracted.
#[derive(Debug, Clone, Copy)]
pub struct ForwardedIp {
    trusted_proxies: usize,
    header: ProxyHeader,
}

/// The header a deployment's proxies write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProxyHeader {
    Forwarded,
    XForwardedFor,
}

/// The client address from `Forwarded` behind `trusted_proxies` proxies (see
/// [`ForwardedIp`]); 0 extracts nothing (use `peer_ip` for a service without proxies).
pub fn forwarded_ip(trusted_proxies: usize) -> ForwardedIp {
    ForwardedIp {
        trusted_proxies,
        header: ProxyHeader::Forwarded,
    }
}

/// The client address from `X-Forwarded-For` behind `trusted_proxies` proxies that append
/// to it (nginx, AWS ALB); `Forwarded` is never read. Entries may carry a port
/// (`1.2.3.4:5678`, `[2001:db8::1]:443`).
pub fn x_forwarded_for(trusted_proxies: usize) -> ForwardedIp {
    ForwardedIp {
        trusted_proxies,
        header: ProxyHeader::XForwardedFor,
    }
}

/// One `X-Forwarded-For` entry: an address, with or without a port.
fn parse_forwarded_for(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .and_then(|e| e.parse().ok())
        })
}

impl ForwardedIp {
    /// The addresses of the chain, oldest first (`None` for an entry that is no address).
    fn chain(&self, req: &Parts) -> Option<Vec<Option<IpAddr>>> {
        let name = match self.header {
            ProxyHeader::Forwarded => FORWARDED,
            ProxyHeader::XForwardedFor => HeaderName::from_static("x-forwarded-for"),
        };
        let parts: Vec<&str> = req
            .headers
            .get_all(&name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if parts.is_empty() {
            return None;
        }
        let value = parts.join(", ");
        match self.header {
            ProxyHeader::Forwarded => {
                use forwarded_header_value::ForwardedHeaderValue;
                let parsed = ForwardedHeaderValue::from_forwarded(&value).ok()?;
                Some(parsed.iter().map(|s| s.forwarded_for_ip()).collect())
            }
            ProxyHeader::XForwardedFor => Some(value.split(',').map(parse_forwarded_for).collect()),
        }
    }
}

impl Extractor for ForwardedIp {
    fn extract(&self, req: &Parts) -> Option<CompactString> {
        if self.trusted_proxies == 0 {
            return None;
        }
        let chain = self.chain(req)?;
        let index = chain.len().checked_sub(self.trusted_proxies)?;
        chain[index].map(|ip| ip_entity_id(ip).into())
    }

    fn describe(&self) -> String {
        let header = match self.header {
            ProxyHeader::Forwarded => "Forwarded",
            ProxyHeader::XForwardedFor => "X-Forwarded-For",
        };
        format!(
            "client address in {header} (behind {} trusted proxies)",
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
    /// `/` dropped, `{`, `}`, `*` and `:` replaced by `_`, and `root` for `/`.
    ///
    /// A request that matched no route (a 404 to be) gets one fixed resource,
    /// `unmatched` by default ([`Self::unmatched`]), or passes through unlimited
    /// ([`Self::pass_unmatched`]): never its raw path, which would let any client mint
    /// resources without bound.
    #[derive(Debug, Clone, Default)]
    pub struct MatchedPathResource {
        /// `None`: unmatched requests pass through.
        unmatched: Option<CompactString>,
        pass: bool,
    }

    /// See [`MatchedPathResource`].
    pub fn matched_path() -> MatchedPathResource {
        MatchedPathResource {
            unmatched: Some(UNMATCHED.into()),
            pass: false,
        }
    }

    /// The resource of requests that matched no route, unless configured otherwise.
    pub const UNMATCHED: &str = "unmatched";

    impl MatchedPathResource {
        /// The resource for requests that matched no route (default `unmatched`).
        pub fn unmatched(mut self, resource: impl Into<String>) -> Self {
            self.unmatched = Some(resource.into().into());
            self.pass = false;
            self
        }

        /// Requests that matched no route pass through, not rate limited.
        pub fn pass_unmatched(mut self) -> Self {
            self.unmatched = None;
            self.pass = true;
            self
        }
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

    impl Extractor for MatchedPathResource {
        fn extract(&self, req: &Parts) -> Option<CompactString> {
            match req.extensions.get::<MatchedPath>() {
                Some(matched) => Some(path_resource(matched.as_str()).into()),
                None => self.unmatched.clone(),
            }
        }

        fn describe(&self) -> String {
            "matched route".into()
        }

        fn pass_through_when_missing(&self) -> bool {
            self.pass
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

    impl Extractor for PeerIp {
        fn extract(&self, req: &Parts) -> Option<CompactString> {
            let info = req.extensions.get::<ConnectInfo<SocketAddr>>()?;
            Some(ip_entity_id(info.0.ip()).into())
        }

        fn describe(&self) -> String {
            "peer address (ConnectInfo)".into()
        }
    }
}

#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub use axum_extractors::{
    matched_path, path_resource, peer_ip, MatchedPathResource, PeerIp, UNMATCHED,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)], uri: &str) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn header_query_bearer_fixed() {
        let r = req(
            &[("X-Api-Key", " k1 "), ("authorization", "Bearer tok")],
            "/a?x=1&api_key=q%201",
        );
        assert_eq!(header("x-api-key").extract(&r).as_deref(), Some("k1"));
        assert_eq!(header("X-API-KEY").extract(&r).as_deref(), Some("k1"));
        assert_eq!(Extractor::extract(&header("missing"), &r), None);
        assert_eq!(query("api_key").extract(&r).as_deref(), Some("q 1"));
        assert_eq!(query("nope").extract(&r), None);
        assert_eq!(BearerToken.extract(&r).as_deref(), Some("tok"));
        assert_eq!(
            bearer().extract(&r),
            Some(secret(BearerToken).id_of("tok").into())
        );
        assert_eq!(fixed("api").extract(&r).as_deref(), Some("api"));
        assert_eq!(Extractor::extract(&header("bad name"), &r), None);
        let basic = req(&[("authorization", "Basic abc")], "/");
        assert_eq!(bearer().extract(&basic), None);
    }

    #[test]
    fn x_forwarded_for_takes_nth_from_right() {
        let r = req(&[("x-forwarded-for", "6.6.6.6, 1.1.1.1, 10.0.0.1")], "/");
        assert_eq!(x_forwarded_for(1).extract(&r).as_deref(), Some("10.0.0.1"));
        assert_eq!(x_forwarded_for(2).extract(&r).as_deref(), Some("1.1.1.1"));
        assert_eq!(x_forwarded_for(3).extract(&r).as_deref(), Some("6.6.6.6"));
        assert_eq!(x_forwarded_for(4).extract(&r), None);
        assert_eq!(x_forwarded_for(0).extract(&r), None);
        // Repeated header lines count in order.
        let split = req(
            &[
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-for", "1.1.1.1"),
            ],
            "/",
        );
        assert_eq!(
            x_forwarded_for(1).extract(&split).as_deref(),
            Some("1.1.1.1")
        );
        // Entries with ports, as some proxies write them.
        let ports = req(
            &[(
                "x-forwarded-for",
                "9.9.9.9:1234, 1.2.3.4:5678, [2001:db8::1]:443",
            )],
            "/",
        );
        assert_eq!(
            x_forwarded_for(1).extract(&ports).as_deref(),
            Some("2001:db8:0:0:0:0:0:1")
        );
        assert_eq!(
            x_forwarded_for(2).extract(&ports).as_deref(),
            Some("1.2.3.4")
        );
        let garbage = req(&[("x-forwarded-for", "not-an-ip")], "/");
        assert_eq!(x_forwarded_for(1).extract(&garbage), None);
    }

    #[test]
    fn each_proxy_header_is_read_alone() {
        // Behind a proxy that appends X-Forwarded-For, a client-sent Forwarded is ignored.
        let spoofed = req(
            &[
                ("forwarded", "for=9.9.9.1"),
                ("x-forwarded-for", "7.7.7.7, 1.1.1.1"),
            ],
            "/",
        );
        assert_eq!(
            x_forwarded_for(1).extract(&spoofed).as_deref(),
            Some("1.1.1.1")
        );
        // And the other way round.
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
        // A garbage Forwarded next to a valid X-Forwarded-For matters only to forwarded_ip.
        let garbage = req(
            &[("forwarded", "garbage;;=="), ("x-forwarded-for", "1.1.1.1")],
            "/",
        );
        assert_eq!(forwarded_ip(1).extract(&garbage), None);
        assert_eq!(
            x_forwarded_for(1).extract(&garbage).as_deref(),
            Some("1.1.1.1")
        );
        assert_eq!(
            Extractor::describe(&x_forwarded_for(1)),
            "client address in X-Forwarded-For (behind 1 trusted proxies)"
        );
    }

    #[test]
    fn secrets_become_stable_digests() {
        let jwt = format!("eyJ{}.eyJ{}.sig+/=", "a".repeat(300), "b".repeat(200));
        let r = req(&[("authorization", &format!("Bearer {jwt}"))], "/");
        let id = bearer().extract(&r).unwrap();
        crate::naming::validate_entity_id(&id).unwrap();
        assert_eq!(id.len(), 33);
        assert!(!id.contains("eyJ"));
        // Stable across extractors and processes; keyed digests differ from plain ones.
        assert_eq!(bearer().extract(&r), Some(id.clone()));
        let keyed = secret(BearerToken).keyed(b"server-key");
        assert_ne!(keyed.extract(&r).unwrap(), id);
        assert_eq!(keyed.extract(&r), keyed.extract(&r));
        // A known vector: SHA-256("abc") starts ba7816bf8f01cfea414140de5dae2223.
        assert_eq!(
            secret(BearerToken).id_of("abc"),
            "kba7816bf8f01cfea414140de5dae2223"
        );
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
