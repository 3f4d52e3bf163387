//! Prometheus metrics through `prometheus-client`, registered into the
//! embedder's [`Registry`] (the server's `GET /metrics` encodes it).
//!
//! Per-key counters are resolved once per key set (when keys are built or
//! reloaded) and handed to each request with its lease, so recording a
//! request is a handful of atomic increments: no label hashing, no allocation.
//! Gauges that describe a state rather than count events (queue depth,
//! requests in flight, keys by state) are set when they are read:
//! [`Gateway::refresh_gauges`](crate::Gateway::refresh_gauges) before encoding.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of per-key request counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyStatus {
    provider: Arc<str>,
    key: String,
    status: &'static str,
}

/// Labels of per-key upstream attempt counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyResult {
    provider: Arc<str>,
    key: String,
    result: &'static str,
}

/// Labels of one client's gauges.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientLabel {
    client: String,
}

/// Labels of one window of one client's own quota.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientWindow {
    client: String,
    kind: &'static str,
    period_seconds: u64,
}

/// Labels of a client's refused requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClientReason {
    client: String,
    reason: &'static str,
}

/// Labels with only a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

/// Labels with only a state.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct State {
    provider: Arc<str>,
    state: &'static str,
}

/// Labels of one window of one key.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Window {
    provider: Arc<str>,
    key: String,
    kind: &'static str,
    period_seconds: u64,
    /// `key` (its own) or `account` (shared with the account's keys).
    scope: &'static str,
}

/// What an upstream attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AttemptResult {
    /// 2xx/3xx.
    Ok,
    /// A 4xx that is the client's (goes back untouched).
    ClientError,
    /// 429.
    RateLimited,
    /// 401/403.
    KeyRejected,
    /// 5xx that is the key's or the node's.
    ServerError,
    /// NVIDIA's model-level failure (worker limit, DEGRADED).
    ModelError,
    /// Connect error, reset, timeout before headers.
    TransportError,
}

impl AttemptResult {
    const ALL: [AttemptResult; 7] = [
        AttemptResult::Ok,
        AttemptResult::ClientError,
        AttemptResult::RateLimited,
        AttemptResult::KeyRejected,
        AttemptResult::ServerError,
        AttemptResult::ModelError,
        AttemptResult::TransportError,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptResult::Ok => "ok",
            AttemptResult::ClientError => "client_error",
            AttemptResult::RateLimited => "rate_limited",
            AttemptResult::KeyRejected => "key_rejected",
            AttemptResult::ServerError => "server_error",
            AttemptResult::ModelError => "model_error",
            AttemptResult::TransportError => "transport_error",
        }
    }
}

/// Status classes used as labels.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn class_index(status: http::StatusCode) -> usize {
    usize::from(status.as_u16() / 100).saturating_sub(1).min(4)
}

/// A key's counters, resolved once per key set.
#[derive(Debug)]
pub struct KeyMetrics {
    requests: [Counter; 5],
    attempts: [Counter; 7],
}

impl KeyMetrics {
    /// Counts one upstream attempt.
    pub(crate) fn attempt(&self, result: AttemptResult) {
        if let Some(i) = AttemptResult::ALL.iter().position(|r| *r == result) {
            self.attempts[i].inc();
        }
    }

    /// Counts one client request answered with `status` through this key.
    pub(crate) fn request(&self, status: http::StatusCode) {
        self.requests[class_index(status)].inc();
    }
}

/// Every metric of the gateway.
#[derive(Debug)]
pub struct Metrics {
    requests: Family<KeyStatus, Counter>,
    attempts: Family<KeyResult, Counter>,
    retries: Family<Reason, Counter>,
    keys: Family<State, Gauge>,
    limit_remaining: Family<Window, Gauge>,
    limit: Family<Window, Gauge>,
    queue_depth: Gauge,
    in_flight: Gauge,
    open_streams: Gauge,
    queue_wait: Histogram,
    upstream_latency: Histogram,
    overhead: Histogram,
    /// Requests the proxy answered itself, before any key was used.
    no_key: Arc<KeyMetrics>,
    client_queue: Family<ClientLabel, Gauge>,
    client_remaining: Family<ClientWindow, Gauge>,
    client_refused: Family<ClientReason, Counter>,
}

/// The label for requests that no key served.
pub const NO_KEY: &str = "none";

impl Metrics {
    /// Registers every metric in `registry` (the server uses the prefix
    /// `proxypal`: `proxypal_requests_total`, …).
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let requests = Family::<KeyStatus, Counter>::default();
        let attempts = Family::<KeyResult, Counter>::default();
        let retries = Family::<Reason, Counter>::default();
        let keys = Family::<State, Gauge>::default();
        let limit_remaining = Family::<Window, Gauge>::default();
        let limit = Family::<Window, Gauge>::default();
        let queue_depth = Gauge::default();
        let in_flight = Gauge::default();
        let open_streams = Gauge::default();
        // 100 µs … ~52 s
        let queue_wait = Histogram::new(exponential_buckets(0.000_1, 2.0, 20));
        // 1 ms … ~524 s (busy NVIDIA models answer late)
        let upstream_latency = Histogram::new(exponential_buckets(0.001, 2.0, 20));
        // 10 µs … ~82 ms: what the proxy itself adds
        let overhead = Histogram::new(exponential_buckets(0.000_01, 2.0, 14));
        registry.register(
            "requests",
            "Client requests answered, by the (masked) key that served them and status class",
            requests.clone(),
        );
        registry.register("upstream_attempts", "Upstream attempts by key and result", attempts.clone());
        registry.register("retries", "Attempts retried on another key, by reason", retries.clone());
        registry.register("keys", "Keys by state (ready, cooling_down, disabled)", keys.clone());
        registry.register(
            "key_limit_remaining",
            "What each key's windows (and concurrency caps) have left now, by kind and period (0 = concurrency)",
            limit_remaining.clone(),
        );
        registry.register(
            "key_limit",
            "Each key's limit in force per window (configured or learned)",
            limit.clone(),
        );
        registry.register("queue_depth", "Requests waiting for a key with capacity", queue_depth.clone());
        registry.register("in_flight_requests", "Requests being served", in_flight.clone());
        registry.register("open_streams", "Streaming (SSE) responses open", open_streams.clone());
        registry.register(
            "queue_wait_seconds",
            "Time spent waiting for a key with capacity",
            queue_wait.clone(),
        );
        registry.register(
            "upstream_latency_seconds",
            "Time from sending upstream to the upstream's response headers",
            upstream_latency.clone(),
        );
        registry.register(
            "proxy_overhead_seconds",
            "Time to response headers minus queue wait and upstream latency: what the proxy adds",
            overhead.clone(),
        );
        let client_queue = Family::<ClientLabel, Gauge>::default();
        let client_remaining = Family::<ClientWindow, Gauge>::default();
        let client_refused = Family::<ClientReason, Counter>::default();
        registry.register(
            "client_queue_depth",
            "Requests waiting for a key with capacity, by client (\"\" = anonymous and operators)",
            client_queue.clone(),
        );
        registry.register(
            "client_limit_remaining",
            "What each named client's own quota has left now, by kind and period (0 = concurrency)",
            client_remaining.clone(),
        );
        registry.register(
            "client_refused",
            "Requests of named clients refused before the pool (client_quota, model_not_allowed)",
            client_refused.clone(),
        );
        let mut metrics = Self {
            client_queue,
            client_remaining,
            client_refused,
            requests,
            attempts,
            retries,
            keys,
            limit_remaining,
            limit,
            queue_depth,
            in_flight,
            open_streams,
            queue_wait,
            upstream_latency,
            overhead,
            no_key: Arc::new(KeyMetrics { requests: Default::default(), attempts: Default::default() }),
        };
        metrics.no_key = metrics.for_key(NO_KEY, NO_KEY);
        metrics
    }

    /// Counters for one key of `provider` (by masked label), created on first use.
    pub(crate) fn for_key(&self, provider: &str, label: &str) -> Arc<KeyMetrics> {
        let provider: Arc<str> = Arc::from(provider);
        let requests = CLASSES.map(|status| {
            self.requests.get_or_create_owned(&KeyStatus {
                provider: Arc::clone(&provider),
                key: label.to_owned(),
                status,
            })
        });
        let attempts = AttemptResult::ALL.map(|r| {
            self.attempts.get_or_create_owned(&KeyResult {
                provider: Arc::clone(&provider),
                key: label.to_owned(),
                result: r.as_str(),
            })
        });
        Arc::new(KeyMetrics { requests, attempts })
    }

    /// Counters for requests no key served.
    pub(crate) fn no_key(&self) -> &Arc<KeyMetrics> {
        &self.no_key
    }

    /// Counts a retry on another key.
    pub(crate) fn retry(&self, reason: AttemptResult) {
        self.retries.get_or_create(&Reason { reason: reason.as_str() }).inc();
    }

    /// Records a queue wait.
    pub(crate) fn queue_wait(&self, waited: Duration) {
        self.queue_wait.observe(waited.as_secs_f64());
    }

    /// Records the upstream's time to headers.
    pub(crate) fn upstream_latency(&self, took: Duration) {
        self.upstream_latency.observe(took.as_secs_f64());
    }

    /// Records the proxy's own share of a request.
    pub(crate) fn overhead(&self, took: Duration) {
        self.overhead.observe(took.as_secs_f64());
    }

    /// The open-streams gauge (a guard per stream increments and decrements it).
    pub(crate) fn open_streams(&self) -> &Gauge {
        &self.open_streams
    }

    /// Sets each key's window gauges from its reports (at scrape time).
    pub(crate) fn set_limits(&self, provider: &str, key: &str, limits: &[proxypal_limiter::LimitReport]) {
        let provider: Arc<str> = Arc::from(provider);
        for l in limits {
            let labels = Window {
                provider: Arc::clone(&provider),
                key: key.to_owned(),
                kind: l.kind.as_str(),
                period_seconds: l.period.map_or(0, |p| p.as_secs()),
                scope: match l.scope {
                    proxypal_limiter::Scope::Key => "key",
                    proxypal_limiter::Scope::Account => "account",
                },
            };
            self.limit_remaining.get_or_create(&labels).set(i64::try_from(l.remaining).unwrap_or(i64::MAX));
            self.limit.get_or_create(&labels).set(i64::try_from(l.limit).unwrap_or(i64::MAX));
        }
    }

    /// Counts a named client's request refused before the pool.
    pub(crate) fn client_refused(&self, client: &str, reason: &'static str) {
        self.client_refused.get_or_create(&ClientReason { client: client.to_owned(), reason }).inc();
    }

    /// Sets the per-client gauges: queue depth and own quota left (at scrape time).
    pub(crate) fn set_clients(
        &self,
        queued: &[(String, usize)],
        limits: &[(String, Vec<proxypal_limiter::LimitReport>)],
    ) {
        // A client no longer waiting reads 0, not its last depth.
        self.client_queue.clear();
        for (client, n) in queued {
            let labels = ClientLabel { client: client.clone() };
            self.client_queue.get_or_create(&labels).set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        for (client, reports) in limits {
            for l in reports {
                let labels = ClientWindow {
                    client: client.clone(),
                    kind: l.kind.as_str(),
                    period_seconds: l.period.map_or(0, |p| p.as_secs()),
                };
                self.client_remaining
                    .get_or_create(&labels)
                    .set(i64::try_from(l.remaining).unwrap_or(i64::MAX));
            }
        }
    }

    /// Sets the gauges that describe the state now (read at scrape time).
    pub(crate) fn set_gauges(&self, queue_depth: usize, in_flight: usize, states: &[ProviderStates]) {
        self.queue_depth.set(i64::try_from(queue_depth).unwrap_or(i64::MAX));
        self.in_flight.set(i64::try_from(in_flight).unwrap_or(i64::MAX));
        for (provider, states) in states {
            for (state, n) in states {
                let labels = State { provider: Arc::clone(provider), state };
                self.keys.get_or_create(&labels).set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
        }
    }
}

/// A provider's keys by state: `(provider, [(state, count); 3])`.
pub(crate) type ProviderStates = (Arc<str>, [(&'static str, usize); 3]);

/// Counts an open stream for as long as it lives.
#[derive(Debug)]
pub(crate) struct StreamGuard(Gauge);

impl StreamGuard {
    /// Increments `gauge` until dropped.
    pub(crate) fn new(gauge: &Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_key_counters_with_masked_labels() {
        let mut registry = Registry::with_prefix("proxypal");
        let m = Metrics::register(&mut registry);
        let k = m.for_key("default", "nvapi-…abcd");
        k.request(http::StatusCode::OK);
        k.attempt(AttemptResult::RateLimited);
        m.retry(AttemptResult::RateLimited);
        m.upstream_latency(Duration::from_millis(3));
        m.set_gauges(2, 1, &[(Arc::from("groq"), [("ready", 3), ("cooling_down", 1), ("disabled", 0)])]);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"proxypal_requests_total{provider="default",key="nvapi-…abcd",status="2xx"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"proxypal_upstream_attempts_total{provider="default",key="nvapi-…abcd",result="rate_limited"} 1"#)
        );
        assert!(text.contains(r#"proxypal_retries_total{reason="rate_limited"} 1"#));
        assert!(text.contains(r#"proxypal_keys{provider="groq",state="cooling_down"} 1"#));
        assert!(text.contains("proxypal_queue_depth 2"));
        assert!(text.contains("proxypal_upstream_latency_seconds_count 1"));
    }
}
