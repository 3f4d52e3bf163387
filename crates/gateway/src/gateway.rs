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
use proxypal_limiter::{LimitReport, SystemClock};

use crate::admission::{Admission, Client};
use crate::body::{BoxError, ProxyBody};
use crate::catalog::{CatalogReport, Catalogs};
use crate::config::{GatewayConfig, Settings};
use crate::failover::{self, Shared};
use crate::keyset::{self, BuildError, Plan, SharedClock};
use crate::lease::LeaseQueue;
use crate::metrics::Metrics;
use crate::provider::{Clients, Provider};
use crate::replicas::SharedQuota;
use crate::route::Routes;

/// One key as `/stats` shows it: its snapshot, provider, account and limits now.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct KeyReport {
    /// The provider it belongs to.
    pub provider: String,
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

/// One named client as `/stats` shows it: its settings, its own quota's
/// windows with their use, and its requests waiting now.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ClientReport {
    /// Its name.
    pub name: String,
    /// Its share of the pool when clients compete.
    pub weight: u32,
    /// May read everyone's usage and use the operator endpoints.
    pub admin: bool,
    /// Public models it may use (globs; empty: every model).
    pub models: Vec<String>,
    /// Every window (and concurrency cap) of its own quota, with its use.
    pub limits: Vec<LimitReport>,
    /// Its requests waiting for a permit now, in every queue.
    pub queued: usize,
    /// Requests refused by its own quota since the gateway started.
    pub refused: u64,
}

/// Who is calling, as the endpoints beside the gateway need to know.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Caller {
    /// The client.
    pub client: Client,
    /// Its name, for a named client.
    pub name: Option<String>,
    /// An operator: an operator token, an admin client, or anyone when no
    /// token is configured. Operators read every usage row, `/stats`,
    /// `/metrics` and `/admin/*`.
    pub operator: bool,
}

/// One alias as `/stats` shows it: its targets, in tier order, with their state.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AliasReport {
    /// The public model name.
    pub name: String,
    /// Its targets.
    pub targets: Vec<TargetReport>,
}

/// One target of an alias, now.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct TargetReport {
    /// The provider.
    pub provider: String,
    /// The model id sent to it.
    pub model: String,
    /// Its tier.
    pub tier: u32,
    /// Its weight within the tier.
    pub weight: u32,
    /// Requests its provider's keys could send right now, together.
    pub room: u64,
    /// Keys of the provider that are usable (not cooling down, not disabled).
    pub keys_ready: usize,
    /// The provider's catalog was fetched and does not list the model.
    pub missing_from_catalog: bool,
}

/// The `/v1` pipeline's shared state: providers with their keys and limits,
/// routes, the lease queue, admission, settings and metrics. One per process
/// (or per embedding); every worker's [`Handle`] points at it.
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
/// assert_eq!(gateway.providers()[0].name(), "default");
/// assert_eq!(gateway.in_flight(), 0);
/// # Ok(()) }
/// ```
pub struct Gateway {
    queue: LeaseQueue,
    admission: Admission,
    /// Settings, providers and routes of one generation, swapped whole on reload.
    settings: ArcSwap<Settings>,
    metrics: Metrics,
    /// One reload at a time, so keys and settings always come from one config.
    reloading: std::sync::Mutex<()>,
    /// How new providers' pools are built (cooldowns, clock).
    pools: KeyPoolBuilder,
    clock: SharedClock,
    catalogs: Arc<Catalogs>,
    reloads: std::sync::atomic::AtomicU64,
    /// The link to the quota shared with other replicas, if configured.
    replicas: Option<Arc<SharedQuota>>,
    /// Where finished requests are recorded (the usage ledger), once set.
    sink: std::sync::OnceLock<Arc<dyn crate::usage::UsageSink>>,
    /// The response cache, once set.
    cache: std::sync::OnceLock<Arc<crate::cache::ResponseCache>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("providers", &self.settings.load().providers).finish_non_exhaustive()
    }
}

/// Plans every provider's key set, naming the provider in errors.
fn plans(config: &GatewayConfig) -> Result<Vec<Plan>, BuildError> {
    let count = config.providers.len();
    config.providers.iter().map(|p| Plan::new(p).map_err(|e| e.in_provider(&p.name, count))).collect()
}

/// The clients of `config`, carrying the windows of `previous`'s that stay.
fn client_set(
    config: &GatewayConfig,
    clock: SharedClock,
    previous: Option<&crate::clients::ClientSet>,
) -> Result<crate::clients::ClientSet, BuildError> {
    crate::clients::ClientSet::new(&config.client_tokens, &config.clients, clock, previous)
        .map_err(|e| BuildError::Limits { scope: format!("clients[{}]", e.index), source: e.error })
}

/// # Building and reloading
impl Gateway {
    /// Builds the gateway, registering its metrics in `registry`.
    ///
    /// # Errors
    /// A key set, quota, upstream or route that cannot be used; the error
    /// names the provider, key or field.
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
        let routes = Routes::new(&config)?;
        let plans = plans(&config)?;
        let metrics = Metrics::register(registry);
        let pools = pool.policy(config.cooldowns);
        let count = config.providers.len();
        let mut providers = Vec::with_capacity(count);
        for (p, plan) in config.providers.iter().zip(plans) {
            let client =
                Provider::client(p, None).map_err(|e| BuildError::from(e).in_provider(&p.name, count))?;
            let keys = keyset::build(pools.clone(), &p.name, plan, &metrics, Arc::clone(&clock))
                .map_err(|e| e.in_provider(&p.name, count))?;
            providers.push(Arc::new(Provider::new(p, Arc::new(keys), None, client)));
        }
        let clients = client_set(&config, Arc::clone(&clock), None)?;
        let settings = Settings::new(&config, providers.into(), routes, clients);
        let replicas =
            config.shared.clone().map(|c| Arc::new(SharedQuota::new(c, Arc::clone(&clock), registry)));
        Ok(Arc::new(Self {
            replicas,
            queue: LeaseQueue::new(),
            admission: Admission::new(config.max_inflight),
            settings: ArcSwap::from_pointee(settings),
            metrics,
            reloading: std::sync::Mutex::new(()),
            pools,
            clock,
            catalogs: Arc::new(Catalogs::new()),
            reloads: std::sync::atomic::AtomicU64::new(0),
            sink: std::sync::OnceLock::new(),
            cache: std::sync::OnceLock::new(),
        }))
    }

    /// Applies a new config's providers, keys, quotas, routes and request
    /// settings while requests go on. Providers that stay (by name) keep
    /// their keys' counters, cooldowns and spent permits. `max_inflight` and
    /// `cooldowns` keep their values from [`new`](Self::new).
    ///
    /// # Errors
    /// The new config is refused as a whole; the old one keeps serving.
    pub fn reload(&self, config: GatewayConfig) -> Result<ReloadReport, BuildError> {
        // Held only for this synchronous swap, never across an `.await`.
        let _one_at_a_time = self.reloading.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = self.settings.load_full();
        let routes = Routes::new(&config)?;
        let plans = plans(&config)?;
        let count = config.providers.len();
        let client_set = client_set(&config, Arc::clone(&self.clock), Some(&old.tokens))?;
        let previous = |name: &str| old.providers.iter().find(|o| o.name() == name);
        // Every fallible step first (plans checked the keys as the pools will):
        // once a pool reloads, there is no going back.
        let mut clients = Vec::with_capacity(count);
        for p in &config.providers {
            clients.push(
                Provider::client(p, previous(&p.name).map(|p| &**p))
                    .map_err(|e| BuildError::from(e).in_provider(&p.name, count))?,
            );
        }
        let mut report = ReloadReport { previous_index: Vec::new(), added: 0, kept: 0, removed: 0 };
        let mut providers = Vec::with_capacity(count);
        for ((p, plan), client) in config.providers.iter().zip(plans).zip(clients) {
            let previous = previous(&p.name);
            let keys = match previous {
                Some(prev) => {
                    let r = keyset::reload(&prev.keys, &p.name, plan, &self.metrics)
                        .map_err(|e| e.in_provider(&p.name, count))?;
                    report.previous_index.extend(r.previous_index);
                    report.added += r.added;
                    report.removed += r.removed;
                    report.kept += r.kept;
                    Arc::clone(&prev.keys)
                }
                None => {
                    let keys = keyset::build(
                        self.pools.clone(),
                        &p.name,
                        plan,
                        &self.metrics,
                        Arc::clone(&self.clock),
                    )
                    .map_err(|e| e.in_provider(&p.name, count))?;
                    report.previous_index.extend(std::iter::repeat_n(None, keys.len()));
                    report.added += keys.len();
                    Arc::new(keys)
                }
            };
            providers.push(Arc::new(Provider::new(p, keys, previous.map(|p| &**p), client)));
        }
        for gone in old.providers.iter().filter(|o| !config.providers.iter().any(|p| p.name == o.name())) {
            report.removed += gone.keys.len();
        }
        self.settings.store(Arc::new(Settings::new(&config, providers.into(), routes, client_set)));
        self.reloads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(report)
    }
}

/// # Reading the state
impl Gateway {
    /// The providers now, in configuration order.
    pub fn providers(&self) -> Vec<Arc<Provider>> {
        self.settings.load().providers.to_vec()
    }

    /// The first provider's key pool (tests of single-provider behaviour).
    #[cfg(test)]
    pub(crate) fn test_keys(&self) -> Arc<KeyPool<crate::keyset::KeyResources>> {
        Arc::clone(&self.settings.load().providers[0].keys)
    }

    /// The settings of the current generation.
    pub(crate) fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// The provider called `name`.
    pub fn provider(&self, name: &str) -> Option<Arc<Provider>> {
        self.settings.load().providers.iter().find(|p| p.name() == name).cloned()
    }

    /// The link to the quota shared with other replicas (`shared:`), if
    /// configured: spawn its [`run`](SharedQuota::run) to keep it going.
    pub fn shared_quota(&self) -> Option<&Arc<SharedQuota>> {
        self.replicas.as_ref()
    }

    /// Records every finished request in `sink` from now on (the usage
    /// ledger). Set once; `false` if a sink was set already.
    pub fn set_usage_sink(&self, sink: Arc<dyn crate::usage::UsageSink>) -> bool {
        self.sink.set(sink).is_ok()
    }

    /// Answers repeated requests from `cache` from now on (see
    /// [`ResponseCache`](crate::cache::ResponseCache)). Set once; `false` if
    /// a cache was set already.
    pub fn set_cache(&self, cache: Arc<crate::cache::ResponseCache>) -> bool {
        self.cache.set(cache).is_ok()
    }

    /// The response cache, if one was set.
    pub fn cache(&self) -> Option<&Arc<crate::cache::ResponseCache>> {
        self.cache.get()
    }

    /// Reloads applied since the gateway was built.
    pub fn reloads(&self) -> u64 {
        self.reloads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A lease queue of the gateway's own, for embedders leasing keys
    /// themselves (requests wait in their provider's or alias's queue).
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

    /// Who sent `headers` (`Authorization: Bearer <token>`): the client, its
    /// name and whether it is an operator; `None` when tokens are required
    /// and it presents none of them.
    pub fn caller(&self, headers: &http::HeaderMap) -> Option<Caller> {
        let settings = self.settings.load();
        let client = settings.tokens.authenticate(headers)?;
        let named = settings.tokens.named(client);
        Some(Caller {
            client,
            name: named.map(|n| n.name.to_string()),
            operator: named.is_none_or(|n| n.admin),
        })
    }

    /// Every named client with its quota's use and its waiting requests, in
    /// configuration order.
    pub fn client_reports(&self) -> Vec<ClientReport> {
        let settings = self.settings.load();
        let queued = self.queued_by_client();
        settings
            .tokens
            .all()
            .iter()
            .enumerate()
            .map(|(i, n)| ClientReport {
                name: n.name.to_string(),
                weight: n.waiter.weight,
                admin: n.admin,
                models: n.models.to_vec(),
                limits: if n.limited { settings.tokens.quotas().report(i) } else { Vec::new() },
                queued: queued.iter().find(|(c, _)| *c == *n.name).map_or(0, |(_, q)| *q),
                refused: n.refused.load(std::sync::atomic::Ordering::Relaxed),
            })
            .collect()
    }

    /// Requests waiting now by client (`""`: anonymous requests and
    /// operators), summed over every queue; clients with none are absent.
    pub fn queued_by_client(&self) -> Vec<(String, usize)> {
        let settings = self.settings.load();
        let mut out: Vec<(String, usize)> = Vec::new();
        let mut add = |client: &str, n: usize| match out.iter_mut().find(|(c, _)| c == client) {
            Some((_, total)) => *total += n,
            None => out.push((client.to_owned(), n)),
        };
        self.queue.depth_by_client(&mut add);
        for p in settings.providers.iter() {
            p.queue.depth_by_client(&mut add);
        }
        for a in settings.routes.aliases() {
            a.queue.depth_by_client(&mut add);
        }
        out
    }

    /// Every key of every provider with its state, account and limits, in
    /// provider and key-set order.
    pub fn key_reports(&self) -> Vec<KeyReport> {
        let mut out = Vec::new();
        for provider in self.settings.load().providers.iter() {
            let snapshot = provider.keys.snapshot();
            provider.keys.with_current(|_, resources| {
                let quotas = &resources.quotas;
                out.extend(snapshot.into_iter().map(|s| {
                    let i = s.index;
                    KeyReport {
                        provider: provider.name().to_owned(),
                        permits_available: u32::try_from(quotas.remaining_requests(i)).unwrap_or(u32::MAX),
                        account: quotas.account(i).map(str::to_owned),
                        limits: quotas.report(i),
                        blocked_for: quotas.blocked_for(i),
                        snapshot: s,
                    }
                }));
            });
        }
        out
    }

    /// Every alias with its targets' state, by name.
    pub fn alias_reports(&self) -> Vec<AliasReport> {
        let settings = self.settings.load();
        let mut out: Vec<AliasReport> = settings
            .routes
            .aliases()
            .map(|alias| AliasReport {
                name: alias.name.to_string(),
                targets: alias
                    .targets
                    .iter()
                    .filter_map(|t| {
                        let p = settings.providers.get(t.provider)?;
                        let model = t.model.as_deref().unwrap_or_default();
                        let room = p.keys.with_current(|keys, r| {
                            (0..keys.len())
                                .map(|i| r.quotas.remaining_requests(i))
                                .fold(0u64, u64::saturating_add)
                        });
                        let ready = p.keys.snapshot().iter().filter(|k| k.status == KeyStatus::Ready).count();
                        Some(TargetReport {
                            provider: p.name().to_owned(),
                            model: model.to_owned(),
                            tier: t.tier,
                            weight: t.weight,
                            room,
                            keys_ready: ready,
                            missing_from_catalog: self.catalogs.lacks(p.name(), model),
                        })
                    })
                    .collect(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Each provider's models catalog: size, age, last error.
    pub fn catalog_reports(&self) -> Vec<CatalogReport> {
        self.catalogs.reports(&self.settings.load())
    }

    /// Clears the cooldown, the disabled state and what was learned from the
    /// upstream for the key named `name` (its configured name, or its masked
    /// label such as `nvapi-…wxyz`), in whichever provider has it. Its
    /// windows keep what they counted: a reset never makes room the upstream
    /// would refuse. `false` when no key has that name.
    pub fn reset_key(&self, name: &str) -> bool {
        for provider in self.settings.load().providers.iter() {
            let found = provider.keys.with_current(|keys, resources| {
                let index = keys.iter().position(|k| k.name() == Some(name) || k.label() == name)?;
                resources.quotas.forget_learned(index);
                Some(index)
            });
            if let Some(index) = found {
                if let Some(link) = &self.replicas {
                    link.enabled(provider, index); // for every replica
                }
                return provider.keys.enable(index);
            }
        }
        false
    }

    /// The quota engine of the default provider's current key set (for
    /// its clock and pool-wide sums); see [`Provider::quotas`] for the others.
    pub fn quotas(&self) -> Arc<crate::keyset::Engine> {
        let settings = self.settings.load();
        let provider = settings.providers.get(settings.routes.default).or(settings.providers.first());
        match provider {
            Some(p) => p.quotas(),
            // A gateway has at least one provider (checked when built).
            None => Arc::new(proxypal_limiter::QuotaEngine::new([], Arc::clone(&self.clock))),
        }
    }

    /// Requests waiting for a permit now, in every queue (each provider's,
    /// each alias's, and [`queue`](Self::queue)).
    pub fn queue_depth(&self) -> usize {
        let settings = self.settings.load();
        let providers: usize = settings.providers.iter().map(|p| p.queue.depth()).sum();
        let aliases: usize = settings.routes.aliases().map(|a| a.queue.depth()).sum();
        self.queue.depth() + providers + aliases
    }

    /// Requests being served now (streams count until they end).
    pub fn in_flight(&self) -> usize {
        self.admission.in_flight()
    }

    /// Sets the gauges that describe the state now (queue depth, requests in
    /// flight, keys by provider and state); call it before encoding the registry.
    pub fn refresh_gauges(&self) {
        if let Some(link) = &self.replicas {
            link.report();
        }
        for report in self.key_reports() {
            self.metrics.set_limits(&report.provider, &report.snapshot.label, &report.limits);
        }
        let mut states = Vec::new();
        for provider in self.settings.load().providers.iter() {
            let snapshot = provider.keys.snapshot();
            let count = |f: fn(&KeyStatus) -> bool| snapshot.iter().filter(|k| f(&k.status)).count();
            states.push((
                Arc::clone(provider.name_arc()),
                [
                    ("ready", count(|s| *s == KeyStatus::Ready)),
                    ("cooling_down", count(|s| matches!(s, KeyStatus::CoolingDown { .. }))),
                    ("disabled", count(|s| *s == KeyStatus::Disabled)),
                ],
            ));
        }
        self.metrics.set_gauges(self.queue_depth(), self.in_flight(), &states);
        let clients: Vec<(String, Vec<LimitReport>)> =
            self.client_reports().into_iter().map(|c| (c.name, c.limits)).collect();
        self.metrics.set_clients(&self.queued_by_client(), &clients);
    }
}

/// A worker's way into a [`Gateway`]: the shared state plus the worker's own
/// upstream client (its own connections). Cheap to clone: clone it into each
/// connection's service.
#[derive(Debug, Clone)]
pub struct Handle {
    gateway: Arc<Gateway>,
    /// This worker's upstream clients, one per provider, made on first use.
    clients: Arc<Clients>,
}

impl Handle {
    /// A worker's way into `gateway`, with its own upstream connections
    /// (made on first use, on the runtime that first sends to a provider:
    /// give each runtime its own handle, and clone it within one).
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway, clients: Arc::new(Clients::default()) }
    }

    /// Fetches every models catalog that is due (never fetched, older than
    /// `routing.models_ttl`), and waits for them. The server calls it at
    /// start and then now and then, so that `GET /v1/models` finds them
    /// fresh; a listing also starts a fetch of stale ones in the background.
    pub async fn refresh_models(&self) {
        let settings = self.gateway.settings.load_full();
        self.gateway.catalogs.refresh(&settings, &self.clients).await;
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
        let shared = Shared {
            queue: &gw.queue,
            admission: &gw.admission,
            settings: &gw.settings,
            metrics: &gw.metrics,
            clients: &self.clients,
            catalogs: &gw.catalogs,
            replicas: gw.replicas.as_deref(),
            sink: gw.sink.get(),
            cache: gw.cache.get(),
        };
        if crate::messages::is_messages(req.uri().path()) {
            // Anthropic's Messages API: translated around the same pipeline (boxed: not
            // the OpenAI path's future size).
            return Dispatch::Messages { future: Box::pin(crate::messages::serve(shared, req)) };
        }
        Dispatch::Chat { future: failover::forward(shared, req) }
    }

    /// This handle as a boxed `Service` (hyper's and tower's).
    pub fn into_service(self) -> GatewayService {
        GatewayService(Arc::new(self))
    }
}

pin_project_lite::pin_project! {
    /// [`Handle::handle`]'s future: the OpenAI pipeline's, or the Messages
    /// API's around it.
    #[project = DispatchProj]
    enum Dispatch<C, M> {
        Chat { #[pin] future: C },
        Messages { #[pin] future: M },
    }
}

impl<C, M> Future for Dispatch<C, M>
where
    C: Future<Output = Response<ProxyBody>>,
    M: Future<Output = Response<ProxyBody>>,
{
    type Output = Response<ProxyBody>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.project() {
            DispatchProj::Chat { future } => future.poll(cx),
            DispatchProj::Messages { future } => future.poll(cx),
        }
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
