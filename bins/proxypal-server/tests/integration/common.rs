//! Helpers for the end-to-end proxy tests: a simulated NVIDIA upstream and
//! the real server on 127.0.0.1 ephemeral ports, driven by a real HTTP client.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use proxypal_nim_sim::{SimConfig, SimHandle, SimServer, generate_test_keys};
use proxypal_server::Running;
use proxypal_server::config::{Config, KeyEntry};
use serde_json::{Value, json};

/// Upper bound on any single test.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs a test body, failing it if it takes longer than [`TEST_TIMEOUT`].
pub async fn bounded<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, f).await.expect("test timed out")
}

/// The HTTP/1 client the tests drive the proxy with.
pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A fresh client (its own connection pool).
pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// A proxy config in front of `sim` with `keys`: port 0, fast limits
/// (60 000/min, burst 10: never in the way unless a test says so), a 5 s queue.
pub fn proxy_config(sim: &SimHandle, keys: &[String]) -> Config {
    let mut config = Config::default();
    config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.upstream.base_url = sim.base_url();
    config.keys = keys.iter().map(KeyEntry::new).collect();
    config.rate_limit.requests_per_minute = Some(60_000);
    config.retry.queue_timeout = Duration::from_secs(5);
    config.shutdown_grace = Duration::from_secs(2);
    // No state file unless a test asks for one (tests run side by side).
    config.state.path = None;
    config
}

/// A running simulator and proxy.
pub struct Rig {
    /// The simulated upstream.
    pub sim: SimHandle,
    /// The proxy.
    pub server: Running,
    /// The keys the proxy was started with, in config order.
    pub keys: Vec<String>,
    /// A client for the proxy.
    pub http: HttpClient,
}

impl Rig {
    /// `n` generated keys, a sim accepting them (shaped by `sim`), and the
    /// proxy configured by [`proxy_config`] then `tweak`.
    pub async fn start(
        n: usize,
        sim: impl FnOnce(SimConfig) -> SimConfig,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let keys = generate_test_keys(n);
        let sim = SimServer::start(sim(SimConfig::default().with_keys(keys.clone()))).unwrap();
        let mut config = proxy_config(&sim, &keys);
        tweak(&mut config);
        let server = proxypal_server::start(&config, false).await.unwrap();
        assert_ne!(server.addr().port(), 0, "listen port 0 must bind an ephemeral port");
        Self { sim, server, keys, http: http_client() }
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.server.addr())
    }

    /// POSTs a chat completion (non-streaming) and reads the whole answer.
    pub async fn chat(&self) -> Reply {
        send(&self.http, chat_request(self.server.addr(), false, &[])).await
    }

    /// GETs `path` with optional extra headers.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut req = Request::builder().method(Method::GET).uri(self.url(path));
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        send(&self.http, req.body(Full::new(Bytes::new())).unwrap()).await
    }

    /// `/stats` as JSON (no token).
    pub async fn stats(&self) -> Value {
        let reply = self.get("/stats", &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        reply.json()
    }

    /// `/stats` `keys[index]`.
    pub async fn key_stats(&self, index: usize) -> Value {
        let stats = self.stats().await;
        let key = stats["keys"][index].clone();
        assert_eq!(key["key"], masked(&self.keys[index]), "stats keys are in config order: {stats}");
        key
    }
}

/// How the proxy labels a key in logs and stats (`nvapi-…wxyz`).
pub fn masked(key: &str) -> String {
    let label = proxypal_server::config::mask_key(key);
    assert!(label.starts_with("nvapi-…") && key.ends_with(&label["nvapi-…".len()..]), "{label}");
    label
}

/// A chat completion request to the proxy at `addr`.
pub fn chat_request(addr: SocketAddr, stream: bool, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let body = json!({
        "model": "meta/llama-3.1-8b-instruct",
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": stream,
    });
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json");
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    req.body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

/// A whole response.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// Asserts an OpenAI-shaped error body `{"error":{"message","type","code"}}`
    /// and returns its `error` object.
    #[track_caller]
    pub fn openai_error(&self) -> Value {
        let v = self.json();
        let err = &v["error"];
        assert!(err.is_object(), "not an OpenAI error: {v}");
        for field in ["message", "type", "code"] {
            assert!(err[field].is_string(), "error.{field} missing or not a string: {v}");
        }
        assert_eq!(
            self.headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "{v}"
        );
        err.clone()
    }

    /// `error.message` of an OpenAI-shaped error.
    #[track_caller]
    pub fn error_message(&self) -> String {
        self.openai_error()["message"].as_str().unwrap().to_owned()
    }

    /// `error.code` of an OpenAI-shaped error.
    #[track_caller]
    pub fn error_code(&self) -> String {
        self.openai_error()["code"].as_str().unwrap().to_owned()
    }
}

/// Sends `req` and reads the whole answer.
pub async fn send(http: &HttpClient, req: Request<Full<Bytes>>) -> Reply {
    let resp = http.request(req).await.unwrap();
    let (head, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply { status: head.status, headers: head.headers, body }
}
