//! A real HTTP/1.1 receiver on 127.0.0.1 that records what it is sent and answers as a
//! script says, plus helpers shared by the tests.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use proxypal_webhooks::WebhookConfig;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Every test's body runs under this bound.
pub const TEST_BOUND: Duration = Duration::from_secs(20);

/// Runs `test` and fails it if it takes longer than [`TEST_BOUND`].
pub async fn bounded<F: Future<Output = ()>>(test: F) {
    tokio::time::timeout(TEST_BOUND, test).await.expect("test exceeded its time bound");
}

/// How the receiver answers one request.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    Status(u16),
    /// Never answers (the connection stays open).
    Hang,
}

/// One request as the receiver saw it.
#[derive(Debug)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("no {name} header"))
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }

    pub fn kind(&self) -> String {
        self.json()["type"].as_str().expect("type is a string").to_owned()
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    rx: mpsc::UnboundedReceiver<Received>,
    accept: JoinHandle<()>,
}

impl TestServer {
    /// Starts a receiver answering the `n`-th request (0-based) with `script(n)`.
    pub async fn start(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        let script = Arc::new(script);
        let count = Arc::new(AtomicUsize::new(0));
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let (tx, script, count) = (tx.clone(), Arc::clone(&script), Arc::clone(&count));
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (tx, script, count) = (tx.clone(), Arc::clone(&script), Arc::clone(&count));
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let n = count.fetch_add(1, Ordering::SeqCst);
                            let _ = tx.send(Received { headers: parts.headers, body, at: Instant::now() });
                            let status = match script(n) {
                                Reply::Status(s) => s,
                                Reply::Hang => std::future::pending::<u16>().await,
                            };
                            let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        TestServer { addr, rx, accept }
    }

    /// A receiver that always answers `status`.
    pub async fn always(status: u16) -> TestServer {
        TestServer::start(move |_| Reply::Status(status)).await
    }

    pub fn url(&self) -> String {
        format!("http://{}/hooks/proxypal", self.addr)
    }

    /// The next request, waiting at most `within`.
    pub async fn next(&mut self, within: Duration) -> Option<Received> {
        tokio::time::timeout(within, self.rx.recv()).await.ok().flatten()
    }

    /// Everything received so far, without waiting.
    pub fn drain(&mut self) -> Vec<Received> {
        let mut all = Vec::new();
        while let Ok(r) = self.rx.try_recv() {
            all.push(r);
        }
        all
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// Test-sized retries: 3 attempts, 10 ms first backoff, 2 s per attempt.
pub fn quick_config(endpoints: Vec<proxypal_webhooks::Endpoint>) -> WebhookConfig {
    WebhookConfig {
        endpoints,
        max_attempts: 3,
        first_backoff: Duration::from_millis(10),
        timeout: Duration::from_secs(2),
        ..WebhookConfig::default()
    }
}

/// The value of the series `name{labels}` (exact text, as encoded) in `registry`.
pub fn metric(registry: &Registry, series: &str) -> f64 {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
        .parse()
        .unwrap()
}

/// `proxypal_webhook_deliveries_total{event=..,result=..}`.
pub fn deliveries(registry: &Registry, event: &str, result: &str) -> f64 {
    metric(registry, &format!(r#"proxypal_webhook_deliveries_total{{event="{event}",result="{result}"}}"#))
}

/// Unix seconds now.
pub fn now_s() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}
