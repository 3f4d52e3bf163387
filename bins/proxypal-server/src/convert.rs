//! The one place where the configuration meets the library types: a
//! validated [`Config`] becomes a [`GatewayConfig`] (providers, each with its
//! upstream client settings, aliases, routing). Files the conversion needs
//! (`upstream.ca_file`) are read here, once.

use http::HeaderValue;
use proxypal_gateway::dialect::Dialect;
use proxypal_gateway::keypool::{CooldownPolicy, KeySpec};
use proxypal_gateway::preset::QuotaScope;
use proxypal_gateway::upstream::UpstreamConfig;
use proxypal_gateway::{AliasConfig, Auth, GatewayConfig, KeyConfig, ProviderConfig, TargetConfig};

use crate::config::{AuthMode, Config, ScopeMode};

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

/// The gateway's configuration: every provider (the single-provider form is
/// provider `default`) with its keys, limits and upstream client, the
/// aliases and routing, and the request settings.
///
/// # Errors
/// A field that cannot be converted (a limit field, a base URL, a CA file),
/// named.
pub fn gateway_config(config: &Config) -> Result<GatewayConfig, BuildError> {
    let invalid = |field: String| {
        move |(f, reason): (String, String)| BuildError::Invalid { field: format!("{field}.{f}"), reason }
    };
    let config_error = |e: crate::config::ConfigError| BuildError::Invalid {
        field: e.field().unwrap_or("providers").to_owned(),
        reason: e.to_string(),
    };
    let mut providers = Vec::new();
    for view in config.provider_views().map_err(config_error)? {
        let mut keys = Vec::with_capacity(view.keys.len());
        for (i, k) in view.keys.iter().enumerate() {
            let mut spec = KeySpec::new(k.key.expose());
            spec.name = k.name.clone();
            let limits = k.limits.to_limits().map_err(invalid(view.key_field(i, k)))?;
            let mut key = KeyConfig::new(spec).with_limits(limits);
            key.account.clone_from(&k.account);
            keys.push(key);
        }
        let mut provider = match &view.preset {
            Some(preset) => ProviderConfig::from_preset(view.name, preset),
            None => ProviderConfig::new(view.name),
        };
        provider.upstream = upstream_client_config(config, view.base_url, &view.base_url_field)?;
        provider.keys = keys;
        provider.stream_usage = view.entry.map_or(config.upstream.stream_usage, |e| e.stream_usage);
        let over = view.rate_limit.to_limits().map_err(invalid(view.rate_limit_field.clone()))?;
        provider.limits = view.base_limits.overlay(&over);
        for (name, fields) in view.accounts {
            let limits = fields.to_limits().map_err(invalid(format!("{}accounts.{name}", view.at)))?;
            provider.accounts.insert(name.clone(), limits);
        }
        if let Some(entry) = view.entry {
            provider.auth = match entry.auth {
                AuthMode::Bearer => Auth::Bearer,
                AuthMode::None => Auth::None,
            };
            if view.preset.is_none() {
                // No preset: a generic OpenAI-compatible API.
                provider.dialect = Dialect::Generic;
            }
            if let Some(scope) = entry.quota_scope {
                provider.quota_scope = match scope {
                    ScopeMode::Key => QuotaScope::Key,
                    ScopeMode::Account => QuotaScope::Account,
                };
            }
            if let Some(strip) = &entry.strip_params {
                provider.strip.clone_from(strip);
            }
            if let Some(name) = &entry.dialect {
                provider.dialect = crate::config::dialect_named(name).ok_or_else(|| BuildError::Invalid {
                    field: format!("{}dialect", view.at),
                    reason: format!(
                        "no dialect {name:?}; dialects: nvidia, openai, groq, cerebras, openrouter, gemini, generic"
                    ),
                })?;
            }
        }
        providers.push(provider);
    }
    let mut gateway = GatewayConfig::with_providers(providers);
    for (name, alias) in &config.models {
        let targets = alias
            .targets
            .iter()
            .map(|t| TargetConfig::new(&t.provider, &t.model).tier(t.tier).weight(t.weight));
        gateway.models.insert(name.clone(), AliasConfig::new(targets));
    }
    gateway.routing.default_provider.clone_from(&config.routing.default_provider);
    gateway.routing.list_provider_models = config.routing.list_provider_models;
    gateway.routing.models_ttl = config.routing.models_ttl;
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
    for (i, c) in config.clients.iter().enumerate() {
        let at = format!("clients[{i}]");
        let Some(token) = c.token.clone() else {
            return Err(BuildError::Invalid { field: format!("{at}.token"), reason: "required".into() });
        };
        let limits = c.limit_fields().to_limits().map_err(invalid(at.clone()))?;
        let limits = if limits.requests_per_minute.is_none() && limits.tokens_per_minute.is_none() {
            // Only the margin is set: no quota.
            proxypal_gateway::limiter::Limits { margin: None, ..limits }
        } else {
            limits
        };
        let mut client = proxypal_gateway::ClientConfig::new(c.name.trim(), token)
            .with_limits(limits)
            .with_models(c.models.iter().map(|m| m.trim().to_owned()))
            .with_weight(c.weight);
        if c.admin {
            client = client.as_admin();
        }
        gateway.clients.push(client);
    }
    let shared_ca = match config.shared.as_ref().and_then(|s| s.ca_file.as_ref()) {
        Some(path) => Some(std::fs::read(path).map_err(|e| BuildError::Invalid {
            field: "shared.ca_file".into(),
            reason: format!("cannot read {}: {e}", path.display()),
        })?),
        None => None,
    };
    gateway.shared = config.shared.as_ref().map(|s| {
        let mut shared = proxypal_gateway::replicas::SharedQuotaConfig::new(s.redis_url.trim());
        shared.ca_pem.clone_from(&shared_ca);
        shared.key_prefix.clone_from(&s.key_prefix);
        shared.timeout = s.timeout;
        shared.require_on_start = s.require_on_start;
        shared.replicas = s.replicas;
        shared.lease = s.lease;
        shared.heartbeat = s.heartbeat;
        shared.max_degraded = s.max_degraded;
        shared
    });
    Ok(gateway)
}

/// The upstream client settings of a provider at `base_url`: the top-level
/// `upstream` section's timeouts, user agent and CA file.
fn upstream_client_config(
    config: &Config,
    base_url: &str,
    field: &str,
) -> Result<UpstreamConfig, BuildError> {
    let base_url = base_url.parse().map_err(|e: http::uri::InvalidUri| BuildError::Invalid {
        field: field.to_owned(),
        reason: e.to_string(),
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

/// The webhook endpoints of `config`; an error names the field
/// (`webhooks[0].events[1]`) and never quotes a URL or secret.
///
/// # Errors
/// `(field, reason)` for a URL, event name or secret that cannot be used.
pub fn webhook_config(config: &Config) -> Result<proxypal_webhooks::WebhookConfig, (String, String)> {
    let mut endpoints = Vec::with_capacity(config.webhooks.len());
    for (i, w) in config.webhooks.iter().enumerate() {
        let at = format!("webhooks[{i}]");
        let mut endpoint =
            proxypal_webhooks::Endpoint::new(&w.url).map_err(|e| (format!("{at}.url"), e.to_string()))?;
        let mut events = Vec::with_capacity(w.events.len());
        for (j, name) in w.events.iter().enumerate() {
            events.push(name.parse().map_err(|e: proxypal_webhooks::ParseEventKindError| {
                (format!("{at}.events[{j}]"), e.to_string())
            })?);
        }
        endpoint = endpoint.events(events);
        if let Some(secret) = &w.secret {
            let secret = proxypal_webhooks::Secret::parse(secret.expose())
                .map_err(|e| (format!("{at}.secret"), e.to_string()))?;
            endpoint = endpoint.secret(secret);
        }
        endpoints.push(endpoint);
    }
    Ok(proxypal_webhooks::WebhookConfig { endpoints, ..proxypal_webhooks::WebhookConfig::default() })
}
