//! Snapshots of what the simulator has seen.

use std::collections::BTreeMap;
use std::time::Duration;

/// Per-key request counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyCounters {
    /// Every request that carried this key.
    pub requests: u64,
    /// Requests answered with a 2xx status.
    pub ok: u64,
    /// Requests rejected by the simulated rate limit (429).
    pub rate_limited: u64,
    /// Requests rejected by authentication (401 or 403).
    pub unauthorized: u64,
    /// Requests that hit an injected [`Fault`](crate::Fault).
    pub faults: u64,
}

/// Per-account counters and gauges (see
/// [`SimConfig::accounts`](crate::SimConfig::accounts); a key without an
/// account is its own account, named by the key).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccountStats {
    /// `POST` requests that passed every limit of the account.
    pub accepted: u64,
    /// `POST` requests refused with 429 by a limit of the account (request
    /// limits, token limit or concurrency).
    pub rate_limited: u64,
    /// Tokens charged to the account (sum of the answers'
    /// `usage.total_tokens`).
    pub tokens: u64,
    /// The largest number of tokens charged in any half-open window of the
    /// [`SimConfig::token_limit`](crate::SimConfig::token_limit) length
    /// (0 without a token limit). Since a request is admitted while the
    /// window is below the limit, this can exceed the limit by at most one
    /// answer's tokens; a client that respects the limit keeps it `<=` the
    /// limit. Charges made before a
    /// [`reset_stats`](crate::SimHandle::reset_stats) still count in windows
    /// that overlap the reset.
    pub max_tokens_in_window: u64,
    /// Accepted requests of the account in flight now (see
    /// [`SimConfig::max_concurrent`](crate::SimConfig::max_concurrent)).
    pub in_flight: usize,
    /// The most accepted requests of the account in flight at once.
    pub max_in_flight: usize,
}

/// A snapshot of the simulator's counters, taken by
/// [`SimHandle::stats`](crate::SimHandle::stats).
#[derive(Clone, Debug, Default)]
pub struct SimStats {
    /// Counters per key. The map is keyed by the **full key as sent** (this
    /// is a test-only server; never print it).
    pub per_key: BTreeMap<String, KeyCounters>,
    /// Every request received, with or without a key.
    pub total_requests: u64,
    /// TCP connections currently open.
    pub open_connections: usize,
    /// Streaming response bodies currently alive. Drops as soon as hyper
    /// drops a body, e.g. when the client disconnects.
    pub active_streams: usize,
    /// Headers of the last request received (when
    /// [`SimConfig::record_headers`](crate::SimConfig::record_headers) is on).
    pub last_request_headers: Option<http::HeaderMap>,
    /// The last request's body (when
    /// [`SimConfig::record_headers`](crate::SimConfig::record_headers) is on).
    pub last_request_body: Option<bytes::Bytes>,
    /// Requests by the `model` their body named.
    pub models: BTreeMap<String, u64>,
    /// Times (since the server started) at which each key's requests passed
    /// the rate limiter, in order (when
    /// [`SimConfig::record_accepts`](crate::SimConfig::record_accepts) is on).
    pub accept_log: BTreeMap<String, Vec<Duration>>,
    /// Times (since the server started) at which each account's requests
    /// passed its limits, in order (when
    /// [`SimConfig::record_accepts`](crate::SimConfig::record_accepts) is
    /// on). Keyed by account name (the key itself for a key without an
    /// account: the full key, never print it).
    pub account_accepts: BTreeMap<String, Vec<Duration>>,
    /// Counters per account, for every account that sent a `POST` request.
    pub accounts: BTreeMap<String, AccountStats>,
    /// The most accepted `POST` requests in flight at once, all accounts
    /// together.
    pub max_in_flight: usize,
}

impl SimStats {
    /// Counters of one key (all zero if the key was never seen).
    pub fn key(&self, key: &str) -> KeyCounters {
        self.per_key.get(key).copied().unwrap_or_default()
    }

    /// Sum of [`KeyCounters::ok`] over all keys.
    pub fn total_ok(&self) -> u64 {
        self.per_key.values().map(|c| c.ok).sum()
    }

    /// Sum of [`KeyCounters::rate_limited`] over all keys.
    pub fn total_rate_limited(&self) -> u64 {
        self.per_key.values().map(|c| c.rate_limited).sum()
    }

    /// The largest number of accepted requests of `key` that fall in any
    /// half-open window `[t, t + window)`.
    pub fn max_in_any_window(&self, key: &str, window: Duration) -> usize {
        self.accept_log.get(key).map_or(0, |log| max_in_window(log, window))
    }

    /// Counters of one account (all zero if it was never seen).
    pub fn account(&self, account: &str) -> AccountStats {
        self.accounts.get(account).copied().unwrap_or_default()
    }

    /// The largest number of accepted requests of `account` (all its keys
    /// together) that fall in any half-open window `[t, t + window)`.
    pub fn max_in_any_window_for_account(&self, account: &str, window: Duration) -> usize {
        self.account_accepts.get(account).map_or(0, |log| max_in_window(log, window))
    }
}

/// The largest number of the sorted times in `times` that fall in any
/// half-open window `[t, t + window)`.
pub fn max_in_window(times: &[Duration], window: Duration) -> usize {
    let mut best = 0;
    let mut start = 0;
    for (end, &t) in times.iter().enumerate() {
        // Drop points that are `window` or more before `t`.
        while t.saturating_sub(times[start]) >= window {
            start += 1;
        }
        best = best.max(end + 1 - start);
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn window_counts_are_half_open() {
        let w = Duration::from_millis(100);
        assert_eq!(max_in_window(&[], w), 0);
        assert_eq!(max_in_window(&ms(&[0, 50, 99]), w), 3);
        assert_eq!(max_in_window(&ms(&[0, 50, 100]), w), 2);
        assert_eq!(max_in_window(&ms(&[0, 10, 20, 200, 201, 202, 299]), w), 4);
    }
}
