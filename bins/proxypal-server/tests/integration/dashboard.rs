//! `/dashboard` is served from the binary with a strict CSP and without a
//! token; `/stats` carries the sampled request history the page draws.

use std::time::{Duration, Instant};

use http::StatusCode;
use proxypal_nim_sim::{SimConfig, SimServer, generate_test_keys};
use proxypal_server::StartOptions;
use proxypal_server::config::{Config, Secret};
use serde_json::Value;

use crate::common::{self, Rig, bounded, http_client, masked, proxy_config};

const INTERVAL: Duration = Duration::from_millis(100);

async fn rig(keys: usize, tweak: impl FnOnce(&mut Config)) -> Rig {
    let keys = generate_test_keys(keys);
    let sim = SimServer::start(SimConfig::default().with_keys(keys.clone())).unwrap();
    let mut config = proxy_config(&sim, &keys);
    tweak(&mut config);
    let server = proxypal_server::start_with(
        &config,
        false,
        StartOptions { history_interval: INTERVAL, ..StartOptions::default() },
    )
    .await
    .unwrap();
    Rig { sim, server, keys, http: http_client() }
}

fn header<'a>(reply: &'a common::Reply, name: &str) -> &'a str {
    reply.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

#[tokio::test]
async fn dashboard_is_html_with_a_strict_csp_and_needs_no_token() {
    bounded(async {
        let rig = rig(2, |c| c.auth.tokens = vec![Secret::new("dash-token")]).await;
        let reply = rig.get("/dashboard", &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(header(&reply, "content-type"), "text/html; charset=utf-8");
        let csp = header(&reply, "content-security-policy");
        assert!(csp.contains("default-src 'none'"), "{csp}");
        assert!(csp.contains("script-src 'self' 'unsafe-inline'"), "{csp}");
        assert!(csp.contains("connect-src 'self'"), "{csp}");
        assert!(!csp.contains("http"), "no other origin allowed: {csp}");
        let html = reply.text();
        assert!(html.starts_with("<!doctype html>"));
        assert!(html.contains("id=\"key-rows\"") && html.contains("sessionStorage"));
        // Each key's quota windows from /stats' `limits` are drawn as bars.
        for needle in
            ["k.limits", "resets_in_ms", "blocked_ms", "className = \"bar\"", "\"meter\"", ".bar .fill"]
        {
            assert!(html.contains(needle), "the page draws limits as bars ({needle})");
        }
        assert!(!html.contains("rate_override"), "a field /stats no longer has");
        // The response cache's panel, drawn from /stats' `cache` (hidden while it is null).
        for needle in ["id=\"cache-hit-rate\"", "renderCache(stats.cache)", "saved_requests", "redis_errors"]
        {
            assert!(html.contains(needle), "the page shows the cache's hit rate ({needle})");
        }
        // Names can be anything: the page only inserts text, never markup.
        assert!(!html.contains("innerHTML") && !html.contains("insertAdjacentHTML"));
        // Self-contained: no external script, style or image.
        for needle in ["src=\"http", "href=\"http", "<script src", "rel=\"stylesheet", "src=\"//", "@import"]
        {
            assert!(!html.contains(needle), "external asset ({needle}) in the page");
        }
        // /stats still wants the token; the page is what asks for it.
        assert_eq!(rig.get("/stats", &[]).await.status, StatusCode::UNAUTHORIZED);
        let ok = rig.get("/stats", &[("authorization", "Bearer dash-token")]).await;
        assert_eq!(ok.status, StatusCode::OK);
        // HEAD works, other methods do not.
        let head = common::send(
            &rig.http,
            http::Request::head(rig.url("/dashboard")).body(http_body_util::Full::default()).unwrap(),
        )
        .await;
        assert_eq!(head.status, StatusCode::OK);
        assert!(head.body.is_empty());
        let post = common::send(
            &rig.http,
            http::Request::post(rig.url("/dashboard")).body(http_body_util::Full::default()).unwrap(),
        )
        .await;
        assert_eq!(post.status, StatusCode::METHOD_NOT_ALLOWED);
        rig.server.shutdown().await;
    })
    .await;
}

fn history_total(stats: &Value, label: &str) -> u64 {
    stats["history"]["keys"][label].as_array().map_or(0, |a| a.iter().filter_map(Value::as_u64).sum())
}

#[tokio::test]
async fn stats_history_holds_per_interval_deltas() {
    bounded(async {
        let rig = rig(2, |_| {}).await;
        let stats = rig.stats().await;
        assert_eq!(stats["history"]["interval_ms"], 100);
        assert_eq!(stats["history"]["samples"], proxypal_server::history::SAMPLES);
        assert!(stats["history"]["keys"].is_object(), "{stats}");

        for _ in 0..6 {
            assert_eq!(rig.chat().await.status, StatusCode::OK);
        }
        // Wait until every request has been sampled into some interval.
        let labels: Vec<String> = rig.keys.iter().map(|k| format!("default/{}", masked(k))).collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        let stats = loop {
            let stats = rig.stats().await;
            let sampled: u64 = labels.iter().map(|l| history_total(&stats, l)).sum();
            if sampled == 6 || Instant::now() > deadline {
                break stats;
            }
            tokio::time::sleep(INTERVAL / 2).await;
        };
        for (i, label) in labels.iter().enumerate() {
            let series = stats["history"]["keys"][label].as_array().unwrap();
            assert!(series.len() <= proxypal_server::history::SAMPLES);
            // Deltas, not running totals: they add up to the counter.
            assert_eq!(
                history_total(&stats, label),
                stats["keys"][i]["requests"].as_u64().unwrap(),
                "{stats}"
            );
            assert_eq!(history_total(&stats, label), 3, "round robin over two keys: {stats}");
            // What the page's bars are drawn from.
            let key = &stats["keys"][i];
            assert_eq!(key["blocked_ms"], 0, "{key}");
            assert!(key["account"].is_null(), "{key}");
            let minute = key["limits"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["kind"] == "requests" && l["period_seconds"] == 60)
                .unwrap_or_else(|| panic!("a requests/60s limit: {key}"));
            assert_eq!(
                (minute["limit"].as_u64(), minute["used"].as_u64()),
                (Some(60_000), Some(3)),
                "{minute}"
            );
            assert_eq!(minute["source"], "configured", "{minute}");
            assert_eq!(minute["scope"], "key", "{minute}");
        }

        // Quiet intervals add zeros and keep the sum: the series moves on.
        tokio::time::sleep(INTERVAL * 3).await;
        let later = rig.stats().await;
        for label in &labels {
            let series = later["history"]["keys"][label].as_array().unwrap();
            assert_eq!(series.last(), Some(&Value::from(0)), "{later}");
            assert_eq!(history_total(&later, label), 3);
        }
        rig.server.shutdown().await;
    })
    .await;
}

#[test]
fn non_field_env_vars_are_not_config() {
    // PROXYPAL_CONFIG is the --config path (the Dockerfile sets it) and
    // PROXYPAL_HISTORY_INTERVAL_MS a test knob: neither is a config field.
    let env = [
        ("PROXYPAL_CONFIG", "/etc/proxypal/proxypal.yaml"),
        ("PROXYPAL_HISTORY_INTERVAL_MS", "100"),
        ("PROXYPAL_LISTEN", "127.0.0.1:9099"),
    ];
    let config = Config::from_sources(None, env, true).unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:9099");
    assert!(config.warnings.is_empty(), "{:?}", config.warnings);
    // Any other unknown variable is ignored too, but named in a warning.
    let config = Config::from_sources(None, [("PROXYPAL_NOPE", "1")], true).unwrap();
    assert_eq!(config.warnings.len(), 1, "{:?}", config.warnings);
    assert!(config.warnings[0].contains("PROXYPAL_NOPE"), "{:?}", config.warnings);
}

#[tokio::test]
async fn stats_cache_is_null_while_the_cache_is_off() {
    bounded(async {
        let rig = rig(1, |_| {}).await;
        assert!(!Config::default().cache.enabled, "off by default outside --dev");
        let stats = rig.stats().await;
        assert!(stats.get("cache").is_some_and(Value::is_null), "the page hides its cache panel: {stats}");
        rig.server.shutdown().await;
    })
    .await;
}

#[cfg(feature = "dev")] // `--dev` and its simulators are left out of a production build
#[tokio::test]
async fn dev_turns_the_memory_cache_on_and_says_so() {
    use proxypal_server::config::CacheBackend;
    use proxypal_server::dev;

    let listen: std::net::SocketAddr = "127.0.0.1:8080".parse().unwrap();
    let mut config = Config::dev();
    let simulated = dev::start_simulated_upstreams(&mut config).unwrap();
    assert!(config.cache.enabled);
    assert_eq!(config.cache.backend, CacheBackend::Memory);
    let banner = dev::banner(&config, listen, &simulated);
    assert!(banner.contains("Response cache: on (memory, entries live 1h)"), "{banner}");
    assert!(banner.contains("dashboard's hit rate"), "{banner}");
    // Anthropic clients: where to point them, and a model name the dev alias routes.
    assert!(banner.contains("ANTHROPIC_BASE_URL=http://127.0.0.1:8080 "), "{banner}");
    assert!(
        banner.contains("http://127.0.0.1:8080/v1/messages") && banner.contains("claude-sonnet-4-5"),
        "{banner}"
    );
    assert!(config.models.contains_key(dev::DEV_CLAUDE_ALIAS));
    // The routing demo repeats one request: it goes past the cache.
    assert!(banner.contains("-H 'Cache-Control: no-store' -H 'Content-Type: application/json'"), "{banner}");
    drop(simulated);

    // A file that turns the cache off under --dev keeps it off.
    let mut config = proxypal_server::config::Config::from_sources(
        Some(proxypal_server::config::YamlSource::Text("cache: { enabled: false }")),
        std::iter::empty::<(&str, &str)>(),
        true,
    )
    .unwrap();
    let simulated = dev::start_simulated_upstreams(&mut config).unwrap();
    assert!(!config.cache.enabled);
    let banner = dev::banner(&config, listen, &simulated);
    assert!(banner.contains("Response cache: off."), "{banner}");
    assert!(!banner.contains("no-store"), "{banner}");
}
