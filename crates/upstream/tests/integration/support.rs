//! A tiny hyper HTTP/1 server on 127.0.0.1 that plays the upstream.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::{BodyExt as _, Full, channel::Channel, combinators::BoxBody};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use proxypal_upstream::{Upstream, UpstreamConfig};
use tokio::{net::TcpListener, task::JoinHandle};

/// The response body type the test handlers return.
pub type TestBody = BoxBody<Bytes, Infallible>;

/// A running test server; stops accepting when dropped.
pub struct TestServer {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestServer {
    /// How many TCP connections the server has accepted.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// `http://127.0.0.1:<port><path>` as a base URL.
    pub fn url(&self, path: &str) -> Uri {
        format!("http://{}{path}", self.addr).parse().unwrap()
    }

    /// An `Upstream` for this server with base path `/v1`, tweaked by `f`.
    pub fn upstream_with(&self, f: impl FnOnce(&mut UpstreamConfig)) -> Upstream {
        let mut cfg = UpstreamConfig { base_url: self.url("/v1"), ..UpstreamConfig::default() };
        f(&mut cfg);
        Upstream::new(cfg).unwrap()
    }

    /// An `Upstream` for this server with base path `/v1` and default settings.
    pub fn upstream(&self) -> Upstream {
        self.upstream_with(|_| {})
    }
}

/// Serves `handler` on a fresh port until the returned server is dropped.
pub async fn serve<F, Fut>(handler: F) -> TestServer
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let handler = Arc::new(handler);
    let task = tokio::spawn({
        let accepted = accepted.clone();
        async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        }
    });
    TestServer { addr, accepted, task }
}

/// A fixed body.
pub fn full(data: impl Into<Bytes>) -> TestBody {
    Full::new(data.into()).boxed()
}

/// A streaming body fed through the returned sender.
pub fn channel() -> (http_body_util::channel::Sender<Bytes>, TestBody) {
    let (tx, body) = Channel::<Bytes>::new(1);
    (tx, body.boxed())
}

/// A `text/event-stream` response whose body sends `chunks` SSE events
/// (`data: {"i":N}`), `gap` apart, each as its own frame.
pub fn spaced_events(chunks: usize, gap: std::time::Duration) -> Response<TestBody> {
    let (mut tx, body) = channel();
    tokio::spawn(async move {
        for i in 0..chunks {
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            let event = format!("data: {{\"i\":{i}}}\n\n");
            if tx.send_data(Bytes::from(event)).await.is_err() {
                return;
            }
        }
    });
    Response::builder().header("content-type", "text/event-stream").body(body).unwrap()
}

/// A 200 response with `body`.
pub fn ok(body: TestBody) -> Response<TestBody> {
    Response::new(body)
}

/// The secret used in tests; it must never show up in any error text.
pub const SECRET: &str = "nvapi-TEST-secret-0123456789";

/// `Bearer <SECRET>`.
pub fn key() -> HeaderValue {
    proxypal_upstream::bearer(SECRET).unwrap()
}

/// Generous upper bound for "should happen promptly" on a loaded 2-core machine.
pub const PROMPTLY: Duration = Duration::from_secs(1);

/// Fails if `err`, its `Debug` form or any error in its source chain contains a secret the
/// tests use (the upstream key, the client's token, a query-string secret).
pub fn assert_no_secrets(err: &(dyn std::error::Error + 'static)) {
    let mut texts = vec![err.to_string(), format!("{err:?}")];
    let mut cur = err.source();
    while let Some(e) = cur {
        texts.push(format!("{e} {e:?}"));
        cur = e.source();
    }
    for text in texts {
        for secret in [SECRET, "client-secret-xyz", "q-secret"] {
            assert!(!text.contains(secret), "{secret:?} leaked: {text}");
        }
    }
}
