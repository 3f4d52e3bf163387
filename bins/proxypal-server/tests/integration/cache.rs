//! The response cache (`cache:`) behind a real server: repeats answered
//! without an upstream request, per client and per model, expiry, `/stats`
//! and `/metrics`, `DELETE /admin/cache`, and the ledger's cache hits.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use proxypal_server::config::{ClientEntry, Config, Secret};
use serde_json::json;

use crate::common::{Reply, Rig, bounded, send};

const ALICE: &str = "pp-alice-cache-token-0001";
const BOB: &str = "pp-bob-cache-token-000002";
const OPERATOR: &str = "pp-operator-cache-token-3";

fn client(name: &str, token: &str) -> ClientEntry {
    yaml_serde::from_str(&format!("name: {name}\ntoken: {token}\n")).unwrap()
}

fn cached(config: &mut Config, ttl: Duration) {
    config.auth.tokens = vec![Secret::new(OPERATOR)];
    config.clients = vec![client("alice", ALICE), client("bob", BOB)];
    config.cache.enabled = true;
    config.cache.ttl = ttl;
}

fn chat(rig: &Rig, token: &str, model: &str, text: &str) -> Request<Full<Bytes>> {
    let body = json!({"model": model, "temperature": 0, "messages": [{"role": "user", "content": text}]});
    Request::builder()
        .method(Method::POST)
        .uri(rig.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn label(r: &Reply) -> &str {
    r.headers.get("x-proxypal-cache").and_then(|v| v.to_str().ok()).unwrap_or("(none)")
}

const MODEL: &str = "meta/llama-3.1-8b-instruct";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeats_are_answered_from_the_cache_per_client_and_model_until_they_expire() {
    bounded(async {
        let rig = Rig::start(2, |s| s, |c| cached(c, Duration::from_secs(2))).await;
        let upstream = || rig.sim.stats().total_requests;

        let first = send(&rig.http, chat(&rig, ALICE, MODEL, "hello")).await;
        assert_eq!((first.status, label(&first)), (StatusCode::OK, "miss"), "{}", first.text());
        let before = upstream();
        let hit = send(&rig.http, chat(&rig, ALICE, MODEL, "hello")).await;
        assert_eq!((hit.status, label(&hit)), (StatusCode::OK, "hit"));
        assert_eq!(hit.body, first.body);
        assert!(hit.headers.contains_key("age"));
        assert_eq!(upstream(), before, "a hit spends no upstream request");

        // Another client, another model, another body: each a miss.
        assert_eq!(label(&send(&rig.http, chat(&rig, BOB, MODEL, "hello")).await), "miss");
        assert_eq!(
            label(&send(&rig.http, chat(&rig, ALICE, "meta/llama-3.3-70b-instruct", "hello")).await),
            "miss"
        );
        assert_eq!(label(&send(&rig.http, chat(&rig, ALICE, MODEL, "hello!")).await), "miss");

        let op = [("authorization", format!("Bearer {OPERATOR}"))];
        let op: Vec<(&str, &str)> = op.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let stats = rig.get("/stats", &op).await.json();
        assert_eq!(stats["cache"]["hits"], 1, "{}", stats["cache"]);
        assert_eq!(stats["cache"]["misses"], 4, "{}", stats["cache"]);
        assert_eq!(stats["cache"]["backend"], "memory");
        let metrics = rig.get("/metrics", &op).await.text();
        assert!(metrics.contains("proxypal_cache_hits_total 1"), "{metrics}");
        assert!(metrics.contains("proxypal_cache_saved_requests_total 1"), "{metrics}");

        // Cleared by an operator (not by a client), then a miss again.
        let clear = |token: &str| {
            Request::builder()
                .method(Method::DELETE)
                .uri(rig.url("/admin/cache"))
                .header("authorization", format!("Bearer {token}"))
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        assert_eq!(send(&rig.http, clear(ALICE)).await.status, StatusCode::FORBIDDEN);
        let cleared = send(&rig.http, clear(OPERATOR)).await;
        assert_eq!(cleared.status, StatusCode::OK, "{}", cleared.text());
        assert!(cleared.json()["cleared"].as_u64().unwrap() >= 4, "{}", cleared.text());
        assert_eq!(label(&send(&rig.http, chat(&rig, ALICE, MODEL, "hello")).await), "miss");
        assert_eq!(label(&send(&rig.http, chat(&rig, ALICE, MODEL, "hello")).await), "hit");

        // Past the TTL: a miss.
        tokio::time::sleep(Duration::from_millis(2_300)).await;
        assert_eq!(label(&send(&rig.http, chat(&rig, ALICE, MODEL, "hello")).await), "miss");
    })
    .await;
}

#[test]
fn cache_settings_that_cannot_work_are_refused_naming_the_field() {
    for (yaml, field) in [
        ("cache: {enabled: true, backend: redis}", "cache.backend"),
        ("cache: {enabled: true, max_bytes: 10}", "cache.max_bytes"),
        ("cache: {enabled: true, ttl: 10ms}", "cache.ttl"),
    ] {
        let config: Config = yaml_serde::from_str(&format!("keys: [nvapi-test-key-0001]\n{yaml}\n")).unwrap();
        let err = config.validate(false).unwrap_err().to_string();
        assert!(err.contains(field), "{yaml}: {err}");
    }
}
