//! Header rewriting: hop-by-hop stripping and the request header copy.

use http::header::{
    AUTHORIZATION, CONNECTION, CONTENT_LENGTH, EXPECT, HOST, HeaderMap, HeaderName, HeaderValue, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE, USER_AGENT,
};

/// `x-api-key`: the other way OpenAI-style clients send their key.
const X_API_KEY: &str = "x-api-key";

/// Removes hop-by-hop headers (RFC 9110 §7.6.1) from `headers`, in place.
///
/// Removed: `Connection` and every header it names, `Keep-Alive`, `Transfer-Encoding`, `Upgrade`,
/// `Trailer`, every `Proxy-*` header (`Proxy-Connection`, `Proxy-Authorization`,
/// `Proxy-Authenticate`, …) and `TE` unless its value is exactly `trailers` (the one `TE` value
/// HTTP/2 allows).
///
/// Use it on a response before passing it on: the proxy's own connection to its client has its
/// own framing and its own connection options. It allocates nothing unless a `Connection` or
/// `Proxy-*` header is present (then at most a reference-counted name clone per removal).
///
/// ```
/// use http::{HeaderMap, HeaderValue};
///
/// let mut h = HeaderMap::new();
/// h.insert("connection", HeaderValue::from_static("keep-alive, x-private"));
/// h.insert("x-private", HeaderValue::from_static("1"));
/// h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
/// h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
/// h.insert("content-type", HeaderValue::from_static("text/event-stream"));
///
/// proxypal_upstream::strip_hop_by_hop(&mut h);
///
/// assert_eq!(h.len(), 1);
/// assert_eq!(h["content-type"], "text/event-stream");
/// ```
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // The usual response has none of them: one pass over the names is cheaper
    // than a hashed `remove` per hop-by-hop name (measured ~870 instructions per
    // request before).
    if !headers.keys().any(|n| is_hop_by_hop(n) || *n == TE) {
        return;
    }
    // Headers named by `Connection` go first, while the `Connection` values are still there.
    // Values are cloned one at a time (a cheap `Bytes` clone) instead of collected into a `Vec`;
    // the names removed are never `connection` itself, so the index stays valid.
    let mut i = 0;
    while let Some(value) = headers.get_all(CONNECTION).iter().nth(i).cloned() {
        for token in connection_tokens(&value) {
            if !token.eq_ignore_ascii_case("connection") {
                headers.remove(token);
            }
        }
        i += 1;
    }
    for name in [CONNECTION, TRANSFER_ENCODING, UPGRADE, TRAILER] {
        headers.remove(name);
    }
    headers.remove("keep-alive");
    if headers.get_all(TE).iter().any(|v| v != "trailers") {
        headers.remove(TE);
    }
    // `Proxy-*` names are rare, so scan only when one is present.
    while let Some(name) = headers.keys().find(|n| is_proxy_header(n)).cloned() {
        headers.remove(name);
    }
}

/// Builds the headers for the upstream request from the client's headers.
///
/// Keeps end-to-end headers, drops hop-by-hop ones (as [`strip_hop_by_hop`]), the client's
/// credentials (`Authorization`, `x-api-key`), `Host` (the pool sets the upstream's on HTTP/1 and
/// uses `:authority` on HTTP/2), `Content-Length` (hyper sets it from the buffered body),
/// `Expect` (the proxy already has the whole body) and `User-Agent`; then sets `Authorization`
/// and `User-Agent` to the given values.
pub(crate) fn upstream_request_headers(
    client: &HeaderMap,
    authorization: &HeaderValue,
    user_agent: &HeaderValue,
) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(client.keys_len() + 3);
    let connection = client.get_all(CONNECTION);
    let te_ok = client.get_all(TE).iter().all(|v| v == "trailers");
    for (name, value) in client {
        let drop = is_hop_by_hop(name)
            || is_dropped_request_header(name)
            || (*name == TE && !te_ok)
            || connection.iter().any(|v| connection_tokens(v).any(|t| name.as_str().eq_ignore_ascii_case(t)));
        if !drop {
            out.append(name.clone(), value.clone());
        }
    }
    // An empty value stands for "no credentials" (an upstream without auth).
    if !authorization.is_empty() {
        out.insert(AUTHORIZATION, authorization.clone());
    }
    out.insert(USER_AGENT, user_agent.clone());
    out
}

/// Hop-by-hop names that are removed whatever their value (`TE` is value-dependent).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == CONNECTION
        || *name == TRANSFER_ENCODING
        || *name == UPGRADE
        || *name == TRAILER
        || name.as_str() == "keep-alive"
        || is_proxy_header(name)
}

/// Request headers the proxy replaces or that hyper computes.
fn is_dropped_request_header(name: &HeaderName) -> bool {
    *name == AUTHORIZATION
        || *name == HOST
        || *name == CONTENT_LENGTH
        || *name == EXPECT
        || *name == USER_AGENT
        || name.as_str() == X_API_KEY
}

/// `Proxy-Connection`, `Proxy-Authorization`, `Proxy-Authenticate`, … (names are lowercase).
fn is_proxy_header(name: &HeaderName) -> bool {
    name.as_str().starts_with("proxy-")
}

/// The comma-separated header names in one `Connection` value (empty for non-UTF-8 values).
fn connection_tokens(value: &HeaderValue) -> impl Iterator<Item = &str> {
    value.to_str().unwrap_or("").split(',').map(str::trim).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn strip_removes_every_hop_by_hop_header_and_connection_names() {
        let mut h = map(&[
            ("connection", "Keep-Alive, X-One"),
            ("connection", "x-two"),
            ("x-one", "1"),
            ("x-two", "2"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("trailer", "x-checksum"),
            ("te", "gzip"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authenticate", "Basic"),
            ("proxy-authorization", "Basic abc"),
            ("content-type", "application/json"),
            ("content-length", "12"),
            ("x-request-id", "abc"),
        ]);
        strip_hop_by_hop(&mut h);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-length", "content-type", "x-request-id"]);
    }

    #[test]
    fn strip_keeps_te_trailers() {
        let mut h = map(&[("te", "trailers")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h["te"], "trailers");
    }

    #[test]
    fn strip_tolerates_a_connection_header_naming_itself_or_garbage() {
        let mut h = map(&[("connection", "connection, , not a header!, close"), ("x", "1")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn request_headers_replace_credentials_and_user_agent() {
        let client = map(&[
            ("authorization", "Bearer client"),
            ("x-api-key", "client"),
            ("host", "proxy.local"),
            ("content-length", "999"),
            ("expect", "100-continue"),
            ("user-agent", "OpenAI/Python 1.0"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("te", "trailers"),
            ("accept", "text/event-stream"),
            ("x-multi", "a"),
            ("x-multi", "b"),
        ]);
        let auth = HeaderValue::from_static("Bearer upstream");
        let ua = HeaderValue::from_static("proxypal/test");
        let out = upstream_request_headers(&client, &auth, &ua);
        let mut names: Vec<&str> = out.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["accept", "authorization", "te", "user-agent", "x-multi"]);
        assert_eq!(out["authorization"], "Bearer upstream");
        assert_eq!(out["user-agent"], "proxypal/test");
        let multi: Vec<_> = out.get_all("x-multi").iter().collect();
        assert_eq!(multi, ["a", "b"]);
        // No credentials at all for an upstream without auth: the client's are still dropped.
        let none = upstream_request_headers(&client, &HeaderValue::from_static(""), &ua);
        assert!(none.get("authorization").is_none() && none.get("x-api-key").is_none());
    }

    #[test]
    fn request_headers_drop_te_other_than_trailers() {
        let client = map(&[("te", "trailers, deflate")]);
        let v = HeaderValue::from_static("x");
        assert!(upstream_request_headers(&client, &v, &v).get(TE).is_none());
    }
}
