//! The HTTP front: request ids, CORS, and the route table that sends `/v1` to
//! the gateway and the admin paths to their handlers.

use std::sync::atomic::{AtomicU64, Ordering};

use http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS, HeaderValue,
    ORIGIN, VARY,
};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use proxypal_gateway::openai::error_response;
use proxypal_gateway::{Handle, ProxyBody, REQUEST_ID, not_found, unauthorized};
use tracing::Instrument;

use crate::app::App;

/// The client's `x-request-id` if it is sane (1–128 visible ASCII
/// characters), else a new one: a per-process random prefix and a counter.
fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic()) {
            return v.clone();
        }
    }
    static PREFIX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let prefix = *PREFIX.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS: a cheap random prefix per process.
        std::collections::hash_map::RandomState::new().build_hasher().finish() as u32
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // `pp-<8 hex>-<16 hex>`, formatted by hand: `format!` showed up at ~2,000
    // instructions per request in the profile.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = *b"pp-00000000-0000000000000000";
    for (i, slot) in buf[3..11].iter_mut().enumerate() {
        *slot = HEX[((prefix >> (28 - 4 * i)) & 0xf) as usize];
    }
    for (i, slot) in buf[12..28].iter_mut().enumerate() {
        *slot = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    // Only hex digits and '-': always a valid header value.
    HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("pp-unknown"))
}

/// Serves one request. Never fails: every problem becomes a response.
///
/// Each request runs in a `request` tracing span (debug level) carrying its
/// id, method, path and (once leased) the masked key.
///
/// `gateway` is the handle of the worker serving the connection (each worker
/// keeps its own upstream connections, see [`crate::config::Config::workers`]).
pub async fn handle(app: &App, gateway: &Handle, mut req: Request<Incoming>) -> Response<ProxyBody> {
    let id = request_id(req.headers());
    req.headers_mut().insert(REQUEST_ID, id.clone());
    // Debug level: creating and formatting a span per request is measurable
    // CPU at tens of thousands of requests per second; the few log lines
    // emitted at info and above carry the request id themselves.
    let span = tracing::debug_span!(
        "request",
        id = id.to_str().unwrap_or("-"),
        method = %req.method(),
        path = req.uri().path(),
        key = tracing::field::Empty,
    );
    let origin = req.headers().get(ORIGIN).cloned();
    let mut resp = if span.is_disabled() {
        // The common case (debug off): no `Instrumented` wrapper, which would
        // move the whole request future once more.
        route(app, gateway, req).await
    } else {
        let started = std::time::Instant::now();
        let resp = route(app, gateway, req).instrument(span.clone()).await;
        span.in_scope(|| {
            tracing::debug!(
                status = resp.status().as_u16(),
                took_us = started.elapsed().as_micros() as u64,
                "answered"
            )
        });
        resp
    };
    resp.headers_mut().insert(REQUEST_ID, id);
    if let Some(origin) = origin {
        cors_headers(app, &origin, &mut resp);
    }
    resp
}

fn cors_headers(app: &App, origin: &HeaderValue, resp: &mut Response<ProxyBody>) {
    if !app.cors_allows(origin.as_bytes()) {
        return;
    }
    let h = resp.headers_mut();
    h.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.append(VARY, HeaderValue::from_static("Origin"));
    h.insert(
        ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("retry-after, retry-after-ms, x-request-id, x-should-retry"),
    );
}

/// An operator: an operator token (`auth.tokens`), an admin client, or
/// anyone when no token is configured.
fn authorized(app: &App, req: &Request<Incoming>) -> bool {
    app.gateway().caller(req.headers()).is_some_and(|c| c.operator)
}

/// The route table: CORS preflight, `/v1` → the gateway, the admin endpoints,
/// else 404.
async fn route(app: &App, gateway: &Handle, req: Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path();
    if req.method() == Method::OPTIONS && req.headers().contains_key(ORIGIN) {
        return preflight(app, &req);
    }
    if path == "/v1" || path.starts_with("/v1/") {
        return gateway.handle(req).await;
    }
    match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/health") => crate::admin::health(app),
        // The page holds no data (it reads /stats, which checks the token), so no token here.
        (&Method::GET | &Method::HEAD, "/dashboard") => crate::dashboard::page(),
        (&Method::GET | &Method::HEAD, "/stats") => {
            if authorized(app, &req) {
                crate::admin::stats(app)
            } else {
                operator_only_for(app, &req, "/stats")
            }
        }
        (&Method::GET | &Method::HEAD, "/usage") => match app.gateway().caller(req.headers()) {
            Some(caller) => crate::usage::usage(app.ledger(), &caller, req.uri().query()).await,
            None => unauthorized("/usage needs a client token"),
        },
        (&Method::GET | &Method::HEAD, "/metrics") => {
            if authorized(app, &req) {
                crate::admin::metrics(app)
            } else {
                operator_only_for(app, &req, "/metrics")
            }
        }
        (&Method::POST, p) if reset_target(p).is_some() => {
            if !authorized(app, &req) {
                return operator_only_for(app, &req, "/admin");
            }
            let name = percent_decode(reset_target(p).unwrap_or_default());
            if app.gateway().reset_key(&name) {
                tracing::info!(key = %name, "key reset by an operator: cooldown, disabled state and learned limits cleared");
                proxypal_gateway::openai::json_response(StatusCode::OK, &serde_json::json!({"reset": name}))
            } else {
                error_response(StatusCode::NOT_FOUND, "key_not_found", format!("no key named {name:?}"))
            }
        }
        (&Method::DELETE, "/admin/cache") => {
            if !authorized(app, &req) {
                return operator_only_for(app, &req, "/admin");
            }
            let Some(cache) = app.gateway().cache() else {
                return error_response(
                    StatusCode::NOT_FOUND,
                    "cache_disabled",
                    "the response cache is off (cache.enabled)",
                );
            };
            match cache.clear().await {
                Ok(cleared) => {
                    tracing::info!(
                        cleared,
                        backend = cache.backend(),
                        "response cache cleared by an operator"
                    );
                    proxypal_gateway::openai::json_response(
                        StatusCode::OK,
                        &serde_json::json!({"cleared": cleared}),
                    )
                }
                Err(e) => error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cache_unavailable",
                    format!("the cache could not be cleared: {e}"),
                ),
            }
        }
        (_, "/health" | "/stats" | "/metrics" | "/dashboard" | "/usage") => {
            let mut resp = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{path} takes GET"),
            );
            resp.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            resp
        }
        _ => not_found(path),
    }
}

/// 401 without a known token; 403 for a client that is no operator.
fn operator_only_for(app: &App, req: &Request<Incoming>, what: &str) -> Response<ProxyBody> {
    match app.gateway().caller(req.headers()) {
        Some(_) => error_response(
            StatusCode::FORBIDDEN,
            "operator_only",
            format!("{what} is for operators: an auth.tokens token or a client with admin: true"),
        ),
        None => unauthorized(&format!("{what} needs an operator token")),
    }
}

/// The `{name}` of `/admin/keys/{name}/reset` (non-empty), if `path` is one.
fn reset_target(path: &str) -> Option<&str> {
    path.strip_prefix("/admin/keys/")?.strip_suffix("/reset").filter(|name| !name.is_empty())
}

/// `%XX` escapes decoded (a masked label's `…` arrives as `%E2%80%A6`);
/// invalid escapes are kept as they are.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn preflight(app: &App, req: &Request<Incoming>) -> Response<ProxyBody> {
    let mut resp = Response::new(proxypal_gateway::full(bytes::Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let Some(origin) = req.headers().get(ORIGIN) else { return resp };
    if !app.cors_allows(origin.as_bytes()) {
        *resp.status_mut() = StatusCode::FORBIDDEN;
        return resp;
    }
    let h = resp.headers_mut();
    h.insert(
        ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE, OPTIONS"),
    );
    let allow_headers = req
        .headers()
        .get(ACCESS_CONTROL_REQUEST_HEADERS)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("authorization, content-type"));
    h.insert(ACCESS_CONTROL_ALLOW_HEADERS, allow_headers);
    h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    resp
}
