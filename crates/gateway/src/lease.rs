//! Leasing a key for one attempt: a fast path when nobody waits, otherwise a
//! first-come-first-served queue that sleeps until the earliest permit.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::HeaderValue;
use proxypal_keypool::{KeyPool, Selected};
use proxypal_limiter::{Cause, Permit};

pub use crate::fair::Waiter;
use crate::keyset::{KeyResources, SharedClock};
use crate::metrics::KeyMetrics;

/// Most upstream attempts one client request may make (each on another key).
pub const MAX_ATTEMPTS: usize = 10;

/// The keys one request has tried, each as (provider, key) positions, on
/// the stack: no allocation per request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tried {
    keys: [(u32, u32); MAX_ATTEMPTS],
    len: usize,
}

impl Tried {
    /// How many keys were tried.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none was tried yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether key `index` of provider `provider` was tried.
    pub fn contains(&self, provider: usize, index: usize) -> bool {
        self.keys[..self.len].iter().any(|&(p, k)| p as usize == provider && k as usize == index)
    }

    /// The keys of `provider` tried so far, in order.
    pub fn of(&self, provider: usize) -> impl Iterator<Item = usize> + '_ {
        self.keys[..self.len].iter().filter(move |(p, _)| *p as usize == provider).map(|(_, k)| *k as usize)
    }

    /// Records key `index` of `provider`; `false` (and nothing recorded) when
    /// [`MAX_ATTEMPTS`] keys were tried already.
    pub fn push(&mut self, provider: usize, index: usize) -> bool {
        let (Ok(p), Ok(k)) = (u32::try_from(provider), u32::try_from(index)) else { return false };
        match self.keys.get_mut(self.len) {
            Some(slot) => {
                *slot = (p, k);
                self.len += 1;
                true
            }
            None => false,
        }
    }
}

/// A leased key with what an attempt needs.
#[derive(Debug)]
pub struct Lease {
    /// The key (report its outcome to the pool).
    pub selected: Selected,
    /// Its `Authorization` header value (empty: the provider takes none).
    pub auth: HeaderValue,
    /// The provider, by position in the gateway's provider list.
    pub provider: usize,
    /// The route's target it serves, by position among the route's targets.
    pub target: usize,
    /// Its metric handles.
    pub metrics: Arc<KeyMetrics>,
    /// The quota taken for this attempt: settle it when the answer ends
    /// (dropping it keeps a token reservation as used, the safe side).
    pub permit: Permit<SharedClock>,
    /// The quota engine of the key set the key was leased from: what the
    /// answer teaches goes there, even if a reload swapped key sets meanwhile.
    pub quotas: Arc<crate::Engine>,
}

/// Why no key could be leased.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NoKey {
    /// Every key is disabled (rejected by the upstream).
    AllDisabled,
    /// Every remaining key was already tried for this request.
    AllTried,
    /// No key had capacity before the queue timeout; the next permit is `wait` away.
    QueueTimeout {
        /// Time until the next permit.
        wait: Duration,
        /// The limit that holds the soonest key back.
        cause: Cause,
    },
    /// There are no keys (dev mode without keys, or an emptied reload).
    NoKeys,
}

/// The next key of `keys` (provider `provider`) in round-robin order that
/// is usable, has room in every window of its budgets for a request
/// reserving `tokens`, and was not tried — now, or `None`. Cheap checks first
/// (cooldown and disabled inside the pool, then `tried`), the quota last: a
/// grant counts at once.
pub fn try_lease(keys: &KeyPool<KeyResources>, provider: usize, tried: &Tried, tokens: u64) -> Option<Lease> {
    let mut found = None;
    let selected = keys.select_with(|c| {
        if tried.contains(provider, c.index) {
            return false;
        }
        let Some(auth) = c.attachment.auth.get(c.index) else { return false };
        let Some(metrics) = c.attachment.metrics.get(c.index) else { return false };
        let Some(permit) = c.attachment.quotas.try_acquire(c.index, tokens) else { return false };
        found = Some((auth.clone(), Arc::clone(metrics), permit, Arc::clone(&c.attachment.quotas)));
        true
    })?;
    let (auth, metrics, permit, quotas) = found?;
    Some(Lease { selected, auth, provider, target: 0, metrics, permit, quotas })
}

/// How long until a key of `keys` (provider `provider`) not in `tried`
/// could be leased for a request reserving `tokens`; `Err` when none ever can.
pub fn time_to_lease(
    keys: &KeyPool<KeyResources>,
    provider: usize,
    tried: &Tried,
    tokens: u64,
) -> Result<Duration, NoKey> {
    time_to_lease_with(keys, provider, tried, tokens, false)
}

/// [`time_to_lease`]; with `local`, by the limits only this replica counts
/// (request windows left to a shared store).
pub(crate) fn time_to_lease_with(
    keys: &KeyPool<KeyResources>,
    provider: usize,
    tried: &Tried,
    tokens: u64,
    local: bool,
) -> Result<Duration, NoKey> {
    if keys.is_empty() {
        return Err(NoKey::NoKeys);
    }
    let wait = keys.time_to_selectable(|c| {
        if tried.contains(provider, c.index) {
            None
        } else if local {
            c.attachment.quotas.local_wait(c.index, tokens).map(|w| w.wait)
        } else {
            c.attachment.quotas.wait(c.index, tokens).map(|w| w.wait)
        }
    });
    match wait {
        Some(w) => Ok(w),
        None if keys.time_to_selectable(|_| Some(Duration::ZERO)).is_none() => Err(NoKey::AllDisabled),
        None => Err(NoKey::AllTried),
    }
}

/// Why the soonest key of `keys` not in `tried` cannot take a request now
/// (for the answer when the wait is too long): its wait and the limit behind it.
pub(crate) fn holding_back(
    keys: &KeyPool<KeyResources>,
    provider: usize,
    tried: &Tried,
    tokens: u64,
) -> (Duration, Cause) {
    let mut soonest = (Duration::MAX, Cause::None);
    keys.with_current(|all, resources| {
        for index in (0..all.len()).filter(|i| !tried.contains(provider, *i)) {
            if let Some(w) = resources.quotas.wait(index, tokens) {
                if w.wait < soonest.0 {
                    soonest = (w.wait, w.cause);
                }
            }
        }
    });
    soonest
}

/// Where a waiting request takes its key from: one pool, or a route's
/// targets across providers.
pub trait Source {
    /// A key with a permit now, if any.
    fn try_lease(&self) -> Option<Lease>;
    /// How long until one could be leased; `Err` when none ever can.
    fn time_to_lease(&self) -> Result<Duration, NoKey>;
    /// The wait and the limit behind it, for the answer when the wait is too
    /// long (`Duration::MAX` when nothing waits on a quota).
    fn holding_back(&self) -> (Duration, Cause);
}

/// One pool's keys not yet tried: a [`Source`].
#[derive(Debug, Clone, Copy)]
pub struct PoolSource<'a> {
    /// The pool.
    pub keys: &'a KeyPool<KeyResources>,
    /// Its provider's position.
    pub provider: usize,
    /// Keys already tried.
    pub tried: &'a Tried,
    /// The request's token reservation.
    pub tokens: u64,
}

impl Source for PoolSource<'_> {
    fn try_lease(&self) -> Option<Lease> {
        try_lease(self.keys, self.provider, self.tried, self.tokens)
    }

    fn time_to_lease(&self) -> Result<Duration, NoKey> {
        time_to_lease(self.keys, self.provider, self.tried, self.tokens)
    }

    fn holding_back(&self) -> (Duration, Cause) {
        holding_back(self.keys, self.provider, self.tried, self.tokens)
    }
}

/// The queue-timeout answer: the soonest wait, and the quota cause when the
/// pool itself (not a cooldown) holds the key back that long.
fn timed_out(source: &impl Source, wait: Duration) -> NoKey {
    let (quota_wait, cause) = source.holding_back();
    // Read a moment after `wait`: allow for the time between the two reads.
    let cause = if quota_wait != Duration::MAX && quota_wait + Duration::from_millis(50) >= wait {
        cause
    } else {
        Cause::None
    };
    NoKey::QueueTimeout { wait, cause }
}

/// Requests waiting for a permit, served first come, first served.
#[derive(Debug)]
pub struct LeaseQueue {
    /// One waiter at a time tries for permits; the rest queue on it, by
    /// client in weighted round-robin order, in arrival order within one.
    fair: crate::fair::Fair,
    waiting: AtomicUsize,
}

impl Default for LeaseQueue {
    fn default() -> Self {
        Self::new()
    }
}

/// How long before a permit falls due the head of the queue stops sleeping
/// and starts yielding (one timer tick plus slack).
const EARLY_WAKE: Duration = Duration::from_millis(2);

/// The longest the head of the queue sleeps without looking again, so that a
/// reload, a re-enabled key or a permit freed elsewhere is noticed.
pub(crate) const RECHECK: Duration = Duration::from_millis(250);

impl LeaseQueue {
    /// An empty queue.
    pub fn new() -> Self {
        Self { fair: crate::fair::Fair::default(), waiting: AtomicUsize::new(0) }
    }

    /// Requests waiting now.
    pub fn depth(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Leases the next key in round-robin order that is usable, has a permit
    /// and is not in `tried`, waiting first come, first served until
    /// `deadline` when every key is out of permits.
    ///
    /// # Errors
    /// [`NoKey`]: no key is usable at all, or none had a permit by `deadline`.
    pub async fn lease(
        &self,
        keys: &KeyPool<KeyResources>,
        tried: &Tried,
        tokens: u64,
        deadline: tokio::time::Instant,
    ) -> Result<Lease, NoKey> {
        self.lease_from(&PoolSource { keys, provider: 0, tried, tokens }, deadline).await
    }

    /// [`lease`](Self::lease) from any [`Source`] (a route's targets), as an
    /// anonymous client.
    ///
    /// # Errors
    /// [`NoKey`]: no key is usable at all, or none had a permit by `deadline`.
    pub async fn lease_from(
        &self,
        source: &impl Source,
        deadline: tokio::time::Instant,
    ) -> Result<Lease, NoKey> {
        self.lease_as(source, &Waiter::anonymous(), deadline).await
    }

    /// Requests waiting now, by client lane (`""`: anonymous), for lanes with
    /// any waiting.
    pub fn depth_by_client(&self, f: impl FnMut(&str, usize)) {
        self.fair.depths(f);
    }

    /// [`lease_from`](Self::lease_from) for client `who`: when requests wait,
    /// clients take turns by weight (first come, first served within one).
    ///
    /// # Errors
    /// [`NoKey`]: no key is usable at all, or none had a permit by `deadline`.
    pub async fn lease_as(
        &self,
        source: &impl Source,
        who: &Waiter,
        deadline: tokio::time::Instant,
    ) -> Result<Lease, NoKey> {
        // Fast path: nobody is queued, so taking a permit now jumps no one.
        if self.waiting.load(Ordering::Acquire) == 0 {
            if let Some(lease) = source.try_lease() {
                return Ok(lease);
            }
        }
        // Boxed: the queue's timers and semaphore futures would otherwise make every
        // request's future larger (it is moved on each `.await` nesting), for a path taken
        // only when keys are out of permits.
        Box::pin(self.wait(source, who, deadline)).await
    }

    /// Joins the queue (counted until the slot is dropped).
    pub(crate) fn enter(&self) -> impl Drop + '_ {
        QueueSlot::enter(&self.waiting)
    }

    /// Waits for this request's turn at the head of the queue, until
    /// `deadline` (`None`: past it).
    pub(crate) async fn turn(
        &self,
        who: &Waiter,
        deadline: tokio::time::Instant,
    ) -> Option<crate::fair::Turn<'_>> {
        self.fair.acquire(who, deadline).await
    }

    async fn wait(
        &self,
        source: &impl Source,
        who: &Waiter,
        deadline: tokio::time::Instant,
    ) -> Result<Lease, NoKey> {
        let wait = source.time_to_lease()?;
        // A wait past the deadline (a spent day) is answered at once, not after queueing.
        if tokio::time::Instant::now() + wait > deadline {
            return Err(timed_out(source, wait));
        }
        let _queued = QueueSlot::enter(&self.waiting);
        let Some(_turn) = self.fair.acquire(who, deadline).await else {
            let wait = source.time_to_lease().unwrap_or(Duration::ZERO);
            return Err(timed_out(source, wait));
        };
        loop {
            if let Some(lease) = source.try_lease() {
                return Ok(lease);
            }
            let wait = source.time_to_lease()?;
            let now = tokio::time::Instant::now();
            if now + wait > deadline {
                return Err(timed_out(source, wait));
            }
            // Wake at the next permit, but at least every RECHECK. Tokio's timer has a
            // 1 ms tick and rounds up, and with burst 1 a permit taken late is lost for
            // good (the next one counts from the late grant): so sleep to just before
            // the permit is due and yield for the last millisecond. Measured: ~1.2 ms
            // lost per permit otherwise, 1.2 % of the quota at 600/min.
            if wait > EARLY_WAKE {
                tokio::time::sleep((wait - EARLY_WAKE).min(RECHECK)).await;
            } else {
                tokio::task::yield_now().await;
            }
        }
    }
}

/// Counts a request in the queue for as long as it lives.
struct QueueSlot<'a>(&'a AtomicUsize);

impl<'a> QueueSlot<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Self(counter)
    }
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The queue on Tokio's paused clock: the limiter and the key pool read
    //! Tokio's time too, and the test moves it a millisecond at a time (the
    //! head of the queue yields through a permit's last millisecond, so the
    //! runtime is never idle enough to advance time by itself).

    use std::sync::Arc;
    use std::time::Duration;

    use proxypal_keypool::{KeyPool, KeySpec, Outcome};
    use proxypal_limiter::{Limits, QuotaClock};
    use tokio::time::Instant;

    use super::*;
    use crate::{Gateway, GatewayConfig};

    /// Tokio's (paused) time for the quota engine, from 2026-11-30T00:00:00Z.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct TokioQuotaClock(pub(crate) Instant);

    impl QuotaClock for TokioQuotaClock {
        fn now(&self) -> u64 {
            1_796_083_200_000_000_000 + u64::try_from(self.0.elapsed().as_nanos()).unwrap()
        }
    }

    /// Tokio's (paused) time for the key pool's cooldowns.
    #[derive(Debug, Clone, Copy)]
    pub(crate) struct TokioPoolClock(pub(crate) Instant);

    impl proxypal_keypool::Clock for TokioPoolClock {
        fn now(&self) -> Duration {
            self.0.elapsed()
        }
    }

    /// A gateway over `n` keys, each allowed `per_minute` spaced evenly
    /// (burst 1, no margin), on Tokio's clock.
    pub(crate) fn gateway(n: usize, per_minute: u64) -> Arc<Gateway> {
        let limits = Limits {
            requests_per_minute: Some(per_minute),
            burst: Some(1),
            margin: Some(Duration::ZERO),
            ..Limits::default()
        };
        gateway_with(n, limits)
    }

    /// A gateway over `n` keys with `limits` each, on Tokio's clock.
    pub(crate) fn gateway_with(n: usize, limits: Limits) -> Arc<Gateway> {
        let epoch = Instant::now();
        let mut config = GatewayConfig::with_keys(
            (0..n).map(|i| KeySpec::new(format!("nvapi-lease-test-{i:020}"))).collect::<Vec<_>>(),
        );
        config.providers[0].limits = limits;
        let mut registry = prometheus_client::registry::Registry::default();
        let pool = KeyPool::builder().clock(TokioPoolClock(epoch));
        Gateway::build(config, &mut registry, pool, Arc::new(TokioQuotaClock(epoch))).unwrap()
    }

    /// Moves Tokio's paused clock forward a millisecond at a time until
    /// `done` holds or `limit` has passed.
    async fn drive(limit: Duration, done: impl Fn() -> bool) {
        let end = Instant::now() + limit;
        while !done() && Instant::now() < end {
            tokio::time::advance(Duration::from_millis(1)).await;
            for _ in 0..4 {
                tokio::task::yield_now().await;
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_are_served_in_arrival_order_as_each_permit_falls_due() {
        let gw = gateway(1, 60); // one permit per second
        let t0 = Instant::now();
        let deadline = t0 + Duration::from_secs(10);
        assert!(gw.queue().lease(&gw.test_keys(), &Tried::default(), 0, deadline).await.is_ok(), "the burst");
        let served = Arc::new(std::sync::Mutex::new(Vec::new()));
        for id in 0..3 {
            let (gw, served) = (Arc::clone(&gw), Arc::clone(&served));
            tokio::spawn(async move {
                let lease = gw.queue().lease(&gw.test_keys(), &Tried::default(), 0, deadline).await;
                assert!(lease.is_ok(), "waiter {id}: {lease:?}");
                served.lock().unwrap().push((id, t0.elapsed()));
            });
            tokio::task::yield_now().await; // arrive in order
        }
        assert_eq!(gw.queue_depth(), 3);
        drive(Duration::from_secs(5), || served.lock().unwrap().len() == 3).await;
        let served = served.lock().unwrap().clone();
        let order: Vec<usize> = served.iter().map(|(id, _)| *id).collect();
        assert_eq!(order, [0, 1, 2], "{served:?}");
        for (i, (_, at)) in served.iter().enumerate() {
            let due = Duration::from_secs(i as u64 + 1);
            // Served when the permit falls due, not a timer tick or a recheck later.
            assert!(*at >= due && *at <= due + Duration::from_millis(2), "waiter {i} at {at:?}, due {due:?}");
        }
        assert_eq!(gw.queue_depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_permit_beyond_the_deadline_times_out_at_once_with_the_wait() {
        let gw = gateway(2, 60);
        let tried = Tried::default();
        let t0 = Instant::now();
        for _ in 0..2 {
            assert!(try_lease(&gw.test_keys(), 0, &tried, 0).is_some());
        }
        let got = gw.queue().lease(&gw.test_keys(), &tried, 0, t0 + Duration::from_millis(500)).await;
        match got {
            Err(NoKey::QueueTimeout { wait, .. }) => {
                assert!(wait > Duration::from_millis(990) && wait <= Duration::from_secs(1), "{wait:?}")
            }
            other => panic!("expected a queue timeout, got {other:?}"),
        }
        assert_eq!(t0.elapsed(), Duration::ZERO, "no point waiting for a permit after the deadline");
        assert_eq!(gw.queue_depth(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_goes_away_leaves_the_queue() {
        let gw = gateway(1, 60);
        let t0 = Instant::now();
        assert!(try_lease(&gw.test_keys(), 0, &Tried::default(), 0).is_some());
        let gone = {
            let gw = Arc::clone(&gw);
            tokio::spawn(async move {
                let _ = gw
                    .queue()
                    .lease(&gw.test_keys(), &Tried::default(), 0, t0 + Duration::from_secs(10))
                    .await;
            })
        };
        tokio::task::yield_now().await;
        assert_eq!(gw.queue_depth(), 1);
        gone.abort();
        let _ = gone.await;
        assert_eq!(gw.queue_depth(), 0, "the slot is released by drop");
        // The next waiter is not stuck behind the cancelled one's turn.
        let next = {
            let gw = Arc::clone(&gw);
            tokio::spawn(async move {
                gw.queue()
                    .lease(&gw.test_keys(), &Tried::default(), 0, t0 + Duration::from_secs(10))
                    .await
                    .is_ok()
            })
        };
        drive(Duration::from_secs(2), || next.is_finished()).await;
        assert!(next.await.unwrap());
        assert!(t0.elapsed() <= Duration::from_millis(1_002), "{:?}", t0.elapsed());
    }

    #[tokio::test(start_paused = true)]
    async fn no_key_reasons_come_back_without_waiting() {
        let deadline = Instant::now() + Duration::from_secs(10);
        let empty = gateway(0, 60);
        let got = empty.queue().lease(&empty.test_keys(), &Tried::default(), 0, deadline).await;
        assert_eq!(got.err(), Some(NoKey::NoKeys));

        let gw = gateway(2, 60);
        let mut tried = Tried::default();
        for _ in 0..2 {
            let lease = try_lease(&gw.test_keys(), 0, &tried, 0).unwrap();
            assert!(tried.push(0, lease.selected.index()));
        }
        assert_eq!(gw.queue().lease(&gw.test_keys(), &tried, 0, deadline).await.err(), Some(NoKey::AllTried));

        for _ in 0..2 {
            let lease = &gw.test_keys().select_with(|_| true).unwrap();
            gw.test_keys().report(lease, Outcome::AuthFailed);
        }
        let got = gw.queue().lease(&gw.test_keys(), &Tried::default(), 0, deadline).await;
        assert_eq!(got.err(), Some(NoKey::AllDisabled));
        assert_eq!(Instant::now(), deadline - Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cooling_key_is_waited_for_and_tried_keys_are_skipped() {
        let gw = gateway(2, 60_000);
        let t0 = Instant::now();
        let first = try_lease(&gw.test_keys(), 0, &Tried::default(), 0).unwrap();
        gw.test_keys()
            .report(&first.selected, Outcome::RateLimited { retry_after: Some(Duration::from_millis(300)) });
        let mut tried = Tried::default();
        tried.push(0, 1 - first.selected.index());
        // The only untried key rests for 300 ms: the request waits for it.
        let (gw2, tried2) = (Arc::clone(&gw), tried);
        let waiter = tokio::spawn(async move {
            gw2.queue()
                .lease(&gw2.test_keys(), &tried2, 0, t0 + Duration::from_secs(5))
                .await
                .map(|l| l.selected.index())
        });
        drive(Duration::from_secs(1), || waiter.is_finished()).await;
        assert_eq!(waiter.await.unwrap(), Ok(first.selected.index()));
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(300) && waited <= Duration::from_millis(302), "{waited:?}");
    }

    #[test]
    fn tried_keys_stay_on_the_stack_up_to_the_limit() {
        let mut tried = Tried::default();
        assert!(tried.is_empty());
        for i in 0..MAX_ATTEMPTS {
            assert!(tried.push(i % 2, i * 7));
        }
        assert!(!tried.push(0, 99), "an eleventh key is refused, not written out of bounds");
        assert_eq!(tried.len(), MAX_ATTEMPTS);
        assert!(tried.contains(1, 63) && !tried.contains(0, 63) && !tried.contains(0, 99));
        assert_eq!(tried.of(0).take(3).collect::<Vec<_>>(), [0, 14, 28]);
    }
}
