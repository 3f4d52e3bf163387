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
//!   (see [`mask_key`]); tools, tool results, stop strings and images change
//!   the answer as described in [Chat completion answers](#chat-completion-answers).
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
//! image parts aside, plus the completion tokens) are charged when its answer is produced.
//!
//! # Chat completion answers
//!
//! Exact rules tests can rely on. Requests without `tools`, `stop`, image
//! parts or a final `tool` message get the same answers as before these
//! rules existed.
//!
//! **Text.** The *answer text* is, by default, the greeting
//! `Hello from the simulated NIM (key …abcd)` (the serving key masked by
//! [`mask_key`]); when the last message has role `tool`, it is instead
//! `Tool result: <content>`, where `<content>` is that message's `content`
//! string, or the `text` of each of its parts concatenated without
//! separator (`""` when it has none). When any message (any role) has
//! `image_url` parts in a `content` array, ` [1 image]` or ` [N images]`
//! (N the count over all messages) is appended. A plain answer's
//! `message.content` is the answer text, `finish_reason: "stop"`. A
//! streamed answer's text is the answer text followed by the filler words
//! ` [1]`, ` [2]`, … until it has [`SimConfig::stream_chunks`] words
//! (words are split at single spaces), sent as that many content chunks:
//! one word each (every word after the first with its leading space), the
//! last chunk holding all remaining words, the first chunk also carrying
//! `"role": "assistant"`. So with the default 8 chunks the greeting streams
//! as `Hello`, ` from`, ` the`, ` simulated`, ` NIM`, ` (key`, ` …abcd)`,
//! ` [1]`; with `stream_chunks` no larger than the answer text's word count
//! the streamed text equals the plain one. Then a chunk with an empty
//! `delta` and `finish_reason: "stop"`.
//!
//! **Content parts.** A message `content` may be a string or an array of
//! parts (`{"type":"text","text":…}`, `{"type":"image_url","image_url":
//! {"url":…}}`, anything else ignored). For `prompt_tokens` (body bytes / 4)
//! each `image_url` part counts 85 tokens instead of the bytes of its URL.
//!
//! **Stop strings.** `stop` may be absent, `null`, a string or an array of
//! strings (anything else: 400); empty strings are ignored. If the text an
//! answer would send (the plain answer text, or the whole streamed text
//! including fillers) contains a stop string, it is cut right before the
//! earliest match (at equal positions the one listed first wins), the
//! choice keeps `finish_reason: "stop"` and gains `"stop_reason": "<the
//! matched string>"` (vLLM / NVIDIA NIM style; in a stream, on the finish
//! chunk). A stream then sends only the chunks (or part of the chunk) before
//! the cut; when nothing is left, one first chunk with `"content": ""`. E.g.
//! `"stop": "simulated"` answers `Hello from the ` plain and streamed. Stop
//! strings do not apply to tool calls.
//!
//! **Tool calls.** The sim answers with tool calls instead of text when
//! `tools` is a non-empty array, `tool_choice` is not `"none"` and the last
//! message has role `user`. Every `tools` item must have a string
//! `function.name` (else 400); `tool_choice` `{"type":"function",
//! "function":{"name":N}}` picks the tool named `N` (400 if there is none),
//! any other value (`"auto"`, `"required"`, absent) the first tool.
//! - Number of calls: one, to the picked tool; two if the last user
//!   message's text (string, or its text parts concatenated) contains the
//!   word `parallel` (case-insensitive, a whole run of alphanumerics) and
//!   `parallel_tool_calls` is not `false`: then the first two tools (the
//!   first one twice if there is only one; the named tool twice when
//!   `tool_choice` names one).
//! - Arguments: a JSON object with, for each name in the tool's
//!   `parameters.required` (or, if it has none, the alphabetically first
//!   key of `parameters.properties`; none: `{}`), a value from the
//!   property's schema: its first `enum` value if any, else by `type` (the
//!   first non-`null` type of a list): `string` (or missing/unknown type)
//!   → `"<name> value"`, `integer`/`number` → `1`, `boolean` → `true`,
//!   `array` → `[]`, `object` → `{}`. Keys in alphabetical order, compact:
//!   `{"path":"path value"}`.
//! - Ids: `call_<n>_<i>` where `chatcmpl-sim-<n>` is the response id and
//!   `<i>` the call's index (0, 1).
//! - Plain: `choices[0].message` is `{"role":"assistant","content":null,
//!   "tool_calls":[{"id","type":"function","function":{"name",
//!   "arguments":"<json string>"}}]}`, `finish_reason: "tool_calls"`.
//! - Streamed (independent of [`SimConfig::stream_chunks`]): a role chunk
//!   `delta: {"role":"assistant","content":""}`; then one header chunk per
//!   call, `delta: {"tool_calls":[{"index":i,"id":…,"type":"function",
//!   "function":{"name":…,"arguments":""}}]}`, all headers first; then the
//!   arguments of each call in 3 pieces (cut at char counts `⌊len·k/3⌋`,
//!   empty pieces skipped), `delta: {"tool_calls":[{"index":i,"function":
//!   {"arguments":"<piece>"}}]}`, interleaved by round: call 0's first
//!   piece, call 1's first piece, call 0's second, … Then a chunk with an
//!   empty `delta` and `finish_reason: "tool_calls"`, the usage chunk if
//!   asked for, and `data: [DONE]`. Chunks are spaced like text chunks
//!   ([`SimConfig::first_chunk_delay`] before the first,
//!   [`SimConfig::chunk_interval`] between the next ones).
//! - `completion_tokens` (unless [`SimConfig::completion_tokens`] fixes
//!   it): one per call plus one per argument piece, plain or streamed (the
//!   number of chunks between the role chunk and the finish chunk).
//!
//! **What the sim received.** [`SimHandle::last_request_body`] returns the
//! last body (recorded with [`SimConfig::record_headers`], on by default);
//! [`SimConfig::with_request_log`] keeps the last N bodies for
//! [`SimHandle::request_log`].
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

mod chat;
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
