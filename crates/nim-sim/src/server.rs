//! The listener, connection tasks and the handle.

use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

use crate::config::SimConfig;
use crate::fault::{Fault, FaultTarget};
use crate::service::{self, ConnAction, GARBAGE};
use crate::state::Shared;
use crate::stats::{AccountStats, KeyCounters, SimStats, max_in_window};

/// Listen backlog of the simulator's socket.
const BACKLOG: u32 = 4096;

/// Errors starting a simulated server.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// [`SimServer::start`] was called outside a tokio runtime.
    #[error("the simulated NIM server must be started from within a tokio runtime")]
    NoRuntime,
    /// The listening socket could not be created or bound.
    #[error("could not listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// Entry point: starts simulated NIM servers.
#[derive(Debug, Clone, Copy)]
pub struct SimServer;

impl SimServer {
    /// Starts a server on `127.0.0.1:<ephemeral port>` on the current tokio
    /// runtime. The server runs until the returned [`SimHandle`] is dropped
    /// or shut down.
    pub fn start(config: SimConfig) -> Result<SimHandle, SimError> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config)
    }

    /// Starts a server on `addr` on the current tokio runtime.
    pub fn start_on(addr: SocketAddr, config: SimConfig) -> Result<SimHandle, SimError> {
        let rt = tokio::runtime::Handle::try_current().map_err(|_| SimError::NoRuntime)?;
        let _enter = rt.enter();
        let bind_err = |source| SimError::Bind { addr, source };
        let listener = listen(addr).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        let shared = Arc::new(Shared::new(config));
        let (tx, rx) = oneshot::channel();
        let task = rt.spawn(accept_loop(listener, Arc::clone(&shared), rx));
        tracing::debug!(%local, "simulated NIM listening");
        Ok(SimHandle { addr: local, shared, shutdown: Some(tx), task: Some(task) })
    }
}

fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let mut conns = JoinSet::new();
    loop {
        // Reap finished connection tasks.
        while conns.try_join_next().is_some() {}
        tokio::select! {
            // Fires on an explicit shutdown and when the handle is dropped.
            _ = &mut stop => break,
            res = listener.accept() => match res {
                Ok((stream, _peer)) => {
                    conns.spawn(serve_conn(stream, builder.clone(), Arc::clone(&shared)));
                }
                Err(e) => {
                    // E.g. EMFILE: back off a little instead of spinning.
                    tracing::warn!(error = %e, "simulated NIM accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
        }
    }
    drop(listener);
    conns.shutdown().await;
}

/// Counts an open connection for as long as it lives.
struct ConnGuard(Arc<Shared>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_conn(stream: TcpStream, builder: auto::Builder<TokioExecutor>, shared: Arc<Shared>) {
    shared.open_connections.fetch_add(1, Ordering::SeqCst);
    let _guard = ConnGuard(Arc::clone(&shared));
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "set_nodelay failed");
    }
    // Keep a duplicate of the socket so a fault can write raw bytes on it
    // after hyper's connection has been dropped.
    let (stream, raw) = match duplicate(stream) {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!(error = %e, "could not duplicate the connection socket");
            return;
        }
    };
    let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel();
    let svc = service_fn(move |req| {
        let shared = Arc::clone(&shared);
        let ctl = ctl_tx.clone();
        async move { Ok::<_, Infallible>(service::handle(shared, ctl, req).await) }
    });
    let mut conn = Box::pin(builder.serve_connection(TokioIo::new(stream), svc));
    let action = tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "simulated NIM connection ended with an error");
            }
            return;
        }
        Some(action) = ctl_rx.recv() => action,
    };
    // Close hyper's side first; the socket stays open through `raw`.
    drop(conn);
    if action == ConnAction::Garbage {
        match TcpStream::from_std(raw) {
            Ok(mut s) => {
                // The peer may already be gone; nothing to do about it.
                let _ = s.write_all(GARBAGE).await;
                let _ = s.shutdown().await;
            }
            Err(e) => tracing::debug!(error = %e, "could not reuse the raw socket"),
        }
    }
    // `raw` (if not consumed) is dropped here, which closes the connection.
}

fn duplicate(stream: TcpStream) -> io::Result<(TcpStream, std::net::TcpStream)> {
    let std = stream.into_std()?;
    let dup = std.try_clone()?;
    Ok((TcpStream::from_std(std)?, dup))
}

/// A running simulated NIM server. Dropping it stops the server and closes
/// every connection (without waiting); [`SimHandle::shutdown`] does the same
/// and waits.
#[derive(Debug)]
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI base URL, `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// A full URL for `path` (which should start with `/`), e.g.
    /// `url("/v1/models")`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The configuration the server runs with.
    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// A snapshot of all counters.
    pub fn stats(&self) -> SimStats {
        self.shared.snapshot()
    }

    /// The last request body received, parsed as JSON (a body that is not
    /// JSON comes back as a JSON string of its text, invalid UTF-8
    /// replaced). Recorded when [`SimConfig::record_headers`] is on (the
    /// default, off in [`SimConfig::fast`]) or
    /// [`SimConfig::request_log`] is not zero; `None` before any request
    /// with a body, or after [`reset_stats`](Self::reset_stats).
    pub fn last_request_body(&self) -> Option<serde_json::Value> {
        self.shared.last_body().map(|b| body_json(&b))
    }

    /// The bodies of the last [`SimConfig::request_log`] requests with a
    /// body, oldest first, parsed as [`last_request_body`](Self::last_request_body)
    /// does. Empty unless [`SimConfig::with_request_log`] turned it on;
    /// cleared by [`reset_stats`](Self::reset_stats).
    pub fn request_log(&self) -> Vec<serde_json::Value> {
        self.shared.request_log().iter().map(|b| body_json(b)).collect()
    }

    /// The counters of one key (all zero if never seen).
    pub fn key_stats(&self, key: &str) -> KeyCounters {
        self.stats().key(key)
    }

    /// Resets the request counters, accept logs, account counters, recorded
    /// headers and bodies (not the limiters, token windows, faults, or the
    /// connection/stream/in-flight gauges; each maximum of requests in
    /// flight restarts from the current value).
    pub fn reset_stats(&self) {
        self.shared.reset_stats();
    }

    /// Streaming response bodies currently alive.
    pub fn active_streams(&self) -> usize {
        self.shared.active_streams.load(Ordering::SeqCst)
    }

    /// TCP connections currently open.
    pub fn open_connections(&self) -> usize {
        self.shared.open_connections.load(Ordering::SeqCst)
    }

    /// Times (since the server started) at which `key`'s requests passed the
    /// rate limiter, in order.
    pub fn accept_log(&self, key: &str) -> Vec<Duration> {
        self.shared.accept_log(key)
    }

    /// The largest number of `key`'s accepted requests in any half-open
    /// window of length `window`.
    pub fn max_in_any_window(&self, key: &str, window: Duration) -> usize {
        max_in_window(&self.shared.accept_log(key), window)
    }

    /// The account `key` belongs to (see
    /// [`SimConfig::account_of`]).
    pub fn account_of<'a>(&'a self, key: &'a str) -> &'a str {
        self.shared.config.account_of(key)
    }

    /// The counters of one account (all zero if never seen).
    pub fn account_stats(&self, account: &str) -> AccountStats {
        self.shared.account_stats(account)
    }

    /// Times (since the server started) at which `account`'s requests (all
    /// its keys together) passed its limits, in order.
    pub fn account_accept_log(&self, account: &str) -> Vec<Duration> {
        self.shared.account_accept_log(account)
    }

    /// The largest number of `account`'s accepted requests (all its keys
    /// together) in any half-open window of length `window`.
    pub fn max_in_any_window_for_account(&self, account: &str, window: Duration) -> usize {
        max_in_window(&self.shared.account_accept_log(account), window)
    }

    /// Queues a fault for the next request matching `target` (FIFO among
    /// matching faults; queued faults take precedence over the sticky one).
    pub fn push_fault(&self, fault: Fault, target: FaultTarget) {
        self.shared.push_fault(fault, target);
    }

    /// Sets (or clears, with `None`) a fault applied to every request that
    /// no queued fault matches.
    pub fn set_fault_always(&self, fault: Option<Fault>) {
        self.shared.set_sticky(fault);
    }

    /// Removes every queued fault and the sticky one.
    pub fn clear_faults(&self) {
        self.shared.clear_faults();
    }

    /// Number of queued faults not consumed yet.
    pub fn pending_faults(&self) -> usize {
        self.shared.pending_faults()
    }

    /// Polls the stats every 2 ms until `pred` holds (`true`) or `timeout`
    /// passes (`false`).
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&SimStats) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if pred(&self.stats()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Stops accepting, closes every connection and waits for that to finish.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            // A JoinError only means the task panicked or was cancelled with
            // its runtime: the server is gone either way.
            let _ = task.await;
        }
    }
}

/// A request body as JSON, or as a JSON string of its text.
fn body_json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(body).into_owned()))
}
