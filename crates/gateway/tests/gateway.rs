//! The gateway mounted as a `Service` in a hyper server on 127.0.0.1, in
//! front of the simulated NVIDIA API: what an embedder sees, over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use proxypal_gateway::keypool::{KeySpec, Secret};

use proxypal_gateway::{AliasConfig, Gateway, GatewayConfig, Handle, TargetConfig};
use proxypal_nim_sim::{Fault, FaultTarget, SimConfig, SimHandle, SimServer, generate_test_keys};
use serde_json::Value;

struct Rig {
    sim: SimHandle,
    addr: SocketAddr,
    gateway: Arc<Gateway>,
}

/// The simulator with `keys`, and the gateway's boxed service mounted
/// directly as a hyper connection's service.
async fn rig(n: usize, tweak: impl FnOnce(&mut GatewayConfig)) -> Rig {
    let keys = generate_test_keys(n);
    let sim = SimServer::start(SimConfig::default().with_keys(keys.clone())).unwrap();
    let mut config = GatewayConfig::with_keys(keys.iter().map(|k| KeySpec::new(k.as_str())));
    config.providers[0].upstream.base_url = sim.base_url().parse().unwrap();
    config.providers[0].limits = proxypal_gateway::limiter::Limits {
        requests_per_minute: Some(60_000),
        ..proxypal_gateway::limiter::Limits::default()
    };
    tweak(&mut config);
    let mut registry = prometheus_client::registry::Registry::default();
    let gateway = Gateway::new(config, &mut registry).unwrap();
    let service = Handle::new(Arc::clone(&gateway)).into_service();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = service.clone();
            tokio::spawn(async move {
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    Rig { sim, addr, gateway }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("{e}: {:?}", self.body))
    }
}

async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let client =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::post(format!("http://{addr}{path}")).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(20),
        client.request(req.body(Full::from(body.to_owned())).unwrap()),
    )
    .await
    .expect("timed out")
    .unwrap();
    let (head, body) = resp.into_parts();
    Reply { status: head.status, headers: head.headers, body: body.collect().await.unwrap().to_bytes() }
}

const CHAT: &str = r#"{"model":"meta/llama-3.1-8b-instruct","messages":[{"role":"user","content":"hi"}]}"#;

fn fault(status: u16, content_type: &str, body: &str) -> Fault {
    Fault::Status {
        status,
        content_type: Some(content_type.to_owned()),
        headers: vec![
            ("x-request-id".to_owned(), "upstream-req-7".to_owned()),
            ("x-ratelimit-remaining-requests".to_owned(), "12".to_owned()),
            ("nvcf-reqid".to_owned(), "nv-abc".to_owned()),
            ("connection".to_owned(), "x-hop-secret".to_owned()),
            ("x-hop-secret".to_owned(), "not for the client".to_owned()),
        ],
        body: body.to_owned(),
    }
}

fn assert_end_to_end_headers(reply: &Reply) {
    let h = &reply.headers;
    assert_eq!(h["x-request-id"], "upstream-req-7", "{h:?}");
    // One key's figure is replaced by the pool's (2 keys × 60 000 per minute).
    assert_eq!(h["x-ratelimit-limit-requests"], "120000", "{h:?}");
    assert_ne!(h["x-ratelimit-remaining-requests"], "12", "{h:?}");
    assert_eq!(h["nvcf-reqid"], "nv-abc", "{h:?}");
    assert!(h.get("x-hop-secret").is_none(), "a header named by Connection is hop-by-hop: {h:?}");
    assert_eq!(h["content-length"], reply.body.len().to_string().as_str(), "{h:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_errors_passed_back_keep_the_upstreams_end_to_end_headers() {
    let rig = rig(2, |_| {}).await;
    // A client's error in NVIDIA's problem JSON: rewritten, headers kept.
    rig.sim.push_fault(
        fault(
            422,
            "application/problem+json",
            r#"{"status":422,"title":"Unprocessable Entity","detail":"bad role"}"#,
        ),
        FaultTarget::Any,
    );
    let reply = post(rig.addr, "/v1/chat/completions", &[], CHAT).await;
    assert_eq!(reply.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_end_to_end_headers(&reply);
    assert_eq!(reply.headers["content-type"], "application/json");
    assert_eq!(reply.json()["error"]["message"], "upstream error (422): Unprocessable Entity: bad role");

    // Already OpenAI-shaped: the body and its type pass untouched, headers too.
    let openai = r#"{"error":{"message":"bad","type":"invalid_request_error","code":"x"}}"#;
    rig.sim.push_fault(fault(400, "application/json; charset=utf-8", openai), FaultTarget::Any);
    let reply = post(rig.addr, "/v1/chat/completions", &[], CHAT).await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_end_to_end_headers(&reply);
    assert_eq!(reply.headers["content-type"], "application/json; charset=utf-8");
    assert_eq!(&reply.body[..], openai.as_bytes());

    // A compressed error body cannot be rewritten as it was: the rewritten body is plain
    // JSON, so the headers that described the upstream's bytes go with them.
    let mut gzipped = fault(404, "text/plain", "\u{1f}\u{8b} not really gzip");
    if let Fault::Status { headers, .. } = &mut gzipped {
        headers.push(("content-encoding".to_owned(), "gzip".to_owned()));
        headers.push(("etag".to_owned(), "\"abc\"".to_owned()));
    }
    rig.sim.push_fault(gzipped, FaultTarget::Any);
    let reply = post(rig.addr, "/v1/chat/completions", &[], CHAT).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_end_to_end_headers(&reply);
    assert!(reply.headers.get("content-encoding").is_none(), "{:?}", reply.headers);
    assert!(reply.headers.get("etag").is_none(), "{:?}", reply.headers);
    assert_eq!(reply.json()["error"]["code"], "upstream_404");

    // A model-level 5xx (not the key's fault) goes back too, with its headers.
    rig.sim.push_fault(
        fault(503, "text/plain", "Worker local total request limit reached (8/8)"),
        FaultTarget::Any,
    );
    let reply = post(rig.addr, "/v1/chat/completions", &[], CHAT).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_end_to_end_headers(&reply);
    assert_eq!(reply.json()["error"]["code"], "upstream_503");
    rig.sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mounted_service_serves_fails_over_and_refuses_what_it_should() {
    let rig = rig(2, |c| c.client_tokens = vec![Secret::new("pp-test-token-0001")]).await;
    let auth = [("authorization", "Bearer pp-test-token-0001")];
    let ok = post(rig.addr, "/v1/chat/completions", &auth, CHAT).await;
    assert_eq!(ok.status, StatusCode::OK, "{:?}", ok.body);
    assert_eq!(ok.json()["object"], "chat.completion");

    // A 429 on one key fails over to the other before the client sees it.
    rig.sim.push_fault(Fault::problem(429, "Too Many Requests", ""), FaultTarget::Any);
    let failed_over = post(rig.addr, "/v1/chat/completions", &auth, CHAT).await;
    assert_eq!(failed_over.status, StatusCode::OK, "{:?}", failed_over.body);
    let states: Vec<&str> =
        rig.gateway.key_reports().iter().map(|k| k.snapshot.status.as_str()).collect::<Vec<_>>();
    assert!(states.contains(&"cooling_down"), "{states:?}");

    let no_token = post(rig.addr, "/v1/chat/completions", &[], CHAT).await;
    assert_eq!(no_token.status, StatusCode::UNAUTHORIZED);
    assert_eq!(no_token.json()["error"]["code"], "invalid_api_key");

    let elsewhere = post(rig.addr, "/chat/completions", &auth, CHAT).await;
    assert_eq!(elsewhere.status, StatusCode::NOT_FOUND);
    assert_eq!(elsewhere.json()["error"]["type"], "not_found_error");

    let stream = post(
        rig.addr,
        "/v1/chat/completions",
        &auth,
        &CHAT.replace("{\"model\"", "{\"stream\":true,\"model\""),
    )
    .await;
    assert_eq!(stream.status, StatusCode::OK);
    assert_eq!(stream.headers["content-type"], "text/event-stream");
    assert!(stream.body.ends_with(b"data: [DONE]\n\n"), "{:?}", stream.body);
    assert_eq!(rig.gateway.in_flight(), 0, "every slot is back once the bodies are read");
    rig.sim.shutdown().await;
}

/// Two providers whose accounts share a name keep apart in the saved state,
/// and a restored gateway counts what each spent.
#[test]
fn saved_state_keeps_each_providers_budgets_apart() {
    use proxypal_gateway::lease::{Tried, try_lease};
    use proxypal_gateway::limiter::Limits;
    use proxypal_gateway::{KeyConfig, ProviderConfig};

    let limits = Limits { requests_per_minute: Some(10), ..Limits::nvidia_free_tier() };
    let provider = |name: &str, key: &str| {
        let mut p = ProviderConfig::new(name).with_limits(limits.clone());
        p.keys = vec![KeyConfig::new(KeySpec::new(key)).in_account("alice")];
        p.accounts.insert("alice".into(), Limits::default());
        p
    };
    let config = || {
        let mut c = GatewayConfig::with_providers([
            provider("default", "nvapi-state-test-000000000001"),
            provider("groq", "gsk_state_test_000000000002"),
        ]);
        c.routing.default_provider = Some("default".into());
        c
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let before = Gateway::new(config(), &mut registry).unwrap();
    let groq = before.provider("groq").unwrap();
    for _ in 0..4 {
        drop(try_lease(groq.keys(), 1, &Tried::default(), 0).unwrap());
    }
    let saved = before.save_state();
    let ids: Vec<&str> = saved.budgets.iter().map(|b| b.id.as_str()).collect();
    assert!(ids.contains(&"account:alice") && ids.contains(&"account:groq/alice"), "{ids:?}");

    let mut registry = prometheus_client::registry::Registry::default();
    let after = Gateway::new(config(), &mut registry).unwrap();
    after.restore_state(&saved, None);
    let remaining = |gw: &Gateway, name: &str| gw.provider(name).unwrap().quotas().remaining_requests(0);
    assert_eq!(remaining(&after, "groq"), 6, "groq's spent 4 came back");
    assert_eq!(remaining(&after, "default"), 10, "the other alice spent nothing");
}

/// A reload refused because of one provider leaves every provider as it was.
#[test]
fn a_refused_reload_changes_no_provider() {
    use proxypal_gateway::ProviderConfig;

    let config = |a_keys: &[&str], b_keys: &[&str]| {
        let mut c = GatewayConfig::with_providers([
            ProviderConfig::new("a").with_keys(a_keys.iter().map(|k| KeySpec::new(*k))),
            ProviderConfig::new("b").with_keys(b_keys.iter().map(|k| KeySpec::new(*k))),
        ]);
        c.routing.default_provider = Some("a".into());
        c
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let gw =
        Gateway::new(config(&["nvapi-reload-a-0000000001"], &["nvapi-reload-b-0000000001"]), &mut registry)
            .unwrap();
    // a would gain a key; b's new set repeats a key: refused as a whole.
    let refused = gw.reload(config(
        &["nvapi-reload-a-0000000001", "nvapi-reload-a-0000000002"],
        &["nvapi-reload-b-0000000002", "nvapi-reload-b-0000000002"],
    ));
    assert!(refused.is_err());
    assert!(refused.unwrap_err().to_string().starts_with("providers.b."), "the provider is named");
    assert_eq!(gw.provider("a").unwrap().keys().len(), 1, "a kept its old key set");
    assert_eq!(gw.reloads(), 0);
    // A good one applies to both.
    gw.reload(config(
        &["nvapi-reload-a-0000000001", "nvapi-reload-a-0000000002"],
        &["nvapi-reload-b-0000000002"],
    ))
    .unwrap();
    assert_eq!(gw.provider("a").unwrap().keys().len(), 2);
    assert_eq!(gw.reloads(), 1);
}

/// The response cache, mounted: a repeated request is answered once
/// upstream and then from the cache (same bytes, `x-proxypal-cache: hit`);
/// a stream is replayed event for event; a sampled request or
/// `Cache-Control: no-store` goes upstream every time; ten identical
/// requests at once make one upstream request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_requests_are_answered_from_the_cache() {
    let rig = rig(2, |_| {}).await;
    let cache = proxypal_gateway::cache::ResponseCache::memory(proxypal_cache::CacheSettings::default());
    assert!(rig.gateway.set_cache(Arc::new(cache)));
    let upstream = || rig.sim.stats().total_requests;
    let plain = r#"{"model":"meta/llama-3.1-8b-instruct","temperature":0,"messages":[{"role":"user","content":"cache me"}]}"#;

    let first = post(rig.addr, "/v1/chat/completions", &[], plain).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers["x-proxypal-cache"], "miss");
    let before = upstream();
    for _ in 0..2 {
        let again = post(rig.addr, "/v1/chat/completions", &[], plain).await;
        assert_eq!(again.status, StatusCode::OK);
        assert_eq!(again.headers["x-proxypal-cache"], "hit");
        assert!(again.headers.contains_key("age"));
        assert_eq!(again.body, first.body, "the stored answer, byte for byte");
    }
    assert_eq!(upstream(), before, "hits spend no upstream request");

    // Keys in another order and other whitespace: the same request.
    let reordered = r#"{ "messages":[{"content":"cache me","role":"user"}], "temperature":0, "model":"meta/llama-3.1-8b-instruct" }"#;
    assert_eq!(
        post(rig.addr, "/v1/chat/completions", &[], reordered).await.headers["x-proxypal-cache"],
        "hit"
    );

    let stream = r#"{"model":"meta/llama-3.1-8b-instruct","stream":true,"temperature":0,"messages":[{"role":"user","content":"stream me"}]}"#;
    let first = post(rig.addr, "/v1/chat/completions", &[], stream).await;
    assert_eq!(first.headers["x-proxypal-cache"], "miss");
    let text = std::str::from_utf8(&first.body).unwrap();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    let before = upstream();
    let hit = post(rig.addr, "/v1/chat/completions", &[], stream).await;
    assert_eq!(hit.headers["x-proxypal-cache"], "hit");
    assert!(hit.headers["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    assert_eq!(hit.body, first.body, "the same events in the same order, [DONE] last");
    assert_eq!(upstream(), before);

    // Sampled: not cached by default. no-store: bypassed.
    let sampled = r#"{"model":"meta/llama-3.1-8b-instruct","temperature":0.7,"messages":[{"role":"user","content":"x"}]}"#;
    for _ in 0..2 {
        assert_eq!(
            post(rig.addr, "/v1/chat/completions", &[], sampled).await.headers["x-proxypal-cache"],
            "bypass"
        );
    }
    let before = upstream();
    let fresh = post(rig.addr, "/v1/chat/completions", &[("cache-control", "no-store")], plain).await;
    assert_eq!(fresh.headers["x-proxypal-cache"], "bypass");
    assert_eq!(upstream(), before + 1, "no-store goes upstream");
    // no-store stores nothing: a new request with it, then without, is a miss.
    let unseen = r#"{"model":"meta/llama-3.1-8b-instruct","temperature":0,"messages":[{"role":"user","content":"never stored"}]}"#;
    post(rig.addr, "/v1/chat/completions", &[("cache-control", "no-store")], unseen).await;
    assert_eq!(post(rig.addr, "/v1/chat/completions", &[], unseen).await.headers["x-proxypal-cache"], "miss");
    // no-cache: not looked up (upstream again), and the fresh answer is stored.
    let before = upstream();
    let refreshed = post(rig.addr, "/v1/chat/completions", &[("cache-control", "no-cache")], plain).await;
    assert_eq!(refreshed.status, StatusCode::OK);
    assert_eq!(upstream(), before + 1, "no-cache goes upstream");
    let after = post(rig.addr, "/v1/chat/completions", &[], plain).await;
    assert_eq!(after.headers["x-proxypal-cache"], "hit");
    assert_eq!(after.body, refreshed.body, "the refreshed answer replaced the stored one");
    assert_eq!(upstream(), before + 1);

    // Ten identical requests at once: one goes upstream, nine wait for it.
    let before = upstream();
    let together = r#"{"model":"meta/llama-3.1-8b-instruct","temperature":0,"messages":[{"role":"user","content":"all at once"}]}"#;
    let replies = futures_util::future::join_all(
        (0..10).map(|_| post(rig.addr, "/v1/chat/completions", &[], together)),
    )
    .await;
    assert!(replies.iter().all(|r| r.status == StatusCode::OK && r.body == replies[0].body));
    assert_eq!(upstream(), before + 1, "single flight");

    let stats = rig.gateway.cache().unwrap().stats();
    assert!(stats.hits >= 13 && stats.bypasses >= 3, "{stats:?}");
}

/// The `event:` names of an Anthropic event stream, in order.
fn event_names(body: &[u8]) -> Vec<String> {
    std::str::from_utf8(body)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .map(str::to_owned)
        .collect()
}

/// `POST /v1/messages` through the same pipeline: x-api-key auth, a plain
/// message and a stream of Anthropic events from the simulator's chat
/// answers, `count_tokens` answered locally, and errors in Anthropic's shape
/// (401, 400, a 429 with `retry-after`, a stream broken mid-way ending in an
/// `error` event).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_are_served_through_the_chat_pipeline_in_anthropics_shape() {
    const TOKEN: &str = "pp-test-token-messages-1";
    let rig = rig(1, |c| c.client_tokens = vec![Secret::new(TOKEN)]).await;
    let auth = [("x-api-key", TOKEN), ("anthropic-version", "2023-06-01")];
    let body = r#"{"model":"meta/llama-3.1-8b-instruct","max_tokens":64,"system":[{"type":"text","text":"Be brief.","cache_control":{"type":"ephemeral"}}],"messages":[{"role":"user","content":"hi"}]}"#;

    let plain = post(rig.addr, "/v1/messages", &auth, body).await;
    assert_eq!(plain.status, StatusCode::OK, "{:?}", plain.body);
    let m = plain.json();
    assert_eq!((m["type"].as_str(), m["role"].as_str()), (Some("message"), Some("assistant")), "{m}");
    assert_eq!(m["model"], "meta/llama-3.1-8b-instruct");
    assert_eq!(m["content"][0]["type"], "text", "{m}");
    assert!(!m["content"][0]["text"].as_str().unwrap().is_empty(), "{m}");
    assert_eq!(m["stop_reason"], "end_turn", "{m}");
    assert!(m["usage"]["input_tokens"].as_u64().unwrap() > 0, "{m}");
    assert!(m["id"].as_str().unwrap().starts_with("msg_"), "{m}");
    assert_eq!(rig.sim.stats().total_requests, 1);
    // Upstream: a chat request, uncompressed (it is translated), and nothing of the client's.
    let seen = rig.sim.stats().last_request_headers.unwrap();
    assert_eq!(seen["accept-encoding"], "identity", "{seen:?}");
    assert!(seen.get("anthropic-version").is_none() && seen.get("x-api-key").is_none(), "{seen:?}");
    assert!(!format!("{seen:?}").contains(TOKEN), "the client token never goes upstream");

    let streamed = body.replacen("\"max_tokens\":64", "\"max_tokens\":64,\"stream\":true", 1);
    let gzip = [auth[0], auth[1], ("accept-encoding", "gzip, deflate")];
    let s = post(rig.addr, "/v1/messages", &gzip, &streamed).await;
    assert_eq!(s.status, StatusCode::OK);
    assert!(s.headers["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let names = event_names(&s.body);
    assert_eq!(names[..3], ["message_start", "ping", "content_block_start"], "{names:?}");
    assert!(names.iter().filter(|n| *n == "content_block_delta").count() >= 1, "{names:?}");
    assert_eq!(
        names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"],
        "{names:?}"
    );
    let text = std::str::from_utf8(&s.body).unwrap();
    assert!(text.contains(r#""stop_reason":"end_turn""#), "{text}");
    // No usage in this stream (stream_usage is off): message_start has the estimate.
    let start: Value =
        serde_json::from_str(text.lines().nth(1).unwrap().strip_prefix("data: ").unwrap()).unwrap();
    assert!(start["message"]["usage"]["input_tokens"].as_u64().unwrap() > 0, "{start}");
    assert!(
        !text.contains("[DONE]") && !text.contains("chat.completion"),
        "nothing of OpenAI's shape: {text}"
    );

    // count_tokens: a local estimate, no upstream request.
    let before = rig.sim.stats().total_requests;
    let count = post(rig.addr, "/v1/messages/count_tokens", &auth, body).await;
    assert_eq!(count.status, StatusCode::OK);
    assert!(count.json()["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(rig.sim.stats().total_requests, before);

    // Errors in Anthropic's shape.
    let shape = |r: &Reply, status: u16, kind: &str| {
        assert_eq!(r.status.as_u16(), status, "{:?}", r.body);
        let e = r.json();
        assert_eq!((e["type"].as_str(), e["error"]["type"].as_str()), (Some("error"), Some(kind)), "{e}");
        assert!(!e["error"]["message"].as_str().unwrap().is_empty());
    };
    shape(&post(rig.addr, "/v1/messages", &[], body).await, 401, "authentication_error");
    shape(
        &post(rig.addr, "/v1/messages", &[("x-api-key", "pp-wrong")], body).await,
        401,
        "authentication_error",
    );
    // An Authorization header that is not ours (an Anthropic OAuth bearer, say) beside
    // our token in x-api-key: the x-api-key one counts.
    let other = [("authorization", "Bearer sk-ant-oat01-not-ours"), ("x-api-key", TOKEN)];
    assert_eq!(post(rig.addr, "/v1/messages", &other, body).await.status, StatusCode::OK);
    // A declared body over the limit is refused before it is read.
    let huge = [auth[0], ("content-length", "999999999")];
    let refused = post_lossy(rig.addr, "/v1/messages", &huge, body).await;
    assert!(refused.contains("invalid_request_error") && refused.contains("larger than"), "{refused}");
    let bearer = format!("Bearer {TOKEN}");
    shape(
        &post(rig.addr, "/v1/messages", &[("authorization", &bearer)], "{").await,
        400,
        "invalid_request_error",
    );
    let no_messages = r#"{"model":"m","max_tokens":5}"#;
    shape(&post(rig.addr, "/v1/messages", &auth, no_messages).await, 400, "invalid_request_error");

    // Broken mid-stream: the events so far, then an `error` event.
    rig.sim.push_fault(Fault::BreakMidStream { after_chunks: 2 }, FaultTarget::Any);
    let cut = post_lossy(rig.addr, "/v1/messages", &auth, &streamed).await;
    let names = event_names(cut.as_bytes());
    assert_eq!(names.first().map(String::as_str), Some("message_start"), "{cut}");
    assert_eq!(names.last().map(String::as_str), Some("error"), "{cut}");
    assert!(!names.contains(&"message_stop".to_owned()), "{cut}");

    // The pool's 429 (the only key rate limited upstream): rate_limit_error with retry-after.
    rig.sim.push_fault(
        fault(429, "application/json", r#"{"status":429,"title":"Too Many Requests"}"#),
        FaultTarget::Any,
    );
    let limited = post(rig.addr, "/v1/messages", &auth, body).await;
    shape(&limited, 429, "rate_limit_error");
    let retry: u64 = limited.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry > 0, "{:?}", limited.headers);
}

/// A POST whose body may break off: what arrived, as text.
async fn post_lossy(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> String {
    let client =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut req = Request::post(format!("http://{addr}{path}")).header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client.request(req.body(Full::from(body.to_owned())).unwrap()).await.unwrap();
    let mut body = resp.into_body();
    let mut out = Vec::new();
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            out.extend_from_slice(&data);
        }
    }
    String::from_utf8(out).unwrap()
}

/// With `stream_usage` on, a Messages stream carries the upstream's token
/// counts (the usage chunk the pipeline asked for is passed to the
/// translator, not taken out), and an OpenAI client's stream still never
/// sees a chunk it did not ask for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_messages_stream_carries_the_upstreams_usage_where_the_provider_reports_it() {
    const TOKEN: &str = "pp-test-token-messages-2";
    // An alias over a provider that takes `stream_options` (tier 1) and one that may not.
    let rig = rig(1, |c| {
        c.client_tokens = vec![Secret::new(TOKEN)];
        c.providers[0].stream_usage = true;
        let mut other = c.providers[0].clone();
        other.name = "other".into();
        other.stream_usage = false;
        c.providers.push(other);
        let model = "meta/llama-3.1-8b-instruct";
        let targets =
            [TargetConfig::new("default", model).tier(1), TargetConfig::new("other", model).tier(2)];
        c.models.insert("claude-*".into(), AliasConfig::new(targets));
    })
    .await;
    let body = r#"{"model":"claude-sonnet-4-5","max_tokens":64,"stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let s = post(rig.addr, "/v1/messages", &[("x-api-key", TOKEN)], body).await;
    assert_eq!(s.status, StatusCode::OK);
    let sent = rig.sim.stats().last_request_body.unwrap();
    assert!(std::str::from_utf8(&sent).unwrap().contains(r#""include_usage":true"#), "asked upstream");
    let text = std::str::from_utf8(&s.body).unwrap();
    let delta =
        text.lines().filter_map(|l| l.strip_prefix("data: ")).find(|d| d.contains("message_delta")).unwrap();
    let delta: Value = serde_json::from_str(delta).unwrap();
    // The upstream's own counts: input tokens appear only when it reported usage.
    assert!(delta["usage"]["input_tokens"].as_u64().unwrap() > 0, "{delta}");
    assert!(delta["usage"]["output_tokens"].as_u64().unwrap() > 0, "{delta}");

    let chat =
        r#"{"model":"meta/llama-3.1-8b-instruct","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let plain =
        post(rig.addr, "/v1/chat/completions", &[("authorization", &format!("Bearer {TOKEN}"))], chat).await;
    let text = std::str::from_utf8(&plain.body).unwrap();
    assert!(
        !text.contains(r#""choices":[]"#),
        "the usage chunk ProxyPal asked for is not an OpenAI client's: {text}"
    );
}
