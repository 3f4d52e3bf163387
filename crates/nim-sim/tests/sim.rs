//! Integration tests of the simulated NIM server over real loopback sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use proxypal_nim_sim::{
    FORBIDDEN_BODY, Fault, FaultTarget, RATE_LIMITED_BODY, SimConfig, SimHandle, SimRateLimit, SimServer,
    UNAUTHORIZED_BODY, generate_test_keys, mask_key,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Every test body runs under this bound.
async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(15), f).await.expect("test timed out");
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(
    c: &HttpClient,
    sim: &SimHandle,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    let mut b = Request::builder().method(method).uri(sim.url(path));
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    let body = match body {
        Some(v) => {
            b = b.header("content-type", "application/json");
            Bytes::from(v.to_string())
        }
        None => Bytes::new(),
    };
    c.request(b.body(Full::new(body)).unwrap()).await
}

async fn read_all(resp: Response<Incoming>) -> (StatusCode, HeaderMap, String) {
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8(body.to_vec()).unwrap())
}

/// Sends a request and reads the whole response.
async fn call(
    c: &HttpClient,
    sim: &SimHandle,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (StatusCode, HeaderMap, String) {
    read_all(send(c, sim, method, path, key, body).await.unwrap()).await
}

fn chat_body(stream: bool) -> Value {
    json!({
        "model": "meta/llama-3.1-8b-instruct",
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": stream,
    })
}

/// POSTs a chat completion (streaming or not) with `key` and returns the response head.
async fn post_chat(
    c: &HttpClient,
    sim: &SimHandle,
    key: &str,
    stream: bool,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error> {
    send(c, sim, Method::POST, "/v1/chat/completions", Some(key), Some(chat_body(stream))).await
}

async fn chat(c: &HttpClient, sim: &SimHandle, key: &str) -> (StatusCode, HeaderMap, String) {
    call(c, sim, Method::POST, "/v1/chat/completions", Some(key), Some(chat_body(false))).await
}

fn content_type(h: &HeaderMap) -> Option<&str> {
    h.get("content-type").and_then(|v| v.to_str().ok())
}

/// Reads SSE events as they arrive: (arrival time, event data). Stops at the
/// end of the body, on a body error (returned as `Err`), or after `max`
/// events.
async fn read_events(body: &mut Incoming, max: usize) -> (Vec<(Instant, String)>, Result<(), hyper::Error>) {
    let mut events = Vec::new();
    let mut buf = String::new();
    while events.len() < max {
        match body.frame().await {
            None => return (events, Ok(())),
            Some(Err(e)) => return (events, Err(e)),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else { continue };
                buf.push_str(std::str::from_utf8(&data).unwrap());
                let now = Instant::now();
                while let Some(i) = buf.find("\n\n") {
                    let ev: String = buf.drain(..i + 2).collect();
                    let data = ev.trim_end().strip_prefix("data: ").unwrap().to_owned();
                    events.push((now, data));
                }
            }
        }
    }
    (events, Ok(()))
}

async fn raw_exchange(addr: SocketAddr, request: &str) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    // A reset is as good as a close here; only the bytes before it matter.
    let _ = s.read_to_end(&mut out).await;
    out
}

fn raw_chat_request(key: &str) -> String {
    raw_chat_request_with(key, false)
}

fn raw_chat_request_with(key: &str, stream: bool) -> String {
    let body = chat_body(stream).to_string();
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: localhost\r\nauthorization: Bearer {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn models_list() {
    bounded(async {
        let sim = SimServer::start(SimConfig::default()).unwrap();
        assert!(sim.base_url().starts_with("http://127.0.0.1:"));
        assert!(sim.base_url().ends_with("/v1"));
        let c = client();
        let (status, h, body) = call(&c, &sim, Method::GET, "/v1/models", Some("k-anything"), None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type(&h), Some("application/json"));
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["object"], "list");
        let ids: Vec<&str> =
            v["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert!(ids.contains(&"meta/llama-3.1-8b-instruct"));
        assert!(ids.contains(&"nvidia/nv-embedqa-e5-v5"));
        for m in v["data"].as_array().unwrap() {
            assert_eq!(m["object"], "model");
            assert!(m["created"].is_u64());
            assert!(m["owned_by"].is_string());
        }
        // Unauthenticated listing is a 401, as upstream.
        let (status, _, body) = call(&c, &sim, Method::GET, "/v1/models", None, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body, UNAUTHORIZED_BODY);
    })
    .await;
}

#[tokio::test]
async fn chat_plain_shows_only_the_masked_key() {
    bounded(async {
        let keys = generate_test_keys(2);
        let sim = SimServer::start(SimConfig::default().with_keys(keys.clone())).unwrap();
        let c = client();
        let mut contents = Vec::new();
        for key in &keys {
            let (status, h, body) = chat(&c, &sim, key).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(content_type(&h), Some("application/json"));
            assert!(!body.contains(key.as_str()), "full key leaked");
            let v: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(v["object"], "chat.completion");
            assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
            assert_eq!(v["model"], "meta/llama-3.1-8b-instruct");
            assert_eq!(v["choices"][0]["message"]["role"], "assistant");
            assert_eq!(v["choices"][0]["finish_reason"], "stop");
            let content = v["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
            assert!(content.contains(&mask_key(key)), "{content}");
            let u = &v["usage"];
            assert_eq!(
                u["total_tokens"].as_u64().unwrap(),
                u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
            );
            contents.push(content);
        }
        assert_ne!(contents[0], contents[1]);
        let stats = sim.stats();
        assert_eq!(stats.total_requests, 2);
        for key in &keys {
            assert_eq!(stats.key(key).requests, 1);
            assert_eq!(stats.key(key).ok, 1);
        }
        let last = stats.last_request_headers.unwrap();
        assert_eq!(last["authorization"], format!("Bearer {}", keys[1]));
    })
    .await;
}

#[tokio::test]
async fn chat_stream_events_are_spaced_and_end_with_done() {
    bounded(async {
        let interval = Duration::from_millis(60);
        let cfg =
            SimConfig::default().with_stream(4, interval).with_first_chunk_delay(Duration::from_millis(30));
        let sim = SimServer::start(cfg).unwrap();
        let c = client();
        let key = "nvapi-sim-streamkey-0001";
        let mut body = chat_body(true);
        body["stream_options"] = json!({"include_usage": true});
        let sent = Instant::now();
        let resp = send(&c, &sim, Method::POST, "/v1/chat/completions", Some(key), Some(body)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(content_type(resp.headers()), Some("text/event-stream"));
        assert_eq!(sim.active_streams(), 1);
        let mut body = resp.into_body();
        let (events, end) = read_events(&mut body, 100).await;
        end.unwrap();
        // 4 content chunks + stop chunk + usage chunk + [DONE].
        assert_eq!(events.len(), 7, "{events:?}");
        // Never earlier than scheduled (cumulative bound)…
        let first = Duration::from_millis(30);
        for (i, (at, _)) in events[..4].iter().enumerate() {
            let due = first + interval * i as u32;
            assert!(*at - sent >= due, "event {i} after {:?}", *at - sent);
        }
        // …and really spread out, not buffered until the end.
        let spread = events[3].0 - events[0].0;
        assert!(spread >= interval * 2, "spread {spread:?}");
        let parsed: Vec<Value> = events[..6].iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
        let mut content = String::new();
        for (i, v) in parsed[..4].iter().enumerate() {
            assert_eq!(v["object"], "chat.completion.chunk");
            assert_eq!(v["model"], "meta/llama-3.1-8b-instruct");
            assert!(v["choices"][0]["finish_reason"].is_null());
            if i == 0 {
                assert_eq!(v["choices"][0]["delta"]["role"], "assistant");
            }
            content.push_str(v["choices"][0]["delta"]["content"].as_str().unwrap());
        }
        assert!(content.contains(&mask_key(key)), "{content}");
        assert!(!content.contains(key));
        assert_eq!(parsed[4]["choices"][0]["finish_reason"], "stop");
        assert_eq!(parsed[5]["choices"], json!([]));
        assert_eq!(parsed[5]["usage"]["completion_tokens"], 4);
        assert_eq!(events[6].1, "[DONE]");
        drop(body);
        assert!(sim.wait_for(Duration::from_secs(1), |s| s.active_streams == 0).await);
        assert_eq!(sim.key_stats(key).ok, 1);
    })
    .await;
}

#[tokio::test]
async fn stream_without_usage_has_no_usage_chunk() {
    bounded(async {
        let sim = SimServer::start(SimConfig::fast().with_stream(3, Duration::ZERO)).unwrap();
        let c = client();
        let resp = post_chat(&c, &sim, "any-key-1234", true).await.unwrap();
        let (_, _, body) = read_all(resp).await;
        let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 5, "{body}");
        assert!(events.iter().all(|e| e.starts_with("data: ")));
        assert_eq!(events[4], "data: [DONE]");
        assert!(!body.contains("\"usage\""));
    })
    .await;
}

#[tokio::test]
async fn auth_errors_have_nvidia_shapes() {
    bounded(async {
        let cfg = SimConfig::default().with_keys(["good-key-0001"]).with_forbidden_keys(["forbidden-key-01"]);
        let sim = SimServer::start(cfg).unwrap();
        let c = client();
        let post = |key: Option<&'static str>| {
            let c = c.clone();
            let sim = &sim;
            let path = "/v1/chat/completions";
            async move { call(&c, sim, Method::POST, path, key, Some(chat_body(false))).await }
        };
        let (status, h, body) = post(None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body, UNAUTHORIZED_BODY);
        assert_eq!(content_type(&h), Some("application/json"));
        let (status, _, body) = post(Some("unknown-key-01")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body, r#"{"status":401,"title":"Unauthorized","detail":"Authentication failed"}"#);
        let (status, h, body) = post(Some("forbidden-key-01")).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body, FORBIDDEN_BODY);
        assert_eq!(body, r#"{"status":403,"title":"Forbidden","detail":"Authorization failed"}"#);
        assert_eq!(content_type(&h), Some("application/json"));
        let (status, _, _) = post(Some("good-key-0001")).await;
        assert_eq!(status, StatusCode::OK);
        let stats = sim.stats();
        assert_eq!(stats.total_requests, 4);
        assert_eq!(stats.key("unknown-key-01").unauthorized, 1);
        assert_eq!(stats.key("forbidden-key-01").unauthorized, 1);
        assert_eq!(stats.key("good-key-0001").ok, 1);
    })
    .await;
}

#[tokio::test]
async fn token_bucket_429_is_bare() {
    bounded(async {
        let cfg = SimConfig::default().with_rate_limit(SimRateLimit::TokenBucket { per_minute: 1, burst: 3 });
        let sim = SimServer::start(cfg).unwrap();
        let c = client();
        for _ in 0..3 {
            assert_eq!(chat(&c, &sim, "bucket-key-a").await.0, StatusCode::OK);
        }
        let (status, h, body) = chat(&c, &sim, "bucket-key-a").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(body, r#"{"status":429,"title":"Too Many Requests"}"#);
        assert_eq!(body, RATE_LIMITED_BODY);
        assert_eq!(content_type(&h), Some("application/json"));
        assert!(h.get("retry-after").is_none());
        assert!(!h.keys().any(|k| k.as_str().starts_with("x-ratelimit")));
        // Another key has its own bucket; model listing is not limited.
        assert_eq!(chat(&c, &sim, "bucket-key-b").await.0, StatusCode::OK);
        assert_eq!(
            call(&c, &sim, Method::GET, "/v1/models", Some("bucket-key-a"), None).await.0,
            StatusCode::OK
        );
        let a = sim.key_stats("bucket-key-a");
        assert_eq!((a.requests, a.ok, a.rate_limited), (5, 4, 1));

        // Retry-After only when configured (whole seconds, rounded up).
        let cfg = SimConfig::default()
            .with_rate_limit(SimRateLimit::TokenBucket { per_minute: 1, burst: 1 })
            .with_retry_after(Duration::from_millis(2500));
        let sim = SimServer::start(cfg).unwrap();
        assert_eq!(chat(&c, &sim, "bucket-key-c").await.0, StatusCode::OK);
        let (status, h, body) = chat(&c, &sim, "bucket-key-c").await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(body, RATE_LIMITED_BODY);
        assert_eq!(h["retry-after"], "3");
    })
    .await;
}

#[tokio::test]
async fn token_bucket_refills_continuously() {
    bounded(async {
        // 120/min = one token every 500 ms.
        let cfg =
            SimConfig::default().with_rate_limit(SimRateLimit::TokenBucket { per_minute: 120, burst: 1 });
        let sim = SimServer::start(cfg).unwrap();
        let c = client();
        assert_eq!(chat(&c, &sim, "refill-key-01").await.0, StatusCode::OK);
        assert_eq!(chat(&c, &sim, "refill-key-01").await.0, StatusCode::TOO_MANY_REQUESTS);
        tokio::time::sleep(Duration::from_millis(520)).await;
        assert_eq!(chat(&c, &sim, "refill-key-01").await.0, StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn rolling_window_limit_is_exact() {
    bounded(async {
        let window = Duration::from_millis(250);
        let cfg = SimConfig::default().with_rate_limit(SimRateLimit::RollingWindow { limit: 4, window });
        let sim = SimServer::start(cfg).unwrap();
        let c = client();
        let key = "window-key-0001";
        // Burst: exactly `limit` pass at once.
        let mut statuses = Vec::new();
        for _ in 0..6 {
            statuses.push(chat(&c, &sim, key).await.0);
        }
        let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
        assert_eq!(ok, 4, "{statuses:?}");
        assert_eq!(statuses[4], StatusCode::TOO_MANY_REQUESTS);
        // Then hammer for a while: never more than 4 in any window, and the
        // budget keeps coming back.
        let start = Instant::now();
        let (mut ok, mut limited) = (4u64, 2u64);
        while start.elapsed() < Duration::from_millis(800) {
            match chat(&c, &sim, key).await.0 {
                StatusCode::OK => ok += 1,
                StatusCode::TOO_MANY_REQUESTS => limited += 1,
                other => panic!("unexpected {other}"),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(sim.max_in_any_window(key, window), 4);
        assert!(ok >= 12, "only {ok} accepted");
        let stats = sim.stats();
        assert_eq!(stats.key(key).ok, ok);
        assert_eq!(stats.key(key).rate_limited, limited);
        assert_eq!(stats.accept_log[key].len() as u64, ok);
        assert_eq!(stats.max_in_any_window(key, window), 4);
        // A longer window sees proportionally more.
        assert!(stats.max_in_any_window(key, window * 2) >= 5);
    })
    .await;
}

#[tokio::test]
async fn status_faults_are_fifo_and_targeted() {
    bounded(async {
        let sim = SimServer::start(SimConfig::default()).unwrap();
        let c = client();
        let (a, b) = ("fault-key-aaaa", "fault-key-bbbb");
        sim.push_fault(Fault::worker_limit(), FaultTarget::Key(a.to_owned()));
        sim.push_fault(Fault::problem(500, "Internal Server Error", "boom"), FaultTarget::Any);
        sim.push_fault(Fault::degraded(), FaultTarget::Any);
        assert_eq!(sim.pending_faults(), 3);

        // `b` skips the key-targeted fault and takes the first `Any` one.
        let (status, h, body) = chat(&c, &sim, b).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(content_type(&h), Some("application/json"));
        assert_eq!(body, r#"{"status":500,"title":"Internal Server Error","detail":"boom"}"#);
        let (status, _, body) = chat(&c, &sim, a).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], 503);
        assert_eq!(v["title"], "Service Unavailable");
        assert!(v["detail"].as_str().unwrap().starts_with("Worker local total request limit reached ("));
        let (status, _, body) = chat(&c, &sim, a).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert!(v["detail"].as_str().unwrap().contains("DEGRADED function cannot be invoked"));
        assert_eq!(sim.pending_faults(), 0);
        assert_eq!(chat(&c, &sim, a).await.0, StatusCode::OK);

        sim.push_fault(Fault::end_of_life("meta/llama-3.1-8b-instruct"), FaultTarget::Any);
        let (status, h, body) = chat(&c, &sim, a).await;
        assert_eq!(status, StatusCode::GONE);
        assert!(content_type(&h).unwrap().starts_with("text/plain"));
        assert_eq!(
            body,
            "The model 'meta/llama-3.1-8b-instruct' has reached its end of life on 2026-09-03T08:00:00Z"
        );

        sim.push_fault(Fault::empty(502), FaultTarget::Any);
        let (status, h, body) = chat(&c, &sim, a).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(body.is_empty());
        assert!(h.get("content-type").is_none());

        sim.push_fault(Fault::rate_limited(), FaultTarget::Any);
        let (status, h, body) = chat(&c, &sim, a).await;
        assert_eq!((status, body.as_str()), (StatusCode::TOO_MANY_REQUESTS, RATE_LIMITED_BODY));
        assert!(h.get("retry-after").is_none());

        sim.push_fault(Fault::unauthorized(), FaultTarget::Any);
        assert_eq!(chat(&c, &sim, a).await.2, UNAUTHORIZED_BODY);
        sim.push_fault(
            Fault::plain_text(503, "upstream overloaded").with_header("retry-after", "7"),
            FaultTarget::Any,
        );
        let (status, h, body) = chat(&c, &sim, a).await;
        assert_eq!((status, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "upstream overloaded"));
        assert_eq!(h["retry-after"], "7");

        let stats = sim.stats();
        assert_eq!(stats.key(a).faults, 7);
        assert_eq!(stats.key(b).faults, 1);
        assert_eq!(stats.key(a).ok, 1);
    })
    .await;
}

#[tokio::test]
async fn sticky_fault_applies_until_cleared() {
    bounded(async {
        let sim = SimServer::start(SimConfig::default()).unwrap();
        let c = client();
        sim.set_fault_always(Some(Fault::status(503, r#"{"status":503,"title":"Service Unavailable"}"#)));
        // A queued fault still wins over the sticky one.
        sim.push_fault(Fault::empty(500), FaultTarget::Any);
        assert_eq!(chat(&c, &sim, "sticky-key-01").await.0, StatusCode::INTERNAL_SERVER_ERROR);
        for _ in 0..3 {
            assert_eq!(chat(&c, &sim, "sticky-key-01").await.0, StatusCode::SERVICE_UNAVAILABLE);
        }
        sim.set_fault_always(None);
        assert_eq!(chat(&c, &sim, "sticky-key-01").await.0, StatusCode::OK);
        sim.set_fault_always(Some(Fault::empty(500)));
        sim.push_fault(Fault::empty(502), FaultTarget::Any);
        sim.clear_faults();
        assert_eq!(chat(&c, &sim, "sticky-key-01").await.0, StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn delay_fault_and_response_delay() {
    bounded(async {
        let sim = SimServer::start(SimConfig::default()).unwrap();
        let c = client();
        sim.push_fault(Fault::Delay(Duration::from_millis(200)), FaultTarget::Any);
        let t = Instant::now();
        assert_eq!(chat(&c, &sim, "delay-key-0001").await.0, StatusCode::OK);
        assert!(t.elapsed() >= Duration::from_millis(200));
        assert_eq!(sim.pending_faults(), 0);
        assert_eq!(sim.key_stats("delay-key-0001").faults, 1);
        assert_eq!(sim.key_stats("delay-key-0001").ok, 1);

        let sim =
            SimServer::start(SimConfig::default().with_response_delay(Duration::from_millis(100))).unwrap();
        let t = Instant::now();
        assert_eq!(chat(&c, &sim, "delay-key-0001").await.0, StatusCode::OK);
        assert!(t.elapsed() >= Duration::from_millis(100));
    })
    .await;
}

#[tokio::test]
async fn drop_connection_fault_closes_without_response() {
    bounded(async {
        let sim = SimServer::start(SimConfig::default()).unwrap();
        sim.push_fault(Fault::DropConnection, FaultTarget::Any);
        let out = raw_exchange(sim.addr(), &raw_chat_request("drop-key-00001")).await;
        assert!(out.is_empty(), "got {:?}", String::from_utf8_lossy(&out));

        // Through an HTTP client: an error, not a response.
        let c = client();
        sim.push_fault(Fault::DropConnection, FaultTarget::Any);
        let res = post_chat(&c, &sim, "drop-key-00001", false).await;
        assert!(res.is_err(), "expected a connection error");
        assert_eq!(chat(&c, &sim, "drop-key-00001").await.0, StatusCode::OK);
        assert_eq!(sim.key_stats("drop-key-00001").faults, 2);
    })
    .await;
}

#[tokio::test]
async fn garbage_fault_writes_non_http_bytes() {
    bounded(async {
        let sim = SimServer::start(SimConfig::default()).unwrap();
        sim.push_fault(Fault::Garbage, FaultTarget::Key("garbage-key-001".into()));
        let out = raw_exchange(sim.addr(), &raw_chat_request("garbage-key-001")).await;
        assert_eq!(out, b"this is not http\r\n\r\n");
        let c = client();
        sim.push_fault(Fault::Garbage, FaultTarget::Any);
        assert!(send(&c, &sim, Method::GET, "/v1/models", Some("garbage-key-001"), None).await.is_err());
        // A normal request on a raw socket still gets HTTP.
        let out = raw_exchange(
            sim.addr(),
            &raw_chat_request("garbage-key-001").replace("HTTP/1.1\r\n", "HTTP/1.1\r\nconnection: close\r\n"),
        )
        .await;
        assert!(out.starts_with(b"HTTP/1.1 200 OK\r\n"), "{}", String::from_utf8_lossy(&out));
    })
    .await;
}

#[tokio::test]
async fn stalled_stream_is_released_when_the_client_drops_it() {
    bounded(async {
        let sim = SimServer::start(SimConfig::default().with_stream(8, Duration::from_millis(10))).unwrap();
        let c = client();
        sim.push_fault(Fault::StallMidStream { after_chunks: 2 }, FaultTarget::Any);
        let resp = post_chat(&c, &sim, "stall-key-0001", true).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(content_type(resp.headers()), Some("text/event-stream"));
        let mut body = resp.into_body();
        let (events, end) = read_events(&mut body, 2).await;
        end.unwrap();
        assert_eq!(events.len(), 2);
        // Then silence.
        assert!(tokio::time::timeout(Duration::from_millis(200), body.frame()).await.is_err());
        assert_eq!(sim.active_streams(), 1);
        assert_eq!(sim.open_connections(), 1);
        drop(body);
        let t = Instant::now();
        assert!(sim.wait_for(Duration::from_secs(1), |s| s.active_streams == 0).await, "stream not released");
        assert!(t.elapsed() < Duration::from_secs(1));
        assert!(sim.wait_for(Duration::from_secs(1), |s| s.open_connections == 0).await);
    })
    .await;
}

#[tokio::test]
async fn active_streams_drop_when_a_normal_stream_is_abandoned() {
    bounded(async {
        let sim = SimServer::start(SimConfig::default().with_stream(100, Duration::from_millis(50))).unwrap();
        let c = client();
        let resp = post_chat(&c, &sim, "abandon-key-01", true).await.unwrap();
        let mut body = resp.into_body();
        let (events, _) = read_events(&mut body, 1).await;
        assert_eq!(events.len(), 1);
        assert_eq!(sim.active_streams(), 1);
        drop(body);
        assert!(sim.wait_for(Duration::from_secs(1), |s| s.active_streams == 0).await);
    })
    .await;
}

#[tokio::test]
async fn broken_stream_ends_abruptly() {
    bounded(async {
        let sim = SimServer::start(SimConfig::default().with_stream(8, Duration::from_millis(5))).unwrap();
        let c = client();
        sim.push_fault(Fault::BreakMidStream { after_chunks: 3 }, FaultTarget::Any);
        let resp = post_chat(&c, &sim, "break-key-0001", true).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let (events, end) = read_events(&mut body, 100).await;
        assert!(end.is_err(), "body ended cleanly");
        assert_eq!(events.len(), 3);
        assert!(events.iter().all(|(_, d)| d != "[DONE]"));
        assert!(sim.wait_for(Duration::from_secs(1), |s| s.active_streams == 0).await);

        // On the wire: no chunked terminator.
        sim.push_fault(Fault::BreakMidStream { after_chunks: 1 }, FaultTarget::Any);
        let req = raw_chat_request_with("break-key-0001", true);
        let out = String::from_utf8(raw_exchange(sim.addr(), &req).await).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("transfer-encoding: chunked"), "{out}");
        assert!(!out.ends_with("0\r\n\r\n"), "{out}");
        assert!(!out.contains("[DONE]"));
    })
    .await;
}

#[tokio::test]
async fn bad_requests_and_routing() {
    bounded(async {
        let sim = SimServer::start(SimConfig::default()).unwrap();
        let c = client();
        let k = Some("routing-key-01");
        let problem = |body: &str| -> Value { serde_json::from_str(body).unwrap() };

        let req = Request::post(sim.url("/v1/chat/completions"))
            .header("authorization", "Bearer routing-key-01")
            .body(Full::new(Bytes::from_static(b"{not json")))
            .unwrap();
        let (status, h, body) = read_all(c.request(req).await.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(content_type(&h), Some("application/json"));
        let v = problem(&body);
        assert_eq!((v["status"].as_u64(), v["title"].as_str()), (Some(400), Some("Bad Request")));
        assert!(v["detail"].as_str().unwrap().contains("invalid JSON"));

        let (status, _, body) = call(&c, &sim, Method::POST, "/v1/chat/completions", k, None).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(problem(&body)["title"], "Bad Request");
        let (status, _, _) =
            call(&c, &sim, Method::POST, "/v1/chat/completions", k, Some(json!({"messages": []}))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        let (status, h, body) = call(&c, &sim, Method::GET, "/v1/chat/completions", k, None).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(h["allow"], "POST");
        assert_eq!(problem(&body)["status"], 405);
        let (status, _, body) = call(&c, &sim, Method::POST, "/v1/models", k, None).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(problem(&body)["title"], "Method Not Allowed");

        let (status, _, body) = call(&c, &sim, Method::POST, "/v1/nope", k, Some(json!({}))).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(problem(&body)["status"], 404);
        assert_eq!(problem(&body)["title"], "Not Found");

        // Strict models: an unknown model is NVIDIA's per-account 404.
        let sim = SimServer::start(SimConfig { strict_models: true, ..SimConfig::default() }).unwrap();
        let (status, _, body) = call(
            &c,
            &sim,
            Method::POST,
            "/v1/chat/completions",
            k,
            Some(json!({"model": "x/y", "messages": []})),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(problem(&body)["detail"].as_str().unwrap().contains("Not found for account"));
    })
    .await;
}

#[tokio::test]
async fn embeddings() {
    bounded(async {
        let sim = SimServer::start(SimConfig::default()).unwrap();
        let c = client();
        let k = Some("embed-key-0001");
        let body = json!({"model": "nvidia/nv-embedqa-e5-v5", "input": "hello", "input_type": "query"});
        let (status, _, body) = call(&c, &sim, Method::POST, "/v1/embeddings", k, Some(body)).await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "nvidia/nv-embedqa-e5-v5");
        assert_eq!(v["data"].as_array().unwrap().len(), 1);
        assert_eq!(v["data"][0]["object"], "embedding");
        let vec = v["data"][0]["embedding"].as_array().unwrap();
        assert!(!vec.is_empty() && vec.iter().all(Value::is_f64));
        assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() >= 1);

        let body = json!({"model": "nvidia/nv-embedqa-e5-v5", "input": ["a", "b", "c"]});
        let (status, _, body) = call(&c, &sim, Method::POST, "/v1/embeddings", k, Some(body)).await;
        assert_eq!(status, StatusCode::OK);
        let v: Value = serde_json::from_str(&body).unwrap();
        let data = v["data"].as_array().unwrap();
        assert_eq!(data.len(), 3);
        for (i, d) in data.iter().enumerate() {
            assert_eq!(d["index"], i);
        }
        assert_ne!(data[0]["embedding"], data[1]["embedding"]);

        let (status, _, _) =
            call(&c, &sim, Method::POST, "/v1/embeddings", k, Some(json!({"model": "m"}))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(sim.key_stats("embed-key-0001").ok, 2);
    })
    .await;
}

#[tokio::test]
async fn http2_prior_knowledge_works() {
    bounded(async {
        let sim = SimServer::start(SimConfig::default().with_stream(2, Duration::from_millis(5))).unwrap();
        let c: HttpClient = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
        let resp = send(&c, &sim, Method::GET, "/v1/models", Some("h2-key-000001"), None).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        assert_eq!(resp.status(), StatusCode::OK);
        let resp = post_chat(&c, &sim, "h2-key-000001", true).await.unwrap();
        let (_, _, body) = read_all(resp).await;
        assert!(body.ends_with("data: [DONE]\n\n"));
    })
    .await;
}

#[tokio::test]
async fn fast_mode_accepts_any_key_and_records_nothing_heavy() {
    bounded(async {
        let sim = SimServer::start(SimConfig::fast()).unwrap();
        let c = client();
        for i in 0..50 {
            let key = format!("fast-key-{i:04}");
            assert_eq!(chat(&c, &sim, &key).await.0, StatusCode::OK);
        }
        let stats = sim.stats();
        assert_eq!(stats.total_requests, 50);
        assert_eq!(stats.total_ok(), 50);
        assert!(stats.accept_log.is_empty());
        assert!(stats.last_request_headers.is_none());
        sim.reset_stats();
        assert_eq!(sim.stats().total_requests, 0);
    })
    .await;
}

#[tokio::test]
async fn shutdown_closes_listener_and_connections() {
    bounded(async {
        let sim = SimServer::start(SimConfig::default().with_stream(100, Duration::from_millis(50))).unwrap();
        let addr = sim.addr();
        let c = client();
        let resp = post_chat(&c, &sim, "shutdown-key-1", true).await.unwrap();
        assert_eq!(sim.open_connections(), 1);
        sim.shutdown().await;
        // The in-flight stream is cut, and nobody listens any more.
        let mut body = resp.into_body();
        let (_, end) = read_events(&mut body, 1000).await;
        assert!(end.is_err());
        assert!(TcpStream::connect(addr).await.is_err());

        // Dropping the handle does the same, without waiting.
        let sim = SimServer::start(SimConfig::default()).unwrap();
        let addr = sim.addr();
        drop(sim);
        let mut refused = false;
        for _ in 0..100 {
            if TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(refused);
    })
    .await;
}

#[test]
fn start_outside_a_runtime_is_an_error() {
    let err = SimServer::start(SimConfig::default()).unwrap_err();
    assert!(matches!(err, proxypal_nim_sim::SimError::NoRuntime));
}

/// The `prompt_tokens` the simulator reports for a request body.
fn prompt_tokens_of(body: &Value) -> u64 {
    body.to_string().len() as u64 / 4
}

/// Milliseconds of a Go-style duration as written in `x-ratelimit-reset-*`
/// (`185ms`, `7.66s`, `1m26.4s`, `1h0m0s`).
fn go_ms(s: &str) -> u64 {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().unwrap();
    }
    let mut rest = s;
    let mut total = 0.0;
    for (unit, scale) in [('h', 3_600_000.0), ('m', 60_000.0), ('s', 1000.0)] {
        if let Some((n, r)) = rest.split_once(unit) {
            total += n.parse::<f64>().unwrap() * scale;
            rest = r;
        }
    }
    assert!(rest.is_empty(), "bad duration {s:?}");
    total.round() as u64
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> &'a str {
    h.get(name).unwrap_or_else(|| panic!("no {name} in {h:?}")).to_str().unwrap()
}

fn usage_of(body: &str) -> (u64, u64, u64) {
    let v: Value = serde_json::from_str(body).unwrap();
    let u = &v["usage"];
    (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
        u["total_tokens"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn usage_is_reported_and_completion_tokens_can_be_fixed() {
    bounded(async {
        let c = client();
        let key = "usage-key-00001";
        // Default: completion tokens are the answer's words; no limit headers.
        let sim = SimServer::start(SimConfig::default()).unwrap();
        let (status, h, body) = chat(&c, &sim, key).await;
        assert_eq!(status, StatusCode::OK);
        assert!(!h.keys().any(|k| k.as_str().starts_with("x-ratelimit")));
        let v: Value = serde_json::from_str(&body).unwrap();
        let words = v["choices"][0]["message"]["content"].as_str().unwrap().split_whitespace().count() as u64;
        let (p, comp, total) = usage_of(&body);
        assert_eq!((p, comp, total), (prompt_tokens_of(&chat_body(false)), words, p + words));
        assert_eq!(sim.account_stats(key).tokens, total);

        let sim = SimServer::start(
            SimConfig::default().with_completion_tokens(42).with_stream(3, Duration::from_millis(1)),
        )
        .unwrap();
        let (_, _, body) = chat(&c, &sim, key).await;
        let p = prompt_tokens_of(&chat_body(false));
        assert_eq!(usage_of(&body), (p, 42, p + 42));

        // Streams: usage in the last chunk before [DONE] when asked for.
        let mut req = chat_body(true);
        req["stream_options"] = json!({"include_usage": true});
        let resp =
            send(&c, &sim, Method::POST, "/v1/chat/completions", Some(key), Some(req.clone())).await.unwrap();
        let (_, _, body) = read_all(resp).await;
        let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.len(), 6, "{body}");
        assert_eq!(events[5], "data: [DONE]");
        let ps = prompt_tokens_of(&req);
        assert_eq!(usage_of(events[4].strip_prefix("data: ").unwrap()), (ps, 42, ps + 42));
        assert!(!events[..4].iter().any(|e| e.contains("\"usage\"")));
        // Both answers were charged to the key's account.
        assert_eq!(sim.stats().account(key).tokens, p + 42 + ps + 42);
    })
    .await;
}

#[tokio::test]
async fn limit_headers_describe_requests_and_tokens() {
    bounded(async {
        let c = client();
        let key = "headers-key-0001";
        let window = Duration::from_secs(60);
        let cfg = SimConfig::default()
            .with_rate_limit(SimRateLimit::RollingWindow { limit: 2, window })
            .with_token_limit(10_000, window)
            .with_completion_tokens(10)
            .with_limit_headers(true);
        let sim = SimServer::start(cfg).unwrap();
        let total = prompt_tokens_of(&chat_body(false)) + 10;
        let near_full = |h: &HeaderMap, name: &str| {
            let ms = go_ms(header(h, name));
            assert!((59_000..=60_000).contains(&ms), "{name}: {}", header(h, name));
        };

        let (status, h, _) = chat(&c, &sim, key).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(header(&h, "x-ratelimit-limit-requests"), "2");
        assert_eq!(header(&h, "x-ratelimit-remaining-requests"), "1");
        near_full(&h, "x-ratelimit-reset-requests");
        assert_eq!(header(&h, "x-ratelimit-limit-tokens"), "10000");
        assert_eq!(header(&h, "x-ratelimit-remaining-tokens"), (10_000 - total).to_string());
        near_full(&h, "x-ratelimit-reset-tokens");

        let (status, h, _) = chat(&c, &sim, key).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(header(&h, "x-ratelimit-remaining-requests"), "0");

        let (status, h, body) = chat(&c, &sim, key).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(body, RATE_LIMITED_BODY);
        assert_eq!(header(&h, "x-ratelimit-limit-requests"), "2");
        assert_eq!(header(&h, "x-ratelimit-remaining-requests"), "0");
        near_full(&h, "x-ratelimit-reset-requests");
        assert_eq!(header(&h, "x-ratelimit-remaining-tokens"), (10_000 - 2 * total).to_string());

        // Streams carry them on their head; GETs never do.
        let other = "headers-key-0002";
        let resp = post_chat(&c, &sim, other, true).await.unwrap();
        assert_eq!(header(resp.headers(), "x-ratelimit-remaining-requests"), "1");
        read_all(resp).await;
        let (_, h, _) = call(&c, &sim, Method::GET, "/v1/models", Some(key), None).await;
        assert!(!h.keys().any(|k| k.as_str().starts_with("x-ratelimit")));

        // A token bucket is fully restored once it has refilled.
        let cfg = SimConfig::default()
            .with_rate_limit(SimRateLimit::TokenBucket { per_minute: 60, burst: 5 })
            .with_limit_headers(true);
        let sim = SimServer::start(cfg).unwrap();
        let (_, h, _) = chat(&c, &sim, key).await;
        assert_eq!(header(&h, "x-ratelimit-limit-requests"), "5");
        assert_eq!(header(&h, "x-ratelimit-remaining-requests"), "4");
        let ms = go_ms(header(&h, "x-ratelimit-reset-requests"));
        assert!((900..=1000).contains(&ms), "{ms}");
        // No token limit: no token headers.
        assert!(h.get("x-ratelimit-limit-tokens").is_none());
    })
    .await;
}

#[tokio::test]
async fn token_limit_refuses_once_the_window_is_used_up() {
    bounded(async {
        let c = client();
        let key = "tokens-key-0001";
        let window = Duration::from_millis(500);
        let cfg = SimConfig::default()
            .with_completion_tokens(100)
            .with_token_limit(150, window)
            .with_stream(2, Duration::from_millis(1));
        let sim = SimServer::start(cfg).unwrap();
        // A stream is charged in full even without a usage chunk.
        let resp = post_chat(&c, &sim, key, true).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        read_all(resp).await;
        let first = prompt_tokens_of(&chat_body(true)) + 100;
        assert_eq!(sim.account_stats(key).tokens, first);
        // Below the limit: admitted, and the answer overshoots it.
        let (status, _, body) = chat(&c, &sim, key).await;
        assert_eq!(status, StatusCode::OK);
        let second = usage_of(&body).2;
        assert_eq!(chat(&c, &sim, key).await.0, StatusCode::TOO_MANY_REQUESTS);
        let a = sim.account_stats(key);
        assert_eq!((a.tokens, a.max_tokens_in_window, a.rate_limited), (first + second, first + second, 1));
        assert_eq!(sim.key_stats(key).rate_limited, 1);
        // Another account has its own window.
        assert_eq!(chat(&c, &sim, "tokens-key-0002").await.0, StatusCode::OK);
        // The window rolls over.
        tokio::time::sleep(window + Duration::from_millis(20)).await;
        assert_eq!(chat(&c, &sim, key).await.0, StatusCode::OK);
        assert_eq!(sim.account_stats(key).max_tokens_in_window, first + second);

        // Embeddings are charged their usage too.
        let body = json!({"model": "nvidia/nv-embedqa-e5-v5", "input": ["abcdefgh", "abcd"]});
        let (status, _, _) =
            call(&c, &sim, Method::POST, "/v1/embeddings", Some("tokens-key-0003"), Some(body)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(sim.account_stats("tokens-key-0003").tokens, 3);
    })
    .await;
}

#[tokio::test]
async fn max_concurrent_counts_open_streams_per_account() {
    bounded(async {
        let c = client();
        let (k1, k2, solo) = ("team-key-000001", "team-key-000002", "solo-key-000001");
        let cfg = SimConfig::default()
            .with_stream(3, Duration::from_millis(100))
            .with_max_concurrent(1)
            .with_account("team", [k1, k2]);
        let sim = SimServer::start(cfg).unwrap();
        assert_eq!(sim.account_of(k2), "team");
        let stream = post_chat(&c, &sim, k1, true).await.unwrap();
        assert_eq!(stream.status(), StatusCode::OK);
        assert_eq!(sim.account_stats("team").in_flight, 1);
        // Same account, other key: refused while the stream is open.
        let (status, _, body) = chat(&c, &sim, k2).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(body, RATE_LIMITED_BODY);
        // Another account is not affected.
        assert_eq!(chat(&c, &sim, solo).await.0, StatusCode::OK);
        let (_, _, body) = read_all(stream).await;
        assert!(body.ends_with("data: [DONE]\n\n"));
        assert!(sim.wait_for(Duration::from_secs(1), |s| s.account("team").in_flight == 0).await);
        assert_eq!(chat(&c, &sim, k2).await.0, StatusCode::OK);
        let stats = sim.stats();
        let team = stats.account("team");
        assert_eq!((team.accepted, team.rate_limited, team.max_in_flight), (2, 1, 1));
        assert_eq!(stats.key(k2).rate_limited, 1);

        // An abandoned stream frees its slot too.
        let stream = post_chat(&c, &sim, k1, true).await.unwrap();
        assert_eq!(chat(&c, &sim, k2).await.0, StatusCode::TOO_MANY_REQUESTS);
        drop(stream);
        assert!(sim.wait_for(Duration::from_secs(2), |s| s.account("team").in_flight == 0).await);
        assert_eq!(chat(&c, &sim, k2).await.0, StatusCode::OK);
    })
    .await;
}

#[tokio::test]
async fn processing_delay_holds_concurrency_slots() {
    bounded(async {
        let c = client();
        let key = "busy-key-000001";
        let delay = Duration::from_millis(300);
        let cfg = SimConfig::default().with_max_concurrent(2).with_processing_delay(delay);
        let sim = SimServer::start(cfg).unwrap();
        let t = Instant::now();
        let (a, b, d) = tokio::join!(chat(&c, &sim, key), chat(&c, &sim, key), chat(&c, &sim, key));
        let mut statuses = [a.0, b.0, d.0];
        statuses.sort();
        assert_eq!(statuses, [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);
        assert!(t.elapsed() >= delay);
        let stats = sim.stats();
        assert_eq!(stats.account(key).max_in_flight, 2);
        assert_eq!(stats.account(key).in_flight, 0);
        assert_eq!(stats.max_in_flight, 2);
        assert_eq!(stats.key(key).ok, 2);
    })
    .await;
}

#[tokio::test]
async fn accounts_share_limits_and_a_fixed_window_cap() {
    bounded(async {
        let c = client();
        let (k1, k2, solo) = ("acme-key-000001", "acme-key-000002", "solo-key-000002");
        let period = Duration::from_millis(600);
        let cfg = SimConfig::default()
            .with_rate_limit(SimRateLimit::TokenBucket { per_minute: 6000, burst: 100 })
            .with_extra_limit(SimRateLimit::FixedWindow { limit: 3, period })
            .with_account("acme", [k1, k2]);
        let sim = SimServer::start(cfg).unwrap();
        let started = Instant::now();
        assert_eq!(chat(&c, &sim, k1).await.0, StatusCode::OK);
        assert_eq!(chat(&c, &sim, k2).await.0, StatusCode::OK);
        assert_eq!(chat(&c, &sim, k1).await.0, StatusCode::OK);
        assert_eq!(chat(&c, &sim, k2).await.0, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(chat(&c, &sim, solo).await.0, StatusCode::OK);
        assert!(started.elapsed() < period, "too slow to test the first period");
        // The cap resets at the next multiple of the period since the start.
        tokio::time::sleep_until((started + period + Duration::from_millis(50)).into()).await;
        assert_eq!(chat(&c, &sim, k2).await.0, StatusCode::OK);

        let stats = sim.stats();
        assert_eq!(stats.account("acme").accepted, 4);
        assert_eq!(stats.account("acme").rate_limited, 1);
        assert_eq!(stats.max_in_any_window_for_account("acme", period), 3);
        assert_eq!(sim.max_in_any_window_for_account("acme", period * 2), 4);
        assert_eq!(stats.account_accepts["acme"].len(), 4);
        // The per-key view still works.
        assert_eq!(stats.max_in_any_window(k1, period), 2);
        assert_eq!(sim.max_in_any_window(k2, period), 1);
        assert_eq!(sim.accept_log(k2).len(), 2);
        assert_eq!(stats.account(solo).accepted, 1);
        assert_eq!(sim.account_accept_log(solo).len(), 1);
    })
    .await;
}
