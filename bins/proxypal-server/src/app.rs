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
    /// Where events go (`webhooks:`); a no-op when none is configured.
    webhooks: proxypal_webhooks::Webhooks,
    /// The usage ledger, once started (see [`crate::start_with`]).
    ledger: std::sync::OnceLock<proxypal_ledger::Ledger>,
    ledger_metrics: crate::usage::LedgerMetrics,
    cache_metrics: crate::cache::CacheMetrics,
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
        let webhooks = if config.webhooks.is_empty() {
            proxypal_webhooks::Webhooks::disabled()
        } else {
            let hooks = convert::webhook_config(config)
                .map_err(|(field, reason)| BuildError::Invalid { field, reason })?;
            proxypal_webhooks::Webhooks::try_start(hooks, &mut registry)
                .map_err(|e| BuildError::Invalid { field: "webhooks".into(), reason: e.to_string() })?
        };
        let ledger_metrics = crate::usage::LedgerMetrics::register(&mut registry);
        let cache_metrics = crate::cache::CacheMetrics::register(&mut registry);
        Ok(Arc::new(Self {
            ledger: std::sync::OnceLock::new(),
            ledger_metrics,
            cache_metrics,
            webhooks,
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

    /// Sets the usage ledger and records every finished request in it.
    /// Once; `false` if one was set already.
    pub fn set_ledger(&self, ledger: proxypal_ledger::Ledger) -> bool {
        if self.ledger.set(ledger.clone()).is_err() {
            return false;
        }
        self.gateway.set_usage_sink(Arc::new(crate::usage::LedgerSink::new(ledger)))
    }

    /// The usage ledger, if there is one.
    pub fn ledger(&self) -> Option<&proxypal_ledger::Ledger> {
        self.ledger.get()
    }

    /// Sets the ledger's and the cache's gauges and counters (before
    /// `/metrics` is encoded).
    pub fn refresh_ledger_metrics(&self) {
        if let Some(ledger) = self.ledger.get() {
            self.ledger_metrics.refresh(ledger);
        }
        if let Some(cache) = self.gateway.cache() {
            self.cache_metrics.refresh(cache);
        }
    }

    /// Where events go (`webhooks:`).
    pub fn webhooks(&self) -> &proxypal_webhooks::Webhooks {
        &self.webhooks
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
