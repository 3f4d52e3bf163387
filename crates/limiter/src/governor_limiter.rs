use std::fmt;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::{NotKeyed, StateStore};

use crate::{Denied, KeyQuota, RateLimit};

/// GCRA state that governor updates and we can read without consuming.
///
/// It is governor's `InMemoryState` (one `AtomicU64` holding the theoretical
/// arrival time, in nanoseconds since the limiter's start, 0 = never used),
/// shared through an `Arc` so [`GovernorLimiter::remaining`] can peek at it.
#[derive(Debug, Default, Clone)]
struct PeekableState(Arc<AtomicU64>);

impl StateStore for PeekableState {
    type Key = NotKeyed;

    fn measure_and_replace<T, F, E>(&self, _key: &NotKeyed, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let cell = &*self.0;
        let mut prev = cell.load(Ordering::Acquire);
        loop {
            let (result, next) = f(NonZeroU64::new(prev).map(|n| n.get().into()))?;
            match cell.compare_exchange_weak(prev, next.as_u64(), Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return Ok(result),
                Err(actual) => prev = actual,
            }
        }
    }
}

type Direct<C> = governor::RateLimiter<NotKeyed, PeekableState, C, NoOpMiddleware<<C as Clock>::Instant>>;

struct Slot<C: Clock> {
    quota: KeyQuota,
    gcra: Direct<C>,
    tat: PeekableState,
    /// The limiter's own start (governor measures TAT from it).
    start: C::Instant,
    period: u64,
    tolerance: u64,
}

impl<C: Clock + Clone> Slot<C> {
    fn new(quota: KeyQuota, clock: &C, carried_tat: Option<(u64, C::Instant)>) -> Self {
        let tat = PeekableState::default();
        // governor takes `start = clock.now()` inside `new`; read ours just before.
        // On a real clock the two differ by nanoseconds, which only affects the
        // peeks (stats, queue wake-ups), never a grant.
        let start = clock.now();
        if let Some((old_tat, old_start)) = carried_tat {
            // Re-express the old theoretical arrival time against the new start.
            let shift = start.duration_since(old_start).as_u64();
            let moved = old_tat.saturating_sub(shift).max(u64::from(old_tat != 0));
            tat.0.store(moved, Ordering::Release);
        }
        let gcra = governor::RateLimiter::new(quota.to_governor(), tat.clone(), clock.clone());
        let period = nanos(quota.period()).max(1);
        let tolerance = period.saturating_mul(u64::from(quota.burst() - 1));
        Self { quota, gcra, tat, start, period, tolerance }
    }

    fn now(&self, clock: &C) -> u64 {
        clock.now().duration_since(self.start).as_u64()
    }

    /// Nanoseconds from `now` until a cell would pass.
    fn nanos_to_permit(&self, now: u64) -> u64 {
        let tat = self.tat.0.load(Ordering::Acquire);
        tat.saturating_sub(self.tolerance).saturating_sub(now)
    }

    fn remaining(&self, now: u64) -> u32 {
        let tat = self.tat.0.load(Ordering::Acquire).max(now);
        let slack = (now + self.tolerance + self.period).saturating_sub(tat);
        u32::try_from(slack / self.period).unwrap_or(u32::MAX).min(self.quota.burst())
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The in-process [`RateLimit`]: one governor GCRA per key.
///
/// Checking a key is one atomic load and one compare-and-swap on that key's
/// state; keys never contend with each other. Generic over governor's
/// [`Clock`] so tests can drive it with
/// [`FakeRelativeClock`](governor::clock::FakeRelativeClock).
pub struct GovernorLimiter<C: Clock = DefaultClock> {
    slots: Box<[Arc<Slot<C>>]>,
    clock: C,
}

impl GovernorLimiter<DefaultClock> {
    /// A limiter on the real clock with one slot per quota, in order.
    pub fn new(quotas: impl IntoIterator<Item = KeyQuota>) -> Self {
        Self::with_clock(quotas, DefaultClock::default())
    }
}

impl<C: Clock + Clone> GovernorLimiter<C> {
    /// A limiter on `clock` with one slot per quota, in order.
    pub fn with_clock(quotas: impl IntoIterator<Item = KeyQuota>, clock: C) -> Self {
        let slots = quotas.into_iter().map(|q| Arc::new(Slot::new(q, &clock, None))).collect();
        Self { slots, clock }
    }

    /// The quota of key `index`.
    pub fn quota(&self, index: usize) -> Option<KeyQuota> {
        self.slots.get(index).map(|s| s.quota)
    }

    /// A limiter for a new key set. Each entry is `(old_index, quota)`: a key
    /// that stays (`Some(old_index)`) keeps its state, so it does not get a fresh
    /// burst; a key whose quota changed keeps its spent permits under the new
    /// quota; a new key (`None`) starts full.
    pub fn reshape(&self, layout: impl IntoIterator<Item = (Option<usize>, KeyQuota)>) -> Self {
        let slots = layout
            .into_iter()
            .map(|(old, quota)| match old.and_then(|i| self.slots.get(i)) {
                Some(slot) if slot.quota == quota => Arc::clone(slot),
                Some(slot) => {
                    let tat = slot.tat.0.load(Ordering::Acquire);
                    Arc::new(Slot::new(quota, &self.clock, Some((tat, slot.start))))
                }
                None => Arc::new(Slot::new(quota, &self.clock, None)),
            })
            .collect();
        Self { slots, clock: self.clock.clone() }
    }
}

impl<C> RateLimit for GovernorLimiter<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    fn reshaped(&self, layout: &[(Option<usize>, KeyQuota)]) -> Arc<dyn RateLimit> {
        Arc::new(self.reshape(layout.iter().copied()))
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    #[inline]
    fn try_acquire(&self, index: usize) -> Result<(), Denied> {
        let slot = self.slots.get(index).ok_or(Denied::UnknownKey { index, len: self.slots.len() })?;
        slot.gcra
            .check()
            .map_err(|not_until| Denied::NotYet { wait: not_until.wait_time_from(self.clock.now()) })
    }

    #[inline]
    fn take_permit(&self, index: usize) -> bool {
        self.slots.get(index).is_some_and(|slot| slot.gcra.check().is_ok())
    }

    fn time_to_permit(&self, index: usize) -> Option<Duration> {
        let slot = self.slots.get(index)?;
        Some(Duration::from_nanos(slot.nanos_to_permit(slot.now(&self.clock))))
    }

    fn remaining(&self, index: usize) -> u32 {
        self.slots.get(index).map_or(0, |s| s.remaining(s.now(&self.clock)))
    }
}

impl<C: Clock> fmt::Debug for GovernorLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GovernorLimiter")
            .field("quotas", &self.slots.iter().map(|s| s.quota).collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn limiter(rpm: u32, burst: u32, n: usize) -> (GovernorLimiter<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let q = KeyQuota::new(rpm, burst).unwrap().with_margin(Duration::ZERO).unwrap();
        (GovernorLimiter::with_clock(vec![q; n], clock.clone()), clock)
    }

    #[test]
    fn burst_then_one_per_period() {
        let (l, clock) = limiter(60, 3, 1);
        assert_eq!(l.remaining(0), 3);
        for _ in 0..3 {
            assert_eq!(l.try_acquire(0), Ok(()));
        }
        assert_eq!(l.remaining(0), 0);
        assert_eq!(l.try_acquire(0), Err(Denied::NotYet { wait: Duration::from_secs(1) }));
        assert!(!l.take_permit(0));
        assert_eq!(l.time_to_permit(0), Some(Duration::from_secs(1)));
        clock.advance(Duration::from_millis(999));
        assert!(l.try_acquire(0).is_err());
        clock.advance(Duration::from_millis(1));
        assert_eq!(l.time_to_permit(0), Some(Duration::ZERO));
        assert_eq!(l.remaining(0), 1);
        assert!(l.take_permit(0));
    }

    #[test]
    fn capacity_refills_continuously() {
        let (l, clock) = limiter(60, 5, 1);
        for _ in 0..5 {
            l.try_acquire(0).unwrap();
        }
        for expected in 1..=5 {
            clock.advance(Duration::from_secs(1));
            assert_eq!(l.remaining(0), expected, "after {expected} s");
        }
        clock.advance(Duration::from_secs(10));
        assert_eq!(l.remaining(0), 5, "capped at burst");
    }

    #[test]
    fn any_permit_is_the_soonest_key() {
        let (l, clock) = limiter(60, 1, 3);
        assert_eq!(l.time_to_any_permit(), Some(Duration::ZERO));
        l.try_acquire(0).unwrap();
        clock.advance(Duration::from_millis(300));
        l.try_acquire(1).unwrap();
        clock.advance(Duration::from_millis(300));
        l.try_acquire(2).unwrap();
        assert_eq!(l.time_to_any_permit(), Some(Duration::from_millis(400)));
        let empty = GovernorLimiter::with_clock(Vec::new(), clock);
        assert_eq!(empty.time_to_any_permit(), None);
    }

    #[test]
    fn unknown_index_is_an_error_not_a_panic() {
        let (l, _) = limiter(60, 1, 2);
        assert_eq!(l.try_acquire(2), Err(Denied::UnknownKey { index: 2, len: 2 }));
        assert_eq!(l.time_to_permit(5), None);
        assert_eq!(l.remaining(5), 0);
    }

    #[test]
    fn reshape_keeps_spent_permits_of_staying_keys() {
        let (l, clock) = limiter(60, 2, 2);
        l.try_acquire(0).unwrap();
        l.try_acquire(0).unwrap();
        let q = l.quota(0).unwrap();
        // Key 0 moves to index 1; a new key arrives at index 0.
        let r = l.reshape([(None, q), (Some(0), q)]);
        assert_eq!(r.remaining(0), 2);
        assert_eq!(r.remaining(1), 0, "no fresh burst after a reload");
        // A changed quota keeps the spent state too.
        clock.advance(Duration::from_millis(500));
        let bigger = KeyQuota::new(120, 2).unwrap().with_margin(Duration::ZERO).unwrap();
        let r2 = r.reshape([(Some(1), bigger)]);
        // TAT = 2 s (absolute); the new tolerance is 0.5 s, so the next permit is at 1.5 s.
        assert!(r2.try_acquire(0).is_err(), "TAT carried over");
        clock.advance(Duration::from_millis(500));
        assert!(r2.try_acquire(0).is_err(), "still before 1.5 s");
        clock.advance(Duration::from_millis(500));
        assert!(r2.try_acquire(0).is_ok());
    }
}
