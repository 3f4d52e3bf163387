//! Named clients (`clients:`): their own quotas (enforced with a 429 that
//! names the client's limit, kept across a restart), model allow-lists
//! (403), operator-only endpoints, and fair queueing between clients while
//! the pool is saturated.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use proxypal_server::config::{ClientEntry, Config, Secret};
use serde_json::json;

use crate::common::{Reply, Rig, bounded, http_client, send};
use crate::hardening_support::TempDir;

const ALICE: &str = "pp-alice-token-0000000001";
const BOB: &str = "pp-bob-token-00000000002";
const OPERATOR: &str = "pp-operator-token-0000003";

fn client(name: &str, token: &str) -> ClientEntry {
    let yaml = format!("name: {name}\ntoken: {token}\n");
    yaml_serde::from_str(&yaml).unwrap()
}

/// Operator token plus alice and bob; `tweak` shapes alice.
fn with_clients(config: &mut Config, alice: impl FnOnce(&mut ClientEntry)) {
    config.auth.tokens = vec![Secret::new(OPERATOR)];
    let mut a = client("alice", ALICE);
    alice(&mut a);
    config.clients = vec![a, client("bob", BOB)];
}

fn chat_as(rig: &Rig, token: &str, model: &str) -> Request<Full<Bytes>> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "Hello"}]});
    Request::builder()
        .method(Method::POST)
        .uri(rig.url("/v1/chat/completions"))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {token}"))
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

const MODEL: &str = "meta/llama-3.1-8b-instruct";

async fn get_as(rig: &Rig, path: &str, token: &str) -> Reply {
    rig.get(path, &[("authorization", &format!("Bearer {token}"))]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_own_quota_gets_a_429_that_says_so_and_others_go_on() {
    bounded(async {
        let rig = Rig::start(2, |s| s, |c| with_clients(c, |a| a.requests_per_minute = Some(2))).await;
        for _ in 0..2 {
            let r = send(&rig.http, chat_as(&rig, ALICE, MODEL)).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        }
        let r = send(&rig.http, chat_as(&rig, ALICE, MODEL)).await;
        assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS, "{}", r.text());
        let err = r.openai_error();
        assert_eq!(err["code"], "client_quota_exceeded", "{err}");
        assert_eq!(err["type"], "rate_limit_error");
        assert_eq!(err["client"], "alice");
        let message = err["message"].as_str().unwrap();
        assert!(
            message.contains("requests_per_minute: 2") && message.contains("not the pool's"),
            "{message}"
        );
        let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((50..=61).contains(&retry), "retry-after {retry}");
        assert_eq!(rig.sim.stats().total_requests, 2, "the refused request spent no upstream quota");

        // Bob has no quota of his own; the pool has room.
        for _ in 0..3 {
            assert_eq!(send(&rig.http, chat_as(&rig, BOB, MODEL)).await.status, StatusCode::OK);
        }
        // The operator sees alice's window and refusal.
        let stats = get_as(&rig, "/stats", OPERATOR).await.json();
        let alice = &stats["clients"][0];
        assert_eq!(alice["name"], "alice");
        assert_eq!(alice["refused"], 1, "{alice}");
        assert_eq!(alice["limits"][0]["used"], 2, "{alice}");
        let metrics = get_as(&rig, "/metrics", OPERATOR).await.text();
        assert!(
            metrics.contains(r#"proxypal_client_refused_total{client="alice",reason="client_quota"} 1"#),
            "{metrics}"
        );
        assert!(!metrics.contains(ALICE) && !stats.to_string().contains(ALICE), "a client token leaked");
        rig.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_off_the_clients_list_gets_a_403() {
    bounded(async {
        let rig = Rig::start(1, |s| s, |c| with_clients(c, |a| a.models = vec!["meta/*".into()])).await;
        assert_eq!(send(&rig.http, chat_as(&rig, ALICE, MODEL)).await.status, StatusCode::OK);
        let r = send(&rig.http, chat_as(&rig, ALICE, "mistralai/mixtral-8x7b-instruct")).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{}", r.text());
        let err = r.openai_error();
        assert_eq!(
            (err["code"].as_str(), err["type"].as_str()),
            (Some("model_not_allowed"), Some("permission_error"))
        );
        assert_eq!(rig.sim.stats().total_requests, 1, "the refused request never went upstream");
        // Bob has no list.
        let r = send(&rig.http, chat_as(&rig, BOB, "mistralai/mixtral-8x7b-instruct")).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        rig.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_metrics_and_admin_are_for_operators_and_admin_clients() {
    bounded(async {
        let rig = Rig::start(1, |s| s, |c| with_clients(c, |a| a.admin = true)).await;
        for path in ["/stats", "/metrics"] {
            assert_eq!(get_as(&rig, path, OPERATOR).await.status, StatusCode::OK, "{path} operator");
            assert_eq!(get_as(&rig, path, ALICE).await.status, StatusCode::OK, "{path} admin client");
            let bob = get_as(&rig, path, BOB).await;
            assert_eq!(bob.status, StatusCode::FORBIDDEN, "{path} plain client: {}", bob.text());
            assert_eq!(bob.error_code(), "operator_only");
            assert_eq!(rig.get(path, &[]).await.status, StatusCode::UNAUTHORIZED, "{path} no token");
        }
        let reset = |token: &str| {
            Request::builder()
                .method(Method::POST)
                .uri(rig.url("/admin/keys/nope/reset"))
                .header("authorization", format!("Bearer {token}"))
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        assert_eq!(send(&rig.http, reset(BOB)).await.status, StatusCode::FORBIDDEN);
        assert_eq!(send(&rig.http, reset(ALICE)).await.status, StatusCode::NOT_FOUND, "allowed, no such key");
        rig.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_quota_survives_a_restart() {
    bounded(async {
        let dir = TempDir::new("client-quota-restart");
        let state = dir.path("state.db");
        let rig = Rig::start(
            1,
            |s| s,
            |c| {
                with_clients(c, |a| a.requests_per_day = Some(3));
                c.state.path = Some(state.clone());
            },
        )
        .await;
        for _ in 0..3 {
            assert_eq!(send(&rig.http, chat_as(&rig, ALICE, MODEL)).await.status, StatusCode::OK);
        }
        let config = {
            let mut c = crate::common::proxy_config(&rig.sim, &rig.keys);
            with_clients(&mut c, |a| a.requests_per_day = Some(3));
            c.state.path = Some(state.clone());
            c
        };
        rig.server.shutdown().await;
        let server = proxypal_server::start(&config, false).await.unwrap();
        let http = http_client();
        let req = |token: &str| {
            let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello"}]});
            Request::builder()
                .method(Method::POST)
                .uri(format!("http://{}/v1/chat/completions", server.addr()))
                .header("authorization", format!("Bearer {token}"))
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap()
        };
        let r = send(&http, req(ALICE)).await;
        assert_eq!(
            r.status,
            StatusCode::TOO_MANY_REQUESTS,
            "the day's 3 were spent before the restart: {}",
            r.text()
        );
        assert_eq!(r.error_code(), "client_quota_exceeded");
        assert_eq!(send(&http, req(BOB)).await.status, StatusCode::OK);
        server.shutdown().await;
    })
    .await;
}

/// One key with a permit every 100 ms (burst 1): a client that queued 20
/// requests delays another client's single request by about one permit, not
/// by its 20 (2 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_cannot_starve_a_single_request() {
    bounded(async {
        let rig = Rig::start(
            1,
            |s| s,
            |c| {
                with_clients(c, |_| {});
                c.rate_limit.requests_per_minute = Some(600);
                c.rate_limit.burst = Some(1);
                c.rate_limit.margin = Some(Duration::ZERO);
                c.retry.queue_timeout = Duration::from_secs(20);
            },
        )
        .await;
        // Saturate: the flood's first request takes the permit, the rest queue.
        let mut flood = Vec::new();
        for _ in 0..20 {
            let http = rig.http.clone();
            let req = chat_as(&rig, ALICE, MODEL);
            flood.push(tokio::spawn(async move { send(&http, req).await.status }));
        }
        // Wait until the flood is queued.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stats = get_as(&rig, "/stats", OPERATOR).await.json();
            if stats["queue_by_client"]["alice"].as_u64().unwrap_or(0) >= 15 {
                assert!(stats["clients"][0]["queued"].as_u64().unwrap() >= 15, "{stats}");
                let metrics = get_as(&rig, "/metrics", OPERATOR).await.text();
                assert!(metrics.contains(r#"proxypal_client_queue_depth{client="alice"}"#), "{metrics}");
                break;
            }
            assert!(Instant::now() < deadline, "the flood never queued: {stats}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut waits = Vec::new();
        for _ in 0..3 {
            let started = Instant::now();
            let r = send(&rig.http, chat_as(&rig, BOB, MODEL)).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text());
            waits.push(started.elapsed());
        }
        // Each single request waits for at most the turn in progress plus its
        // own permit: two permit intervals, with slack for a busy machine.
        for w in &waits {
            assert!(*w < Duration::from_millis(450), "bob waited {waits:?} behind alice's flood");
        }
        let mut ok = 0;
        for f in flood {
            ok += usize::from(f.await.unwrap() == StatusCode::OK);
        }
        assert_eq!(ok, 20, "the flood is served too, after bob");
        rig.server.shutdown().await;
    })
    .await;
}
