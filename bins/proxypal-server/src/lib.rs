//! ProxyPal's server: an OpenAI-compatible endpoint that spreads requests over
//! a pool of upstream API keys, keeps each key under its rate limit, fails over
//! before the client sees an error, and streams responses through untouched.
//!
//! The binary (`src/main.rs`) is thin: it loads a [`config::Config`],
//! validates it before binding any socket, and calls [`start`].
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use std::path::Path;
//! use proxypal_server::config::Config;
//!
//! let config = Config::load(Some(Path::new("/etc/proxypal/proxypal.yaml")))?;
//! let server = proxypal_server::start(&config, false).await?;
//! println!("listening on {}", server.addr());
//! server.shutdown().await;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod admin;
pub mod app;
pub mod cache;
pub mod config;
pub mod convert;
pub mod dashboard;
#[cfg(feature = "dev")]
pub mod dev;
pub mod front;
pub mod history;
pub mod logging;
pub mod notify;
pub mod reload;
pub mod serve;
pub mod state;
pub mod usage;

use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};

pub use app::App;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config could not be turned into a running proxy.
    #[error(transparent)]
    Build(#[from] convert::BuildError),
    /// A worker thread or its runtime could not be started.
    #[error("cannot start a worker thread: {source}")]
    Worker {
        /// Why.
        source: std::io::Error,
    },
    /// The quota state store cannot be used (it names the file and what to do).
    #[error(transparent)]
    State(#[from] state::StateError),
    /// The usage ledger's database cannot be opened (PostgreSQL unreachable
    /// at start, a SQLite file that cannot be created).
    #[error("ledger: {0}")]
    Ledger(#[from] proxypal_ledger::LedgerError),
    /// Redis did not answer and the config requires it at start.
    #[error("shared.redis_url: {redis} does not answer, and shared.require_on_start is true")]
    Shared {
        /// Where Redis was looked for (without a password).
        redis: String,
    },
    /// The listen address could not be bound.
    #[error("listen: cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running server.
#[derive(Debug)]
pub struct Running {
    addr: SocketAddr,
    app: Arc<App>,
    /// Set to `true` to begin the graceful shutdown of every accept loop.
    stop: watch::Sender<bool>,
    /// One per accept loop; resolves (or errs) when that loop has finished.
    done: Vec<oneshot::Receiver<()>>,
    /// The history sampler; aborted when this is dropped (after shutdown).
    _history: history::Sampler,
    /// Keeps the models catalogs fresh; aborted when this is dropped.
    _catalogs: CatalogRefresher,
    /// Reports the gateway's state to the webhooks; aborted when dropped.
    _notifier: Option<notify::Notifier>,
    /// Saves the quota state every second, and once more at shutdown.
    state: Option<state::Saver>,
    /// `--dev`'s temporary state file, removed after the last save.
    temporary_state: Option<std::path::PathBuf>,
}

impl Running {
    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The shared state (pool, stats, reload).
    pub fn app(&self) -> &Arc<App> {
        &self.app
    }

    /// Stops accepting and waits for open requests (up to the grace period).
    pub async fn shutdown(mut self) {
        self.begin_shutdown();
        self.wait().await;
    }

    /// Waits until the server stops on its own (it does not, unless shut
    /// down), then saves the quota state a last time, marked clean.
    pub async fn wait(mut self) {
        for done in std::mem::take(&mut self.done) {
            // An error means the loop's thread or task is gone: stopped as well.
            let _ = done.await;
        }
        if let Some(saver) = self.state.take() {
            // A short blocking write: off the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || saver.finish()).await;
        }
        if let Some(ledger) = self.app.ledger() {
            if let Err(e) = ledger.shutdown().await {
                tracing::error!(error = %e, "the usage ledger could not write every record before exit");
            }
        }
        // Deliveries still queued get a few seconds (retries included).
        self.app.webhooks().shutdown(std::time::Duration::from_secs(5)).await;
        if let Some(path) = self.temporary_state.take() {
            let ledger =
                usage::ledger_config(&config::Config::default(), Some(&path)).and_then(|l| match l.backend {
                    proxypal_ledger::Backend::Sqlite { path } => Some(path),
                    _ => None,
                });
            for base in std::iter::once(path).chain(ledger) {
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = base.clone().into_os_string();
                    file.push(suffix);
                    let _ = std::fs::remove_file(file);
                }
            }
        }
    }

    /// Triggers the graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        self.stop.send_replace(true);
    }
}

/// Builds the proxy from `config`, binds `config.listen` and serves in the
/// background on the caller's Tokio runtime (one accept loop, the runtime's
/// own threads). Must be called inside a Tokio runtime. The binary uses
/// [`start_with`] and [`StartOptions::workers`] instead.
///
/// # Errors
/// A config that cannot be used, or an address that cannot be bound.
pub async fn start(config: &config::Config, dev: bool) -> Result<Running, StartError> {
    start_with(config, dev, StartOptions::from_env()).await
}

/// Internal knobs of [`start_with`] that are not configuration.
#[derive(Debug, Clone)]
pub struct StartOptions {
    /// How often the dashboard's request history is sampled
    /// ([`history::DEFAULT_INTERVAL`]; tests use less).
    pub history_interval: std::time::Duration,
    /// `None`: serve on the caller's runtime. `Some(n)`: start `n` worker
    /// threads, each with a single-threaded runtime, its own accept loop over
    /// a clone of the listening socket and its own upstream client, so that
    /// a request, its upstream connection and its response stay on one
    /// thread (no cross-thread wake-ups per request; see
    /// `docs/performance.md`). The caller's runtime keeps only the
    /// background work (history sampling; signals and reloads in the binary).
    pub workers: Option<NonZeroUsize>,
    /// How often the gateway's state is reported to the webhooks
    /// ([`notify::EVERY`]).
    pub notify_interval: std::time::Duration,
}

impl Default for StartOptions {
    fn default() -> Self {
        Self { history_interval: history::DEFAULT_INTERVAL, workers: None, notify_interval: notify::EVERY }
    }
}

impl StartOptions {
    /// The defaults, except for the test-only [`history::INTERVAL_ENV`].
    pub fn from_env() -> Self {
        Self { history_interval: history::interval_from_env(), ..Self::default() }
    }
}

/// [`start`] with explicit [`StartOptions`].
///
/// # Errors
/// A config that cannot be used, an address that cannot be bound, or a worker
/// thread that cannot be started.
pub async fn start_with(
    config: &config::Config,
    dev: bool,
    options: StartOptions,
) -> Result<Running, StartError> {
    let app = App::new(config, dev)?;
    // State first: a foreign file stops the start before anything listens.
    let state_path = if dev { Some(dev_state_path()) } else { config.state.path.clone() };
    let saver = match state_path {
        Some(path) => {
            let store = state::restore(app.gateway(), &path)?;
            let gateway = std::sync::Arc::clone(app.gateway());
            Some(state::Saver::start(gateway, store).map_err(|source| StartError::Worker { source })?)
        }
        None => None,
    };
    let ledger_state = if dev { Some(dev_state_path()) } else { config.state.path.clone() };
    if let Some(ledger) = usage::ledger_config(config, ledger_state.as_deref()) {
        let target = ledger.backend.target();
        let ledger = proxypal_ledger::Ledger::start(ledger).await?;
        tracing::info!(backend = ledger.stats().backend, at = %target, "usage ledger open");
        app.set_ledger(ledger);
    }
    if config.cache.enabled {
        let settings = config.cache.settings();
        let cache = match config.cache.backend {
            config::CacheBackend::Memory => {
                Arc::new(proxypal_gateway::cache::ResponseCache::memory(settings))
            }
            config::CacheBackend::Redis => {
                let cache = Arc::new(proxypal_gateway::cache::ResponseCache::redis(settings));
                if let Some(link) = app.gateway().shared_quota() {
                    cache.connect_in_background(link.config());
                }
                cache
            }
        };
        tracing::info!(backend = cache.backend(), ttl = ?config.cache.ttl, "response cache on");
        app.gateway().set_cache(cache);
    }
    let (stop, stopped) = watch::channel(false);
    // Redis before listening: a replica that serves before its first
    // heartbeat would start degraded (and wait a window to spend its share).
    if let Some(link) = app.gateway().shared_quota() {
        let link = Arc::clone(link);
        let shared =
            tokio::time::timeout(std::time::Duration::from_secs(3), link.first_contact(app.gateway()))
                .await
                .unwrap_or(false);
        if !shared && link.config().require_on_start {
            return Err(StartError::Shared {
                redis: proxypal_gateway::replicas::redacted(&link.config().redis_url),
            });
        }
        if !shared {
            tracing::error!(
                redis = %proxypal_gateway::replicas::redacted(&link.config().redis_url),
                replicas = link.replicas(),
                "shared quota: Redis does not answer; starting degraded, on this replica's share of every window"
            );
        }
        tokio::spawn(link.run(Arc::downgrade(app.gateway()), until_stopped(stopped.clone())));
    }
    let bind_error = |source| StartError::Bind { addr: config.listen, source };
    let grace = config.shutdown_grace;
    let (addr, done) = match options.workers {
        None => {
            let listener = serve::bind(config.listen).map_err(bind_error)?;
            let addr = listener.local_addr().map_err(bind_error)?;
            let (done_tx, done) = oneshot::channel();
            let worker = serve::Worker::new(&app, 0);
            tokio::spawn(async move {
                serve::serve(listener, worker, until_stopped(stopped), grace).await;
                let _ = done_tx.send(());
            });
            (addr, vec![done])
        }
        Some(n) => {
            let listeners = serve::bind_workers(config.listen, n.get()).map_err(bind_error)?;
            let addr = match listeners.first() {
                Some(l) => l.local_addr().map_err(bind_error)?,
                // `n` is at least 1, so there is a first listener.
                None => config.listen,
            };
            (addr, spawn_workers(&app, listeners, &stopped, grace)?)
        }
    };
    let sampler = history::spawn(app.gateway(), app.history(), options.history_interval);
    let catalogs = CatalogRefresher::spawn(app.gateway());
    let notifier = notify::Notifier::spawn(app.gateway(), app.webhooks(), options.notify_interval);
    let temporary_state = dev.then(dev_state_path);
    Ok(Running {
        _notifier: notifier,
        addr,
        app,
        stop,
        done,
        _history: sampler,
        _catalogs: catalogs,
        state: saver,
        temporary_state,
    })
}

/// Fetches every provider's models catalog at start and whenever one is
/// due, so that `GET /v1/models` answers from fresh catalogs without waiting.
#[derive(Debug)]
struct CatalogRefresher(tokio::task::JoinHandle<()>);

impl CatalogRefresher {
    /// How often it looks for catalogs that are due (each is fetched once per
    /// `routing.models_ttl`, or 30 s after a failure).
    const EVERY: std::time::Duration = std::time::Duration::from_secs(15);

    fn spawn(gateway: &Arc<proxypal_gateway::Gateway>) -> Self {
        let handle = proxypal_gateway::Handle::new(Arc::clone(gateway));
        Self(tokio::spawn(async move {
            loop {
                // A single provider without aliases fetches its catalog when a client first
                // lists models (no request spent on it otherwise, as before); with several
                // providers or aliases, catalogs are kept fresh to report missing targets.
                let gateway = handle.gateway();
                if gateway.providers().len() > 1 || !gateway.alias_reports().is_empty() {
                    handle.refresh_models().await;
                }
                tokio::time::sleep(Self::EVERY).await;
            }
        }))
    }
}

impl Drop for CatalogRefresher {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Resolves once `stop` turns `true` (or its sender is gone).
async fn until_stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopping| *stopping).await;
}

/// Starts one worker thread per listener; returns one completion receiver
/// per worker.
fn spawn_workers(
    app: &Arc<App>,
    listeners: Vec<std::net::TcpListener>,
    stopped: &watch::Receiver<bool>,
    grace: std::time::Duration,
) -> Result<Vec<oneshot::Receiver<()>>, StartError> {
    let worker_error = |source| StartError::Worker { source };
    let mut done = Vec::with_capacity(listeners.len());
    for (i, listener) in listeners.into_iter().enumerate() {
        // Built here, not in the thread, so that a failure is reported to the caller.
        let runtime =
            tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(worker_error)?;
        let worker = serve::Worker::new(app, i);
        let stopped = stopped.clone();
        let (done_tx, done_rx) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("proxypal-worker-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => {
                            serve::serve(listener, worker, until_stopped(stopped), grace).await;
                        }
                        Err(e) => tracing::error!(worker = i, error = %e, "worker cannot use the listener"),
                    }
                });
                // Dropping the runtime here ends what the grace period left open.
                drop(runtime);
                let _ = done_tx.send(());
            })
            .map_err(worker_error)?;
        done.push(done_rx);
    }
    Ok(done)
}

/// `--dev`'s state store: a file of this process in the temp directory.
fn dev_state_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("proxypal-dev-state-{}.db", std::process::id()))
}
