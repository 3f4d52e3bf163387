//! Prometheus counters, registered into the embedder's registry under names without a
//! prefix (the server's registry adds `proxypal_`).
//!
//! Every (event, result) series is resolved once at start, so counting is one atomic
//! increment: no label hashing on the delivery path.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::event::EventKind;

/// Labels of `webhook_deliveries`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    event: &'static str,
    /// `delivered`, `failed` (given up) or `retried` (one failed attempt, to be retried).
    result: &'static str,
}

/// The counters, shared by the handle and the background tasks.
#[derive(Debug)]
pub(crate) struct Metrics {
    delivered: [Counter; 6],
    failed: [Counter; 6],
    retried: [Counter; 6],
    /// Events or messages dropped because a queue was full (or webhooks were shut down).
    pub(crate) dropped: Counter,
    /// Events suppressed as repeats.
    pub(crate) deduplicated: Counter,
}

impl Metrics {
    /// Registers `webhook_deliveries`, `webhook_dropped` and `webhook_deduplicated`
    /// (counters: exposed with a `_total` suffix).
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        let series = |result: &'static str| {
            EventKind::ALL.map(|kind| {
                deliveries.get_or_create(&DeliveryLabels { event: kind.as_str(), result }).clone()
            })
        };
        let metrics = Metrics {
            delivered: series("delivered"),
            failed: series("failed"),
            retried: series("retried"),
            dropped: Counter::default(),
            deduplicated: Counter::default(),
        };
        registry.register(
            "webhook_deliveries",
            "Webhook deliveries by event and result: delivered, failed (gave up after the last attempt), retried (an attempt failed and will be retried)",
            deliveries,
        );
        registry.register(
            "webhook_dropped",
            "Webhook events dropped because a queue was full or webhooks were shut down",
            metrics.dropped.clone(),
        );
        registry.register(
            "webhook_deduplicated",
            "Webhook events not sent because they repeated a state or window already announced",
            metrics.deduplicated.clone(),
        );
        metrics
    }

    pub(crate) fn delivered(&self, kind: EventKind) -> &Counter {
        &self.delivered[kind.index()]
    }

    pub(crate) fn failed(&self, kind: EventKind) -> &Counter {
        &self.failed[kind.index()]
    }

    pub(crate) fn retried(&self, kind: EventKind) -> &Counter {
        &self.retried[kind.index()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_labels_as_the_server_exposes_them() {
        let mut registry = Registry::with_prefix("proxypal");
        let m = Metrics::register(&mut registry);
        m.retried(EventKind::PoolExhausted).inc();
        m.delivered(EventKind::PoolExhausted).inc();
        m.dropped.inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"proxypal_webhook_deliveries_total{event="pool.exhausted",result="retried"} 1"#,
            r#"proxypal_webhook_deliveries_total{event="pool.exhausted",result="delivered"} 1"#,
            r#"proxypal_webhook_deliveries_total{event="key.disabled",result="failed"} 0"#,
            "proxypal_webhook_dropped_total 1",
            "proxypal_webhook_deduplicated_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
