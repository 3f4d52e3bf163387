//! The queue is bounded: overflow is dropped and counted, and never blocks `emit`.

use std::time::Duration;

use prometheus_client::registry::Registry;
use proxypal_webhooks::{Endpoint, Event, EventKind, WebhookConfig, Webhooks};

use crate::support::{TestServer, bounded, metric, quick_config};

// A current-thread runtime: the background task cannot run until the test yields, so the
// queue's fill is exact.
#[tokio::test(flavor = "current_thread")]
async fn a_full_queue_drops_counts_and_forgets_the_dropped_event() {
    bounded(async {
        let mut server = TestServer::always(200).await;
        let mut registry = Registry::with_prefix("proxypal");
        let config = WebhookConfig { queue: 2, ..quick_config(vec![Endpoint::new(&server.url()).unwrap()]) };
        let hooks = Webhooks::try_start(config, &mut registry).unwrap();

        for i in 0..5 {
            hooks.emit(Event::new(EventKind::KeyDisabled).key(format!("k{i}")));
        }
        assert_eq!(metric(&registry, "proxypal_webhook_dropped_total"), 3.0);
        for _ in 0..2 {
            server.next(Duration::from_secs(5)).await.expect("the queued two are delivered");
        }
        // k4 was dropped, so the dedup forgot it: it is still news.
        hooks.emit(Event::new(EventKind::KeyDisabled).key("k4"));
        let got = server.next(Duration::from_secs(5)).await.expect("the re-emitted event");
        assert_eq!(got.json()["data"]["key"], "k4");

        hooks.shutdown(Duration::from_secs(5)).await;
        assert!(server.drain().is_empty());
        assert_eq!(metric(&registry, "proxypal_webhook_dropped_total"), 3.0);
    })
    .await;
}

#[tokio::test]
async fn no_endpoints_or_disabled_means_nothing_happens() {
    let mut registry = Registry::with_prefix("proxypal");
    let hooks = Webhooks::try_start(WebhookConfig::default(), &mut registry).unwrap();
    assert!(!hooks.is_enabled());
    hooks.emit(Event::new(EventKind::KeyDisabled).key("k"));
    hooks.shutdown(Duration::from_millis(10)).await;
    // Metrics are registered anyway, so dashboards see zeros rather than gaps.
    assert_eq!(metric(&registry, "proxypal_webhook_dropped_total"), 0.0);
}
