//! Round-robin selection over a pool of API keys, with failover, cooldowns,
//! per-key statistics and hot reload.
//!
//! A [`KeyPool`] hands out keys in round-robin order from a shared cursor,
//! skipping keys that are cooling down or disabled and keys a caller-supplied
//! predicate rejects — that predicate is where a rate limiter plugs in, so this
//! crate knows nothing about rate limiting (or HTTP). Callers report what
//! happened with each key ([`Outcome`]), and the pool rests keys accordingly:
//! a rate-limited key cools down for the upstream's `Retry-After` (or a
//! default), a key the upstream rejects is disabled, and transient failures earn
//! a short cooldown that grows with each consecutive failure.
//!
//! Secrets never print: [`Secret`], [`Key`] and every snapshot show a masked
//! label such as `nvapi-…wxyz`.
//!
//! ```
//! use std::time::Duration;
//! use proxypal_keypool::{KeyPool, KeySpec, KeyStatus, Outcome};
//!
//! # fn main() -> Result<(), proxypal_keypool::PoolError> {
//! let pool = KeyPool::new([
//!     KeySpec::new("nvapi-example-key-aaaa1111"),
//!     KeySpec::new("nvapi-example-key-bbbb2222").with_name("team-b"),
//! ])?;
//!
//! // Round robin: key 0, key 1, key 0, ...
//! let first = pool.select().expect("two usable keys");
//! assert_eq!(first.index(), 0);
//! assert_eq!(first.key().label(), "nvapi-…1111");
//!
//! // The upstream said 429 without Retry-After: key 0 rests (60 s by default)
//! // and selection fails over to key 1.
//! pool.report(&first, Outcome::RateLimited { retry_after: None });
//! assert_eq!(pool.select().map(|s| s.index()), Some(1));
//! assert_eq!(pool.select().map(|s| s.index()), Some(1));
//! assert!(matches!(pool.snapshot()[0].status, KeyStatus::CoolingDown { .. }));
//!
//! // A predicate can refuse keys, e.g. when their rate limiter has no permit.
//! assert!(pool.select_with(|c| c.key.name() != Some("team-b")).is_none());
//! # Ok(()) }
//! ```
//!
//! With a rate limiter attached to the key set (see [`KeyPool`] on attachments):
//!
//! ```
//! # use proxypal_keypool::{KeyPool, KeySpec};
//! use std::sync::atomic::{AtomicU32, Ordering};
//! # fn main() -> Result<(), proxypal_keypool::PoolError> {
//! // A toy limiter: each key may be used twice.
//! let pool = KeyPool::builder().build(
//!     [KeySpec::new("key-one-1234567890"), KeySpec::new("key-two-0987654321")],
//!     |keys| keys.iter().map(|_| AtomicU32::new(2)).collect::<Vec<_>>(),
//! )?;
//! let take = |budget: &Vec<AtomicU32>, i: usize| {
//!     budget[i].fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)).is_ok()
//! };
//! let picks: Vec<usize> = std::iter::from_fn(|| pool.select_with(|c| take(c.attachment, c.index)))
//!     .map(|s| s.index())
//!     .collect();
//! assert_eq!(picks, [0, 1, 0, 1]);
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

mod clock;
mod key;
mod pool;
mod secret;

pub use clock::{Clock, ManualClock, MonotonicClock};
pub use key::{CooldownReason, Key, KeyCounters, KeySnapshot, KeySpec, KeyStatus, Outcome, RateOverride};
pub use pool::{
    Candidate, CooldownPolicy, KeyPool, KeyPoolBuilder, PoolError, ReloadReport, Selected, check_keys,
};
pub use secret::{Secret, mask};
