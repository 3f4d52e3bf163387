//! An endpoint receives only the events it subscribes to.

use std::collections::BTreeSet;
use std::time::Duration;

use prometheus_client::registry::Registry;
use proxypal_webhooks::{Endpoint, Event, EventKind, Webhooks};

use crate::support::{TestServer, bounded, quick_config};

#[tokio::test]
async fn an_endpoint_subscribed_to_pool_events_gets_no_key_events() {
    bounded(async {
        let mut pools = TestServer::always(200).await;
        let mut everything = TestServer::always(200).await;
        let endpoints = vec![
            Endpoint::new(&pools.url()).unwrap().events([EventKind::PoolExhausted, EventKind::PoolRecovered]),
            Endpoint::new(&everything.url()).unwrap(),
        ];
        let mut registry = Registry::with_prefix("proxypal");
        let hooks = Webhooks::try_start(quick_config(endpoints), &mut registry).unwrap();

        hooks.emit(Event::new(EventKind::KeyDisabled).provider("p").key("k"));
        hooks.emit(Event::new(EventKind::PoolExhausted).provider("p"));
        hooks.emit(Event::new(EventKind::KeyRecovered).provider("p").key("k"));
        hooks.emit(Event::new(EventKind::PoolRecovered).provider("p"));
        hooks.emit(Event::new(EventKind::QuotaWarning).provider("p").figure("resets_at", 4_000_000_000_i64));
        hooks.shutdown(Duration::from_secs(5)).await;

        let kinds =
            |server: &mut TestServer| server.drain().iter().map(|r| r.kind()).collect::<BTreeSet<_>>();
        assert_eq!(
            kinds(&mut pools),
            BTreeSet::from(["pool.exhausted".to_owned(), "pool.recovered".to_owned()])
        );
        assert_eq!(kinds(&mut everything).len(), 5);
    })
    .await;
}

#[tokio::test]
async fn a_recovery_ends_the_state_even_when_only_the_recovery_is_unsubscribed() {
    bounded(async {
        let mut server = TestServer::always(200).await;
        let endpoint = Endpoint::new(&server.url()).unwrap().events([EventKind::KeyDisabled]);
        let mut registry = Registry::with_prefix("proxypal");
        let hooks = Webhooks::try_start(
            proxypal_webhooks::WebhookConfig {
                max_in_flight_per_endpoint: 1,
                ..quick_config(vec![endpoint])
            },
            &mut registry,
        )
        .unwrap();

        hooks.emit(Event::new(EventKind::KeyDisabled).key("k"));
        hooks.emit(Event::new(EventKind::KeyRecovered).key("k"));
        hooks.emit(Event::new(EventKind::KeyDisabled).key("k"));
        hooks.shutdown(Duration::from_secs(5)).await;

        let kinds: Vec<String> = server.drain().iter().map(|r| r.kind()).collect();
        assert_eq!(kinds, ["key.disabled", "key.disabled"]);
    })
    .await;
}
