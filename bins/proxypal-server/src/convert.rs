//! The one place where the configuration meets the library types: a
//! validated [`Config`] becomes a [`GatewayConfig`] and an [`UpstreamConfig`].
//! Files the conversion needs (`upstream.ca_file`) are read here, once.

use http::HeaderValue;
use proxypal_gateway::GatewayConfig;
use proxypal_gateway::keypool::{CooldownPolicy, KeySpec, RateOverride};
use proxypal_gateway::limiter::KeyQuota;
use proxypal_gateway::upstream::UpstreamConfig;

use crate::config::Config;

/// Why a (validated) config could not become a running proxy.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The gateway refused the keys or a quota.
    #[error(transparent)]
    Gateway(#[from] proxypal_gateway::BuildError),
    /// The upstream client could not be built.
    #[error("upstream: {0}")]
    Upstream(#[from] proxypal_gateway::upstream::UpstreamBuildError),
    /// A field is not usable by the library it configures.
    #[error("{field}: {reason}")]
    Invalid {
        /// The config field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The gateway's settings from `config`: keys with their names and rate
/// overrides, the default quota, cooldowns, failover and queueing, request
/// limits and client tokens.
///
/// # Errors
/// `rate_limit` does not make a quota (validation rules that out).
pub fn gateway_config(config: &Config) -> Result<GatewayConfig, BuildError> {
    let rate = &config.rate_limit;
    let default_quota = KeyQuota::new(rate.requests_per_minute, rate.burst)
        .map_err(|e| BuildError::Invalid { field: "rate_limit", reason: e.to_string() })?;
    let keys: Vec<KeySpec> = config
        .keys
        .iter()
        .map(|k| {
            let mut spec = KeySpec::new(k.key.expose())
                .with_rate(RateOverride { requests_per_minute: k.requests_per_minute, burst: k.burst });
            spec.name = k.name.clone();
            spec
        })
        .collect();
    let mut gateway = GatewayConfig::with_keys(keys);
    gateway.default_quota = default_quota;
    gateway.cooldowns = CooldownPolicy {
        rate_limited: config.retry.rate_limit_cooldown,
        failure_base: config.retry.failure_cooldown,
        failure_max: config.retry.max_failure_cooldown,
    };
    // Validation bounds it to 1..=MAX_ATTEMPTS; the gateway clamps it as well.
    gateway.max_attempts = usize::try_from(config.retry.max_attempts).unwrap_or(1);
    gateway.queue_timeout = config.retry.queue_timeout;
    gateway.max_body_bytes = config.limits.max_body_bytes;
    gateway.max_inflight = config.limits.max_inflight;
    gateway.client_tokens = config.auth.tokens.clone();
    Ok(gateway)
}

/// The upstream client's settings from `config`, reading `upstream.ca_file`.
/// Build it once: every worker's client is made from a clone.
///
/// # Errors
/// A base URL, user agent or CA file that cannot be used, naming the field.
pub fn upstream_config(config: &Config) -> Result<UpstreamConfig, BuildError> {
    let base_url = config.upstream.base_url.parse().map_err(|e: http::uri::InvalidUri| {
        BuildError::Invalid { field: "upstream.base_url", reason: e.to_string() }
    })?;
    let user_agent = HeaderValue::from_str(&config.upstream.user_agent)
        .map_err(|e| BuildError::Invalid { field: "upstream.user_agent", reason: e.to_string() })?;
    let extra_root_certificates = config
        .upstream
        .extra_root_certificates()
        .map_err(|reason| BuildError::Invalid { field: "upstream.ca_file", reason })?;
    Ok(UpstreamConfig {
        base_url,
        connect_timeout: config.upstream.connect_timeout,
        response_timeout: config.upstream.response_timeout,
        idle_timeout: config.upstream.idle_timeout,
        user_agent,
        extra_root_certificates,
        ..UpstreamConfig::default()
    })
}
