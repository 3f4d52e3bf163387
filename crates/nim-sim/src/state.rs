//! Shared server state: counters, limiters, fault queue.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::config::{SimConfig, SimRateLimit};
use crate::fault::{Fault, FaultTarget};
use crate::stats::{AccountStats, KeyCounters, SimStats};

/// State shared by the accept loop, every connection and the handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: SimConfig,
    pub(crate) accepted_keys: HashSet<String>,
    pub(crate) forbidden_keys: HashSet<String>,
    pub(crate) start: Instant,
    pub(crate) open_connections: AtomicUsize,
    pub(crate) active_streams: AtomicUsize,
    pub(crate) next_id: AtomicU64,
    /// The request limits: the main `rate_limit` first (if any), then the
    /// extra ones.
    limits: Vec<SimRateLimit>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    per_key: BTreeMap<String, KeyState>,
    accounts: BTreeMap<String, AccountState>,
    total_requests: u64,
    last_request_headers: Option<http::HeaderMap>,
    last_request_body: Option<bytes::Bytes>,
    /// The last [`SimConfig::request_log`] bodies, oldest first.
    request_log: VecDeque<bytes::Bytes>,
    models: std::collections::BTreeMap<String, u64>,
    faults: VecDeque<(Fault, FaultTarget)>,
    sticky: Option<Fault>,
    /// Accepted requests in flight, all accounts together.
    in_flight: usize,
    max_in_flight: usize,
}

#[derive(Debug, Default)]
struct KeyState {
    counters: KeyCounters,
    accepts: Vec<Duration>,
}

/// Limits and counters of one account; created on its first `POST`.
#[derive(Debug)]
struct AccountState {
    /// One per entry of [`Shared::limits`], same order.
    limiters: Vec<Limiter>,
    tokens: TokenWindow,
    stats: AccountStats,
    accepts: Vec<Duration>,
}

impl AccountState {
    fn new(limits: &[SimRateLimit], now: Instant) -> Self {
        Self {
            limiters: limits.iter().map(|l| Limiter::new(*l, now)).collect(),
            tokens: TokenWindow::default(),
            stats: AccountStats::default(),
            accepts: Vec::new(),
        }
    }
}

/// Which counter a finished request bumps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    Unauthorized,
    /// Not counted beyond `requests` (400, 404, 405, …).
    Other,
}

/// The state of one limit as announced in `x-ratelimit-*` headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LimitStatus {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    /// Time until the limit is fully restored; `None` if never.
    pub(crate) reset: Option<Duration>,
}

/// What the `x-ratelimit-*` headers of an answer announce (all `None`
/// unless [`SimConfig::limit_headers`] is on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct LimitInfo {
    pub(crate) requests: Option<LimitStatus>,
    pub(crate) tokens: Option<LimitStatus>,
}

/// The concurrency slot of an accepted request: it is in flight until this
/// is dropped. Must not be dropped while the state lock is held.
#[derive(Debug)]
pub(crate) struct Slot {
    shared: Arc<Shared>,
    account: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.shared.release(&self.account);
    }
}

impl Shared {
    pub(crate) fn new(config: SimConfig) -> Self {
        Self {
            accepted_keys: config.keys.iter().cloned().collect(),
            forbidden_keys: config.forbidden_keys.iter().cloned().collect(),
            limits: config.rate_limit.iter().chain(config.extra_limits.iter()).copied().collect(),
            config,
            start: Instant::now(),
            open_connections: AtomicUsize::new(0),
            active_streams: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counters in an
        // unusable state, so a poisoned lock is still fine to use.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the arrival of a request, and takes the fault that applies to
    /// it, if any (queued faults first, FIFO, then the sticky one).
    pub(crate) fn arrive(&self, key: Option<&str>, headers: &http::HeaderMap) -> Option<Fault> {
        let mut st = self.lock();
        st.total_requests += 1;
        if self.config.record_headers {
            st.last_request_headers = Some(headers.clone());
        }
        if let Some(k) = key {
            key_state(&mut st.per_key, k).counters.requests += 1;
        }
        let pos = st.faults.iter().position(|(_, t)| t.matches(key));
        let fault = match pos {
            Some(i) => st.faults.remove(i).map(|(f, _)| f),
            None => st.sticky.clone(),
        };
        if let (Some(_), Some(k)) = (&fault, key) {
            key_state(&mut st.per_key, k).counters.faults += 1;
        }
        fault
    }

    /// Records a request's body: the model it names (counted), and the body
    /// itself when headers are recorded.
    pub(crate) fn record_body(&self, body: &bytes::Bytes) {
        let model = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("model").and_then(serde_json::Value::as_str).map(str::to_owned));
        let mut st = self.lock();
        if let Some(model) = model {
            *st.models.entry(model).or_default() += 1;
        }
        if self.config.record_headers {
            st.last_request_body = Some(body.clone());
        }
        let keep = self.config.request_log;
        if keep > 0 {
            while st.request_log.len() >= keep {
                st.request_log.pop_front();
            }
            st.request_log.push_back(body.clone());
        }
    }

    /// The recorded request bodies (see [`SimConfig::request_log`]), oldest
    /// first.
    pub(crate) fn request_log(&self) -> Vec<bytes::Bytes> {
        self.lock().request_log.iter().cloned().collect()
    }

    /// The last request body recorded, by the request log or with the
    /// headers.
    pub(crate) fn last_body(&self) -> Option<bytes::Bytes> {
        let st = self.lock();
        st.request_log.back().or(st.last_request_body.as_ref()).cloned()
    }

    /// Counts the outcome of a request that carried `key`.
    pub(crate) fn count(&self, key: Option<&str>, outcome: Outcome) {
        let Some(k) = key else { return };
        let mut st = self.lock();
        let c = &mut key_state(&mut st.per_key, k).counters;
        match outcome {
            Outcome::Ok => c.ok += 1,
            Outcome::Unauthorized => c.unauthorized += 1,
            Outcome::Other => {}
        }
    }

    /// Runs the limits of `key`'s account: concurrency, every request limit
    /// and the token window. If all have room, charges every request limit,
    /// takes a concurrency slot and records the accept; otherwise charges
    /// nothing, counts a `rate_limited` and returns what the limit headers
    /// announce.
    pub(crate) fn admit(self: &Arc<Self>, key: &str) -> Result<Slot, LimitInfo> {
        let account = self.config.account_of(key);
        let mut guard = self.lock();
        let st = &mut *guard;
        // Read the clock under the lock so logs stay in time order.
        let now = Instant::now();
        let since_start = now.saturating_duration_since(self.start);
        let acct = account_state(&mut st.accounts, account, &self.limits, now);
        let concurrency_ok = self.config.max_concurrent.is_none_or(|max| acct.stats.in_flight < max);
        // `has_room` only checks (and brings the limiter up to date): nothing
        // is charged until every limit is known to have room.
        let limits_ok = acct.limiters.iter_mut().all(|l| l.has_room(now, since_start));
        let tokens_ok =
            self.config.token_limit.is_none_or(|(limit, window)| acct.tokens.used(now, window) < limit);
        if !(concurrency_ok && limits_ok && tokens_ok) {
            acct.stats.rate_limited += 1;
            let info = self.limit_info(acct, now, since_start);
            key_state(&mut st.per_key, key).counters.rate_limited += 1;
            return Err(info);
        }
        for l in &mut acct.limiters {
            l.charge(now);
        }
        acct.stats.accepted += 1;
        acct.stats.in_flight += 1;
        acct.stats.max_in_flight = acct.stats.max_in_flight.max(acct.stats.in_flight);
        st.in_flight += 1;
        st.max_in_flight = st.max_in_flight.max(st.in_flight);
        if self.config.record_accepts {
            acct.accepts.push(since_start);
            key_state(&mut st.per_key, key).accepts.push(since_start);
        }
        Ok(Slot { shared: Arc::clone(self), account: account.to_owned() })
    }

    /// Charges `tokens` to `key`'s account as its answer is produced, and
    /// returns what the limit headers of that answer announce.
    pub(crate) fn finish(&self, key: &str, tokens: u64) -> LimitInfo {
        let account = self.config.account_of(key);
        let mut st = self.lock();
        let now = Instant::now();
        let since_start = now.saturating_duration_since(self.start);
        let acct = account_state(&mut st.accounts, account, &self.limits, now);
        if tokens > 0 {
            acct.stats.tokens += tokens;
            if let Some((_, window)) = self.config.token_limit {
                let used = acct.tokens.charge(now, window, tokens);
                acct.stats.max_tokens_in_window = acct.stats.max_tokens_in_window.max(used);
            }
        }
        self.limit_info(acct, now, since_start)
    }

    /// Frees a concurrency slot of `account`.
    fn release(&self, account: &str) {
        let mut st = self.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        if let Some(a) = st.accounts.get_mut(account) {
            a.stats.in_flight = a.stats.in_flight.saturating_sub(1);
        }
    }

    fn limit_info(&self, acct: &mut AccountState, now: Instant, since_start: Duration) -> LimitInfo {
        if !self.config.limit_headers && self.config.dialect == crate::SimDialect::Nvidia {
            return LimitInfo::default();
        }
        let requests = match self.config.rate_limit {
            // The main limit is the first limiter when it is set.
            Some(_) => acct.limiters.first_mut().map(|l| l.status(now, since_start)),
            None => None,
        };
        let tokens = self.config.token_limit.map(|(limit, window)| acct.tokens.status(now, window, limit));
        LimitInfo { requests, tokens }
    }

    pub(crate) fn push_fault(&self, fault: Fault, target: FaultTarget) {
        self.lock().faults.push_back((fault, target));
    }

    pub(crate) fn set_sticky(&self, fault: Option<Fault>) {
        self.lock().sticky = fault;
    }

    pub(crate) fn clear_faults(&self) {
        let mut st = self.lock();
        st.faults.clear();
        st.sticky = None;
    }

    pub(crate) fn pending_faults(&self) -> usize {
        self.lock().faults.len()
    }

    pub(crate) fn accept_log(&self, key: &str) -> Vec<Duration> {
        self.lock().per_key.get(key).map(|k| k.accepts.clone()).unwrap_or_default()
    }

    pub(crate) fn account_accept_log(&self, account: &str) -> Vec<Duration> {
        self.lock().accounts.get(account).map(|a| a.accepts.clone()).unwrap_or_default()
    }

    pub(crate) fn account_stats(&self, account: &str) -> AccountStats {
        self.lock().accounts.get(account).map(|a| a.stats).unwrap_or_default()
    }

    pub(crate) fn snapshot(&self) -> SimStats {
        let st = self.lock();
        SimStats {
            per_key: st.per_key.iter().map(|(k, v)| (k.clone(), v.counters)).collect(),
            total_requests: st.total_requests,
            open_connections: self.open_connections.load(Ordering::SeqCst),
            active_streams: self.active_streams.load(Ordering::SeqCst),
            last_request_headers: st.last_request_headers.clone(),
            last_request_body: st.last_request_body.clone(),
            models: st.models.clone(),
            accept_log: st
                .per_key
                .iter()
                .filter(|(_, v)| !v.accepts.is_empty())
                .map(|(k, v)| (k.clone(), v.accepts.clone()))
                .collect(),
            account_accepts: st
                .accounts
                .iter()
                .filter(|(_, v)| !v.accepts.is_empty())
                .map(|(k, v)| (k.clone(), v.accepts.clone()))
                .collect(),
            accounts: st.accounts.iter().map(|(k, v)| (k.clone(), v.stats)).collect(),
            max_in_flight: st.max_in_flight,
        }
    }

    pub(crate) fn reset_stats(&self) {
        let mut st = self.lock();
        st.total_requests = 0;
        st.last_request_headers = None;
        st.last_request_body = None;
        st.request_log.clear();
        st.models.clear();
        st.max_in_flight = st.in_flight;
        for ks in st.per_key.values_mut() {
            ks.counters = KeyCounters::default();
            ks.accepts.clear();
        }
        for a in st.accounts.values_mut() {
            let in_flight = a.stats.in_flight;
            a.stats = AccountStats { in_flight, max_in_flight: in_flight, ..AccountStats::default() };
            a.accepts.clear();
        }
    }
}

fn key_state<'a>(map: &'a mut BTreeMap<String, KeyState>, key: &str) -> &'a mut KeyState {
    if !map.contains_key(key) {
        map.insert(key.to_owned(), KeyState::default());
    }
    // Invariant: the entry was inserted just above if it was missing.
    #[allow(clippy::expect_used)]
    map.get_mut(key).expect("entry present")
}

fn account_state<'a>(
    map: &'a mut BTreeMap<String, AccountState>,
    account: &str,
    limits: &[SimRateLimit],
    now: Instant,
) -> &'a mut AccountState {
    if !map.contains_key(account) {
        map.insert(account.to_owned(), AccountState::new(limits, now));
    }
    // Invariant: the entry was inserted just above if it was missing.
    #[allow(clippy::expect_used)]
    map.get_mut(account).expect("entry present")
}

/// `d` as a [`Duration`] of whole nanoseconds, saturating.
fn nanos(d: u128) -> Duration {
    Duration::from_nanos(u64::try_from(d).unwrap_or(u64::MAX))
}

/// Index of the fixed period that `since_start` falls in (always 0 for a
/// zero period).
fn period_index(since_start: Duration, period: Duration) -> u64 {
    since_start.as_nanos().checked_div(period.as_nanos()).map_or(0, |i| u64::try_from(i).unwrap_or(u64::MAX))
}

/// The state of one request limit of one account.
#[derive(Debug)]
enum Limiter {
    Bucket {
        per_minute: u32,
        burst: u32,
        tokens: f64,
        last: Instant,
    },
    Log {
        limit: u32,
        window: Duration,
        log: VecDeque<Instant>,
    },
    Fixed {
        limit: u64,
        period: Duration,
        /// The period `count` belongs to.
        index: u64,
        count: u64,
    },
}

/// Slack against float drift in the token bucket's refill sum.
const BUCKET_EPSILON: f64 = 1e-9;

impl Limiter {
    /// A fresh limiter: a full bucket, an empty log, a zero count.
    fn new(cfg: SimRateLimit, now: Instant) -> Self {
        match cfg {
            SimRateLimit::TokenBucket { per_minute, burst } => {
                Self::Bucket { per_minute, burst, tokens: f64::from(burst), last: now }
            }
            SimRateLimit::RollingWindow { limit, window } => {
                Self::Log { limit, window, log: VecDeque::new() }
            }
            SimRateLimit::FixedWindow { limit, period } => Self::Fixed { limit, period, index: 0, count: 0 },
        }
    }

    /// Brings the state up to `now` (`since_start` after the server's
    /// start): refills the bucket, expires old log entries, or starts a new
    /// period.
    fn refresh(&mut self, now: Instant, since_start: Duration) {
        match self {
            Self::Bucket { per_minute, burst, tokens, last } => {
                let elapsed = now.saturating_duration_since(*last).as_secs_f64();
                *last = (*last).max(now);
                *tokens = (*tokens + elapsed * f64::from(*per_minute) / 60.0).min(f64::from(*burst));
            }
            Self::Log { window, log, .. } => {
                while log.front().is_some_and(|&t| now.saturating_duration_since(t) >= *window) {
                    log.pop_front();
                }
            }
            Self::Fixed { period, index, count, .. } => {
                let current = period_index(since_start, *period);
                if current != *index {
                    *index = current;
                    *count = 0;
                }
            }
        }
    }

    /// Whether one more request fits now. Does not charge it.
    fn has_room(&mut self, now: Instant, since_start: Duration) -> bool {
        self.refresh(now, since_start);
        match self {
            Self::Bucket { tokens, .. } => *tokens >= 1.0 - BUCKET_EPSILON,
            Self::Log { limit, log, .. } => log.len() < *limit as usize,
            Self::Fixed { limit, count, .. } => *count < *limit,
        }
    }

    /// Charges one request; call right after a successful
    /// [`has_room`](Self::has_room) at the same `now`.
    fn charge(&mut self, now: Instant) {
        match self {
            Self::Bucket { tokens, .. } => *tokens -= 1.0,
            Self::Log { log, .. } => log.push_back(now),
            Self::Fixed { count, .. } => *count += 1,
        }
    }

    /// Limit, remaining requests and time until fully restored.
    fn status(&mut self, now: Instant, since_start: Duration) -> LimitStatus {
        self.refresh(now, since_start);
        match self {
            Self::Bucket { per_minute, burst, tokens, .. } => {
                let missing = (f64::from(*burst) - *tokens).max(0.0);
                let reset = if missing <= BUCKET_EPSILON {
                    Some(Duration::ZERO)
                } else if *per_minute == 0 {
                    None
                } else {
                    Duration::try_from_secs_f64(missing * 60.0 / f64::from(*per_minute)).ok()
                };
                // `tokens` is within [-epsilon, burst]; the cast saturates.
                let remaining = (*tokens + BUCKET_EPSILON).floor().max(0.0) as u64;
                LimitStatus { limit: u64::from(*burst), remaining, reset }
            }
            Self::Log { limit, window, log } => {
                let reset = match log.back() {
                    None => Some(Duration::ZERO),
                    Some(&t) => t.checked_add(*window).map(|end| end.saturating_duration_since(now)),
                };
                let remaining = u64::from(*limit).saturating_sub(log.len() as u64);
                LimitStatus { limit: u64::from(*limit), remaining, reset }
            }
            Self::Fixed { limit, period, index, count } => {
                let reset = if *count == 0 {
                    Some(Duration::ZERO)
                } else if period.is_zero() {
                    None
                } else {
                    let next = period.as_nanos().saturating_mul(u128::from(*index) + 1);
                    Some(nanos(next.saturating_sub(since_start.as_nanos())))
                };
                LimitStatus { limit: *limit, remaining: limit.saturating_sub(*count), reset }
            }
        }
    }

    /// `has_room`, then `charge` if there was room.
    #[cfg(test)]
    fn try_acquire(&mut self, now: Instant, since_start: Duration) -> bool {
        let ok = self.has_room(now, since_start);
        if ok {
            self.charge(now);
        }
        ok
    }
}

/// The token charges of one account within the current rolling window.
#[derive(Debug, Default)]
struct TokenWindow {
    /// (charge time, tokens), oldest first.
    log: VecDeque<(Instant, u64)>,
    /// Sum of the tokens in `log`.
    used: u64,
}

impl TokenWindow {
    /// Drops the charges made `window` or more before `now`.
    fn refresh(&mut self, now: Instant, window: Duration) {
        while let Some(&(t, n)) = self.log.front() {
            if now.saturating_duration_since(t) < window {
                break;
            }
            self.log.pop_front();
            self.used = self.used.saturating_sub(n);
        }
    }

    /// Tokens charged in the half-open window `(now - window, now]`.
    fn used(&mut self, now: Instant, window: Duration) -> u64 {
        self.refresh(now, window);
        self.used
    }

    /// Charges `tokens` at `now`; returns the window's total after it.
    fn charge(&mut self, now: Instant, window: Duration, tokens: u64) -> u64 {
        self.refresh(now, window);
        self.log.push_back((now, tokens));
        self.used = self.used.saturating_add(tokens);
        self.used
    }

    /// Limit, remaining tokens and time until fully restored.
    fn status(&mut self, now: Instant, window: Duration, limit: u64) -> LimitStatus {
        self.refresh(now, window);
        let reset = match self.log.back() {
            None => Some(Duration::ZERO),
            Some(&(t, _)) => t.checked_add(window).map(|end| end.saturating_duration_since(now)),
        };
        LimitStatus { limit, remaining: limit.saturating_sub(self.used), reset }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

    use std::collections::HashMap;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn limiter(cfg: SimRateLimit, t0: Instant) -> Limiter {
        Limiter::new(cfg, t0)
    }

    fn shared(cfg: SimConfig) -> Arc<Shared> {
        Arc::new(Shared::new(cfg))
    }

    /// The fixed-window count of `account`'s limiter number `i`.
    fn fixed_count(sh: &Shared, account: &str, i: usize) -> u64 {
        match &sh.lock().accounts[account].limiters[i] {
            Limiter::Fixed { count, .. } => *count,
            other => panic!("not a fixed window: {other:?}"),
        }
    }

    #[test]
    fn token_bucket_burst_then_refill() {
        let t0 = Instant::now();
        let mut l = limiter(SimRateLimit::TokenBucket { per_minute: 60, burst: 3 }, t0);
        let z = Duration::ZERO;
        assert!(l.try_acquire(t0, z));
        assert!(l.try_acquire(t0, z));
        assert!(l.try_acquire(t0, z));
        assert!(!l.try_acquire(t0, z));
        assert!(!l.try_acquire(t0 + Duration::from_millis(500), z));
        assert!(l.try_acquire(t0 + Duration::from_millis(1000), z));
        assert!(!l.try_acquire(t0 + Duration::from_millis(1001), z));
        // Refill is capped at `burst`.
        let later = t0 + Duration::from_secs(100);
        for _ in 0..3 {
            assert!(l.try_acquire(later, z));
        }
        assert!(!l.try_acquire(later, z));
    }

    #[test]
    fn rolling_window_is_exact() {
        let w = Duration::from_millis(100);
        let t0 = Instant::now();
        let mut l = limiter(SimRateLimit::RollingWindow { limit: 2, window: w }, t0);
        let at = |ms| t0 + Duration::from_millis(ms);
        let z = Duration::ZERO;
        assert!(l.try_acquire(at(0), z));
        assert!(l.try_acquire(at(10), z));
        assert!(!l.try_acquire(at(99), z));
        assert!(l.try_acquire(at(100), z));
        assert!(!l.try_acquire(at(109), z));
        assert!(l.try_acquire(at(110), z));
    }

    #[test]
    fn fixed_window_resets_at_period_boundaries_from_start() {
        let t0 = Instant::now();
        let mut l = limiter(SimRateLimit::FixedWindow { limit: 2, period: Duration::from_millis(100) }, t0);
        // `since_start` decides the period, not the time of the first request.
        let at = |ms| (t0 + Duration::from_millis(ms), Duration::from_millis(ms));
        let mut go = |ms| {
            let (now, since) = at(ms);
            l.try_acquire(now, since)
        };
        assert!(go(60));
        assert!(go(70));
        // Not a rolling window: 60 ms later the period is still full…
        assert!(!go(99));
        // …and a new one starts at 100 ms, 40 ms after the first accept.
        assert!(go(100));
        assert!(go(150));
        assert!(!go(199));
        // A period with no traffic in between is skipped over.
        assert!(go(350));
        assert!(go(399));
        assert!(!go(399));
    }

    #[test]
    fn fixed_window_status_and_zero_period() {
        let t0 = Instant::now();
        let period = Duration::from_millis(100);
        let mut l = limiter(SimRateLimit::FixedWindow { limit: 3, period }, t0);
        let since = Duration::from_millis(230);
        let s = l.status(t0, since);
        assert_eq!(s, LimitStatus { limit: 3, remaining: 3, reset: Some(Duration::ZERO) });
        assert!(l.try_acquire(t0, since));
        let s = l.status(t0, since);
        assert_eq!(s, LimitStatus { limit: 3, remaining: 2, reset: Some(Duration::from_millis(70)) });

        let mut l = limiter(SimRateLimit::FixedWindow { limit: 1, period: Duration::ZERO }, t0);
        assert!(l.try_acquire(t0, Duration::ZERO));
        assert!(!l.try_acquire(t0 + HOUR, HOUR));
        assert_eq!(l.status(t0 + HOUR, HOUR), LimitStatus { limit: 1, remaining: 0, reset: None });
    }

    #[test]
    fn bucket_and_log_status() {
        let t0 = Instant::now();
        let z = Duration::ZERO;
        let mut b = limiter(SimRateLimit::TokenBucket { per_minute: 60, burst: 4 }, t0);
        assert_eq!(b.status(t0, z), LimitStatus { limit: 4, remaining: 4, reset: Some(z) });
        assert!(b.try_acquire(t0, z));
        assert!(b.try_acquire(t0, z));
        // 2 tokens missing at 1 token/s.
        assert_eq!(
            b.status(t0, z),
            LimitStatus { limit: 4, remaining: 2, reset: Some(Duration::from_secs(2)) }
        );
        let s = b.status(t0 + Duration::from_millis(500), z);
        assert_eq!((s.remaining, s.reset), (2, Some(Duration::from_millis(1500))));

        let w = Duration::from_millis(100);
        let mut l = limiter(SimRateLimit::RollingWindow { limit: 3, window: w }, t0);
        assert!(l.try_acquire(t0, z));
        assert!(l.try_acquire(t0 + Duration::from_millis(40), z));
        // Fully restored when the newest entry expires.
        let s = l.status(t0 + Duration::from_millis(50), z);
        assert_eq!(s, LimitStatus { limit: 3, remaining: 1, reset: Some(Duration::from_millis(90)) });
        let s = l.status(t0 + Duration::from_millis(100), z);
        assert_eq!(s, LimitStatus { limit: 3, remaining: 2, reset: Some(Duration::from_millis(40)) });
    }

    #[test]
    fn token_window_is_half_open_and_tracks_reset() {
        let t0 = Instant::now();
        let w = Duration::from_millis(100);
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut tw = TokenWindow::default();
        assert_eq!(tw.charge(at(0), w, 50), 50);
        assert_eq!(tw.charge(at(50), w, 30), 80);
        assert_eq!(tw.used(at(99), w), 80);
        assert_eq!(tw.used(at(100), w), 30);
        let s = tw.status(at(120), w, 100);
        assert_eq!(s, LimitStatus { limit: 100, remaining: 70, reset: Some(Duration::from_millis(30)) });
        assert_eq!(tw.used(at(150), w), 0);
        assert_eq!(tw.status(at(150), w, 100).reset, Some(Duration::ZERO));
    }

    #[test]
    fn no_limit_accepts_all() {
        let sh = shared(SimConfig::default());
        assert!((0..1000).all(|_| sh.admit("free-key-0001").is_ok()));
        assert_eq!(sh.snapshot().account("free-key-0001").accepted, 1000);
    }

    #[test]
    fn refused_requests_charge_no_limit() {
        // Main limit full first: the extra limit must not be charged.
        let cfg = SimConfig::default()
            .with_rate_limit(SimRateLimit::RollingWindow { limit: 1, window: HOUR })
            .with_extra_limit(SimRateLimit::FixedWindow { limit: 5, period: HOUR })
            .with_limit_headers(true);
        let sh = shared(cfg);
        let k = "multi-key-0001";
        assert!(sh.admit(k).is_ok());
        for _ in 0..3 {
            let info = sh.admit(k).expect_err("main limit full");
            assert_eq!(info.requests.map(|r| r.remaining), Some(0));
        }
        assert_eq!(fixed_count(&sh, k, 1), 1);

        // Extra limit full first: the main limit must not be charged.
        let cfg = SimConfig::default()
            .with_rate_limit(SimRateLimit::RollingWindow { limit: 5, window: HOUR })
            .with_extra_limit(SimRateLimit::FixedWindow { limit: 1, period: HOUR })
            .with_limit_headers(true);
        let sh = shared(cfg);
        assert!(sh.admit(k).is_ok());
        for _ in 0..3 {
            let info = sh.admit(k).expect_err("extra limit full");
            assert_eq!(
                info.requests,
                Some(LimitStatus { limit: 5, remaining: 4, reset: info.requests.and_then(|r| r.reset) })
            );
        }
        let st = sh.snapshot();
        assert_eq!(st.key(k).rate_limited, 3);
        assert_eq!(st.account(k).rate_limited, 3);
        assert_eq!(st.account(k).accepted, 1);
        assert_eq!(st.accept_log[k].len(), 1);
    }

    #[test]
    fn every_limit_must_have_room() {
        let cfg = SimConfig::default()
            .with_rate_limit(SimRateLimit::TokenBucket { per_minute: 1, burst: 10 })
            .with_extra_limits([
                SimRateLimit::RollingWindow { limit: 4, window: HOUR },
                SimRateLimit::FixedWindow { limit: 3, period: HOUR },
            ]);
        let sh = shared(cfg);
        let ok = (0..10).filter(|_| sh.admit("tight-key-0001").is_ok()).count();
        assert_eq!(ok, 3);
    }

    #[test]
    fn accounts_share_limits_and_stats() {
        let cfg = SimConfig::default()
            .with_rate_limit(SimRateLimit::RollingWindow { limit: 2, window: HOUR })
            .with_account("acme", ["acme-key-0001", "acme-key-0002"]);
        assert_eq!(cfg.account_of("acme-key-0002"), "acme");
        assert_eq!(cfg.account_of("solo-key-0001"), "solo-key-0001");
        let sh = shared(cfg);
        assert!(sh.admit("acme-key-0001").is_ok());
        assert!(sh.admit("acme-key-0002").is_ok());
        assert!(sh.admit("acme-key-0001").is_err());
        assert!(sh.admit("acme-key-0002").is_err());
        // A key without an account is its own account.
        assert!(sh.admit("solo-key-0001").is_ok());
        assert!(sh.admit("solo-key-0001").is_ok());
        assert!(sh.admit("solo-key-0001").is_err());
        let st = sh.snapshot();
        assert_eq!(st.account("acme").accepted, 2);
        assert_eq!(st.account("acme").rate_limited, 2);
        assert_eq!(st.max_in_any_window_for_account("acme", HOUR), 2);
        assert_eq!(st.max_in_any_window("acme-key-0001", HOUR), 1);
        assert_eq!(st.max_in_any_window("acme-key-0002", HOUR), 1);
        assert_eq!(st.key("acme-key-0001").rate_limited, 1);
        assert_eq!(st.max_in_any_window_for_account("solo-key-0001", HOUR), 2);
        assert_eq!(sh.account_accept_log("acme").len(), 2);
        assert!(!st.accounts.contains_key("acme-key-0001"));
    }

    #[test]
    fn token_limit_refuses_once_the_window_is_used_up() {
        let cfg = SimConfig::default()
            .with_token_limit(100, HOUR)
            .with_accounts([("tok-key-0001", "tok"), ("tok-key-0002", "tok")]);
        let sh = shared(cfg);
        let slot = sh.admit("tok-key-0001").unwrap();
        sh.finish("tok-key-0001", 60);
        drop(slot);
        // 60 < 100: still admitted, and the answer overshoots.
        let slot = sh.admit("tok-key-0002").unwrap();
        sh.finish("tok-key-0002", 60);
        drop(slot);
        assert!(sh.admit("tok-key-0001").is_err());
        assert!(sh.admit("tok-key-0002").is_err());
        let a = sh.snapshot().account("tok");
        assert_eq!((a.tokens, a.max_tokens_in_window, a.accepted, a.rate_limited), (120, 120, 2, 2));

        // Without a token limit, tokens are counted but never refused.
        let sh = shared(SimConfig::default());
        for _ in 0..3 {
            let _slot = sh.admit("tok-key-0003").unwrap();
            sh.finish("tok-key-0003", 1000);
        }
        let a = sh.snapshot().account("tok-key-0003");
        assert_eq!((a.tokens, a.max_tokens_in_window), (3000, 0));
    }

    #[test]
    fn concurrency_is_limited_per_account() {
        let mut accounts = HashMap::new();
        accounts.insert("conc-key-0001".to_owned(), "team".to_owned());
        accounts.insert("conc-key-0002".to_owned(), "team".to_owned());
        let cfg = SimConfig { accounts, ..SimConfig::default() }.with_max_concurrent(2);
        let sh = shared(cfg);
        let a = sh.admit("conc-key-0001").unwrap();
        let b = sh.admit("conc-key-0002").unwrap();
        assert!(sh.admit("conc-key-0001").is_err());
        // Another account is not affected.
        let other = sh.admit("conc-key-0003").unwrap();
        assert_eq!(sh.account_stats("team").in_flight, 2);
        drop(a);
        assert_eq!(sh.account_stats("team").in_flight, 1);
        let c = sh.admit("conc-key-0002").unwrap();
        assert!(sh.admit("conc-key-0002").is_err());
        let st = sh.snapshot();
        assert_eq!(st.account("team").max_in_flight, 2);
        assert_eq!(st.account("team").rate_limited, 2);
        assert_eq!(st.max_in_flight, 3);
        drop((b, c, other));
        let st = sh.snapshot();
        assert_eq!(st.account("team").in_flight, 0);
        assert_eq!(st.account("team").max_in_flight, 2);
        sh.reset_stats();
        assert_eq!(sh.snapshot().account("team"), AccountStats::default());
        assert_eq!(sh.snapshot().max_in_flight, 0);
    }

    #[test]
    fn concurrency_is_observed_without_a_limit() {
        let sh = shared(SimConfig::default());
        let slots: Vec<Slot> = (0..5).map(|_| sh.admit("many-key-0001").unwrap()).collect();
        assert_eq!(sh.account_stats("many-key-0001").in_flight, 5);
        drop(slots);
        let a = sh.account_stats("many-key-0001");
        assert_eq!((a.in_flight, a.max_in_flight), (0, 5));
    }

    #[test]
    fn limit_info_only_when_headers_are_on() {
        let base = SimConfig::default()
            .with_rate_limit(SimRateLimit::RollingWindow { limit: 3, window: HOUR })
            .with_token_limit(500, HOUR);
        let sh = shared(base.clone());
        let _slot = sh.admit("hdr-key-0001").unwrap();
        assert_eq!(sh.finish("hdr-key-0001", 10), LimitInfo::default());

        let sh = shared(base.with_limit_headers(true));
        let _slot = sh.admit("hdr-key-0001").unwrap();
        let info = sh.finish("hdr-key-0001", 10);
        let r = info.requests.unwrap();
        assert_eq!((r.limit, r.remaining), (3, 2));
        assert!(r.reset.unwrap() > HOUR - Duration::from_secs(5));
        let t = info.tokens.unwrap();
        assert_eq!((t.limit, t.remaining), (500, 490));

        // Extra limits alone announce nothing about requests.
        let cfg = SimConfig::default()
            .with_extra_limit(SimRateLimit::FixedWindow { limit: 3, period: HOUR })
            .with_limit_headers(true);
        let sh = shared(cfg);
        let _slot = sh.admit("hdr-key-0002").unwrap();
        assert_eq!(sh.finish("hdr-key-0002", 10), LimitInfo::default());
    }
}
