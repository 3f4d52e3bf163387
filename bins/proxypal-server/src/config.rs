//! ProxyPal's configuration: one YAML file, overridable field by field with
//! `PROXYPAL_*` environment variables, validated before any socket is bound.
//!
//! Layers, later ones winning: built-in defaults → the YAML file →
//! environment variables (`PROXYPAL_<FIELD>`, `__` for nesting, e.g.
//! `PROXYPAL_UPSTREAM__BASE_URL`). Then keys from `keys_file` are appended to
//! `keys`, tokens from `auth.tokens_file` to `auth.tokens`, and the result is
//! [validated](Config::validate). `docs/configuration.md` lists every field.
//!
//! An unknown field in the YAML is an error; an unknown `PROXYPAL_*` variable
//! (such as the service links Kubernetes sets, `PROXYPAL_PORT=tcp://…`) is
//! ignored and named in [`Config::warnings`].
//!
//! ```
//! # fn example() -> Result<(), proxypal_server::config::ConfigError> {
//! use proxypal_server::config::{Config, YamlSource};
//!
//! let yaml = "keys: [nvapi-REPLACE-ME-0001]\nrate_limit: { requests_per_minute: 20 }";
//! let env = [("PROXYPAL_RETRY__MAX_ATTEMPTS", "2")];
//! let config = Config::from_sources(Some(YamlSource::Text(yaml)), env, false)?;
//! assert_eq!(config.rate_limit.requests_per_minute, Some(20));
//! assert_eq!(config.retry.max_attempts, 2);
//! assert!(!format!("{config:?}").contains("REPLACE-ME-0001"));
//! # Ok(())
//! # }
//! # example().unwrap();
//! ```

use std::{
    fmt::{self, Write as _},
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use figment::{Figment, Source, providers::Serialized};
use serde::{Deserialize, Deserializer, de};

mod error;
mod limits;
mod parse;
mod path;
mod providers;
mod secret;
mod sources;
mod validate;

pub use error::ConfigError;
pub use limits::{LimitFields, WindowEntry};
pub use providers::{AliasEntry, AuthMode, ProviderEntry, RoutingConfig, ScopeMode, TargetEntry};
pub(crate) use providers::{ProviderView, dialect_named};
pub use secret::{Secret, mask_key};
use sources::{EnvLayer, YamlLayer};

/// Where the YAML layer comes from.
#[derive(Debug, Clone, Copy)]
pub enum YamlSource<'a> {
    /// A file that must exist (it is not searched for in parent directories).
    /// Relative `keys_file`/`auth.tokens_file` paths in it are resolved
    /// against the file's directory.
    File(&'a Path),
    /// YAML text, e.g. in tests. Relative paths in it are resolved against the
    /// current directory.
    Text(&'a str),
}

/// The whole configuration. See `docs/configuration.md` for every field.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// Address the proxy listens on. Default `127.0.0.1:8080`.
    #[serde(deserialize_with = "parse::socket_addr")]
    pub listen: SocketAddr,
    /// Where requests go and how long to wait for them.
    pub upstream: UpstreamConfig,
    /// Upstream API keys: from `keys`, or `PROXYPAL_KEYS` (which replaces
    /// `keys`), followed by those from `keys_file`.
    pub keys: Vec<KeyEntry>,
    /// Optional file with one key per line, appended to `keys`.
    pub keys_file: Option<PathBuf>,
    /// Every key's (or account's) limits unless it overrides a field; over
    /// the built-in default of 40 requests in any rolling minute.
    pub rate_limit: LimitFields,
    /// Budgets shared by several keys (`keys[].account`): each account's
    /// fields over `rate_limit`.
    pub accounts: std::collections::BTreeMap<String, LimitFields>,
    /// Several upstream providers by name; replaces the single-provider
    /// fields (`upstream.base_url`, `keys`, `keys_file`, `rate_limit`,
    /// `accounts`), which then must not be set.
    pub providers: std::collections::BTreeMap<String, ProviderEntry>,
    /// Public model names (aliases) and their targets.
    pub models: std::collections::BTreeMap<String, AliasEntry>,
    /// Where names that are no alias go, and the models list.
    pub routing: RoutingConfig,
    /// Failover, queueing and cooldowns.
    pub retry: RetryConfig,
    /// Cross-origin requests from browsers.
    pub cors: CorsConfig,
    /// Client authentication: operator tokens.
    pub auth: AuthConfig,
    /// Named clients, each with its token, own quota, model list, weight
    /// and admin flag.
    pub clients: Vec<ClientEntry>,
    /// Where events (a key disabled, a pool exhausted, a budget at 80 %, …)
    /// are POSTed, signed.
    pub webhooks: Vec<WebhookEntry>,
    /// The usage ledger: one row per finished request.
    pub ledger: LedgerSection,
    /// The response cache (off by default).
    pub cache: CacheSection,
    /// Request size and concurrency caps.
    pub limits: LimitsConfig,
    /// Logging.
    pub log: LogConfig,
    /// Where quota state is kept across restarts.
    pub state: StateConfig,
    /// Quotas shared by several replicas through Redis (absent: this process
    /// counts alone).
    pub shared: Option<SharedConfig>,
    /// How long shutdown waits for in-flight requests (streams included)
    /// before closing them. Default 30 s.
    #[serde(deserialize_with = "parse::duration")]
    pub shutdown_grace: Duration,
    /// Worker threads, each with its own event loop and upstream connections
    /// (connections stay on the thread that accepted them, like nginx's
    /// worker processes; the key pool, limits and stats are shared). Default:
    /// one per CPU core the process may use.
    pub workers: Option<usize>,
    /// Problems that did not stop loading, such as unknown `PROXYPAL_*`
    /// variables; the caller logs them. Each names a variable, never its
    /// value. Not read from any layer.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// The upstream OpenAI-compatible API.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct UpstreamConfig {
    /// Base URL: a client's `/v1/<rest>` goes to `<base_url>/<rest>`.
    /// `http://` or `https://`; a trailing `/` is removed on load.
    /// Default `https://integrate.api.nvidia.com/v1`.
    pub base_url: String,
    /// Limit for establishing a connection (TCP + TLS). Default 5 s.
    #[serde(deserialize_with = "parse::duration")]
    pub connect_timeout: Duration,
    /// Limit from sending the request until the upstream's response headers
    /// arrive. Default 300 s (slow models think before the first byte).
    #[serde(deserialize_with = "parse::duration")]
    pub response_timeout: Duration,
    /// Longest silence allowed inside a streaming response body. Default 180 s.
    #[serde(deserialize_with = "parse::duration")]
    pub idle_timeout: Duration,
    /// `User-Agent` sent upstream instead of the client's.
    /// Default `proxypal/<version>`.
    pub user_agent: String,
    /// Ask for `usage` in streams the client did not ask it for (as
    /// `providers.<name>.stream_usage`). Default `false`.
    pub stream_usage: bool,
    /// Optional PEM file of root certificates trusted for an `https://`
    /// upstream *besides* the built-in Mozilla roots: a private CA, or a
    /// TLS-inspecting corporate proxy. A relative path in the YAML file is
    /// relative to that file's directory. Default none.
    pub ca_file: Option<PathBuf>,
}

/// Where a [`KeyEntry`] came from, for error messages and the summary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyOrigin {
    /// The `keys` list (YAML or `PROXYPAL_KEYS`), or added by the caller.
    #[default]
    Config,
    /// A line of `keys_file`.
    KeysFile {
        /// 1-based line number.
        line: usize,
    },
}

/// One upstream API key, its account and its own limits.
///
/// In YAML a key is either a plain string or a map `{ key, name, account, …
/// }` with any of the [`LimitFields`]. `Debug` shows the key masked.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct KeyEntry {
    /// The secret key, sent upstream as `Authorization: Bearer <key>`.
    pub key: Secret,
    /// A label for logs and stats (defaults to the masked key).
    pub name: Option<String>,
    /// The account whose budget the key shares; none: its own.
    pub account: Option<String>,
    /// The key's own limits: over `rate_limit` for a key without an account;
    /// extra limits of this key alone for a key with one.
    pub limits: LimitFields,
    /// Where the key was configured.
    pub origin: KeyOrigin,
}

impl KeyEntry {
    /// A key with no name and the default rate limit.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            key: Secret::new(key.into()),
            name: None,
            account: None,
            limits: LimitFields::default(),
            origin: KeyOrigin::Config,
        }
    }

    /// The name if set, otherwise the masked key: safe to log.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.key.masked())
    }
}

impl<'de> Deserialize<'de> for KeyEntry {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct KeyMap {
            #[serde(deserialize_with = "secret::secret")]
            key: Secret,
            #[serde(default)]
            name: Option<String>,
            #[serde(default)]
            account: Option<String>,
            #[serde(default)]
            requests_per_minute: Option<u64>,
            #[serde(default)]
            burst: Option<u32>,
            #[serde(default)]
            requests_per_day: Option<u64>,
            #[serde(default)]
            day_reset: Option<String>,
            #[serde(default)]
            tokens_per_minute: Option<u64>,
            #[serde(default)]
            tokens_per_day: Option<u64>,
            #[serde(default)]
            max_concurrent: Option<u32>,
            #[serde(default, deserialize_with = "parse::optional_duration")]
            margin: Option<Duration>,
            #[serde(default)]
            windows: Option<Vec<WindowEntry>>,
        }

        struct KeyVisitor;

        impl<'de> de::Visitor<'de> for KeyVisitor {
            type Value = KeyEntry;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(
                    "a key string, or a map with `key` and optional `name`, `account` and limit fields (`requests_per_minute`, `burst`, `requests_per_day`, …)",
                )
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyEntry, E> {
                Ok(KeyEntry::new(v))
            }

            // Numbers are rejected without quoting them: they may be a key.
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<KeyEntry, E> {
                Err(E::invalid_type(de::Unexpected::Other("a number (quote the key)"), &self))
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<KeyEntry, E> {
                Err(E::invalid_type(de::Unexpected::Other("a number (quote the key)"), &self))
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<KeyEntry, E> {
                Err(E::invalid_type(de::Unexpected::Other("a number (quote the key)"), &self))
            }

            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<KeyEntry, A::Error> {
                let m = KeyMap::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let limits = LimitFields {
                    requests_per_minute: m.requests_per_minute,
                    burst: m.burst,
                    requests_per_day: m.requests_per_day,
                    day_reset: m.day_reset,
                    tokens_per_minute: m.tokens_per_minute,
                    tokens_per_day: m.tokens_per_day,
                    max_concurrent: m.max_concurrent,
                    margin: m.margin,
                    windows: m.windows,
                };
                Ok(KeyEntry {
                    key: m.key,
                    name: m.name,
                    account: m.account,
                    limits,
                    origin: KeyOrigin::Config,
                })
            }
        }

        deserializer.deserialize_any(KeyVisitor)
    }
}

/// Failover, queueing and cooldown policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RetryConfig {
    /// Upstream attempts per client request, each on another key (1–10).
    /// Default 3.
    pub max_attempts: u32,
    /// How long a request may wait for a key with capacity. Default 30 s.
    #[serde(deserialize_with = "parse::duration")]
    pub queue_timeout: Duration,
    /// How long a key rests after an upstream 429 without `Retry-After`.
    /// Default 60 s.
    #[serde(deserialize_with = "parse::duration")]
    pub rate_limit_cooldown: Duration,
    /// Base cooldown after a 5xx, connect error or timeout; doubles per
    /// consecutive failure. Default 2 s.
    #[serde(deserialize_with = "parse::duration")]
    pub failure_cooldown: Duration,
    /// Cap on the doubled failure cooldown. Default 60 s.
    #[serde(deserialize_with = "parse::duration")]
    pub max_failure_cooldown: Duration,
}

/// Cross-origin resource sharing.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CorsConfig {
    /// `[]` = CORS off (default); `["*"]` = any origin; otherwise exact
    /// origins such as `https://app.example.com`.
    pub allowed_origins: Vec<String>,
}

impl CorsConfig {
    /// Whether CORS headers are sent at all.
    pub fn enabled(&self) -> bool {
        !self.allowed_origins.is_empty()
    }

    /// Whether any origin is allowed (`["*"]`).
    pub fn any_origin(&self) -> bool {
        self.allowed_origins.iter().any(|o| o == "*")
    }
}

/// Client authentication (enforced from issue 4 on; parsed and validated now).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AuthConfig {
    /// Tokens clients present; `PROXYPAL_AUTH__TOKENS` (comma-separated)
    /// replaces the YAML list, and `tokens_file` entries are appended.
    #[serde(deserialize_with = "secret::secrets")]
    pub tokens: Vec<Secret>,
    /// Optional file with one token per line.
    pub tokens_file: Option<PathBuf>,
    /// Serve clients without a token. Default `false`.
    pub allow_unauthenticated: bool,
}

/// One webhook endpoint (`webhooks[]`). Its `Debug` shows only where the
/// URL points (a webhook URL's path is often a credential).
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct WebhookEntry {
    /// Where deliveries are POSTed (`http://` or `https://`).
    pub url: String,
    /// The events it receives (`key.disabled`, `key.recovered`,
    /// `pool.exhausted`, `pool.recovered`, `quota.warning`,
    /// `client.quota_exhausted`); empty: all.
    #[serde(default)]
    pub events: Vec<String>,
    /// `whsec_<base64>`: signs each delivery (Standard Webhooks).
    #[serde(default, deserialize_with = "secret::optional_secret")]
    pub secret: Option<Secret>,
}

impl fmt::Debug for WebhookEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = match self.url.parse::<http::Uri>() {
            Ok(u) => {
                format!("{}://{}/…", u.scheme_str().unwrap_or("?"), u.authority().map_or("?", |a| a.host()))
            }
            Err(_) => "…".to_owned(),
        };
        f.debug_struct("WebhookEntry")
            .field("url", &shown)
            .field("events", &self.events)
            .field("secret", &self.secret)
            .finish()
    }
}

/// One named client (`clients[]`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClientEntry {
    /// Its name: in stats, the ledger, logs and webhooks.
    pub name: String,
    /// The token it presents (or `token_file`).
    #[serde(default, deserialize_with = "secret::optional_secret")]
    pub token: Option<Secret>,
    /// A file whose first non-empty line is the token (relative to the
    /// config file).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// At most this many requests in any rolling 60 s.
    #[serde(default)]
    pub requests_per_minute: Option<u64>,
    /// At most this many requests per day.
    #[serde(default)]
    pub requests_per_day: Option<u64>,
    /// `rolling` (default) or `"HH:MM <IANA zone>"`.
    #[serde(default)]
    pub day_reset: Option<String>,
    /// At most this many tokens in any rolling 60 s.
    #[serde(default)]
    pub tokens_per_minute: Option<u64>,
    /// At most this many tokens per day.
    #[serde(default)]
    pub tokens_per_day: Option<u64>,
    /// Requests in flight at once.
    #[serde(default)]
    pub max_concurrent: Option<u32>,
    /// Public model names it may use, as globs (`meta/*`); empty: all.
    #[serde(default)]
    pub models: Vec<String>,
    /// Its share of the pool when clients compete (1–1000, default 1).
    #[serde(default = "one")]
    pub weight: u32,
    /// May read everyone's usage and use `/stats`, `/metrics`, `/admin/*`.
    #[serde(default)]
    pub admin: bool,
}

fn one() -> u32 {
    1
}

impl ClientEntry {
    /// Its own quota as the quota engine's fields (no margin: a client's
    /// window is the proxy's own promise, not an upstream's to stay under).
    pub fn limit_fields(&self) -> LimitFields {
        LimitFields {
            requests_per_minute: self.requests_per_minute,
            requests_per_day: self.requests_per_day,
            day_reset: self.day_reset.clone(),
            tokens_per_minute: self.tokens_per_minute,
            tokens_per_day: self.tokens_per_day,
            max_concurrent: self.max_concurrent,
            margin: Some(Duration::ZERO),
            ..LimitFields::default()
        }
    }
}

/// Request size and concurrency caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct LimitsConfig {
    /// Largest request body accepted, in bytes (an integer, or a string
    /// such as `"32 MiB"`). Default 32 MiB.
    #[serde(deserialize_with = "parse::byte_size")]
    pub max_body_bytes: usize,
    /// Most client requests served at once. Default 1024.
    pub max_inflight: usize,
}

/// Quotas shared by several replicas through Redis: every request window,
/// cooldown and disabled key decided there; a local share of each window
/// while Redis is out of reach. See `docs/replicas.md`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct SharedConfig {
    /// `redis://host:port/db` or `rediss://…` (TLS). Required.
    pub redis_url: String,
    /// Namespace of every Redis key. Default `proxypal`.
    pub key_prefix: String,
    /// Deadline of each Redis call on the request path. Default 50 ms.
    #[serde(deserialize_with = "parse::duration")]
    pub timeout: Duration,
    /// Refuse to start until Redis answers. Default false (start degraded).
    pub require_on_start: bool,
    /// The replicas of the deployment, at least: a replica that never reached
    /// Redis takes ⌊limit / replicas⌋ of each window. Default 0 (count them
    /// from heartbeats).
    pub replicas: u64,
    /// How long one heartbeat keeps a replica counted as live. Default 3 s.
    #[serde(deserialize_with = "parse::duration")]
    pub lease: Duration,
    /// How often heartbeats go out. Default 1 s.
    #[serde(deserialize_with = "parse::duration")]
    pub heartbeat: Duration,
    /// The longest a replica serves from its local share without Redis;
    /// after it, it serves nothing until Redis is back. Default 15 min.
    #[serde(deserialize_with = "parse::duration")]
    pub max_degraded: Duration,
    /// For `rediss://`: a PEM file of the CA(s) to trust instead of the
    /// system's roots (relative to the YAML file's directory).
    pub ca_file: Option<PathBuf>,
}

impl Default for SharedConfig {
    fn default() -> Self {
        let d = proxypal_gateway::replicas::SharedQuotaConfig::new("");
        Self {
            redis_url: String::new(),
            key_prefix: d.key_prefix,
            timeout: d.timeout,
            require_on_start: d.require_on_start,
            replicas: d.replicas,
            lease: d.lease,
            heartbeat: d.heartbeat,
            max_degraded: d.max_degraded,
            ca_file: None,
        }
    }
}

impl std::fmt::Debug for SharedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedConfig")
            .field("redis_url", &proxypal_gateway::replicas::redacted(&self.redis_url))
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("require_on_start", &self.require_on_start)
            .field("replicas", &self.replicas)
            .field("lease", &self.lease)
            .field("heartbeat", &self.heartbeat)
            .field("max_degraded", &self.max_degraded)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// Where quota state (windows, cooldowns, disabled keys) is kept across
/// restarts.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct StateConfig {
    /// The embedded store (SQLite). A relative path in the YAML file is
    /// relative to that file's directory. `null` keeps no state (every
    /// restart starts with empty windows). Default `proxypal-state.db`;
    /// `--dev` uses a temporary file.
    pub path: Option<PathBuf>,
}

/// Where the usage ledger is kept (`ledger:`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct LedgerSection {
    /// Record finished requests at all. Default `true` (with SQLite, only
    /// when there is a state file or a `path`).
    pub enabled: bool,
    /// `sqlite` (default: a file beside the state file) or `postgres` (one
    /// ledger for every replica).
    pub backend: LedgerBackend,
    /// The SQLite file (relative to the config file). Default: the state
    /// file's name with `-ledger` before its extension.
    pub path: Option<PathBuf>,
    /// `postgres://user:password@host:port/database` (or a key=value
    /// conninfo). Required with `backend: postgres`; never logged whole.
    #[serde(default, deserialize_with = "secret::optional_secret")]
    pub url: Option<Secret>,
    /// Rows older than this are pruned (hourly). Default 90 days.
    #[serde(deserialize_with = "parse::duration")]
    pub retention: Duration,
    /// Records waiting to be written, at most (while the database is away,
    /// say); more are dropped and counted. Default 65 536.
    pub buffer: usize,
}

impl Default for LedgerSection {
    fn default() -> Self {
        Self {
            enabled: true,
            backend: LedgerBackend::Sqlite,
            path: None,
            url: None,
            retention: Duration::from_secs(90 * 24 * 3600),
            buffer: 65_536,
        }
    }
}

/// The response cache (`cache:`): an exact-match cache of successful
/// answers, off unless `enabled`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct CacheSection {
    /// Answer repeated requests from the cache. Default `false`.
    pub enabled: bool,
    /// How long an entry lives. Default 1 h.
    #[serde(deserialize_with = "parse::duration")]
    pub ttl: Duration,
    /// The memory cache's bound (`64MiB`). Default 64 MiB.
    #[serde(deserialize_with = "parse::byte_size")]
    pub max_bytes: usize,
    /// The largest answer stored (`1MiB`). Default 1 MiB.
    #[serde(deserialize_with = "parse::byte_size")]
    pub max_entry_bytes: usize,
    /// `memory` (this process) or `redis` (`shared.redis_url`, every replica).
    pub backend: CacheBackend,
    /// One entry for every client asking the same thing. Default `false`:
    /// each client has its own.
    pub shared_between_clients: bool,
    /// Cache requests with `temperature` above 0 or `n` above 1 too.
    /// Default `false`.
    pub cache_sampled: bool,
}

impl Default for CacheSection {
    fn default() -> Self {
        let d = proxypal_cache::CacheSettings::default();
        Self {
            enabled: false,
            ttl: d.ttl,
            max_bytes: usize::try_from(d.max_bytes).unwrap_or(usize::MAX),
            max_entry_bytes: usize::try_from(d.max_entry_bytes).unwrap_or(usize::MAX),
            backend: CacheBackend::Memory,
            shared_between_clients: d.shared_between_clients,
            cache_sampled: d.cache_sampled,
        }
    }
}

impl CacheSection {
    /// The library's settings.
    pub fn settings(&self) -> proxypal_cache::CacheSettings {
        proxypal_cache::CacheSettings {
            ttl: self.ttl,
            max_bytes: self.max_bytes as u64,
            max_entry_bytes: self.max_entry_bytes as u64,
            shared_between_clients: self.shared_between_clients,
            cache_sampled: self.cache_sampled,
        }
    }
}

/// Where cached answers live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum CacheBackend {
    /// In this process.
    #[default]
    Memory,
    /// In Redis (`shared.redis_url`), shared by replicas.
    Redis,
}

/// The ledger's database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum LedgerBackend {
    /// An embedded SQLite file.
    #[default]
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self { path: Some(PathBuf::from("proxypal-state.db")) }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct LogConfig {
    /// A `tracing` `EnvFilter` directive such as `info` or
    /// `proxypal=debug,info`. `RUST_LOG`, when set, overrides it.
    pub level: String,
    /// Output format. Default `text`.
    pub format: LogFormat,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
            upstream: UpstreamConfig::default(),
            keys: Vec::new(),
            keys_file: None,
            rate_limit: LimitFields::builtin(),
            accounts: std::collections::BTreeMap::new(),
            providers: std::collections::BTreeMap::new(),
            models: std::collections::BTreeMap::new(),
            routing: RoutingConfig::default(),
            retry: RetryConfig::default(),
            cors: CorsConfig::default(),
            auth: AuthConfig::default(),
            clients: Vec::new(),
            webhooks: Vec::new(),
            ledger: LedgerSection::default(),
            cache: CacheSection::default(),
            limits: LimitsConfig::default(),
            log: LogConfig::default(),
            state: StateConfig::default(),
            shared: None,
            shutdown_grace: Duration::from_secs(30),
            workers: None,
            warnings: Vec::new(),
        }
    }
}

// The defaults below are the libraries' own, stated once there: the upstream
// client's, the gateway's, the key pool's cooldowns, the limiter's quota.

impl Default for UpstreamConfig {
    fn default() -> Self {
        let d = proxypal_gateway::upstream::UpstreamConfig::default();
        Self {
            base_url: d.base_url.to_string().trim_end_matches('/').to_owned(),
            connect_timeout: d.connect_timeout,
            response_timeout: d.response_timeout,
            idle_timeout: d.idle_timeout,
            // The library's default is a static ASCII value.
            user_agent: d.user_agent.to_str().unwrap_or_default().to_owned(),
            ca_file: None,
            stream_usage: false,
        }
    }
}

impl UpstreamConfig {
    /// The certificates in [`ca_file`](Self::ca_file); none without one.
    ///
    /// # Errors
    ///
    /// Why the file cannot be read or holds no usable certificate, naming the
    /// file (but not the field: callers prefix `upstream.ca_file`).
    pub fn extra_root_certificates(
        &self,
    ) -> Result<Vec<proxypal_gateway::upstream::CertificateDer<'static>>, String> {
        let Some(path) = &self.ca_file else {
            return Ok(Vec::new());
        };
        let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        proxypal_gateway::upstream::parse_pem_certificates(&pem)
            .map_err(|e| format!("{}: {e}", path.display()))
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        let gateway = proxypal_gateway::GatewayConfig::default();
        let cooldowns = proxypal_gateway::keypool::CooldownPolicy::default();
        Self {
            max_attempts: u32::try_from(gateway.max_attempts).unwrap_or(u32::MAX),
            queue_timeout: gateway.queue_timeout,
            rate_limit_cooldown: cooldowns.rate_limited,
            failure_cooldown: cooldowns.failure_base,
            max_failure_cooldown: cooldowns.failure_max,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let gateway = proxypal_gateway::GatewayConfig::default();
        Self { max_body_bytes: gateway.max_body_bytes, max_inflight: gateway.max_inflight }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".to_owned(), format: LogFormat::Text }
    }
}

/// Requests per minute per key in `--dev`: high enough not to get in the way
/// of local testing against the simulator.
const DEV_REQUESTS_PER_MINUTE: u64 = 600;

/// # Loading
impl Config {
    /// Loads the config for a normal run: defaults, then the YAML file at
    /// `path` (if given; it must exist), then the process's `PROXYPAL_*`
    /// environment variables; then `keys_file`/`auth.tokens_file`; then
    /// [`validate`](Self::validate) with `dev = false`.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::from_sources(path.map(YamlSource::File), process_env(), false)
    }

    /// Like [`load`](Self::load), but starting from [`Config::dev`]'s
    /// defaults and validating with `dev = true` (no keys needed: the caller
    /// supplies them).
    pub fn load_dev(path: Option<&Path>) -> Result<Self, ConfigError> {
        Self::from_sources(path.map(YamlSource::File), process_env(), true)
    }

    /// Loads from explicit sources: `env` stands for the environment (only
    /// `PROXYPAL_*` names are used), so tests need not touch the process's.
    ///
    /// Steps: defaults ([`Config::default`], or [`Config::dev`] when `dev`) →
    /// YAML → env → append `keys_file` and `auth.tokens_file` entries →
    /// remove trailing `/` from `upstream.base_url` → [`validate`](Self::validate).
    ///
    /// A `PROXYPAL_*` variable that names no field is ignored, with a message
    /// in [`warnings`](Self::warnings); one that names a field but holds a bad
    /// value is an error, as is an unknown field in the YAML.
    pub fn from_sources<I, K, V>(yaml: Option<YamlSource<'_>>, env: I, dev: bool) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: AsRef<str>,
    {
        // The built-in limits as a layer, so that a file setting one
        // `rate_limit` field keeps the others (a struct default would not).
        let builtin = LimitFields::builtin();
        let mut figment = Figment::new()
            .merge(Serialized::default("rate_limit.requests_per_minute", builtin.requests_per_minute))
            .merge(Serialized::default(
                "rate_limit.margin",
                builtin.margin.map(|m| humantime::format_duration(m).to_string()),
            ));
        if dev {
            // Only what differs from `Config::default()`; a test checks that
            // this and `Config::dev()` agree.
            figment = figment
                .merge(Serialized::default("rate_limit.requests_per_minute", DEV_REQUESTS_PER_MINUTE))
                .merge(Serialized::default("auth.allow_unauthenticated", true))
                .merge(Serialized::default("cache.enabled", true));
        }
        let config_dir = match &yaml {
            Some(YamlSource::File(path)) => path.parent().map(Path::to_owned),
            _ => None,
        };
        match yaml {
            Some(YamlSource::File(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::ReadConfigFile { path: path.to_owned(), source })?;
                figment = figment.merge(YamlLayer::file(path, text));
            }
            Some(YamlSource::Text(text)) => figment = figment.merge(YamlLayer::text(text)),
            None => {}
        }
        let (figment, mut config) = extract(figment, EnvLayer::new(env))?;

        if let Some(file) = config.keys_file.clone() {
            let path = resolve_path(&figment, "keys_file", &file);
            for line in read_list_file("keys_file", &path)? {
                config.keys.push(KeyEntry {
                    origin: KeyOrigin::KeysFile { line: line.line },
                    ..KeyEntry::new(line.value)
                });
            }
            config.keys_file = Some(path);
        }
        for (name, provider) in &mut config.providers {
            if let Some(file) = provider.keys_file.clone() {
                let path = resolve_path(&figment, &format!("providers.{name}.keys_file"), &file);
                for line in read_list_file("keys_file", &path)? {
                    provider.keys.push(KeyEntry {
                        origin: KeyOrigin::KeysFile { line: line.line },
                        ..KeyEntry::new(line.value)
                    });
                }
                provider.keys_file = Some(path);
            }
            if let Some(url) = &mut provider.base_url {
                let trimmed_len = url.trim_end_matches('/').len();
                url.truncate(trimmed_len);
            }
        }
        // Top-level single-provider fields beside `providers`: which layer set them.
        let user_set = |key: &str| {
            figment
                .find_metadata(key)
                .is_some_and(|md| md.name.starts_with("YAML") || md.name == sources::ENV_LAYER_NAME)
        };
        let rate_limit_fields = [
            "requests_per_minute",
            "burst",
            "requests_per_day",
            "day_reset",
            "tokens_per_minute",
            "tokens_per_day",
            "max_concurrent",
            "margin",
            "windows",
        ];
        if !config.providers.is_empty() {
            let mut single =
                ["keys", "keys_file", "accounts", "upstream.base_url"].into_iter().filter(|f| user_set(f));
            let field = single.next().or_else(|| {
                rate_limit_fields.iter().any(|f| user_set(&format!("rate_limit.{f}"))).then_some("rate_limit")
            });
            if let Some(field) = field {
                return Err(ConfigError::invalid(
                    field,
                    format!(
                        "with `providers`, each provider has its own (providers.<name>.{}); move it there",
                        field.trim_start_matches("upstream.")
                    ),
                ));
            }
        }
        if let Some(file) = config.auth.tokens_file.clone() {
            let path = resolve_path(&figment, "auth.tokens_file", &file);
            for line in read_list_file("auth.tokens_file", &path)? {
                config.auth.tokens.push(Secret::new(line.value));
            }
            config.auth.tokens_file = Some(path);
        }
        for (i, client) in config.clients.iter_mut().enumerate() {
            if let Some(file) = client.token_file.clone() {
                let field = format!("clients[{i}].token_file");
                let path = resolve_path(&figment, "clients", &file);
                let first = read_list_file("clients[].token_file", &path)?.into_iter().next();
                let Some(line) = first else {
                    return Err(ConfigError::invalid(field, format!("{} holds no token", path.display())));
                };
                if client.token.is_some() {
                    return Err(ConfigError::invalid(field, "set token or token_file, not both"));
                }
                client.token = Some(Secret::new(line.value));
                client.token_file = Some(path);
            }
        }
        if let Some(file) = config.state.path.clone() {
            // The default (no layer set it) lives beside the config file too.
            config.state.path = Some(match (figment.find_metadata("state.path"), &config_dir) {
                (None, Some(dir)) if file.is_relative() => dir.join(file),
                _ => resolve_path(&figment, "state.path", &file),
            });
        }
        if let Some(file) = config.ledger.path.clone() {
            config.ledger.path = Some(resolve_path(&figment, "ledger.path", &file));
        }
        if let Some(file) = config.upstream.ca_file.clone() {
            config.upstream.ca_file = Some(resolve_path(&figment, "upstream.ca_file", &file));
        }
        if let Some(file) = config.shared.as_ref().and_then(|s| s.ca_file.clone()) {
            let resolved = resolve_path(&figment, "shared.ca_file", &file);
            if let Some(shared) = config.shared.as_mut() {
                shared.ca_file = Some(resolved);
            }
        }
        let trimmed_len = config.upstream.base_url.trim_end_matches('/').len();
        config.upstream.base_url.truncate(trimmed_len);

        config.validate(dev)?;
        Ok(config)
    }

    /// The config `--dev` starts from: listen on `127.0.0.1:8080`, no keys
    /// (the caller adds them), 600 requests per minute per key,
    /// and unauthenticated clients allowed. Everything else is the default.
    pub fn dev() -> Self {
        let mut config = Self::default();
        config.rate_limit.requests_per_minute = Some(DEV_REQUESTS_PER_MINUTE);
        config.auth.allow_unauthenticated = true;
        config.cache.enabled = true;
        config
    }
}

/// Merges `env` over `base` and extracts the config. An unknown field that
/// the env layer sets is dropped from it with a warning, and extraction is
/// tried again; every retry drops at least one variable, so there are at most
/// as many as there are variables. Returns the figment that produced the
/// config (for the metadata of its paths) and the config with its warnings.
fn extract(base: Figment, mut env: EnvLayer) -> Result<(Figment, Config), ConfigError> {
    let mut warnings = Vec::new();
    let mut retries = env.len();
    loop {
        let figment = base.clone().merge(&env);
        match figment.extract::<Config>() {
            Ok(mut config) => {
                config.warnings = warnings;
                return Ok((figment, config));
            }
            Err(error) => {
                let dropped = if retries == 0 { Vec::new() } else { env.drop_unknown_fields(&error) };
                if dropped.is_empty() {
                    return Err(ConfigError::parse(error));
                }
                warnings.extend(dropped);
                retries -= 1;
            }
        }
    }
}

/// The process environment as lossy UTF-8 pairs (`std::env::vars` panics on
/// non-UTF-8 names or values; figment's `Env` is lossy too).
fn process_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().map(|(k, v)| (k.to_string_lossy().into_owned(), v.to_string_lossy().into_owned()))
}

/// A relative path set in a YAML file is relative to that file's directory;
/// one set anywhere else (env, YAML text) is relative to the current directory.
fn resolve_path(figment: &Figment, key: &str, path: &Path) -> PathBuf {
    if path.is_absolute() {
        return path.to_owned();
    }
    let base = figment.find_metadata(key).and_then(|md| match &md.source {
        Some(Source::File(file)) => file.parent().map(Path::to_owned),
        _ => None,
    });
    match base {
        Some(dir) => dir.join(path),
        None => path.to_owned(),
    }
}

fn read_list_file(field: &'static str, path: &Path) -> Result<Vec<sources::ListLine>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadListFile {
        field,
        path: path.to_owned(),
        source,
    })?;
    sources::parse_list_file(&text).map_err(|line| ConfigError::ListFileLine {
        field,
        path: path.to_owned(),
        line,
    })
}

/// A one-line description of the fields that are set, e.g.
/// `40/min, 1000/day (00:00 UTC), burst 10`.
impl Config {
    /// The `providers`, `models` and `routing` part of [`summary`](Self::summary).
    fn summarize_providers(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "providers:  {} (default: {})",
            self.providers.len(),
            self.routing.default_provider.as_deref().unwrap_or("-")
        );
        for (name, p) in &self.providers {
            let preset = p.preset.as_deref().and_then(proxypal_gateway::preset::Preset::get);
            let url = p.base_url.as_deref().or(preset.as_ref().map(|p| p.base_url)).unwrap_or("-");
            let _ = writeln!(s, "  {name}: {url}, preset {}", p.preset.as_deref().unwrap_or("none"));
            match p.auth {
                AuthMode::None => {
                    let _ = writeln!(s, "    auth: none (no keys)");
                }
                AuthMode::Bearer => {
                    let keys: Vec<String> = p.keys.iter().map(|k| k.label()).collect();
                    let _ = writeln!(s, "    keys: {} [{}]", keys.len(), keys.join(", "));
                }
            }
            let mut limits = preset.as_ref().map(|p| p.limits.clone()).unwrap_or_default();
            if let Ok(over) = p.rate_limit.to_limits() {
                limits = limits.overlay(&over);
            }
            let scope = match (p.quota_scope, &preset) {
                (Some(ScopeMode::Account), _) => "for the whole provider",
                (Some(ScopeMode::Key), _) => "per key",
                (None, Some(preset)) if preset.scope == proxypal_gateway::preset::QuotaScope::Account => {
                    "for the whole provider"
                }
                _ => "per key",
            };
            let _ = writeln!(s, "    limits: {} {scope}", describe(&limits));
            if let Some(preset) = &preset {
                let _ = writeln!(s, "    terms: {}", preset.terms);
            }
        }
        for (name, alias) in &self.models {
            let _ = writeln!(s, "model:      {name}");
            for t in &alias.targets {
                let _ = writeln!(s, "  tier {} weight {}: {}/{}", t.tier, t.weight, t.provider, t.model);
            }
        }
        if self.routing.list_provider_models {
            let _ = writeln!(
                s,
                "models list: aliases, the default provider's catalog, provider/id for the others"
            );
        }
    }
}

/// A compiled set of limits in words (`30/min, 1000/day (rolling), 6000 tokens/min`).
fn describe(l: &proxypal_gateway::limiter::Limits) -> String {
    let mut parts = Vec::new();
    if let Some(n) = l.requests_per_minute {
        parts.push(format!("{n}/min"));
    }
    if let Some(n) = l.requests_per_day {
        parts.push(format!(
            "{n}/day ({})",
            l.day_reset.as_ref().map_or("rolling".to_owned(), ToString::to_string)
        ));
    }
    if let Some(n) = l.tokens_per_minute {
        parts.push(format!("{n} tokens/min"));
    }
    if let Some(n) = l.tokens_per_day {
        parts.push(format!("{n} tokens/day"));
    }
    if parts.is_empty() { "none".to_owned() } else { parts.join(", ") }
}

fn describe_limits(l: &LimitFields) -> String {
    let mut parts = Vec::new();
    if let Some(n) = l.requests_per_minute {
        parts.push(format!("{n}/min"));
    }
    if let Some(n) = l.requests_per_day {
        parts.push(format!("{n}/day ({})", l.day_reset.as_deref().unwrap_or("rolling")));
    }
    if let Some(n) = l.tokens_per_minute {
        parts.push(format!("{n} tokens/min"));
    }
    if let Some(n) = l.tokens_per_day {
        parts.push(format!("{n} tokens/day"));
    }
    if let Some(n) = l.burst {
        parts.push(format!("burst {n}"));
    }
    if let Some(n) = l.max_concurrent {
        parts.push(format!("{n} in flight"));
    }
    if let Some(w) = &l.windows {
        parts.push(format!("{} more window(s)", w.len()));
    }
    if let Some(m) = l.margin {
        parts.push(format!("margin {}", fmt_duration(m)));
    }
    if parts.is_empty() { "no limits".to_owned() } else { parts.join(", ") }
}

impl Config {
    /// `rate_limit` over the built-in defaults (40 requests in any rolling
    /// minute, 500 ms margin): what every key or account starts from.
    pub fn default_limit_fields(&self) -> LimitFields {
        let mut fields = self.rate_limit.clone();
        let builtin = proxypal_gateway::limiter::Limits::nvidia_free_tier();
        fields.requests_per_minute = fields.requests_per_minute.or(builtin.requests_per_minute);
        fields.margin = fields.margin.or(builtin.margin);
        fields
    }
}

/// Most worker threads `workers` may ask for.
pub const MAX_WORKERS: usize = 256;

impl Config {
    /// The number of worker threads to run: `workers`, else one per CPU core
    /// the process may use (`std::thread::available_parallelism`, which
    /// honours CPU affinity and cgroup quotas), else 1.
    pub fn worker_count(&self) -> usize {
        self.workers.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get).min(MAX_WORKERS)
        })
    }
}

/// # Reporting
impl Config {
    /// A multi-line, human-readable summary for `--check` and startup logs:
    /// listen address, upstream, every key (masked) with its name and
    /// effective rate, the limits, and a `warning:` line for each of
    /// [`warnings`](Self::warnings). It contains no secrets.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        // Writing to a String cannot fail; the results are ignored.
        let _ = writeln!(s, "listen:     {}", self.listen);
        let u = &self.upstream;
        if self.providers.is_empty() {
            let _ = writeln!(s, "upstream:   {}", u.base_url);
        } else {
            let _ = writeln!(s, "upstream:   every provider:");
        }
        let _ = writeln!(
            s,
            "            connect {}, response {}, idle {}, user-agent {:?}",
            fmt_duration(u.connect_timeout),
            fmt_duration(u.response_timeout),
            fmt_duration(u.idle_timeout),
            u.user_agent
        );
        if let Some(ca_file) = &u.ca_file {
            let _ = writeln!(s, "            extra root certificates from {}", ca_file.display());
        }
        if self.providers.is_empty() {
            let from_file =
                self.keys.iter().filter(|k| matches!(k.origin, KeyOrigin::KeysFile { .. })).count();
            let _ = write!(s, "keys:       {}", self.keys.len());
            if let (Some(file), true) = (&self.keys_file, from_file > 0) {
                let _ = write!(s, " ({from_file} from {})", file.display());
            }
            s.push('\n');
            for (i, key) in self.keys.iter().enumerate() {
                let account = key.account.as_deref().map(|a| format!("account {a}")).unwrap_or_default();
                let own = if key.limits.is_empty() { String::new() } else { describe_limits(&key.limits) };
                let _ = writeln!(
                    s,
                    "  [{i}] {:<14} {:<16} {account}{}{own}",
                    key.key.masked(),
                    key.name.as_deref().unwrap_or("-"),
                    if account.is_empty() || own.is_empty() { "" } else { ", " },
                );
            }
            let _ = writeln!(
                s,
                "rate limit: {} per key (default)",
                describe_limits(&self.default_limit_fields())
            );
            for (name, fields) in &self.accounts {
                let _ = writeln!(s, "account:    {name}: {}", describe_limits(fields));
            }
        } else {
            self.summarize_providers(&mut s);
        }
        let r = &self.retry;
        let _ = writeln!(
            s,
            "retry:      {} attempts, queue {}, 429 cooldown {}, failure cooldown {}..{}",
            r.max_attempts,
            fmt_duration(r.queue_timeout),
            fmt_duration(r.rate_limit_cooldown),
            fmt_duration(r.failure_cooldown),
            fmt_duration(r.max_failure_cooldown)
        );
        let cors = if !self.cors.enabled() {
            "off".to_owned()
        } else if self.cors.any_origin() {
            "any origin".to_owned()
        } else {
            self.cors.allowed_origins.join(", ")
        };
        let _ = writeln!(s, "cors:       {cors}");
        let auth = match (self.auth.tokens.len(), self.auth.allow_unauthenticated) {
            (0, true) => "no client tokens (allowed explicitly on any address)".to_owned(),
            (0, false) => "no client tokens (only allowed on a loopback listen address)".to_owned(),
            (n, _) => format!("{n} client token(s) required on /v1/* and /stats"),
        };
        let _ = writeln!(s, "auth:       {auth}");
        let _ = writeln!(
            s,
            "limits:     body {}, {} in flight",
            fmt_bytes(self.limits.max_body_bytes),
            self.limits.max_inflight
        );
        let format = match self.log.format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        let _ = writeln!(s, "log:        {} ({format})", self.log.level);
        let _ = writeln!(s, "shutdown:   grace {}", fmt_duration(self.shutdown_grace));
        let _ = match self.workers {
            Some(n) => writeln!(s, "workers:    {n}"),
            None => writeln!(s, "workers:    {} (one per CPU core)", self.worker_count()),
        };
        for warning in &self.warnings {
            let _ = writeln!(s, "warning:    {warning}");
        }
        s
    }
}

fn fmt_bytes(bytes: usize) -> String {
    const MIB: usize = 1 << 20;
    const KIB: usize = 1 << 10;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= KIB && bytes.is_multiple_of(KIB) {
        format!("{} KiB", bytes / KIB)
    } else {
        format!("{bytes} bytes")
    }
}

fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}
