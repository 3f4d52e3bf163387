//! [`Gateway`], the shared state of the pipeline, and [`Handle`], one worker's
//! way into it; [`GatewayService`] is the boxed `Service` for embedders.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::{Request, Response};
use http_body::Body;
use prometheus_client::registry::Registry;
use proxypal_keypool::{
    CooldownPolicy, KeyPool, KeyPoolBuilder, KeySnapshot, KeySpec, KeyStatus, ReloadReport, Secret,
};
use proxypal_limiter::{GovernorLimiter, KeyQuota, RateLimit};
use proxypal_upstream::Upstream;

use crate::admission::{Admission, Client, ClientTokens};
use crate::body::{BoxError, ProxyBody};
use crate::keyset::{self, KeyResources};
use crate::lease::{LeaseQueue, MAX_ATTEMPTS};
use crate::metrics::Metrics;
use crate::reply;

/// Why a gateway could not be built, or a reload was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The key set was refused (empty, malformed or duplicate secret).
    #[error("keys: {0}")]
    Keys(#[from] proxypal_keypool::PoolError),
    /// A key cannot go into an HTTP header.
    #[error("keys[{index}]: {source}")]
    KeyHeader {
        /// Position of the key.
        index: usize,
        /// What is wrong (never contains the key).
        source: proxypal_upstream::InvalidKey,
    },
    /// A key's rate limit is invalid.
    #[error("{field}: {source}")]
    Quota {
        /// Where, e.g. `keys[2]`.
        field: String,
        /// What is wrong.
        source: proxypal_limiter::QuotaError,
    },
}

/// Everything a [`Gateway`] is built from. [`Default`] is the product's
/// default behaviour (no keys); the server's configuration file maps onto it
/// field by field.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// The upstream API keys, in round-robin order (names and per-key rate
    /// overrides included).
    pub keys: Vec<KeySpec>,
    /// Each key's limit unless its spec overrides `requests_per_minute` or
    /// `burst` (default: 40 per minute, burst 1, 500 ms margin).
    pub default_quota: KeyQuota,
    /// How long keys rest after failures.
    pub cooldowns: CooldownPolicy,
    /// Upstream attempts per client request, each on another key
    /// (1..=[`MAX_ATTEMPTS`]; default 3).
    pub max_attempts: usize,
    /// How long a request may wait for a key with capacity (default 30 s).
    pub queue_timeout: Duration,
    /// Largest request body accepted (default 32 MiB).
    pub max_body_bytes: usize,
    /// Most requests served at once; a stream counts until it ends (default
    /// 1024). Fixed at build time.
    pub max_inflight: usize,
    /// Tokens clients must present as `Authorization: Bearer <token>`; none
    /// means every client is served.
    pub client_tokens: Vec<Secret>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            default_quota: KeyQuota::default(),
            cooldowns: CooldownPolicy::default(),
            max_attempts: 3,
            queue_timeout: Duration::from_secs(30),
            max_body_bytes: 32 * 1024 * 1024,
            max_inflight: 1024,
            client_tokens: Vec::new(),
        }
    }
}

impl GatewayConfig {
    /// The defaults with these keys.
    pub fn with_keys(keys: impl IntoIterator<Item = KeySpec>) -> Self {
        Self { keys: keys.into_iter().collect(), ..Self::default() }
    }
}

/// The settings a reload may change, read once per request.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) max_attempts: usize,
    pub(crate) queue_timeout: Duration,
    pub(crate) max_body_bytes: usize,
    pub(crate) tokens: ClientTokens,
    pub(crate) default_quota: KeyQuota,
}

impl Settings {
    fn from_config(config: &GatewayConfig) -> Self {
        Self {
            max_attempts: config.max_attempts.clamp(1, MAX_ATTEMPTS),
            queue_timeout: config.queue_timeout,
            max_body_bytes: config.max_body_bytes,
            tokens: ClientTokens::new(&config.client_tokens),
            default_quota: config.default_quota,
        }
    }
}

/// One key as `/stats` shows it: its snapshot and the permits it has now.
#[derive(Debug, Clone)]
pub struct KeyReport {
    /// State, counters, label, name, rate override.
    pub snapshot: KeySnapshot,
    /// Permits the key could take right now, back to back.
    pub permits_available: u32,
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
        Self::build(config, registry, KeyPool::builder(), |quotas| Arc::new(GovernorLimiter::new(quotas)))
    }

    /// [`new`](Self::new) with the pool's clock and the limiter chosen by the
    /// caller (tests drive both from Tokio's paused clock).
    pub(crate) fn build(
        config: GatewayConfig,
        registry: &mut Registry,
        pool: KeyPoolBuilder,
        limiter: impl FnOnce(Vec<KeyQuota>) -> Arc<dyn RateLimit>,
    ) -> Result<Arc<Self>, BuildError> {
        let metrics = Metrics::register(registry);
        let settings = Settings::from_config(&config);
        let keys = keyset::build(
            pool.policy(config.cooldowns),
            config.keys,
            config.default_quota,
            &metrics,
            limiter,
        )?;
        Ok(Arc::new(Self {
            keys,
            queue: LeaseQueue::new(),
            admission: Admission::new(config.max_inflight),
            settings: ArcSwap::from_pointee(settings),
            metrics,
        }))
    }

    /// Applies a new config's keys, quotas and request settings while requests
    /// go on. Keys that stay keep their counters, cooldowns and spent permits.
    /// `max_inflight` and `cooldowns` keep their values from [`new`](Self::new).
    ///
    /// # Errors
    /// The new key set or a quota is refused; the old ones keep serving.
    pub fn reload(&self, config: GatewayConfig) -> Result<ReloadReport, BuildError> {
        let settings = Settings::from_config(&config);
        let report = keyset::reload(&self.keys, config.keys, config.default_quota, &self.metrics)?;
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

    /// Current reloadable settings. An owned `Arc`, not an `arc_swap` guard:
    /// a request keeps it across `.await`s while it reads its body.
    pub(crate) fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// The client behind a request's `Authorization: Bearer <token>`, or
    /// `None` when tokens are required and it presents none of them. For
    /// endpoints an embedder serves beside the gateway (the server's `/stats`).
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Option<Client> {
        self.settings.load().tokens.authenticate(headers)
    }

    /// Every key with its state and available permits, in key-set order.
    pub fn key_reports(&self) -> Vec<KeyReport> {
        let snapshot = self.keys.snapshot();
        let permits: Vec<u32> = self.keys.with_current(|keys, resources| {
            (0..keys.len()).map(|i| resources.limiter.remaining(i)).collect()
        });
        snapshot
            .into_iter()
            .map(|s| KeyReport { permits_available: permits.get(s.index).copied().unwrap_or(0), snapshot: s })
            .collect()
    }

    /// Requests waiting for a permit now.
    pub fn queue_depth(&self) -> usize {
        self.queue.depth()
    }

    /// Requests being served now (streams count until they end).
    pub fn in_flight(&self) -> usize {
        self.admission.in_flight()
    }

    /// The default quota in effect (after the last reload).
    pub fn default_quota(&self) -> KeyQuota {
        self.settings.load().default_quota
    }

    /// Sets the gauges that describe the state now (queue depth, requests in
    /// flight, keys by state); call it before encoding the registry.
    pub fn refresh_gauges(&self) {
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

/// The path and query after `/v1` (`/v1/chat/completions?x` → `/chat/completions?x`),
/// or `None` for a path outside `/v1`.
fn rest_of_path(uri: &http::Uri) -> Option<String> {
    let path = uri.path();
    if path != "/v1" && !path.starts_with("/v1/") {
        return None;
    }
    Some(uri.path_and_query().map_or("", |pq| pq.as_str()).get(3..).unwrap_or("").to_owned())
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
    /// The future is `Send` when `B` is.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<ProxyBody>
    where
        B: Body,
        B::Error: Into<BoxError>,
    {
        let Some(rest) = rest_of_path(req.uri()) else {
            return reply::not_found(req.uri().path());
        };
        let Some(slot) = self.gateway.admission.admit() else {
            return reply::overloaded();
        };
        crate::failover::forward(&self.gateway, &self.upstream, req, rest, slot).await
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
