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
use crate::hardening_support::TempDir;

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
    post(rig, token, &body)
}

fn stream(rig: &Rig, token: &str, text: &str) -> Request<Full<Bytes>> {
    let body = json!({"model": MODEL, "stream": true, "messages": [{"role": "user", "content": text}]});
    post(rig, token, &body)
}

fn post(rig: &Rig, token: &str, body: &serde_json::Value) -> Request<Full<Bytes>> {
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

async fn cache_stats(rig: &Rig) -> serde_json::Value {
    let auth = format!("Bearer {OPERATOR}");
    rig.get("/stats", &[("authorization", auth.as_str())]).await.json()["cache"].clone()
}

async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(std::time::Instant::now() < deadline, "not within 10 s: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `backend: redis`: what one replica stored, another serves without an
/// upstream request; with Redis killed, requests are still answered
/// (upstream), and the failures are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_entries_through_redis_and_go_on_without_it() {
    let Some(mut redis) = proxypal_shared::testing::Redis::start(
        "two_replicas_share_entries_through_redis_and_go_on_without_it",
    ) else {
        return;
    };
    let url = redis.url();
    bounded(async {
        let tweak = |c: &mut Config| {
            cached(c, Duration::from_secs(60));
            c.cache.backend = proxypal_server::config::CacheBackend::Redis;
            let mut shared = proxypal_server::config::SharedConfig::default();
            shared.redis_url = url.clone();
            shared.timeout = Duration::from_millis(500);
            shared.lease = Duration::from_millis(300);
            shared.heartbeat = Duration::from_millis(100);
            c.shared = Some(shared);
            // A key window of a second (the minute can never fill behind
            // it): a replica without Redis serves its share after a lease
            // and a second, not after the cautious minute (docs/replicas.md).
            c.rate_limit =
                yaml_serde::from_str("requests_per_minute: 1000000\nwindows: [{requests: 100, per: 1s}]")
                    .unwrap();
        };
        let a = Rig::start(2, |s| s, tweak).await;
        let b = Rig::start(2, |s| s, tweak).await;
        for rig in [&a, &b] {
            until("the cache's Redis connected", async || cache_stats(rig).await["ready"] == true).await;
        }
        let first = send(&a.http, chat(&a, ALICE, MODEL, "shared")).await;
        assert_eq!((first.status, label(&first)), (StatusCode::OK, "miss"), "{}", first.text());
        until("the entry written to Redis", async || cache_stats(&a).await["stored"] == 1).await;
        let hit = send(&b.http, chat(&b, ALICE, MODEL, "shared")).await;
        assert_eq!((hit.status, label(&hit)), (StatusCode::OK, "hit"), "{}", hit.text());
        assert_eq!(hit.body, first.body, "replica b serves what replica a stored");
        assert_eq!(b.sim.stats().total_requests, 0, "replica b's upstream was never asked");

        redis.kill();
        until("replica a degraded", async || {
            a.get("/health", &[]).await.json()["quota"]["mode"] == "degraded"
        })
        .await;
        // Queued through the cautious start (the rig's queue waits 5 s).
        let r = send(&a.http, chat(&a, ALICE, MODEL, "after redis")).await;
        assert_eq!(r.status, StatusCode::OK, "without Redis the request still goes through: {}", r.text());
        assert!(cache_stats(&a).await["redis_errors"].as_u64().unwrap() >= 1);
    })
    .await;
}

/// Sends `req` and reads what arrives of the body, whole or cut.
async fn send_cut(rig: &Rig, req: Request<Full<Bytes>>) -> (StatusCode, String, String) {
    use http_body_util::BodyExt;
    let resp = rig.http.request(req).await.unwrap();
    let status = resp.status();
    let label =
        resp.headers().get("x-proxypal-cache").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    let mut body = resp.into_body();
    let mut text = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            text.extend_from_slice(&data);
        }
    }
    (status, label, String::from_utf8_lossy(&text).into_owned())
}

/// A stream the upstream breaks off is passed on as it came and never
/// stored; the next one, whole, is stored and replayed byte for byte. A hit
/// is a ledger row marked `cache_hit` with no tokens, beside the miss's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_mid_way_is_never_stored_and_hits_are_ledger_rows_without_tokens() {
    let dir = TempDir::new("cache-ledger");
    let state = dir.path("state.db");
    bounded(async {
        let rig = Rig::start(
            1,
            |s| s,
            |c| {
                cached(c, Duration::from_secs(60));
                c.state.path = Some(state.clone());
            },
        )
        .await;
        rig.sim.push_fault(
            proxypal_nim_sim::Fault::BreakMidStream { after_chunks: 2 },
            proxypal_nim_sim::FaultTarget::Any,
        );
        let (status, label, cut) = send_cut(&rig, stream(&rig, ALICE, "cut")).await;
        assert_eq!((status, label.as_str()), (StatusCode::OK, "miss"));
        assert!(!cut.contains("[DONE]"), "the upstream broke this one off: {cut}");
        assert_eq!(cache_stats(&rig).await["stored"], 0, "a cut stream is not stored");

        let (_, label, whole) = send_cut(&rig, stream(&rig, ALICE, "cut")).await;
        assert_eq!(label, "miss", "nothing was stored, so the upstream is asked again");
        assert!(whole.trim_end().ends_with("data: [DONE]"), "{whole}");
        until("the whole stream stored", async || cache_stats(&rig).await["stored"] == 1).await;
        let upstream = rig.sim.stats().total_requests;
        let (_, label, replay) = send_cut(&rig, stream(&rig, ALICE, "cut")).await;
        assert_eq!(label, "hit");
        assert_eq!(replay, whole, "the same events, in the same order, [DONE] last");
        assert_eq!(rig.sim.stats().total_requests, upstream);

        // The ledger: three stream rows; the hit's has no tokens.
        let db = dir.path("state-ledger.db");
        let mut rows: Vec<(bool, Option<i64>, i64)> = Vec::new();
        until("three ledger rows", async || {
            rows = rusqlite::Connection::open(&db)
                .and_then(|db| {
                    db.busy_timeout(Duration::from_secs(5))?;
                    Ok(db)
                })
                .and_then(|db| {
                    let mut q = db.prepare(
                        "SELECT cache_hit, total_tokens, status FROM proxypal_ledger ORDER BY at_ms",
                    )?;
                    q.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect()
                })
                .unwrap_or_else(|e| panic!("{e}"));
            rows.len() == 3
        })
        .await;
        assert_eq!(rows.iter().filter(|r| r.0).count(), 1, "{rows:?}");
        let hit = rows.iter().find(|r| r.0).unwrap();
        assert_eq!((hit.1, hit.2), (Some(0), 200), "a hit spends no upstream token: {rows:?}");
    })
    .await;
}

/// Memory stays under `max_bytes`: cold entries give way, a hot one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_under_max_bytes_and_keeps_the_hot_entry() {
    const MAX: u64 = 8 * 1024;
    bounded(async {
        let rig = Rig::start(
            1,
            |s| s,
            |c| {
                cached(c, Duration::from_secs(60));
                c.cache.max_bytes = MAX as usize;
                c.cache.max_entry_bytes = 2 * 1024;
            },
        )
        .await;
        assert_eq!(label(&send(&rig.http, chat(&rig, ALICE, MODEL, "hot")).await), "miss");
        for _ in 0..8 {
            assert_eq!(label(&send(&rig.http, chat(&rig, ALICE, MODEL, "hot")).await), "hit");
        }
        for i in 0..40 {
            let r = send(&rig.http, chat(&rig, ALICE, MODEL, &format!("cold {i}"))).await;
            assert_eq!((r.status, label(&r)), (StatusCode::OK, "miss"));
        }
        let stats = cache_stats(&rig).await;
        let (bytes, entries) = (stats["bytes"].as_u64().unwrap(), stats["entries"].as_u64().unwrap());
        assert!(bytes <= MAX, "{bytes} bytes held, at most {MAX}: {stats}");
        assert!((2..41).contains(&entries), "some entries, not all 41: {stats}");
        assert_eq!(label(&send(&rig.http, chat(&rig, ALICE, MODEL, "hot")).await), "hit", "{stats}");
        // The cold ones that gave way are asked upstream again.
        let mut missed = 0;
        for i in 0..40 {
            if label(&send(&rig.http, chat(&rig, ALICE, MODEL, &format!("cold {i}"))).await) == "miss" {
                missed += 1;
            }
        }
        assert!(missed > 0, "some cold entries were evicted: {stats}");
    })
    .await;
}

/// `shared_between_clients: true`: what alice's request stored, bob's
/// identical one is answered from (by default each client has its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_between_clients_serves_one_clients_entry_to_another() {
    bounded(async {
        let rig = Rig::start(
            1,
            |s| s,
            |c| {
                cached(c, Duration::from_secs(60));
                c.cache.shared_between_clients = true;
            },
        )
        .await;
        let first = send(&rig.http, chat(&rig, ALICE, MODEL, "shared")).await;
        assert_eq!(label(&first), "miss");
        let bob = send(&rig.http, chat(&rig, BOB, MODEL, "shared")).await;
        assert_eq!(label(&bob), "hit");
        assert_eq!(bob.body, first.body);
        assert_eq!(rig.sim.stats().total_requests, 1);
    })
    .await;
}
