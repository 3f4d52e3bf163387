//! Configuration of a simulated NIM server.

use std::collections::HashMap;
use std::time::Duration;

/// Models listed by `GET /v1/models` in the default configuration.
pub const DEFAULT_MODELS: &[&str] = &[
    "meta/llama-3.1-8b-instruct",
    "meta/llama-3.3-70b-instruct",
    "deepseek-ai/deepseek-v4-pro",
    "nvidia/nv-embedqa-e5-v5",
];

/// A request rate limit enforced by the simulator on `POST` endpoints
/// (`/v1/chat/completions`, `/v1/embeddings`), per account (see
/// [`SimConfig::accounts`]; a key without an account is its own account).
///
/// Requests beyond the limit get NVIDIA's bare
/// `429 {"status":429,"title":"Too Many Requests"}`. Every accepted request
/// counts once, whatever its answer (a 400 after acceptance counts too).
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
    /// A fixed-window counter: at most `limit` requests are accepted per
    /// period, and the count resets at every multiple of `period` counted
    /// from the server's start (period `n` is the half-open interval
    /// `[start + n·period, start + (n+1)·period)`). Models a "per day, resets
    /// at midnight" cap; tests use short periods. A zero `period` never
    /// resets (a lifetime cap).
    FixedWindow {
        /// Maximum number of accepted requests per period.
        limit: u64,
        /// Period length.
        period: Duration,
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
    /// Rate limit on the `POST` endpoints, per account (see
    /// [`accounts`](Self::accounts)); `None` means unlimited. This is the
    /// limit described by the [`limit_headers`](Self::limit_headers).
    pub rate_limit: Option<SimRateLimit>,
    /// Further request limits enforced together with
    /// [`rate_limit`](Self::rate_limit) (e.g. a per-minute and a per-day
    /// cap). A request is accepted only if every limit has room; all are
    /// checked before any is charged, so a refused request charges none.
    /// Empty by default.
    pub extra_limits: Vec<SimRateLimit>,
    /// Key → account name. Every limit (request limits, the token limit and
    /// [`max_concurrent`](Self::max_concurrent)) is counted per account and
    /// shared by all the account's keys. A key without an entry is its own
    /// account, named by the key itself (so an account name equal to an
    /// unmapped key merges the two). Empty by default: one account per key.
    pub accounts: HashMap<String, String>,
    /// Fixed `completion_tokens` reported (and charged) for every chat
    /// completion. `None` (the default): the number of whitespace-separated
    /// words of the answer for a plain completion, the number of content
    /// chunks with non-empty content ([`stream_chunks`](Self::stream_chunks),
    /// fewer when a stop string cut the text) for a stream; for tool calls,
    /// plain or streamed, one per call plus one per argument fragment (see
    /// the crate docs, "Chat completion answers").
    ///
    /// `prompt_tokens` is the request body's length in bytes divided by 4,
    /// rounded down, except that each `image_url` part counts 85 tokens
    /// instead of the bytes of its URL.
    pub completion_tokens: Option<u64>,
    /// A token rate limit per account: `(limit, window)`. A `POST` request
    /// is refused with 429 if the tokens charged to its account in the last
    /// `window` (a charge at `t` counts during the half-open `[t, t +
    /// window)`) are already `>= limit`. Tokens (`usage.total_tokens`) are
    /// charged when the answer is produced: for a stream, in full when its
    /// response head is produced, even if the client abandons it. So one
    /// request admitted just below the limit can overshoot it; see
    /// [`AccountStats::max_tokens_in_window`](crate::AccountStats::max_tokens_in_window).
    /// `None` (the default): no token limit.
    pub token_limit: Option<(u64, Duration)>,
    /// If `true`, every answer to a `POST` from the rate-limit step on (200,
    /// 429, and a 400/404 after acceptance) carries OpenAI/Groq-style
    /// `x-ratelimit-{limit,remaining,reset}-requests` headers describing the
    /// account's [`rate_limit`](Self::rate_limit) (when set), and the
    /// `-tokens` variants describing [`token_limit`](Self::token_limit)
    /// (when set). Resets are Go-style durations (`1m26.4s`, `7.66s`,
    /// `185ms`, `0s`), rounded up to the millisecond, until the limit is
    /// fully restored. Off by default (NVIDIA sends none).
    pub limit_headers: bool,
    /// Maximum requests in flight per account: a `POST` arriving while that
    /// many of its account's accepted requests are in flight gets 429. A
    /// request is in flight from its acceptance until its answer is produced
    /// (after [`processing_delay`](Self::processing_delay)), or for a stream
    /// until its body ends or is dropped. `None` (the default): unlimited.
    pub max_concurrent: Option<usize>,
    /// Delay between accepting a `POST` request (after the limits) and
    /// producing its answer (for a stream, its response head). The request
    /// holds its concurrency slot meanwhile. Zero by default.
    pub processing_delay: Duration,
    /// If set, rate-limited responses carry `Retry-After: <whole seconds,
    /// rounded up>`. NVIDIA sends none, which is the default.
    pub retry_after: Option<Duration>,
    /// Number of content chunks in a streamed text answer (the final
    /// `finish_reason: "stop"` chunk, the optional usage chunk and
    /// `[DONE]` come on top; a stop string can make them fewer). Tool-call
    /// streams do not use it.
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
    /// Record a copy of the last request's headers (and body) in the stats.
    /// On by default, off in [`SimConfig::fast`].
    pub record_headers: bool,
    /// Keep the bodies of the last `request_log` requests (every non-empty
    /// body received, whatever its answer), for
    /// [`SimHandle::request_log`](crate::SimHandle::request_log). `0` (the
    /// default, also in [`SimConfig::fast`]) keeps none.
    pub request_log: usize,
    /// Which provider it plays: how it announces limits and words its 429s.
    pub dialect: SimDialect,
    /// Serve requests that carry no key (a local server without auth), as
    /// the key `anonymous`.
    pub anonymous: bool,
}

/// Which provider the simulator plays (`shared/providers.md` §2 has the
/// recorded originals).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SimDialect {
    /// NVIDIA: a bare 429 (`{"status":429,"title":"Too Many Requests"}`),
    /// `x-ratelimit-*-requests`/`-tokens` only with `limit_headers`.
    #[default]
    Nvidia,
    /// Groq: `x-ratelimit-*-requests`/`-tokens` on every answer, a 429 whose
    /// OpenAI-shaped message names the window (`requests per minute (RPM)`)
    /// and the wait (`Please try again in 2s.`), plus `retry-after`.
    Groq,
    /// Cerebras: `x-ratelimit-{limit,remaining,reset}-requests-minute` and
    /// `-tokens-minute` (reset in fractional seconds), a top-level 429 body.
    Cerebras,
    /// OpenRouter: no limit headers; a 429 body whose `metadata.headers`
    /// carry `X-RateLimit-Limit/Remaining/Reset` (reset in Unix ms) of the
    /// account's daily free cap.
    OpenRouter,
    /// Gemini's OpenAI-compatible endpoint: no headers; a 429 body wrapped
    /// in an array with a per-minute `QuotaFailure` and `RetryInfo.retryDelay`.
    Gemini,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            forbidden_keys: Vec::new(),
            rate_limit: None,
            extra_limits: Vec::new(),
            accounts: HashMap::new(),
            completion_tokens: None,
            token_limit: None,
            limit_headers: false,
            max_concurrent: None,
            processing_delay: Duration::ZERO,
            retry_after: None,
            stream_chunks: 8,
            chunk_interval: Duration::from_millis(20),
            first_chunk_delay: Duration::ZERO,
            response_delay: Duration::ZERO,
            models: DEFAULT_MODELS.iter().map(|m| (*m).to_owned()).collect(),
            strict_models: false,
            record_accepts: true,
            record_headers: true,
            request_log: 0,
            dialect: SimDialect::Nvidia,
            anonymous: false,
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

    /// Plays `dialect`'s limit headers and 429 bodies.
    pub fn with_dialect(mut self, dialect: SimDialect) -> Self {
        self.dialect = dialect;
        self
    }

    /// Serves requests without a key (as the key `anonymous`).
    pub fn with_anonymous(mut self, on: bool) -> Self {
        self.anonymous = on;
        self
    }

    /// Sets the (main) rate limit.
    pub fn with_rate_limit(mut self, limit: SimRateLimit) -> Self {
        self.rate_limit = Some(limit);
        self
    }

    /// Adds a limit to [`extra_limits`](Self::extra_limits).
    pub fn with_extra_limit(mut self, limit: SimRateLimit) -> Self {
        self.extra_limits.push(limit);
        self
    }

    /// Replaces [`extra_limits`](Self::extra_limits).
    pub fn with_extra_limits<I>(mut self, limits: I) -> Self
    where
        I: IntoIterator<Item = SimRateLimit>,
    {
        self.extra_limits = limits.into_iter().collect();
        self
    }

    /// Puts every key of `keys` in `account` (see [`accounts`](Self::accounts)).
    pub fn with_account<I, S>(mut self, account: &str, keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        for key in keys {
            self.accounts.insert(key.into(), account.to_owned());
        }
        self
    }

    /// Replaces [`accounts`](Self::accounts) with `(key, account)` pairs.
    pub fn with_accounts<I, K, A>(mut self, pairs: I) -> Self
    where
        I: IntoIterator<Item = (K, A)>,
        K: Into<String>,
        A: Into<String>,
    {
        self.accounts = pairs.into_iter().map(|(k, a)| (k.into(), a.into())).collect();
        self
    }

    /// Fixes the `completion_tokens` of every chat completion.
    pub fn with_completion_tokens(mut self, tokens: u64) -> Self {
        self.completion_tokens = Some(tokens);
        self
    }

    /// Sets the per-account token limit: at most `limit` tokens charged in
    /// any `window` (see [`token_limit`](Self::token_limit)).
    pub fn with_token_limit(mut self, limit: u64, window: Duration) -> Self {
        self.token_limit = Some((limit, window));
        self
    }

    /// Turns the `x-ratelimit-*` headers on or off.
    pub fn with_limit_headers(mut self, on: bool) -> Self {
        self.limit_headers = on;
        self
    }

    /// Sets the per-account maximum of requests in flight.
    pub fn with_max_concurrent(mut self, max: usize) -> Self {
        self.max_concurrent = Some(max);
        self
    }

    /// Sets the delay between accepting a request and answering it.
    pub fn with_processing_delay(mut self, delay: Duration) -> Self {
        self.processing_delay = delay;
        self
    }

    /// The account `key` belongs to: its [`accounts`](Self::accounts) entry,
    /// or the key itself.
    pub fn account_of<'a>(&'a self, key: &'a str) -> &'a str {
        self.accounts.get(key).map_or(key, String::as_str)
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

    /// Keeps the bodies of the last `n` requests (see
    /// [`request_log`](Self::request_log)).
    pub fn with_request_log(mut self, n: usize) -> Self {
        self.request_log = n;
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
