//! The quota engine end to end on real sockets, against the simulated
//! upstream enforcing the same windows with short periods: bursts go at once,
//! sustained load uses the windows fully, a spent day is answered at once,
//! learned headers steer traffic, `max_concurrent` holds, accounts share.
//! In every test the upstream answers no 429.

use std::time::{Duration, Instant};

use http::StatusCode;
use proxypal_nim_sim::SimRateLimit;
use proxypal_server::config::{LimitFields, WindowEntry};

use crate::common::{Rig, bounded, chat_request, send};

/// `requests` per `per`, rolling (as a `windows` entry).
fn rolling(requests: u64, per: Duration) -> WindowEntry {
    let yaml = format!("{{ requests: {requests}, per: {}ms }}", per.as_millis());
    yaml_serde::from_str(&yaml).unwrap()
}

/// Limits of one rolling window only (the minute window made harmless), with `margin`.
fn only(window: WindowEntry, margin: Duration) -> LimitFields {
    let mut fields = LimitFields::default();
    fields.requests_per_minute = Some(1_000_000);
    fields.margin = Some(margin);
    fields.windows = Some(vec![window]);
    fields
}

/// Sends `n` chat requests at once; returns the statuses in completion order.
async fn fan_out(rig: &Rig, n: usize) -> Vec<StatusCode> {
    let addr = rig.server.addr();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let http = rig.http.clone();
            tokio::spawn(async move { send(&http, chat_request(addr, false, &[])).await.status })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_the_whole_window_per_key_is_served_at_once() {
    bounded(async {
        let period = Duration::from_secs(5);
        let rig = Rig::start(
            2,
            |s| s.with_rate_limit(SimRateLimit::RollingWindow { limit: 20, window: period }),
            |c| {
                c.rate_limit = only(rolling(20, period), Duration::from_millis(50));
                c.retry.queue_timeout = Duration::from_secs(8);
            },
        )
        .await;
        let t0 = Instant::now();
        let statuses = fan_out(&rig, 40).await;
        let burst_took = t0.elapsed();
        assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
        assert!(burst_took < Duration::from_secs(2), "40 = 2 keys × 20 go at once, took {burst_took:?}");
        assert_eq!(rig.sim.stats().total_rate_limited(), 0);

        // The 41st waits for the first grant to leave its window (5 s + margin), then goes.
        let reply = rig.chat().await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let waited = t0.elapsed();
        assert!(waited >= Duration::from_millis(5_000), "sent before the window freed: {waited:?}");
        assert!(waited < Duration::from_millis(6_500), "held back too long: {waited:?}");
        assert_eq!(rig.sim.stats().total_rate_limited(), 0, "no upstream 429");
        for key in &rig.keys {
            assert!(rig.sim.max_in_any_window(key, period) <= 20);
        }
        rig.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_load_uses_the_windows_fully_without_a_429() {
    bounded(async {
        let period = Duration::from_secs(4);
        let margin = Duration::from_millis(30);
        let rig = Rig::start(
            2,
            |s| s.with_rate_limit(SimRateLimit::RollingWindow { limit: 10, window: period }),
            |c| {
                c.rate_limit = only(rolling(10, period), margin);
                c.retry.queue_timeout = Duration::from_secs(10);
            },
        )
        .await;
        // 12 closed-loop clients for 13 s: far more than 2 × 10 per 4 s.
        let run_for = Duration::from_secs(13);
        let t0 = Instant::now();
        let addr = rig.server.addr();
        let clients: Vec<_> = (0..12)
            .map(|_| {
                let http = rig.http.clone();
                tokio::spawn(async move {
                    let mut ok = 0u64;
                    while t0.elapsed() < run_for {
                        let status = send(&http, chat_request(addr, false, &[])).await.status;
                        assert_eq!(status, StatusCode::OK);
                        ok += 1;
                    }
                    ok
                })
            })
            .collect();
        let mut served = 0;
        for c in clients {
            served += c.await.unwrap();
        }
        // The windows allow a full window per key at 0, 4.03, 8.06 and 12.09 s: 4 × 2 × 10 = 80
        // grants started before 13 s (the last clients' requests may finish after it).
        let allowed = 80u64;
        let stats = rig.sim.stats();
        let started_in_time: usize =
            rig.keys.iter().map(|k| rig.sim.accept_log(k).iter().filter(|t| **t < run_for).count()).sum();
        assert_eq!(stats.total_rate_limited(), 0, "the upstream answered 429");
        assert!(
            started_in_time as f64 >= 0.98 * allowed as f64,
            "served {started_in_time} of the {allowed} the windows allow (client saw {served})"
        );
        for key in &rig.keys {
            assert!(rig.sim.max_in_any_window(key, period) <= 10, "the window was exceeded");
        }
        rig.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_day_is_answered_at_once_with_when_it_resets() {
    bounded(async {
        let rig = Rig::start(
            1,
            |s| s,
            |c| {
                c.rate_limit.requests_per_day = Some(3);
                c.rate_limit.day_reset = Some("00:00 UTC".to_owned());
                c.retry.queue_timeout = Duration::from_secs(20);
            },
        )
        .await;
        for _ in 0..3 {
            assert_eq!(rig.chat().await.status, StatusCode::OK);
        }
        let t0 = Instant::now();
        let reply = rig.chat().await;
        assert!(t0.elapsed() < Duration::from_secs(1), "no queueing for hours: {:?}", t0.elapsed());
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
        let retry_after: u64 = reply.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry_after), "Retry-After {retry_after}");
        let error = reply.openai_error();
        assert_eq!(error["code"], "quota_exhausted", "{error}");
        assert!(error["message"].as_str().unwrap().contains("per day (fixed reset) (limit 3)"), "{error}");
        let resets_at: jiff::Timestamp = error["resets_at"].as_str().unwrap().parse().unwrap();
        let now = jiff::Timestamp::now().as_second();
        let midnight = (now / 86_400 + 1) * 86_400;
        assert!((resets_at.as_second() - midnight).abs() <= 1, "{resets_at} vs {midnight}");
        assert_eq!(rig.sim.stats().total_rate_limited(), 0);
        let key = rig.key_stats(0).await;
        let day =
            key["limits"].as_array().unwrap().iter().find(|l| l["period_seconds"] == 86_400).unwrap().clone();
        assert_eq!(
            (day["limit"].as_u64(), day["used"].as_u64(), day["remaining"].as_u64()),
            (Some(3), Some(3), Some(0))
        );
        assert_eq!(day["reset"], "00:00 UTC");
        assert_eq!(day["source"], "configured");
        let metrics = rig.get("/metrics", &[]).await.text();
        let line = format!(
            "proxypal_key_limit_remaining{{provider=\"default\",key=\"{}\",kind=\"requests\",period_seconds=\"86400\",scope=\"key\"}} 0",
            crate::common::masked(&rig.keys[0])
        );
        assert!(metrics.contains(&line), "{line} not in:\n{metrics}");
        rig.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_limits_steer_traffic_away_from_a_spent_key() {
    bounded(async {
        // The upstream allows 3 per 20 s per key and says so in its headers; the
        // proxy is configured with no such limit and learns it.
        let rig = Rig::start(
            2,
            |s| {
                s.with_rate_limit(SimRateLimit::RollingWindow { limit: 3, window: Duration::from_secs(20) })
                    .with_limit_headers(true)
            },
            |c| c.retry.queue_timeout = Duration::from_millis(500),
        )
        .await;
        for i in 0..6 {
            let reply = rig.chat().await;
            assert_eq!(reply.status, StatusCode::OK, "request {i}: {}", reply.text());
        }
        // Both keys announced remaining 0: the proxy answers itself instead of
        // spending an upstream 429 on each key.
        let reply = rig.chat().await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
        assert_eq!(rig.sim.stats().total_rate_limited(), 0, "no request reached a spent key");
        let key = rig.key_stats(0).await;
        assert!(key["blocked_ms"].as_u64().unwrap() > 10_000, "{key}");
        rig.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_caps_requests_in_flight_per_key() {
    bounded(async {
        let rig = Rig::start(
            2,
            |s| s.with_processing_delay(Duration::from_millis(200)).with_max_concurrent(1),
            |c| c.rate_limit.max_concurrent = Some(1),
        )
        .await;
        let statuses = fan_out(&rig, 6).await;
        assert!(statuses.iter().all(|s| *s == StatusCode::OK), "{statuses:?}");
        let stats = rig.sim.stats();
        assert_eq!(stats.total_rate_limited(), 0);
        for key in &rig.keys {
            assert_eq!(rig.sim.account_stats(key).max_in_flight, 1, "one in flight per key");
        }
        rig.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_one_account_share_its_budget_and_responses_carry_the_pools_limits() {
    bounded(async {
        let period = Duration::from_secs(30);
        let rig = Rig::start(
            3,
            |s| {
                let keys = s.keys.clone();
                s.with_accounts(keys[..2].iter().map(|k| (k.clone(), "alice".to_owned())))
                    .with_extra_limit(SimRateLimit::RollingWindow { limit: 4, window: period })
            },
            |c| {
                c.rate_limit.requests_per_minute = Some(4);
                c.accounts.insert("alice".into(), only(rolling(4, period), Duration::from_millis(50)));
                c.keys[0].account = Some("alice".into());
                c.keys[1].account = Some("alice".into());
                c.retry.queue_timeout = Duration::from_millis(300);
            },
        )
        .await;
        let statuses = fan_out(&rig, 14).await;
        let ok = statuses.iter().filter(|s| **s == StatusCode::OK).count();
        // alice: 4 in 30 s for both keys together; the lone key: 4 a minute.
        assert_eq!(ok, 8, "{statuses:?}");
        assert_eq!(rig.sim.stats().total_rate_limited(), 0);
        assert!(rig.sim.max_in_any_window_for_account("alice", period) <= 4);
        let key = rig.key_stats(1).await;
        assert_eq!(key["account"], "alice");
        let reply = rig.get("/stats", &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        let probe = rig.chat().await;
        // The pool's minute: alice's 1 000 000 (counted once; its binding window is the
        // 30 s one) + the lone key's 4.
        assert_eq!(probe.headers["x-ratelimit-limit-requests"], "1000004", "{:?}", probe.headers);
        assert!(probe.headers.contains_key("x-ratelimit-reset-requests"));
        rig.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_windows_reserve_then_settle_with_the_reported_usage() {
    bounded(async {
        // Each answer uses 50 completion tokens plus the prompt (body bytes / 4);
        // the upstream allows 1 000 tokens per 20 s per key and so does the proxy.
        let period = Duration::from_secs(20);
        let rig = Rig::start(
            1,
            |s| s.with_completion_tokens(50).with_token_limit(1_000, period),
            |c| {
                let mut fields = only(rolling(1_000, period), Duration::from_millis(50));
                fields.windows = Some(vec![yaml_serde::from_str("{ tokens: 1000, per: 20s }").unwrap()]);
                c.rate_limit = fields;
                c.retry.queue_timeout = Duration::from_millis(300);
            },
        )
        .await;
        let mut served = 0;
        for _ in 0..40 {
            let reply = rig.chat().await;
            match reply.status {
                StatusCode::OK => served += 1,
                StatusCode::TOO_MANY_REQUESTS => break,
                other => panic!("{other}: {}", reply.text()),
            }
        }
        let stats = rig.sim.stats();
        assert_eq!(stats.total_rate_limited(), 0, "the upstream never refused for tokens");
        let used = stats.account(&rig.keys[0]).tokens;
        // Served while used + reserved stayed below 1 000: the settled usage, not the
        // reservation (1 024 + prompt, alone above the limit), decides.
        assert!(served >= 5, "only {served} served: reservations were not replaced by usage");
        assert!(used <= 1_000 + 100, "{used} tokens in the window");
        let key = rig.key_stats(0).await;
        let tokens =
            key["limits"].as_array().unwrap().iter().find(|l| l["kind"] == "tokens").unwrap().clone();
        assert_eq!(
            tokens["used"].as_u64(),
            Some(used),
            "the proxy counted what the upstream reported: {tokens}"
        );
        rig.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_reset_clears_a_disabled_key() {
    bounded(async {
        let rig = Rig::start(1, |s| s, |c| c.keys[0].name = Some("k0".into())).await;
        let provider = rig.server.app().gateway().provider("default").unwrap();
        provider
            .keys()
            .report(&provider.keys().select().unwrap(), proxypal_gateway::keypool::Outcome::AuthFailed);
        assert_eq!(rig.key_stats(0).await["state"], "disabled");
        let post = |path: &str| {
            http::Request::builder()
                .method(http::Method::POST)
                .uri(rig.url(path))
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap()
        };
        let missing = send(&rig.http, post("/admin/keys/nobody/reset")).await;
        assert_eq!(missing.status, StatusCode::NOT_FOUND);
        for odd in ["/admin/keys/reset", "/admin/keys//reset", "/admin/keys/%E2%80/reset"] {
            assert_eq!(send(&rig.http, post(odd)).await.status, StatusCode::NOT_FOUND, "{odd}");
        }
        let reply = send(&rig.http, post("/admin/keys/k0/reset")).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(rig.key_stats(0).await["state"], "ready");
        assert_eq!(rig.chat().await.status, StatusCode::OK);
        rig.server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bare_429_rests_the_key_only_until_its_own_window_frees() {
    bounded(async {
        // 2 per 4 s per key; the upstream answers the second request with NVIDIA's
        // bare 429 (no Retry-After). The window frees ~4 s after the first grant:
        // the key rests that long, not `rate_limit_cooldown` (60 s).
        let rig = Rig::start(
            1,
            |s| s,
            |c| {
                c.rate_limit = only(rolling(2, Duration::from_secs(4)), Duration::from_millis(50));
                c.retry.queue_timeout = Duration::from_millis(200);
            },
        )
        .await;
        assert_eq!(rig.chat().await.status, StatusCode::OK);
        rig.sim.push_fault(proxypal_nim_sim::Fault::rate_limited(), proxypal_nim_sim::FaultTarget::Any);
        let reply = rig.chat().await;
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
        let key = rig.key_stats(0).await;
        assert_eq!(key["state"], "cooling_down", "{key}");
        let rest = key["cooldown_remaining_ms"].as_u64().unwrap();
        assert!((2_000..=4_050).contains(&rest), "rests {rest} ms: until the window frees, not 60 s");

        // Without a window that frees sooner, the configured cooldown applies.
        let rig2 = Rig::start(1, |s| s, |c| c.retry.queue_timeout = Duration::from_millis(200)).await;
        rig2.sim.push_fault(proxypal_nim_sim::Fault::rate_limited(), proxypal_nim_sim::FaultTarget::Any);
        assert_eq!(rig2.chat().await.status, StatusCode::TOO_MANY_REQUESTS);
        let rest = rig2.key_stats(0).await["cooldown_remaining_ms"].as_u64().unwrap();
        assert!(rest > 59_000, "the configured 60 s: {rest} ms");
        rig.server.shutdown().await;
        rig2.server.shutdown().await;
    })
    .await;
}
