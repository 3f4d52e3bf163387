//! Issue 4, hardening: limits on what clients send, malformed HTTP, upstream
//! faults, graceful shutdown and hot reload — each promise checked on real
//! sockets on 127.0.0.1, against the simulated NVIDIA upstream, in process or
//! with the compiled binary.
//!
//! Covered elsewhere (the `proxy` module) and not repeated here: client tokens,
//! a client disconnecting mid-stream, the upstream closing mid-stream, every
//! key disabled by 401 then a reload with good keys.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use proxypal_nim_sim::{Fault, FaultTarget, SimConfig, SimHandle, SimServer, generate_test_keys};
use proxypal_server::config::Config;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::common;
use crate::hardening_support::{
    self, Binary, HttpClient, TempDir, chat_request, frames_text, free_port, get_request, http_client,
    masked, proxy_config, raw_exchange, read_head, read_stream, replace_file, send, sse_data, within,
};

/// Upper bound for the in-process tests.
const LIMIT: Duration = Duration::from_secs(30);

/// The shared rig (a simulator accepting `n` fresh keys and the proxy in
/// front of it), answering with `hardening_support`'s reply type.
struct Rig(common::Rig);

impl std::ops::Deref for Rig {
    type Target = common::Rig;
    fn deref(&self) -> &common::Rig {
        &self.0
    }
}

impl Rig {
    async fn start(
        n: usize,
        sim: impl FnOnce(SimConfig) -> SimConfig,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        Self(common::Rig::start(n, sim, tweak).await)
    }

    async fn chat(&self) -> hardening_support::Reply {
        send(&self.http, chat_request(self.server.addr(), false)).await
    }

    async fn get(&self, path: &str) -> hardening_support::Reply {
        send(&self.http, get_request(self.server.addr(), path)).await
    }

    async fn request(&self, method: Method, path: &str) -> hardening_support::Reply {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.server.addr()))
            .body(Full::new(Bytes::new()))
            .unwrap();
        send(&self.http, req).await
    }
}

/// Counts panics anywhere in this test process (the server's connection
/// tasks run on the test's runtime), keeping the default report.
fn panics() -> usize {
    static COUNT: AtomicUsize = AtomicUsize::new(0);
    static HOOK: OnceLock<()> = OnceLock::new();
    HOOK.get_or_init(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            COUNT.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
    COUNT.load(Ordering::SeqCst)
}

// ------------------------------------------------------------------ limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_max_body_bytes_gets_413_without_reading_the_rest() {
    within(LIMIT, async {
        let rig = Rig::start(1, |s| s, |c| c.limits.max_body_bytes = 1024).await;
        let addr = rig.server.addr();
        let body_of = |len: usize| {
            let mut body = json!({
                "model": "meta/llama-3.1-8b-instruct",
                "messages": [{"role": "user", "content": ""}],
            });
            let base = body.to_string().len();
            body["messages"][0]["content"] = Value::from("x".repeat(len - base));
            let text = body.to_string();
            assert_eq!(text.len(), len);
            text
        };
        let post = |body: String| {
            Request::post(format!("http://{addr}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .unwrap()
        };

        // At the limit: served.
        let ok = send(&rig.http, post(body_of(1024))).await;
        assert_eq!(ok.status, StatusCode::OK, "{}", ok.text());
        assert_eq!(rig.sim.stats().total_requests, 1);

        // 2 KiB with a Content-Length: refused from the header alone.
        let big = body_of(2048);
        let reply = send(&rig.http, post(big.clone())).await;
        assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "{}", reply.text());
        let err = reply.openai_error();
        assert_eq!(err["type"], "invalid_request_error", "{err}");
        assert_eq!(err["code"], "request_too_large", "{err}");
        assert!(err["message"].as_str().unwrap().contains("max_body_bytes"), "{err}");

        // 2 KiB chunked (no Content-Length): refused once 1 KiB has been read.
        let chunked = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: proxypal\r\ncontent-type: application/json\r\n\
             transfer-encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
            big.len()
        );
        let raw = raw_exchange(addr, chunked.as_bytes(), Duration::from_secs(3)).await;
        assert_eq!(raw.status(), Some(413), "{}", raw.text());
        assert!(raw.text().contains("request_too_large"), "{}", raw.text());

        // Content-Length 10 MB, a few bytes sent, the rest never comes: the 413
        // arrives at once, while the client is still "sending".
        let mut conn = TcpStream::connect(addr).await.unwrap();
        conn.write_all(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: proxypal\r\ncontent-type: application/json\r\n\
              content-length: 10000000\r\n\r\n{\"model\":",
        )
        .await
        .unwrap();
        let sent = Instant::now();
        let head = read_head(&mut conn, Duration::from_secs(3))
            .await
            .expect("no answer: the server is waiting for the 10 MB body");
        let took = sent.elapsed();
        assert!(head.starts_with("HTTP/1.1 413"), "{head}");
        assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
        assert!(took < Duration::from_millis(500), "413 took {took:?}");
        drop(conn);

        assert_eq!(rig.sim.stats().total_requests, 1, "an oversized body must never reach the upstream");
        // The server goes on serving.
        assert_eq!(rig.chat().await.status, StatusCode::OK);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_max_inflight_get_a_quick_503() {
    within(LIMIT, async {
        let rig =
            Rig::start(2, |s| s.with_response_delay(Duration::from_secs(1)), |c| c.limits.max_inflight = 2)
                .await;
        let addr = rig.server.addr();
        let started = Instant::now();
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let http = rig.http.clone();
                tokio::spawn(async move {
                    let reply = send(&http, chat_request(addr, false)).await;
                    (reply, started.elapsed())
                })
            })
            .collect();
        let mut ok = 0;
        let mut overloaded = 0;
        for task in tasks {
            let (reply, took) = task.await.unwrap();
            match reply.status {
                StatusCode::OK => {
                    ok += 1;
                    assert!(took >= Duration::from_millis(900), "{took:?}");
                }
                StatusCode::SERVICE_UNAVAILABLE => {
                    overloaded += 1;
                    assert!(took < Duration::from_millis(300), "the 503 took {took:?}: it waited for a slot");
                    assert_eq!(reply.error_code(), "overloaded", "{}", reply.text());
                    assert!(reply.headers.contains_key("retry-after"), "{:?}", reply.headers);
                }
                other => panic!("unexpected {other}: {}", reply.text()),
            }
        }
        assert_eq!((ok, overloaded), (2, 3), "exactly max_inflight requests are served at once");
        assert_eq!(rig.sim.stats().total_requests, 2, "refused requests never go upstream");

        // Slots come back when the answers are done.
        assert_eq!(rig.server.app().in_flight(), 0);
        assert_eq!(rig.chat().await.status, StatusCode::OK);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_http_gets_4xx_or_a_close_and_the_server_keeps_serving() {
    within(LIMIT, async {
        let panics_before = panics();
        let rig = Rig::start(1, |s| s, |_| {}).await;
        let addr = rig.server.addr();

        let absurd_header = format!(
            "GET /health HTTP/1.1\r\nhost: proxypal\r\nx-absurd: {}\r\n\r\n",
            "a".repeat(2 * 1024 * 1024)
        );
        let many_headers = format!(
            "GET /health HTTP/1.1\r\nhost: proxypal\r\n{}\r\n",
            (0..500).map(|i| format!("x-h{i}: v\r\n")).collect::<String>()
        );
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("binary garbage", b"\x00\x01\x02\xff\xfe garbage \x7f\r\n\r\n".to_vec()),
            ("a bad request line", b"THIS IS NOT HTTP\r\n\r\n".to_vec()),
            ("a request line without a version", b"GET /health\r\n\r\n".to_vec()),
            ("an unknown HTTP version", b"GET /health HTTP/9.9\r\nhost: x\r\n\r\n".to_vec()),
            ("a header without a colon", b"GET /health HTTP/1.1\r\nhost x\r\n\r\n".to_vec()),
            (
                "a non-numeric Content-Length",
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n".to_vec(),
            ),
            (
                "two different Content-Lengths",
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab"
                    .to_vec(),
            ),
            ("a 2 MiB header", absurd_header.into_bytes()),
            ("500 headers", many_headers.into_bytes()),
        ];
        for (what, bytes) in &cases {
            let raw = raw_exchange(addr, bytes, Duration::from_secs(5)).await;
            assert!(raw.closed, "{what}: the server neither answered nor closed within 5 s: {}", raw.text());
            if !raw.bytes.is_empty() {
                let status = raw.status();
                assert!(
                    status.is_some_and(|s| (400..500).contains(&s)),
                    "{what}: expected a 4xx, got {:?}",
                    raw.text()
                );
            }
        }
        assert_eq!(rig.sim.stats().total_requests, 0);

        // Still serving, on new connections.
        let health = rig.get("/health").await;
        assert_eq!(health.status, StatusCode::OK, "{}", health.text());
        assert_eq!(rig.chat().await.status, StatusCode::OK);

        // Unknown paths outside /v1 and wrong methods: clear, OpenAI-shaped errors.
        for path in ["/", "/admin", "/v2/chat/completions", "/healthz", "/v1x"] {
            let reply = rig.get(path).await;
            assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path}: {}", reply.text());
            assert_eq!(reply.openai_error()["type"], "not_found_error", "{path}");
        }
        for (method, path) in
            [(Method::POST, "/health"), (Method::DELETE, "/health"), (Method::PUT, "/stats")]
        {
            let reply = rig.request(method.clone(), path).await;
            assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}: {}", reply.text());
            reply.openai_error();
            assert_eq!(reply.headers["allow"], "GET, HEAD");
        }
        assert_eq!(rig.sim.stats().total_requests, 1, "none of these went upstream");
        assert_eq!(panics(), panics_before, "something panicked");
    })
    .await;
}

/// hyper's header read timeout is 30 s (not configurable), so this test
/// takes about half a minute: it runs in parallel with the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_headers_is_cut_off_by_the_header_read_timeout() {
    within(Duration::from_secs(60), async {
        let rig = Rig::start(1, |s| s, |_| {}).await;
        let mut conn = TcpStream::connect(rig.server.addr()).await.unwrap();
        conn.write_all(b"GET /health HTTP/1.1\r\nhost: proxypal\r\n").await.unwrap();
        let started = Instant::now();
        // One header line a second, never the blank line that ends the head.
        let closed = loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let elapsed = started.elapsed();
            assert!(elapsed < Duration::from_secs(40), "still open after {elapsed:?}");
            let line = format!("x-slow-{}: loris\r\n", elapsed.as_secs());
            if conn.write_all(line.as_bytes()).await.is_err() {
                break elapsed;
            }
            let mut probe = [0u8; 1024];
            match tokio::time::timeout(Duration::from_millis(10), conn.peek(&mut probe)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break elapsed,
                Ok(Ok(_)) => {
                    // Some servers answer 408 before closing; either is fine.
                    let text = String::from_utf8_lossy(&probe).into_owned();
                    assert!(text.starts_with("HTTP/1.1 4"), "{text}");
                    break elapsed;
                }
                Err(_) => {}
            }
        };
        assert!(closed >= Duration::from_secs(25), "closed after only {closed:?}");
        assert_eq!(rig.get("/health").await.status, StatusCode::OK);
    })
    .await;
}

// ------------------------------------------------------------------ faults

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refusing_connections_gives_a_quick_502() {
    within(LIMIT, async {
        let keys = generate_test_keys(2);
        let sim = SimServer::start(SimConfig::default()).unwrap();
        let mut config = proxy_config(&sim, &keys);
        // Nothing listens there.
        config.upstream.base_url = format!("http://127.0.0.1:{}/v1", free_port());
        let server = proxypal_server::start(&config, false).await.unwrap();
        let http = http_client();
        let started = Instant::now();
        let reply = send(&http, chat_request(server.addr(), false)).await;
        let took = started.elapsed();
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{}", reply.text());
        assert_eq!(reply.error_code(), "upstream_unreachable", "{}", reply.text());
        assert!(reply.text().contains("connect"), "{}", reply.text());
        assert!(took < Duration::from_secs(1), "took {took:?}");
        let health = send(&http, get_request(server.addr(), "/health")).await;
        assert_eq!(health.status, StatusCode::OK);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_never_completes_the_tcp_handshake_is_bounded_by_connect_timeout() {
    within(LIMIT, async {
        // A listener that never accepts, with a backlog of 0: once its accept
        // queue is full the kernel drops further SYNs, so connecting hangs.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let blackhole = socket.listen(0).unwrap();
        let target = blackhole.local_addr().unwrap();
        let mut fillers = Vec::new();
        loop {
            assert!(fillers.len() < 16, "the accept queue never filled up");
            match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(target)).await {
                Ok(Ok(conn)) => fillers.push(conn),
                Ok(Err(e)) => panic!("connect failed: {e}"),
                Err(_) => break, // this connect hung: so will the proxy's
            }
        }

        let keys = generate_test_keys(2);
        let sim = SimServer::start(SimConfig::default()).unwrap();
        let mut config = proxy_config(&sim, &keys);
        config.upstream.base_url = format!("http://{target}/v1");
        config.upstream.connect_timeout = Duration::from_millis(300);
        config.retry.max_attempts = 2;
        let server = proxypal_server::start(&config, false).await.unwrap();
        let http = http_client();
        let started = Instant::now();
        let reply = send(&http, chat_request(server.addr(), false)).await;
        let took = started.elapsed();
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.text());
        assert_eq!(reply.error_code(), "upstream_timeout", "{}", reply.text());
        // Two attempts of 300 ms each, not the kernel's minute-long SYN retries.
        assert!(took >= Duration::from_millis(550) && took < Duration::from_secs(2), "took {took:?}");
        drop(fillers);
        drop(blackhole);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_response_headers_on_every_key_give_504() {
    within(LIMIT, async {
        let rig = Rig::start(2, |s| s, |c| c.upstream.response_timeout = Duration::from_millis(300)).await;
        rig.sim.set_fault_always(Some(Fault::Delay(Duration::from_secs(3))));
        let started = Instant::now();
        let reply = rig.chat().await;
        let took = started.elapsed();
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{}", reply.text());
        assert_eq!(reply.error_code(), "upstream_timeout", "{}", reply.text());
        assert_eq!(reply.openai_error()["type"], "timeout_error");
        assert_eq!(rig.sim.stats().total_requests, 2, "each key tried once");
        assert!(took >= Duration::from_millis(550) && took < Duration::from_secs(2), "took {took:?}");

        // The upstream recovers, so does the proxy (the cooldowns are short here).
        rig.sim.clear_faults();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(rig.chat().await.status, StatusCode::OK);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_or_a_dropped_connection_from_upstream_fails_over_then_502s() {
    within(LIMIT, async {
        let rig = Rig::start(2, |s| s, |_| {}).await;

        // One key answers garbage: the other one serves.
        rig.sim.push_fault(Fault::Garbage, FaultTarget::Key(rig.keys[0].clone()));
        let reply = rig.chat().await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(rig.sim.pending_faults(), 0, "key 0 was not tried first");
        assert_eq!(rig.sim.key_stats(&rig.keys[1]).ok, 1);

        // Every answer is garbage, or every connection drops: a clear 502.
        for fault in [Fault::Garbage, Fault::DropConnection] {
            rig.sim.set_fault_always(Some(fault.clone()));
            let before = rig.sim.stats().total_requests;
            let reply = rig.chat().await;
            assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{fault:?}: {}", reply.text());
            assert_eq!(reply.error_code(), "upstream_unreachable", "{fault:?}: {}", reply.text());
            assert_eq!(rig.sim.stats().total_requests - before, 2, "{fault:?}: both keys tried");
            rig.sim.clear_faults();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let reply = rig.chat().await;
            assert_eq!(reply.status, StatusCode::OK, "{fault:?}: {}", reply.text());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_stalled_beyond_idle_timeout_ends_and_others_are_served_meanwhile() {
    within(LIMIT, async {
        let idle = Duration::from_millis(500);
        let rig = Rig::start(2, |s| s, |c| c.upstream.idle_timeout = idle).await;
        rig.sim.push_fault(Fault::StallMidStream { after_chunks: 2 }, FaultTarget::Any);
        let resp = rig.http.request(chat_request(rig.server.addr(), true)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let reading = tokio::spawn(read_stream(resp));

        // While that stream hangs, other clients are served.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(rig.sim.active_streams(), 1);
        let other = rig.chat().await;
        assert_eq!(other.status, StatusCode::OK, "{}", other.text());

        let (frames, error) = reading.await.unwrap();
        let ended = Instant::now();
        let text = frames_text(&frames);
        let events = sse_data(&text);
        assert_eq!(events.len(), 2, "{text}");
        assert!(!events.iter().any(|e| e == "[DONE]"), "{text}");
        assert!(error.is_some(), "a stalled stream must end as an error, not as a complete answer");
        let last = frames.last().unwrap().0;
        let silent = ended - last;
        assert!(silent >= idle - Duration::from_millis(50), "ended after only {silent:?} of silence");
        assert!(silent < idle + Duration::from_secs(1), "the client hung for {silent:?}");

        // The upstream stream and the in-flight slot are released.
        assert!(rig.sim.wait_for(Duration::from_secs(1), |s| s.active_streams == 0).await);
        let deadline = Instant::now() + Duration::from_secs(1);
        while rig.server.app().in_flight() != 0 {
            assert!(Instant::now() < deadline, "in_flight stuck at {}", rig.server.app().in_flight());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let resp = rig.http.request(chat_request(rig.server.addr(), true)).await.unwrap();
        let (frames, error) = read_stream(resp).await;
        assert_eq!(error, None);
        assert_eq!(sse_data(&frames_text(&frames)).last().map(String::as_str), Some("[DONE]"));
    })
    .await;
}

// --------------------------------------------------------------- shutdown

fn keys_yaml(keys: &[String]) -> String {
    keys.iter().map(|k| format!("  - {k}\n")).collect()
}

/// A YAML config for the binary on `port` in front of `sim`.
fn binary_yaml(port: u16, sim: &SimHandle, keys: &[String], extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:{port}\nupstream:\n  base_url: {}\nkeys:\n{}{extra}",
        sim.base_url(),
        keys_yaml(keys)
    )
}

/// Starts a streaming chat completion, returning the task reading it once
/// the simulator is streaming.
async fn start_stream(
    http: &HttpClient,
    addr: std::net::SocketAddr,
    sim: &SimHandle,
) -> tokio::task::JoinHandle<(Vec<(Instant, Bytes)>, Option<String>)> {
    let resp = http.request(chat_request(addr, true)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let reading = tokio::spawn(read_stream(resp));
    assert!(sim.wait_for(Duration::from_secs(2), |s| s.active_streams == 1).await);
    reading
}

/// Whether a new TCP connection to `addr` is refused.
async fn refused(addr: std::net::SocketAddr) -> bool {
    match tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionRefused,
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_an_open_stream_finish_refuses_new_connections_and_exits_0() {
    within(LIMIT, async {
        let keys = generate_test_keys(2);
        let sim = SimServer::start(
            SimConfig::default().with_keys(keys.clone()).with_stream(6, Duration::from_millis(200)),
        )
        .unwrap();
        let dir = TempDir::new("shutdown");
        let port = free_port();
        let config = dir.path("proxypal.yaml");
        std::fs::write(&config, binary_yaml(port, &sim, &keys, "shutdown_grace: 10s\n")).unwrap();
        let mut bin = Binary::start(&config, ([127, 0, 0, 1], port).into()).await;
        let http = http_client();

        let reading = start_stream(&http, bin.addr, &sim).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let signalled = Instant::now();
        bin.signal("TERM");

        // New connections are refused soon after the signal, while the stream goes on.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !refused(bin.addr).await {
            assert!(Instant::now() < deadline, "still accepting connections 2 s after SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!reading.is_finished(), "the stream ended before new connections were refused");

        let (frames, error) = reading.await.unwrap();
        let text = frames_text(&frames);
        assert_eq!(error, None, "the stream was cut: {text}");
        let events = sse_data(&text);
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
        assert_eq!(events.iter().filter(|e| e.contains("\"content\"")).count(), 6, "{text}");
        assert!(
            frames.last().unwrap().0 > signalled + Duration::from_millis(500),
            "the stream was not mid-way"
        );

        let status =
            bin.wait_exit(Duration::from_secs(5)).await.expect("no exit within 5 s of the stream's end");
        assert_eq!(status.code(), Some(0), "{}", bin.log());
        assert!(bin.log().contains("shutting down"), "{}", bin.log());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_with_a_stalled_stream_exits_0_after_the_grace_period() {
    within(LIMIT, async {
        let keys = generate_test_keys(1);
        let sim = SimServer::start(SimConfig::default().with_keys(keys.clone())).unwrap();
        sim.push_fault(Fault::StallMidStream { after_chunks: 1 }, FaultTarget::Any);
        let dir = TempDir::new("grace");
        let port = free_port();
        let config = dir.path("proxypal.yaml");
        std::fs::write(&config, binary_yaml(port, &sim, &keys, "shutdown_grace: 500ms\n")).unwrap();
        let mut bin = Binary::start(&config, ([127, 0, 0, 1], port).into()).await;
        let http = http_client();

        let reading = start_stream(&http, bin.addr, &sim).await;
        let signalled = Instant::now();
        bin.signal("INT");
        let status = bin.wait_exit(Duration::from_millis(1500)).await;
        let took = signalled.elapsed();
        let status = status.unwrap_or_else(|| panic!("still running {took:?} after SIGINT: {}", bin.log()));
        assert_eq!(status.code(), Some(0), "{}", bin.log());
        assert!(took >= Duration::from_millis(450), "exited after {took:?}: it did not wait for the stream");
        assert!(bin.log().contains("grace period over"), "{}", bin.log());
        // The client's stream ended (cut), it does not hang.
        let (_, error) = within(Duration::from_secs(2), reading).await.unwrap();
        assert!(error.is_some());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_exits_at_once() {
    within(LIMIT, async {
        let keys = generate_test_keys(1);
        let sim = SimServer::start(SimConfig::default().with_keys(keys.clone())).unwrap();
        sim.push_fault(Fault::StallMidStream { after_chunks: 1 }, FaultTarget::Any);
        let dir = TempDir::new("second-signal");
        let port = free_port();
        let config = dir.path("proxypal.yaml");
        std::fs::write(&config, binary_yaml(port, &sim, &keys, "shutdown_grace: 60s\n")).unwrap();
        let mut bin = Binary::start(&config, ([127, 0, 0, 1], port).into()).await;
        let http = http_client();

        let _reading = start_stream(&http, bin.addr, &sim).await;
        bin.signal("TERM");
        // The first signal starts a graceful shutdown that waits for the stalled stream.
        assert!(bin.wait_exit(Duration::from_millis(700)).await.is_none(), "{}", bin.log());
        let second = Instant::now();
        bin.signal("TERM");
        let status = bin.wait_exit(Duration::from_secs(1)).await;
        let status =
            status.unwrap_or_else(|| panic!("still running 1 s after the second signal: {}", bin.log()));
        assert!(second.elapsed() < Duration::from_secs(1));
        assert_eq!(status.code(), Some(0), "{}", bin.log());
        assert!(bin.log().contains("second signal"), "{}", bin.log());
    })
    .await;
}

// ------------------------------------------------------------------ reload

/// `/stats` of the binary.
async fn stats(http: &HttpClient, addr: std::net::SocketAddr) -> Value {
    let reply = send(http, get_request(addr, "/stats")).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    reply.json()
}

/// The masked labels of the keys in `/stats`, in order.
fn stat_labels(stats: &Value) -> Vec<String> {
    stats["keys"].as_array().unwrap().iter().map(|k| k["key"].as_str().unwrap().to_owned()).collect()
}

/// `/stats` `requests` of the key labelled `label`.
fn stat_requests(stats: &Value, label: &str) -> u64 {
    let keys = stats["keys"].as_array().unwrap();
    let key = keys.iter().find(|k| k["key"] == label).unwrap_or_else(|| panic!("{label} not in {stats}"));
    key["requests"].as_u64().unwrap()
}

/// Clients sending requests one after another until told to stop; every
/// status they got.
struct Traffic {
    stop: Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<(StatusCode, String)>>>,
}

impl Traffic {
    fn start(addr: std::net::SocketAddr, clients: usize, pause: Duration) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|_| {
                let stop = Arc::clone(&stop);
                let http = http_client();
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    while !stop.load(Ordering::SeqCst) && seen.len() < 100_000 {
                        let reply = send(&http, chat_request(addr, false)).await;
                        let text = if reply.status == StatusCode::OK { String::new() } else { reply.text() };
                        seen.push((reply.status, text));
                        tokio::time::sleep(pause).await;
                    }
                    seen
                })
            })
            .collect();
        Self { stop, tasks }
    }

    async fn finish(self) -> Vec<(StatusCode, String)> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for task in self.tasks {
            all.extend(task.await.unwrap());
        }
        all
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_the_keys_file_reloads_keys_without_dropping_requests() {
    within(LIMIT, async {
        let keys = generate_test_keys(3);
        let (kept, removed, added) = (&keys[0], &keys[1], &keys[2]);
        let sim = SimServer::start(SimConfig::default().with_keys(keys.clone())).unwrap();
        let dir = TempDir::new("reload-keys");
        let port = free_port();
        let keys_file = dir.path("keys.txt");
        std::fs::write(&keys_file, format!("{kept}\n{removed}\n")).unwrap();
        let config = dir.path("proxypal.yaml");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\nupstream:\n  base_url: {}\nkeys_file: keys.txt\n\
                 rate_limit:\n  requests_per_minute: 600000\n  burst: 100\nshutdown_grace: 2s\n",
                sim.base_url()
            ),
        )
        .unwrap();
        let mut bin = Binary::start(&config, ([127, 0, 0, 1], port).into()).await;
        let http = http_client();
        assert_eq!(stat_labels(&stats(&http, bin.addr).await), [masked(kept), masked(removed)]);

        let traffic = Traffic::start(bin.addr, 2, Duration::from_millis(5));
        assert!(
            sim.wait_for(Duration::from_secs(5), |s| s.key(kept).ok >= 20 && s.key(removed).ok >= 20).await,
            "no traffic"
        );

        replace_file(&keys_file, &format!("# rotated\n{kept}\n{added}\n"));
        let edited = Instant::now();
        let want = [masked(kept), masked(added)];
        loop {
            if stat_labels(&stats(&http, bin.addr).await) == want {
                break;
            }
            assert!(edited.elapsed() < Duration::from_secs(3), "no reload 3 s after the edit: {}", bin.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The removed key gets nothing more (after requests already sent on it finish).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let removed_count = sim.key_stats(removed).requests;
        let added_before = sim.key_stats(added).requests;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(sim.key_stats(removed).requests, removed_count, "the removed key still gets traffic");
        assert!(sim.key_stats(added).requests >= added_before + 10, "the new key gets no traffic");

        let seen = traffic.finish().await;
        let failed: Vec<_> = seen.iter().filter(|(s, _)| *s != StatusCode::OK).collect();
        assert!(failed.is_empty(), "{} of {} requests failed: {:?}", failed.len(), seen.len(), &failed[..1]);

        // The kept key kept its counters: the proxy counted every request the
        // upstream saw on it, before the reload too. The new key starts at 0.
        let after = stats(&http, bin.addr).await;
        assert_eq!(stat_requests(&after, &masked(kept)), sim.key_stats(kept).requests, "{after}");
        assert_eq!(stat_requests(&after, &masked(added)), sim.key_stats(added).requests, "{after}");
        assert_eq!(after["reloads"], 1, "{after}");
        assert!(bin.log().contains("configuration reloaded"), "{}", bin.log());

        bin.signal("TERM");
        assert_eq!(bin.wait_exit(Duration::from_secs(5)).await.and_then(|s| s.code()), Some(0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reloads_are_refused_and_sighup_applies_a_yaml_edit() {
    within(LIMIT, async {
        let keys = generate_test_keys(2);
        let sim = SimServer::start(SimConfig::default().with_keys(keys.clone())).unwrap();
        let dir = TempDir::new("reload-yaml");
        let port = free_port();
        let config = dir.path("proxypal.yaml");
        let yaml = |rpm: u32, burst: u32| {
            binary_yaml(
                port,
                &sim,
                &keys,
                &format!(
                    "rate_limit:\n  requests_per_minute: {rpm}\n  burst: {burst}\n\
                     retry:\n  queue_timeout: 200ms\nshutdown_grace: 2s\n"
                ),
            )
        };
        std::fs::write(&config, yaml(600_000, 100)).unwrap();
        let mut bin = Binary::start(&config, ([127, 0, 0, 1], port).into()).await;
        let http = http_client();
        let burst_of_six = || async {
            let mut ok = 0;
            for _ in 0..6 {
                let reply = send(&http, chat_request(bin.addr, false)).await;
                match reply.status {
                    StatusCode::OK => ok += 1,
                    StatusCode::TOO_MANY_REQUESTS => {}
                    other => panic!("unexpected {other}: {}", reply.text()),
                }
            }
            ok
        };
        assert_eq!(burst_of_six().await, 6);

        // An invalid edit (noticed by the file watcher) is refused and logged;
        // the old configuration keeps serving.
        replace_file(&config, &yaml(0, 100));
        assert!(
            bin.wait_log("reload refused", Duration::from_secs(4)).await,
            "no refusal logged: {}",
            bin.log()
        );
        assert!(bin.log().contains("rate_limit.requests_per_minute"), "{}", bin.log());
        assert_eq!(burst_of_six().await, 6);
        assert_eq!(stats(&http, bin.addr).await["reloads"], 0);

        // A valid edit the watcher cannot see (same modification time as the
        // invalid one): nothing changes until SIGHUP.
        let mtime = std::fs::metadata(&config).unwrap().modified().unwrap();
        let tmp = dir.path("proxypal.yaml.new");
        std::fs::write(&tmp, yaml(1, 1)).unwrap();
        std::fs::File::options().write(true).open(&tmp).unwrap().set_modified(mtime).unwrap();
        std::fs::rename(&tmp, &config).unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(burst_of_six().await, 6, "the config changed without a reload");
        assert!(!bin.log().contains("configuration reloaded"), "{}", bin.log());

        bin.signal("HUP");
        assert!(
            bin.wait_log("configuration reloaded", Duration::from_secs(3)).await,
            "SIGHUP did not reload: {}",
            bin.log()
        );
        // 1 request per minute per key, burst 1: at most one more request per key.
        let ok = burst_of_six().await;
        assert!(ok <= 2, "{ok} of 6 requests passed a limit of 1/min on 2 keys");
        assert_eq!(stats(&http, bin.addr).await["reloads"], 1);

        bin.signal("TERM");
        assert_eq!(bin.wait_exit(Duration::from_secs(5)).await.and_then(|s| s.code()), Some(0));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_reload_with_an_invalid_config_keeps_the_old_keys() {
    within(LIMIT, async {
        let rig = Rig::start(2, |s| s, |_| {}).await;
        assert_eq!(rig.chat().await.status, StatusCode::OK);
        let mut bad = proxy_config(&rig.sim, &generate_test_keys(2));
        bad.keys[1].limits.requests_per_minute = Some(0);
        assert!(rig.server.app().reload(&bad).is_err());
        let stats = rig.get("/stats").await.json();
        assert_eq!(stat_labels(&stats), [masked(&rig.keys[0]), masked(&rig.keys[1])]);
        assert_eq!(stats["reloads"], 0);
        for _ in 0..4 {
            assert_eq!(rig.chat().await.status, StatusCode::OK);
        }
    })
    .await;
}
