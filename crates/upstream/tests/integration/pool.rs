//! The connection pool, seen from the upstream's side of the socket: a raw HTTP/1.1 server on
//! 127.0.0.1 that counts the connections it accepts and notices when the client closes one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt as _;
use proxypal_upstream::{RequestParts, Upstream, UpstreamConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::support::{full, key, ok, serve};

/// A hand-written HTTP/1.1 server: answers each GET with `pong` after `delay`, and closes the
/// connection after each answer if `close_after_answer` (without saying so in the response).
struct RawServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Connections the *client* closed (EOF while waiting for a request).
    client_closed: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for RawServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl RawServer {
    async fn start(close_after_answer: bool, delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let client_closed = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn({
            let (accepted, client_closed) = (accepted.clone(), client_closed.clone());
            async move {
                loop {
                    let (mut sock, _) = listener.accept().await.unwrap();
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let client_closed = client_closed.clone();
                    tokio::spawn(async move {
                        let mut buf = Vec::new();
                        let mut chunk = [0u8; 4096];
                        loop {
                            // One request head (the tests send GETs without a body).
                            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                                match sock.read(&mut chunk).await {
                                    Ok(0) | Err(_) => {
                                        client_closed.fetch_add(1, Ordering::SeqCst);
                                        return;
                                    }
                                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                                }
                            }
                            buf.clear();
                            tokio::time::sleep(delay).await;
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 4\r\n\r\npong";
                            if sock.write_all(answer).await.is_err() || close_after_answer {
                                return;
                            }
                        }
                    });
                }
            }
        });
        Self { addr, accepted, client_closed, task }
    }

    fn upstream_with(&self, f: impl FnOnce(&mut UpstreamConfig)) -> Upstream {
        let mut cfg = UpstreamConfig {
            base_url: format!("http://{}/v1", self.addr).parse().unwrap(),
            ..UpstreamConfig::default()
        };
        f(&mut cfg);
        Upstream::new(cfg).unwrap()
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn client_closed(&self) -> usize {
        self.client_closed.load(Ordering::SeqCst)
    }
}

fn get() -> RequestParts {
    RequestParts::new(Method::GET, "/models", HeaderMap::new())
}

async fn get_pong(upstream: &Upstream) {
    let response = upstream.send(&get(), Bytes::new(), &key()).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "pong");
}

/// Waits up to 3 s for `cond`, polling every 10 ms.
async fn eventually(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..300 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not within 3 s: {what}");
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_skipped_without_failing_the_request() {
    let server = RawServer::start(true, Duration::ZERO).await;
    let upstream = server.upstream_with(|_| {});

    for i in 1..=10 {
        get_pong(&upstream).await;
        // The upstream closed the connection after answering; once the client has seen the
        // close, the pooled connection is dead and must not be used.
        eventually("the client noticed the close", || server.accepted() == i).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.accepted(), 10);
}

#[tokio::test]
async fn back_to_back_requests_survive_an_upstream_that_closes_after_each_answer() {
    // No pause: the next request may find the pooled connection before its close has been
    // processed; a request that was never written is retried on a new connection.
    let server = RawServer::start(true, Duration::ZERO).await;
    let upstream = server.upstream_with(|_| {});
    for _ in 0..50 {
        get_pong(&upstream).await;
    }
    assert_eq!(server.accepted(), 50);
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_pool_idle_timeout() {
    let server = RawServer::start(false, Duration::ZERO).await;
    let upstream = server.upstream_with(|c| c.pool_idle_timeout = Duration::from_millis(200));

    get_pong(&upstream).await;
    get_pong(&upstream).await;
    assert_eq!(server.accepted(), 1, "the second request did not reuse the connection");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(server.client_closed(), 0, "closed before the idle timeout");

    eventually("the idle connection was closed", || server.client_closed() == 1).await;
    // And the pool still works afterwards, on a new connection.
    get_pong(&upstream).await;
    assert_eq!(server.accepted(), 2);
}

#[tokio::test]
async fn at_most_pool_max_idle_connections_are_kept() {
    let server = RawServer::start(false, Duration::from_millis(100)).await;
    let upstream = server.upstream_with(|c| c.pool_max_idle_per_host = 1);

    // Three at once need three connections; afterwards only one may stay open.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..3 {
        let upstream = upstream.clone();
        tasks.spawn(async move { get_pong(&upstream).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    assert_eq!(server.accepted(), 3);
    eventually("two of three connections were closed", || server.client_closed() == 2).await;

    get_pong(&upstream).await;
    assert_eq!(server.accepted(), 3, "the kept connection was not reused");
}

#[tokio::test]
async fn a_body_read_up_to_its_end_returns_the_connection_without_a_last_poll() {
    // hyper's server stops polling a body once `is_end_stream` is true, so the connection
    // must go back after the last frame, not after a final `None`.
    let server = RawServer::start(false, Duration::ZERO).await;
    let upstream = server.upstream_with(|_| {});
    for _ in 0..3 {
        let mut body = upstream.send(&get(), Bytes::new(), &key()).await.unwrap().into_body();
        let mut got = Vec::new();
        while !body.is_end_stream() {
            let frame = body.frame().await.unwrap().unwrap();
            got.extend_from_slice(frame.data_ref().unwrap());
        }
        assert_eq!(got, b"pong");
        drop(body);
    }
    assert_eq!(server.accepted(), 1);
}

#[tokio::test]
async fn an_empty_body_returns_the_connection_even_if_never_polled() {
    let server = serve(|_req| async {
        let mut resp = ok(full(""));
        *resp.status_mut() = StatusCode::NO_CONTENT;
        resp
    })
    .await;
    let upstream = server.upstream();
    for _ in 0..3 {
        let response = upstream.send(&get(), Bytes::new(), &key()).await.unwrap();
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        assert!(response.body().is_end_stream());
        drop(response);
    }
    assert_eq!(server.accepted(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_request_on_a_connection_closed_under_it_is_retried_on_a_new_one() {
    // The race the retry exists for: the upstream closes an idle pooled connection, and the
    // next request takes that connection before the client has processed the close. A
    // single-threaded runtime that is blocked while the close arrives makes it certain: the
    // pooled connection still looks alive, so the request is handed to it, and hyper returns
    // it unsent when it then reads the close.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (close_tx, close_rx) = std::sync::mpsc::channel::<()>();
    let server = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\npong";
        let read_head = |sock: &mut std::net::TcpStream| {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = sock.read(&mut chunk).unwrap();
                assert!(n > 0, "client closed early");
                buf.extend_from_slice(&chunk[..n]);
            }
        };
        let (mut first, _) = listener.accept().unwrap();
        read_head(&mut first);
        first.write_all(answer).unwrap();
        close_rx.recv().unwrap();
        drop(first);
        // The retried request arrives on a second connection.
        let (mut second, _) = listener.accept().unwrap();
        read_head(&mut second);
        second.write_all(answer).unwrap();
        second
    });
    let upstream = Upstream::new(UpstreamConfig {
        base_url: format!("http://{addr}/v1").parse().unwrap(),
        ..UpstreamConfig::default()
    })
    .unwrap();

    get_pong(&upstream).await;
    // Let the client's connection task go idle, then close the connection under it while the
    // runtime cannot run that task. Only a connection idle for over a second is suspected of
    // a keep-alive race (one that drops a request sooner failed to process it, and the
    // caller decides), so the runtime stays blocked that long.
    tokio::task::yield_now().await;
    close_tx.send(()).unwrap();
    std::thread::sleep(Duration::from_millis(1100));

    tokio::time::timeout(Duration::from_secs(5), get_pong(&upstream)).await.expect("retry hung");
    drop(server.join().unwrap());
}
