//! What can go wrong.

/// Why the cache could not do what was asked. None of these fails a
/// request: the gateway answers without the cache.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The request body is not a JSON object, so it has no key.
    #[error("request body is not a JSON object: {reason}")]
    NotJson {
        /// What the parser said.
        reason: String,
    },
    /// An answer bigger than `cache.max_entry_bytes` was not stored.
    #[error("answer of {bytes} bytes not cached: over cache.max_entry_bytes ({limit})")]
    TooBig {
        /// Its size.
        bytes: u64,
        /// The limit.
        limit: u64,
    },
    /// Stored bytes (from Redis) are not an entry this build can read.
    #[error("cache entry cannot be decoded: {reason}")]
    Decode {
        /// What is wrong with them.
        reason: &'static str,
    },
    /// A setting that cannot be used.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, as in the configuration (`cache.ttl`).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}
