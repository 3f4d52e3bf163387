//! Integration tests: a real `Upstream` against a real hyper server on 127.0.0.1.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use proxypal_upstream::{ErrorKind, RequestParts, UpstreamError};
use tokio::sync::{mpsc, oneshot};

use crate::support::{
    self, PROMPTLY, SECRET, assert_no_secrets, channel, full, key, ok, serve, spaced_events,
};

/// What the server saw.
#[derive(Debug)]
struct Seen {
    method: Method,
    uri: http::Uri,
    headers: HeaderMap,
    body: Bytes,
}

/// A server that reports each request on the returned channel and answers `201 created`.
async fn recording_server() -> (support::TestServer, mpsc::UnboundedReceiver<Seen>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let server = serve(move |req| {
        let tx = tx.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            tx.send(Seen { method: parts.method, uri: parts.uri, headers: parts.headers, body }).unwrap();
            Response::builder()
                .status(StatusCode::CREATED)
                .header("x-end-to-end", "yes")
                .header("connection", "x-resp-hop")
                .header("x-resp-hop", "1")
                .header("keep-alive", "timeout=5")
                .header("proxy-authenticate", "Basic")
                .body(full("created"))
                .unwrap()
        }
    })
    .await;
    (server, rx)
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in pairs {
        h.append(*n, HeaderValue::from_static(v));
    }
    h
}

#[tokio::test]
async fn forwards_end_to_end_headers_method_query_and_body() {
    let (server, mut seen) = recording_server().await;
    let upstream = server.upstream_with(|c| c.user_agent = HeaderValue::from_static("proxypal/test"));
    let client_headers = headers(&[
        ("content-type", "application/json"),
        ("accept", "text/event-stream"),
        ("x-request-id", "req-1"),
        ("x-multi", "a"),
        ("x-multi", "b"),
        ("te", "trailers"),
        ("connection", "keep-alive, x-client-hop"),
        ("x-client-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("upgrade", "h2c"),
        ("trailer", "x-checksum"),
        ("proxy-authorization", "Basic cHJveHk6cHc="),
        ("proxy-connection", "keep-alive"),
        ("authorization", "Bearer client-token"),
        ("x-api-key", "client-token"),
        ("host", "proxy.local:8080"),
        ("content-length", "999"),
        ("expect", "100-continue"),
        ("user-agent", "OpenAI/Python 1.99.0"),
    ]);
    let parts = RequestParts::new(Method::POST, "/chat/completions?x=1&y=two", client_headers);
    let body = Bytes::from_static(br#"{"model":"m","messages":[{"role":"user","content":"hi \u00e9"}]}"#);

    let response = upstream.send(&parts, body.clone(), &key()).await.unwrap();

    let seen = seen.recv().await.unwrap();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.uri, "/v1/chat/completions?x=1&y=two");
    assert_eq!(seen.body, body);
    let h = &seen.headers;
    assert_eq!(h["authorization"], format!("Bearer {SECRET}").as_str());
    assert_eq!(h.get_all("authorization").iter().count(), 1);
    assert_eq!(h["host"], server.addr.to_string().as_str());
    assert_eq!(h["user-agent"], "proxypal/test");
    assert_eq!(h["content-length"], body.len().to_string().as_str());
    assert_eq!(h["content-type"], "application/json");
    assert_eq!(h["accept"], "text/event-stream");
    assert_eq!(h["x-request-id"], "req-1");
    assert_eq!(h.get_all("x-multi").iter().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(h["te"], "trailers");
    for gone in [
        "x-client-hop",
        "keep-alive",
        "upgrade",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "x-api-key",
        "expect",
        "transfer-encoding",
    ] {
        assert!(h.get(gone).is_none(), "{gone} was forwarded: {h:?}");
    }
    // hyper's server may add nothing else: the exact set of names is what we forwarded.
    let mut names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "accept",
            "authorization",
            "content-length",
            "content-type",
            "host",
            "te",
            "user-agent",
            "x-multi",
            "x-request-id"
        ]
    );

    // The response: status kept, end-to-end headers kept, hop-by-hop ones stripped, and the
    // Content-Length framing preserved for the server to pass on.
    assert_eq!(response.status(), StatusCode::CREATED);
    let rh = response.headers();
    assert_eq!(rh["x-end-to-end"], "yes");
    assert_eq!(rh["content-length"], "7");
    for gone in ["connection", "x-resp-hop", "keep-alive", "proxy-authenticate"] {
        assert!(rh.get(gone).is_none(), "{gone} came back: {rh:?}");
    }
    let body = response.into_body();
    assert_eq!(body.size_hint().exact(), Some(7));
    assert_eq!(body.collect().await.unwrap().to_bytes(), "created");
}

#[tokio::test]
async fn a_plain_request_keeps_its_headers_with_host_key_and_agent_replaced() {
    // No hop-by-hop header: the fast path (a clone of the client's headers plus replacements).
    let (server, mut seen) = recording_server().await;
    let upstream = server.upstream_with(|c| c.user_agent = HeaderValue::from_static("proxypal/test"));
    let body = Bytes::from_static(br#"{"model":"m"}"#);
    let client_headers = headers(&[
        ("host", "proxy.local:8080"),
        ("authorization", "Bearer client-token"),
        ("user-agent", "OpenAI/Python 1.99.0"),
        ("content-type", "application/json"),
        ("content-length", "13"),
        ("x-request-id", "req-2"),
    ]);
    let parts = RequestParts::new(Method::POST, "/chat/completions", client_headers);

    upstream.send(&parts, body.clone(), &key()).await.unwrap();

    let seen = seen.recv().await.unwrap();
    let h = &seen.headers;
    let all = |name: &str| h.get_all(name).iter().map(|v| v.to_str().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(all("host"), [server.addr.to_string()]);
    assert_eq!(all("authorization"), [format!("Bearer {SECRET}")]);
    assert_eq!(all("user-agent"), ["proxypal/test"]);
    assert_eq!(all("content-length"), ["13"]);
    assert_eq!(all("x-request-id"), ["req-2"]);
    assert_eq!(seen.body, body);
    assert_eq!(h.len(), 6, "{h:?}");
}

#[tokio::test]
async fn base_url_path_prefix_and_get_without_body() {
    let (server, mut seen) = recording_server().await;
    let upstream = server.upstream_with(|c| c.base_url = server.url("/nvidia/v1/"));
    let parts = RequestParts::new(Method::GET, "/models?limit=2", HeaderMap::new());

    let response = upstream.send(&parts, Bytes::new(), &key()).await.unwrap();

    let seen = seen.recv().await.unwrap();
    assert_eq!(seen.method, Method::GET);
    assert_eq!(seen.uri, "/nvidia/v1/models?limit=2");
    assert!(seen.body.is_empty());
    assert!(seen.headers.get("content-length").is_none(), "{:?}", seen.headers);
    assert_eq!(seen.headers["user-agent"], concat!("proxypal/", env!("CARGO_PKG_VERSION")));
    assert_eq!(response.status(), StatusCode::CREATED);
}

#[tokio::test]
async fn streams_each_chunk_as_its_own_frame_without_coalescing() {
    const CHUNKS: usize = 5;
    const GAP: Duration = Duration::from_millis(50);
    let server = serve(|_req| async { spaced_events(CHUNKS, GAP) }).await;
    let parts = RequestParts::new(Method::POST, "/chat/completions", HeaderMap::new());

    let response = server.upstream().send(&parts, Bytes::new(), &key()).await.unwrap();

    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert!(response.headers().get("transfer-encoding").is_none());
    let mut body = response.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        frames.push((Instant::now(), data));
    }
    let datas: Vec<String> = frames.iter().map(|(_, d)| String::from_utf8(d.to_vec()).unwrap()).collect();
    let want: Vec<String> = (0..CHUNKS).map(|i| format!("data: {{\"i\":{i}}}\n\n")).collect();
    assert_eq!(datas, want, "one frame per chunk, in order");
    for pair in frames.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(gap > Duration::from_millis(30), "frames {gap:?} apart: coalesced?");
    }
}

#[tokio::test]
async fn response_timeout_fires_and_cancels_the_upstream_request() {
    let (dropped_tx, dropped_rx) = oneshot::channel::<Instant>();
    let dropped_tx = std::sync::Mutex::new(Some(dropped_tx));
    let dropped_tx = std::sync::Arc::new(dropped_tx);
    let server = serve(move |_req| {
        // Reports when hyper drops this handler, i.e. when the client went away.
        struct OnDrop(Option<oneshot::Sender<Instant>>);
        impl Drop for OnDrop {
            fn drop(&mut self) {
                if let Some(tx) = self.0.take() {
                    let _ = tx.send(Instant::now());
                }
            }
        }
        let guard = OnDrop(dropped_tx.lock().unwrap().take());
        async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_secs(30)).await;
            ok(full("too late"))
        }
    })
    .await;
    let timeout = Duration::from_millis(200);
    let upstream = server.upstream_with(|c| c.response_timeout = timeout);
    let parts = RequestParts::new(Method::POST, "/chat/completions", HeaderMap::new());

    let start = Instant::now();
    let err = upstream.send(&parts, Bytes::new(), &key()).await.unwrap_err();
    let took = start.elapsed();

    assert!(matches!(err, UpstreamError::ResponseTimeout { after, .. } if after == timeout), "{err:?}");
    assert!(err.is_timeout() && !err.is_connect());
    assert_eq!(err.kind(), ErrorKind::ResponseTimeout);
    assert!(took >= timeout && took < timeout + PROMPTLY, "took {took:?}");
    assert_eq!(
        err.to_string(),
        format!("upstream http://{}/v1/chat/completions sent no response headers within 200ms", server.addr)
    );
    let dropped_at = tokio::time::timeout(PROMPTLY, dropped_rx)
        .await
        .expect("the server never noticed the client went away")
        .unwrap();
    assert!(dropped_at - start < timeout + PROMPTLY);
}

#[tokio::test]
async fn idle_timeout_fails_a_stalled_body() {
    let server = serve(|_req| async {
        let (mut tx, body) = channel();
        tokio::spawn(async move {
            let _ = tx.send_data(Bytes::from_static(b"data: first\n\n")).await;
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(tx);
        });
        ok(body)
    })
    .await;
    let idle = Duration::from_millis(200);
    let upstream = server.upstream_with(|c| c.idle_timeout = idle);
    let parts = RequestParts::new(Method::POST, "/chat/completions", HeaderMap::new());

    let mut body = upstream.send(&parts, Bytes::new(), &key()).await.unwrap().into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "data: first\n\n");
    let after_first = Instant::now();
    let err = body.frame().await.unwrap().unwrap_err();
    let waited = after_first.elapsed();

    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::IdleTimeout);
    assert_eq!(err.to_string(), "upstream response body was idle for 200ms");
    assert!(waited >= idle - Duration::from_millis(20), "waited only {waited:?}");
    assert!(waited < idle + PROMPTLY, "waited {waited:?}");
    assert!(body.is_end_stream());
    assert!(body.frame().await.is_none(), "a timed-out body ends");
}

#[tokio::test]
async fn idle_timeout_does_not_cut_a_slow_but_steady_stream() {
    // Chunks every 60 ms with a 150 ms idle timeout: the stream outlives the timeout several
    // times over, yet never trips it.
    let server = serve(|_req| async {
        let (mut tx, body) = channel();
        tokio::spawn(async move {
            for _ in 0..8 {
                tokio::time::sleep(Duration::from_millis(60)).await;
                if tx.send_data(Bytes::from_static(b"tick")).await.is_err() {
                    return;
                }
            }
        });
        ok(body)
    })
    .await;
    let upstream = server.upstream_with(|c| c.idle_timeout = Duration::from_millis(150));
    let parts = RequestParts::new(Method::GET, "/stream", HeaderMap::new());

    let body = upstream.send(&parts, Bytes::new(), &key()).await.unwrap().into_body();
    let all = body.collect().await.unwrap().to_bytes();
    assert_eq!(all, "tick".repeat(8));
}

#[tokio::test]
async fn connection_refused_is_a_connect_error_that_hides_the_key() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let upstream = proxypal_upstream::Upstream::new(proxypal_upstream::UpstreamConfig {
        base_url: format!("http://{addr}/v1").parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    let mut client_headers = HeaderMap::new();
    client_headers.insert("authorization", HeaderValue::from_static("Bearer client-secret-xyz"));
    let parts = RequestParts::new(Method::POST, "/chat/completions?api_key=q-secret", client_headers);

    let err = upstream.send(&parts, Bytes::new(), &key()).await.unwrap_err();

    assert!(err.is_connect(), "{err:?}");
    assert!(!err.is_timeout());
    assert_eq!(err.kind(), ErrorKind::Connect);
    let display = err.to_string();
    assert!(
        display.starts_with(&format!(
            "cannot connect to upstream http://{addr}/v1/chat/completions: tcp connect error"
        )),
        "{display}"
    );
    assert_no_secrets(&err);
}

#[tokio::test]
async fn upstream_closing_without_a_response_is_a_protocol_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        // Read a little, then hang up without answering.
        use tokio::io::AsyncReadExt as _;
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 64];
            let _ = stream.read(&mut buf).await;
        }
    });
    let upstream = proxypal_upstream::Upstream::new(proxypal_upstream::UpstreamConfig {
        base_url: format!("http://{addr}/v1").parse().unwrap(),
        ..Default::default()
    })
    .unwrap();
    let parts = RequestParts::new(Method::POST, "/chat/completions", HeaderMap::new());

    let err = upstream.send(&parts, Bytes::from_static(b"{}"), &key()).await.unwrap_err();

    assert!(matches!(err, UpstreamError::Protocol { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Protocol);
    assert!(!err.is_connect() && !err.is_timeout());
    assert_no_secrets(&err);
}

#[tokio::test]
async fn sequential_requests_reuse_one_pooled_connection() {
    let server = serve(|_req| async { ok(full("pong")) }).await;
    let upstream = server.upstream();
    let parts = RequestParts::new(Method::GET, "/models", HeaderMap::new());

    for _ in 0..5 {
        let response = upstream.clone().send(&parts, Bytes::new(), &key()).await.unwrap();
        assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "pong");
    }

    assert_eq!(server.accepted(), 1);
}

#[tokio::test]
async fn dropping_the_body_mid_stream_disconnects_from_the_upstream() {
    let (gone_tx, gone_rx) = oneshot::channel::<Instant>();
    let gone_tx = std::sync::Arc::new(std::sync::Mutex::new(Some(gone_tx)));
    let server = serve(move |_req| {
        let gone_tx = gone_tx.lock().unwrap().take();
        async move {
            let (mut tx, body) = channel();
            tokio::spawn(async move {
                // Stream until the client is gone, then report when that was noticed.
                while tx.send_data(Bytes::from_static(b"data: tick\n\n")).await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                if let Some(gone_tx) = gone_tx {
                    let _ = gone_tx.send(Instant::now());
                }
            });
            ok(body)
        }
    })
    .await;
    let parts = RequestParts::new(Method::POST, "/chat/completions", HeaderMap::new());

    let mut body = server.upstream().send(&parts, Bytes::new(), &key()).await.unwrap().into_body();
    for _ in 0..2 {
        body.frame().await.unwrap().unwrap();
    }
    let dropped_at = Instant::now();
    drop(body);

    let gone_at = tokio::time::timeout(PROMPTLY, gone_rx)
        .await
        .expect("the upstream kept streaming to a dropped body for over 1 s")
        .unwrap();
    assert!(gone_at - dropped_at < PROMPTLY);
}

#[tokio::test]
async fn invalid_target_is_rejected_before_connecting() {
    let server = serve(|_req| async { ok(full("should not be reached")) }).await;
    let parts = RequestParts::new(Method::GET, "/../admin", HeaderMap::new());

    let err = server.upstream().send(&parts, Bytes::new(), &key()).await.unwrap_err();

    assert_eq!(err.kind(), ErrorKind::InvalidTarget);
    assert_eq!(server.accepted(), 0);
}
