//! Integration tests for the `https` path: a real `Upstream` against a hyper server behind
//! rustls on 127.0.0.1, with a throwaway CA trusted through `extra_root_certificates`.
//!
//! The server speaks HTTP/1.1 and HTTP/2 (hyper-util's auto server) and offers ALPN
//! `h2, http/1.1` unless a test says otherwise, like integrate.api.nvidia.com.

// The shared helpers come from `crate::support`; this file brings its own TLS server instead of
// `support::serve`.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt as _;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::{
    rt::{TokioExecutor, TokioIo},
    server::conn::auto,
};
use proxypal_upstream::{
    CertificateDer, ErrorKind, RequestParts, Upstream, UpstreamConfig, UpstreamError, parse_pem_certificates,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tokio_rustls::TlsAcceptor;

use crate::support::{SECRET, TestBody, assert_no_secrets, full, key, ok, spaced_events};

/// A throwaway CA and a server certificate it issued.
struct Pki {
    /// The CA certificate, PEM: what an operator would put in a CA file.
    ca_pem: String,
    server_chain: Vec<CertificateDer<'static>>,
    server_key_pkcs8: Vec<u8>,
}

impl Pki {
    /// A CA and a server certificate for `names` (DNS names or IP addresses).
    fn new(names: &[&str]) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "ProxyPal test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);

        let server_key = KeyPair::generate().unwrap();
        let mut leaf =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, names[0]);
        leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        leaf.use_authority_key_identifier_extension = true;
        let server_cert = leaf.signed_by(&server_key, &issuer).unwrap();

        Self {
            ca_pem: ca_cert.pem(),
            server_chain: vec![server_cert.der().clone()],
            server_key_pkcs8: server_key.serialize_der(),
        }
    }

    /// The CA as the client would load it: parsed from PEM.
    fn ca_roots(&self) -> Vec<CertificateDer<'static>> {
        parse_pem_certificates(self.ca_pem.as_bytes()).unwrap()
    }

    fn server_config(&self, alpn: &[&[u8]]) -> rustls::ServerConfig {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_pkcs8.clone()));
        let mut cfg =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(self.server_chain.clone(), key)
                .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        cfg
    }
}

/// ALPN offered by NVIDIA-like servers.
const H2_AND_H1: &[&[u8]] = &[b"h2", b"http/1.1"];

/// A running TLS test server; stops accepting when dropped.
struct TlsServer {
    addr: SocketAddr,
    /// TCP connections accepted (before the TLS handshake).
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsServer {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// `https://localhost:<port>/v1`: the name the certificate is for.
    fn base_url(&self) -> Uri {
        format!("https://localhost:{}/v1", self.addr.port()).parse().unwrap()
    }

    /// An `Upstream` for this server that trusts `roots` besides the default ones.
    fn upstream(&self, roots: Vec<CertificateDer<'static>>) -> Upstream {
        Upstream::new(UpstreamConfig {
            base_url: self.base_url(),
            extra_root_certificates: roots,
            ..UpstreamConfig::default()
        })
        .unwrap()
    }
}

/// Serves `handler` over TLS (HTTP/1.1 and HTTP/2, ALPN `alpn`) on a fresh port.
async fn serve_tls<F, Fut>(pki: &Pki, alpn: &[&[u8]], handler: F) -> TlsServer
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let acceptor = TlsAcceptor::from(Arc::new(pki.server_config(alpn)));
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
                // Without it, Nagle holds the first DATA frame back behind the HEADERS frame
                // until the client's delayed ACK (~40 ms), and the frame gaps below shrink.
                stream.set_nodelay(true).unwrap();
                let acceptor = acceptor.clone();
                let handler = handler.clone();
                tokio::spawn(async move {
                    // A client that rejects the certificate aborts the handshake: nothing to serve.
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let svc = service_fn(move |req| {
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        }
    });
    TlsServer { addr, accepted, task }
}

/// What the server saw.
#[derive(Debug)]
struct Seen {
    version: Version,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

/// A server that reports each request on the returned channel and answers `200 <body>`, with
/// a few headers, hop-by-hop ones included.
async fn recording_server(pki: &Pki, alpn: &[&[u8]]) -> (TlsServer, mpsc::UnboundedReceiver<Seen>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let server = serve_tls(pki, alpn, move |req| {
        let tx = tx.clone();
        async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            tx.send(Seen {
                version: parts.version,
                uri: parts.uri,
                headers: parts.headers,
                body: body.clone(),
            })
            .unwrap();
            Response::builder()
                .header("x-end-to-end", "yes")
                .header("content-type", "application/json")
                .body(full(body))
                .unwrap()
        }
    })
    .await;
    (server, rx)
}

/// Client headers with every kind of hop-by-hop header, which HTTP/2 forbids outright
/// (RFC 9113 §8.2.2): forwarding any of them would make the request malformed.
fn client_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in [
        ("content-type", "application/json"),
        ("accept", "text/event-stream"),
        ("x-request-id", "req-1"),
        ("te", "trailers"),
        ("connection", "keep-alive, x-client-hop"),
        ("x-client-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("upgrade", "h2c"),
        ("transfer-encoding", "chunked"),
        ("trailer", "x-checksum"),
        ("proxy-connection", "keep-alive"),
        ("proxy-authorization", "Basic cHJveHk6cHc="),
        ("authorization", "Bearer client-token"),
        ("x-api-key", "client-token"),
        ("host", "proxy.local:8080"),
        ("content-length", "999"),
        ("expect", "100-continue"),
        ("user-agent", "OpenAI/Python 1.99.0"),
    ] {
        h.append(n, HeaderValue::from_static(v));
    }
    h
}

#[tokio::test]
async fn https_with_the_ca_as_extra_root_negotiates_h2_and_rewrites_headers() {
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    let (server, mut seen) = recording_server(&pki, H2_AND_H1).await;
    let upstream = server.upstream(pki.ca_roots());
    let parts = RequestParts::new(Method::POST, "/chat/completions?x=1", client_headers());
    let body = Bytes::from_static(br#"{"model":"m","messages":[]}"#);

    let response = upstream.send(&parts, body.clone(), &key()).await.unwrap();

    let seen = seen.recv().await.unwrap();
    assert_eq!(seen.version, Version::HTTP_2, "ALPN did not pick h2");
    assert_eq!(seen.uri.authority().unwrap().as_str(), format!("localhost:{}", server.addr.port()));
    assert_eq!(seen.uri.path_and_query().unwrap(), "/v1/chat/completions?x=1");
    assert_eq!(seen.body, body);
    let h = &seen.headers;
    assert_eq!(h["authorization"], format!("Bearer {SECRET}").as_str());
    assert_eq!(h.get_all("authorization").iter().count(), 1);
    assert_eq!(h["user-agent"], concat!("proxypal/", env!("CARGO_PKG_VERSION")));
    assert_eq!(h["te"], "trailers", "the one TE value HTTP/2 allows is kept");
    let mut names: Vec<&str> = h.keys().map(|n| n.as_str()).collect();
    names.sort_unstable();
    // No `host` on HTTP/2: the authority travels as `:authority` (checked above).
    assert_eq!(
        names,
        ["accept", "authorization", "content-length", "content-type", "te", "user-agent", "x-request-id"]
    );
    assert_eq!(h["content-length"], body.len().to_string().as_str());

    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-end-to-end"], "yes");
    assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), body);
    assert_eq!(server.accepted(), 1);
}

#[tokio::test]
async fn an_ip_address_base_url_is_verified_against_the_ip_san() {
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    let (server, mut seen) = recording_server(&pki, H2_AND_H1).await;
    let upstream = Upstream::new(UpstreamConfig {
        base_url: format!("https://{}/v1", server.addr).parse().unwrap(),
        extra_root_certificates: pki.ca_roots(),
        ..UpstreamConfig::default()
    })
    .unwrap();
    let parts = RequestParts::new(Method::GET, "/models", HeaderMap::new());

    let response = upstream.send(&parts, Bytes::new(), &key()).await.unwrap();

    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(seen.recv().await.unwrap().version, Version::HTTP_2);
}

#[tokio::test]
async fn h2_streams_each_chunk_as_its_own_frame() {
    const CHUNKS: usize = 5;
    const GAP: Duration = Duration::from_millis(50);
    let pki = Pki::new(&["localhost"]);
    let (version_tx, mut version_rx) = mpsc::unbounded_channel();
    let server = serve_tls(&pki, H2_AND_H1, move |req| {
        version_tx.send(req.version()).unwrap();
        async { spaced_events(CHUNKS, GAP) }
    })
    .await;
    let parts = RequestParts::new(Method::POST, "/chat/completions", HeaderMap::new());

    let response = server.upstream(pki.ca_roots()).send(&parts, Bytes::new(), &key()).await.unwrap();

    assert_eq!(version_rx.recv().await.unwrap(), Version::HTTP_2);
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        frames.push((Instant::now(), data));
    }
    // Unlike HTTP/1, the end of an h2 stream whose length was not known up front is an empty
    // DATA frame with END_STREAM, which hyper hands on as an empty data frame. (hyper's HTTP/1
    // server discards empty chunks, so a client of the proxy never sees it.)
    if frames.last().is_some_and(|(_, d)| d.is_empty()) {
        frames.pop();
    }
    let datas: Vec<String> = frames.iter().map(|(_, d)| String::from_utf8(d.to_vec()).unwrap()).collect();
    let want: Vec<String> = (0..CHUNKS).map(|i| format!("data: {{\"i\":{i}}}\n\n")).collect();
    assert_eq!(datas, want, "one frame per chunk, in order");
    for pair in frames.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap > Duration::from_millis(30),
            "frames {gap:?} apart: coalesced? {:?}",
            frames.iter().map(|(t, d)| (*t - frames[0].0, d.len())).collect::<Vec<_>>()
        );
    }
}

#[tokio::test]
async fn a_server_without_h2_in_alpn_is_reached_over_http1() {
    // Offering only http/1.1, and offering nothing at all (then the client must not assume h2).
    for alpn in [&[&b"http/1.1"[..]][..], &[]] {
        let pki = Pki::new(&["localhost"]);
        let (server, mut seen) = recording_server(&pki, alpn).await;
        let parts = RequestParts::new(Method::POST, "/chat/completions", client_headers());

        let response =
            server.upstream(pki.ca_roots()).send(&parts, Bytes::from_static(b"{}"), &key()).await.unwrap();

        let seen = seen.recv().await.unwrap();
        assert_eq!(seen.version, Version::HTTP_11, "ALPN {alpn:?}");
        assert_eq!(seen.headers["host"], format!("localhost:{}", server.addr.port()).as_str());
        assert_eq!(seen.headers["authorization"], format!("Bearer {SECRET}").as_str());
        for gone in ["connection", "keep-alive", "upgrade", "x-client-hop", "proxy-connection", "x-api-key"] {
            assert!(seen.headers.get(gone).is_none(), "{gone} was forwarded: {:?}", seen.headers);
        }
        assert_eq!(response.version(), Version::HTTP_11);
        assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "{}");
    }
}

#[tokio::test]
async fn without_the_extra_root_the_certificate_is_not_trusted() {
    let pki = Pki::new(&["localhost"]);
    let (server, mut seen) = recording_server(&pki, H2_AND_H1).await;
    let mut client_headers = HeaderMap::new();
    client_headers.insert("authorization", HeaderValue::from_static("Bearer client-secret-xyz"));
    let parts = RequestParts::new(Method::POST, "/chat/completions?api_key=q-secret", client_headers);

    let err = server.upstream(Vec::new()).send(&parts, Bytes::new(), &key()).await.unwrap_err();

    assert!(matches!(err, UpstreamError::Connect { .. }), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Connect);
    let display = err.to_string();
    let url = format!("https://localhost:{}/v1/chat/completions", server.addr.port());
    assert!(display.starts_with(&format!("cannot connect to upstream {url}: ")), "{display}");
    assert!(display.contains("invalid peer certificate: UnknownIssuer"), "{display}");
    assert_no_secrets(&err);
    assert_eq!(server.accepted(), 1);
    assert!(seen.try_recv().is_err(), "the server got a request");
}

#[tokio::test]
async fn an_extra_root_does_not_switch_off_host_name_verification() {
    // Issued by the trusted CA, but for another name.
    let pki = Pki::new(&["upstream.internal"]);
    let (server, mut seen) = recording_server(&pki, H2_AND_H1).await;
    let parts = RequestParts::new(Method::GET, "/models", HeaderMap::new());

    let err = server.upstream(pki.ca_roots()).send(&parts, Bytes::new(), &key()).await.unwrap_err();

    assert!(matches!(err, UpstreamError::Connect { .. }), "{err:?}");
    let display = err.to_string();
    assert!(display.contains("invalid peer certificate: certificate not valid for name"), "{display}");
    assert!(display.contains("\"localhost\""), "{display}");
    assert_no_secrets(&err);
    assert!(seen.try_recv().is_err(), "the server got a request");
}

/// A server whose handler takes `hold` to answer and tracks the most requests in flight at once.
async fn slow_counting_server(pki: &Pki, hold: Duration) -> (TlsServer, Arc<AtomicUsize>) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let server = serve_tls(pki, H2_AND_H1, {
        let max_in_flight = max_in_flight.clone();
        move |req| {
            assert_eq!(req.version(), Version::HTTP_2);
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            max_in_flight.fetch_max(now, Ordering::SeqCst);
            let in_flight = in_flight.clone();
            async move {
                tokio::time::sleep(hold).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                ok(full("pong"))
            }
        }
    })
    .await;
    (server, max_in_flight)
}

#[tokio::test]
async fn a_cold_burst_to_an_http1_only_upstream_gets_a_connection_per_request() {
    const N: usize = 20;
    let pki = Pki::new(&["localhost"]);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let server = serve_tls(&pki, &[b"http/1.1"], {
        let max_in_flight = max_in_flight.clone();
        move |req| {
            assert_eq!(req.version(), Version::HTTP_11);
            // HTTP/1.1 needs Host (HTTP/2 has :authority): the pool adds it, port included.
            let host = req.headers()["host"].to_str().unwrap();
            assert!(host.strip_prefix("localhost:").is_some_and(|p| p.parse::<u16>().is_ok()), "{host}");
            let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            max_in_flight.fetch_max(now, Ordering::SeqCst);
            let in_flight = in_flight.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                ok(full("pong"))
            }
        }
    })
    .await;
    let upstream = server.upstream(pki.ca_roots());

    // The first handshake reveals HTTP/1.1; from then on connects do not wait for each other,
    // and each request, held 200 ms by the server, needs a connection of its own.
    send_concurrently(&upstream, N, Version::HTTP_11).await;
    assert_eq!(server.accepted(), N);
    assert_eq!(max_in_flight.load(Ordering::SeqCst), N, "requests were not all in flight at once");
}

/// Sends `n` requests at once and checks every answer and its HTTP version.
async fn send_concurrently(upstream: &Upstream, n: usize, version: Version) {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let parts = RequestParts::new(Method::POST, "/chat/completions", HeaderMap::new());
        let send = upstream.send(&parts, Bytes::from_static(b"{}"), &key());
        tasks.spawn(async move {
            let response = send.await.unwrap();
            assert_eq!(response.version(), version);
            assert_eq!(response.into_body().collect().await.unwrap().to_bytes(), "pong");
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

#[tokio::test]
async fn concurrent_requests_share_one_h2_connection() {
    const N: usize = 50;
    let pki = Pki::new(&["localhost"]);
    let (server, max_in_flight) = slow_counting_server(&pki, Duration::from_millis(100)).await;
    let upstream = server.upstream(pki.ca_roots());

    // One request first: the pool only learns the upstream speaks h2 once a connection has
    // negotiated it (see the cold-pool test below).
    send_concurrently(&upstream, 1, Version::HTTP_2).await;
    send_concurrently(&upstream, N, Version::HTTP_2).await;

    assert_eq!(server.accepted(), 1, "one TCP connection for {} requests", N + 1);
    assert!(max_in_flight.load(Ordering::SeqCst) > N / 2, "requests were not multiplexed");
}

#[tokio::test]
async fn a_cold_pool_burst_opens_one_h2_connection_and_keeps_using_it() {
    const N: usize = 50;
    let pki = Pki::new(&["localhost"]);
    let (server, _) = slow_counting_server(&pki, Duration::from_millis(100)).await;
    let upstream = server.upstream(pki.ca_roots());

    // Nothing is pooled yet and nobody knows whether the upstream speaks h2: the pool makes
    // one TCP + TLS handshake while the other requests wait for it, then all share the h2
    // connection it negotiated (hyper-util's pool used to start all N handshakes).
    send_concurrently(&upstream, N, Version::HTTP_2).await;
    assert_eq!(server.accepted(), 1, "a cold burst opened several connections");

    send_concurrently(&upstream, N, Version::HTTP_2).await;
    assert_eq!(server.accepted(), 1, "a warm pool opened new connections");
}

#[test]
fn an_invalid_extra_root_is_refused_at_build_time() {
    let err = Upstream::new(UpstreamConfig {
        extra_root_certificates: vec![CertificateDer::from(b"not a certificate".to_vec())],
        ..UpstreamConfig::default()
    })
    .unwrap_err();
    assert!(
        err.to_string().starts_with("upstream extra_root_certificates[0] is not a usable root certificate: "),
        "{err}"
    );
}

#[test]
fn parse_pem_certificates_reads_every_certificate_in_order() {
    let (a, b) = (Pki::new(&["localhost"]), Pki::new(&["localhost"]));
    let bundle = format!("# a comment line\n{}\nsome text\n{}", a.ca_pem, b.ca_pem);
    let certs = parse_pem_certificates(bundle.as_bytes()).unwrap();
    assert_eq!(certs.len(), 2);
    assert_eq!(certs[0], a.ca_roots()[0]);
    assert_eq!(certs[1], b.ca_roots()[0]);
}
