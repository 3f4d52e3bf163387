//! The response cache's figures in `/metrics` (set at scrape time).

use std::sync::Mutex;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proxypal_gateway::cache::ResponseCache;

/// `cache_*` metrics, from the cache's own counters.
#[derive(Debug, Default)]
pub struct CacheMetrics {
    hits: Counter,
    misses: Counter,
    bypasses: Counter,
    saved: Counter,
    redis_errors: Counter,
    bytes: Gauge,
    entries: Gauge,
    /// What the counters were last set from.
    seen: Mutex<[u64; 5]>,
}

impl CacheMetrics {
    /// Registers `cache_*` in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register("cache_hits", "Requests answered from the response cache", m.hits.clone());
        registry.register(
            "cache_misses",
            "Requests looked up in the cache and sent upstream",
            m.misses.clone(),
        );
        registry.register(
            "cache_bypasses",
            "Requests that did not use the cache (no-store, no-cache, sampled, not JSON)",
            m.bypasses.clone(),
        );
        registry.register(
            "cache_saved_requests",
            "Upstream requests (and their quota) the cache saved",
            m.saved.clone(),
        );
        registry.register(
            "cache_redis_errors",
            "Redis calls of the cache that failed (it was skipped)",
            m.redis_errors.clone(),
        );
        registry.register("cache_bytes", "Bytes the memory cache holds", m.bytes.clone());
        registry.register("cache_entries", "Entries the memory cache holds", m.entries.clone());
        m
    }

    /// Sets them from `cache`'s counters.
    pub fn refresh(&self, cache: &ResponseCache) {
        let s = cache.stats();
        self.bytes.set(i64::try_from(s.bytes).unwrap_or(i64::MAX));
        self.entries.set(i64::try_from(s.entries).unwrap_or(i64::MAX));
        let now = [s.hits, s.misses, s.bypasses, s.saved_requests, s.redis_errors];
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for ((counter, before), after) in
            [&self.hits, &self.misses, &self.bypasses, &self.saved, &self.redis_errors]
                .iter()
                .zip(*seen)
                .zip(now)
        {
            counter.inc_by(after.saturating_sub(before));
        }
        *seen = now;
    }
}
