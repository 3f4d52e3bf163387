//! The HTTP front: routing, CORS, the accept loop and graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::header::HeaderName;
use tracing::Instrument;

use http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_HEADERS, AUTHORIZATION,
    HeaderValue, ORIGIN, VARY,
};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpSocket};

use proxypal_upstream::Upstream;

use crate::app::App;
use crate::body::ProxyBody;
use crate::errors::error_response;

/// Binds `addr` with a deep accept backlog (bursts of hundreds of streams
/// would otherwise see dropped SYNs and one-second stalls).
///
/// # Errors
/// The address is taken or not ours.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    bind_one(addr, false)
}

fn bind_one(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    #[cfg(all(unix, not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))))]
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Binds `n` listening sockets on `addr` for `n` workers, as std sockets (in
/// non-blocking mode) that each worker registers with its own runtime.
///
/// On Unix they are separate sockets with `SO_REUSEPORT`, so the kernel
/// spreads new connections evenly over the workers (hashing each
/// connection's addresses). One socket shared by all workers would not: the
/// worker woken first wins nearly every `accept` (measured: 62 of 66
/// connections to one of two workers). If `addr` has port 0, the first
/// socket picks the port and the others join it. Elsewhere every worker
/// gets a clone of one socket.
///
/// `SO_REUSEPORT` would also let a second copy of the proxy (same user) join
/// the port and silently take half the connections, so the address is first
/// bound by a plain socket: if anything listens there, this fails with
/// "address in use" as a single socket would.
///
/// # Errors
/// The address is taken or not ours.
pub fn bind_workers(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    let reuse_port =
        cfg!(all(unix, not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))));
    if reuse_port && addr.port() != 0 {
        let probe = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        probe.set_reuseaddr(true)?;
        probe.bind(addr)?;
    }
    let first = bind_one(addr, reuse_port)?;
    let bound = first.local_addr()?;
    let first = first.into_std()?;
    let mut listeners = Vec::with_capacity(n);
    for _ in 1..n {
        listeners.push(if reuse_port { bind_one(bound, true)?.into_std()? } else { first.try_clone()? });
    }
    listeners.insert(0, first);
    Ok(listeners)
}

/// The request-id header: accepted from the client, else generated; returned on
/// the response and forwarded upstream.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

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
/// `upstream` is the client of the worker serving the connection (each worker
/// keeps its own upstream connections, see [`crate::config::Config::workers`]).
pub async fn handle(app: Arc<App>, upstream: Upstream, mut req: Request<Incoming>) -> Response<ProxyBody> {
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
        route(&app, &upstream, req).await
    } else {
        let started = std::time::Instant::now();
        let resp = route(&app, &upstream, req).instrument(span.clone()).await;
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
        cors_headers(&app, &origin, &mut resp);
    }
    resp
}

fn cors_allows(app: &App, origin: &HeaderValue) -> bool {
    let settings = app.settings();
    settings.cors_origins.iter().any(|o| o == "*" || o.as_bytes() == origin.as_bytes())
}

fn cors_headers(app: &App, origin: &HeaderValue, resp: &mut Response<ProxyBody>) {
    if !cors_allows(app, origin) {
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

fn authorized(app: &App, req: &Request<Incoming>) -> bool {
    let settings = app.settings();
    if !settings.tokens.required() {
        return true;
    }
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        .unwrap_or_default();
    settings.tokens.accepts(presented)
}

async fn route(app: &Arc<App>, upstream: &Upstream, req: Request<Incoming>) -> Response<ProxyBody> {
    let path = req.uri().path();
    if req.method() == Method::OPTIONS && req.headers().contains_key(ORIGIN) {
        return preflight(app, &req);
    }
    if path == "/v1" || path.starts_with("/v1/") {
        let rest = req.uri().path_and_query().map_or("", |pq| pq.as_str()).get(3..).unwrap_or("").to_owned();
        let Ok(slot) = Arc::clone(app.in_flight_slots()).try_acquire_owned() else {
            let mut resp = error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "the proxy is at limits.max_inflight requests; retry shortly",
            );
            resp.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            return resp;
        };
        return crate::proxy::forward(app, upstream, req, rest, slot).await;
    }
    match (req.method(), path) {
        (&Method::GET | &Method::HEAD, "/health") => crate::admin::health(app),
        // The page holds no data (it reads /stats, which checks the token), so no token here.
        (&Method::GET | &Method::HEAD, "/dashboard") => crate::dashboard::page(),
        (&Method::GET | &Method::HEAD, "/stats") => {
            if authorized(app, &req) {
                crate::admin::stats(app)
            } else {
                error_response(StatusCode::UNAUTHORIZED, "invalid_api_key", "/stats needs a client token")
            }
        }
        (&Method::GET | &Method::HEAD, "/metrics") => {
            if authorized(app, &req) {
                crate::admin::metrics(app)
            } else {
                error_response(StatusCode::UNAUTHORIZED, "invalid_api_key", "/metrics needs a client token")
            }
        }
        (_, "/health" | "/stats" | "/metrics" | "/dashboard") => {
            let mut resp = error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{path} takes GET"),
            );
            resp.headers_mut().insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            resp
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no route for {path}: the OpenAI-compatible API is under /v1 (e.g. /v1/chat/completions)"
            ),
        ),
    }
}

fn preflight(app: &App, req: &Request<Incoming>) -> Response<ProxyBody> {
    let mut resp = Response::new(crate::body::full(bytes::Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let Some(origin) = req.headers().get(ORIGIN) else { return resp };
    if !cors_allows(app, origin) {
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

fn conn_builder() -> auto::Builder<TokioExecutor> {
    // `writev(false)`: a response's head and body go out as one flattened buffer instead of a
    // vectored write of several slices; with API-sized bodies that is cheaper (A/B, 3 rounds,
    // c=64: 44-50 vs 49-54 µs CPU per request).
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        .keep_alive(true)
        .writev(false);
    builder.http2().timer(TokioTimer::new());
    builder
}

/// Period of the timer that keeps per-request timers from interrupting the I/O driver.
const TIMER_ANCHOR: Duration = Duration::from_secs(1);

/// What one accept loop owns: its upstream client and its connection counter.
#[derive(Debug, Clone)]
pub struct Worker {
    upstream: Upstream,
    accepted: prometheus_client::metrics::counter::Counter,
}

impl Worker {
    /// Worker number `id` of `app`, sending upstream through `upstream`.
    pub fn new(app: &App, id: usize, upstream: Upstream) -> Self {
        Self { upstream, accepted: app.metrics().worker_connections(id) }
    }
}

/// Accepts connections until `shutdown` resolves, then stops accepting and
/// lets open requests and streams finish for up to `grace`.
///
/// Requests go upstream through the worker's client. Every worker thread runs
/// one `serve` loop on its own runtime with its own [`Worker`] (and so its own
/// upstream connections), over clones of one listening socket.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    worker: Worker,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    // Keeps a timer due within a second on this runtime. Tokio interrupts its I/O driver (an
    // eventfd write, then an extra wake-up) whenever a timer is set that is due before
    // everything the driver already waits for, even from the runtime's own thread; without
    // this anchor that was hyper's 30 s header-read timer on every request (measured with
    // strace: one `write` per request at concurrency 1). With it, per-request timers (30 s and
    // longer) are never the earliest, and the cost is one wake-up per second.
    let anchor = tokio::spawn(async {
        loop {
            tokio::time::sleep(TIMER_ANCHOR).await;
        }
    });
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        // Out of file descriptors and the like: back off instead of spinning.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                worker.accepted.inc();
                let watcher = graceful.watcher();
                let app = Arc::clone(&app);
                let upstream = worker.upstream.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let app = Arc::clone(&app);
                        let upstream = upstream.clone();
                        async move { Ok::<_, Infallible>(handle(app, upstream, req).await) }
                    });
                    let builder = conn_builder();
                    let conn = builder.serve_connection(TokioIo::new(stream), svc);
                    if let Err(e) = watcher.watch(conn.into_owned()).await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    anchor.abort();
    tracing::info!(grace = ?grace, "shutting down: no new connections; waiting for open requests");
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("shutdown grace period over; closing remaining connections");
    }
}
