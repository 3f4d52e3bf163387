//! Configuration of a simulated NIM server.

use std::time::Duration;

/// Models listed by `GET /v1/models` in the default configuration.
pub const DEFAULT_MODELS: &[&str] = &[
    "meta/llama-3.1-8b-instruct",
    "meta/llama-3.3-70b-instruct",
    "deepseek-ai/deepseek-v4-pro",
    "nvidia/nv-embedqa-e5-v5",
];

/// A per-key rate limit enforced by the simulator on `POST` endpoints
/// (`/v1/chat/completions`, `/v1/embeddings`).
///
/// Requests beyond the limit get NVIDIA's bare
/// `429 {"status":429,"title":"Too Many Requests"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimRateLimit {
    /// A token bucket with continuous refill: it starts full with `burst`
    /// tokens, refills at `per_minute / 60` tokens per second up to `burst`,
    /// and each accepted request takes one token.
    TokenBucket {
        /// Refill rate in tokens per minute.
        per_minute: u32,
        /// Bucket capacity (and initial content).
        burst: u32,
    },
    /// An exact sliding log: at most `limit` requests are accepted in any
    /// half-open time window of length `window`.
    RollingWindow {
        /// Maximum number of accepted requests per window.
        limit: u32,
        /// Window length.
        window: Duration,
    },
}

/// Configuration of a [`SimServer`](crate::SimServer).
///
/// All fields are public; start from [`SimConfig::default`] (realistic,
/// slow-ish streaming) or [`SimConfig::fast`] (benchmarks) and override what
/// you need, or use the `with_*` builder methods.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Accepted keys (`Authorization: Bearer <key>`). Empty means "accept any
    /// key" (a missing `Authorization` header is still rejected with 401).
    pub keys: Vec<String>,
    /// Keys answered with NVIDIA's 403 `Authorization failed` body.
    pub forbidden_keys: Vec<String>,
    /// Per-key rate limit on the `POST` endpoints; `None` means unlimited.
    pub rate_limit: Option<SimRateLimit>,
    /// If set, rate-limited responses carry `Retry-After: <whole seconds,
    /// rounded up>`. NVIDIA sends none, which is the default.
    pub retry_after: Option<Duration>,
    /// Number of content chunks in a streamed chat completion (the final
    /// `finish_reason: "stop"` chunk, the optional usage chunk and
    /// `[DONE]` come on top).
    pub stream_chunks: usize,
    /// Delay between two streamed content chunks.
    pub chunk_interval: Duration,
    /// Delay between the response headers and the first streamed chunk.
    pub first_chunk_delay: Duration,
    /// Delay before response headers are sent, for every request.
    pub response_delay: Duration,
    /// Model ids listed by `GET /v1/models`.
    pub models: Vec<String>,
    /// If `true`, chat/embeddings requests for a model not in
    /// [`models`](Self::models) get NVIDIA's 404 "Function … Not found for
    /// account" problem body. Off by default: any model name is served.
    pub strict_models: bool,
    /// Record per-key accept timestamps (see
    /// [`SimStats::max_in_any_window`](crate::SimStats::max_in_any_window)).
    /// On by default, off in [`SimConfig::fast`] so long benchmarks do not
    /// grow memory.
    pub record_accepts: bool,
    /// Record a copy of the last request's headers in the stats. On by
    /// default, off in [`SimConfig::fast`].
    pub record_headers: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            forbidden_keys: Vec::new(),
            rate_limit: None,
            retry_after: None,
            stream_chunks: 8,
            chunk_interval: Duration::from_millis(20),
            first_chunk_delay: Duration::ZERO,
            response_delay: Duration::ZERO,
            models: DEFAULT_MODELS.iter().map(|m| (*m).to_owned()).collect(),
            strict_models: false,
            record_accepts: true,
            record_headers: true,
        }
    }
}

impl SimConfig {
    /// A configuration for benchmarks: accepts any key, no rate limit, no
    /// delays, no recording of accept timestamps or headers.
    pub fn fast() -> Self {
        Self {
            chunk_interval: Duration::ZERO,
            record_accepts: false,
            record_headers: false,
            ..Self::default()
        }
    }

    /// Sets the accepted keys.
    pub fn with_keys<I, S>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.keys = keys.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the keys answered with 403.
    pub fn with_forbidden_keys<I, S>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.forbidden_keys = keys.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the per-key rate limit.
    pub fn with_rate_limit(mut self, limit: SimRateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// Makes 429 responses carry a `Retry-After` header.
    pub fn with_retry_after(mut self, retry_after: Duration) -> Self {
        self.retry_after = Some(retry_after);
        self
    }

    /// Sets the streaming shape: number of content chunks and the interval
    /// between them.
    pub fn with_stream(mut self, chunks: usize, interval: Duration) -> Self {
        self.stream_chunks = chunks;
        self.chunk_interval = interval;
        self
    }

    /// Sets the delay before the first streamed chunk.
    pub fn with_first_chunk_delay(mut self, delay: Duration) -> Self {
        self.first_chunk_delay = delay;
        self
    }

    /// Sets the delay before response headers.
    pub fn with_response_delay(mut self, delay: Duration) -> Self {
        self.response_delay = delay;
        self
    }

    /// Sets the listed models.
    pub fn with_models<I, S>(mut self, models: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.models = models.into_iter().map(Into::into).collect();
        self
    }
}
