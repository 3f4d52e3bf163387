//! What a [`Gateway`](crate::Gateway) is built from ([`GatewayConfig`]), and
//! the part of it a reload may change, read once per request.

use std::collections::BTreeMap;
use std::time::Duration;

use proxypal_keypool::{CooldownPolicy, KeySpec, Secret};
use proxypal_limiter::Limits;

use crate::admission::ClientTokens;
use crate::lease::MAX_ATTEMPTS;

/// Everything a [`Gateway`](crate::Gateway) is built from. [`Default`] is the product's
/// default behaviour (no keys); the server's configuration file maps onto it
/// field by field.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// The upstream API keys, in round-robin order, with their accounts and
    /// own limits.
    pub keys: Vec<KeyConfig>,
    /// Every key's (or account's) limits unless it overrides a field
    /// (default: [`Limits::nvidia_free_tier`], 40 in any rolling minute with
    /// bursts, 500 ms margin).
    pub limits: Limits,
    /// Budgets shared by several keys: each account's fields over `limits`.
    /// A key naming an account not listed here shares a budget of `limits`.
    pub accounts: BTreeMap<String, Limits>,
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
            limits: Limits::nvidia_free_tier(),
            accounts: BTreeMap::new(),
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
    pub fn with_keys<K: Into<KeyConfig>>(keys: impl IntoIterator<Item = K>) -> Self {
        Self { keys: keys.into_iter().map(Into::into).collect(), ..Self::default() }
    }

    /// Checks that the limits make budgets (as [`Gateway::new`](crate::Gateway::new)
    /// would), without building anything.
    ///
    /// # Errors
    /// [`BuildError::Limits`](crate::BuildError::Limits) naming the field, or
    /// [`BuildError::AboveAccount`](crate::BuildError::AboveAccount).
    pub fn check_limits(&self) -> Result<(), crate::BuildError> {
        crate::keyset::Plan::new(&self.keys, &self.limits, &self.accounts).map(drop)
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
    pub(crate) tokens: ClientTokens,
    pub(crate) limits: Limits,
}

impl Settings {
    pub(crate) fn from_config(config: &GatewayConfig) -> Self {
        Self {
            max_attempts: config.max_attempts.clamp(1, MAX_ATTEMPTS),
            queue_timeout: config.queue_timeout,
            max_body_bytes: config.max_body_bytes,
            tokens: ClientTokens::new(&config.client_tokens),
            limits: config.limits.clone(),
        }
    }
}
