//! `--dev`: the proxy in front of simulated upstreams with generated keys,
//! so one command shows the whole product without an account.
//!
//! - No keys and no providers configured: two simulated providers, `nvidia`
//!   (three keys, the default provider) and `groq` (one key, 5 requests a
//!   minute: a free tier that runs out fast), and the alias `llama-70b`
//!   that spends Groq's free minute first and falls back to NVIDIA.
//! - `keys` configured (a single-provider file): one simulated NVIDIA
//!   upstream that knows them.
//! - `providers` configured: each one simulated, speaking its preset's
//!   dialect and enforcing its `requests_per_minute`, with its keys (or
//!   generated ones) — a dry run of a real multi-provider file.
//!
//! `--dev` defaults `cache.enabled` to true (see `Config::dev`; a file may
//! still turn it off): a repeated identical request is answered from the
//! cache, and the dashboard shows the hit rate.

use std::time::Duration;

use proxypal_nim_sim::{
    SimConfig, SimDialect, SimHandle, SimRateLimit, SimServer, generate_test_keys_seeded,
};

use crate::config::{AliasEntry, AuthMode, CacheBackend, Config, KeyEntry, ProviderEntry, TargetEntry};

/// How many generated keys `--dev`'s NVIDIA provider uses.
pub const DEV_KEYS: usize = 3;

/// The requests per minute of `--dev`'s simulated Groq key.
pub const DEV_GROQ_PER_MINUTE: u64 = 5;

/// The alias `--dev` makes.
pub const DEV_ALIAS: &str = "llama-70b";

/// The simulated upstreams `--dev` runs (stopped when dropped).
#[derive(Debug)]
pub struct Simulated {
    /// Each simulator, with the provider it plays (`default` for a
    /// single-provider file).
    pub sims: Vec<(String, SimHandle)>,
}

/// Starts the simulated upstreams (each enforcing the per-key minute limit
/// the proxy uses, over a rolling 60 s window, as the providers are reported
/// to) and points `config` at them, generating keys where there are none.
///
/// # Errors
/// A simulator could not bind a port.
pub fn start_simulated_upstreams(config: &mut Config) -> Result<Simulated, proxypal_nim_sim::SimError> {
    if config.providers.is_empty() && config.keys.is_empty() {
        two_providers(config);
    }
    let mut sims = Vec::new();
    if config.providers.is_empty() {
        let keys: Vec<String> = config.keys.iter().map(|k| k.key.expose().to_owned()).collect();
        let rpm = config.default_limit_fields().requests_per_minute.unwrap_or(DEV_FALLBACK_RPM);
        let handle = SimServer::start(simulator(keys, rpm, SimDialect::Nvidia, false))?;
        config.upstream.base_url = handle.base_url();
        // The simulator takes `stream_options.include_usage`: streams are in the ledger with their tokens.
        config.upstream.stream_usage = true;
        sims.push((proxypal_gateway::DEFAULT_PROVIDER.to_owned(), handle));
        return Ok(Simulated { sims });
    }
    for (i, (name, provider)) in config.providers.iter_mut().enumerate() {
        let preset = provider.preset.as_deref().and_then(proxypal_gateway::preset::Preset::get);
        if provider.auth == AuthMode::Bearer && provider.keys.is_empty() {
            provider.keys =
                generate_test_keys_seeded(0xDE5 + i as u64, 2).iter().map(KeyEntry::new).collect();
        }
        let keys: Vec<String> = provider.keys.iter().map(|k| k.key.expose().to_owned()).collect();
        let rpm = provider
            .rate_limit
            .requests_per_minute
            .or(preset.as_ref().and_then(|p| p.limits.requests_per_minute))
            .unwrap_or(DEV_FALLBACK_RPM);
        let dialect = match provider.dialect.as_deref().or(provider.preset.as_deref()) {
            Some("groq" | "openai") => SimDialect::Groq,
            Some("cerebras") => SimDialect::Cerebras,
            Some("openrouter") => SimDialect::OpenRouter,
            Some("gemini") => SimDialect::Gemini,
            _ => SimDialect::Nvidia,
        };
        let handle = SimServer::start(simulator(keys, rpm, dialect, provider.auth == AuthMode::None))?;
        provider.base_url = Some(handle.base_url());
        provider.stream_usage = true;
        sims.push((name.clone(), handle));
    }
    Ok(Simulated { sims })
}

/// One simulated provider.
fn simulator(keys: Vec<String>, rpm: u64, dialect: SimDialect, anonymous: bool) -> SimConfig {
    SimConfig::default()
        .with_keys(keys)
        .with_rate_limit(SimRateLimit::RollingWindow {
            limit: u32::try_from(rpm).unwrap_or(u32::MAX),
            window: Duration::from_secs(60),
        })
        .with_dialect(dialect)
        .with_anonymous(anonymous)
        .with_limit_headers(dialect == SimDialect::Groq)
        .with_models(["meta/llama-3.1-8b-instruct", "meta/llama-3.3-70b-instruct", "llama-3.3-70b-versatile"])
        .with_stream(12, Duration::from_millis(80))
}

/// `--dev` without a config: NVIDIA and Groq, and an alias over both.
fn two_providers(config: &mut Config) {
    let rpm = config.default_limit_fields().requests_per_minute.unwrap_or(DEV_FALLBACK_RPM);
    let mut nvidia = ProviderEntry { preset: Some("nvidia".to_owned()), ..ProviderEntry::default() };
    nvidia.keys = generate_test_keys_seeded(0xDE5, DEV_KEYS).iter().map(KeyEntry::new).collect();
    nvidia.rate_limit.requests_per_minute = Some(rpm);
    let mut groq = ProviderEntry { preset: Some("groq".to_owned()), ..ProviderEntry::default() };
    groq.keys = generate_test_keys_seeded(0xDE6, 1).iter().map(KeyEntry::new).collect();
    groq.rate_limit.requests_per_minute = Some(DEV_GROQ_PER_MINUTE);
    config.providers.insert("nvidia".to_owned(), nvidia);
    config.providers.insert("groq".to_owned(), groq);
    let target = |provider: &str, model: &str, tier: u32| TargetEntry {
        provider: provider.to_owned(),
        model: model.to_owned(),
        tier,
        weight: 1,
    };
    // The alias, and Claude Code's model names (claude-sonnet-4-5-…, claude-haiku-4-5) on the same pools.
    for name in [DEV_ALIAS, DEV_CLAUDE_ALIAS] {
        let targets = vec![
            target("groq", "llama-3.3-70b-versatile", 1),
            target("nvidia", "meta/llama-3.3-70b-instruct", 2),
        ];
        config.models.insert(name.to_owned(), AliasEntry { targets });
    }
    config.routing.default_provider = Some("nvidia".to_owned());
}

/// `--dev`'s glob alias for Anthropic clients' model names.
pub const DEV_CLAUDE_ALIAS: &str = "claude-*";

/// The simulator's per-key minute limit when the config sets none.
const DEV_FALLBACK_RPM: u64 = 600;

/// The text `--dev` prints once the proxy listens: what is running and how to use it.
pub fn banner(config: &Config, listen: std::net::SocketAddr, simulated: &Simulated) -> String {
    let base = format!("http://{listen}/v1");
    let token_hint = match config.auth.tokens.first() {
        Some(_) => "<one of your auth.tokens>",
        None => "anything",
    };
    let auth_header = match config.auth.tokens.first() {
        Some(_) => "-H 'Authorization: Bearer <token>' ",
        None => "",
    };
    let mut upstreams = String::new();
    for (name, sim) in &simulated.sims {
        let keys: Vec<String> = match config.providers.get(name) {
            Some(p) => p.keys.iter().map(|k| k.key.masked()).collect(),
            None => config.keys.iter().map(|k| k.key.masked()).collect(),
        };
        upstreams.push_str(&format!("\n    {name:<8} at {}, keys {}", sim.base_url(), keys.join(", ")));
    }
    // Repeats of one request would be cache hits: the routing demo goes past the cache.
    let (cache, no_store) = if config.cache.enabled {
        (
            format!(
                "  Response cache: on ({}, entries live {}). Send the plain chat request above twice: the second answer\n  \
                 has x-proxypal-cache: hit, spends no key quota and counts in the dashboard's hit rate.\n  \
                 -H 'Cache-Control: no-store' skips the cache.\n\n",
                match config.cache.backend {
                    CacheBackend::Memory => "memory",
                    CacheBackend::Redis => "redis",
                },
                humantime::format_duration(config.cache.ttl),
            ),
            "-H 'Cache-Control: no-store' ",
        )
    } else {
        ("  Response cache: off.\n\n".to_owned(), "")
    };
    let routing = if config.models.contains_key(DEV_ALIAS) {
        format!(
            "\n  Routing: `{DEV_ALIAS}` spends groq's free minute first ({DEV_GROQ_PER_MINUTE} requests), then nvidia.\n  \
             Watch x-proxypal-route change once groq's budget runs out:\n\n    \
             for i in 1 2 3 4 5 6 7; do curl -si {base}/chat/completions {auth_header}{no_store}-H 'Content-Type: application/json' \\\n      \
             -d '{{\"model\":\"{DEV_ALIAS}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}' | grep -i '^x-proxypal-route'; done\n"
        )
    } else {
        String::new()
    };
    let anthropic_key = match config.auth.tokens.first() {
        Some(_) => "<token>",
        None => "anything",
    };
    let claude_model = if config.models.contains_key(DEV_CLAUDE_ALIAS) {
        "claude-sonnet-4-5"
    } else {
        "meta/llama-3.1-8b-instruct"
    };
    let anthropic = format!(
        "  Anthropic clients (Claude Code, the Anthropic SDKs) use the same pools through /v1/messages:\n\n    \
         ANTHROPIC_BASE_URL=http://{listen} ANTHROPIC_API_KEY={anthropic_key} claude\n\n    \
         curl -s http://{listen}/v1/messages -H 'x-api-key: {anthropic_key}' -H 'anthropic-version: 2023-06-01' \\\n      \
         -H 'Content-Type: application/json' \\\n      \
         -d '{{\"model\":\"{claude_model}\",\"max_tokens\":256,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'\n\n"
    );
    format!(
        "\n  ProxyPal DEV MODE — simulated upstreams with generated keys (no real account involved):{upstreams}\n{routing}\n  \
         Try it:\n\n    \
         curl -s {base}/chat/completions {auth_header}-H 'Content-Type: application/json' \\\n      \
         -d '{{\"model\":\"meta/llama-3.1-8b-instruct\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'\n\n    \
         curl -sN {base}/chat/completions {auth_header}-H 'Content-Type: application/json' \\\n      \
         -d '{{\"model\":\"meta/llama-3.1-8b-instruct\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'\n\n    \
         python3 -c 'from openai import OpenAI; c = OpenAI(base_url=\"{base}\", api_key=\"{token_hint}\"); \
         print(c.chat.completions.create(model=\"meta/llama-3.1-8b-instruct\", messages=[{{\"role\":\"user\",\"content\":\"Hello\"}}]).choices[0].message.content)'\n\n    \
         curl -s {base}/models {auth_header}\n    \
         curl -s http://{listen}/stats {auth_header}\n\n\
         {anthropic}{cache}  \
         Dashboard: http://{listen}/dashboard\n\n  Ctrl-C stops it.\n",
    )
}
