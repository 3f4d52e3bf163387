//! The usage ledger end to end: rows for plain and streaming requests with
//! the tokens the simulated upstream reported, `/usage` aggregates that
//! match them (every row for operators, its own for a client), CSV, the
//! SQLite file beside the state file, and a PostgreSQL of the test's own
//! stopped mid-run: requests still answered, records written when it returns.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use proxypal_server::config::{ClientEntry, Config, LedgerBackend, Secret};
use serde_json::{Value, json};

use crate::common::{Reply, Rig, bounded, send};
use crate::hardening_support::TempDir;

const ALICE: &str = "pp-alice-ledger-000000001";
const BOB: &str = "pp-bob-ledger-0000000002";
const OPERATOR: &str = "pp-operator-ledger-00003";
const MODEL: &str = "meta/llama-3.1-8b-instruct";

fn clients(config: &mut Config) {
    config.auth.tokens = vec![Secret::new(OPERATOR)];
    let client = |name: &str, token: &str| -> ClientEntry {
        yaml_serde::from_str(&format!("name: {name}\ntoken: {token}\n")).unwrap()
    };
    config.clients = vec![client("alice", ALICE), client("bob", BOB)];
}

fn chat(rig: &Rig, token: &str, stream: bool, include_usage: bool) -> Request<Full<Bytes>> {
    let mut body =
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello there"}], "stream": stream});
    if include_usage {
        body["stream_options"] = json!({"include_usage": true});
    }
    Request::builder()
        .method(Method::POST)
        .uri(rig.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// The `usage` a reply carries: its JSON's, or its stream's usage chunk.
fn reported(reply: &Reply) -> (u64, u64, u64) {
    let usage = if reply.text().starts_with("data:") {
        reply
            .text()
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|j| serde_json::from_str::<Value>(j).ok())
            .find_map(|v| v.get("usage").filter(|u| u.is_object()).cloned())
            .expect("a usage chunk")
    } else {
        reply.json()["usage"].clone()
    };
    let n = |f: &str| usage[f].as_u64().unwrap();
    (n("prompt_tokens"), n("completion_tokens"), n("total_tokens"))
}

async fn usage(rig: &Rig, token: &str, query: &str) -> Reply {
    rig.get(&format!("/usage?{query}"), &[("authorization", &format!("Bearer {token}"))]).await
}

/// Sends alice 2 plain and 1 streamed request, bob 1 plain; returns each
/// client's (requests, prompt, completion, total).
async fn traffic(rig: &Rig) -> [(u64, u64, u64, u64); 2] {
    let mut sums = [(0, 0, 0, 0); 2];
    for (who, token, stream) in [(0, ALICE, false), (0, ALICE, false), (0, ALICE, true), (1, BOB, false)] {
        let reply = send(&rig.http, chat(rig, token, stream, stream)).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let (p, c, t) = reported(&reply);
        let s = &mut sums[who];
        *s = (s.0 + 1, s.1 + p, s.2 + c, s.3 + t);
    }
    sums
}

/// The operator's `/usage` by client over the last day, retried until
/// `want` requests in all are there (the ledger writes in batches, once a
/// second).
async fn rows_by_client(rig: &Rig, want: u64) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = usage(rig, OPERATOR, "group_by=client&bucket=none").await;
        if reply.status == StatusCode::OK {
            let rows = reply.json()["rows"].as_array().unwrap().clone();
            if rows.iter().map(|r| r["requests"].as_u64().unwrap()).sum::<u64>() >= want {
                return rows;
            }
        }
        assert!(Instant::now() < deadline, "/usage never showed {want} requests: {}", reply.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn row<'a>(rows: &'a [Value], client: &str) -> &'a Value {
    rows.iter().find(|r| r["client"] == client).unwrap_or_else(|| panic!("no row for {client}: {rows:?}"))
}

fn check(rows: &[Value], client: &str, want: (u64, u64, u64, u64)) {
    let r = row(rows, client);
    let got = (
        r["requests"].as_u64().unwrap(),
        r["prompt_tokens"].as_u64().unwrap(),
        r["completion_tokens"].as_u64().unwrap(),
        r["total_tokens"].as_u64().unwrap(),
    );
    assert_eq!(got, want, "{client}: {r}");
    assert_eq!(r["errors"], 0, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_ledger_rows_carry_the_reported_tokens_and_usage_sums_them() {
    bounded(async {
        let dir = TempDir::new("ledger-sqlite");
        let state = dir.path("state.db");
        let rig = Rig::start(
            2,
            |s| s,
            |c| {
                clients(c);
                c.state.path = Some(state.clone());
            },
        )
        .await;
        let [alice, mut bob] = traffic(&rig).await;
        assert!(alice.3 > 0 && bob.3 > 0, "the simulator reports usage");
        // The client sent no Accept-Encoding, and none went upstream.
        let seen = rig.sim.stats().last_request_headers.unwrap();
        assert!(seen.get("accept-encoding").is_none(), "{seen:?}");
        // A client that accepts compression (as the OpenAI SDKs do) gets
        // `identity` upstream, so the answer's usage can be read.
        let mut gzip = chat(&rig, BOB, false, false);
        gzip.headers_mut().insert("accept-encoding", http::HeaderValue::from_static("gzip, deflate"));
        let reply = send(&rig.http, gzip).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let seen = rig.sim.stats().last_request_headers.unwrap();
        assert_eq!(seen["accept-encoding"], "identity", "{seen:?}");
        let (p, c, t) = reported(&reply);
        bob = (bob.0 + 1, bob.1 + p, bob.2 + c, bob.3 + t);
        let rows = rows_by_client(&rig, 5).await;
        check(&rows, "alice", alice);
        check(&rows, "bob", bob);

        // Alice sees only her own rows, whatever she asks for.
        let mine = usage(&rig, ALICE, "group_by=client,model,provider,key&bucket=hour").await;
        assert_eq!(mine.status, StatusCode::OK, "{}", mine.text());
        let mine = mine.json()["rows"].as_array().unwrap().clone();
        assert!(!mine.is_empty() && mine.iter().all(|r| r["client"] == "alice"), "{mine:?}");
        assert!(
            mine.iter().all(|r| r["model"] == MODEL && r["bucket"].as_str().unwrap().ends_with(":00:00Z"))
        );
        assert!(
            mine.iter().all(|r| r["key"].as_str().unwrap().starts_with("nvapi-…")),
            "keys by label: {mine:?}"
        );

        // CSV, and a bad parameter named.
        let csv = usage(&rig, OPERATOR, "group_by=client&bucket=day&format=csv").await;
        assert_eq!(csv.status, StatusCode::OK);
        assert!(csv.headers["content-type"].to_str().unwrap().starts_with("text/csv"));
        let text = csv.text();
        assert!(text.starts_with("bucket,client,model,provider,key,requests,errors,"), "{text}");
        assert!(text.contains(",alice,") && text.contains(",bob,"), "{text}");
        let bad = usage(&rig, OPERATOR, "group_by=region").await;
        assert_eq!(bad.status, StatusCode::BAD_REQUEST);
        assert!(bad.error_message().starts_with("group_by:"), "{}", bad.text());
        assert_eq!(rig.get("/usage", &[]).await.status, StatusCode::UNAUTHORIZED);

        let stats = rig.get("/stats", &[("authorization", &format!("Bearer {OPERATOR}"))]).await.json();
        assert_eq!(stats["ledger"]["backend"], "sqlite", "{stats}");
        assert_eq!(stats["ledger"]["dropped"], 0);
        rig.server.shutdown().await;

        // The rows are in the file beside the state file; no key or token is.
        let file = dir.path("state-ledger.db");
        let bytes = std::fs::read(&file).unwrap();
        for secret in rig.keys.iter().map(String::as_str).chain([ALICE, BOB, OPERATOR]) {
            let needle = &secret.as_bytes()[secret.len() - 10..];
            assert!(!bytes.windows(needle.len()).any(|w| w == needle), "a secret is in the ledger");
        }
        let db = rusqlite::Connection::open(&file).unwrap();
        let streamed: i64 = db
            .query_row(
                "SELECT COUNT(*) FROM proxypal_ledger WHERE stream = 1 AND total_tokens > 0",
                [],
                |r| r.get(0),
            )
            .unwrap_or_else(|e| panic!("ledger table: {e}"));
        assert_eq!(streamed, 1, "the streamed request's row carries its tokens");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_ledger_buffers_while_the_database_is_down_and_writes_when_it_returns() {
    bounded(async {
        let Some(mut pg) = proxypal_ledger::testing::Postgres::new("postgres_ledger_buffers") else { return };
        let url = pg.url();
        let rig = Rig::start(
            2,
            |s| s,
            |c| {
                clients(c);
                c.ledger.backend = LedgerBackend::Postgres;
                c.ledger.url = Some(Secret::new(url.clone()));
            },
        )
        .await;
        let [alice, bob] = traffic(&rig).await;
        check(&rows_by_client(&rig, 4).await, "alice", alice);

        pg.stop();
        for _ in 0..5 {
            let reply = send(&rig.http, chat(&rig, BOB, false, false)).await;
            assert_eq!(reply.status, StatusCode::OK, "requests flow while the ledger's database is down");
        }
        let operator = [("authorization", format!("Bearer {OPERATOR}"))];
        let operator: Vec<(&str, &str)> = operator.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = rig.get("/stats", &operator).await.json();
            if stats["ledger"]["up"] == false && stats["ledger"]["pending"].as_u64().unwrap() >= 5 {
                break;
            }
            assert!(Instant::now() < deadline, "the outage never showed: {}", stats["ledger"]);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let down = usage(&rig, OPERATOR, "group_by=client").await;
        assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE, "{}", down.text());
        assert_eq!(down.error_code(), "ledger_unavailable");
        let metrics = rig.get("/metrics", &operator).await.text();
        assert!(metrics.contains("proxypal_ledger_up 0"), "{metrics}");

        pg.start();
        let rows = rows_by_client(&rig, 9).await;
        check(&rows, "alice", alice);
        assert_eq!(row(&rows, "bob")["requests"], bob.0 + 5, "the buffered records were written: {rows:?}");
        let stats = rig.get("/stats", &operator).await.json();
        assert_eq!(
            (stats["ledger"]["up"].as_bool(), stats["ledger"]["dropped"].as_u64()),
            (Some(true), Some(0))
        );
        rig.server.shutdown().await;
    })
    .await;
}

/// With `stream_usage` on, a stream whose client did not ask for usage is
/// recorded with its tokens (ProxyPal asked the upstream) and the client's
/// stream carries no usage chunk; off, nothing is asked and none recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_recorded_with_the_tokens_proxypal_asked_for_and_the_client_never_sees_them() {
    bounded(async {
        for asks in [true, false] {
            let dir = TempDir::new("ledger-stream-usage");
            let rig = Rig::start(
                1,
                |s| s,
                |c| {
                    clients(c);
                    c.state.path = Some(dir.path("state.db"));
                    c.upstream.stream_usage = asks;
                },
            )
            .await;
            let reply = send(&rig.http, chat(&rig, ALICE, true, false)).await;
            assert_eq!(reply.status, StatusCode::OK);
            let text = reply.text();
            assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
            assert!(!text.contains("\"usage\":{"), "the client did not ask for usage: {text}");
            let rows = rows_by_client(&rig, 1).await;
            let alice = row(&rows, "alice");
            if asks {
                assert!(alice["total_tokens"].as_u64().unwrap() > 0, "{alice}");
                assert_eq!(
                    alice["total_tokens"],
                    alice["prompt_tokens"].as_u64().unwrap() + alice["completion_tokens"].as_u64().unwrap()
                );
            } else {
                assert_eq!(alice["total_tokens"], 0, "not asked, none reported: {alice}");
            }
            rig.server.shutdown().await;
        }
    })
    .await;
}
