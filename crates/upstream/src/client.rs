//! [`Upstream`]: the pooled client, request rewriting and timeouts.

use std::{fmt, future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use http::uri::{self, Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::connect::HttpConnector;

use crate::{
    InvalidKey, InvalidTarget, UpstreamBody, UpstreamBuildError, UpstreamConfig, UpstreamError,
    error::without_query,
    headers::{strip_hop_by_hop, upstream_request_headers},
    pool::{Pool, PoolConfig, SendError},
    tls::client_config_with_extra_roots,
};

/// TCP keep-alive probes on upstream sockets, so a half-dead connection is eventually noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Builds the `Authorization` header value `Bearer <secret>`, marked sensitive.
///
/// Call it once per key when the key set is loaded, not per request: [`Upstream::send`] takes the
/// prebuilt value. Being [sensitive](HeaderValue::set_sensitive), the value prints as
/// `Sensitive` in `Debug` output and HTTP/2 never adds it to the HPACK table.
///
/// # Errors
///
/// [`InvalidKey`] if `secret` is empty, has leading or trailing whitespace, or contains a byte
/// not allowed in a header value (such as a newline). The error never contains the secret.
///
/// ```
/// let auth = proxypal_upstream::bearer("nvapi-example")?;
/// assert_eq!(auth, "Bearer nvapi-example");
/// assert!(auth.is_sensitive());
/// assert_eq!(format!("{auth:?}"), "Sensitive");
///
/// let err = proxypal_upstream::bearer("nvapi-oops\n").unwrap_err();
/// assert!(!err.to_string().contains("oops"));
/// # Ok::<(), proxypal_upstream::InvalidKey>(())
/// ```
pub fn bearer(secret: &str) -> Result<HeaderValue, InvalidKey> {
    if secret.is_empty() {
        return Err(InvalidKey { reason: "it is empty" });
    }
    if secret.trim() != secret {
        return Err(InvalidKey { reason: "it has leading or trailing whitespace" });
    }
    let mut value = Vec::with_capacity("Bearer ".len() + secret.len());
    value.extend_from_slice(b"Bearer ");
    value.extend_from_slice(secret.as_bytes());
    let mut value = HeaderValue::from_maybe_shared(Bytes::from(value))
        .map_err(|_| InvalidKey { reason: "it contains a control character" })?;
    value.set_sensitive(true);
    Ok(value)
}

/// The parts of a client request that are forwarded upstream.
///
/// Build it once per client request (moving the client's headers in) and pass it to every
/// [`Upstream::send`] attempt; each attempt copies only what it forwards.
///
/// `Debug` prints header names only, never values, so the client's own credentials stay out of
/// logs.
#[derive(Clone)]
pub struct RequestParts {
    /// The request method, forwarded as is.
    pub method: Method,
    /// The path and query *after* the base URL's path, e.g. `/chat/completions?x=1` for a client
    /// request to `/v1/chat/completions?x=1` when the base URL ends in `/v1`.
    pub path_and_query: String,
    /// The client's request headers. Hop-by-hop headers, credentials, `Host`, `Content-Length`,
    /// `Expect` and `User-Agent` are dropped or replaced when sending.
    pub headers: HeaderMap,
}

impl RequestParts {
    /// Bundles the parts of a request.
    pub fn new(method: Method, path_and_query: impl Into<String>, headers: HeaderMap) -> Self {
        Self { method, path_and_query: path_and_query.into(), headers }
    }
}

impl fmt::Debug for RequestParts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RequestParts")
            .field("method", &self.method)
            .field("path_and_query", &self.path_and_query)
            .field("header_names", &HeaderNames(&self.headers))
            .finish()
    }
}

/// `Debug`s a header map as the list of its names.
struct HeaderNames<'a>(&'a HeaderMap);

impl fmt::Debug for HeaderNames<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.keys()).finish()
    }
}

/// A pooled HTTP/1 + HTTP/2 client for one upstream API.
///
/// Cloning is cheap (one reference count) and clones share the connection pool. Create it once
/// and clone it where needed.
///
/// # Connections
///
/// `https` upstreams negotiate HTTP/2 or HTTP/1.1 by ALPN, with Mozilla's root certificates
/// compiled in (plus any [`extra_root_certificates`](UpstreamConfig::extra_root_certificates))
/// and the `ring` crypto provider passed explicitly (no process-wide default is needed). Plain
/// `http` upstreams (a local simulated upstream) use HTTP/1.1.
///
/// The pool is made for one origin: a list, not a map keyed by host.
/// - HTTP/2: one connection carries every request. On a cold pool the first request connects
///   while concurrent ones wait for it, so a burst opens one TCP + TLS connection, not one each.
/// - HTTP/1.1: a connection returns to the pool when its response body has been read to the end
///   (dropping a body early closes it), the most recently used goes out first, at most
///   [`pool_max_idle_per_host`](UpstreamConfig::pool_max_idle_per_host) are kept, and each is
///   closed after [`pool_idle_timeout`](UpstreamConfig::pool_idle_timeout) unused.
/// - A request that a pooled connection could not deliver because the connection turned out to
///   be closed is sent again on another connection, so a keep-alive race does not fail a
///   request or blame its key: when hyper hands the request back unsent, and when a connection
///   idle for over a second loses it without any answer (the upstream's keep-alive timeout ran
///   out as it went). A connection that drops a request sooner, and a fresh connection's
///   failure, are returned as errors: the upstream may have processed the request.
///
/// Connection tasks are spawned on the Tokio runtime that opens the connection. Give each
/// runtime its own `Upstream` (as the server's worker threads do) to keep every request's work
/// on one thread.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    base_url: Uri,
    /// The base URL's scheme and authority, parsed once: each target URI is assembled from them
    /// and a new path (cloning them is a reference count at most).
    scheme: Scheme,
    authority: Authority,
    /// The base URL's path with no trailing slash (empty for `https://host`); target paths are
    /// appended to it.
    base_path: Box<str>,
    /// The last client path and query and the upstream one made of it (see `target_path`).
    /// The lock is held for a comparison or an assignment, never across an `.await`.
    last_target: std::sync::Mutex<Option<(Box<str>, PathAndQuery)>>,
    user_agent: HeaderValue,
    response_timeout: Duration,
    idle_timeout: Duration,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("base_url", &self.inner.base_url)
            .field("user_agent", &self.inner.user_agent)
            .field("response_timeout", &self.inner.response_timeout)
            .field("idle_timeout", &self.inner.idle_timeout)
            .finish_non_exhaustive()
    }
}

/// # Building
impl Upstream {
    /// Builds the client. Nothing connects until the first request.
    ///
    /// # Errors
    ///
    /// [`UpstreamBuildError::InvalidBaseUrl`] (naming the URL) unless `base_url` is an `http` or
    /// `https` URL with a host, no user info and no query string;
    /// [`UpstreamBuildError::InvalidRootCertificate`] if an entry of
    /// [`extra_root_certificates`](UpstreamConfig::extra_root_certificates) is not a usable
    /// certificate; [`UpstreamBuildError::Tls`] if rustls rejects its own default configuration
    /// (not expected in practice).
    pub fn new(cfg: UpstreamConfig) -> Result<Self, UpstreamBuildError> {
        let base = parse_base(&cfg.base_url)?;

        let mut http = HttpConnector::new();
        // The HTTPS connector decides which schemes are allowed.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(TCP_KEEPALIVE));

        let tls = if cfg.extra_root_certificates.is_empty() {
            HttpsConnectorBuilder::new()
                .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())?
        } else {
            // The same configuration plus the extra roots; ALPN is left empty for
            // `enable_http1`/`enable_http2` below to fill in.
            HttpsConnectorBuilder::new()
                .with_tls_config(client_config_with_extra_roots(&cfg.extra_root_certificates)?)
        };
        let https = tls.https_or_http().enable_http1().enable_http2().wrap_connector(http);

        let pool = Pool::new(
            https,
            PoolConfig {
                max_idle: cfg.pool_max_idle_per_host,
                idle_timeout: cfg.pool_idle_timeout,
                h2_keep_alive_interval: cfg.http2_keep_alive_interval,
                may_be_h2: base.scheme == Scheme::HTTPS,
                host: base.host.clone(),
            },
        );

        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                base_url: cfg.base_url,
                scheme: base.scheme,
                authority: base.authority,
                base_path: base.path,
                last_target: std::sync::Mutex::new(None),
                user_agent: cfg.user_agent,
                response_timeout: cfg.response_timeout,
                idle_timeout: cfg.idle_timeout,
            }),
        })
    }

    /// The configured base URL.
    pub fn base_url(&self) -> &Uri {
        &self.inner.base_url
    }
}

/// The parts of a validated base URL.
struct Base {
    scheme: Scheme,
    authority: Authority,
    path: Box<str>,
    host: HeaderValue,
}

/// Validates the base URL and splits it into the parts target URIs are built from.
fn parse_base(url: &Uri) -> Result<Base, UpstreamBuildError> {
    let invalid = |reason| UpstreamBuildError::InvalidBaseUrl { url: url.clone(), reason };
    let scheme = match url.scheme() {
        Some(s) if s == &Scheme::HTTP || s == &Scheme::HTTPS => s.clone(),
        Some(_) => return Err(invalid("the scheme must be http or https")),
        None => return Err(invalid("it must be absolute (http:// or https://)")),
    };
    let authority =
        url.authority().filter(|a| !a.host().is_empty()).ok_or_else(|| invalid("it has no host"))?;
    if authority.as_str().contains('@') {
        return Err(invalid("it must not contain user info"));
    }
    if url.query().is_some() {
        return Err(invalid("it must not have a query string"));
    }
    // The HTTP/1.1 Host header: the host, plus the port unless it is the scheme's default.
    let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
    let host = match authority.port_u16() {
        Some(port) if port != default_port => HeaderValue::from_str(&format!("{}:{port}", authority.host())),
        _ => HeaderValue::from_str(authority.host()),
    }
    .map_err(|_| invalid("its host is not a valid Host header"))?;
    let path = url.path().trim_end_matches('/').into();
    Ok(Base { scheme, authority: authority.clone(), path, host })
}

/// # Sending
impl Upstream {
    /// The upstream URI for a client path: the base URL with `path_and_query` appended.
    ///
    /// `path_and_query` is what follows the base path, e.g. `/chat/completions?x=1`; it may also
    /// be empty or start with `?`. A trailing slash on the base path is not doubled. Only the new
    /// path and query are built and parsed; scheme and authority were parsed once in
    /// [`new`](Self::new).
    ///
    /// # Errors
    ///
    /// [`InvalidTarget`] if `path_and_query` does not start with `/` or `?`, has a `.` or `..`
    /// segment (plain or percent-encoded; they could climb out of the base path with the
    /// proxy's key), or is not a valid URI path.
    ///
    /// ```
    /// use proxypal_upstream::{Upstream, UpstreamConfig};
    ///
    /// let upstream = Upstream::new(UpstreamConfig {
    ///     base_url: "https://integrate.api.nvidia.com/v1/".parse()?,
    ///     ..UpstreamConfig::default()
    /// })?;
    /// assert_eq!(
    ///     upstream.target_uri("/chat/completions?x=1")?,
    ///     "https://integrate.api.nvidia.com/v1/chat/completions?x=1"
    /// );
    /// assert!(upstream.target_uri("/../admin").is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn target_uri(&self, path_and_query: &str) -> Result<Uri, InvalidTarget> {
        let mut parts = uri::Parts::default();
        parts.scheme = Some(self.inner.scheme.clone());
        parts.authority = Some(self.inner.authority.clone());
        parts.path_and_query = Some(self.target_path(path_and_query)?);
        // Scheme, authority and path are all set: `from_parts` cannot fail, but is not trusted to.
        Uri::from_parts(parts).map_err(|_| InvalidTarget {
            path: path_and_query.to_owned(),
            reason: "it is not a valid URI path",
        })
    }

    /// The upstream path and query for a client's: validated, base path prepended, parsed. The
    /// last one is cached (clients call one endpoint, `/chat/completions`, nearly always), so
    /// a repeat costs a lock and a string comparison instead of a validation, an allocation and
    /// a parse.
    fn target_path(&self, path_and_query: &str) -> Result<PathAndQuery, InvalidTarget> {
        let cache = &self.inner.last_target;
        {
            let cached = cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((_, upstream)) = cached.as_ref().filter(|(client, _)| **client == *path_and_query) {
                return Ok(upstream.clone());
            }
        }
        let path = path_and_query.split_once('?').map_or(path_and_query, |(p, _)| p);
        let invalid = |reason| InvalidTarget { path: path.to_owned(), reason };
        if !(path_and_query.is_empty() || path_and_query.starts_with('/') || path_and_query.starts_with('?'))
        {
            return Err(invalid("it must start with '/'"));
        }
        if path.split('/').any(is_dot_segment) {
            return Err(invalid("'.' and '..' segments are not allowed"));
        }
        let base = &self.inner.base_path;
        let slash = base.is_empty() && !path_and_query.starts_with('/');
        let mut pq = String::with_capacity(base.len() + usize::from(slash) + path_and_query.len());
        pq.push_str(base);
        if slash {
            pq.push('/');
        }
        pq.push_str(path_and_query);
        let upstream = PathAndQuery::from_maybe_shared(Bytes::from(pq))
            .map_err(|_| invalid("it is not a valid URI path"))?;
        *cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((path_and_query.into(), upstream.clone()));
        Ok(upstream)
    }

    /// Sends one request upstream and resolves to the response once its headers arrive.
    ///
    /// The request goes to [`target_uri`](Self::target_uri)`(parts.path_and_query)` with
    /// `parts.method`, `body` as a fixed-length body, and the client's headers minus hop-by-hop
    /// headers, the client's credentials (`Authorization`, `x-api-key`), `Host`,
    /// `Content-Length` and `Expect`. `Authorization` is set to `authorization` (see [`bearer`]; an
    /// empty value sends no `Authorization` at all, for an upstream without auth),
    /// `User-Agent` to the configured one, and `Host` (HTTP/1) or `:authority` (HTTP/2) to the
    /// upstream's authority.
    ///
    /// The response's hop-by-hop headers are removed ([`strip_hop_by_hop`]); its body is an
    /// [`UpstreamBody`] that streams frame by frame under the idle timeout. Any status is a
    /// success here: judging a 429 or a 5xx is the caller's job.
    ///
    /// The returned future owns everything it needs (it borrows neither `self` nor `parts`), does
    /// nothing until polled, and spawns nothing: dropping it cancels the request, and dropping
    /// the body ends the upstream exchange.
    ///
    /// # Errors
    ///
    /// - [`UpstreamError::InvalidTarget`]: `parts.path_and_query` was rejected; nothing was sent.
    /// - [`UpstreamError::Connect`]: refused, DNS, TCP connect timeout or TLS failure; the
    ///   upstream never saw the request.
    /// - [`UpstreamError::ResponseTimeout`]: no response headers within
    ///   [`response_timeout`](UpstreamConfig::response_timeout) (connecting included).
    /// - [`UpstreamError::Protocol`]: the connection broke or the response was malformed.
    pub fn send(
        &self,
        parts: &RequestParts,
        body: Bytes,
        authorization: &HeaderValue,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, UpstreamError>> + Send + use<> {
        let response_timeout = self.inner.response_timeout;
        let idle_timeout = self.inner.idle_timeout;
        let prepared = self.target_uri(&parts.path_and_query).map(|uri| {
            let mut req = Request::new(Full::new(body));
            *req.method_mut() = parts.method.clone();
            *req.uri_mut() = uri.clone();
            *req.headers_mut() =
                upstream_request_headers(&parts.headers, authorization, &self.inner.user_agent);
            (uri, req)
        });
        let pool = self.inner.pool.clone();
        async move {
            let (uri, req) = prepared?;
            let (response, lent) = match tokio::time::timeout(response_timeout, pool.send(req)).await {
                Ok(Ok(sent)) => sent,
                Ok(Err(SendError::Connect(source))) => {
                    return Err(UpstreamError::Connect { uri: without_query(&uri), source });
                }
                Ok(Err(SendError::Protocol(source))) => {
                    return Err(UpstreamError::Protocol { uri: without_query(&uri), source });
                }
                Err(_elapsed) => {
                    return Err(UpstreamError::ResponseTimeout {
                        uri: without_query(&uri),
                        after: response_timeout,
                    });
                }
            };
            let (mut head, body) = response.into_parts();
            strip_hop_by_hop(&mut head.headers);
            Ok(Response::from_parts(head, UpstreamBody::new(body, idle_timeout, lent)))
        }
    }
}

/// `.` or `..`, also percent-encoded (`%2e`, `.%2E`, …).
fn is_dot_segment(segment: &str) -> bool {
    let rest = segment.strip_prefix('.').or_else(|| strip_prefix_ignore_case(segment, "%2e"));
    match rest {
        None => false,
        Some("") => true,
        Some(rest) => rest == "." || strip_prefix_ignore_case(rest, "%2e").is_some_and(str::is_empty),
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(base: &'static str) -> Upstream {
        let cfg = UpstreamConfig { base_url: Uri::from_static(base), ..UpstreamConfig::default() };
        match Upstream::new(cfg) {
            Ok(u) => u,
            Err(e) => panic!("{base}: {e}"),
        }
    }

    #[test]
    fn target_uri_joins_base_path_and_request_path() {
        let cases = [
            ("https://h/v1", "/chat/completions", "https://h/v1/chat/completions"),
            ("https://h/v1/", "/chat/completions?x=1", "https://h/v1/chat/completions?x=1"),
            ("http://h:8080/a/v1", "/models", "http://h:8080/a/v1/models"),
            ("http://h:8080", "/v1/models", "http://h:8080/v1/models"),
            ("http://h:8080/", "/v1/models", "http://h:8080/v1/models"),
            ("https://h/v1", "", "https://h/v1"),
            ("https://h/v1", "?a=b", "https://h/v1?a=b"),
            ("https://h", "?a=b", "https://h/?a=b"),
            ("https://h/v1", "/a/..b/c.d", "https://h/v1/a/..b/c.d"),
        ];
        for (base, rest, want) in cases {
            let got = upstream(base).target_uri(rest);
            assert_eq!(
                got.as_ref().map(Uri::to_string).ok().as_deref(),
                Some(want),
                "base {base} + {rest:?}: {got:?}"
            );
        }
    }

    #[test]
    fn target_uri_cache_returns_the_same_answers_as_a_fresh_upstream() {
        let warm = upstream("https://h/v1");
        let sequence = [
            "/chat/completions",
            "/chat/completions",
            "/models",
            "/../admin",
            "/chat/completions?x=1",
            "/../admin",
            "/chat/completions",
            "chat/completions",
        ];
        for rest in sequence {
            let fresh =
                upstream("https://h/v1").target_uri(rest).map(|u| u.to_string()).map_err(|e| e.to_string());
            let got = warm.target_uri(rest).map(|u| u.to_string()).map_err(|e| e.to_string());
            assert_eq!(got, fresh, "{rest:?}");
        }
    }

    #[test]
    fn target_uri_rejects_escapes_and_garbage() {
        let u = upstream("https://h/v1");
        for rest in [
            "chat/completions",
            "/../admin",
            "/a/./b",
            "/a/..",
            "/%2e%2E/admin",
            "/.%2e/admin",
            "/%2e/x",
            "/a b",
            "/a\nb",
        ] {
            let err = u.target_uri(rest).err();
            assert!(err.is_some(), "{rest:?} was accepted");
        }
        let err = u.target_uri("/../x?q=1").err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(r#"invalid upstream target path "/../x": '.' and '..' segments are not allowed"#)
        );
    }

    #[test]
    fn host_header_omits_only_the_default_port() {
        for (base, want) in [
            ("http://h/v1", "h"),
            ("http://h:80/v1", "h"),
            ("http://127.0.0.1:8080", "127.0.0.1:8080"),
            ("http://[::1]:9/v1", "[::1]:9"),
            ("https://h:8443/v1", "h:8443"),
            ("https://h:443/v1", "h"),
            ("https://h:80/v1", "h:80"),
        ] {
            let host = parse_base(&Uri::from_static(base)).ok().map(|b| b.host);
            assert_eq!(host.as_ref().map(|h| h.to_str().unwrap_or("?")), Some(want), "{base}");
        }
    }

    #[test]
    fn new_rejects_bad_base_urls_and_names_them() {
        for (url, reason) in [
            ("ftp://h/v1", "the scheme must be http or https"),
            ("/v1", "it must be absolute (http:// or https://)"),
            ("http://user:pw@h/v1", "it must not contain user info"),
            ("http://h/v1?a=b", "it must not have a query string"),
        ] {
            let cfg = UpstreamConfig { base_url: Uri::from_static(url), ..UpstreamConfig::default() };
            let msg = Upstream::new(cfg).err().map(|e| e.to_string());
            assert_eq!(msg.as_deref(), Some(format!("invalid upstream base_url {url}: {reason}").as_str()));
        }
    }

    #[test]
    fn bearer_rejects_bad_keys_without_echoing_them() {
        for secret in ["", " nvapi-x", "nvapi-x\n", "nvapi-\u{7f}x"] {
            let err = bearer(secret).err();
            let msg = err.as_ref().map(|e| format!("{e} {e:?}"));
            assert!(msg.is_some(), "{secret:?} was accepted");
            if !secret.trim().is_empty() {
                assert!(!msg.unwrap_or_default().contains("nvapi"));
            }
        }
    }

    #[test]
    fn request_parts_debug_hides_header_values() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer client-secret"));
        let parts = RequestParts::new(Method::POST, "/chat/completions", headers);
        let debug = format!("{parts:?}");
        assert!(debug.contains("authorization"), "{debug}");
        assert!(!debug.contains("client-secret"), "{debug}");
    }

    #[test]
    fn dot_segments() {
        for s in [".", "..", "%2e", "%2E%2e", ".%2E", "%2e."] {
            assert!(is_dot_segment(s), "{s}");
        }
        for s in ["", "...", ".a", "a.", "%2", "%2e%2e%2e", "v1"] {
            assert!(!is_dot_segment(s), "{s}");
        }
    }
}

#[cfg(test)]
mod future_size {
    use super::*;

    /// Every request's future is moved a few times (into the timeout, into the caller's
    /// future, onto the task); the profile showed those copies at 8 % of all instructions while
    /// the connect machinery (TCP, TLS, handshake: ~6 KB) was part of it. It is boxed now.
    #[test]
    fn the_send_future_does_not_carry_the_connect_machinery() {
        let upstream = Upstream::new(UpstreamConfig::default()).unwrap();
        let parts = RequestParts::new(Method::GET, "/models", HeaderMap::new());
        let send = upstream.send(&parts, Bytes::new(), &HeaderValue::from_static("Bearer x"));
        let size = std::mem::size_of_val(&send);
        assert!(size <= 2560, "Upstream::send's future is {size} bytes");
    }
}
