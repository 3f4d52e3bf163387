//! [`Gateway`], the shared state of the pipeline, and [`Handle`], one worker's
//! way into it; [`GatewayService`] is the boxed `Service` for embedders.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::{Request, Response};
use http_body::Body;
use prometheus_client::registry::Registry;
use proxypal_keypool::{KeyPool, KeyPoolBuilder, KeySnapshot, KeyStatus, ReloadReport};
use proxypal_limiter::{LimitReport, Limits, SystemClock};
use proxypal_upstream::Upstream;

use crate::admission::{Admission, Client};
use crate::body::{BoxError, ProxyBody};
use crate::config::{GatewayConfig, Settings};
use crate::failover::{self, Shared};
use crate::keyset::{self, BuildError, KeyResources, Plan, SharedClock};
use crate::lease::LeaseQueue;
use crate::metrics::Metrics;

/// One key as `/stats` shows it: its snapshot, account and limits now.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KeyReport {
    /// State, counters, label, name.
    pub snapshot: KeySnapshot,
    /// Requests the key could send right now, back to back (the smallest
    /// room over its request windows; `u32::MAX` when nothing limits it).
    pub permits_available: u32,
    /// The account whose budget it shares, if any.
    pub account: Option<String>,
    /// Every window (and concurrency cap) of its budgets, with its use.
    pub limits: Vec<LimitReport>,
    /// Time until an upstream-announced block ends (zero if none).
    pub blocked_for: std::time::Duration,
}

/// The `/v1` pipeline's shared state: keys with their limits, the lease
/// queue, admission, settings and metrics. One per process (or per embedding);
/// every worker's [`Handle`] points at it.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use proxypal_gateway::{Gateway, GatewayConfig, keypool::KeySpec};
///
/// let mut registry = prometheus_client::registry::Registry::with_prefix("proxypal");
/// let gateway = Gateway::new(
///     GatewayConfig::with_keys([KeySpec::new("nvapi-example-key-0000000001")]),
///     &mut registry,
/// )?;
/// assert_eq!(gateway.key_reports().len(), 1);
/// assert_eq!(gateway.in_flight(), 0);
/// # Ok(()) }
/// ```
pub struct Gateway {
    keys: KeyPool<KeyResources>,
    queue: LeaseQueue,
    admission: Admission,
    settings: ArcSwap<Settings>,
    metrics: Metrics,
    /// One reload at a time, so keys and settings always come from one config.
    reloading: std::sync::Mutex<()>,
    /// The pool's `x-ratelimit-*` response headers, summed now and then.
    pool_headers: ArcSwap<crate::quota::PoolHeaders>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("keys", &self.keys).finish_non_exhaustive()
    }
}

/// # Building and reloading
impl Gateway {
    /// Builds the gateway, registering its metrics in `registry`.
    ///
    /// # Errors
    /// A key set or quota that cannot be used; the error names the key's position.
    pub fn new(config: GatewayConfig, registry: &mut Registry) -> Result<Arc<Self>, BuildError> {
        Self::build(config, registry, KeyPool::builder(), Arc::new(SystemClock::new()))
    }

    /// [`new`](Self::new) with the pool's clock and the quota engine's chosen
    /// by the caller (tests drive both from Tokio's paused clock).
    pub(crate) fn build(
        config: GatewayConfig,
        registry: &mut Registry,
        pool: KeyPoolBuilder,
        clock: SharedClock,
    ) -> Result<Arc<Self>, BuildError> {
        let plan = Plan::new(&config.keys, &config.limits, &config.accounts)?;
        let metrics = Metrics::register(registry);
        let settings = Settings::from_config(&config);
        let keys = keyset::build(pool.policy(config.cooldowns), config.keys, plan, &metrics, clock)?;
        Ok(Arc::new(Self {
            keys,
            queue: LeaseQueue::new(),
            admission: Admission::new(config.max_inflight),
            settings: ArcSwap::from_pointee(settings),
            metrics,
            reloading: std::sync::Mutex::new(()),
            pool_headers: ArcSwap::from_pointee(crate::quota::PoolHeaders::empty()),
        }))
    }

    /// Applies a new config's keys, quotas and request settings while requests
    /// go on. Keys that stay keep their counters, cooldowns and spent permits.
    /// `max_inflight` and `cooldowns` keep their values from [`new`](Self::new).
    ///
    /// # Errors
    /// The new key set or a quota is refused; the old ones keep serving.
    pub fn reload(&self, config: GatewayConfig) -> Result<ReloadReport, BuildError> {
        // Held only for this synchronous swap, never across an `.await`.
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let plan = Plan::new(&config.keys, &config.limits, &config.accounts)?;
        let settings = Settings::from_config(&config);
        let report = keyset::reload(&self.keys, config.keys, plan, &self.metrics)?;
        self.settings.store(Arc::new(settings));
        Ok(report)
    }
}

/// # Reading the state
impl Gateway {
    /// The key pool (to report outcomes, re-enable keys, read snapshots).
    pub fn keys(&self) -> &KeyPool<KeyResources> {
        &self.keys
    }

    /// The lease queue.
    pub fn queue(&self) -> &LeaseQueue {
        &self.queue
    }

    /// The metrics handles.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The client behind a request's `Authorization: Bearer <token>`, or
    /// `None` when tokens are required and it presents none of them. For
    /// endpoints an embedder serves beside the gateway (the server's `/stats`).
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Option<Client> {
        self.settings.load().tokens.authenticate(headers)
    }

    /// Every key with its state, account and limits, in key-set order.
    pub fn key_reports(&self) -> Vec<KeyReport> {
        let snapshot = self.keys.snapshot();
        self.keys.with_current(|_, resources| {
            let quotas = &resources.quotas;
            snapshot
                .into_iter()
                .map(|s| {
                    let i = s.index;
                    KeyReport {
                        permits_available: u32::try_from(quotas.remaining_requests(i)).unwrap_or(u32::MAX),
                        account: quotas.account(i).map(str::to_owned),
                        limits: quotas.report(i),
                        blocked_for: quotas.blocked_for(i),
                        snapshot: s,
                    }
                })
                .collect()
        })
    }

    /// Clears the cooldown, the disabled state and what was learned from the
    /// upstream for the key named `name` (its configured name, or its masked
    /// label such as `nvapi-…wxyz`). Its windows keep what they counted: a
    /// reset never makes room the upstream would refuse. `false` when no key
    /// has that name.
    pub fn reset_key(&self, name: &str) -> bool {
        let found = self.keys.with_current(|keys, resources| {
            let index = keys.iter().position(|k| k.name() == Some(name) || k.label() == name)?;
            resources.quotas.forget_learned(index);
            Some(index)
        });
        found.is_some_and(|index| self.keys.enable(index))
    }

    /// The quota engine of the current key set (for state saving, resets and
    /// pool-wide sums).
    pub fn quotas(&self) -> Arc<crate::keyset::Engine> {
        self.keys.with_current(|_, resources| Arc::clone(&resources.quotas))
    }

    /// Requests waiting for a permit now.
    pub fn queue_depth(&self) -> usize {
        self.queue.depth()
    }

    /// Requests being served now (streams count until they end).
    pub fn in_flight(&self) -> usize {
        self.admission.in_flight()
    }

    /// The default limits in effect (after the last reload).
    pub fn default_limits(&self) -> Limits {
        self.settings.load().limits.clone()
    }

    /// Sets the gauges that describe the state now (queue depth, requests in
    /// flight, keys by state); call it before encoding the registry.
    pub fn refresh_gauges(&self) {
        for report in self.key_reports() {
            self.metrics.set_limits(&report.snapshot.label, &report.limits);
        }
        let snapshot = self.keys.snapshot();
        let count = |f: fn(&KeyStatus) -> bool| snapshot.iter().filter(|k| f(&k.status)).count();
        self.metrics.set_gauges(
            self.queue_depth(),
            self.in_flight(),
            [
                ("ready", count(|s| *s == KeyStatus::Ready)),
                ("cooling_down", count(|s| matches!(s, KeyStatus::CoolingDown { .. }))),
                ("disabled", count(|s| *s == KeyStatus::Disabled)),
            ],
        );
    }
}

/// A worker's way into a [`Gateway`]: the shared state plus the worker's own
/// upstream client (its own connections). Cheap to clone: clone it into each
/// connection's service.
#[derive(Debug, Clone)]
pub struct Handle {
    gateway: Arc<Gateway>,
    upstream: Upstream,
}

impl Handle {
    /// `gateway`'s requests sent through `upstream`.
    pub fn new(gateway: Arc<Gateway>, upstream: Upstream) -> Self {
        Self { gateway, upstream }
    }

    /// The shared state.
    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// Serves one request under `/v1` (`/v1/<rest>` goes to `<base_url>/<rest>`;
    /// any other path gets a 404). Never fails: every problem becomes an
    /// OpenAI-shaped response. The future is not boxed, so a server pays
    /// for no allocation; [`GatewayService`] boxes it for embedders.
    ///
    /// The stages: admission (an in-flight slot, held by the response body;
    /// 503 when full) → client token (401) → body buffered up to the limit
    /// (413) → lease a key (queueing up to the timeout: 429, or 503 when no key
    /// is usable) → send → classify → deliver, or fail over to another key.
    ///
    /// The future is `Send` when `B` and `B::Data` are.
    pub fn handle<B>(&self, req: Request<B>) -> impl Future<Output = Response<ProxyBody>>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        // The attempt loop's own future, not an `async` wrapper around it: one state machine
        // less to build and poll per request.
        let gw = &self.gateway;
        failover::forward(
            Shared {
                keys: &gw.keys,
                queue: &gw.queue,
                admission: &gw.admission,
                settings: &gw.settings,
                metrics: &gw.metrics,
                upstream: &self.upstream,
                pool_headers: &gw.pool_headers,
            },
            req,
        )
    }

    /// This handle as a boxed `Service` (hyper's and tower's).
    pub fn into_service(self) -> GatewayService {
        GatewayService(Arc::new(self))
    }
}

/// A [`Handle`] as a [`hyper::service::Service`] and a [`tower_service::Service`]
/// with a boxed future, to mount with `hyper`'s connection builders,
/// `hyper_util`, or a tower stack (axum's `Router::fallback_service`, …).
/// It never fails (`Infallible`): errors are responses.
#[derive(Debug, Clone)]
pub struct GatewayService(Arc<Handle>);

/// The future of [`GatewayService`].
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

impl GatewayService {
    fn serve<B>(&self, req: Request<B>) -> ResponseFuture
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<BoxError>,
    {
        let handle = Arc::clone(&self.0);
        Box::pin(async move { Ok(handle.handle(req).await) })
    }
}

impl<B> hyper::service::Service<Request<B>> for GatewayService
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: Request<B>) -> Self::Future {
        self.serve(req)
    }
}

impl<B> tower_service::Service<Request<B>> for GatewayService
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    /// Always ready: back-pressure is the gateway's in-flight cap, answered with 503.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.serve(req)
    }
}
