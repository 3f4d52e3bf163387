//! Worker threads (`StartOptions::workers`, the binary's serving mode): each
//! worker has its own runtime, accept loop and upstream client, so serving
//! must not depend on the caller's runtime, new connections must spread over
//! the workers, and a port already in use must still be refused even though
//! the workers' sockets share it with `SO_REUSEPORT`.

use std::num::NonZeroUsize;
use std::time::Duration;

use http::StatusCode;
use proxypal_nim_sim::{SimConfig, SimServer, generate_test_keys};
use proxypal_server::{StartError, StartOptions};

use crate::common::{chat_request, http_client, proxy_config, send};

const CONNECTIONS: usize = 32;
const REQUESTS_PER_CONNECTION: usize = 5;

fn with_workers(n: usize) -> StartOptions {
    StartOptions { workers: NonZeroUsize::new(n), ..StartOptions::default() }
}

/// The value of `proxypal_connections_accepted_total{worker="<worker>"}`.
fn accepted(metrics: &str, worker: usize) -> u64 {
    let prefix = format!("proxypal_connections_accepted_total{{worker=\"{worker}\"}} ");
    metrics.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |v| v.trim().parse().unwrap())
}

#[test]
fn workers_serve_on_their_own_runtimes_and_share_new_connections() {
    // The simulator and the clients run here; the proxy is started from
    // `caller`, which is then never driven again: only the workers' own
    // runtimes can serve. Serving on the caller's runtime (workers: None)
    // would hang every request below.
    let aux = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let caller = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let keys = generate_test_keys(3);
    let sim = {
        let _in_aux = aux.enter();
        SimServer::start(SimConfig::fast()).unwrap()
    };
    let config = proxy_config(&sim, &keys);
    let server = caller.block_on(proxypal_server::start_with(&config, false, with_workers(2))).unwrap();
    let addr = server.addr();

    let metrics = aux.block_on(async move {
        tokio::time::timeout(Duration::from_secs(20), async move {
            // One client (so one connection) per task: CONNECTIONS connections.
            let tasks: Vec<_> = (0..CONNECTIONS)
                .map(|_| {
                    tokio::spawn(async move {
                        let http = http_client();
                        for _ in 0..REQUESTS_PER_CONNECTION {
                            let reply = send(&http, chat_request(addr, false, &[])).await;
                            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
            let get = http::Request::get(format!("http://{addr}/metrics"))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            let reply = send(&http_client(), get).await;
            reply.text()
        })
        .await
        .expect("requests through the workers timed out: is the server served by the caller's runtime?")
    });
    assert_eq!(sim.stats().total_requests, (CONNECTIONS * REQUESTS_PER_CONNECTION) as u64);

    // The kernel spreads connections over the two sockets by their addresses:
    // 33 connections (the metrics request included) all landing on one worker
    // would happen with probability 2^-32 if spread, and always if not.
    let (w0, w1) = (accepted(&metrics, 0), accepted(&metrics, 1));
    assert_eq!(w0 + w1, CONNECTIONS as u64 + 1, "{metrics}");
    assert!(w0 > 0 && w1 > 0, "connections per worker: {w0} / {w1}");
    println!("connections per worker: {w0} / {w1}");

    caller.block_on(async {
        tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await.expect("shutdown hung");
    });
    // Every worker's socket is closed once shutdown returns.
    assert!(std::net::TcpStream::connect(addr).is_err(), "still accepting after shutdown");
    drop(sim);
}

#[tokio::test]
async fn a_port_in_use_is_refused_even_with_reuse_port_workers() {
    let keys = generate_test_keys(1);
    let sim = SimServer::start(SimConfig::fast()).unwrap();
    let config = proxy_config(&sim, &keys);
    let first = proxypal_server::start_with(&config, false, with_workers(2)).await.unwrap();

    let mut second_config = config.clone();
    second_config.listen = first.addr();
    for workers in [Some(2), None] {
        let options =
            StartOptions { workers: workers.and_then(NonZeroUsize::new), ..StartOptions::default() };
        match proxypal_server::start_with(&second_config, false, options).await {
            Err(StartError::Bind { addr, source }) => {
                assert_eq!(addr, first.addr());
                assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse, "{source}");
            }
            Err(other) => panic!("workers {workers:?}: unexpected error {other}"),
            Ok(second) => {
                let taken = second.addr();
                second.shutdown().await;
                panic!("workers {workers:?}: a second server joined {taken}, which the first one holds");
            }
        }
    }
    first.shutdown().await;
}
