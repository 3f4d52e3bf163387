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
pub mod body;
pub mod config;
pub mod dashboard;
pub mod dev;
pub mod errors;
pub mod history;
pub mod logging;
pub mod metrics;
mod proxy;
pub mod serve;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use app::App;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config could not be turned into a running proxy.
    #[error(transparent)]
    Build(#[from] app::BuildError),
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
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    /// The history sampler; aborted when this is dropped (after shutdown).
    _history: history::Sampler,
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
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Waits until the server stops on its own (it does not, unless shut down).
    pub async fn wait(mut self) {
        let _ = (&mut self.task).await;
    }

    /// Triggers the graceful shutdown without waiting for it.
    pub fn begin_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Builds the proxy from `config`, binds `config.listen` and serves in the
/// background. Must be called inside a Tokio runtime.
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
}

impl Default for StartOptions {
    fn default() -> Self {
        Self { history_interval: history::DEFAULT_INTERVAL }
    }
}

impl StartOptions {
    /// The defaults, except for the test-only [`history::INTERVAL_ENV`].
    pub fn from_env() -> Self {
        Self { history_interval: history::interval_from_env() }
    }
}

/// [`start`] with explicit [`StartOptions`].
///
/// # Errors
/// A config that cannot be used, or an address that cannot be bound.
pub async fn start_with(
    config: &config::Config,
    dev: bool,
    options: StartOptions,
) -> Result<Running, StartError> {
    let app = App::new(config, dev)?;
    let listener =
        serve::bind(config.listen).map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind { addr: config.listen, source })?;
    let (stop, stopped) = oneshot::channel::<()>();
    let grace = config.shutdown_grace;
    let task = tokio::spawn(serve::serve(
        listener,
        Arc::clone(&app),
        async move {
            let _ = stopped.await;
        },
        grace,
    ));
    let sampler = history::spawn(&app, options.history_interval);
    Ok(Running { addr, app, stop: Some(stop), task, _history: sampler })
}
