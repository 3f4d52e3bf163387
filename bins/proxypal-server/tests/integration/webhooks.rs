//! Webhooks end to end: a test HTTP server on 127.0.0.1 receives the events
//! a running proxy reports — a key the upstream rejects (`key.disabled`,
//! once), its reset (`key.recovered`), a pool whose day is spent
//! (`pool.exhausted`, `quota.warning`) and a client over its own quota
//! (`client.quota_exhausted`) — each signed the Standard Webhooks way.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use proxypal_server::config::{ClientEntry, KeyEntry, Secret, WebhookEntry};
use serde_json::{Value, json};

use crate::common::{Rig, bounded, send};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ALICE: &str = "pp-alice-hooks-000000001";
const OPERATOR: &str = "pp-operator-hooks-000002";
const BAD_KEY: &str = "nvapi-this-key-the-upstream-rejects-0000bad1";

/// Deliveries received: headers checked, bodies kept.
#[derive(Default)]
struct Received(Mutex<Vec<Value>>);

impl Received {
    fn of(&self, kind: &str) -> Vec<Value> {
        self.0.lock().unwrap().iter().filter(|e| e["type"] == kind).cloned().collect()
    }

    async fn wait_for(&self, kind: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.of(kind);
            if got.len() >= n {
                return got;
            }
            assert!(Instant::now() < deadline, "no {kind} delivery: {:?}", self.0.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A webhook receiver that checks each delivery's signature and keeps its body.
async fn receiver() -> (String, Arc<Received>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hooks/proxypal", listener.local_addr().unwrap());
    let received = Arc::new(Received::default());
    let secret = proxypal_webhooks::Secret::parse(SECRET).unwrap();
    let store = Arc::clone(&received);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let (store, secret) = (Arc::clone(&store), secret.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (store, secret) = (Arc::clone(&store), secret.clone());
                    async move {
                        let (head, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes();
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap()
                            .as_secs() as i64;
                        let valid = proxypal_webhooks::verify(
                            &secret,
                            &head.headers,
                            &body,
                            now,
                            Duration::from_secs(300),
                        );
                        assert!(valid, "a delivery with a bad signature: {head:?}");
                        store.0.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (url, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_reach_a_webhook_signed_and_once_per_state() {
    bounded(async {
        let (url, received) = receiver().await;
        let rig = Rig::start(
            1,
            |s| s,
            |c| {
                c.auth.tokens = vec![Secret::new(OPERATOR)];
                let alice: ClientEntry =
                    yaml_serde::from_str(&format!("name: alice\ntoken: {ALICE}\nrequests_per_minute: 1\n")).unwrap();
                c.clients = vec![alice];
                c.keys.insert(0, KeyEntry::new(BAD_KEY));
                c.rate_limit.requests_per_day = Some(2);
                let hook: WebhookEntry =
                    yaml_serde::from_str(&format!("url: {url}\nsecret: {SECRET}\n")).unwrap();
                c.webhooks = vec![hook];
            },
        )
        .await;
        let chat = |token: &str| {
            let body = json!({"model": "meta/llama-3.1-8b-instruct", "messages": [{"role": "user", "content": "Hi"}]});
            Request::builder()
                .method(Method::POST)
                .uri(rig.url("/v1/chat/completions"))
                .header("authorization", format!("Bearer {token}"))
                .body(Full::new(Bytes::from(body.to_string())))
                .unwrap()
        };
        // The bad key is tried first, rejected and disabled; the good key serves.
        assert_eq!(send(&rig.http, chat(OPERATOR)).await.status, StatusCode::OK);
        let disabled = received.wait_for("key.disabled", 1).await;
        let masked = proxypal_server::config::mask_key(BAD_KEY);
        assert_eq!(disabled[0]["data"]["key"], masked.as_str(), "{disabled:?}");
        assert_eq!(disabled[0]["data"]["provider"], "default");

        // Alice: one request a minute; the second is refused by her own quota.
        assert_eq!(send(&rig.http, chat(ALICE)).await.status, StatusCode::OK);
        assert_eq!(send(&rig.http, chat(ALICE)).await.status, StatusCode::TOO_MANY_REQUESTS);
        let exhausted = received.wait_for("client.quota_exhausted", 1).await;
        assert_eq!(exhausted[0]["data"]["client"], "alice", "{exhausted:?}");
        assert_eq!(exhausted[0]["data"]["window"], "requests/60s");

        // The good key's day (2 requests) is spent: the pool is exhausted, and
        // the day's budget passed 80 %.
        let pool = received.wait_for("pool.exhausted", 1).await;
        assert_eq!(pool[0]["data"]["provider"], "default", "{pool:?}");
        let warning = received.wait_for("quota.warning", 1).await;
        assert_eq!(warning[0]["data"]["window"], "requests/86400s", "{warning:?}");
        assert_eq!(warning[0]["data"]["limit"], 2);

        // An operator resets the rejected key: recovered (and with it the pool).
        let reset = Request::builder()
            .method(Method::POST)
            .uri(rig.url(&format!("/admin/keys/{}/reset", masked.replace('…', "%E2%80%A6"))))
            .header("authorization", format!("Bearer {OPERATOR}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert_eq!(send(&rig.http, reset).await.status, StatusCode::OK);
        received.wait_for("key.recovered", 1).await;
        received.wait_for("pool.recovered", 1).await;

        // Three more looks at the same states: nothing is sent twice.
        tokio::time::sleep(Duration::from_millis(3_200)).await;
        for kind in ["key.disabled", "key.recovered", "pool.exhausted", "quota.warning", "client.quota_exhausted"] {
            assert_eq!(received.of(kind).len(), 1, "{kind} was sent more than once");
        }
        let metrics = rig.get("/metrics", &[("authorization", &format!("Bearer {OPERATOR}"))]).await.text();
        assert!(
            metrics.contains(r#"proxypal_webhook_deliveries_total{event="key.disabled",result="delivered"} 1"#),
            "{metrics}"
        );
        rig.server.shutdown().await;
    })
    .await;
}
