//! What a [`Gateway`](crate::Gateway) is built from ([`GatewayConfig`]), and
//! the part of it a reload may change, read once per request.

use std::time::Duration;

use proxypal_keypool::{CooldownPolicy, KeySpec, Secret};
use proxypal_limiter::KeyQuota;

use crate::admission::ClientTokens;
use crate::lease::MAX_ATTEMPTS;

/// Everything a [`Gateway`](crate::Gateway) is built from. [`Default`] is the product's
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
    pub(crate) fn from_config(config: &GatewayConfig) -> Self {
        Self {
            max_attempts: config.max_attempts.clamp(1, MAX_ATTEMPTS),
            queue_timeout: config.queue_timeout,
            max_body_bytes: config.max_body_bytes,
            tokens: ClientTokens::new(&config.client_tokens),
            default_quota: config.default_quota,
        }
    }
}
