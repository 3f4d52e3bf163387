//! Quota use — the reason the product exists. Three keys at 600/min each,
//! offered far more than the quota for `QUOTA_SECS` (default 60 s) by 60
//! closed-loop clients, with the default config (burst 1) and a generous
//! queue timeout, against the simulated upstream enforcing the same rate in
//! two ways: a token bucket (capacity 2, see below) and a rolling 60-second window.
//!
//! In both: the upstream answers zero 429s, serves ≥ 98 % of rate × duration,
//! no client request fails, and per-key counts are even within ±2 %.
//!
//! Ignored by default (2 × 60 s); run with
//! `cargo test --release -p proxypal-server --test integration quota:: -- --ignored --nocapture`
//! (`QUOTA_SECS=20` for a quicker look).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::StatusCode;
use proxypal_nim_sim::{SimConfig, SimRateLimit, SimServer, generate_test_keys};

use crate::common::{self, chat_request, proxy_config, send};

const KEYS: usize = 3;
const RPM: u32 = 600;
const CLIENTS: usize = 60;

fn duration() -> Duration {
    Duration::from_secs(std::env::var("QUOTA_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60))
}

async fn run(name: &str, limit: SimRateLimit, burst: Option<u32>) {
    let secs = duration();
    let keys = generate_test_keys(KEYS);
    let sim = SimServer::start(
        SimConfig::default().with_keys(keys.clone()).with_rate_limit(limit).with_stream(1, Duration::ZERO),
    )
    .unwrap();
    let mut config = proxy_config(&sim, &keys);
    // The defaults a user gets, at 600/min, the default margin; `burst` as the
    // upstream allows it.
    config.rate_limit.requests_per_minute = Some(u64::from(RPM));
    config.rate_limit.burst = burst;
    // Longer than a window (60 s + margin): with bursts, clients wait for the next one.
    config.retry.queue_timeout = Duration::from_secs(90);
    let server = proxypal_server::start(&config, false).await.unwrap();
    let addr = server.addr();

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let stop_at = started + secs;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
            tokio::spawn(async move {
                let http = common::http_client();
                // Each client sends back to back; only requests *started* before the
                // end count, and each of those must succeed.
                while Instant::now() < stop_at {
                    let reply = send(&http, chat_request(addr, false, &[])).await;
                    if reply.status == StatusCode::OK {
                        ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("client saw {}: {}", reply.status, reply.text());
                    }
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let elapsed = started.elapsed();

    let stats = sim.stats();
    let per_key: Vec<u64> = keys.iter().map(|k| stats.key(k).ok).collect();
    let served: u64 = per_key.iter().sum();
    let upstream_429 = stats.total_rate_limited();
    // Quota over the offered period: rate × duration (the burst of 1 per key on top).
    let quota = f64::from(RPM) / 60.0 * secs.as_secs_f64() * KEYS as f64;
    // Served while load was offered: count accepts that arrived before stop_at.
    let in_window: u64 = keys
        .iter()
        .map(|k| sim.accept_log(k).iter().filter(|t| **t <= secs + Duration::from_millis(50)).count() as u64)
        .sum();
    let mean = served as f64 / KEYS as f64;
    let spread = per_key.iter().map(|&n| (n as f64 - mean).abs() / mean).fold(0.0, f64::max);
    let max_window: Vec<usize> =
        keys.iter().map(|k| sim.max_in_any_window(k, Duration::from_secs(60))).collect();
    println!(
        "| {name} | {:.0} s | {quota:.0} | {in_window} | {:.1} % | {upstream_429} | {} | {per_key:?} ±{:.2} % | {max_window:?} |",
        secs.as_secs_f64(),
        100.0 * in_window as f64 / quota,
        failed.load(Ordering::Relaxed),
        100.0 * spread,
    );
    eprintln!("{name}: elapsed {elapsed:?}, client ok {}, served {served}", ok.load(Ordering::Relaxed));

    assert_eq!(upstream_429, 0, "the upstream answered 429");
    assert_eq!(failed.load(Ordering::Relaxed), 0, "client requests failed");
    assert!(in_window as f64 >= 0.98 * quota, "served {in_window} of a quota of {quota:.0}");
    assert!(spread <= 0.02, "per-key counts {per_key:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs for 2 × QUOTA_SECS (60 s); run explicitly or through benches/run.sh"]
async fn quota_is_used_fully_without_429_under_a_token_bucket() {
    println!(
        "| upstream limit | duration | quota (rate × duration) | served | of quota | upstream 429s | client failures | per key | max in any 60 s |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---|---|");
    // Burst 2 upstream: at 600/min the proxy's permits are 100.8 ms apart, only
    // 0.8 ms more than the bucket's 100 ms refill, so a burst-1 bucket would
    // turn any arrival jitter above 0.8 ms into a 429 (measured: it does). A
    // bucket that holds two tokens absorbs up to one period of jitter. At
    // NVIDIA's 40/min the same margin is 12.5 ms per permit.
    // An upstream without bursts needs the shaper: `burst: 1`.
    run("token bucket 600/min, burst 2", SimRateLimit::TokenBucket { per_minute: RPM, burst: 2 }, Some(1))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs for 2 × QUOTA_SECS (60 s); run explicitly or through benches/run.sh"]
async fn quota_is_used_fully_without_429_under_a_rolling_window() {
    run(
        "rolling 60 s window, 600",
        SimRateLimit::RollingWindow { limit: RPM, window: Duration::from_secs(60) },
        None,
    )
    .await;
}

/// The two measurements of issue 11, as a user meets them: the default config
/// (40 in any rolling minute, bursts allowed, 500 ms margin), 2 keys, an
/// upstream that allows 40 per key in any rolling 60 s.
fn nvidia_like() -> (SimHandleAndKeys, proxypal_server::config::Config) {
    let keys = generate_test_keys(2);
    let sim = SimServer::start(
        SimConfig::default()
            .with_keys(keys.clone())
            .with_rate_limit(SimRateLimit::RollingWindow { limit: 40, window: Duration::from_secs(60) })
            .with_stream(1, Duration::ZERO),
    )
    .unwrap();
    let mut config = proxy_config(&sim, &keys);
    config.rate_limit = proxypal_server::config::Config::default().rate_limit;
    (SimHandleAndKeys { sim, keys }, config)
}

struct SimHandleAndKeys {
    sim: proxypal_nim_sim::SimHandle,
    keys: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measures the issue-11 burst case; run explicitly or through benches/run.sh"]
async fn quota_burst_of_two_windows_is_served_at_once() {
    let (up, mut config) = nvidia_like();
    config.retry.queue_timeout = Duration::from_secs(30);
    let server = proxypal_server::start(&config, false).await.unwrap();
    let addr = server.addr();
    let started = Instant::now();
    let tasks: Vec<_> = (0..80)
        .map(|_| {
            tokio::spawn(async move {
                let http = common::http_client();
                let reply = send(&http, chat_request(addr, false, &[])).await;
                (reply.status, started.elapsed())
            })
        })
        .collect();
    let mut waits = Vec::new();
    let mut ok = 0;
    for t in tasks {
        let (status, took) = t.await.unwrap();
        ok += usize::from(status == StatusCode::OK);
        waits.push(took);
    }
    waits.sort();
    let median = waits[waits.len() / 2];
    let upstream_429 = up.sim.stats().total_rate_limited();
    println!(
        "| burst: 80 at once, 2 keys × 40 per rolling 60 s | served {ok} of 80 | median wait {median:?} | max {:?} | upstream 429s {upstream_429} |",
        waits[waits.len() - 1]
    );
    assert_eq!(ok, 80);
    assert_eq!(upstream_429, 0);
    assert!(median < Duration::from_secs(2), "median wait {median:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs 150 s: the issue-11 sustained case; run explicitly or through benches/run.sh"]
async fn quota_sustained_three_times_the_quota_uses_the_rolling_windows_fully() {
    let secs = Duration::from_secs(
        std::env::var("QUOTA_SUSTAINED_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(150),
    );
    let (up, mut config) = nvidia_like();
    config.retry.queue_timeout = Duration::from_secs(90);
    let server = proxypal_server::start(&config, false).await.unwrap();
    let addr = server.addr();
    let started = Instant::now();
    // 3× the quota: 2 keys × 40 per minute is 80; 240 requests a minute offered by
    // closed-loop clients pausing 250 ms between requests.
    let clients: Vec<_> = (0..60)
        .map(|_| {
            tokio::spawn(async move {
                let http = common::http_client();
                while started.elapsed() < secs {
                    let reply = send(&http, chat_request(addr, false, &[])).await;
                    assert!(reply.status == StatusCode::OK || reply.status == StatusCode::TOO_MANY_REQUESTS);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    // What the upstream allows in the offered period: a full window per key at 0, 60, 120 s, …
    let windows = secs.as_secs().div_ceil(60);
    let allowed = windows * 80;
    let served: usize =
        up.keys.iter().map(|k| up.sim.accept_log(k).iter().filter(|t| **t < secs).count()).sum();
    let upstream_429 = up.sim.stats().total_rate_limited();
    let max_window: Vec<usize> =
        up.keys.iter().map(|k| up.sim.max_in_any_window(k, Duration::from_secs(60))).collect();
    println!(
        "| sustained 3× for {secs:?}, 2 keys × 40 per rolling 60 s | served {served} of {allowed} ({:.1} %) | upstream 429s {upstream_429} | max in any 60 s {max_window:?} |",
        100.0 * served as f64 / allowed as f64
    );
    assert_eq!(upstream_429, 0);
    assert!(served as f64 >= 0.98 * allowed as f64, "served {served} of {allowed}");
    server.shutdown().await;
}
