//! `--dev`: the proxy in front of the simulated NVIDIA upstream with
//! generated keys, so one command shows the whole product without an account.

use std::time::Duration;

use proxypal_nim_sim::{SimConfig, SimHandle, SimRateLimit, SimServer, generate_test_keys};

use crate::config::{Config, KeyEntry};

/// How many generated keys `--dev` uses.
pub const DEV_KEYS: usize = 3;

/// Starts the simulated upstream (enforcing the same per-key limit the proxy
/// uses, over a rolling 60 s window, as NVIDIA is reported to) and points
/// `config` at it with generated keys, unless the config already has keys.
///
/// # Errors
/// The simulator could not bind a port.
pub fn start_simulated_upstream(config: &mut Config) -> Result<SimHandle, proxypal_nim_sim::SimError> {
    let keys = if config.keys.is_empty() {
        let keys = generate_test_keys(DEV_KEYS);
        config.keys = keys.iter().map(KeyEntry::new).collect();
        keys
    } else {
        config.keys.iter().map(|k| k.key.expose().to_owned()).collect()
    };
    let rpm = config.default_limit_fields().requests_per_minute.unwrap_or(DEV_FALLBACK_RPM);
    let sim = SimConfig::default()
        .with_keys(keys)
        .with_rate_limit(SimRateLimit::RollingWindow {
            limit: u32::try_from(rpm).unwrap_or(u32::MAX),
            window: Duration::from_secs(60),
        })
        .with_stream(12, Duration::from_millis(80));
    let handle = SimServer::start(sim)?;
    config.upstream.base_url = handle.base_url();
    Ok(handle)
}

/// The simulator's per-key minute limit when the config sets none.
const DEV_FALLBACK_RPM: u64 = 600;

/// The text `--dev` prints once the proxy listens: what is running and how to use it.
pub fn banner(config: &Config, listen: std::net::SocketAddr, upstream: &str) -> String {
    let base = format!("http://{listen}/v1");
    let token_hint = match config.auth.tokens.first() {
        Some(_) => "<one of your auth.tokens>",
        None => "anything",
    };
    let auth_header = match config.auth.tokens.first() {
        Some(_) => "-H 'Authorization: Bearer <token>' ",
        None => "",
    };
    let keys: Vec<String> = config.keys.iter().map(|k| k.key.masked()).collect();
    format!(
        "\n  ProxyPal DEV MODE — simulated NVIDIA upstream at {upstream}, generated keys {keys}\n  \
         (no real NVIDIA account involved; every key limited to {rpm}/min by the proxy and by the simulator)\n\n  \
         Try it:\n\n    \
         curl -s {base}/chat/completions {auth_header}-H 'Content-Type: application/json' \\\n      \
         -d '{{\"model\":\"meta/llama-3.1-8b-instruct\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'\n\n    \
         curl -sN {base}/chat/completions {auth_header}-H 'Content-Type: application/json' \\\n      \
         -d '{{\"model\":\"meta/llama-3.1-8b-instruct\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"Hello\"}}]}}'\n\n    \
         python3 -c 'from openai import OpenAI; c = OpenAI(base_url=\"{base}\", api_key=\"{token_hint}\"); \
         print(c.chat.completions.create(model=\"meta/llama-3.1-8b-instruct\", messages=[{{\"role\":\"user\",\"content\":\"Hello\"}}]).choices[0].message.content)'\n\n    \
         curl -s http://{listen}/stats {auth_header}\n\n  \
         Dashboard: http://{listen}/dashboard\n\n  Ctrl-C stops it.\n",
        keys = keys.join(", "),
        rpm = config.default_limit_fields().requests_per_minute.unwrap_or(DEV_FALLBACK_RPM),
    )
}
