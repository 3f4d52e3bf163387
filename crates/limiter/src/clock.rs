//! The quota engine's time: nanoseconds since the Unix epoch, monotonic within
//! a process.
//!
//! Rolling windows want a monotonic clock, fixed resets want wall time in a
//! zone, and state restored after a restart needs wall time too. The
//! [`SystemClock`] reconciles them: it reads the wall clock once, at start, and
//! advances it by the monotonic clock from then on, so a window never sees
//! time go backwards (an NTP step does not shorten or stretch it) while its
//! timestamps still mean something after a restart.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of "now" for the [`QuotaEngine`](crate::QuotaEngine), in
/// nanoseconds since the Unix epoch. Must never go backwards.
pub trait QuotaClock: Send + Sync + fmt::Debug + 'static {
    /// Nanoseconds since 1970-01-01T00:00:00Z.
    fn now(&self) -> u64;
}

impl QuotaClock for Arc<dyn QuotaClock> {
    #[inline]
    fn now(&self) -> u64 {
        (**self).now()
    }
}

/// The real clock: wall time read once at creation, advanced monotonically.
#[derive(Debug, Clone)]
pub struct SystemClock {
    anchor_unix: u64,
    /// quanta (the TSC where it is reliable, as governor's default clock):
    /// about half the cost of `std::time::Instant` per read.
    clock: quanta::Clock,
    anchor: quanta::Instant,
}

impl SystemClock {
    /// A clock anchored at the current wall time.
    pub fn new() -> Self {
        let clock = quanta::Clock::new();
        let anchor = clock.now();
        // A wall clock before 1970 is a broken machine: count from the epoch.
        let anchor_unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, nanos);
        Self { anchor_unix, clock, anchor }
    }
}

impl Default for SystemClock {
    fn default() -> Self {
        Self::new()
    }
}

impl QuotaClock for SystemClock {
    #[inline]
    fn now(&self) -> u64 {
        self.anchor_unix.saturating_add(nanos(self.clock.now().duration_since(self.anchor)))
    }
}

/// A clock that moves only when told to: for tests and simulations.
///
/// Clones share one time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock reading `unix_nanos`.
    pub fn new(unix_nanos: u64) -> Self {
        Self(Arc::new(AtomicU64::new(unix_nanos)))
    }

    /// A clock at the given RFC 3339 instant, e.g. `2026-03-08T09:00:00Z`.
    ///
    /// # Errors
    /// The text is not an RFC 3339 timestamp (or lies before 1970).
    pub fn at(rfc3339: &str) -> Result<Self, jiff::Error> {
        let ts: jiff::Timestamp = rfc3339.parse()?;
        Ok(Self::new(u64::try_from(ts.as_nanosecond()).unwrap_or(0)))
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(nanos(by), Ordering::AcqRel);
    }

    /// Sets the clock to `unix_nanos` (must not be earlier than now).
    pub fn set(&self, unix_nanos: u64) {
        self.0.fetch_max(unix_nanos, Ordering::AcqRel);
    }
}

impl QuotaClock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// A duration in whole nanoseconds, saturating (585 years fit in a `u64`).
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
