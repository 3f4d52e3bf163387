//! The response cache in the pipeline: what a request finds before it
//! spends a client's quota or a key, and what an answer leaves behind.
//!
//! The decisions (key, `Cache-Control`, sampling) and the stores live in
//! `proxypal-cache`; this module composes them:
//!
//! - `ResponseCache::lookup` answers `Lookup::Hit` with a stored
//!   entry, `Lookup::Miss` with what to store the answer under (and, for
//!   the first of several identical requests, the single-flight guard that
//!   makes the others wait for it), or `Lookup::Bypass`.
//! - `hit_response` replays an entry: the stored JSON, or the stored
//!   events one frame each, with `x-proxypal-cache: hit` and `age`.
//! - `Recording` passes an answer to the client untouched while keeping
//!   a copy, and stores it when — and only if — it ended complete.
//!
//! A store that fails (Redis away) is a miss, counted and logged, never a
//! failed request.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use proxypal_cache::{
    Body as Stored, CacheKey, CacheStats, Decision, Endpoint, Entry, Flight, Flights, LeaderGuard,
    MemoryCache, Policy, StreamRecorder, now_unix_ms,
};
use proxypal_shared::SharedCache;

use crate::body::{BoxError, ProxyBody};

/// The settings a cache is made with, and its figures: re-exported, so an
/// embedder needs no direct dependency on `proxypal-cache`.
pub use proxypal_cache::{CacheSettings, StatsSnapshot};

/// `x-proxypal-cache`: `hit`, `miss` or `bypass`.
pub const CACHE_HEADER: &str = "x-proxypal-cache";

/// How long an identical request waits for the one already upstream
/// before it goes upstream itself.
const FLIGHT_WAIT: Duration = Duration::from_secs(30);

/// Shortest interval between two "the cache's Redis is away" warnings.
const WARN_EVERY_MS: u64 = 10_000;

/// Where entries live.
#[derive(Debug)]
enum Store {
    /// In this process (moka).
    Memory(MemoryCache),
    /// In Redis, shared by every replica; set once connected.
    Redis(OnceLock<SharedCache>),
}

/// An exact-match response cache for `POST /v1/chat/completions`,
/// `/v1/completions` and `/v1/embeddings`, given to a gateway with
/// [`Gateway::set_cache`](crate::Gateway::set_cache).
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::{sync::Arc, time::Duration};
/// use proxypal_gateway::cache::{CacheSettings, ResponseCache};
/// use proxypal_gateway::{Gateway, GatewayConfig, keypool::KeySpec};
///
/// let mut registry = prometheus_client::registry::Registry::with_prefix("proxypal");
/// let gateway = Gateway::new(
///     GatewayConfig::with_keys([KeySpec::new("nvapi-example-key-0000000001")]),
///     &mut registry,
/// )?;
/// let settings = CacheSettings { ttl: Duration::from_secs(600), ..CacheSettings::default() };
/// let cache = Arc::new(ResponseCache::memory(settings));
/// assert!(gateway.set_cache(Arc::clone(&cache)));
/// assert_eq!((cache.backend(), cache.is_ready(), cache.stats().hits), ("memory", true, 0));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ResponseCache {
    policy: Policy,
    store: Store,
    flights: Flights,
    stats: CacheStats,
    flight_wait: Duration,
    last_warn_ms: std::sync::atomic::AtomicU64,
}

/// What a request found.
#[derive(Debug)]
pub(crate) enum Lookup {
    /// A stored answer.
    Hit(Arc<Entry>),
    /// Go upstream and store a complete 200 answer under the key.
    Miss(Pending),
    /// Go upstream; store nothing.
    Bypass,
}

/// A request that went upstream and whose answer may be stored.
#[derive(Debug)]
pub(crate) struct Pending {
    key: CacheKey,
    /// What the response's `x-proxypal-cache` says: `miss`, or `bypass`
    /// for a `no-cache` refresh.
    pub(crate) label: &'static str,
    /// Held while this request is the one identical requests wait for.
    _guard: Option<LeaderGuard>,
}

impl ResponseCache {
    /// A cache in this process's memory, bounded by `settings.max_bytes`.
    pub fn memory(settings: CacheSettings) -> Self {
        let memory = MemoryCache::new(&settings);
        Self::with(settings, Store::Memory(memory))
    }

    /// A cache in Redis (shared by replicas), used once
    /// [`connected`](Self::connected) is called; until then every request
    /// bypasses it.
    pub fn redis(settings: CacheSettings) -> Self {
        Self::with(settings, Store::Redis(OnceLock::new()))
    }

    fn with(settings: CacheSettings, store: Store) -> Self {
        Self {
            policy: Policy::new(settings),
            store,
            flights: Flights::new(),
            stats: CacheStats::default(),
            flight_wait: FLIGHT_WAIT,
            last_warn_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Gives a Redis cache its connection (a second call is ignored).
    pub fn connected(&self, redis: SharedCache) {
        if let Store::Redis(slot) = &self.store {
            let _ = slot.set(redis);
        }
    }

    /// Connects a Redis cache to the replicas' Redis (`config`'s URL,
    /// prefix, TLS and deadline) from a background task, retrying every
    /// 5 s until it answers; until then requests bypass the cache. Must be
    /// called within a Tokio runtime.
    pub fn connect_in_background(self: &Arc<Self>, config: &crate::replicas::SharedQuotaConfig) {
        if !matches!(self.store, Store::Redis(_)) {
            return;
        }
        let mut shared = proxypal_shared::SharedConfig::new(config.redis_url.clone());
        shared.key_prefix.clone_from(&config.key_prefix);
        shared.timeout = config.timeout;
        shared.ca_pem.clone_from(&config.ca_pem);
        let cache = Arc::clone(self);
        tokio::spawn(async move {
            let mut warned = false;
            loop {
                match SharedCache::connect(shared.clone()).await {
                    Ok(redis) => {
                        tracing::info!(redis = %proxypal_shared::redacted(&shared.url), "response cache: Redis connected");
                        cache.connected(redis);
                        return;
                    }
                    Err(e) => {
                        if !warned {
                            tracing::warn!(error = %e, "response cache: Redis out of reach; requests bypass the cache until it answers");
                            warned = true;
                        }
                        tokio::time::sleep(Duration::from_secs(5)).await;
                    }
                }
            }
        });
    }

    /// Whether it can be used now (a Redis cache: once connected).
    pub fn is_ready(&self) -> bool {
        match &self.store {
            Store::Memory(_) => true,
            Store::Redis(slot) => slot.get().is_some(),
        }
    }

    /// `memory` or `redis`.
    pub fn backend(&self) -> &'static str {
        match self.store {
            Store::Memory(_) => "memory",
            Store::Redis(_) => "redis",
        }
    }

    /// The settings it was made with.
    pub fn settings(&self) -> &CacheSettings {
        self.policy.settings()
    }

    /// Hits, misses, bypasses and (for memory) entries and bytes, now.
    pub fn stats(&self) -> StatsSnapshot {
        let snapshot = self.stats.snapshot();
        match &self.store {
            Store::Memory(memory) => {
                // Evictions and expiries land in batches: settle them first,
                // so the figures are the cache's now (an operator's read).
                memory.run_pending_tasks();
                snapshot.with_memory(memory)
            }
            Store::Redis(_) => snapshot,
        }
    }

    /// Forgets every entry (Redis: this prefix's); how many, where known.
    ///
    /// # Errors
    /// Redis unreachable or not connected yet.
    pub async fn clear(&self) -> Result<u64, proxypal_shared::SharedError> {
        match &self.store {
            Store::Memory(memory) => {
                memory.run_pending_tasks();
                let n = memory.entries();
                memory.clear();
                Ok(n)
            }
            Store::Redis(slot) => match slot.get() {
                Some(redis) => redis.clear().await,
                None => Err(proxypal_shared::SharedError::Invalid(
                    "the response cache's Redis connection is not up yet".into(),
                )),
            },
        }
    }

    /// What a request to `path` (after `/v1`) with `body` finds.
    pub(crate) async fn lookup(
        &self,
        path: &str,
        body: &[u8],
        model: &str,
        client: Option<&str>,
        cache_control: Option<&str>,
    ) -> Option<Lookup> {
        let endpoint = match path {
            "/chat/completions" => Endpoint::ChatCompletions,
            "/completions" => Endpoint::Completions,
            "/embeddings" => Endpoint::Embeddings,
            _ => return None,
        };
        let (key, stream) = match self.policy.decide(endpoint, body, model, client, cache_control) {
            Decision::Bypass(_) => {
                self.stats.bypass();
                return Some(Lookup::Bypass);
            }
            Decision::Refresh { key, .. } => {
                self.stats.bypass();
                return Some(Lookup::Miss(Pending { key, label: "bypass", _guard: None }));
            }
            Decision::Use { key, stream } => (key, stream),
        };
        if let Some(entry) = self.get(&key, stream).await {
            self.stats.hit();
            return Some(Lookup::Hit(entry));
        }
        let guard = match self.flights.join(&key) {
            Flight::Leader(guard) => Some(guard),
            Flight::Follower(waiter) => {
                if waiter.wait(self.flight_wait).await {
                    if let Some(entry) = self.get(&key, stream).await {
                        self.stats.hit();
                        return Some(Lookup::Hit(entry));
                    }
                }
                None
            }
        };
        self.stats.miss();
        Some(Lookup::Miss(Pending { key, label: "miss", _guard: guard }))
    }

    /// The entry under `key`, if it is there and of the kind asked for.
    async fn get(&self, key: &CacheKey, stream: bool) -> Option<Arc<Entry>> {
        let entry = match &self.store {
            Store::Memory(memory) => memory.get(key)?,
            Store::Redis(slot) => {
                let redis = slot.get()?;
                match redis.get(&key.hex()).await {
                    Ok(Some(bytes)) => match Entry::decode(&bytes) {
                        Ok(entry) => Arc::new(entry),
                        Err(e) => {
                            self.warn("a cached entry in Redis could not be read", &e);
                            return None;
                        }
                    },
                    Ok(None) => return None,
                    Err(e) => {
                        self.stats.redis_error();
                        self.warn("the response cache's Redis did not answer; going upstream", &e);
                        return None;
                    }
                }
            }
        };
        (entry.body.is_stream() == stream).then_some(entry)
    }

    /// Stores a complete answer; the single-flight guard goes when the
    /// entry can be found (for Redis, after the write).
    fn store(self: &Arc<Self>, pending: Pending, entry: Entry) {
        let limit = self.settings().max_entry_bytes;
        if entry.weight() > limit {
            self.stats.refused_too_big();
            return;
        }
        match &self.store {
            Store::Memory(memory) => match memory.insert(pending.key, entry) {
                Ok(()) => self.stats.stored(),
                Err(_) => self.stats.refused_too_big(),
            },
            Store::Redis(slot) => {
                let Some(redis) = slot.get().cloned() else { return };
                let cache = Arc::clone(self);
                let ttl = self.settings().ttl;
                tokio::spawn(async move {
                    match redis.set(&pending.key.hex(), &entry.encode(), ttl).await {
                        Ok(()) => cache.stats.stored(),
                        Err(e) => {
                            cache.stats.redis_error();
                            cache.warn("the response cache's Redis did not take an entry", &e);
                        }
                    }
                    drop(pending);
                });
            }
        }
    }

    /// Logs `what` at most every [`WARN_EVERY_MS`].
    fn warn(&self, what: &str, error: &dyn std::fmt::Display) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = now_unix_ms();
        let last = self.last_warn_ms.load(Relaxed);
        if now.saturating_sub(last) >= WARN_EVERY_MS
            && self.last_warn_ms.compare_exchange(last, now, Relaxed, Relaxed).is_ok()
        {
            tracing::warn!(backend = self.backend(), error = %error, "{what}");
        }
    }
}

/// The answer for a hit: the stored JSON, or the stored events replayed one
/// frame each (`data: [DONE]` last, as stored), with `x-proxypal-cache:
/// hit` and `age` in whole seconds.
pub(crate) fn hit_response(entry: &Entry) -> Response<ProxyBody> {
    let body: ProxyBody = match &entry.body {
        Stored::Plain(bytes) => crate::body::full(bytes.clone()),
        Stored::Stream(_) => Replay(entry.stream_events()).boxed(),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&entry.content_type) {
        headers.insert(http::header::CONTENT_TYPE, v);
    }
    headers.insert(CACHE_HEADER, HeaderValue::from_static("hit"));
    headers.insert(http::header::AGE, HeaderValue::from(entry.age(now_unix_ms()).as_secs()));
    resp
}

/// A stored stream replayed: one frame per event, nothing else to wait for.
struct Replay(proxypal_cache::Events);

impl Body for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.next().map(|event| Ok(Frame::data(event))))
    }
}

/// What a [`Recording`] keeps.
enum Copy {
    Sse(StreamRecorder),
    Plain {
        chunks: Vec<Bytes>,
        len: u64,
        limit: u64,
    },
    /// Over the limit: nothing kept.
    Dropped,
}

pin_project_lite::pin_project! {
    /// Passes an answer on untouched and stores a copy when it ended
    /// complete; an answer cut short (client gone, upstream broken, an
    /// error event) is never stored, and its single-flight guard goes when
    /// it is dropped.
    pub(crate) struct Recording<B> {
        #[pin]
        inner: B,
        copy: Copy,
        pending: Option<Pending>,
        cache: Arc<ResponseCache>,
        content_type: String,
    }
}

impl<B> Recording<B> {
    /// Records `inner`, an answer with `content_type` (an SSE stream when it
    /// is `text/event-stream`).
    pub(crate) fn new(inner: B, cache: Arc<ResponseCache>, pending: Pending, content_type: &str) -> Self {
        let limit = cache.settings().max_entry_bytes;
        let copy = if content_type.starts_with("text/event-stream") {
            Copy::Sse(StreamRecorder::new(limit))
        } else {
            Copy::Plain { chunks: Vec::new(), len: 0, limit }
        };
        Self { inner, copy, pending: Some(pending), cache, content_type: content_type.to_owned() }
    }
}

impl<B> Recording<B> {
    fn keep(self: Pin<&mut Self>, data: &Bytes) {
        let this = self.project();
        match this.copy {
            Copy::Sse(recorder) => {
                if !recorder.push(data) {
                    *this.copy = Copy::Dropped;
                }
            }
            Copy::Plain { chunks, len, limit } => {
                *len += data.len() as u64;
                if *len > *limit {
                    *this.copy = Copy::Dropped;
                } else {
                    chunks.push(data.clone());
                }
            }
            Copy::Dropped => {}
        }
    }

    fn finish(self: Pin<&mut Self>) {
        let this = self.project();
        let Some(pending) = this.pending.take() else { return };
        let body = match std::mem::replace(this.copy, Copy::Dropped) {
            Copy::Sse(recorder) => match recorder.finish() {
                Some(stream) => Stored::Stream(stream),
                None => return,
            },
            Copy::Plain { chunks, .. } => Stored::Plain(match chunks.as_slice() {
                [one] => one.clone(),
                many => Bytes::from(many.concat()),
            }),
            Copy::Dropped => {
                this.cache.stats.refused_too_big();
                return;
            }
        };
        let entry = Entry::new(body, this.content_type.as_str(), now_unix_ms());
        this.cache.store(pending, entry);
    }
}

impl<B> Body for Recording<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = self.as_mut().project().inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.as_mut().keep(data);
                }
                // hyper stops polling a body that says it has ended.
                if self.inner.is_end_stream() {
                    self.as_mut().finish();
                }
            }
            Poll::Ready(None) => self.as_mut().finish(),
            // An error: nothing stored (the guard goes with the body).
            Poll::Ready(Some(Err(_))) => *self.as_mut().project().pending = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
