//! `providers`, `models` and `routing`: several upstreams behind one
//! endpoint, and the public model names (aliases) routed to them. A file
//! without `providers` is one provider, `default`, made of the top-level
//! `upstream.base_url`, `keys`, `keys_file`, `rate_limit` and `accounts`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{KeyEntry, LimitFields, parse};

/// One upstream provider (see `docs/providers.md`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ProviderEntry {
    /// A preset that fills the base URL, limits, quota scope, header dialect
    /// and stripped parameters: `nvidia`, `groq`, `cerebras`, `openrouter`,
    /// `gemini` or `openai-compatible`. Every field below overrides it.
    pub preset: Option<String>,
    /// The OpenAI-compatible base URL (required without a preset).
    pub base_url: Option<String>,
    /// `bearer` (default): a key per request. `none`: no credentials (a
    /// local server) and no keys.
    pub auth: AuthMode,
    /// The provider's API keys, as the top-level `keys` (strings or maps).
    pub keys: Vec<KeyEntry>,
    /// A file with one key per line, appended to `keys`; relative to the
    /// config file.
    pub keys_file: Option<PathBuf>,
    /// Limits of each key (or of the whole provider with `quota_scope:
    /// account`), over the preset's; the fields of the top-level `rate_limit`.
    pub rate_limit: LimitFields,
    /// Budgets shared by several keys of this provider.
    pub accounts: BTreeMap<String, LimitFields>,
    /// `key`: each key has its own budget. `account`: all keys of the
    /// provider share one (the preset says which the provider does).
    pub quota_scope: Option<ScopeMode>,
    /// Top-level request fields removed before sending (replaces the
    /// preset's list; `[]` sends everything).
    pub strip_params: Option<Vec<String>>,
    /// Ask for `usage` in streams the client did not ask it for (the ledger
    /// and token windows need it), taking the extra chunk out before the
    /// client sees it. Default `false`: turn it on only for a provider known
    /// to accept `stream_options.include_usage` (see `docs/clients.md`).
    pub stream_usage: bool,
    /// How the provider announces limits: `nvidia`, `openai`, `groq`,
    /// `cerebras`, `openrouter`, `gemini` or `generic` (default: the preset's).
    pub dialect: Option<String>,
}

/// How a provider authenticates requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// `Authorization: Bearer <key>`.
    #[default]
    Bearer,
    /// No credentials.
    None,
}

/// Whether a provider's limits are per key or per account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScopeMode {
    /// Per key.
    Key,
    /// For all keys of the provider together.
    Account,
}

/// A public model name and the provider models that serve it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AliasEntry {
    /// Its targets, tried lowest tier first.
    pub targets: Vec<TargetEntry>,
}

/// One target of an alias.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TargetEntry {
    /// A provider's name in `providers`.
    pub provider: String,
    /// The model id at that provider.
    pub model: String,
    /// Lower tiers first (default 1).
    #[serde(default = "one")]
    pub tier: u32,
    /// Share within its tier (default 1).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// Where names that are no alias go, and the models list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RoutingConfig {
    /// The provider of names that are neither an alias nor `provider/model`
    /// (required with several providers).
    pub default_provider: Option<String>,
    /// `GET /v1/models` lists every other provider's catalog as `provider/id`.
    pub list_provider_models: bool,
    /// How long a fetched catalog is used. Default 10 min.
    #[serde(deserialize_with = "parse::duration")]
    pub models_ttl: Duration,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        let d = proxypal_gateway::RoutingConfig::default();
        Self {
            default_provider: d.default_provider,
            list_provider_models: d.list_provider_models,
            models_ttl: d.models_ttl,
        }
    }
}

/// One provider as validation and conversion see it, whichever way it was
/// configured: its name, where its fields are (`providers.groq.` or, for the
/// single-provider form, nothing) and its resolved settings.
#[derive(Debug)]
pub(crate) struct ProviderView<'a> {
    pub(crate) name: &'a str,
    /// Prefix of its fields in error messages.
    pub(crate) at: String,
    pub(crate) preset: Option<proxypal_gateway::preset::Preset>,
    pub(crate) base_url: &'a str,
    /// Where `base_url` is in error messages.
    pub(crate) base_url_field: String,
    pub(crate) auth: AuthMode,
    pub(crate) keys: &'a [KeyEntry],
    /// The limits under the provider's `rate_limit` (the preset's, or the
    /// built-in 40/min for the single-provider form).
    pub(crate) base_limits: proxypal_gateway::limiter::Limits,
    pub(crate) rate_limit: &'a LimitFields,
    /// Where `rate_limit` is in error messages.
    pub(crate) rate_limit_field: String,
    pub(crate) accounts: &'a BTreeMap<String, LimitFields>,
    pub(crate) entry: Option<&'a ProviderEntry>,
}

impl ProviderView<'_> {
    /// How errors name key `index`: `providers.groq.keys[2]`, or
    /// `providers.groq.keys_file line 4` for file keys.
    pub(crate) fn key_field(&self, index: usize, entry: &KeyEntry) -> String {
        match entry.origin {
            super::KeyOrigin::Config => format!("{}keys[{index}]", self.at),
            super::KeyOrigin::KeysFile { line } => format!("{}keys_file line {line}", self.at),
        }
    }
}

/// The dialect called `name` in the configuration.
pub(crate) fn dialect_named(name: &str) -> Option<proxypal_gateway::dialect::Dialect> {
    use proxypal_gateway::dialect::Dialect;
    Some(match name {
        "nvidia" => Dialect::Nvidia,
        "openai" => Dialect::OpenAi,
        "groq" => Dialect::Groq,
        "cerebras" => Dialect::Cerebras,
        "openrouter" => Dialect::OpenRouter,
        "gemini" => Dialect::Gemini,
        "generic" => Dialect::Generic,
        _ => return None,
    })
}

impl super::Config {
    /// Whether the file uses `providers` (else it is one provider, `default`).
    pub fn has_providers(&self) -> bool {
        !self.providers.is_empty()
    }

    /// Every provider as validation and conversion see it.
    ///
    /// # Errors
    /// A `preset` that does not exist, or a provider without a base URL.
    pub(crate) fn provider_views(&self) -> Result<Vec<ProviderView<'_>>, super::ConfigError> {
        use proxypal_gateway::preset::Preset;
        if self.providers.is_empty() {
            return Ok(vec![ProviderView {
                name: proxypal_gateway::DEFAULT_PROVIDER,
                at: String::new(),
                preset: None,
                base_url: &self.upstream.base_url,
                base_url_field: "upstream.base_url".to_owned(),
                auth: AuthMode::Bearer,
                keys: &self.keys,
                base_limits: proxypal_gateway::limiter::Limits::nvidia_free_tier(),
                rate_limit: &self.rate_limit,
                rate_limit_field: "rate_limit".to_owned(),
                accounts: &self.accounts,
                entry: None,
            }]);
        }
        let mut views = Vec::with_capacity(self.providers.len());
        for (name, p) in &self.providers {
            let at = format!("providers.{name}.");
            let preset = match &p.preset {
                None => None,
                Some(preset) => Some(Preset::get(preset).ok_or_else(|| {
                    super::ConfigError::invalid(
                        format!("{at}preset"),
                        format!("no preset {preset:?}; presets: {}", Preset::NAMES.join(", ")),
                    )
                })?),
            };
            let base_url = match (&p.base_url, &preset) {
                (Some(url), _) => url.as_str(),
                (None, Some(preset)) => preset.base_url,
                (None, None) => {
                    return Err(super::ConfigError::invalid(
                        format!("{at}base_url"),
                        format!("required without a preset (presets: {})", Preset::NAMES.join(", ")),
                    ));
                }
            };
            views.push(ProviderView {
                name,
                base_url_field: format!("{at}base_url"),
                rate_limit_field: format!("{at}rate_limit"),
                preset: preset.clone(),
                base_url,
                auth: p.auth,
                keys: &p.keys,
                base_limits: preset.map(|p| p.limits).unwrap_or_default(),
                rate_limit: &p.rate_limit,
                accounts: &p.accounts,
                entry: Some(p),
                at,
            });
        }
        Ok(views)
    }
}
