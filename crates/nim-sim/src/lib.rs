//! A simulated NVIDIA NIM (build.nvidia.com) API server, in process.
//!
//! It speaks the OpenAI-compatible subset ProxyPal forwards and reproduces
//! the upstream's real quirks (see `shared/nvidia-api.md`): NVIDIA's
//! problem-details error bodies, the bare `429 {"status":429,"title":"Too
//! Many Requests"}` without `Retry-After`, SSE streams of
//! `chat.completion.chunk` events ending with `data: [DONE]`.
//!
//! Used by integration tests, examples, benchmarks and the `--dev` demo mode.
//!
//! Endpoints:
//! - `GET /v1/models`: OpenAI model list of [`SimConfig::models`]. Not rate
//!   limited.
//! - `POST /v1/chat/completions`: a `chat.completion`, or with
//!   `"stream": true` an SSE stream (each event its own body frame, spaced by
//!   [`SimConfig::chunk_interval`]); `stream_options.include_usage` adds the
//!   usage chunk. The assistant content names the serving key in masked form
//!   (see [`mask_key`]).
//! - `POST /v1/embeddings`: small deterministic unit vectors, one per input.
//!
//! Order of checks for a request: the whole body is read, then an injected
//! [`Fault`] (if one matches), then routing (404/405), then authentication
//! (401/403), then the account's limits (429, `POST` endpoints only:
//! [`SimConfig::max_concurrent`], [`SimConfig::rate_limit`] and
//! [`SimConfig::extra_limits`], [`SimConfig::token_limit`]; all checked
//! before any is charged), then [`SimConfig::processing_delay`], then request
//! validation (400).
//!
//! Limits are counted per account ([`SimConfig::accounts`]; by default each
//! key is its own account). A request counts against the request limits when
//! it passes them all (whatever its answer); its tokens
//! (`usage.total_tokens`: `prompt_tokens` = body bytes / 4, rounded down,
//! plus the completion tokens) are charged when its answer is produced.
//!
//! ```no_run
//! use proxypal_nim_sim::{Fault, FaultTarget, SimConfig, SimServer, generate_test_keys};
//!
//! # async fn demo() -> Result<(), proxypal_nim_sim::SimError> {
//! let keys = generate_test_keys(2);
//! let sim = SimServer::start(SimConfig::default().with_keys(keys.clone()))?;
//! println!("point the proxy at {}", sim.base_url());
//! sim.push_fault(Fault::worker_limit(), FaultTarget::Key(keys[0].clone()));
//! // … drive traffic …
//! assert_eq!(sim.stats().active_streams, 0);
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

mod config;
mod fault;
mod server;
mod service;
mod state;
mod stats;

pub use config::{DEFAULT_MODELS, SimConfig, SimDialect, SimRateLimit};
pub use fault::{FORBIDDEN_BODY, Fault, FaultTarget, RATE_LIMITED_BODY, SIM_FUNCTION_ID, UNAUTHORIZED_BODY};
pub use server::{SimError, SimHandle, SimServer};
pub use stats::{AccountStats, KeyCounters, SimStats, max_in_window};

/// Prefix of every key made by [`generate_test_keys`].
pub const TEST_KEY_PREFIX: &str = "nvapi-sim-";

const ALPHANUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// One step of splitmix64: advances `state` and returns the next value.
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `n` fake keys `nvapi-sim-` + 40 alphanumerics, deterministic for a seed.
pub fn generate_test_keys_seeded(seed: u64, n: usize) -> Vec<String> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            let mut key = String::with_capacity(TEST_KEY_PREFIX.len() + 40);
            key.push_str(TEST_KEY_PREFIX);
            for _ in 0..4 {
                // 10 characters per draw: 62^10 < 2^64.
                let mut v = splitmix64(&mut state);
                for _ in 0..10 {
                    key.push(char::from(ALPHANUM[(v % 62) as usize]));
                    v /= 62;
                }
            }
            key
        })
        .collect()
}

/// `n` fresh fake keys (`nvapi-sim-` + 40 alphanumerics). Keys differ across
/// calls within a process (a global counter feeds the seed) and across runs
/// (the clock does). Never real keys.
pub fn generate_test_keys(n: usize) -> Vec<String> {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let clock = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut seed = clock ^ (u64::from(std::process::id()) << 32);
    let mut mixed = splitmix64(&mut seed) ^ call.wrapping_mul(0xa076_1d64_78bd_642f);
    generate_test_keys_seeded(splitmix64(&mut mixed), n)
}

/// The masked form of a key used in every simulator output: `…` followed by
/// its last 4 characters (just `…` for keys shorter than 8 characters, so a
/// short key is never half revealed).
pub fn mask_key(key: &str) -> String {
    let n = key.chars().count();
    if n < 8 {
        return "…".to_owned();
    }
    let tail: String = key.chars().skip(n - 4).collect();
    format!("…{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_documented_shape_and_are_unique() {
        let keys = generate_test_keys(50);
        let more = generate_test_keys(50);
        let mut all: Vec<&String> = keys.iter().chain(more.iter()).collect();
        for k in &all {
            let rest = k.strip_prefix(TEST_KEY_PREFIX).unwrap_or_default();
            assert_eq!(rest.len(), 40, "{k}");
            assert!(rest.bytes().all(|b| b.is_ascii_alphanumeric()));
        }
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 100);
        assert_eq!(generate_test_keys_seeded(7, 3), generate_test_keys_seeded(7, 3));
    }

    #[test]
    fn masking() {
        assert_eq!(mask_key("nvapi-sim-abcdwxyz"), "…wxyz");
        assert_eq!(mask_key("short"), "…");
        assert_eq!(mask_key(""), "…");
    }
}
