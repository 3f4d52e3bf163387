use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use crate::Secret;

/// What a key is configured with: its secret, an optional name, and an
/// optional rate override the caller's limiter may honour.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySpec {
    /// The API key itself.
    pub secret: Secret,
    /// A human name shown in stats (e.g. `team-b`).
    pub name: Option<String>,
    /// Per-key rate override; the pool stores it for the caller's limiter and
    /// does not interpret it.
    pub rate: RateOverride,
}

impl KeySpec {
    /// A key with no name and no rate override.
    pub fn new(secret: impl Into<Box<str>>) -> Self {
        Self { secret: Secret::new(secret), name: None, rate: RateOverride::default() }
    }

    /// Sets the display name.
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Sets the rate override.
    pub fn with_rate(mut self, rate: RateOverride) -> Self {
        self.rate = rate;
        self
    }
}

impl fmt::Debug for KeySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySpec")
            .field("secret", &self.secret)
            .field("name", &self.name)
            .field("rate", &self.rate)
            .finish()
    }
}

/// A per-key rate override, in the units operators configure. `None` fields
/// fall back to the pool-wide limit chosen by the caller.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct RateOverride {
    /// Requests per minute for this key.
    pub requests_per_minute: Option<u32>,
    /// Burst for this key.
    pub burst: Option<u32>,
}

/// One key of a pool: its configuration plus live state shared across reloads.
pub struct Key {
    secret: Secret,
    name: Option<String>,
    rate: RateOverride,
    label: String,
    /// The name if configured, else the label; shared, so a report can
    /// carry it without copying.
    shown: Arc<str>,
    pub(crate) state: Arc<KeyState>,
}

impl Key {
    pub(crate) fn new(spec: KeySpec, state: Arc<KeyState>) -> Self {
        let label = spec.secret.masked();
        let shown = Arc::from(spec.name.as_deref().unwrap_or(&label));
        Self { secret: spec.secret, name: spec.name, rate: spec.rate, label, shown, state }
    }

    /// The secret (for the `Authorization` header, and nothing else).
    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// The masked label, e.g. `nvapi-…wxyz`: safe to log and show.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The configured name if there is one, else the masked label: how
    /// reports (the usage ledger) name the key. Shared, so cloning it does
    /// not allocate.
    pub fn shown(&self) -> &Arc<str> {
        &self.shown
    }

    /// The configured name, if any.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The configured rate override.
    pub fn rate(&self) -> RateOverride {
        self.rate
    }

    /// The key's counters and state right now.
    pub fn stats(&self) -> KeyCounters {
        self.state.counters()
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key").field("label", &self.label).field("name", &self.name).finish_non_exhaustive()
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{} ({name})", self.label),
            None => f.write_str(&self.label),
        }
    }
}

/// What happened when a key was used; reported with
/// [`KeyPool::report`](crate::KeyPool::report).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream accepted the key. Also report this when the response was an
    /// error that is not the key's fault (a client's 400, a model's 503): the key
    /// worked. Resets the transient-failure streak.
    Success,
    /// The upstream said the key is over its limit. The key cools down for
    /// `retry_after`, or the policy's default when the upstream gave none.
    RateLimited {
        /// The upstream's `Retry-After`, if it sent one.
        retry_after: Option<Duration>,
    },
    /// The upstream rejected the key itself (401/403). The key is disabled until
    /// [`KeyPool::enable`](crate::KeyPool::enable) or a reload.
    AuthFailed,
    /// A failure that may pass (5xx, connect error, timeout): a short cooldown
    /// that doubles with each consecutive failure, reset by a success.
    Transient,
}

/// A key's state as shown in stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyStatus {
    /// Usable now (the rate limiter may still say "not yet").
    Ready,
    /// Resting after a failure or a rate limit; ends on its own.
    CoolingDown {
        /// Time left.
        remaining: Duration,
        /// Why it is resting.
        reason: CooldownReason,
    },
    /// Rejected by the upstream; needs [`KeyPool::enable`](crate::KeyPool::enable) or a reload.
    Disabled,
}

impl KeyStatus {
    /// `ready`, `cooling_down` or `disabled`.
    pub fn as_str(&self) -> &'static str {
        match self {
            KeyStatus::Ready => "ready",
            KeyStatus::CoolingDown { .. } => "cooling_down",
            KeyStatus::Disabled => "disabled",
        }
    }
}

/// Why a key is cooling down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CooldownReason {
    /// The upstream answered 429.
    RateLimited,
    /// Transient failures (5xx, connect errors, timeouts).
    Failures,
}

impl CooldownReason {
    /// `rate_limited` or `failures`.
    pub fn as_str(&self) -> &'static str {
        match self {
            CooldownReason::RateLimited => "rate_limited",
            CooldownReason::Failures => "failures",
        }
    }
}

/// A key's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyCounters {
    /// Times the key was selected (upstream attempts made with it).
    pub requests: u64,
    /// Attempts reported [`Outcome::Success`].
    pub successes: u64,
    /// Attempts reported [`Outcome::AuthFailed`] or [`Outcome::Transient`].
    pub errors: u64,
    /// Attempts reported [`Outcome::RateLimited`].
    pub rate_limited: u64,
    /// Current streak of transient failures.
    pub consecutive_failures: u32,
}

/// Everything about one key that stats need; contains no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySnapshot {
    /// Position in the pool.
    pub index: usize,
    /// Masked label.
    pub label: String,
    /// Configured name.
    pub name: Option<String>,
    /// State now.
    pub status: KeyStatus,
    /// Counters now.
    pub counters: KeyCounters,
    /// Configured rate override.
    pub rate: RateOverride,
}

/// `blocked_until` sentinel values.
pub(crate) const READY: u64 = 0;
pub(crate) const DISABLED: u64 = u64::MAX;

const REASON_RATE_LIMITED: u8 = 0;
const REASON_FAILURES: u8 = 1;

/// Live state of a key. Shared (`Arc`) between the generations of a pool so a
/// reload keeps it.
#[derive(Debug, Default)]
pub(crate) struct KeyState {
    /// `READY`, `DISABLED`, or the clock time (ns, at least 1) until
    /// which the key cools down. One load tells whether a key is usable.
    pub(crate) blocked_until: AtomicU64,
    reason: AtomicU8,
    consecutive_failures: AtomicU32,
    pub(crate) requests: AtomicU64,
    successes: AtomicU64,
    errors: AtomicU64,
    rate_limited: AtomicU64,
}

impl KeyState {
    /// Whether the key may be selected at `now` (ns on the pool clock), reading
    /// the clock only if the key has a deadline.
    #[inline]
    pub(crate) fn usable(&self, now: &mut impl FnMut() -> u64) -> bool {
        match self.blocked_until.load(Ordering::Acquire) {
            READY => true,
            DISABLED => false,
            until if now() >= until => {
                // Expired: go back to READY so later selections skip the clock.
                let _ =
                    self.blocked_until.compare_exchange(until, READY, Ordering::AcqRel, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn status(&self, now_ns: u64) -> KeyStatus {
        match self.blocked_until.load(Ordering::Acquire) {
            READY => KeyStatus::Ready,
            DISABLED => KeyStatus::Disabled,
            until if now_ns >= until => KeyStatus::Ready,
            until => KeyStatus::CoolingDown {
                remaining: Duration::from_nanos(until - now_ns),
                reason: match self.reason.load(Ordering::Relaxed) {
                    REASON_RATE_LIMITED => CooldownReason::RateLimited,
                    _ => CooldownReason::Failures,
                },
            },
        }
    }

    /// Extends the cooldown to at least `until` (never shortens it, never
    /// un-disables).
    fn block_until(&self, until: u64, reason: u8) {
        let until = until.clamp(1, DISABLED - 1);
        let prev = self.blocked_until.fetch_max(until, Ordering::AcqRel);
        if prev < until {
            self.reason.store(reason, Ordering::Relaxed);
        }
    }

    pub(crate) fn record(&self, outcome: Outcome, now_ns: u64, policy: &crate::CooldownPolicy) {
        match outcome {
            Outcome::Success => {
                self.successes.fetch_add(1, Ordering::Relaxed);
                self.consecutive_failures.store(0, Ordering::Relaxed);
            }
            Outcome::RateLimited { retry_after } => {
                self.rate_limited.fetch_add(1, Ordering::Relaxed);
                let rest = retry_after.unwrap_or(policy.rate_limited);
                self.block_until(now_ns.saturating_add(nanos(rest)), REASON_RATE_LIMITED);
            }
            Outcome::AuthFailed => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.blocked_until.store(DISABLED, Ordering::Release);
            }
            Outcome::Transient => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                let streak = self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
                let rest = policy.failure_cooldown(streak);
                self.block_until(now_ns.saturating_add(nanos(rest)), REASON_FAILURES);
            }
        }
    }

    /// Clears any cooldown or disable and the failure streak.
    pub(crate) fn enable(&self) {
        self.blocked_until.store(READY, Ordering::Release);
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Sets a saved state again: a cooldown (extended, never shortened) or disabled.
    pub(crate) fn restore(&self, status: KeyStatus, now_ns: u64) {
        match status {
            KeyStatus::Ready => {}
            KeyStatus::Disabled => self.blocked_until.store(DISABLED, Ordering::Release),
            KeyStatus::CoolingDown { remaining, reason } => {
                let reason = match reason {
                    CooldownReason::RateLimited => REASON_RATE_LIMITED,
                    CooldownReason::Failures => REASON_FAILURES,
                };
                self.block_until(now_ns.saturating_add(nanos(remaining)), reason);
            }
        }
    }

    pub(crate) fn counters(&self) -> KeyCounters {
        KeyCounters {
            requests: self.requests.load(Ordering::Relaxed),
            successes: self.successes.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
        }
    }
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
