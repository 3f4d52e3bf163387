//! What the cache did, counted.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

use crate::MemoryCache;

/// The cache's counters, bumped by the gateway as it serves (relaxed
/// atomics: one add each, no lock).
#[derive(Debug, Default)]
pub struct CacheStats {
    hits: AtomicU64,
    misses: AtomicU64,
    bypasses: AtomicU64,
    stored: AtomicU64,
    refused_too_big: AtomicU64,
    redis_errors: AtomicU64,
}

/// The counters at one moment (for `/stats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StatsSnapshot {
    /// Requests answered from the cache.
    pub hits: u64,
    /// Requests looked up and not found (they went upstream).
    pub misses: u64,
    /// Requests that did not look (`no-store`, `no-cache`, sampled, not
    /// JSON).
    pub bypasses: u64,
    /// Answers stored.
    pub stored: u64,
    /// Answers not stored because they were over `cache.max_entry_bytes`.
    pub refused_too_big: u64,
    /// Redis calls that failed or timed out (the cache was skipped).
    pub redis_errors: u64,
    /// Upstream requests (and the key quota they would have spent) saved:
    /// the hits.
    pub saved_requests: u64,
    /// Bytes the memory store holds, overhead included (0 with Redis).
    pub bytes: u64,
    /// Entries the memory store holds (0 with Redis).
    pub entries: u64,
}

impl CacheStats {
    /// All zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// A request answered from the cache.
    pub fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    /// A request looked up and not found.
    pub fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// A request that did not look.
    pub fn bypass(&self) {
        self.bypasses.fetch_add(1, Ordering::Relaxed);
    }

    /// An answer stored.
    pub fn stored(&self) {
        self.stored.fetch_add(1, Ordering::Relaxed);
    }

    /// An answer too big to store.
    pub fn refused_too_big(&self) {
        self.refused_too_big.fetch_add(1, Ordering::Relaxed);
    }

    /// A Redis call that failed or timed out.
    pub fn redis_error(&self) {
        self.redis_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters now (`bytes` and `entries` 0: see
    /// [`StatsSnapshot::with_memory`]).
    pub fn snapshot(&self) -> StatsSnapshot {
        let hits = self.hits.load(Ordering::Relaxed);
        StatsSnapshot {
            hits,
            misses: self.misses.load(Ordering::Relaxed),
            bypasses: self.bypasses.load(Ordering::Relaxed),
            stored: self.stored.load(Ordering::Relaxed),
            refused_too_big: self.refused_too_big.load(Ordering::Relaxed),
            redis_errors: self.redis_errors.load(Ordering::Relaxed),
            saved_requests: hits,
            bytes: 0,
            entries: 0,
        }
    }
}

impl StatsSnapshot {
    /// The same with `memory`'s bytes and entries (eventually consistent).
    pub fn with_memory(mut self, memory: &MemoryCache) -> Self {
        self.bytes = memory.bytes();
        self.entries = memory.entries();
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Body, CacheKey, CacheSettings, Endpoint, Entry, Owner};
    use bytes::Bytes;

    #[test]
    fn counters_add_up_and_hits_are_requests_saved() {
        let stats = CacheStats::new();
        for _ in 0..3 {
            stats.hit();
        }
        stats.miss();
        stats.bypass();
        stats.bypass();
        stats.stored();
        stats.refused_too_big();
        stats.redis_error();
        let memory = MemoryCache::new(&CacheSettings::default());
        let key = CacheKey::for_request(Endpoint::Embeddings, "m", Owner::Shared, b"{}")
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(memory.insert(key, Entry::new(Body::Plain(Bytes::from_static(b"{}")), "json", 0)).is_ok());
        memory.run_pending_tasks();
        let snapshot = stats.snapshot().with_memory(&memory);
        assert_eq!(
            snapshot,
            StatsSnapshot {
                hits: 3,
                misses: 1,
                bypasses: 2,
                stored: 1,
                refused_too_big: 1,
                redis_errors: 1,
                saved_requests: 3,
                bytes: 6 + u64::from(crate::ENTRY_OVERHEAD),
                entries: 1,
            }
        );
        let json = serde_json::to_string(&snapshot).unwrap_or_default();
        assert!(json.contains("\"saved_requests\":3"), "{json}");
    }
}
