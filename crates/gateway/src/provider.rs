//! One upstream provider as the gateway runs it: its key pool (with the
//! quota engine's budgets), where it is, how it speaks about limits, and what
//! its requests must not carry. A reload keeps the pool of a provider that
//! stays (its keys keep their state) and builds the rest anew.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use proxypal_keypool::KeyPool;
use proxypal_upstream::{Upstream, UpstreamConfig};

use crate::config::{Auth, ProviderConfig};
use crate::dialect::Dialect;
use crate::keyset::KeyResources;
use crate::lease::LeaseQueue;
use crate::quota::PoolHeaders;

/// Identities of upstream client settings, so that a worker's cached client
/// is rebuilt when a reload changes a provider's base URL or timeouts.
static NEXT_CLIENT_ID: AtomicU64 = AtomicU64::new(1);

/// One provider: its keys and what requests to it need.
pub struct Provider {
    name: Arc<str>,
    preset: Option<&'static str>,
    /// Shared with the next generation when a reload keeps the provider.
    pub(crate) keys: Arc<KeyPool<KeyResources>>,
    pub(crate) upstream: UpstreamConfig,
    /// Which upstream settings these are (see [`NEXT_CLIENT_ID`]).
    pub(crate) client_id: u64,
    /// A client for work off the request path (the models catalog).
    pub(crate) client: Upstream,
    pub(crate) auth: Auth,
    pub(crate) dialect: Dialect,
    pub(crate) strip: Box<[Box<str>]>,
    /// Ask for usage in streams the client did not ask it for.
    pub(crate) stream_usage: bool,
    /// Its keys' `x-ratelimit-*` response headers, summed now and then.
    pub(crate) pool_headers: Arc<ArcSwap<PoolHeaders>>,
    /// Requests for this provider alone wait here, first come first served
    /// (an alias waits in its own queue): a full provider never holds back
    /// requests for another that has room.
    pub(crate) queue: Arc<LeaseQueue>,
    /// The last model sent here as it was named and its `x-proxypal-route`
    /// value: clients name one model nearly always, so a repeat costs a lock
    /// and a comparison, not a format and a header validation. Held for that
    /// only, never across an `.await`.
    last_route: std::sync::Mutex<Option<(Box<str>, http::HeaderValue)>>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("preset", &self.preset)
            .field("base_url", &self.upstream.base_url)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// A provider's upstream client and its identity (see [`NEXT_CLIENT_ID`]).
pub(crate) type Client = (u64, Upstream);

impl Provider {
    /// The client of a provider configured as `config`: `previous`'s when
    /// nothing about it changed, else a new one (the only fallible step of
    /// making a provider, so a reload does it for every provider first).
    pub(crate) fn client(
        config: &ProviderConfig,
        previous: Option<&Provider>,
    ) -> Result<Client, proxypal_upstream::UpstreamBuildError> {
        match previous.filter(|p| same_upstream(&p.upstream, &config.upstream)) {
            Some(p) => Ok((p.client_id, p.client.clone())),
            None => {
                Ok((NEXT_CLIENT_ID.fetch_add(1, Ordering::Relaxed), Upstream::new(config.upstream.clone())?))
            }
        }
    }

    /// A provider from `config` over `keys` with `client`; `previous`: the
    /// same provider in the generation before (its queue and pool headers
    /// carry over, like its keys).
    pub(crate) fn new(
        config: &ProviderConfig,
        keys: Arc<KeyPool<KeyResources>>,
        previous: Option<&Provider>,
        (client_id, client): Client,
    ) -> Self {
        let pool_headers = match previous {
            Some(p) => Arc::clone(&p.pool_headers),
            None => Arc::new(ArcSwap::from_pointee(PoolHeaders::empty())),
        };
        let queue = match previous {
            Some(p) => Arc::clone(&p.queue),
            None => Arc::new(LeaseQueue::new()),
        };
        Self {
            name: Arc::from(config.name.as_str()),
            preset: config.preset,
            keys,
            upstream: config.upstream.clone(),
            client_id,
            client,
            auth: config.auth,
            dialect: config.dialect,
            strip: config.strip.iter().map(|s| s.as_str().into()).collect(),
            stream_usage: config.stream_usage,
            pool_headers,
            queue,
            last_route: std::sync::Mutex::new(None),
        }
    }

    /// `x-proxypal-route` for `model` sent to this provider:
    /// `<provider>/<model>`, or `<provider>` for a request naming none.
    pub(crate) fn route_header(&self, model: &str) -> http::HeaderValue {
        let mut last = self.last_route.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, value)) = last.as_ref().filter(|(m, _)| **m == *model) {
            return value.clone();
        }
        let value = if model.is_empty() {
            http::HeaderValue::from_str(&self.name)
        } else {
            http::HeaderValue::from_str(&format!("{}/{model}", self.name))
        }
        .unwrap_or_else(|_| http::HeaderValue::from_static("-"));
        *last = Some((model.into(), value.clone()));
        value
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name as a shared string.
    pub(crate) fn name_arc(&self) -> &Arc<str> {
        &self.name
    }

    /// The preset it was filled from.
    pub fn preset(&self) -> Option<&'static str> {
        self.preset
    }

    /// Its base URL.
    pub fn base_url(&self) -> &http::Uri {
        &self.upstream.base_url
    }

    /// Whether its requests carry no key.
    pub fn without_auth(&self) -> bool {
        self.auth == Auth::None
    }

    /// How it announces limits.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Its key pool.
    pub fn keys(&self) -> &KeyPool<KeyResources> {
        &self.keys
    }

    /// The quota engine of its current key set.
    pub fn quotas(&self) -> Arc<crate::Engine> {
        self.keys.with_current(|_, resources| Arc::clone(&resources.quotas))
    }
}

/// Whether two upstream settings make the same client.
fn same_upstream(a: &UpstreamConfig, b: &UpstreamConfig) -> bool {
    a.base_url == b.base_url
        && a.connect_timeout == b.connect_timeout
        && a.response_timeout == b.response_timeout
        && a.idle_timeout == b.idle_timeout
        && a.user_agent == b.user_agent
        && a.pool_idle_timeout == b.pool_idle_timeout
        && a.pool_max_idle_per_host == b.pool_max_idle_per_host
        && a.http2_keep_alive_interval == b.http2_keep_alive_interval
        && a.extra_root_certificates == b.extra_root_certificates
}

/// One worker's upstream clients, one per provider (each runtime keeps its
/// own connections), made on first use and remade when a reload changes a
/// provider's settings.
#[derive(Debug, Default)]
pub(crate) struct Clients {
    /// By client id. The lock is held for a lookup or an insert, never across
    /// an `.await`.
    cache: std::sync::Mutex<Vec<(u64, Upstream)>>,
}

impl Clients {
    /// The client for `provider` on this worker.
    pub(crate) fn get(&self, provider: &Provider) -> Upstream {
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, client)) = cache.iter().find(|(id, _)| *id == provider.client_id) {
            return client.clone();
        }
        // The provider's own client was built from the same settings, so this
        // cannot fail; if it somehow did, the shared client still works.
        let client = Upstream::new(provider.upstream.clone()).unwrap_or_else(|_| provider.client.clone());
        if cache.len() >= 4 * crate::config::MAX_PROVIDERS {
            cache.clear(); // settings replaced by many reloads: start over
        }
        cache.push((provider.client_id, client.clone()));
        client
    }
}
