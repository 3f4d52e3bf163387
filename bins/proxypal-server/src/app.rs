//! The running proxy's shared state: the key pool with its limiter, the
//! upstream client, the queue, and the parts of the config that can change on
//! reload.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::HeaderValue;
use proxypal_keypool::{CooldownPolicy, Key, KeyPool, KeySpec, RateOverride, ReloadReport, Selected};
use proxypal_limiter::{GovernorLimiter, KeyQuota, RateLimit};
use proxypal_upstream::{Upstream, UpstreamConfig};
use tokio::sync::Semaphore;

use crate::config::{Config, KeyEntry, RateLimitConfig};
use crate::metrics::{KeyMetrics, Metrics};

/// Why the server could not be built from a (valid) config.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The key set was refused (keypool validation).
    #[error("keys: {0}")]
    Keys(#[from] proxypal_keypool::PoolError),
    /// A key cannot go into an HTTP header.
    #[error("keys[{index}]: {source}")]
    KeyHeader {
        /// Position of the key.
        index: usize,
        /// What is wrong (never contains the key).
        source: proxypal_upstream::InvalidKey,
    },
    /// A rate limit is invalid.
    #[error("{field}: {source}")]
    Quota {
        /// The config field.
        field: String,
        /// What is wrong.
        source: proxypal_limiter::QuotaError,
    },
    /// The upstream client could not be built.
    #[error("upstream: {0}")]
    Upstream(#[from] proxypal_upstream::UpstreamBuildError),
    /// `upstream.base_url`, `upstream.user_agent` or `upstream.ca_file` is not
    /// usable.
    #[error("{field}: {reason}")]
    Invalid {
        /// The config field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// What each key set carries besides the keys: built together and swapped
/// together on reload, so indices always agree.
pub struct KeyExtras {
    /// One rate-limit slot per key, by index.
    pub limiter: Arc<dyn RateLimit>,
    /// `Authorization: Bearer <key>` per key, built once (sensitive header values).
    pub auth: Box<[HeaderValue]>,
    /// Metric handles per key, resolved once per key set.
    pub metrics: Box<[Arc<KeyMetrics>]>,
}

impl KeyExtras {
    /// Extras that match no key, for the error path of building them: `new`
    /// drops the pool and returns the error; `reload` checks every quota and
    /// header before swapping, so there it cannot happen.
    fn unusable() -> Self {
        Self { limiter: Arc::new(GovernorLimiter::new([])), auth: Box::new([]), metrics: Box::new([]) }
    }
}

impl std::fmt::Debug for KeyExtras {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyExtras").field("limiter", &self.limiter).finish_non_exhaustive()
    }
}

/// Client tokens, compared in constant time.
#[derive(Default)]
pub struct ClientTokens(Vec<Box<[u8]>>);

impl std::fmt::Debug for ClientTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientTokens({} tokens)", self.0.len())
    }
}

impl ClientTokens {
    /// Whether tokens are required at all.
    pub fn required(&self) -> bool {
        !self.0.is_empty()
    }

    /// Whether `presented` equals one of the tokens. Every token is compared
    /// fully, whatever matches, so timing tells nothing about which prefix was right.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let mut ok = false;
        for token in &self.0 {
            ok |= constant_time_eq(token, presented);
        }
        ok
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= usize::from(x ^ y);
    }
    diff == 0
}

/// The settings that reload may change, read once per request.
#[derive(Debug)]
pub struct Settings {
    /// Upstream attempts per client request.
    pub max_attempts: usize,
    /// How long a request may wait for a key with capacity.
    pub queue_timeout: Duration,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Client tokens.
    pub tokens: ClientTokens,
    /// CORS origins (empty = off).
    pub cors_origins: Vec<String>,
}

/// The proxy's state, shared by every connection.
pub struct App {
    pool: KeyPool<KeyExtras>,
    metrics: Metrics,
    default_rate: ArcSwap<RateLimitConfig>,
    upstream: Upstream,
    settings: ArcSwap<Settings>,
    /// First-come-first-served order for requests waiting for a permit.
    turnstile: Semaphore,
    waiting: AtomicUsize,
    in_flight: Arc<Semaphore>,
    max_inflight: usize,
    started: Instant,
    dev: bool,
    /// Per-key request history for the dashboard (filled by `history::spawn`).
    history: crate::history::History,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").field("pool", &self.pool).finish_non_exhaustive()
    }
}

fn quota(rate: &RateLimitConfig, field: impl FnOnce() -> String) -> Result<KeyQuota, BuildError> {
    KeyQuota::new(rate.requests_per_minute, rate.burst)
        .map_err(|source| BuildError::Quota { field: field(), source })
}

fn specs(keys: &[KeyEntry]) -> Vec<KeySpec> {
    keys.iter()
        .map(|k| {
            let mut spec = KeySpec::new(k.key.expose())
                .with_rate(RateOverride { requests_per_minute: k.requests_per_minute, burst: k.burst });
            spec.name = k.name.clone();
            spec
        })
        .collect()
}

fn extras(
    metrics: &Metrics,
    keys: &[Arc<Key>],
    default: &RateLimitConfig,
    limiter: impl FnOnce(&[(Option<usize>, KeyQuota)]) -> Arc<dyn RateLimit>,
    previous: &[Option<usize>],
) -> Result<KeyExtras, BuildError> {
    let mut layout = Vec::with_capacity(keys.len());
    let mut auth = Vec::with_capacity(keys.len());
    for (index, key) in keys.iter().enumerate() {
        let rate = key.rate();
        let effective = RateLimitConfig {
            requests_per_minute: rate.requests_per_minute.unwrap_or(default.requests_per_minute),
            burst: rate.burst.unwrap_or(default.burst),
        };
        layout
            .push((previous.get(index).copied().flatten(), quota(&effective, || format!("keys[{index}]"))?));
        auth.push(
            proxypal_upstream::bearer(key.secret().expose())
                .map_err(|source| BuildError::KeyHeader { index, source })?,
        );
    }
    let key_metrics = keys.iter().map(|k| metrics.for_key(k.label())).collect();
    Ok(KeyExtras { limiter: limiter(&layout), auth: auth.into_boxed_slice(), metrics: key_metrics })
}

fn settings(config: &Config) -> Settings {
    Settings {
        // Validation bounds it; the clamp keeps the proxy's fixed-size attempt list safe anyway.
        max_attempts: usize::try_from(config.retry.max_attempts)
            .unwrap_or(1)
            .clamp(1, crate::proxy::MAX_ATTEMPTS),
        queue_timeout: config.retry.queue_timeout,
        max_body_bytes: config.limits.max_body_bytes,
        tokens: ClientTokens(config.auth.tokens.iter().map(|t| t.expose().as_bytes().into()).collect()),
        cors_origins: config.cors.allowed_origins.clone(),
    }
}

/// The upstream client settings a config asks for.
pub fn upstream_config(config: &Config) -> Result<UpstreamConfig, BuildError> {
    let base_url = config.upstream.base_url.parse().map_err(|e: http::uri::InvalidUri| {
        BuildError::Invalid { field: "upstream.base_url", reason: e.to_string() }
    })?;
    let user_agent = HeaderValue::from_str(&config.upstream.user_agent)
        .map_err(|e| BuildError::Invalid { field: "upstream.user_agent", reason: e.to_string() })?;
    let extra_root_certificates = config
        .upstream
        .extra_root_certificates()
        .map_err(|reason| BuildError::Invalid { field: "upstream.ca_file", reason })?;
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

/// A selected key with what an attempt needs.
#[derive(Debug)]
pub struct Lease {
    /// The key.
    pub selected: Selected,
    /// Its `Authorization` header value.
    pub auth: HeaderValue,
    /// Its metric handles.
    pub metrics: Arc<KeyMetrics>,
}

/// Why no key could be leased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoKey {
    /// Every key is disabled (rejected by the upstream).
    AllDisabled,
    /// Every remaining key was already tried for this request.
    AllTried,
    /// No key had capacity before the queue timeout; the next permit is `wait` away.
    QueueTimeout {
        /// Time until the next permit.
        wait: Duration,
    },
    /// The server has no keys (dev mode without keys, or an emptied reload).
    NoKeys,
}

impl App {
    /// Builds the proxy from a validated config.
    ///
    /// # Errors
    /// A key set, quota or upstream setting that cannot be used.
    pub fn new(config: &Config, dev: bool) -> Result<Arc<Self>, BuildError> {
        let policy = CooldownPolicy {
            rate_limited: config.retry.rate_limit_cooldown,
            failure_base: config.retry.failure_cooldown,
            failure_max: config.retry.max_failure_cooldown,
        };
        let default = config.rate_limit;
        let metrics = Metrics::new();
        let mut built = Ok(());
        let pool = KeyPool::builder().policy(policy).build(specs(&config.keys), |keys| {
            let fresh = |layout: &[(Option<usize>, KeyQuota)]| -> Arc<dyn RateLimit> {
                Arc::new(GovernorLimiter::new(layout.iter().map(|(_, q)| *q)))
            };
            match extras(&metrics, keys, &default, fresh, &[]) {
                Ok(x) => x,
                Err(e) => {
                    built = Err(e);
                    KeyExtras::unusable()
                }
            }
        })?;
        built?;
        let upstream = Upstream::new(upstream_config(config)?)?;
        let max_inflight = config.limits.max_inflight.max(1);
        Ok(Arc::new(Self {
            pool,
            metrics,
            default_rate: ArcSwap::from_pointee(default),
            upstream,
            settings: ArcSwap::from_pointee(settings(config)),
            turnstile: Semaphore::new(1),
            waiting: AtomicUsize::new(0),
            in_flight: Arc::new(Semaphore::new(max_inflight)),
            max_inflight,
            started: Instant::now(),
            dev,
            history: crate::history::History::new(),
        }))
    }

    /// Applies a new config's keys, limits and client settings while requests
    /// go on. Keys that stay keep their counters, cooldowns and spent permits.
    /// Listener address, upstream and timeouts need a restart.
    ///
    /// # Errors
    /// The new key set or limits are refused; the old ones keep serving.
    pub fn reload(&self, config: &Config) -> Result<ReloadReport, BuildError> {
        let default = config.rate_limit;
        // Check every quota and header first: once the pool swaps, there is no going back.
        for (index, key) in config.keys.iter().enumerate() {
            quota(&key.rate_limit(&default), || format!("keys[{index}]"))?;
            proxypal_upstream::bearer(key.key.expose())
                .map_err(|source| BuildError::KeyHeader { index, source })?;
        }
        let mut built = Ok(());
        let report = self.pool.reload(specs(&config.keys), |keys, previous| {
            let reshape = |layout: &[(Option<usize>, KeyQuota)]| -> Arc<dyn RateLimit> {
                self.pool.with_current(|_, old| old.limiter.reshaped(layout))
            };
            match extras(&self.metrics, keys, &default, reshape, previous) {
                Ok(x) => x,
                Err(e) => {
                    built = Err(e);
                    KeyExtras::unusable()
                }
            }
        });
        let report = report?;
        built?; // unreachable after the checks above, kept so an error is never dropped
        self.default_rate.store(Arc::new(default));
        self.settings.store(Arc::new(settings(config)));
        Ok(report)
    }

    /// The key pool.
    pub fn pool(&self) -> &KeyPool<KeyExtras> {
        &self.pool
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The upstream client.
    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Current reloadable settings.
    ///
    /// An owned `Arc` (not an `arc_swap` guard) because a request keeps it
    /// across `.await`s while it reads the body.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// The sampled per-key request history (`/stats` → `history`).
    pub fn history(&self) -> &crate::history::History {
        &self.history
    }

    /// When the server started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Whether this is `--dev`.
    pub fn dev(&self) -> bool {
        self.dev
    }

    /// Requests waiting in the queue for a permit now.
    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> usize {
        self.max_inflight - self.in_flight.available_permits()
    }

    /// The in-flight limit (a slot per request, held until its response body ends).
    pub fn in_flight_slots(&self) -> &Arc<Semaphore> {
        &self.in_flight
    }

    fn try_lease(&self, tried: &[usize]) -> Option<Lease> {
        let mut found = None;
        let selected = self.pool.select_with(|c| {
            if tried.contains(&c.index) || !c.attachment.limiter.take_permit(c.index) {
                return false;
            }
            found = c.attachment.auth.get(c.index).cloned().zip(c.attachment.metrics.get(c.index).cloned());
            found.is_some()
        })?;
        let (auth, metrics) = found?;
        Some(Lease { selected, auth, metrics })
    }

    /// How long until a key not in `tried` could be leased; `Err` when none ever can.
    fn time_to_lease(&self, tried: &[usize]) -> Result<Duration, NoKey> {
        if self.pool.is_empty() {
            return Err(NoKey::NoKeys);
        }
        let wait = self.pool.time_to_selectable(|c| {
            if tried.contains(&c.index) { None } else { c.attachment.limiter.time_to_permit(c.index) }
        });
        match wait {
            Some(w) => Ok(w),
            None if self.pool.time_to_selectable(|_| Some(Duration::ZERO)).is_none() => {
                Err(NoKey::AllDisabled)
            }
            None => Err(NoKey::AllTried),
        }
    }

    /// Leases the next key in round-robin order that is usable, has a permit
    /// and is not in `tried`, waiting first come, first served until
    /// `deadline` when every key is out of permits.
    pub async fn lease(&self, tried: &[usize], deadline: tokio::time::Instant) -> Result<Lease, NoKey> {
        // Fast path: nobody is queued, so taking a permit now jumps no one.
        if self.waiting.load(Ordering::Acquire) == 0 {
            if let Some(lease) = self.try_lease(tried) {
                return Ok(lease);
            }
        }
        // Boxed: the queue's timers and semaphore futures would otherwise make every
        // request's future larger (it is moved on each `.await` nesting), for a path taken
        // only when keys are out of permits.
        Box::pin(self.queue(tried, deadline)).await
    }

    /// Waits in the FIFO queue for a permit, until `deadline`.
    async fn queue(&self, tried: &[usize], deadline: tokio::time::Instant) -> Result<Lease, NoKey> {
        self.time_to_lease(tried)?;
        let _queued = QueueSlot::enter(&self.waiting);
        let turn = tokio::time::timeout_at(deadline, self.turnstile.acquire()).await;
        let Ok(Ok(_turn)) = turn else {
            return Err(NoKey::QueueTimeout { wait: self.time_to_lease(tried).unwrap_or(Duration::ZERO) });
        };
        loop {
            if let Some(lease) = self.try_lease(tried) {
                return Ok(lease);
            }
            let wait = self.time_to_lease(tried)?;
            let now = tokio::time::Instant::now();
            if now + wait > deadline {
                return Err(NoKey::QueueTimeout { wait });
            }
            // Wake at the next permit, but at least every 250 ms so that a reload,
            // a re-enabled key or a permit freed elsewhere is noticed. Tokio's
            // timer has a 1 ms tick and rounds up, and with burst 1 a permit taken
            // late is lost for good (the next one counts from the late grant): so
            // sleep to just before the permit is due and yield for the last
            // millisecond. Measured: ~1.2 ms lost per permit otherwise, 1.2 % of
            // the quota at 600/min.
            if wait > EARLY_WAKE {
                tokio::time::sleep((wait - EARLY_WAKE).min(Duration::from_millis(250))).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
    }
}

/// How long before a permit falls due the head of the queue stops sleeping
/// and starts yielding (one timer tick plus slack).
const EARLY_WAKE: Duration = Duration::from_millis(2);

/// Counts a request in the queue for as long as it lives.
struct QueueSlot<'a>(&'a AtomicUsize);

impl<'a> QueueSlot<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter)
    }
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"a"));
        let tokens = ClientTokens(vec![b"one".as_slice().into(), b"two".as_slice().into()]);
        assert!(tokens.accepts(b"two"));
        assert!(!tokens.accepts(b"three"));
    }
}
