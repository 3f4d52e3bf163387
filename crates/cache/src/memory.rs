//! The in-process store: moka, bounded by bytes and time.

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;

use crate::{CacheError, CacheKey, CacheSettings, Entry};

/// What an entry costs beyond its bytes (an estimate): its key, the
/// `Arc<Entry>` and moka's node, deque links and hash table slot. Counted so
/// that many tiny answers (embeddings of a word) cannot hold far more memory
/// than `max_bytes` says.
pub const ENTRY_OVERHEAD: u32 = 256;

/// moka refuses a time to live over 1000 years; nobody means more than 100.
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3_600);

/// Answers kept in this process, at most `cache.max_bytes` of them (their
/// [`weight`](Entry::weight) plus [`ENTRY_OVERHEAD`] each), each for
/// `cache.ttl` after it was stored.
///
/// Under its bound moka admits a new entry only if it is asked for more
/// often than the one it would push out (TinyLFU; recency decides among the
/// rest), so a burst of one-off requests does not flush the answers asked
/// for again and again.
///
/// Cloning gives another handle on the same store.
///
/// # Counts
///
/// [`entries`](Self::entries) and [`bytes`](Self::bytes) are eventually
/// consistent: moka applies inserts and evictions to its bookkeeping in
/// batches. [`run_pending_tasks`](Self::run_pending_tasks) brings them up to
/// date (tests; a `/stats` read does not need to).
#[derive(Clone)]
pub struct MemoryCache {
    cache: Cache<CacheKey, Arc<Entry>>,
    max_entry_bytes: u64,
}

impl std::fmt::Debug for MemoryCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not moka's Debug, which lists every entry.
        f.debug_struct("MemoryCache")
            .field("entries", &self.entries())
            .field("bytes", &self.bytes())
            .field("max_entry_bytes", &self.max_entry_bytes)
            .finish_non_exhaustive()
    }
}

impl MemoryCache {
    /// An empty store bounded by `settings` (`max_bytes`, `ttl`,
    /// `max_entry_bytes`).
    pub fn new(settings: &CacheSettings) -> Self {
        let cache = Cache::builder()
            .max_capacity(settings.max_bytes)
            .weigher(|_key: &CacheKey, entry: &Arc<Entry>| {
                u32::try_from(entry.weight()).unwrap_or(u32::MAX).saturating_add(ENTRY_OVERHEAD)
            })
            .time_to_live(settings.ttl.clamp(Duration::from_millis(1), MAX_TTL))
            .build();
        Self { cache, max_entry_bytes: settings.max_entry_bytes }
    }

    /// The entry stored under `key`, unless it expired or was evicted.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.cache.get(key)
    }

    /// Stores `entry` under `key` (replacing what was there). Under the
    /// bound, moka may still decline to keep it (see the type's docs).
    ///
    /// # Errors
    /// [`CacheError::TooBig`] when its weight is over `max_entry_bytes`:
    /// nothing is stored.
    pub fn insert(&self, key: CacheKey, entry: Entry) -> Result<(), CacheError> {
        let bytes = entry.weight();
        if bytes > self.max_entry_bytes {
            return Err(CacheError::TooBig { bytes, limit: self.max_entry_bytes });
        }
        self.cache.insert(key, Arc::new(entry));
        Ok(())
    }

    /// Forgets the entry under `key`.
    pub fn remove(&self, key: &CacheKey) {
        self.cache.invalidate(key);
    }

    /// Forgets every entry (an operator's purge); the counts are up to date
    /// when it returns.
    pub fn clear(&self) {
        self.cache.invalidate_all();
        self.cache.run_pending_tasks();
    }

    /// Entries held (eventually consistent, see the type's docs).
    pub fn entries(&self) -> u64 {
        self.cache.entry_count()
    }

    /// Bytes held, overhead included (eventually consistent).
    pub fn bytes(&self) -> u64 {
        self.cache.weighted_size()
    }

    /// Applies moka's pending bookkeeping now: evictions, expirations and
    /// the counts.
    pub fn run_pending_tasks(&self) {
        self.cache.run_pending_tasks();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Body, Endpoint, Owner};
    use bytes::Bytes;

    fn key(n: u32) -> CacheKey {
        let body = format!("{{\"input\":{n}}}");
        CacheKey::for_request(Endpoint::Embeddings, "e5", Owner::Shared, body.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// An entry of exactly `len` bytes (content type included).
    fn entry(len: usize) -> Entry {
        Entry::new(Body::Plain(Bytes::from(vec![b'x'; len - 4])), "json", 0)
    }

    fn settings(max_bytes: u64) -> CacheSettings {
        CacheSettings { max_bytes, max_entry_bytes: 4_096, ..CacheSettings::default() }
    }

    #[test]
    fn an_entry_comes_back_and_the_counts_say_what_it_holds() {
        let cache = MemoryCache::new(&settings(1 << 20));
        assert!(cache.get(&key(1)).is_none());
        assert!(cache.insert(key(1), entry(1_000)).is_ok());
        assert_eq!(cache.get(&key(1)).map(|e| e.weight()), Some(1_000));
        cache.run_pending_tasks();
        assert_eq!(cache.entries(), 1);
        assert_eq!(cache.bytes(), 1_000 + u64::from(ENTRY_OVERHEAD));
        cache.remove(&key(1));
        assert!(cache.get(&key(1)).is_none());
        assert!(format!("{cache:?}").starts_with("MemoryCache { entries"));
    }

    #[test]
    fn an_entry_over_max_entry_bytes_is_refused() {
        let cache = MemoryCache::new(&settings(1 << 20));
        assert!(cache.insert(key(1), entry(4_096)).is_ok(), "at the limit");
        let refused = cache.insert(key(2), entry(4_097));
        assert!(matches!(refused, Err(CacheError::TooBig { bytes: 4_097, limit: 4_096 })), "{refused:?}");
        assert!(cache.get(&key(2)).is_none());
    }

    #[test]
    fn clear_forgets_everything_at_once() {
        let cache = MemoryCache::new(&settings(1 << 20));
        for n in 0..10 {
            assert!(cache.insert(key(n), entry(100)).is_ok());
        }
        cache.clear();
        assert_eq!((cache.entries(), cache.bytes()), (0, 0));
        assert!((0..10).all(|n| cache.get(&key(n)).is_none()));
    }

    #[test]
    fn entries_expire_after_the_ttl() {
        // moka reads its own clock (no fake one is public): a short real TTL.
        let cache = MemoryCache::new(&CacheSettings { ttl: Duration::from_millis(80), ..settings(1 << 20) });
        assert!(cache.insert(key(1), entry(100)).is_ok());
        assert!(cache.get(&key(1)).is_some());
        std::thread::sleep(Duration::from_millis(200));
        assert!(cache.get(&key(1)).is_none(), "expired");
        cache.run_pending_tasks();
        assert_eq!(cache.entries(), 0);
    }

    #[test]
    fn under_the_bound_a_frequently_read_entry_outlives_a_once_read_one() {
        // Room for two entries of 1 000 bytes (and their overhead), not three.
        let per = 1_000 + u64::from(ENTRY_OVERHEAD);
        let cache = MemoryCache::new(&settings(2 * per + per / 2));
        let (hot, once, newcomer) = (key(1), key(2), key(3));
        assert!(cache.insert(hot, entry(1_000)).is_ok());
        assert!(cache.insert(once, entry(1_000)).is_ok());
        // moka counts reads only once the store is half full (its sketch is
        // sized then): let it see the two inserts first.
        cache.run_pending_tasks();
        assert!(cache.get(&once).is_some());
        for _ in 0..20 {
            assert!(cache.get(&hot).is_some());
        }
        // Asked for a few times (misses count), then answered and stored.
        for _ in 0..5 {
            assert!(cache.get(&newcomer).is_none());
        }
        cache.run_pending_tasks();
        assert!(cache.insert(newcomer, entry(1_000)).is_ok());
        cache.run_pending_tasks();
        assert!(cache.get(&hot).is_some(), "the hot entry stays");
        assert!(cache.get(&newcomer).is_some(), "the newcomer, asked for more, is admitted");
        assert!(cache.get(&once).is_none(), "the once-read entry made room");
        assert!(cache.bytes() <= 2 * per + per / 2, "{} bytes", cache.bytes());
        // A flood of one-off answers does not push the hot one out.
        for n in 10..60 {
            assert!(cache.insert(key(n), entry(1_000)).is_ok());
            cache.run_pending_tasks();
        }
        assert!(cache.get(&hot).is_some(), "the hot entry survives the flood");
        assert!(cache.bytes() <= 2 * per + per / 2, "{} bytes", cache.bytes());
    }
}
