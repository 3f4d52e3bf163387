//! The one place where the configuration meets the library types: a
//! validated [`Config`] becomes a [`GatewayConfig`] and an [`UpstreamConfig`].
//! Files the conversion needs (`upstream.ca_file`) are read here, once.

use http::HeaderValue;
use proxypal_gateway::keypool::{CooldownPolicy, KeySpec};
use proxypal_gateway::upstream::UpstreamConfig;
use proxypal_gateway::{GatewayConfig, KeyConfig};

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
        field: String,
        /// What is wrong.
        reason: String,
    },
}

/// The gateway's settings from `config`: keys with their names, accounts and
/// limits, the default limits and accounts, cooldowns, failover and
/// queueing, request limits and client tokens.
///
/// # Errors
/// Limits that do not convert (validation rules that out).
pub fn gateway_config(config: &Config) -> Result<GatewayConfig, BuildError> {
    let invalid = |field: String| {
        move |(f, reason): (String, String)| BuildError::Invalid { field: format!("{field}.{f}"), reason }
    };
    let mut keys = Vec::with_capacity(config.keys.len());
    for (i, k) in config.keys.iter().enumerate() {
        let mut spec = KeySpec::new(k.key.expose());
        spec.name = k.name.clone();
        let limits = k.limits.to_limits().map_err(invalid(format!("keys[{i}]")))?;
        let mut key = KeyConfig::new(spec).with_limits(limits);
        key.account.clone_from(&k.account);
        keys.push(key);
    }
    let mut gateway = GatewayConfig::with_keys(keys);
    gateway.limits = config.default_limit_fields().to_limits().map_err(invalid("rate_limit".into()))?;
    for (name, fields) in &config.accounts {
        let limits = fields.to_limits().map_err(invalid(format!("accounts.{name}")))?;
        gateway.accounts.insert(name.clone(), limits);
    }
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
        BuildError::Invalid { field: "upstream.base_url".into(), reason: e.to_string() }
    })?;
    let user_agent = HeaderValue::from_str(&config.upstream.user_agent)
        .map_err(|e| BuildError::Invalid { field: "upstream.user_agent".into(), reason: e.to_string() })?;
    let extra_root_certificates = config
        .upstream
        .extra_root_certificates()
        .map_err(|reason| BuildError::Invalid { field: "upstream.ca_file".into(), reason })?;
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
