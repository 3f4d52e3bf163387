//! Serving: binding the listening sockets, the accept loop of each worker and
//! graceful shutdown. Requests go to [`crate::front`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use proxypal_gateway::Handle;
use tokio::net::{TcpListener, TcpSocket};

use crate::app::App;

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

/// What one accept loop owns: the state its requests need (the app, and its
/// way into the gateway with its own upstream client) and its connection
/// counter.
#[derive(Debug, Clone)]
pub struct Worker {
    /// One `Arc` for everything a request needs, so a request clones one
    /// reference, not three (app, gateway, upstream client).
    serving: Arc<Serving>,
    accepted: prometheus_client::metrics::counter::Counter,
}

#[derive(Debug)]
struct Serving {
    app: Arc<App>,
    gateway: Handle,
}

impl Worker {
    /// Worker number `id` of `app`, with its own upstream connections.
    pub fn new(app: &Arc<App>, id: usize) -> Self {
        let gateway = Handle::new(Arc::clone(app.gateway()));
        Self {
            serving: Arc::new(Serving { app: Arc::clone(app), gateway }),
            accepted: app.worker_connections(id),
        }
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
                let serving = Arc::clone(&worker.serving);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let serving = Arc::clone(&serving);
                        async move {
                            Ok::<_, Infallible>(crate::front::handle(&serving.app, &serving.gateway, req).await)
                        }
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
