//! Several providers behind one endpoint (issue 12): two or three simulated
//! providers on real sockets, the server configured through YAML as a user
//! would, aliases with tiers and weights, failover across providers, and the
//! models list.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use proxypal_nim_sim::{
    Fault, FaultTarget, SimConfig, SimDialect, SimHandle, SimRateLimit, SimServer, generate_test_keys_seeded,
};
use proxypal_server::config::{Config, YamlSource};
use serde_json::{Value, json};

use crate::common::{HttpClient, Reply, bounded, http_client, send};

/// A simulated provider: its simulator and its keys.
struct Sim {
    handle: SimHandle,
    keys: Vec<String>,
}

impl Sim {
    fn start(seed: u64, n: usize, tweak: impl FnOnce(SimConfig) -> SimConfig) -> Self {
        let keys = generate_test_keys_seeded(seed, n);
        let handle = SimServer::start(tweak(SimConfig::default().with_keys(keys.clone()))).unwrap();
        Self { handle, keys }
    }

    /// The YAML list of its keys.
    fn keys_yaml(&self) -> String {
        format!("[{}]", self.keys.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(", "))
    }

    /// Every request it received (catalog fetches included).
    fn requests(&self) -> u64 {
        self.handle.stats().total_requests
    }

    /// Requests with a body naming a model (not the catalog fetches).
    fn chats(&self) -> u64 {
        self.handle.stats().models.values().sum()
    }

    fn model_count(&self, model: &str) -> u64 {
        self.handle.stats().models.get(model).copied().unwrap_or(0)
    }

    /// Its YAML entry under `providers:` as `name`, with `extra` lines after the keys.
    fn provider(&self, name: &str, extra: &str) -> String {
        provider_entry(name, &self.handle.base_url(), &self.keys_yaml(), extra)
    }
}

/// The YAML entry of provider `name` under `providers:`: its `url` and `keys`, then
/// `extra` (further lines, already indented by 4 spaces).
fn provider_entry(name: &str, url: &str, keys: &str, extra: &str) -> String {
    format!("  {name}:\n    base_url: {url}\n    keys: {keys}\n{extra}")
}

/// The config from `yaml` (listen, state and timeouts added).
fn config(yaml: &str) -> Config {
    let yaml = format!("listen: 127.0.0.1:0\nstate: {{ path: null }}\nshutdown_grace: 2s\n{yaml}");
    Config::from_sources(Some(YamlSource::Text(&yaml)), std::iter::empty::<(&str, &str)>(), false)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// The server from `yaml` (listen, state and timeouts added).
async fn start_server(yaml: &str) -> (proxypal_server::Running, HttpClient) {
    (proxypal_server::start(&config(yaml), false).await.unwrap(), http_client())
}

/// A POST to `/v1/chat/completions` at `addr` as JSON, its body still to be set.
fn chat_builder(addr: SocketAddr) -> http::request::Builder {
    Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}/v1/chat/completions"))
        .header("content-type", "application/json")
}

/// A POST of `body` to `/v1/chat/completions` at `addr`.
fn chat_request(addr: SocketAddr, body: &Value) -> Request<Full<Bytes>> {
    chat_builder(addr).body(Full::new(Bytes::from(body.to_string()))).unwrap()
}

/// POSTs `body` to the server's `/v1/chat/completions`.
async fn post_json(http: &HttpClient, server: &proxypal_server::Running, body: &Value) -> Reply {
    send(http, chat_request(server.addr(), body)).await
}

/// GETs `path` of the server.
async fn get(http: &HttpClient, server: &proxypal_server::Running, path: &str) -> Reply {
    let req = Request::builder()
        .uri(format!("http://{}{path}", server.addr()))
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(http, req).await
}

async fn chat(http: &HttpClient, server: &proxypal_server::Running, model: &str, stream: bool) -> Reply {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": "Hello"}],
        "stream": stream,
        "temperature": 0.5,
    });
    post_json(http, server, &body).await
}

fn header<'a>(reply: &'a Reply, name: &str) -> &'a str {
    reply.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("")
}

/// Two providers `a` (default) and `b`, unlimited here, and `yaml` after them.
fn two(a: &Sim, b: &Sim, models: &str) -> String {
    format!(
        "providers:\n{}{}routing: {{ default_provider: a }}\nretry: {{ queue_timeout: 2s }}\n{models}",
        a.provider("a", ""),
        b.provider("b", ""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aliases_resolve_provider_model_pins_and_nvidia_ids_pass_through() {
    bounded(async {
        let (a, b) = (Sim::start(1201, 2, |c| c), Sim::start(1202, 2, |c| c));
        let yaml = two(
            &a,
            &b,
            "models:\n  llama-70b:\n    targets:\n      - { provider: b, model: llama-3.3-70b-versatile }\n",
        );
        let (server, http) = start_server(&yaml).await;

        // An alias: its target's model goes upstream, and the response names the route.
        let reply = chat(&http, &server, "llama-70b", false).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(header(&reply, "x-proxypal-route"), "b/llama-3.3-70b-versatile");
        assert_eq!(header(&reply, "x-proxypal-attempts"), "1");
        assert_eq!(reply.json()["model"], "llama-3.3-70b-versatile", "the body is passed through untouched");
        assert_eq!(b.model_count("llama-3.3-70b-versatile"), 1);
        // Nothing else in the body changed: every other field is as the client sent it.
        let sent: Value = serde_json::from_slice(&b.handle.stats().last_request_body.unwrap()).unwrap();
        assert_eq!(sent["messages"], json!([{"role": "user", "content": "Hello"}]));
        assert_eq!((sent["temperature"].as_f64(), sent["stream"].as_bool()), (Some(0.5), Some(false)));

        // provider/model pins a provider, the rest is its model id.
        let reply = chat(&http, &server, "b/some-model", false).await;
        assert_eq!(header(&reply, "x-proxypal-route"), "b/some-model");
        assert_eq!(b.model_count("some-model"), 1);

        // NVIDIA ids (a namespace that is no provider) go to the default provider as they are.
        let reply = chat(&http, &server, "meta/llama-3.1-8b-instruct", false).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(header(&reply, "x-proxypal-route"), "a/meta/llama-3.1-8b-instruct");
        assert_eq!(a.model_count("meta/llama-3.1-8b-instruct"), 1);
        assert_eq!((a.chats(), b.chats()), (1, 2));
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_within_a_tier_split_requests_one_to_two() {
    bounded(async {
        let (a, b) = (Sim::start(1211, 2, |c| c), Sim::start(1212, 2, |c| c));
        let yaml = two(
            &a,
            &b,
            "models:
  mix:
    targets:
      - { provider: a, model: m-a, weight: 1 }
      - { provider: b, model: m-b, weight: 2 }
",
        );
        let (server, http) = start_server(&yaml).await;
        for _ in 0..300 {
            let reply = chat(&http, &server, "mix", false).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        }
        let (on_a, on_b) = (a.model_count("m-a"), b.model_count("m-b"));
        assert_eq!(on_a + on_b, 300);
        // 1:2 within ±2 % of the 300 (smooth weighted round robin is exact when both have room).
        assert!((94..=106).contains(&on_a), "a served {on_a}, b {on_b}");
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tier_two_serves_only_when_tier_one_has_no_room_and_tier_one_sees_no_429() {
    bounded(async {
        // Tier 1: 5 requests per minute per key, enforced by the simulator too (a request
        // over it would be a 429 there).
        let limit = SimRateLimit::RollingWindow { limit: 5, window: Duration::from_secs(60) };
        let a = Sim::start(1221, 1, |c| c.with_rate_limit(limit));
        let b = Sim::start(1222, 1, |c| c);
        let yaml = free_then_paid(&a, &b);
        let (server, http) = start_server(&yaml).await;
        let mut routes = Vec::new();
        for _ in 0..20 {
            let reply = chat(&http, &server, "llama", false).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            assert_eq!(header(&reply, "x-proxypal-attempts"), "1", "no attempt wasted");
            routes.push(header(&reply, "x-proxypal-route").to_owned());
        }
        // Free first, all of it; then the paid tier.
        assert!(routes[..5].iter().all(|r| r == "free/free-llama"), "{routes:?}");
        assert!(routes[5..].iter().all(|r| r == "paid/paid-llama"), "{routes:?}");
        assert_eq!(a.handle.stats().total_rate_limited(), 0, "tier 1 never saw a 429");
        assert_eq!((a.model_count("free-llama"), b.model_count("paid-llama")), (5, 15));
        server.shutdown().await;
    })
    .await;
}

/// Alias `llama`: `free` (5 per minute) in tier 1, `paid` in tier 2.
fn free_then_paid(free: &Sim, paid: &Sim) -> String {
    format!(
        "providers:
{}{}routing: {{ default_provider: free }}
retry: {{ queue_timeout: 2s }}
models:
  llama:
    targets:
      - {{ provider: free, model: free-llama, tier: 1 }}
      - {{ provider: paid, model: paid-llama, tier: 2 }}
",
        free.provider("free", "    rate_limit: { requests_per_minute: 5 }\n"),
        paid.provider("paid", "    rate_limit: { requests_per_minute: 1000 }\n"),
    )
}

/// An alias served by `a` first (tier 1) and `b` (tier 2).
fn first_then(a_url: &str, a_keys: &str, b: &Sim) -> String {
    format!(
        "providers:
{}{}routing: {{ default_provider: a }}
retry: {{ max_attempts: 4, queue_timeout: 2s }}
models:
  llama:
    targets:
      - {{ provider: a, model: a-llama, tier: 1 }}
      - {{ provider: b, model: b-llama, tier: 2 }}
",
        provider_entry("a", a_url, a_keys, ""),
        b.provider("b", ""),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_failures_fail_over_to_the_next_target_before_the_client_sees_them() {
    bounded(async {
        let b = Sim::start(1232, 1, |c| c);
        // 5xx on every key of a; 429 on every key; keys a does not know (401); a closed port.
        let cases = [
            ("500", Fault::problem(500, "Internal Server Error", "boom")),
            ("429", Fault::rate_limited()),
            ("503", Fault::problem(503, "Service Unavailable", "down")),
        ];
        for (what, fault) in cases {
            let a = Sim::start(1231, 3, |c| c);
            a.handle.set_fault_always(Some(fault));
            let yaml = first_then(&a.handle.base_url(), &a.keys_yaml(), &b);
            let (server, http) = start_server(&yaml).await;
            let before = b.chats();
            let reply = chat(&http, &server, "llama", false).await;
            assert_eq!(reply.status, StatusCode::OK, "{what}: {}", reply.text());
            assert_eq!(header(&reply, "x-proxypal-route"), "b/b-llama", "{what}");
            assert_eq!(b.chats(), before + 1, "{what}");
            let attempts: usize = header(&reply, "x-proxypal-attempts").parse().unwrap();
            if what == "429" {
                // Every key of a rate limited: each tried once, then b.
                assert_eq!(attempts, 4, "{what}");
            } else {
                // A provider failing as a whole is left after two server errors, not every key.
                assert_eq!(attempts, 3, "{what}");
                assert_eq!(a.chats(), 2, "{what}");
            }
            server.shutdown().await;
        }

        // Keys a rejects (401): disabled one by one, then b serves.
        let a = Sim::start(1233, 2, |c| c);
        let strangers = generate_test_keys_seeded(99, 2);
        let yaml =
            first_then(&a.handle.base_url(), &format!("[\"{}\", \"{}\"]", strangers[0], strangers[1]), &b);
        let (server, http) = start_server(&yaml).await;
        let reply = chat(&http, &server, "llama", false).await;
        assert_eq!(reply.status, StatusCode::OK, "401: {}", reply.text());
        assert_eq!(header(&reply, "x-proxypal-route"), "b/b-llama");
        assert_eq!(header(&reply, "x-proxypal-attempts"), "3");
        server.shutdown().await;

        // Nothing listening: the provider is skipped after the first refusal.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", closed.local_addr().unwrap());
        drop(closed);
        let a = Sim::start(1234, 3, |c| c);
        let yaml = first_then(&url, &a.keys_yaml(), &b);
        let (server, http) = start_server(&yaml).await;
        let reply = chat(&http, &server, "llama", false).await;
        assert_eq!(reply.status, StatusCode::OK, "refused: {}", reply.text());
        assert_eq!(header(&reply, "x-proxypal-route"), "b/b-llama");
        assert_eq!(header(&reply, "x-proxypal-attempts"), "2", "one refusal, then b");
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_errors_come_back_at_once_without_fallback() {
    bounded(async {
        let b = Sim::start(1242, 1, |c| c);
        for status in [400u16, 404, 413, 422] {
            let a = Sim::start(1241, 2, |c| c);
            a.handle.set_fault_always(Some(Fault::problem(status, "Client Error", "your request is wrong")));
            let (server, http) = start_server(&first_then(&a.handle.base_url(), &a.keys_yaml(), &b)).await;
            let before = b.chats();
            let reply = chat(&http, &server, "llama", false).await;
            assert_eq!(reply.status.as_u16(), status, "{}", reply.text());
            assert_eq!(header(&reply, "x-proxypal-attempts"), "1");
            assert_eq!(header(&reply, "x-proxypal-route"), "a/a-llama");
            assert!(reply.openai_error()["message"].as_str().unwrap().contains("your request is wrong"));
            assert_eq!(b.chats(), before, "{status}: no fallback on the client's own error");
            server.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_failover_after_the_first_stream_byte() {
    bounded(async {
        let a = Sim::start(1251, 2, |c| c);
        let b = Sim::start(1252, 1, |c| c);
        let (server, http) = start_server(&first_then(&a.handle.base_url(), &a.keys_yaml(), &b)).await;
        // The catalog fetch at start comes first (it would take the fault otherwise).
        for _ in 0..200 {
            if a.requests() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        a.handle.push_fault(Fault::BreakMidStream { after_chunks: 2 }, FaultTarget::Any);
        let body = json!({"model": "llama", "messages": [{"role": "user", "content": "Hi"}], "stream": true});
        let resp = http.request(chat_request(server.addr(), &body)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()["x-proxypal-route"], "a/a-llama");
        let (_, body) = resp.into_parts();
        let got = body.collect().await;
        let text = match got {
            Ok(c) => String::from_utf8_lossy(&c.to_bytes()).into_owned(),
            Err(_) => String::new(), // cut short: what the client sees of a broken stream
        };
        assert!(!text.contains("[DONE]"), "the stream broke; nothing replaced it: {text}");
        assert_eq!(b.chats(), 0, "no second provider once bytes reached the client");
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_merged_and_each_catalog_fetched_once_per_ttl() {
    bounded(async {
        let a = Sim::start(1261, 1, |c| c.with_models(["meta/llama-3.3-70b-instruct", "a/other"]));
        let b = Sim::start(1262, 1, |c| c.with_models(["llama-3.3-70b-versatile"]));
        let mut yaml = two(
            &a,
            &b,
            "models:
  llama-70b:
    targets:
      - { provider: a, model: meta/llama-3.3-70b-instruct }
      - { provider: b, model: llama-3.3-70b-versatile }
      - { provider: b, model: not-in-the-catalog, tier: 2 }
",
        );
        yaml = yaml.replace(
            "routing: { default_provider: a }",
            "routing: { default_provider: a, list_provider_models: true }",
        );
        let (server, http) = start_server(&yaml).await;
        let mut lists = Vec::new();
        for _ in 0..10 {
            let reply = get(&http, &server, "/v1/models").await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            lists.push(reply.json());
        }
        let ids: Vec<String> = lists[9]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(lists[9]["object"], "list");
        assert!(ids.contains(&"llama-70b".to_owned()), "{ids:?}");
        assert!(
            ids.contains(&"meta/llama-3.3-70b-instruct".to_owned()),
            "the default's catalog as is: {ids:?}"
        );
        assert!(ids.contains(&"b/llama-3.3-70b-versatile".to_owned()), "others as provider/id: {ids:?}");
        let alias = lists[9]["data"].as_array().unwrap().iter().find(|m| m["id"] == "llama-70b").unwrap();
        assert_eq!((alias["object"].as_str(), alias["owned_by"].as_str()), (Some("model"), Some("proxypal")));
        assert!(alias["created"].is_u64());
        // However often clients list, each upstream catalog was fetched once (TTL 10 min).
        assert_eq!((a.requests(), b.requests()), (1, 1));
        // The target missing from b's catalog is reported in /stats.
        let stats = get(&http, &server, "/stats").await.json();
        let targets = &stats["aliases"][0]["targets"];
        assert_eq!(targets[2]["model"], "not-in-the-catalog");
        assert_eq!(targets[2]["missing_from_catalog"], true, "{stats}");
        assert_eq!(targets[1]["missing_from_catalog"], false, "{stats}");
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_without_auth_gets_no_authorization_header() {
    bounded(async {
        let local = Sim::start(1271, 0, |c| c.with_anonymous(true));
        let a = Sim::start(1272, 1, |c| c);
        let yaml = format!(
            "providers:
{}  local:
    base_url: {}
    auth: none
routing: {{ default_provider: a }}
",
            a.provider("a", ""),
            local.handle.base_url()
        );
        let (server, http) = start_server(&yaml).await;
        let reply = chat(&http, &server, "local/llama3.3:70b", false).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(header(&reply, "x-proxypal-route"), "local/llama3.3:70b");
        let headers = local.handle.stats().last_request_headers.unwrap();
        assert!(headers.get("authorization").is_none(), "{headers:?}");
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_dialects_from_the_simulator_are_understood() {
    bounded(async {
        // Each simulated provider allows 2 requests per minute on its one key and
        // says so its own way; the proxy is told nothing of the limit (a generous
        // configured one) and must learn it from the 429, then serve from b.
        for (preset, dialect) in [
            ("groq", SimDialect::Groq),
            ("cerebras", SimDialect::Cerebras),
            ("openrouter", SimDialect::OpenRouter),
            ("gemini", SimDialect::Gemini),
        ] {
            let limit = SimRateLimit::RollingWindow { limit: 2, window: Duration::from_secs(60) };
            let a = Sim::start(1281, 1, |c| c.with_rate_limit(limit).with_dialect(dialect));
            let b = Sim::start(1282, 1, |c| c);
            let yaml = format!(
                "providers:
{}{}routing: {{ default_provider: a }}
# A bare 429 would rest the key 5 s: a longer rest comes from what the provider said.
retry: {{ rate_limit_cooldown: 5s, queue_timeout: 2s }}
models:
  m:
    targets:
      - {{ provider: a, model: a-m, tier: 1 }}
      - {{ provider: b, model: b-m, tier: 2 }}
",
                a.provider(
                    "a",
                    &format!("    preset: {preset}\n    rate_limit: {{ requests_per_minute: 1000 }}\n")
                ),
                b.provider("b", ""),
            );
            let (server, http) = start_server(&yaml).await;
            let mut routes = Vec::new();
            for _ in 0..6 {
                let reply = chat(&http, &server, "m", false).await;
                assert_eq!(reply.status, StatusCode::OK, "{preset}: {}", reply.text());
                routes.push(header(&reply, "x-proxypal-route").to_owned());
            }
            assert_eq!(&routes[..2], ["a/a-m", "a/a-m"], "{preset}: {routes:?}");
            assert!(routes[2..].iter().all(|r| r == "b/b-m"), "{preset}: {routes:?}");
            // At most one 429 (none when the headers announced the limit first): the key
            // rests instead of earning one per request.
            assert!(a.handle.stats().total_rate_limited() <= 1, "{preset}");
            let stats = get(&http, &server, "/stats").await.json();
            let key =
                stats["keys"].as_array().unwrap().iter().find(|k| k["provider"] == "a").unwrap().clone();
            let rest = key["cooldown_remaining_ms"]
                .as_u64()
                .unwrap_or(0)
                .max(key["blocked_ms"].as_u64().unwrap_or(0));
            assert!(rest > 30_000 && rest <= 61_000, "{preset}: rests until the window frees ({rest} ms)");
            server.shutdown().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_providers_and_aliases_without_dropping_streams_or_state() {
    bounded(async {
        let a = Sim::start(1291, 2, |c| c.with_stream(10, Duration::from_millis(50)));
        let b = Sim::start(1292, 1, |c| c);
        let before = two(&a, &b, "models:\n  m:\n    targets:\n      - { provider: a, model: a-m }\n");
        let (server, http) = start_server(&before).await;
        for _ in 0..3 {
            assert_eq!(header(&chat(&http, &server, "m", false).await, "x-proxypal-route"), "a/a-m");
        }
        // A stream of ~500 ms is open while the reload happens.
        let streaming = {
            let (http, addr) = (http.clone(), server.addr());
            tokio::spawn(async move {
                let body =
                    json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": true});
                let resp = http.request(chat_request(addr, &body)).await.unwrap();
                String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned()
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;

        // Now: m goes to b first, and a third provider c exists.
        let c = Sim::start(1293, 1, |c| c);
        let after = format!(
            "providers:
{}{}{}routing: {{ default_provider: a }}
retry: {{ queue_timeout: 2s }}
models:
  m:
    targets:
      - {{ provider: b, model: b-m }}
      - {{ provider: a, model: a-m, tier: 2 }}
",
            a.provider("a", ""),
            b.provider("b", ""),
            c.provider("c", ""),
        );
        server.app().reload(&config(&after)).unwrap();

        assert_eq!(header(&chat(&http, &server, "m", false).await, "x-proxypal-route"), "b/b-m");
        assert_eq!(header(&chat(&http, &server, "c/x", false).await, "x-proxypal-route"), "c/x");
        let text = streaming.await.unwrap();
        assert!(text.contains("data: [DONE]"), "the stream finished across the reload: {text}");
        // a's keys stayed: their counters were kept (3 plain requests and the stream).
        let stats = get(&http, &server, "/stats").await.json();
        let on_a: u64 = stats["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|k| k["provider"] == "a")
            .map(|k| k["requests"].as_u64().unwrap())
            .sum();
        assert_eq!(on_a, 4, "{stats}");
        let names: Vec<&str> =
            stats["providers"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_provider_file_sends_the_same_upstream_request_as_before() {
    bounded(async {
        // Today's file: top-level upstream, keys and rate_limit, no providers.
        let a = Sim::start(1301, 2, |c| c);
        let yaml = format!(
            "upstream: {{ base_url: {} }}\nkeys: {}\nrate_limit: {{ requests_per_minute: 1000 }}\n",
            a.handle.base_url(),
            a.keys_yaml()
        );
        let (server, http) = start_server(&yaml).await;
        // Odd spacing, key order, a `default/…` model and a field a preset would strip:
        // every byte reaches the upstream as the client sent it.
        let body = "{ \"temperature\":0.25 ,\"model\" : \"default/x\",\n \"logit_bias\":{\"1\":2}, \"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}";
        let req = chat_builder(server.addr()).header("x-custom", "kept").body(Full::new(Bytes::from(body))).unwrap();
        let reply = send(&http, req).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(header(&reply, "x-proxypal-route"), "default/default/x");
        let stats = a.handle.stats();
        assert_eq!(stats.last_request_body.as_deref(), Some(body.as_bytes()), "byte for byte");
        let headers = stats.last_request_headers.unwrap();
        assert_eq!(headers["x-custom"], "kept");
        assert!(a.keys.iter().any(|k| headers["authorization"] == format!("Bearer {k}")));
        assert!(headers.keys().all(|n| !n.as_str().starts_with("x-proxypal")), "{headers:?}");
        // GET /v1/models of a single provider: its catalog, fetched when first listed.
        let models = get(&http, &server, "/v1/models").await.json();
        let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert!(ids.contains(&"meta/llama-3.1-8b-instruct"), "{ids:?}");
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preset_strips_only_the_fields_its_provider_rejects() {
    bounded(async {
        let a = Sim::start(1311, 1, |c| c);
        let cerebras = Sim::start(1312, 1, |c| c);
        let yaml = format!(
            "providers:\n{}{}routing: {{ default_provider: a }}\n",
            a.provider("a", ""),
            cerebras.provider("cerebras", "    preset: cerebras\n"),
        );
        let (server, http) = start_server(&yaml).await;
        let body = json!({
            "model": "cerebras/llama-3.3-70b",
            "messages": [{"role": "user", "content": "Hi"}],
            "frequency_penalty": 0.5,
            "parallel_tool_calls": true,
            "top_p": 0.9,
        });
        let reply = post_json(&http, &server, &body).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        let sent: Value =
            serde_json::from_slice(&cerebras.handle.stats().last_request_body.unwrap()).unwrap();
        assert_eq!(
            sent,
            json!({"model": "llama-3.3-70b", "messages": [{"role": "user", "content": "Hi"}], "top_p": 0.9}),
            "Cerebras rejects frequency_penalty and parallel_tool_calls; the rest is untouched"
        );
        // The same fields reach a provider that takes them.
        let mut to_a = body.clone();
        to_a["model"] = json!("a/llama-3.3-70b");
        assert_eq!(post_json(&http, &server, &to_a).await.status, StatusCode::OK);
        let sent: Value = serde_json::from_slice(&a.handle.stats().last_request_body.unwrap()).unwrap();
        assert_eq!(sent["frequency_penalty"], 0.5);
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_target_out_of_budget_is_answered_with_the_earliest_that_frees() {
    bounded(async {
        let (a, b) = (Sim::start(1321, 1, |c| c), Sim::start(1322, 1, |c| c));
        let yaml = format!(
            "providers:
{}{}routing: {{ default_provider: a }}
retry: {{ queue_timeout: 2s }}
models:
  m:
    targets:
      - {{ provider: a, model: a-m }}
      - {{ provider: b, model: b-m }}
",
            a.provider("a", "    rate_limit: { requests_per_minute: 1 }\n"),
            b.provider("b", "    rate_limit: { requests_per_day: 1 }\n"),
        );
        let (server, http) = start_server(&yaml).await;
        for _ in 0..2 {
            assert_eq!(chat(&http, &server, "m", false).await.status, StatusCode::OK);
        }
        // a frees in about a minute, b in a day: the answer is a's minute, at once.
        let started = std::time::Instant::now();
        let reply = chat(&http, &server, "m", false).await;
        assert!(started.elapsed() < Duration::from_secs(1), "no point queueing past the deadline");
        assert_eq!(reply.status, StatusCode::TOO_MANY_REQUESTS, "{}", reply.text());
        let retry: u64 = header(&reply, "retry-after").parse().unwrap();
        assert!((55..=61).contains(&retry), "the earliest target frees in ~60 s: {retry} {}", reply.text());
        assert_eq!(header(&reply, "x-proxypal-attempts"), "0");
        assert_eq!((a.chats(), b.chats()), (1, 1));
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvidia_ids_in_nvidia_s_own_namespace_reach_a_default_provider_named_nvidia() {
    bounded(async {
        let (nvidia, b) = (Sim::start(1331, 1, |c| c), Sim::start(1332, 1, |c| c));
        let yaml = format!(
            "providers:\n{}{}routing: {{ default_provider: nvidia }}\n",
            nvidia.provider("nvidia", "    preset: nvidia\n"),
            b.provider("b", "")
        );
        let (server, http) = start_server(&yaml).await;
        // `nvidia/…` is one of NVIDIA's own ids, not a pin that strips the prefix.
        let reply = chat(&http, &server, "nvidia/llama-3.1-nemotron-70b-instruct", false).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(header(&reply, "x-proxypal-route"), "nvidia/nvidia/llama-3.1-nemotron-70b-instruct");
        assert_eq!(nvidia.model_count("nvidia/llama-3.1-nemotron-70b-instruct"), 1);
        // Another provider's prefix still pins.
        assert_eq!(header(&chat(&http, &server, "b/x", false).await, "x-proxypal-route"), "b/x");
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_provider_never_holds_back_requests_for_one_with_room() {
    bounded(async {
        let (a, b) = (Sim::start(1341, 1, |c| c), Sim::start(1342, 1, |c| c));
        let yaml = format!(
            "providers:\n{}{}routing: {{ default_provider: a }}\nretry: {{ queue_timeout: 5s }}\n",
            a.provider("a", "    rate_limit: { requests_per_minute: 30, burst: 1 }\n"),
            b.provider("b", "")
        );
        let (server, http) = start_server(&yaml).await;
        assert_eq!(chat(&http, &server, "a/m", false).await.status, StatusCode::OK);
        // a's next permit is 2 s away: this one waits in a's queue ...
        let waiting = {
            let (http, addr) = (http.clone(), server.addr());
            tokio::spawn(async move {
                let body = json!({"model": "a/m", "messages": [{"role": "user", "content": "Hi"}]});
                send(&http, chat_request(addr, &body)).await.status
            })
        };
        tokio::time::sleep(Duration::from_millis(200)).await;
        // ... while b's requests go at once, not behind it.
        let started = std::time::Instant::now();
        for _ in 0..3 {
            let reply = chat(&http, &server, "b/m", false).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        }
        assert!(started.elapsed() < Duration::from_millis(800), "b waited: {:?}", started.elapsed());
        assert!(!waiting.is_finished(), "a's request is still queued");
        assert_eq!(waiting.await.unwrap(), StatusCode::OK, "and is served when a's permit falls due");
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_provider_standing_is_never_skipped() {
    bounded(async {
        // a refuses connections (skipped); b then fails twice and serves on its third key.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1", closed.local_addr().unwrap());
        drop(closed);
        let a = Sim::start(1351, 1, |c| c);
        let b = Sim::start(1352, 3, |c| c);
        let yaml = first_then(&url, &a.keys_yaml(), &b).replace("max_attempts: 4", "max_attempts: 5");
        let (server, http) = start_server(&yaml).await;
        for _ in 0..2 {
            b.handle.push_fault(Fault::problem(500, "Internal Server Error", "boom"), FaultTarget::Any);
        }
        // The catalog fetch at start may take one fault; wait for it first.
        for _ in 0..200 {
            if b.requests() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let pending = b.handle.pending_faults();
        let reply = chat(&http, &server, "llama", false).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(header(&reply, "x-proxypal-route"), "b/b-llama");
        let attempts: usize = header(&reply, "x-proxypal-attempts").parse().unwrap();
        assert_eq!(attempts, 2 + pending, "one refusal, {pending} server errors, then b's next key");
        server.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_shared_quota_aliases_keep_their_weights_and_tiers() {
    let Some(redis) =
        proxypal_shared::testing::Redis::start("with_a_shared_quota_aliases_keep_their_weights_and_tiers")
    else {
        return;
    };
    bounded(async {
        let shared = format!("shared: {{ redis_url: \"{}\", timeout: 200ms }}\n", redis.url());
        // Weights 1:2 within a tier, decided through Redis.
        let (a, b) = (Sim::start(1231, 2, |c| c), Sim::start(1232, 2, |c| c));
        let yaml = two(
            &a,
            &b,
            &format!(
                "{shared}models:
  mix:
    targets:
      - {{ provider: a, model: m-a, weight: 1 }}
      - {{ provider: b, model: m-b, weight: 2 }}
"
            ),
        );
        let (server, http) = start_server(&yaml).await;
        let health = get(&http, &server, "/health").await.json();
        assert_eq!(health["quota"]["mode"], "shared", "{health}");
        for _ in 0..150 {
            let reply = chat(&http, &server, "mix", false).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        }
        let (on_a, on_b) = (a.model_count("m-a"), b.model_count("m-b"));
        assert_eq!(on_a + on_b, 150);
        assert!((47..=53).contains(&on_a), "a served {on_a}, b {on_b}");
        server.shutdown().await;

        // Tier 2 only when tier 1 (5 per minute, counted in Redis) is spent.
        let limit = SimRateLimit::RollingWindow { limit: 5, window: Duration::from_secs(60) };
        let (free, paid) = (Sim::start(1233, 1, |c| c.with_rate_limit(limit)), Sim::start(1234, 1, |c| c));
        let yaml = format!("{shared}{}", free_then_paid(&free, &paid));
        let (server, http) = start_server(&yaml).await;
        let mut routes = Vec::new();
        for _ in 0..12 {
            let reply = chat(&http, &server, "llama", false).await;
            assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
            routes.push(header(&reply, "x-proxypal-route").to_owned());
        }
        assert!(routes[..5].iter().all(|r| r == "free/free-llama"), "{routes:?}");
        assert!(routes[5..].iter().all(|r| r == "paid/paid-llama"), "{routes:?}");
        assert_eq!(free.handle.stats().total_rate_limited(), 0);
        server.shutdown().await;
    })
    .await;
}
