//! ProxyPal's library crates in one place.
//!
//! * [`keypool`] — round-robin API-key selection with failover, cooldowns,
//!   per-key stats and hot reload;
//! * [`limiter`] — per-key GCRA rate limits (governor) with a default that
//!   keeps every rolling minute within the quota;
//! * [`gateway`] — the OpenAI-compatible `/v1` pipeline built on both (and
//!   on `proxypal-upstream`): admission, leasing with a fair queue, failover,
//!   OpenAI-shaped errors, streaming, metrics — a hyper/tower service.
//!
//! This facade also owns the workspace's top-level `examples/` and `benches/`.
//! [`LimitedPool`] shows how the two compose: a key pool whose selection is
//! gated by a per-key limiter attached to the key set.
//!
//! ```
//! use proxypal::{LimitedPool, keypool::KeySpec, limiter::KeyQuota};
//!
//! # fn main() -> Result<(), proxypal::keypool::PoolError> {
//! let pool = LimitedPool::new(
//!     [KeySpec::new("nvapi-demo-key-000000000001"), KeySpec::new("nvapi-demo-key-000000000002")],
//!     KeyQuota::default(), // 40/min, burst 1
//! )?;
//! // Each key has one permit now (burst 1): two selections, then none.
//! assert!(pool.select().is_some());
//! assert!(pool.select().is_some());
//! assert!(pool.select().is_none());
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub use proxypal_gateway as gateway;
pub use proxypal_keypool as keypool;
pub use proxypal_limiter as limiter;

use keypool::{KeyPool, KeySpec, PoolError, Selected};
use limiter::{GovernorLimiter, KeyQuota, RateLimit};

/// A [`KeyPool`] whose keys are gated by a [`GovernorLimiter`] with one slot
/// per key (per-key rate overrides honoured).
#[derive(Debug)]
pub struct LimitedPool {
    pool: KeyPool<GovernorLimiter>,
    default_quota: KeyQuota,
}

fn quota_for(spec_rate: keypool::RateOverride, default: KeyQuota) -> KeyQuota {
    let rpm = spec_rate.requests_per_minute.unwrap_or(default.requests_per_minute());
    let burst = spec_rate.burst.unwrap_or(default.burst());
    KeyQuota::new(rpm, burst).and_then(|q| q.with_margin(default.margin())).unwrap_or(default)
}

impl LimitedPool {
    /// A pool over `keys`, each limited to `default_quota` unless the key
    /// overrides it.
    ///
    /// # Errors
    /// An empty, malformed or duplicate secret.
    pub fn new(keys: impl IntoIterator<Item = KeySpec>, default_quota: KeyQuota) -> Result<Self, PoolError> {
        let pool = KeyPool::builder().build(keys, |keys| {
            GovernorLimiter::new(keys.iter().map(|k| quota_for(k.rate(), default_quota)))
        })?;
        Ok(Self { pool, default_quota })
    }

    /// The next key in round-robin order that is usable and has a permit.
    pub fn select(&self) -> Option<Selected> {
        self.pool.select_with(|c| c.attachment.take_permit(c.index))
    }

    /// Time until some key has a permit (`None` with no keys).
    pub fn time_to_permit(&self) -> Option<std::time::Duration> {
        self.pool.with_current(|_, limiter| limiter.time_to_any_permit())
    }

    /// The key pool (to report outcomes, read snapshots, reload).
    pub fn pool(&self) -> &KeyPool<GovernorLimiter> {
        &self.pool
    }

    /// Replaces the key set, carrying limiter state for keys that stay.
    ///
    /// # Errors
    /// As [`KeyPool::reload`]; the old set keeps serving on error.
    pub fn reload(
        &self,
        keys: impl IntoIterator<Item = KeySpec>,
    ) -> Result<keypool::ReloadReport, PoolError> {
        let default = self.default_quota;
        self.pool.reload(keys, |new_keys, previous| {
            // Read the old limiter through the pool: the attachment being replaced.
            self.pool.with_current(|_, old| {
                old.reshape(
                    new_keys.iter().zip(previous).map(|(k, prev)| (*prev, quota_for(k.rate(), default))),
                )
            })
        })
    }
}
