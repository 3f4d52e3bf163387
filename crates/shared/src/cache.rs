//! Cached answers in Redis, so that replicas share them.

use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::{SharedConfig, SharedError, bounded, connect_manager};

/// SCAN's batch: keys looked at (and unlinked) per round trip of
/// [`SharedCache::clear`].
const CLEAR_BATCH: usize = 500;

/// The least a write may take: a write happens off the request path (after
/// the answer went out), and a megabyte entry may need longer than a read's
/// deadline (50 ms by default) to cross the network.
const WRITE_DEADLINE: Duration = Duration::from_secs(1);

/// Cached answers in Redis: opaque values under `<key_prefix>:cache:<hex>`
/// with a TTL, for the response cache (`cache.backend: redis`) of every
/// replica.
///
/// Values are whatever the caller encodes (the cache's entries); the caller
/// bounds their size (`cache.max_entry_bytes`). Every call is bounded by
/// [`SharedConfig::timeout`] (a write by at least a second): an error or a
/// timeout means "no cache now", never a failed request.
///
/// It has a connection of its own rather than [`SharedBudgets`]'s: a
/// megabyte answer on the multiplexed connection would hold up the
/// admissions queued behind it.
///
/// [`SharedBudgets`]: crate::SharedBudgets
#[derive(Clone)]
pub struct SharedCache {
    conn: ConnectionManager,
    config: SharedConfig,
}

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCache").field("config", &self.config).finish_non_exhaustive()
    }
}

impl SharedCache {
    /// Connects as [`SharedBudgets::connect`](crate::SharedBudgets::connect)
    /// does (same URL, TLS, prefix and deadline).
    ///
    /// # Errors
    /// A URL that is not Redis's, a prefix that cannot be used, or no
    /// connection within two seconds.
    pub async fn connect(config: SharedConfig) -> Result<Self, SharedError> {
        // The connection's own response deadline is a write's; each read
        // is cut at `config.timeout` by `bounded`.
        let mut writes = config.clone();
        writes.timeout = config.timeout.max(WRITE_DEADLINE);
        let conn = connect_manager(&writes).await?;
        Ok(Self { conn, config })
    }

    /// The deadline of each call.
    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// The value stored under `key_hex`, or `None` (never stored, expired,
    /// or cleared).
    ///
    /// # Errors
    /// [`SharedError::Invalid`] for a key that is not hex digits; no answer
    /// within the deadline, or a Redis error.
    pub async fn get(&self, key_hex: &str) -> Result<Option<Vec<u8>>, SharedError> {
        let key = self.key(key_hex)?;
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("GET").arg(key).to_owned();
        bounded(self.config.timeout, cmd.query_async(&mut conn)).await
    }

    /// Stores `value` under `key_hex` for `ttl` (at least a millisecond),
    /// replacing what was there, within the deadline or one second,
    /// whichever is longer (a write is off the request path).
    ///
    /// # Errors
    /// As [`get`](Self::get).
    pub async fn set(&self, key_hex: &str, value: &[u8], ttl: Duration) -> Result<(), SharedError> {
        let key = self.key(key_hex)?;
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("SET").arg(key).arg(value).arg("PX").arg(ttl_ms).to_owned();
        bounded(self.config.timeout.max(WRITE_DEADLINE), cmd.query_async::<()>(&mut conn)).await
    }

    /// Removes every cached value of this prefix (an operator's purge), in
    /// batches (`SCAN` and `UNLINK`, each round trip bounded by the
    /// deadline), and says how many were removed. Values stored meanwhile
    /// may stay.
    ///
    /// # Errors
    /// As [`get`](Self::get); batches before the error stay removed.
    pub async fn clear(&self) -> Result<u64, SharedError> {
        let pattern = format!("{}:cache:*", glob_escape(&self.config.key_prefix));
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        let mut removed = 0u64;
        loop {
            let scan = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(CLEAR_BATCH)
                .to_owned();
            let (next, keys): (u64, Vec<Vec<u8>>) =
                bounded(self.config.timeout, scan.query_async(&mut conn)).await?;
            if !keys.is_empty() {
                let unlink = redis::cmd("UNLINK").arg(&keys).to_owned();
                let n: u64 = bounded(self.config.timeout, unlink.query_async(&mut conn)).await?;
                removed += n;
            }
            if next == 0 {
                return Ok(removed);
            }
            cursor = next;
        }
    }

    /// `<prefix>:cache:<hex>`, for hex digits only (a cache key's hash).
    fn key(&self, key_hex: &str) -> Result<String, SharedError> {
        if key_hex.is_empty() || key_hex.len() > 128 || !key_hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SharedError::Invalid(format!("cache key {key_hex:?} is not a hex digest")));
        }
        Ok(format!("{}:cache:{key_hex}", self.config.key_prefix))
    }
}

/// `s` matched literally by a Redis glob (`SCAN MATCH`).
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_of_a_prefix_are_escaped() {
        assert_eq!(glob_escape("proxypal"), "proxypal");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }
}
