//! Property tests on a fake clock: the GCRA bound and continuous refill.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on bad setup

use std::time::Duration;

use governor::clock::FakeRelativeClock;
use proptest::prelude::*;
use proxypal_limiter::{GovernorLimiter, KeyQuota, RateLimit};

fn quota() -> impl Strategy<Value = KeyQuota> {
    (1u32..=1200, 1u32..=50, 0u64..=2_000).prop_map(|(rpm, burst, margin_ms)| {
        KeyQuota::new(rpm, burst)
            .and_then(|q| q.with_margin(Duration::from_millis(margin_ms)))
            .expect("strategy only makes valid quotas")
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// For any interval of length T, one key is granted at most
    /// burst + floor(T × rate) permits (rate = 1 / period).
    #[test]
    fn never_more_than_burst_plus_rate_times_interval(
        quota in quota(),
        gaps in prop::collection::vec(0u64..3_000_000_000, 1..300),
    ) {
        let clock = FakeRelativeClock::default();
        let limiter = GovernorLimiter::with_clock([quota], clock.clone());
        let mut granted: Vec<u64> = Vec::new();
        let mut now = 0u64;
        for gap in gaps {
            // Mix long idle gaps with bursts of back-to-back attempts.
            let gap = if gap % 3 == 0 { 0 } else { gap % (quota.period().as_nanos() as u64 * 3) };
            clock.advance(Duration::from_nanos(gap));
            now += gap;
            if limiter.try_acquire(0).is_ok() {
                granted.push(now);
            }
        }
        let period = quota.period().as_nanos() as u64;
        for i in 0..granted.len() {
            for j in i..granted.len() {
                let t = granted[j] - granted[i];
                let count = (j - i + 1) as u64;
                let bound = u64::from(quota.burst()) + t / period;
                prop_assert!(count <= bound,
                    "{count} permits in {t} ns > bound {bound} (quota {quota:?}, now {now})");
                prop_assert_eq!(bound, quota.max_in_window(Duration::from_nanos(t)));
            }
        }
    }

    /// A drained key regains one permit per period, continuously, up to burst;
    /// and a key that is asked every time it may be is granted exactly then.
    #[test]
    fn capacity_refills_continuously(quota in quota(), steps in 1u32..20) {
        let clock = FakeRelativeClock::default();
        let limiter = GovernorLimiter::with_clock([quota], clock.clone());
        while limiter.try_acquire(0).is_ok() {}
        prop_assert_eq!(limiter.remaining(0), 0);
        for k in 1..=steps {
            clock.advance(quota.period());
            prop_assert_eq!(limiter.remaining(0), k.min(quota.burst()), "after {} periods", k);
        }
        // Drain again and check the announced wait is exact.
        while limiter.try_acquire(0).is_ok() {}
        let wait = limiter.time_to_permit(0).expect("key 0 exists");
        prop_assert!(wait > Duration::ZERO);
        clock.advance(wait - Duration::from_nanos(1));
        prop_assert!(limiter.try_acquire(0).is_err());
        clock.advance(Duration::from_nanos(1));
        prop_assert!(limiter.try_acquire(0).is_ok());
    }
}

/// The default quota over a real rolling minute: at most 40 in any closed 60 s
/// window however hard the key is pushed (one attempt every millisecond).
#[test]
fn default_quota_keeps_every_rolling_minute_at_forty() {
    let clock = FakeRelativeClock::default();
    let limiter = GovernorLimiter::with_clock([KeyQuota::default()], clock.clone());
    let mut granted = Vec::new();
    for ms in 0..300_000u64 {
        if limiter.try_acquire(0).is_ok() {
            granted.push(ms);
        }
        clock.advance(Duration::from_millis(1));
    }
    let worst = granted
        .iter()
        .enumerate()
        .map(|(i, &start)| granted[i..].iter().take_while(|&&t| t <= start + 60_000).count())
        .max()
        .unwrap_or(0);
    assert_eq!(worst, 40, "closed 60 s windows");
    // And it still uses the quota: 5 minutes ≈ 200 permits, minus the 0.8 % margin.
    assert!(granted.len() >= 198, "granted {}", granted.len());
}
