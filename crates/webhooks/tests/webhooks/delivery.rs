//! What one delivery looks like on the wire.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use prometheus_client::registry::Registry;
use proxypal_webhooks::{Endpoint, Event, EventKind, Secret, Webhooks, verify};
use ring::hmac;
use serde_json::json;

use crate::support::{TestServer, bounded, deliveries, now_s, quick_config};

const KEY_BYTES: &[u8] = b"an endpoint secret, 32 bytes!!!!";

#[tokio::test]
async fn a_delivery_is_signed_the_standard_webhooks_way_and_carries_the_payload() {
    bounded(async {
        let mut server = TestServer::always(200).await;
        let secret_text = format!("whsec_{}", BASE64.encode(KEY_BYTES));
        let endpoint = Endpoint::new(&server.url()).unwrap().secret(Secret::parse(&secret_text).unwrap());
        let mut registry = Registry::with_prefix("proxypal");
        let hooks = Webhooks::try_start(quick_config(vec![endpoint]), &mut registry).unwrap();

        let before = now_s();
        hooks.emit(
            Event::new(EventKind::QuotaWarning)
                .at_ms(1_614_265_330_250)
                .provider("nvidia")
                .key("nvidia-3")
                .figure("remaining", json!(200))
                .figure("limit", json!(1000))
                .figure("window", json!("day"))
                .figure("resets_at", json!("2026-11-04T00:00:00Z")),
        );
        let got = server.next(Duration::from_secs(5)).await.expect("a delivery within 5 s");

        assert_eq!(got.header("content-type"), "application/json");
        let id = got.header("webhook-id").to_owned();
        assert!(id.starts_with("msg_") && id.len() > 8, "{id}");
        let ts: i64 = got.header("webhook-timestamp").parse().expect("integer seconds");
        assert!((before - 1..=now_s() + 1).contains(&ts), "timestamp {ts} is the attempt's time");

        // The signature, computed independently of the crate: HMAC-SHA256 over
        // "{id}.{timestamp}.{body}" with the base64-decoded secret.
        let key = hmac::Key::new(hmac::HMAC_SHA256, KEY_BYTES);
        let mut signed = format!("{id}.{ts}.").into_bytes();
        signed.extend_from_slice(&got.body);
        let expected = format!("v1,{}", BASE64.encode(hmac::sign(&key, &signed).as_ref()));
        assert_eq!(got.header("webhook-signature"), expected);
        // ... and the receiver-side helper agrees.
        let secret = Secret::parse(&secret_text).unwrap();
        assert!(verify(&secret, &got.headers, &got.body, now_s(), Duration::from_secs(300)));
        let mut tampered = got.body.to_vec();
        tampered.push(b' ');
        assert!(!verify(&secret, &got.headers, &tampered, now_s(), Duration::from_secs(300)));

        assert_eq!(
            got.json(),
            json!({
                "type": "quota.warning",
                "timestamp": "2021-02-25T15:02:10.250Z",
                "data": {
                    "provider": "nvidia",
                    "key": "nvidia-3",
                    "remaining": 200,
                    "limit": 1000,
                    "window": "day",
                    "resets_at": "2026-11-04T00:00:00Z"
                }
            })
        );

        hooks.shutdown(Duration::from_secs(5)).await;
        assert_eq!(deliveries(&registry, "quota.warning", "delivered"), 1.0);
        assert_eq!(deliveries(&registry, "quota.warning", "retried"), 0.0);
        assert!(server.drain().is_empty(), "one delivery, no more");
    })
    .await;
}

#[tokio::test]
async fn an_endpoint_without_a_secret_gets_no_signature_header() {
    bounded(async {
        let mut server = TestServer::always(204).await;
        let endpoint = Endpoint::new(&server.url()).unwrap();
        let mut registry = Registry::with_prefix("proxypal");
        let hooks = Webhooks::try_start(quick_config(vec![endpoint]), &mut registry).unwrap();

        hooks.emit(
            Event::new(EventKind::ClientQuotaExhausted).client("team-a").figure("resets_at", 1_800_000_000),
        );
        let got = server.next(Duration::from_secs(5)).await.expect("a delivery within 5 s");
        assert!(got.headers.contains_key("webhook-id"));
        assert!(got.headers.contains_key("webhook-timestamp"));
        assert!(!got.headers.contains_key("webhook-signature"));
        assert_eq!(got.json()["data"], json!({"client": "team-a", "resets_at": 1_800_000_000}));

        hooks.shutdown(Duration::from_secs(5)).await;
        assert_eq!(deliveries(&registry, "client.quota_exhausted", "delivered"), 1.0, "204 is a 2xx");
    })
    .await;
}
