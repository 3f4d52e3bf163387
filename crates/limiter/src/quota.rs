use std::num::NonZeroU32;
use std::time::Duration;

/// Why a [`KeyQuota`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// `requests_per_minute` was zero.
    #[error("requests_per_minute must be at least 1 (got 0)")]
    ZeroRate,
    /// `burst` was zero.
    #[error("burst must be at least 1 (got 0)")]
    ZeroBurst,
    /// The margin is so large that the quota makes no sense.
    #[error("margin must be shorter than the 60 s window (got {0:?})")]
    MarginTooLarge(Duration),
}

/// One key's rate limit: `requests_per_minute`, `burst`, and a safety `margin`.
///
/// Permits are spaced `(60 s + margin) / requests_per_minute` apart, and `burst`
/// of them may be taken at once after an idle period. See the crate docs for
/// what each choice allows in a rolling 60-second window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyQuota {
    requests_per_minute: NonZeroU32,
    burst: NonZeroU32,
    margin: Duration,
}

const MINUTE: Duration = Duration::from_secs(60);

impl KeyQuota {
    /// NVIDIA's free tier as reported: 40 requests per minute.
    pub const DEFAULT_REQUESTS_PER_MINUTE: u32 = 40;
    /// Burst 1: no rolling minute carries more than `requests_per_minute`.
    pub const DEFAULT_BURST: u32 = 1;
    /// Slack added to the 60 s window so arrival jitter upstream cannot push an
    /// extra request into a rolling minute.
    pub const DEFAULT_MARGIN: Duration = Duration::from_millis(500);

    /// A quota of `requests_per_minute` with `burst`, and the default margin.
    ///
    /// # Errors
    /// [`QuotaError::ZeroRate`] or [`QuotaError::ZeroBurst`] for zeros.
    pub fn new(requests_per_minute: u32, burst: u32) -> Result<Self, QuotaError> {
        Ok(Self {
            requests_per_minute: NonZeroU32::new(requests_per_minute).ok_or(QuotaError::ZeroRate)?,
            burst: NonZeroU32::new(burst).ok_or(QuotaError::ZeroBurst)?,
            margin: Self::DEFAULT_MARGIN,
        })
    }

    /// The same quota with another safety margin (zero gives exactly
    /// `requests_per_minute` per minute in the long run).
    ///
    /// # Errors
    /// [`QuotaError::MarginTooLarge`] for a margin of 60 s or more.
    pub fn with_margin(self, margin: Duration) -> Result<Self, QuotaError> {
        if margin >= MINUTE {
            return Err(QuotaError::MarginTooLarge(margin));
        }
        Ok(Self { margin, ..self })
    }

    /// Requests per minute (before the margin).
    pub fn requests_per_minute(&self) -> u32 {
        self.requests_per_minute.get()
    }

    /// Permits that may be taken back to back after an idle period.
    pub fn burst(&self) -> u32 {
        self.burst.get()
    }

    /// The safety margin added to the 60 s window.
    pub fn margin(&self) -> Duration {
        self.margin
    }

    /// The emission interval: time between two permits at the sustained rate.
    pub fn period(&self) -> Duration {
        // Never zero: at most u32::MAX per minute is still ≥ 13 ns apart.
        (MINUTE + self.margin) / self.requests_per_minute.get()
    }

    /// The most permits this quota can grant in any closed interval of length
    /// `window`: `burst + ⌊window / period⌋`.
    pub fn max_in_window(&self, window: Duration) -> u64 {
        let period = self.period().as_nanos();
        let extra = window.as_nanos() / period;
        u64::from(self.burst.get()).saturating_add(u64::try_from(extra).unwrap_or(u64::MAX))
    }

    /// The governor quota this becomes.
    pub(crate) fn to_governor(self) -> governor::Quota {
        // `with_period` only fails for a zero period; `period()` is never zero
        // (see above), so fall back to the same rate without margin for safety.
        governor::Quota::with_period(self.period())
            .unwrap_or_else(|| governor::Quota::per_minute(self.requests_per_minute))
            .allow_burst(self.burst)
    }
}

impl Default for KeyQuota {
    /// 40 requests per minute, burst 1, 500 ms margin.
    fn default() -> Self {
        Self {
            requests_per_minute: NonZeroU32::MIN.saturating_add(Self::DEFAULT_REQUESTS_PER_MINUTE - 1),
            burst: NonZeroU32::MIN,
            margin: Self::DEFAULT_MARGIN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_forty_per_minute_burst_one() {
        let q = KeyQuota::default();
        assert_eq!(q.requests_per_minute(), 40);
        assert_eq!(q.burst(), 1);
        assert_eq!(q.period(), Duration::from_micros(1_512_500));
        // The whole point of the default: a closed 60 s window holds at most 40.
        assert_eq!(q.max_in_window(MINUTE), 40);
    }

    #[test]
    fn governor_per_minute_would_allow_eighty() {
        let q = KeyQuota::new(40, 40).unwrap().with_margin(Duration::ZERO).unwrap();
        assert_eq!(q.max_in_window(MINUTE), 80);
        assert_eq!(q.max_in_window(MINUTE - Duration::from_nanos(1)), 79);
    }

    #[test]
    fn zero_inputs_are_named() {
        assert_eq!(KeyQuota::new(0, 1), Err(QuotaError::ZeroRate));
        assert_eq!(KeyQuota::new(1, 0), Err(QuotaError::ZeroBurst));
        assert!(KeyQuota::new(1, 1).unwrap().with_margin(MINUTE).is_err());
        assert_eq!(QuotaError::ZeroRate.to_string(), "requests_per_minute must be at least 1 (got 0)");
    }
}
