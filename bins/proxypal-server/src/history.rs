//! Request history for the dashboard's sparklines: every interval (10 s) a
//! background task samples each key's `requests` counter and keeps the
//! per-interval deltas of the last [`SAMPLES`] intervals (5 minutes), by masked
//! label. Kept in the server so it survives page reloads; shown in `/stats` as
//! `history`.
//!
//! Lock-light: one `std::sync::Mutex`, held only to push a sample or copy the
//! rings, never across an `.await`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::task::JoinHandle;

use proxypal_gateway::Gateway;

/// How often the counters are sampled.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);

/// How many intervals are kept per key (30 × 10 s = 5 minutes).
pub const SAMPLES: usize = 30;

/// **Test-only**: overrides [`DEFAULT_INTERVAL`] in milliseconds, read once
/// when the server starts, so a browser test need not wait 10 s per sample.
/// Not part of the configuration; do not set it in production.
pub const INTERVAL_ENV: &str = "PROXYPAL_HISTORY_INTERVAL_MS";

/// The sampling interval: [`INTERVAL_ENV`] if set to a whole number of
/// milliseconds (at least 10), else [`DEFAULT_INTERVAL`].
pub fn interval_from_env() -> Duration {
    std::env::var(INTERVAL_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(DEFAULT_INTERVAL, |ms| Duration::from_millis(ms.max(10)))
}

#[derive(Debug, Default)]
struct Rings {
    /// The `requests` counter per label at the previous sample.
    last: HashMap<String, u64>,
    /// Requests per interval per label, oldest first, at most [`SAMPLES`].
    series: HashMap<String, VecDeque<u64>>,
}

/// The sampled history. Lives in the server's [`App`](crate::App); filled by the task [`spawn`] starts.
#[derive(Debug)]
pub struct History {
    interval_ms: AtomicU64,
    rings: Mutex<Rings>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl History {
    /// An empty history at [`DEFAULT_INTERVAL`].
    pub fn new() -> Self {
        let ms = u64::try_from(DEFAULT_INTERVAL.as_millis()).unwrap_or(10_000);
        Self { interval_ms: AtomicU64::new(ms), rings: Mutex::new(Rings::default()) }
    }

    /// The sampling interval.
    pub fn interval(&self) -> Duration {
        Duration::from_millis(self.interval_ms.load(Ordering::Relaxed))
    }

    fn set_interval(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX).max(1);
        self.interval_ms.store(ms, Ordering::Relaxed);
    }

    /// Records one sample: `counts` is each label's `requests` counter now
    /// (labels that repeat are summed). The first sample of a label counts
    /// from zero, since a new key's counters start at zero; labels that are no
    /// longer present are forgotten.
    pub fn record<'a>(&self, counts: impl IntoIterator<Item = (&'a str, u64)>) {
        let mut now: HashMap<String, u64> = HashMap::new();
        for (label, n) in counts {
            *now.entry(label.to_owned()).or_default() += n;
        }
        let mut rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
        let Rings { last, series } = &mut *rings;
        series.retain(|label, _| now.contains_key(label));
        for (label, &n) in &now {
            let delta = n.saturating_sub(last.get(label).copied().unwrap_or(0));
            let ring = series.entry(label.clone()).or_default();
            if ring.len() == SAMPLES {
                ring.pop_front();
            }
            ring.push_back(delta);
        }
        *last = now;
    }

    /// Sets the baseline without adding an interval (the counters at start).
    fn baseline<'a>(&self, counts: impl IntoIterator<Item = (&'a str, u64)>) {
        let mut now: HashMap<String, u64> = HashMap::new();
        for (label, n) in counts {
            *now.entry(label.to_owned()).or_default() += n;
        }
        let mut rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
        rings.last = now;
    }

    /// The `history` member of `/stats`:
    /// `{"interval_seconds": 10, "interval_ms": 10000, "samples": 30, "keys": {"<label>": [n, …]}}`,
    /// oldest interval first.
    pub fn to_json(&self) -> Value {
        let interval = self.interval();
        let keys: Map<String, Value> = {
            let rings = self.rings.lock().unwrap_or_else(PoisonError::into_inner);
            rings.series.iter().map(|(label, ring)| (label.clone(), json!(ring))).collect()
        };
        let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        let seconds = if ms % 1000 == 0 { json!(ms / 1000) } else { json!(interval.as_secs_f64()) };
        json!({
            "interval_seconds": seconds,
            "interval_ms": ms,
            "samples": SAMPLES,
            "keys": keys,
        })
    }
}

fn sample(gateway: &Gateway) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for provider in gateway.providers() {
        out.extend(
            provider
                .keys()
                .snapshot()
                .into_iter()
                .map(|k| (format!("{}/{}", provider.name(), k.label), k.counters.requests)),
        );
    }
    out
}

/// The sampling task; aborted when dropped.
#[derive(Debug)]
pub struct Sampler(JoinHandle<()>);

impl Sampler {
    /// Stops sampling.
    pub fn stop(&self) {
        self.0.abort();
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts sampling `gateway`'s per-key counters into `history` every
/// `interval`. The task holds only weak references, so it also ends when the
/// gateway or the history does. Must be called inside a Tokio runtime.
pub fn spawn(gateway: &Arc<Gateway>, history: &Arc<History>, interval: Duration) -> Sampler {
    let interval = interval.max(Duration::from_millis(1));
    history.set_interval(interval);
    let counts = sample(gateway);
    history.baseline(counts.iter().map(|(l, n)| (l.as_str(), *n)));
    let gateway: Weak<Gateway> = Arc::downgrade(gateway);
    let history: Weak<History> = Arc::downgrade(history);
    Sampler(tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let (Some(gateway), Some(history)) = (gateway.upgrade(), history.upgrade()) else { return };
            let counts = sample(&gateway);
            history.record(counts.iter().map(|(l, n)| (l.as_str(), *n)));
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_ring_and_forgetting() {
        let h = History::new();
        h.baseline([("a", 5), ("b", 0)]);
        h.record([("a", 7), ("b", 3)]);
        h.record([("a", 7), ("b", 4), ("c", 2)]);
        let v = h.to_json();
        assert_eq!(v["interval_seconds"], json!(10));
        assert_eq!(v["keys"]["a"], json!([2, 0]));
        assert_eq!(v["keys"]["b"], json!([3, 1]));
        assert_eq!(v["keys"]["c"], json!([2]));
        h.record([("a", 8)]);
        let v = h.to_json();
        assert_eq!(v["keys"]["a"], json!([2, 0, 1]));
        assert!(v["keys"].get("b").is_none());
        for i in 0..(SAMPLES as u64 + 5) {
            h.record([("a", 9 + i)]);
        }
        let v = h.to_json();
        let a = v["keys"]["a"].as_array().map(Vec::len);
        assert_eq!(a, Some(SAMPLES));
    }

    #[test]
    fn repeated_labels_are_summed() {
        let h = History::new();
        h.record([("x", 1), ("x", 2)]);
        assert_eq!(h.to_json()["keys"]["x"], json!([3]));
    }
}
