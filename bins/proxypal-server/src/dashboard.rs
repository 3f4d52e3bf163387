//! `GET /dashboard`: one self-contained page (inline CSS and JS, no external
//! assets) compiled into the binary. It holds no data, so it is served without
//! a token; it polls `/stats` (which needs one when `auth.tokens` is set) and
//! asks for the token itself, keeping it in `sessionStorage` for the tab only.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HeaderValue, REFERRER_POLICY};
use http::{Response, StatusCode};

use proxypal_gateway::ProxyBody;

/// The page.
pub const PAGE: &str = include_str!("dashboard.html");

/// The page's Content-Security-Policy: nothing from anywhere but this origin,
/// inline script and style (the page is one file), and `fetch` to this origin.
pub const CSP: &str = "default-src 'none'; script-src 'self' 'unsafe-inline'; \
                       style-src 'self' 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; \
                       base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /dashboard`.
pub fn page() -> Response<ProxyBody> {
    let mut resp = Response::new(proxypal_gateway::full(Bytes::from_static(PAGE.as_bytes())));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    resp
}
