//! End to end: the real server on 127.0.0.1 in front of the simulated NVIDIA
//! upstream (`proxypal-nim-sim`), driven over real sockets by hyper,
//! async-openai and the compiled binary.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use proxypal_nim_sim::{Fault, FaultTarget, SimConfig, SimServer, generate_test_keys};
use proxypal_server::config::Secret;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::{self, Reply, Rig, bounded, chat_request, masked, send};

fn unchanged(c: SimConfig) -> SimConfig {
    c
}

fn defaults(_: &mut proxypal_server::config::Config) {}

// ---------------------------------------------------------------- spreading

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_sequential_requests_evenly_over_keys() {
    bounded(async {
        let rig = Rig::start(3, unchanged, defaults).await;
        for _ in 0..30 {
            let reply = rig.chat().await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        }
        let sim = rig.sim.stats();
        for key in &rig.keys {
            assert_eq!(sim.key(key).requests, 10, "sim per-key counts: {:?}", counts(&rig));
            assert_eq!(sim.key(key).ok, 10);
        }
        let stats = rig.stats().await;
        for (i, key) in rig.keys.iter().enumerate() {
            assert_eq!(stats["keys"][i]["key"], masked(key));
            assert_eq!(stats["keys"][i]["requests"], 10, "{stats}");
            assert_eq!(stats["keys"][i]["successes"], 10, "{stats}");
        }
        assert_eq!(stats["totals"]["requests"], 30);
    })
    .await;
}

fn counts(rig: &Rig) -> Vec<u64> {
    rig.keys.iter().map(|k| rig.sim.key_stats(k).requests).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_keeps_each_key_under_its_rate_during_a_concurrent_burst() {
    // 5 permits a second per key: slow enough that scheduling jitter on a busy
    // 2-core machine (tens of ms) stays well under one emission interval.
    const RPM: u32 = 300;
    const BURST: usize = 1;
    const REQUESTS: usize = 40;
    bounded(async {
        let rig = Rig::start(2, unchanged, |c| {
            c.rate_limit.requests_per_minute = Some(u64::from(RPM));
            c.rate_limit.burst = Some(BURST as u32);
            c.retry.queue_timeout = Duration::from_secs(10);
        })
        .await;
        // One request per key first: it opens the upstream connections, so the
        // burst's first requests are not slowed down more than the later ones
        // (which would squeeze their arrival times at the upstream together).
        for _ in 0..rig.keys.len() {
            assert_eq!(rig.chat().await.status, StatusCode::OK);
        }
        let started = Instant::now();
        let tasks: Vec<_> = (0..REQUESTS)
            .map(|_| {
                let http = rig.http.clone();
                let req = chat_request(rig.server.addr(), false, &[]);
                tokio::spawn(async move { send(&http, req).await })
            })
            .collect();
        for task in tasks {
            let reply = task.await.unwrap();
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        }
        let elapsed = started.elapsed();
        assert_eq!(rig.sim.stats().total_requests, (REQUESTS + rig.keys.len()) as u64);

        // The nominal emission interval (the proxy adds a 500 ms/min margin on top,
        // which only makes it slower), and slack for scheduling jitter between the
        // proxy's permit and the simulator's clock.
        let period = Duration::from_secs(60) / RPM;
        let jitter = period / 2;
        for key in &rig.keys {
            let log = rig.sim.accept_log(key);
            assert!(!log.is_empty());
            for i in 0..log.len() {
                for j in i + 1..log.len() {
                    let dt = log[j] - log[i];
                    let seen = j - i + 1;
                    let allowed = BURST + ((dt + jitter).as_nanos() / period.as_nanos()) as usize;
                    assert!(
                        seen <= allowed,
                        "key {}: {seen} requests within {dt:?} (allowed {allowed}); log {log:?}",
                        masked(key)
                    );
                }
            }
        }
        // 20 requests per key at 5/s cannot finish in under ~3.8 s.
        assert!(elapsed >= Duration::from_millis(3_500), "burst finished too fast: {elapsed:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_queues_then_gets_429_with_retry_after_when_no_key_has_capacity() {
    bounded(async {
        let rig = Rig::start(1, unchanged, |c| {
            c.rate_limit.requests_per_minute = Some(60);
            c.rate_limit.burst = Some(1);
            c.retry.queue_timeout = Duration::from_millis(300);
        })
        .await;
        let first = rig.chat().await;
        assert_eq!(first.status, StatusCode::OK, "{}", first.text());

        let started = Instant::now();
        let second = rig.chat().await;
        assert_eq!(second.status, StatusCode::TOO_MANY_REQUESTS, "{}", second.text());
        assert!(started.elapsed() < Duration::from_secs(2), "the 429 took {:?}", started.elapsed());
        let secs: u64 = second.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&secs), "Retry-After {secs}");
        let ms: u64 = second.headers["retry-after-ms"].to_str().unwrap().parse().unwrap();
        assert!(ms > 0);
        let err = second.openai_error();
        let message = err["message"].as_str().unwrap();
        assert!(message.contains("all API keys are rate limited"), "{message}");
        assert_eq!(err["type"], "rate_limit_error");
        // Nothing went upstream without a permit.
        assert_eq!(rig.sim.stats().total_requests, 1);
    })
    .await;
}

// ---------------------------------------------------------------- failover

/// Three keys; the first request's first attempt (key 0) gets `fault`.
async fn first_attempt_faulted(
    fault: Fault,
    tweak: impl FnOnce(&mut proxypal_server::config::Config),
) -> (Rig, Reply) {
    let rig = Rig::start(3, unchanged, tweak).await;
    rig.sim.push_fault(fault, FaultTarget::Key(rig.keys[0].clone()));
    let reply = rig.chat().await;
    assert_eq!(rig.sim.pending_faults(), 0, "the fault was not consumed: key 0 was not tried first");
    assert_eq!(rig.sim.key_stats(&rig.keys[0]).faults, 1);
    (rig, reply)
}

/// The client got a 200 from key 1 after key 0 failed.
#[track_caller]
fn assert_failed_over(rig: &Rig, reply: &Reply) {
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let content = reply.json()["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
    assert!(content.contains("simulated NIM"), "{content}");
    assert_eq!(rig.sim.key_stats(&rig.keys[1]).ok, 1, "key 1 should have served the retry");
    assert_eq!(rig.sim.stats().total_requests, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_429_fails_over_and_cools_the_key_down() {
    bounded(async {
        let (rig, reply) = first_attempt_faulted(Fault::rate_limited(), defaults).await;
        assert_failed_over(&rig, &reply);
        let key = rig.key_stats(0).await;
        assert_eq!(key["state"], "cooling_down", "{key}");
        assert_eq!(key["cooldown_reason"], "rate_limited", "{key}");
        assert_eq!(key["rate_limited"], 1, "{key}");
        assert_eq!(rig.key_stats(1).await["state"], "ready");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_401_fails_over_and_disables_the_key() {
    bounded(async {
        let (rig, reply) = first_attempt_faulted(Fault::unauthorized(), defaults).await;
        assert_failed_over(&rig, &reply);
        let key = rig.key_stats(0).await;
        assert_eq!(key["state"], "disabled", "{key}");
        assert_eq!(key["errors"], 1, "{key}");
        assert_eq!(rig.get("/health", &[]).await.json()["status"], "degraded");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_403_fails_over_and_disables_the_key() {
    bounded(async {
        let (rig, reply) = first_attempt_faulted(Fault::forbidden(), defaults).await;
        assert_failed_over(&rig, &reply);
        assert_eq!(rig.key_stats(0).await["state"], "disabled");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_500_and_502_fail_over_and_cool_the_key_down() {
    bounded(async {
        for status in [500, 502] {
            let (rig, reply) =
                first_attempt_faulted(Fault::problem(status, "Server Error", "something broke"), defaults)
                    .await;
            assert_failed_over(&rig, &reply);
            let key = rig.key_stats(0).await;
            assert_eq!(key["state"], "cooling_down", "{status}: {key}");
            assert_eq!(key["cooldown_reason"], "failures", "{status}: {key}");
            assert_eq!(key["errors"], 1, "{status}: {key}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_upstream_connection_fails_over_to_another_key() {
    bounded(async {
        let (rig, reply) = first_attempt_faulted(Fault::DropConnection, defaults).await;
        assert_failed_over(&rig, &reply);
        assert_eq!(rig.key_stats(0).await["state"], "cooling_down");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_response_timeout_fails_over_to_another_key() {
    bounded(async {
        let started = Instant::now();
        let (rig, reply) = first_attempt_faulted(Fault::Delay(Duration::from_secs(5)), |c| {
            c.upstream.response_timeout = Duration::from_millis(300);
        })
        .await;
        assert_failed_over(&rig, &reply);
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3), "took {took:?}");
        assert_eq!(rig.key_stats(0).await["state"], "cooling_down");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvidia_worker_limit_503_is_returned_without_failover_or_key_penalty() {
    bounded(async {
        let (rig, reply) = first_attempt_faulted(Fault::worker_limit(), defaults).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
        let message = reply.error_message();
        assert!(message.contains("Worker local total request limit reached"), "{message}");
        assert_eq!(rig.sim.stats().total_requests, 1, "a model-level failure must not fail over");
        assert_eq!(rig.key_stats(0).await["state"], "ready");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvidia_degraded_400_is_rewritten_without_failover_or_key_penalty() {
    bounded(async {
        let (rig, reply) = first_attempt_faulted(Fault::degraded(), defaults).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{}", reply.text());
        let err = reply.openai_error();
        assert!(err["message"].as_str().unwrap().contains("DEGRADED function cannot be invoked"), "{err}");
        assert_eq!(err["type"], "invalid_request_error");
        assert_eq!(rig.sim.stats().total_requests, 1);
        assert_eq!(rig.key_stats(0).await["state"], "ready");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_404_without_body_becomes_an_openai_shaped_404() {
    bounded(async {
        let (rig, reply) = first_attempt_faulted(Fault::empty(404), defaults).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{}", reply.text());
        let err = reply.openai_error();
        assert!(err["message"].as_str().unwrap().contains("404"), "{err}");
        assert_eq!(err["type"], "not_found_error");
        assert_eq!(rig.sim.stats().total_requests, 1);
        assert_eq!(rig.key_stats(0).await["state"], "ready");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_attempts_return_the_last_upstream_error_rewritten() {
    bounded(async {
        let rig = Rig::start(3, unchanged, |c| c.retry.max_attempts = 3).await;
        rig.sim.set_fault_always(Some(Fault::problem(500, "Internal Server Error", "the node fell over")));
        let reply = rig.chat().await;
        assert_eq!(reply.status, StatusCode::INTERNAL_SERVER_ERROR, "{}", reply.text());
        let err = reply.openai_error();
        assert!(err["message"].as_str().unwrap().contains("the node fell over"), "{err}");
        assert_eq!(err["code"], "upstream_500");
        assert_eq!(rig.sim.stats().total_requests, 3);
        for key in &rig.keys {
            assert_eq!(rig.sim.key_stats(key).requests, 1, "each attempt on another key");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_keys_disabled_gives_503_until_a_reload_brings_good_keys() {
    bounded(async {
        let good = generate_test_keys(2);
        let bad = generate_test_keys(2);
        let sim = SimServer::start(SimConfig::default().with_keys(good.clone())).unwrap();
        let config = common::proxy_config(&sim, &bad);
        let server = proxypal_server::start(&config, false).await.unwrap();
        let http = common::http_client();
        let chat = || send(&http, chat_request(server.addr(), false, &[]));

        // Both keys rejected on the first request: they get disabled, and that very
        // request already learns that no key is left (503, do not retry) …
        let first = chat().await;
        assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE, "{}", first.text());
        assert_eq!(first.headers["x-should-retry"], "false");
        assert!(first.error_message().contains("every API key is disabled"), "{}", first.text());
        // … and so does every later one, without touching the upstream.
        let reply = chat().await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE, "{}", reply.text());
        assert_eq!(reply.headers["x-should-retry"], "false");
        let message = reply.error_message();
        assert!(message.contains("every API key is disabled"), "{message}");
        assert_eq!(sim.stats().total_requests, 2, "no request upstream without a usable key");

        let health = send(
            &http,
            Request::get(format!("http://{}/health", server.addr())).body(Full::new(Bytes::new())).unwrap(),
        )
        .await;
        assert_eq!(health.status, StatusCode::OK);
        assert_eq!(health.json()["status"], "unavailable");

        let fixed = common::proxy_config(&sim, &good);
        server.app().reload(&fixed).unwrap();
        for _ in 0..4 {
            let reply = chat().await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        }
        for key in &good {
            assert_eq!(sim.key_stats(key).ok, 2);
        }
        server.shutdown().await;
    })
    .await;
}

// ---------------------------------------------------------------- streaming

/// Each body frame with its arrival time.
async fn read_frames(resp: http::Response<hyper::body::Incoming>) -> (Vec<(Instant, Bytes)>, Option<String>) {
    let mut body = resp.into_body();
    let mut frames = Vec::new();
    loop {
        match body.frame().await {
            None => return (frames, None),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    frames.push((Instant::now(), data));
                }
            }
            Some(Err(e)) => return (frames, Some(e.to_string())),
        }
    }
}

/// SSE `data:` payloads with the arrival time of the frame that completed them.
fn sse_events(frames: &[(Instant, Bytes)]) -> Vec<(Instant, String)> {
    let mut events = Vec::new();
    let mut buf = String::new();
    for (at, data) in frames {
        buf.push_str(&String::from_utf8_lossy(data));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            if let Some(payload) = event.trim().strip_prefix("data: ") {
                events.push((*at, payload.to_owned()));
            }
        }
    }
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_chunks_arrive_as_they_are_produced_and_end_with_done() {
    bounded(async {
        let rig = Rig::start(2, |s| s.with_stream(6, Duration::from_millis(100)), defaults).await;
        let resp = rig.http.request(chat_request(rig.server.addr(), true, &[])).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["content-type"], "text/event-stream");
        let (frames, error) = read_frames(resp).await;
        assert_eq!(error, None);
        let events = sse_events(&frames);
        assert_eq!(events.last().map(|(_, e)| e.as_str()), Some("[DONE]"), "{events:?}");
        let content: Vec<&(Instant, String)> =
            events.iter().filter(|(_, e)| e.contains("\"content\"")).collect();
        assert_eq!(content.len(), 6, "{events:?}");
        let spread = content[5].0 - content[0].0;
        assert!(spread >= Duration::from_millis(400), "the stream was buffered: first-to-last {spread:?}");
        for pair in content.windows(2) {
            let gap = pair[1].0 - pair[0].0;
            assert!(
                gap >= Duration::from_millis(60),
                "chunks arrived {gap:?} apart: not streamed one by one"
            );
        }
        let text: String = content
            .iter()
            .map(|(_, e)| {
                let v: Value = serde_json::from_str(e).unwrap();
                v["choices"][0]["delta"]["content"].as_str().unwrap().to_owned()
            })
            .collect();
        assert!(text.contains("simulated NIM"), "{text}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_disconnect_mid_stream_cancels_the_upstream_stream() {
    bounded(async {
        let rig = Rig::start(1, unchanged, defaults).await;
        rig.sim.push_fault(Fault::StallMidStream { after_chunks: 2 }, FaultTarget::Any);
        let body = r#"{"model":"meta/llama-3.1-8b-instruct","stream":true,"messages":[{"role":"user","content":"Hi"}]}"#;
        let mut conn = tokio::net::TcpStream::connect(rig.server.addr()).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: proxypal\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        conn.write_all(body.as_bytes()).await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while String::from_utf8_lossy(&seen).matches("data: {").count() < 2 {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
        assert_eq!(rig.sim.active_streams(), 1);
        assert_eq!(rig.stats().await["in_flight"], 1);

        drop(conn);
        let gone = rig.sim.wait_for(Duration::from_secs(1), |s| s.active_streams == 0).await;
        assert!(gone, "the upstream stream is still open 1 s after the client left");
        // The proxy's in-flight slot is released too.
        let deadline = Instant::now() + Duration::from_secs(1);
        while rig.stats().await["in_flight"] != 0 {
            assert!(Instant::now() < deadline, "in_flight never went back to 0");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_break_mid_stream_ends_the_client_stream_with_an_error() {
    bounded(async {
        let rig = Rig::start(2, unchanged, defaults).await;
        rig.sim.push_fault(Fault::BreakMidStream { after_chunks: 2 }, FaultTarget::Any);
        let resp = rig.http.request(chat_request(rig.server.addr(), true, &[])).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let (frames, error) = read_frames(resp).await;
        let events = sse_events(&frames);
        assert_eq!(events.len(), 2, "{events:?}");
        assert!(error.is_some(), "the client must see the stream break, not a clean end: {events:?}");
        assert!(events.iter().all(|(_, e)| e != "[DONE]"));

        // The server goes on serving, streams and plain requests alike.
        let reply = rig.chat().await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let resp = rig.http.request(chat_request(rig.server.addr(), true, &[])).await.unwrap();
        let (frames, error) = read_frames(resp).await;
        assert_eq!(error, None);
        assert_eq!(sse_events(&frames).last().unwrap().1, "[DONE]");
    })
    .await;
}

// ---------------------------------------------------------------- SDK

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_openai_client_works_through_the_proxy() {
    use async_openai::Client;
    use async_openai::config::OpenAIConfig;
    use async_openai::types::chat::{ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs};
    use futures_util::StreamExt;

    bounded(async {
        let rig = Rig::start(2, unchanged, defaults).await;
        let config = OpenAIConfig::new()
            .with_api_base(format!("http://{}/v1", rig.server.addr()))
            .with_api_key("not-a-real-key");
        let client = Client::with_config(config);
        let request = || {
            CreateChatCompletionRequestArgs::default()
                .model("meta/llama-3.1-8b-instruct")
                .messages([ChatCompletionRequestUserMessageArgs::default()
                    .content("Hello")
                    .build()
                    .unwrap()
                    .into()])
                .build()
                .unwrap()
        };

        let response = client.chat().create(request()).await.unwrap();
        let content = response.choices[0].message.content.clone().unwrap();
        assert!(content.contains("simulated NIM"), "{content}");

        let mut stream = client.chat().create_stream(request()).await.unwrap();
        let mut text = String::new();
        let mut chunks = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            chunks += 1;
            if let Some(piece) = chunk.choices.first().and_then(|c| c.delta.content.clone()) {
                text.push_str(&piece);
            }
        }
        assert!(chunks >= 2, "{chunks} chunks");
        assert!(text.contains("simulated NIM"), "{text}");
        // The SDK's key went nowhere: the sim only saw pool keys.
        assert_eq!(rig.sim.stats().per_key.len(), 2);
    })
    .await;
}

// ---------------------------------------------------------------- secrets

/// Log lines written by every test of this binary once `capture_logs` ran.
static LOGS: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOGS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs a global debug-level subscriber writing into [`LOGS`] (global,
/// not thread-local: the server logs from runtime worker threads).
fn capture_logs() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(|| LogWriter)
            .finish();
        tracing::subscriber::set_global_default(subscriber).unwrap();
    });
}

fn captured_logs() -> String {
    String::from_utf8_lossy(&LOGS.lock().unwrap_or_else(std::sync::PoisonError::into_inner)).into_owned()
}

/// `text` contains neither a key nor its secret part (after `nvapi-sim-`).
#[track_caller]
fn assert_no_key_in(what: &str, text: &str, keys: &[String]) {
    for key in keys {
        let secret = &key["nvapi-sim-".len()..];
        assert!(!text.contains(secret), "a full key leaked in {what}: {text}");
        // Not even a long fragment of it.
        for window in secret.as_bytes().windows(12) {
            let fragment = std::str::from_utf8(window).unwrap();
            assert!(!text.contains(fragment), "part of a key ({fragment}) leaked in {what}: {text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_never_appear_in_logs_stats_health_or_responses() {
    capture_logs();
    bounded(async {
        let rig = Rig::start(3, unchanged, |c| {
            c.retry.max_attempts = 2;
            c.retry.failure_cooldown = Duration::from_millis(100);
        })
        .await;
        rig.sim.push_fault(Fault::unauthorized(), FaultTarget::Key(rig.keys[0].clone()));
        rig.sim.push_fault(Fault::rate_limited(), FaultTarget::Key(rig.keys[1].clone()));
        let mut replies = Vec::new();
        for _ in 0..4 {
            replies.push(rig.chat().await);
        }
        // A failure that reaches the client: every attempt 500s.
        rig.sim.set_fault_always(Some(Fault::problem(500, "Internal Server Error", "boom")));
        replies.push(rig.chat().await);
        rig.sim.set_fault_always(None);
        let resp = rig.http.request(chat_request(rig.server.addr(), true, &[])).await.unwrap();
        let (head, body) = resp.into_parts();
        replies.push(Reply {
            status: head.status,
            headers: head.headers,
            body: body.collect().await.unwrap().to_bytes(),
        });
        replies.push(rig.get("/v1/models", &[]).await);
        assert!(replies.iter().any(|r| r.status == StatusCode::OK));
        assert!(replies.iter().any(|r| r.status == StatusCode::INTERNAL_SERVER_ERROR));

        for reply in &replies {
            assert_no_key_in("a response body", &reply.text(), &rig.keys);
            for (name, value) in &reply.headers {
                assert_no_key_in(
                    &format!("response header {name}"),
                    &String::from_utf8_lossy(value.as_bytes()),
                    &rig.keys,
                );
            }
        }
        let stats = rig.get("/stats", &[]).await;
        assert_no_key_in("/stats", &stats.text(), &rig.keys);
        let stats = stats.json();
        for (i, key) in rig.keys.iter().enumerate() {
            assert_eq!(stats["keys"][i]["key"], masked(key));
        }
        assert_eq!(stats["keys"][0]["state"], "disabled");
        assert_eq!(stats["keys"][1]["rate_limited"], 1);
        let health = rig.get("/health", &[]).await;
        assert_no_key_in("/health", &health.text(), &rig.keys);

        let logs = captured_logs();
        assert!(logs.contains("disabling it"), "the 401 was not logged (capture broken?): {logs}");
        assert!(logs.contains("rate limited the key"), "the 429 was not logged: {logs}");
        assert!(logs.contains(&masked(&rig.keys[0])), "logs should name keys by their masked label");
        assert_no_key_in("the logs", &logs, &rig.keys);
    })
    .await;
}

// ---------------------------------------------------------------- the binary

const BIN: &str = env!("CARGO_BIN_EXE_proxypal-server");

/// The binary, with no `PROXYPAL_*`/`RUST_LOG` from the test's environment.
fn bin() -> Command {
    let mut cmd = Command::new(BIN);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PROXYPAL_") {
            cmd.env_remove(&name);
        }
    }
    cmd.env_remove("RUST_LOG").env("NO_COLOR", "1").stdin(Stdio::null());
    cmd
}

/// A YAML file under the temp dir, removed on drop.
struct TempConfig(std::path::PathBuf);

impl TempConfig {
    fn new(yaml: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // A directory of its own: the state file (next to the config) is private too.
        let dir = std::env::temp_dir().join(format!("proxypal-proxy-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("proxypal.yaml");
        std::fs::write(&path, yaml).unwrap();
        Self(path)
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn keys_yaml(keys: &[String]) -> String {
    keys.iter().map(|k| format!("  - {k}\n")).collect()
}

#[test]
fn binary_check_validates_configs_and_prints_only_masked_keys() {
    let keys = generate_test_keys(2);
    let good =
        TempConfig::new(&format!("keys:\n{}rate_limit:\n  requests_per_minute: 30\n", keys_yaml(&keys)));
    let out = bin().arg("--config").arg(&good.0).arg("--check").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("configuration OK"), "{stdout}");
    for key in &keys {
        assert!(stdout.contains(&masked(key)), "{stdout}");
    }
    assert_no_key_in("--check output", &format!("{stdout}{stderr}"), &keys);

    let bad = TempConfig::new(&format!("keys:\n{}rate_limit:\n  requests_per_minute: 0\n", keys_yaml(&keys)));
    let out = bin().arg("--config").arg(&bad.0).arg("--check").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("rate_limit.requests_per_minute"), "{stderr}");
    assert_no_key_in("--check error", &stderr, &keys);

    let no_keys = TempConfig::new("rate_limit:\n  requests_per_minute: 30\n");
    for args in [vec!["--check"], vec![]] {
        let out = bin().arg("--config").arg(&no_keys.0).args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {stderr}");
        assert!(stderr.contains("keys"), "{stderr}");
        assert!(stderr.contains("no API keys"), "{stderr}");
    }

    let out = bin().arg("--version").output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{stdout}");

    let out = bin().arg("--help").output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for flag in ["--config", "--check", "--dev"] {
        assert!(stdout.contains(flag), "{stdout}");
    }
}

/// Kills the child (by its own pid) if the test ends without it exiting.
struct ChildGuard(std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_then_exits_cleanly_on_sigterm_without_logging_keys() {
    bounded(async {
        let keys = generate_test_keys(3);
        let sim = SimServer::start(SimConfig::default().with_keys(keys.clone())).unwrap();
        let config = TempConfig::new(&format!(
            "listen: 127.0.0.1:0\nupstream:\n  base_url: {}\nkeys:\n{}rate_limit:\n  requests_per_minute: 6000\n  burst: 5\nshutdown_grace: 2s\n",
            sim.base_url(),
            keys_yaml(&keys)
        ));
        let child = bin()
            .arg("--config")
            .arg(&config.0)
            .env("PROXYPAL_LOG__LEVEL", "debug")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut child = ChildGuard(child);
        let stderr = child.0.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let reader = {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    let mut log = log.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            })
        };

        // The address comes from the "listening on ADDR" line (port 0 in the config).
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr: std::net::SocketAddr = loop {
            let text = log.lock().unwrap().clone();
            if let Some(rest) = text.split("listening on ").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
            assert!(Instant::now() < deadline, "no 'listening on' line: {text}");
            assert!(child.0.try_wait().unwrap().is_none(), "the server exited: {text}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };

        let http = common::http_client();
        sim.push_fault(Fault::unauthorized(), FaultTarget::Key(keys[0].clone()));
        for _ in 0..3 {
            let reply = send(&http, chat_request(addr, false, &[])).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        }
        assert_eq!(sim.key_stats(&keys[0]).faults, 1);
        drop(http);

        let pid = child.0.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(killed.success());
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "the server did not exit within 10 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        reader.join().unwrap();
        let text = log.lock().unwrap().clone();
        assert!(status.success(), "exit {status:?}: {text}");
        assert!(text.contains("listening on"), "{text}");
        assert!(text.contains("DEBUG"), "PROXYPAL_LOG__LEVEL=debug was not applied: {text}");
        assert!(text.contains("disabling it"), "the 401 was not logged: {text}");
        assert!(text.contains(&masked(&keys[0])), "{text}");
        assert_no_key_in("the binary's stderr", &text, &keys);
    })
    .await;
}

// ---------------------------------------------------------------- CORS and auth

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_allows_only_configured_origins() {
    bounded(async {
        let rig =
            Rig::start(1, unchanged, |c| c.cors.allowed_origins = vec!["https://app.example".to_owned()])
                .await;
        let preflight = |origin: &'static str| {
            Request::builder()
                .method(Method::OPTIONS)
                .uri(rig.url("/v1/chat/completions"))
                .header("origin", origin)
                .header("access-control-request-method", "POST")
                .header("access-control-request-headers", "authorization, content-type")
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        let ok = send(&rig.http, preflight("https://app.example")).await;
        assert_eq!(ok.status, StatusCode::NO_CONTENT);
        assert_eq!(ok.headers["access-control-allow-origin"], "https://app.example");
        let methods = ok.headers["access-control-allow-methods"].to_str().unwrap();
        assert!(methods.contains("POST"), "{methods}");
        let headers = ok.headers["access-control-allow-headers"].to_str().unwrap().to_ascii_lowercase();
        assert!(headers.contains("authorization") && headers.contains("content-type"), "{headers}");
        assert_eq!(rig.sim.stats().total_requests, 0, "a preflight never goes upstream");

        let post =
            send(&rig.http, chat_request(rig.server.addr(), false, &[("origin", "https://app.example")]))
                .await;
        assert_eq!(post.status, StatusCode::OK);
        assert_eq!(post.headers["access-control-allow-origin"], "https://app.example");

        let denied = send(&rig.http, preflight("https://evil.example")).await;
        assert!(denied.headers.get("access-control-allow-origin").is_none(), "{:?}", denied.headers);
        assert!(denied.headers.get("access-control-allow-methods").is_none());
        let post =
            send(&rig.http, chat_request(rig.server.addr(), false, &[("origin", "https://evil.example")]))
                .await;
        assert!(post.headers.get("access-control-allow-origin").is_none(), "{:?}", post.headers);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tokens_are_required_and_never_forwarded_upstream() {
    const TOKEN: &str = "pp-client-token-0123456789abcdef";
    bounded(async {
        let rig = Rig::start(2, unchanged, |c| c.auth.tokens = vec![Secret::new(TOKEN)]).await;
        let bearer = format!("Bearer {TOKEN}");

        let denied = rig.chat().await;
        assert_eq!(denied.status, StatusCode::UNAUTHORIZED, "{}", denied.text());
        assert_eq!(denied.openai_error()["type"], "authentication_error");
        let wrong =
            send(&rig.http, chat_request(rig.server.addr(), false, &[("authorization", "Bearer nope")]))
                .await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
        assert_eq!(rig.sim.stats().total_requests, 0);

        let ok = send(&rig.http, chat_request(rig.server.addr(), false, &[("authorization", &bearer)])).await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
        let sent = rig.sim.stats().last_request_headers.unwrap();
        let auth = sent["authorization"].to_str().unwrap();
        assert!(auth.starts_with("Bearer nvapi-sim-"), "upstream got {auth:?}");
        assert!(rig.keys.iter().any(|k| auth == format!("Bearer {k}")));
        assert!(
            sent.iter().all(|(_, v)| !String::from_utf8_lossy(v.as_bytes()).contains(TOKEN)),
            "the client token was forwarded upstream"
        );

        assert_eq!(rig.get("/stats", &[]).await.status, StatusCode::UNAUTHORIZED);
        assert_eq!(rig.get("/stats", &[("authorization", &bearer)]).await.status, StatusCode::OK);
        let health = rig.get("/health", &[]).await;
        assert_eq!(health.status, StatusCode::OK);
        assert_eq!(health.json()["status"], "ok");
    })
    .await;
}
