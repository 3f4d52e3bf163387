//! Quotas for pooled API keys, counted the way upstreams count them.
//!
//! Two layers:
//!
//! * [`QuotaEngine`]: each key (or each account, shared by several keys) has a
//!   budget of windows — "at most N requests (or tokens) in any rolling period",
//!   or "per calendar day resetting at `HH:MM` in an IANA zone" — plus an
//!   optional cap on requests in flight. A request is granted only when every
//!   window has room, so no rolling period ever carries more than N, and every
//!   grant up to N goes at once (bursts included). [`Limits`] are the
//!   configuration fields; [`Limits::compile`] checks them and names the field
//!   that is wrong. Token windows take reservations that the upstream's
//!   reported usage replaces ([`Permit::finish`]); limits an upstream announces
//!   lower the configured ones ([`QuotaEngine::learn`]); state is saved and
//!   restored across restarts ([`QuotaEngine::save`], [`QuotaEngine::restore`]).
//! * [`GovernorLimiter`]: governor's GCRA per key, the smooth rate *shaper*. The
//!   engine uses it for `burst` below the window; it is also usable alone, as
//!   below.
//!
//! ## The GCRA shaper
//!
//! A [`GovernorLimiter`] holds one GCRA cell counter per key, indexed by the key's
//! position in the pool (`0..len`). Callers take a permit for one key with
//! [`RateLimit::try_acquire`], ask how long until a key (or any key) has one, and
//! read the remaining capacity for statistics. The proxy depends only on the
//! [`RateLimit`] trait, so a limiter whose state lives in a shared store (for
//! several proxy replicas) can replace the in-process one without touching the
//! server.
//!
//! ```
//! use std::time::Duration;
//! use governor::clock::FakeRelativeClock;
//! use proxypal_limiter::{GovernorLimiter, KeyQuota, RateLimit};
//!
//! # fn main() -> Result<(), proxypal_limiter::QuotaError> {
//! // Two keys at NVIDIA's free tier: 40 requests per minute each, burst 1.
//! let clock = FakeRelativeClock::default();
//! let limiter = GovernorLimiter::with_clock([KeyQuota::default(); 2], clock.clone());
//!
//! assert!(limiter.try_acquire(0).is_ok()); // key 0 spends its permit
//! let wait = limiter.try_acquire(0).unwrap_err().wait().unwrap();
//! assert!(wait > Duration::from_millis(1500)); // one permit every (60 s + margin) / 40
//! assert!(limiter.try_acquire(1).is_ok()); // key 1 is independent
//!
//! clock.advance(wait);
//! assert!(limiter.try_acquire(0).is_ok()); // refilled
//! # Ok(()) }
//! ```
//!
//! # What a quota means over a rolling 60-second window
//!
//! A [`KeyQuota`] of `r` requests per minute with burst `b` and safety margin `m`
//! becomes a GCRA with emission interval `T = (60 s + m) / r` and tolerance
//! `τ = (b − 1)·T`. GCRA grants a cell at time `t` iff `t ≥ TAT − τ`, then sets
//! `TAT = max(TAT, t) + T`. From that:
//!
//! * after an idle period, `b` permits pass at once, then one every `T`;
//! * in **any** interval of length `W` (closed), at most `b + ⌊W / T⌋` permits are
//!   granted ([`KeyQuota::max_in_window`]; the property tests check it on a fake clock).
//!
//! For a 60-second window this gives, with `r` per minute:
//!
//! | burst `b` | margin `m` | max in any rolling 60 s | long-run rate |
//! |---|---|---|---|
//! | 1 | 0 | `r` half-open, `r + 1` closed (cells at exactly 0 s and 60 s) | `r`/min |
//! | 1 | > 0 (default 500 ms) | **`r`** (`⌊60 r / (60 + m)⌋ ≤ r − 1`, plus the one burst cell) | `r · 60 / (60 + m)` (99.2 % of `r`) |
//! | `b` | > 0 | `r + b − 1` | as above |
//! | `r` (governor's `per_minute(r)`) | 0 | `2r − 1` half-open, `2r` closed | `r`/min |
//!
//! NVIDIA's free tier is reported to count a rolling 60-second window of 40
//! requests, so the default is **burst 1 with a 500 ms margin**: no rolling minute
//! ever sees more than 40 requests from one key, even measured with a closed
//! window, and arrivals upstream may be up to `m` out of step with the grants
//! (network jitter) before a window could overflow. `Quota::per_minute(40)` alone
//! (burst 40) would allow 79 in one rolling minute and earn upstream 429s. Raise
//! `burst` only if the upstream really grants bursts: every extra unit of burst is
//! one more request a rolling minute may carry.
//!
//! # Choosing and changing limits at runtime
//!
//! [`GovernorLimiter::reshape`] builds a limiter for a new key set, carrying over
//! the state of keys that stay (matched by their old index), so a reload does not
//! hand out a fresh burst to keys that just spent theirs.

#![deny(missing_docs)]

mod clock;
mod engine;
mod governor_limiter;
mod limits;
mod quota;
mod window;

pub use clock::{ManualClock, QuotaClock, SystemClock};
pub use engine::{
    Announced, Cause, KeyBudget, LimitKind, LimitReport, POLL, Permit, PoolWindow, QuotaEngine, SavedBudget,
    SavedWindow, Scope, Share, Wait, WindowView,
};
pub use governor_limiter::GovernorLimiter;
pub use limits::{BudgetSpec, DailyReset, LimitError, Limits, Reset, ResetError, Unit, WindowSpec};
pub use quota::{KeyQuota, QuotaError};
pub use window::Source;

use std::fmt;
use std::time::Duration;

/// Why a permit was not granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// The key has no permit now; one will be available after `wait`.
    #[error("rate limited: next permit in {wait:?}")]
    NotYet {
        /// Time from now until the key's next permit.
        wait: Duration,
    },
    /// The index does not name a key of this limiter.
    #[error("no key at index {index} (the limiter has {len} keys)")]
    UnknownKey {
        /// The index that was asked for.
        index: usize,
        /// How many keys the limiter has.
        len: usize,
    },
}

impl Denied {
    /// The time until a permit, if the key exists.
    pub fn wait(&self) -> Option<Duration> {
        match *self {
            Denied::NotYet { wait } => Some(wait),
            Denied::UnknownKey { .. } => None,
        }
    }
}

/// The interface the proxy uses to rate-limit keys, indexed by their position.
///
/// It is object safe (`Arc<dyn RateLimit>`) so that a backend sharing its state
/// between proxy replicas can stand in for the in-process [`GovernorLimiter`].
///
/// A successful [`try_acquire`](RateLimit::try_acquire) *consumes* a permit that
/// cannot be given back, so callers should check everything cheaper (cooldowns,
/// disabled keys) before asking the limiter.
pub trait RateLimit: Send + Sync + fmt::Debug {
    /// Number of keys this limiter tracks.
    fn len(&self) -> usize;

    /// `true` when the limiter tracks no keys.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes a permit for key `index` now, or says how long until one is available.
    fn try_acquire(&self, index: usize) -> Result<(), Denied>;

    /// Takes a permit for key `index` now if there is one; `false` otherwise.
    ///
    /// The same decision as [`try_acquire`](RateLimit::try_acquire) without
    /// computing the wait: the cheaper call for a selection predicate that
    /// skips to the next key anyway.
    fn take_permit(&self, index: usize) -> bool {
        self.try_acquire(index).is_ok()
    }

    /// Time from now until key `index` has a permit (zero if it has one now),
    /// without consuming anything. `None` for an unknown index.
    fn time_to_permit(&self, index: usize) -> Option<Duration>;

    /// Permits key `index` could take right now, back to back (0 if none).
    fn remaining(&self, index: usize) -> u32;

    /// A limiter for a new key set that carries over this one's state: entry `i`
    /// of `layout` is the new key `i`'s old index (if it stays) and quota.
    /// Lets a server reload keys through the trait alone.
    fn reshaped(&self, layout: &[(Option<usize>, KeyQuota)]) -> std::sync::Arc<dyn RateLimit>;

    /// Time from now until *any* key has a permit (zero if one has a permit now);
    /// `None` when there are no keys. Used to decide how long a queued request
    /// sleeps before trying again.
    fn time_to_any_permit(&self) -> Option<Duration> {
        (0..self.len()).filter_map(|i| self.time_to_permit(i)).min()
    }
}
