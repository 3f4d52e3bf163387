//! The server's shared state: the [`Gateway`] plus what the front and the
//! admin endpoints need beside it (the metrics registry, CORS origins, the
//! dashboard's history, start time, dev mode).

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use proxypal_gateway::Gateway;
use proxypal_gateway::keypool::ReloadReport;

use crate::config::Config;
use crate::convert::{self, BuildError};
use crate::history::History;

/// Labels with only a worker index.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: String,
}

/// The running proxy's state, shared by every worker.
#[derive(Debug)]
pub struct App {
    gateway: Arc<Gateway>,
    registry: Registry,
    connections: Family<WorkerLabel, Counter>,
    /// CORS origins (empty = off); reloadable.
    cors_origins: ArcSwap<Vec<String>>,
    history: Arc<History>,
    started: Instant,
    dev: bool,
}

impl App {
    /// Builds the gateway and the upstream settings from a validated config.
    ///
    /// # Errors
    /// A key set, quota or upstream setting that cannot be used.
    pub fn new(config: &Config, dev: bool) -> Result<Arc<Self>, BuildError> {
        let mut registry = Registry::with_prefix("proxypal");
        let gateway = Gateway::new(convert::gateway_config(config)?, &mut registry)?;
        let connections = Family::<WorkerLabel, Counter>::default();
        registry.register(
            "connections_accepted",
            "Client connections accepted, by the worker thread serving them",
            connections.clone(),
        );
        Ok(Arc::new(Self {
            gateway,
            registry,
            connections,
            cors_origins: ArcSwap::from_pointee(config.cors.allowed_origins.clone()),
            history: Arc::new(History::new()),
            started: Instant::now(),
            dev,
        }))
    }

    /// Applies a new config's keys, limits and client settings while requests
    /// go on. Keys that stay keep their counters, cooldowns and spent permits.
    /// Listener address, upstream, timeouts and workers need a restart.
    ///
    /// # Errors
    /// The new key set or limits are refused; the old ones keep serving.
    pub fn reload(&self, config: &Config) -> Result<ReloadReport, BuildError> {
        let report = self.gateway.reload(convert::gateway_config(config)?)?;
        self.cors_origins.store(Arc::new(config.cors.allowed_origins.clone()));
        Ok(report)
    }

    /// The `/v1` pipeline.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Every metric (`GET /metrics` encodes it).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The accepted-connections counter of worker `worker` (resolved once per
    /// worker, not per connection).
    pub fn worker_connections(&self, worker: usize) -> Counter {
        self.connections.get_or_create_owned(&WorkerLabel { worker: worker.to_string() })
    }

    /// Whether a browser `Origin` may call the API.
    pub fn cors_allows(&self, origin: &[u8]) -> bool {
        self.cors_origins.load().iter().any(|o| o == "*" || o.as_bytes() == origin)
    }

    /// The sampled per-key request history (`/stats` → `history`).
    pub fn history(&self) -> &Arc<History> {
        &self.history
    }

    /// When the server started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Whether this is `--dev`.
    pub fn dev(&self) -> bool {
        self.dev
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> usize {
        self.gateway.in_flight()
    }
}
