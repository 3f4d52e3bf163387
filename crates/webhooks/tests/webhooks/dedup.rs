//! An event is sent once while its state lasts, or once per quota window.

use std::time::Duration;

use prometheus_client::registry::Registry;
use proxypal_webhooks::{Endpoint, Event, EventKind, WebhookConfig, Webhooks};
use serde_json::json;

use crate::support::{TestServer, bounded, metric, quick_config};

/// One delivery at a time, so the receiver sees messages in emit order.
fn in_order(endpoint: Endpoint) -> WebhookConfig {
    WebhookConfig { max_in_flight_per_endpoint: 1, ..quick_config(vec![endpoint]) }
}

#[tokio::test]
async fn key_disabled_is_sent_once_until_the_key_recovers() {
    bounded(async {
        let mut server = TestServer::always(200).await;
        let mut registry = Registry::with_prefix("proxypal");
        let hooks =
            Webhooks::try_start(in_order(Endpoint::new(&server.url()).unwrap()), &mut registry).unwrap();
        let disabled = || Event::new(EventKind::KeyDisabled).provider("nvidia").key("nvidia-3");
        let recovered = || Event::new(EventKind::KeyRecovered).provider("nvidia").key("nvidia-3");

        hooks.emit(recovered()); // never disabled: not news
        hooks.emit(disabled());
        hooks.emit(disabled());
        hooks.emit(disabled());
        hooks.emit(recovered());
        hooks.emit(recovered());
        hooks.emit(disabled());
        hooks.shutdown(Duration::from_secs(5)).await;

        let kinds: Vec<String> = server.drain().iter().map(|r| r.kind()).collect();
        assert_eq!(kinds, ["key.disabled", "key.recovered", "key.disabled"]);
        assert_eq!(metric(&registry, "proxypal_webhook_deduplicated_total"), 4.0);
    })
    .await;
}

#[tokio::test]
async fn quota_warning_is_sent_once_per_window() {
    bounded(async {
        let mut server = TestServer::always(200).await;
        let mut registry = Registry::with_prefix("proxypal");
        let hooks =
            Webhooks::try_start(in_order(Endpoint::new(&server.url()).unwrap()), &mut registry).unwrap();
        let warning = |resets_at: &str, remaining: u64| {
            Event::new(EventKind::QuotaWarning)
                .provider("cerebras")
                .key("cerebras-1")
                .figure("window", "day")
                .figure("resets_at", resets_at)
                .figure("remaining", json!(remaining))
        };

        hooks.emit(warning("2099-01-01T00:00:00Z", 200));
        hooks.emit(warning("2099-01-01T00:00:00Z", 150));
        hooks.emit(warning("2099-01-02T00:00:00Z", 190));
        hooks.shutdown(Duration::from_secs(5)).await;

        let got = server.drain();
        let resets: Vec<String> =
            got.iter().map(|r| r.json()["data"]["resets_at"].as_str().unwrap().to_owned()).collect();
        assert_eq!(resets, ["2099-01-01T00:00:00Z", "2099-01-02T00:00:00Z"]);
        assert_eq!(got[0].json()["data"]["remaining"], 200, "the first of a window is the one sent");
        assert_eq!(metric(&registry, "proxypal_webhook_deduplicated_total"), 1.0);
    })
    .await;
}
