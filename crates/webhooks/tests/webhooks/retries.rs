//! Failed attempts: retried with the same id and backoff, given up after the last one,
//! never delaying another endpoint.

use std::net::TcpListener;
use std::time::Duration;

use prometheus_client::registry::Registry;
use proxypal_webhooks::{Endpoint, Event, EventKind, Secret, WebhookConfig, Webhooks, verify};
use tokio::time::Instant;

use crate::support::{Reply, TestServer, bounded, deliveries, now_s, quick_config};

#[tokio::test]
async fn a_500_is_retried_with_the_same_webhook_id() {
    bounded(async {
        let mut server = TestServer::start(|n| Reply::Status(if n == 0 { 500 } else { 200 })).await;
        let secret = Secret::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let endpoint = Endpoint::new(&server.url()).unwrap().secret(secret.clone());
        let mut registry = Registry::with_prefix("proxypal");
        let hooks = Webhooks::try_start(quick_config(vec![endpoint]), &mut registry).unwrap();

        hooks.emit(Event::new(EventKind::KeyDisabled).provider("groq").key("groq-1"));
        let first = server.next(Duration::from_secs(5)).await.expect("first attempt");
        let second = server.next(Duration::from_secs(5)).await.expect("the retry");
        assert_eq!(first.header("webhook-id"), second.header("webhook-id"));
        assert_eq!(first.body, second.body);
        assert!(second.at - first.at >= Duration::from_millis(10), "waited the first backoff");
        for attempt in [&first, &second] {
            assert!(verify(&secret, &attempt.headers, &attempt.body, now_s(), Duration::from_secs(300)));
        }

        hooks.shutdown(Duration::from_secs(5)).await;
        assert!(server.drain().is_empty(), "delivered on the second attempt: no third");
        assert_eq!(deliveries(&registry, "key.disabled", "retried"), 1.0);
        assert_eq!(deliveries(&registry, "key.disabled", "delivered"), 1.0);
        assert_eq!(deliveries(&registry, "key.disabled", "failed"), 0.0);
    })
    .await;
}

#[tokio::test]
async fn gives_up_after_max_attempts_and_counts_one_failure() {
    bounded(async {
        let mut server = TestServer::always(500).await;
        let endpoint = Endpoint::new(&server.url()).unwrap();
        let mut registry = Registry::with_prefix("proxypal");
        let hooks = Webhooks::try_start(quick_config(vec![endpoint]), &mut registry).unwrap();

        hooks.emit(Event::new(EventKind::PoolExhausted).provider("cerebras"));
        hooks.shutdown(Duration::from_secs(10)).await;

        let attempts = server.drain();
        assert_eq!(attempts.len(), 3, "max_attempts = 3");
        assert!(attempts.iter().all(|a| a.header("webhook-id") == attempts[0].header("webhook-id")));
        // Backoff 10 ms, then 20 ms (lower bounds: a sleep never ends early).
        assert!(attempts[1].at - attempts[0].at >= Duration::from_millis(10));
        assert!(attempts[2].at - attempts[1].at >= Duration::from_millis(20));
        assert_eq!(deliveries(&registry, "pool.exhausted", "failed"), 1.0);
        assert_eq!(deliveries(&registry, "pool.exhausted", "retried"), 2.0);
        assert_eq!(deliveries(&registry, "pool.exhausted", "delivered"), 0.0);
    })
    .await;
}

#[tokio::test]
async fn an_attempt_that_times_out_is_retried() {
    bounded(async {
        let mut server = TestServer::start(|n| if n == 0 { Reply::Hang } else { Reply::Status(200) }).await;
        let endpoint = Endpoint::new(&server.url()).unwrap();
        let mut registry = Registry::with_prefix("proxypal");
        let config = WebhookConfig { timeout: Duration::from_millis(200), ..quick_config(vec![endpoint]) };
        let hooks = Webhooks::try_start(config, &mut registry).unwrap();

        hooks.emit(Event::new(EventKind::KeyDisabled).key("k"));
        let first = server.next(Duration::from_secs(5)).await.expect("first attempt");
        let second = server.next(Duration::from_secs(5)).await.expect("the retry after the timeout");
        assert!(second.at - first.at >= Duration::from_millis(200), "the first attempt timed out");
        hooks.shutdown(Duration::from_secs(5)).await;
        assert_eq!(deliveries(&registry, "key.disabled", "retried"), 1.0);
        assert_eq!(deliveries(&registry, "key.disabled", "delivered"), 1.0);
    })
    .await;
}

#[tokio::test]
async fn a_refused_connection_is_retried_then_given_up() {
    bounded(async {
        // A port that was just free: nothing listens on it.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let endpoint = Endpoint::new(&format!("http://127.0.0.1:{port}/hook")).unwrap();
        let mut registry = Registry::with_prefix("proxypal");
        let config = WebhookConfig { max_attempts: 2, ..quick_config(vec![endpoint]) };
        let hooks = Webhooks::try_start(config, &mut registry).unwrap();

        hooks.emit(Event::new(EventKind::PoolExhausted).provider("p"));
        hooks.shutdown(Duration::from_secs(10)).await;
        assert_eq!(deliveries(&registry, "pool.exhausted", "retried"), 1.0);
        assert_eq!(deliveries(&registry, "pool.exhausted", "failed"), 1.0);
    })
    .await;
}

#[tokio::test]
async fn a_hanging_endpoint_delays_no_other_and_shutdown_stays_bounded() {
    bounded(async {
        let mut dead = TestServer::start(|_| Reply::Hang).await;
        let mut live = TestServer::always(200).await;
        let endpoints = vec![Endpoint::new(&dead.url()).unwrap(), Endpoint::new(&live.url()).unwrap()];
        let mut registry = Registry::with_prefix("proxypal");
        let config = WebhookConfig {
            max_attempts: 6,
            first_backoff: Duration::from_secs(1),
            timeout: Duration::from_secs(30),
            ..quick_config(endpoints)
        };
        let hooks = Webhooks::try_start(config, &mut registry).unwrap();

        for i in 0..5 {
            hooks.emit(Event::new(EventKind::KeyDisabled).key(format!("k{i}")));
        }
        for _ in 0..5 {
            live.next(Duration::from_secs(5)).await.expect("the live endpoint is served at once");
        }
        dead.next(Duration::from_secs(5)).await.expect("the dead endpoint was tried");

        let started = Instant::now();
        hooks.shutdown(Duration::from_millis(300)).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "shutdown took {took:?}");
        assert_eq!(deliveries(&registry, "key.disabled", "delivered"), 5.0);
        hooks.emit(Event::new(EventKind::KeyDisabled).key("after-shutdown"));
        assert!(live.next(Duration::from_millis(200)).await.is_none(), "nothing is sent after shutdown");
    })
    .await;
}
