//! [`Pool`]: the connections to the one upstream origin.
//!
//! An [`Upstream`](crate::Upstream) talks to exactly one origin (scheme + host + port), so its
//! pool is a list, not a map: no per-request key hashing, no spawned task to return a
//! connection, no boxed futures. (hyper-util's general-purpose pool spent ~8 % of the proxy's
//! instructions per request on exactly those; see `docs/performance.md`.)
//!
//! - HTTP/1.1 connections wait in a LIFO list: the most recently used, warmest connection
//!   goes first, and the oldest ones at the other end expire after the idle timeout (a reaper
//!   task runs while the list is not empty). A connection goes back into the list when its
//!   response body has been read to the end; dropping a body early closes it instead.
//! - An HTTP/2 connection (negotiated by ALPN) is shared by every request until it closes.
//!   While the pool does not yet know whether an `https` upstream speaks HTTP/2, connects are
//!   made one at a time, so a cold burst opens one connection instead of one per request.
//! - A reused connection that turns out to be closed before the request was written is
//!   dropped and the request retried on another (or a new) connection: the upstream never saw
//!   it. A fresh connection's failure is returned.

use std::{
    collections::VecDeque,
    future::poll_fn,
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri, header::HOST, uri::PathAndQuery};
use http_body_util::Full;
use hyper::{
    body::Incoming,
    client::conn::{TrySendError, http1, http2},
};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::connect::{Connection, HttpConnector},
    rt::{TokioExecutor, TokioTimer},
};
use tokio::time::Instant;
use tower_service::Service;

use crate::error::BoxError;

/// The request body type sent upstream.
pub(crate) type ReqBody = Full<Bytes>;

/// Why [`Pool::send`] produced no response.
#[derive(Debug)]
pub(crate) enum SendError {
    /// No connection: the upstream never saw the request.
    Connect(BoxError),
    /// The request failed on an established connection.
    Protocol(BoxError),
}

/// The settings a pool needs.
#[derive(Debug, Clone)]
pub(crate) struct PoolConfig {
    pub(crate) max_idle: usize,
    pub(crate) idle_timeout: Duration,
    pub(crate) h2_keep_alive_interval: Option<Duration>,
    /// `https`: the protocol is learned from ALPN on the first connection.
    pub(crate) may_be_h2: bool,
    /// The `Host` header for HTTP/1.1 (host, plus the port unless it is the scheme's default).
    pub(crate) host: HeaderValue,
}

/// The connection pool of one upstream origin. Cloning shares it.
#[derive(Clone)]
pub(crate) struct Pool {
    shared: Arc<Shared>,
}

struct Shared {
    connector: HttpsConnector<HttpConnector>,
    config: PoolConfig,
    state: Mutex<State>,
    /// Held while connecting as long as the upstream may speak HTTP/2 and no connection to it
    /// exists yet; never held otherwise.
    first_connect: tokio::sync::Mutex<()>,
    /// Set once an `https` connection negotiated HTTP/1.1: connects need not wait for each
    /// other any more.
    speaks_h1: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Idle HTTP/1.1 connections, most recently used at the back.
    idle: VecDeque<Idle>,
    /// The shared HTTP/2 connection, once there is one.
    h2: Option<http2::SendRequest<ReqBody>>,
    /// A reaper task is running (it stops when `idle` is empty).
    reaping: bool,
}

struct Idle {
    conn: http1::SendRequest<ReqBody>,
    since: Instant,
}

/// A connection taken from the pool or just made.
enum Conn {
    /// With the time it went idle, if it comes from the pool.
    H1(http1::SendRequest<ReqBody>, Option<Instant>),
    H2(http2::SendRequest<ReqBody>),
}

/// How long an HTTP/1.1 connection must have been idle before a request that it loses without
/// an answer is blamed on the upstream's keep-alive timeout (and resent) rather than on the
/// request. Keep-alive timeouts are seconds (nginx 75 s, uvicorn 5 s); a connection idle for
/// less than this that drops a request has failed *processing* it, which is the caller's to
/// judge (the proxy fails over to another key, with a fresh rate-limit permit).
const KEEP_ALIVE_RACE_AFTER: Duration = Duration::from_secs(1);

/// An HTTP/1.1 connection lent to one response; [`Lent::give_back`] returns it to the pool.
pub(crate) struct Lent {
    pool: Weak<Shared>,
    conn: http1::SendRequest<ReqBody>,
}

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lent").finish_non_exhaustive()
    }
}

impl Lent {
    /// Returns the connection for the next request. Call it only once the response body has
    /// been read to the end (hyper then keeps the connection alive).
    pub(crate) fn give_back(self) {
        if let Some(shared) = self.pool.upgrade() {
            shared.put(self.conn);
        }
    }
}

impl Pool {
    pub(crate) fn new(connector: HttpsConnector<HttpConnector>, config: PoolConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                connector,
                config,
                state: Mutex::new(State::default()),
                first_connect: tokio::sync::Mutex::new(()),
                speaks_h1: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `req` (absolute URI, all headers set) on a pooled or new connection and waits
    /// for the response headers. For an HTTP/1.1 response, the connection comes back as a
    /// [`Lent`] to return once the body is read.
    pub(crate) async fn send(
        &self,
        mut req: Request<ReqBody>,
    ) -> Result<(Response<Incoming>, Option<Lent>), SendError> {
        // HTTP/2 takes the absolute URI (it becomes :scheme, :authority and :path); HTTP/1.1
        // the origin form (`/path?query`) plus a Host header.
        let target = req.uri().clone();
        let origin_form =
            Uri::from(target.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));
        // Only a failure on a reused connection is retried, and each one drops that connection
        // from the pool, so the loop ends: at worst every idle connection is dead and the last
        // pass uses a new one, whose failure is returned.
        loop {
            let (conn, reused) = match self.shared.checkout() {
                Some(conn) => (conn, true),
                // Boxed: the connect future (TCP, TLS and handshake states) is kilobytes, and
                // unboxed it would make every request's future that large, to be moved on
                // each await although a pooled connection is the rule.
                None => (Box::pin(self.connect(&target)).await?, false),
            };
            let failed = match conn {
                Conn::H2(mut conn) => {
                    *req.uri_mut() = target.clone();
                    req.headers_mut().remove(HOST);
                    match conn.try_send_request(req).await {
                        Ok(resp) => return Ok((resp, None)),
                        Err(e) => {
                            self.shared.forget_h2(&conn);
                            e
                        }
                    }
                }
                Conn::H1(mut conn, idle_since) => {
                    *req.uri_mut() = origin_form.clone();
                    req.headers_mut().insert(HOST, self.shared.config.host.clone());
                    if let Err(e) = conn.ready().await {
                        // Closed while idle; the request is still ours.
                        if reused {
                            continue;
                        }
                        return Err(SendError::Protocol(e.into()));
                    }
                    // A connection idle for a while may be closed by the upstream (its
                    // keep-alive timeout) just as the request goes out: hyper then reports an
                    // incomplete message and the request is gone. Keep a copy to resend
                    // (headers and a reference-counted body); under load connections are idle
                    // for microseconds and this costs nothing.
                    let spare = idle_since
                        .filter(|since| since.elapsed() >= KEEP_ALIVE_RACE_AFTER)
                        .map(|_| copy_request(&req));
                    match conn.try_send_request(req).await {
                        Ok(resp) => {
                            return Ok((resp, Some(Lent { pool: Arc::downgrade(&self.shared), conn })));
                        }
                        Err(e) => {
                            if let Some(spare) =
                                spare.filter(|_| e.message().is_none() && e.error().is_incomplete_message())
                            {
                                req = spare;
                                continue;
                            }
                            e
                        }
                    }
                }
            };
            req = retry_or_fail(failed, reused)?;
        }
    }

    async fn connect(&self, uri: &Uri) -> Result<Conn, SendError> {
        let shared = &self.shared;
        // Until the first https connection shows which protocol the upstream speaks, connect
        // one at a time: if it is HTTP/2, everyone waiting then shares it.
        let _first = if shared.config.may_be_h2 && !shared.speaks_h1.load(Ordering::Relaxed) {
            let guard = shared.first_connect.lock().await;
            if let Some(conn) = shared.checkout() {
                return Ok(conn);
            }
            // HTTP/1.1 after all: no reason to make the others wait for this connect.
            (!shared.speaks_h1.load(Ordering::Relaxed)).then_some(guard)
        } else {
            None
        };
        let mut connector = shared.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx)).await.map_err(SendError::Connect)?;
        let io = connector.call(uri.clone()).await.map_err(SendError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let mut builder = http2::Builder::new(TokioExecutor::new());
            builder.timer(TokioTimer::new());
            if let Some(interval) = shared.config.h2_keep_alive_interval {
                builder.keep_alive_interval(interval).keep_alive_while_idle(true);
            }
            let (conn, driver) = builder.handshake(io).await.map_err(|e| SendError::Connect(e.into()))?;
            // The connection's errors are routine (the upstream closed it); the requests on it
            // report their own.
            tokio::spawn(async move {
                let _ = driver.await;
            });
            shared.lock().h2 = Some(conn.clone());
            Ok(Conn::H2(conn))
        } else {
            if shared.config.may_be_h2 {
                shared.speaks_h1.store(true, Ordering::Relaxed);
            }
            // Flattened writes, as the server's (see proxypal-server's `conn_builder`).
            let (conn, driver) = http1::Builder::new()
                .writev(false)
                .handshake(io)
                .await
                .map_err(|e| SendError::Connect(e.into()))?;
            tokio::spawn(async move {
                let _ = driver.await;
            });
            Ok(Conn::H1(conn, None))
        }
    }
}

/// A copy of `req` to resend if the connection it goes out on turns out to be closed.
fn copy_request(req: &Request<ReqBody>) -> Request<ReqBody> {
    let mut copy = Request::new(req.body().clone());
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    copy
}

/// The request back for another try if `reused` and it was never written; else the error.
fn retry_or_fail(
    mut failed: TrySendError<Request<ReqBody>>,
    reused: bool,
) -> Result<Request<ReqBody>, SendError> {
    match failed.take_message() {
        Some(req) if reused => Ok(req),
        _ => Err(SendError::Protocol(failed.into_error().into())),
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the state inconsistent (each
        // critical section is a single push, pop or assignment), so a poisoned lock is used
        // as is.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The shared HTTP/2 connection, else the most recently used live HTTP/1.1 one.
    fn checkout(&self) -> Option<Conn> {
        let mut state = self.lock();
        if let Some(h2) = &state.h2 {
            if !h2.is_closed() {
                return Some(Conn::H2(h2.clone()));
            }
            state.h2 = None;
        }
        while let Some(idle) = state.idle.pop_back() {
            if !idle.conn.is_closed() {
                return Some(Conn::H1(idle.conn, Some(idle.since)));
            }
        }
        None
    }

    fn forget_h2(&self, conn: &http2::SendRequest<ReqBody>) {
        let mut state = self.lock();
        if conn.is_closed() && state.h2.as_ref().is_some_and(http2::SendRequest::is_closed) {
            state.h2 = None;
        }
    }

    fn put(self: Arc<Self>, conn: http1::SendRequest<ReqBody>) {
        if conn.is_closed() || self.config.max_idle == 0 {
            return;
        }
        let start_reaper = {
            let mut state = self.lock();
            if state.idle.len() >= self.config.max_idle {
                // Full: the oldest idle connection makes room (dropping it closes it).
                state.idle.pop_front();
            }
            state.idle.push_back(Idle { conn, since: Instant::now() });
            !std::mem::replace(&mut state.reaping, true)
        };
        if start_reaper && tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(reap(Arc::downgrade(&self)));
        } else if start_reaper {
            self.lock().reaping = false;
        }
    }
}

/// Closes idle connections older than the idle timeout; runs while any are idle.
async fn reap(pool: Weak<Shared>) {
    loop {
        let next = {
            let Some(shared) = pool.upgrade() else { return };
            let timeout = shared.config.idle_timeout;
            let now = Instant::now();
            let mut state = shared.lock();
            while state
                .idle
                .front()
                .is_some_and(|i| i.conn.is_closed() || now.duration_since(i.since) >= timeout)
            {
                state.idle.pop_front();
            }
            match state.idle.front() {
                Some(oldest) => oldest.since + timeout,
                None => {
                    state.reaping = false;
                    return;
                }
            }
        };
        tokio::time::sleep_until(next).await;
    }
}
