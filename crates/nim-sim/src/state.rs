//! Shared server state: counters, rate limiters, fault queue.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::config::{SimConfig, SimRateLimit};
use crate::fault::{Fault, FaultTarget};
use crate::stats::{KeyCounters, SimStats};

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
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    per_key: BTreeMap<String, KeyState>,
    total_requests: u64,
    last_request_headers: Option<http::HeaderMap>,
    faults: VecDeque<(Fault, FaultTarget)>,
    sticky: Option<Fault>,
}

#[derive(Debug, Default)]
struct KeyState {
    counters: KeyCounters,
    limiter: Limiter,
    accepts: Vec<Duration>,
}

/// Which counter a finished request bumps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Ok,
    Unauthorized,
    /// Not counted beyond `requests` (400, 404, 405, …).
    Other,
}

impl Shared {
    pub(crate) fn new(config: SimConfig) -> Self {
        Self {
            accepted_keys: config.keys.iter().cloned().collect(),
            forbidden_keys: config.forbidden_keys.iter().cloned().collect(),
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
            key_state(&mut st, k).counters.requests += 1;
        }
        let pos = st.faults.iter().position(|(_, t)| t.matches(key));
        let fault = match pos {
            Some(i) => st.faults.remove(i).map(|(f, _)| f),
            None => st.sticky.clone(),
        };
        if let (Some(_), Some(k)) = (&fault, key) {
            key_state(&mut st, k).counters.faults += 1;
        }
        fault
    }

    /// Counts the outcome of a request that carried `key`.
    pub(crate) fn count(&self, key: Option<&str>, outcome: Outcome) {
        let Some(k) = key else { return };
        let mut st = self.lock();
        let c = &mut key_state(&mut st, k).counters;
        match outcome {
            Outcome::Ok => c.ok += 1,
            Outcome::Unauthorized => c.unauthorized += 1,
            Outcome::Other => {}
        }
    }

    /// Runs the key's rate limiter; `true` if the request is accepted.
    /// Counts a rejection as `rate_limited`.
    pub(crate) fn try_acquire(&self, key: &str) -> bool {
        let now = Instant::now();
        let since_start = now.duration_since(self.start);
        let mut st = self.lock();
        let ks = key_state(&mut st, key);
        let ok = ks.limiter.try_acquire(self.config.rate_limit.as_ref(), now);
        if ok {
            if self.config.record_accepts {
                ks.accepts.push(since_start);
            }
        } else {
            ks.counters.rate_limited += 1;
        }
        ok
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

    pub(crate) fn snapshot(&self) -> SimStats {
        let st = self.lock();
        SimStats {
            per_key: st.per_key.iter().map(|(k, v)| (k.clone(), v.counters)).collect(),
            total_requests: st.total_requests,
            open_connections: self.open_connections.load(Ordering::SeqCst),
            active_streams: self.active_streams.load(Ordering::SeqCst),
            last_request_headers: st.last_request_headers.clone(),
            accept_log: st
                .per_key
                .iter()
                .filter(|(_, v)| !v.accepts.is_empty())
                .map(|(k, v)| (k.clone(), v.accepts.clone()))
                .collect(),
        }
    }

    pub(crate) fn reset_stats(&self) {
        let mut st = self.lock();
        st.total_requests = 0;
        st.last_request_headers = None;
        for ks in st.per_key.values_mut() {
            ks.counters = KeyCounters::default();
            ks.accepts.clear();
        }
    }
}

fn key_state<'a>(st: &'a mut State, key: &str) -> &'a mut KeyState {
    if !st.per_key.contains_key(key) {
        st.per_key.insert(key.to_owned(), KeyState::default());
    }
    // Invariant: the entry was inserted just above if it was missing.
    #[allow(clippy::expect_used)]
    st.per_key.get_mut(key).expect("entry present")
}

/// Per-key limiter state; created lazily on the first request.
#[derive(Debug, Default)]
enum Limiter {
    #[default]
    Fresh,
    Bucket {
        tokens: f64,
        last: Instant,
    },
    Window {
        log: VecDeque<Instant>,
    },
}

impl Limiter {
    fn try_acquire(&mut self, cfg: Option<&SimRateLimit>, now: Instant) -> bool {
        let Some(cfg) = cfg else { return true };
        if matches!(self, Self::Fresh) {
            *self = match cfg {
                SimRateLimit::TokenBucket { burst, .. } => {
                    Self::Bucket { tokens: f64::from(*burst), last: now }
                }
                SimRateLimit::RollingWindow { .. } => Self::Window { log: VecDeque::new() },
            };
        }
        match (self, cfg) {
            (Self::Bucket { tokens, last }, SimRateLimit::TokenBucket { per_minute, burst }) => {
                let elapsed = now.saturating_duration_since(*last).as_secs_f64();
                *last = now;
                *tokens = (*tokens + elapsed * f64::from(*per_minute) / 60.0).min(f64::from(*burst));
                // Small epsilon against float drift in the refill sum.
                if *tokens >= 1.0 - 1e-9 {
                    *tokens -= 1.0;
                    true
                } else {
                    false
                }
            }
            (Self::Window { log }, SimRateLimit::RollingWindow { limit, window }) => {
                while log.front().is_some_and(|&t| now.saturating_duration_since(t) >= *window) {
                    log.pop_front();
                }
                if log.len() < *limit as usize {
                    log.push_back(now);
                    true
                } else {
                    false
                }
            }
            // The limiter kind is fixed by the (immutable) config at creation.
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_bucket_burst_then_refill() {
        let cfg = SimRateLimit::TokenBucket { per_minute: 60, burst: 3 };
        let mut l = Limiter::default();
        let t0 = Instant::now();
        assert!(l.try_acquire(Some(&cfg), t0));
        assert!(l.try_acquire(Some(&cfg), t0));
        assert!(l.try_acquire(Some(&cfg), t0));
        assert!(!l.try_acquire(Some(&cfg), t0));
        assert!(!l.try_acquire(Some(&cfg), t0 + Duration::from_millis(500)));
        assert!(l.try_acquire(Some(&cfg), t0 + Duration::from_millis(1000)));
        assert!(!l.try_acquire(Some(&cfg), t0 + Duration::from_millis(1001)));
        // Refill is capped at `burst`.
        let later = t0 + Duration::from_secs(100);
        for _ in 0..3 {
            assert!(l.try_acquire(Some(&cfg), later));
        }
        assert!(!l.try_acquire(Some(&cfg), later));
    }

    #[test]
    fn rolling_window_is_exact() {
        let w = Duration::from_millis(100);
        let cfg = SimRateLimit::RollingWindow { limit: 2, window: w };
        let mut l = Limiter::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(l.try_acquire(Some(&cfg), at(0)));
        assert!(l.try_acquire(Some(&cfg), at(10)));
        assert!(!l.try_acquire(Some(&cfg), at(99)));
        assert!(l.try_acquire(Some(&cfg), at(100)));
        assert!(!l.try_acquire(Some(&cfg), at(109)));
        assert!(l.try_acquire(Some(&cfg), at(110)));
    }

    #[test]
    fn no_limit_accepts_all() {
        let mut l = Limiter::default();
        let t0 = Instant::now();
        assert!((0..1000).all(|_| l.try_acquire(None, t0)));
    }
}
