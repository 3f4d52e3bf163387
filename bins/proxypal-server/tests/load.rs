#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Issue 4, load: 5,000 requests at 200 concurrent through the proxy to the
//! simulated upstream (fast mode, any key accepted), 4 keys, rate limits that
//! never bind. Zero errors, an even spread over the keys, and afterwards no
//! leaked connections, streams or in-flight slots, and resident memory back
//! near its idle level.
//!
//! Its own test binary, so that no other test shares the process whose
//! resident memory it measures. It takes about 8 s in a debug build on 2 vCPUs
//! and runs with the rest in `cargo test --workspace` (so in `.ci/run`). The
//! figures it prints (`cargo test --release -p proxypal-server --test load --
//! --nocapture`) are meant for docs/performance.md.

// The integration binary's helpers, in this binary too (`hardening_support`
// finds `common` as `crate::common`).
#[allow(dead_code)] // this binary uses a small part
#[path = "integration/common.rs"]
mod common;
#[path = "integration/hardening_support.rs"]
mod hardening_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hardening_support::{
    HttpClient, chat_request, get_request, http_client, proxy_config, rss_kib, send, within,
};
use http::StatusCode;
use proxypal_nim_sim::{SimConfig, SimServer, generate_test_keys};

const REQUESTS: usize = 5_000;
const CONCURRENCY: usize = 200;
const KEYS: usize = 4;
/// Worker threads, each with its own upstream pool.
const WORKERS: usize = 2;
/// The upstream client's `pool_max_idle_per_host` (proxypal-upstream's
/// default), per worker.
const POOL_MAX_IDLE: usize = 256 * WORKERS;

/// `n` chat completions through the proxy at `addr`, [`CONCURRENCY`] at a
/// time: each one's latency, the failures, and the wall time.
async fn burst(http: &HttpClient, addr: SocketAddr, n: usize) -> (Vec<Duration>, Vec<String>, Duration) {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (http, next) = (http.clone(), Arc::clone(&next));
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut errors = Vec::new();
                while next.fetch_add(1, Ordering::SeqCst) < n {
                    let sent = Instant::now();
                    let reply = send(&http, chat_request(addr, false)).await;
                    latencies.push(sent.elapsed());
                    if reply.status != StatusCode::OK {
                        errors.push(format!("{}: {}", reply.status, reply.text()));
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(n);
    let mut errors = Vec::new();
    for worker in workers {
        let (l, e) = worker.await.unwrap();
        latencies.extend(l);
        errors.extend(e);
    }
    (latencies, errors, started.elapsed())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_thousand_requests_at_200_concurrent_spread_evenly_without_errors_or_leaks() {
    within(Duration::from_secs(120), async {
        let keys = generate_test_keys(KEYS);
        let sim = SimServer::start(SimConfig::fast()).unwrap();
        let mut config = proxy_config(&sim, &keys);
        config.state.path = None;
    config.rate_limit.requests_per_minute = Some(10_000_000);
        // Served the way the binary serves: worker threads, each with its
        // own runtime and upstream connection pool.
        let options = proxypal_server::StartOptions {
            workers: std::num::NonZeroUsize::new(WORKERS),
            ..proxypal_server::StartOptions::default()
        };
        let server = proxypal_server::start_with(&config, false, options).await.unwrap();
        let addr = server.addr();
        let http = http_client();

        let rss_cold = rss_kib();

        // Warm up at full concurrency so connection pools, buffers and
        // allocator arenas reach their working size; then settle: the idle level.
        let (_, errors, _) = burst(&http, addr, 1_000).await;
        assert!(errors.is_empty(), "warm-up: {errors:?}");
        sim.reset_stats();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss_idle = rss_kib();

        // Sample the peak while the burst runs.
        let peak = Arc::new(AtomicU64::new(rss_idle));
        let sampling = Arc::new(AtomicBool::new(true));
        let sampler = {
            let (peak, sampling) = (Arc::clone(&peak), Arc::clone(&sampling));
            tokio::spawn(async move {
                while sampling.load(Ordering::SeqCst) {
                    peak.fetch_max(rss_kib(), Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        };

        let (mut latencies, errors, elapsed) = burst(&http, addr, REQUESTS).await;
        sampling.store(false, Ordering::SeqCst);
        sampler.await.unwrap();
        let rss_peak = peak.load(Ordering::SeqCst);

        assert_eq!(latencies.len(), REQUESTS);
        assert!(errors.is_empty(), "{} errors, first: {}", errors.len(), errors[0]);

        // Every key within ±1 % of an even share, counted by the upstream.
        let stats = sim.stats();
        assert_eq!(stats.total_ok(), REQUESTS as u64);
        let even = (REQUESTS / KEYS) as f64;
        let per_key: Vec<u64> = keys.iter().map(|k| stats.key(k).ok).collect();
        for (i, &n) in per_key.iter().enumerate() {
            let off = (n as f64 - even).abs() / even;
            assert!(off <= 0.01, "key {i} served {n}, {:.2} % off an even {even}: {per_key:?}", off * 100.0);
        }

        // Nothing leaks: no request or stream left open, upstream connections
        // no more than the burst needed (they stay pooled for reuse).
        drop(http);
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.app().in_flight() != 0 || sim.active_streams() != 0 {
            assert!(Instant::now() < deadline, "in_flight {} / streams {}", server.app().in_flight(), sim.active_streams());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let upstream_connections = sim.open_connections();
        assert!(
            upstream_connections <= POOL_MAX_IDLE,
            "{upstream_connections} upstream connections open: more than the pool keeps ({POOL_MAX_IDLE})"
        );
        let proxy_stats = send(&http_client(), get_request(addr, "/stats")).await.json();
        assert_eq!(proxy_stats["in_flight"], 0, "{proxy_stats}");
        assert_eq!(proxy_stats["queue_depth"], 0);

        // Memory goes back near the idle level once the burst is over.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss_after = rss_kib();
        let allowance = 20 * 1024;

        latencies.sort();
        let pct = |p: f64| latencies[((latencies.len() as f64 * p).ceil() as usize).min(latencies.len()) - 1];
        let profile = if cfg!(debug_assertions) { "debug" } else { "release" };
        println!("load ({profile} build, {} worker threads): {REQUESTS} requests, {CONCURRENCY} concurrent, {KEYS} keys", 2);
        println!("  elapsed        {:.2} s", elapsed.as_secs_f64());
        println!("  throughput     {:.0} requests/s", REQUESTS as f64 / elapsed.as_secs_f64());
        println!(
            "  latency        p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            pct(0.50).as_secs_f64() * 1e3,
            pct(0.99).as_secs_f64() * 1e3,
            latencies.last().unwrap().as_secs_f64() * 1e3
        );
        println!("  per key        {per_key:?}");
        println!("  upstream conns {upstream_connections} open after the burst (pooled)");
        println!(
            "  RSS (proxy + simulator + client, one process) cold {:.1} MiB, idle {:.1} MiB, peak {:.1} MiB, after {:.1} MiB",
            mib(rss_cold),
            mib(rss_idle),
            mib(rss_peak),
            mib(rss_after)
        );
        assert!(
            rss_after < rss_idle + allowance,
            "RSS after the burst {:.1} MiB, idle {:.1} MiB: more than 20 MiB kept",
            mib(rss_after),
            mib(rss_idle)
        );
        server.shutdown().await;
    })
    .await;
}
