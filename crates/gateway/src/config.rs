//! What a [`Gateway`](crate::Gateway) is built from ([`GatewayConfig`]), and
//! the part of it a reload may change, read once per request.

use std::collections::BTreeMap;
use std::time::Duration;

use proxypal_keypool::{CooldownPolicy, KeySpec, Secret};
use proxypal_limiter::Limits;
use proxypal_upstream::UpstreamConfig;

use crate::dialect::Dialect;
use crate::lease::MAX_ATTEMPTS;
use crate::preset::{Preset, QuotaScope};

/// Everything a [`Gateway`](crate::Gateway) is built from. [`Default`] is the product's
/// default behaviour (one NVIDIA provider named `default`, no keys); the
/// server's configuration file maps onto it field by field.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// The upstream providers, each with its keys and limits (at least one,
    /// at most [`MAX_PROVIDERS`]).
    pub providers: Vec<ProviderConfig>,
    /// Public model names (aliases) and the targets that serve them.
    pub models: BTreeMap<String, AliasConfig>,
    /// Where names that are no alias go, and the models list.
    pub routing: RoutingConfig,
    /// How long keys rest after failures.
    pub cooldowns: CooldownPolicy,
    /// Upstream attempts per client request, across every key and target
    /// (1..=[`MAX_ATTEMPTS`]; default 3).
    pub max_attempts: usize,
    /// How long a request may wait for a key with capacity (default 30 s).
    pub queue_timeout: Duration,
    /// Largest request body accepted (default 32 MiB).
    pub max_body_bytes: usize,
    /// Most requests served at once; a stream counts until it ends (default
    /// 1024). Fixed at build time.
    pub max_inflight: usize,
    /// Operator tokens: clients presenting one as `Authorization: Bearer
    /// <token>` are served anonymously, with no quota of their own, and may
    /// read everything. With no operator token and no named client, every
    /// client is served.
    pub client_tokens: Vec<Secret>,
    /// Named clients, each with its token, quota, model list and weight.
    pub clients: Vec<crate::clients::ClientConfig>,
    /// Quotas shared with other replicas through Redis (`None`: this
    /// process counts alone). Read at build; a reload keeps the first.
    pub shared: Option<crate::replicas::SharedQuotaConfig>,
}

/// Most providers one gateway routes to.
pub const MAX_PROVIDERS: usize = 64;

/// Most targets one alias has.
pub const MAX_TARGETS: usize = 64;

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            providers: vec![ProviderConfig::new(DEFAULT_PROVIDER)],
            models: BTreeMap::new(),
            routing: RoutingConfig::default(),
            cooldowns: CooldownPolicy::default(),
            max_attempts: 3,
            queue_timeout: Duration::from_secs(30),
            max_body_bytes: 32 * 1024 * 1024,
            max_inflight: 1024,
            client_tokens: Vec::new(),
            clients: Vec::new(),
            shared: None,
        }
    }
}

/// The name of the provider a single-provider configuration makes.
pub const DEFAULT_PROVIDER: &str = "default";

impl GatewayConfig {
    /// The defaults with these keys on the one provider, `default` (NVIDIA's
    /// API, 40 requests in any rolling minute per key).
    pub fn with_keys<K: Into<KeyConfig>>(keys: impl IntoIterator<Item = K>) -> Self {
        let mut config = Self::default();
        config.providers[0].keys = keys.into_iter().map(Into::into).collect();
        config
    }

    /// The defaults with these providers (and no aliases: every model name
    /// goes to the first provider unless it is `provider/model`).
    pub fn with_providers(providers: impl IntoIterator<Item = ProviderConfig>) -> Self {
        Self { providers: providers.into_iter().collect(), ..Self::default() }
    }

    /// The provider called `name`.
    pub fn provider_mut(&mut self, name: &str) -> Option<&mut ProviderConfig> {
        self.providers.iter_mut().find(|p| p.name == name)
    }

    /// Checks that the limits make budgets and the routes name real
    /// providers (as [`Gateway::new`](crate::Gateway::new) would), without
    /// building anything.
    ///
    /// # Errors
    /// [`BuildError::Limits`](crate::BuildError::Limits) naming the field,
    /// [`BuildError::AboveAccount`](crate::BuildError::AboveAccount) or
    /// [`BuildError::Routes`](crate::BuildError::Routes).
    pub fn check_limits(&self) -> Result<(), crate::BuildError> {
        for provider in &self.providers {
            crate::keyset::Plan::new(provider)
                .map_err(|e| e.in_provider(&provider.name, self.providers.len()))?;
        }
        crate::route::Routes::new(self).map(drop)
    }
}

/// How a provider's requests are authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Auth {
    /// `Authorization: Bearer <key>`, a key from the pool per request.
    #[default]
    Bearer,
    /// No credentials (a local server): the provider needs no keys.
    None,
}

/// One upstream provider: where it is, its keys, their limits, and how it
/// speaks about limits.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ProviderConfig {
    /// Its name: in routes (`groq/llama-…`), stats, metrics and logs.
    pub name: String,
    /// The preset it was filled from, if any (for reports).
    pub preset: Option<&'static str>,
    /// Its base URL, timeouts and TLS.
    pub upstream: UpstreamConfig,
    /// Bearer keys, or none.
    pub auth: Auth,
    /// The API keys, in round-robin order, with their accounts and own limits.
    pub keys: Vec<KeyConfig>,
    /// Every key's (or account's) limits unless it overrides a field
    /// (default: [`Limits::nvidia_free_tier`]).
    pub limits: Limits,
    /// Budgets shared by several keys: each account's fields over `limits`.
    pub accounts: BTreeMap<String, Limits>,
    /// Whether the provider counts `limits` per key or for all its keys together.
    pub quota_scope: QuotaScope,
    /// How it announces limits and explains 429s.
    pub dialect: Dialect,
    /// Top-level request fields removed before sending (the provider rejects them).
    pub strip: Vec<String>,
    /// Ask for `usage` in streams (`stream_options.include_usage`) when the
    /// ledger or a token window needs it and the client did not ask; the
    /// extra usage chunk is taken out before the client sees it (a Messages
    /// API stream always asks, and its translator reads the chunk). Off by
    /// default: some upstreams reject the field or hang on it (NVIDIA, per
    /// model), so turn it on only where it is known to work.
    pub stream_usage: bool,
}

impl ProviderConfig {
    /// A provider called `name` with the defaults: NVIDIA's base URL and
    /// free-tier limits per key, bearer keys (none yet).
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            preset: None,
            upstream: UpstreamConfig::default(),
            auth: Auth::Bearer,
            keys: Vec::new(),
            limits: Limits::nvidia_free_tier(),
            accounts: BTreeMap::new(),
            quota_scope: QuotaScope::Key,
            dialect: Dialect::Nvidia,
            strip: Vec::new(),
            stream_usage: false,
        }
    }

    /// A provider called `name` filled from `preset`: base URL, limits,
    /// scope, dialect and stripped fields.
    pub fn from_preset(name: impl Into<String>, preset: &Preset) -> Self {
        let upstream =
            UpstreamConfig { base_url: http::Uri::from_static(preset.base_url), ..UpstreamConfig::default() };
        Self {
            name: name.into(),
            preset: Some(preset.name),
            upstream,
            auth: Auth::Bearer,
            keys: Vec::new(),
            limits: preset.limits.clone(),
            accounts: BTreeMap::new(),
            quota_scope: preset.scope,
            dialect: preset.dialect,
            strip: preset.strip.iter().map(|s| (*s).to_owned()).collect(),
            stream_usage: false,
        }
    }

    /// The same provider at `base_url`.
    pub fn at(mut self, base_url: http::Uri) -> Self {
        self.upstream.base_url = base_url;
        self
    }

    /// The same provider with these keys.
    pub fn with_keys<K: Into<KeyConfig>>(mut self, keys: impl IntoIterator<Item = K>) -> Self {
        self.keys = keys.into_iter().map(Into::into).collect();
        self
    }

    /// The same provider with these default limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }
}

/// A public model name and the provider models that serve it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AliasConfig {
    /// Its targets (at least one, at most [`MAX_TARGETS`]).
    pub targets: Vec<TargetConfig>,
}

impl AliasConfig {
    /// An alias served by `targets`.
    pub fn new(targets: impl IntoIterator<Item = TargetConfig>) -> Self {
        Self { targets: targets.into_iter().collect() }
    }
}

/// One provider model serving an alias.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TargetConfig {
    /// The provider's name.
    pub provider: String,
    /// The model's id at that provider (the body's `model` is rewritten to it).
    pub model: String,
    /// Lower tiers are used first; a higher tier only when no target of a
    /// lower one has room (default 1).
    pub tier: u32,
    /// Share among the targets of its tier that have room (default 1; 1..=1000).
    pub weight: u32,
}

impl TargetConfig {
    /// `model` at `provider`, tier 1, weight 1.
    pub fn new(provider: impl Into<String>, model: impl Into<String>) -> Self {
        Self { provider: provider.into(), model: model.into(), tier: 1, weight: 1 }
    }

    /// The same target in `tier`.
    pub fn tier(mut self, tier: u32) -> Self {
        self.tier = tier;
        self
    }

    /// The same target with `weight`.
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }
}

/// Where names that are no alias go, and what `GET /v1/models` lists.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct RoutingConfig {
    /// The provider of names that are neither an alias nor `provider/model`
    /// (default: the first provider).
    pub default_provider: Option<String>,
    /// List every other provider's catalog as `provider/id` too (default off).
    pub list_provider_models: bool,
    /// How long a fetched catalog is used before it is fetched again (default 10 min).
    pub models_ttl: Duration,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        Self { default_provider: None, list_provider_models: false, models_ttl: Duration::from_secs(600) }
    }
}

/// One key as the gateway uses it: the pool's [`KeySpec`], the account whose
/// budget it shares (if any) and its own limits.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyConfig {
    /// The secret and name. A `rate` override on it (`requests_per_minute`,
    /// `burst`) is applied under `limits`.
    pub spec: KeySpec,
    /// The account it belongs to; `None`: the key is its own account.
    pub account: Option<String>,
    /// Its own fields: over the defaults for a key without an account; extra
    /// limits of this key alone (which may not allow more than the account)
    /// for a key with one.
    pub limits: Limits,
}

impl KeyConfig {
    /// A key with no account and no limits of its own.
    pub fn new(spec: KeySpec) -> Self {
        Self { spec, account: None, limits: Limits::default() }
    }

    /// The same key in `account`.
    pub fn in_account(mut self, account: impl Into<String>) -> Self {
        self.account = Some(account.into());
        self
    }

    /// The same key with its own `limits`.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Its own limits with the spec's `rate` override under them.
    pub(crate) fn own_limits(&self) -> Limits {
        let from_spec = Limits {
            requests_per_minute: self.spec.rate.requests_per_minute.map(u64::from),
            burst: self.spec.rate.burst,
            ..Limits::default()
        };
        from_spec.overlay(&self.limits)
    }
}

impl From<KeySpec> for KeyConfig {
    fn from(spec: KeySpec) -> Self {
        Self::new(spec)
    }
}

/// The settings a reload may change, read once per request.
#[derive(Debug)]
pub(crate) struct Settings {
    pub(crate) max_attempts: usize,
    pub(crate) queue_timeout: Duration,
    pub(crate) max_body_bytes: usize,
    pub(crate) tokens: crate::clients::ClientSet,
    /// The providers of this generation, in configuration order.
    pub(crate) providers: Box<[std::sync::Arc<crate::provider::Provider>]>,
    /// Aliases and where other names go.
    pub(crate) routes: crate::route::Routes,
    pub(crate) models_ttl: Duration,
    pub(crate) list_provider_models: bool,
}

impl Settings {
    pub(crate) fn new(
        config: &GatewayConfig,
        providers: Box<[std::sync::Arc<crate::provider::Provider>]>,
        routes: crate::route::Routes,
        tokens: crate::clients::ClientSet,
    ) -> Self {
        Self {
            max_attempts: config.max_attempts.clamp(1, MAX_ATTEMPTS),
            queue_timeout: config.queue_timeout,
            max_body_bytes: config.max_body_bytes,
            tokens,
            providers,
            routes,
            models_ttl: config.routing.models_ttl,
            list_provider_models: config.routing.list_provider_models,
        }
    }
}
