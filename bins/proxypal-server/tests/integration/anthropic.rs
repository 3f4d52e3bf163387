//! Anthropic's Messages API (issue 16) end to end: the official `anthropic`
//! Python SDK (tests/anthropic_sdk/scenario.py) against a real server in
//! front of two simulated providers, and a recorded Claude Code-style request
//! over plain HTTP. The SDK is installed in a venv under the target folder on
//! first use (PyPI); without Python or PyPI the SDK test says it is skipped
//! and why, and fails under CI=true.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use proxypal_nim_sim::{Fault, FaultTarget, SimConfig, SimHandle, SimServer, generate_test_keys_seeded};
use proxypal_server::config::{Config, YamlSource};
use serde_json::Value;

use crate::common::{bounded, http_client, send};

const ALICE: &str = "pp-alice-anthropic-token-01";
const LIMITED: &str = "pp-limited-anthropic-tok-02";

/// A simulated provider logging the bodies it receives.
struct Sim {
    handle: SimHandle,
    keys: Vec<String>,
}

impl Sim {
    fn start(seed: u64, n: usize) -> Self {
        let keys = generate_test_keys_seeded(seed, n);
        let handle =
            SimServer::start(SimConfig::default().with_keys(keys.clone()).with_request_log(16)).unwrap();
        Self { handle, keys }
    }

    fn yaml(&self, name: &str) -> String {
        let keys: Vec<String> = (self.keys.iter().enumerate())
            .map(|(i, k)| format!("{{ key: \"{k}\", name: {name}{i} }}"))
            .collect();
        format!("  {name}:\n    base_url: {}\n    keys: [{}]\n", self.handle.base_url(), keys.join(", "))
    }

    fn chats(&self) -> u64 {
        self.handle.stats().models.values().sum()
    }
}

/// Providers `a` (two keys, tier 1) and `b` (tier 2) behind `claude-*`;
/// alice, and a client allowed one request a minute.
fn config(a: &Sim, b: &Sim) -> Config {
    let yaml = format!(
        "listen: 127.0.0.1:0\nstate: {{ path: null }}\nshutdown_grace: 2s\nproviders:\n{}{}\
         models:\n  \"claude-*\":\n    targets:\n      - {{ provider: a, model: a-llama, tier: 1 }}\n      - {{ provider: b, model: b-llama, tier: 2 }}\n\
         routing: {{ default_provider: a }}\n\
         clients:\n  - {{ name: alice, token: {ALICE} }}\n  - {{ name: limited, token: {LIMITED}, requests_per_minute: 1 }}\n",
        a.yaml("a"),
        b.yaml("b"),
    );
    Config::from_sources(Some(YamlSource::Text(&yaml)), std::iter::empty::<(&str, &str)>(), false)
        .unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// A Python with the `anthropic` SDK, in a venv under the target folder
/// (made once), or `None` with the reason printed (a failure under CI=true).
fn sdk_python(test: &str) -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("anthropic-sdk-venv");
    let python = venv.join("bin/python");
    let has_sdk = |python: &Path| {
        Command::new(python).args(["-c", "import anthropic"]).output().is_ok_and(|o| o.status.success())
    };
    if has_sdk(&python) {
        return Some(python);
    }
    let skip = |why: String| {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: {why}; CI must run the Anthropic SDK tests"
        );
        eprintln!("SKIPPED {test}: {why}");
        None
    };
    let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).output();
    if !made.as_ref().is_ok_and(|o| o.status.success()) {
        return skip(format!("python3 -m venv failed ({made:?}); install python3-venv"));
    }
    let pip = Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "anthropic"])
        .output();
    if !pip.as_ref().is_ok_and(|o| o.status.success()) || !has_sdk(&python) {
        return skip(format!("pip install anthropic failed (no PyPI?): {pip:?}"));
    }
    Some(python)
}

/// Runs scenarios of scenario.py against `base` with `token`, in one Python
/// process: what the SDK saw in each.
async fn scenarios(python: &Path, base: &str, token: &str, names: &[&str]) -> Vec<Value> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/anthropic_sdk/scenario.py");
    let mut cmd = Command::new(python);
    cmd.arg(script).args(names).env("ANTHROPIC_BASE_URL", base).env("ANTHROPIC_API_KEY", token);
    // Off the runtime's threads: the server under test runs on them.
    let run = tokio::task::spawn_blocking(move || cmd.output());
    let out = tokio::time::timeout(Duration::from_secs(120), run).await.unwrap().unwrap().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{names:?}: {}\n{stdout}", String::from_utf8_lossy(&out.stderr));
    let seen: Vec<Value> =
        stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert_eq!(seen.len(), names.len(), "{stdout}");
    seen
}

/// One scenario.
async fn scenario(python: &Path, base: &str, token: &str, name: &str) -> Value {
    scenarios(python, base, token, &[name]).await.remove(0)
}

/// The last chat body provider `sim` received.
fn last_body(sim: &Sim) -> Value {
    sim.handle.last_request_body().expect("a request reached the provider")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_sdk_works_through_the_proxy_with_tools_streams_errors_and_failover() {
    let test = "the_anthropic_sdk_works_through_the_proxy_with_tools_streams_errors_and_failover";
    let Some(python) = sdk_python(test) else { return };
    // Its own bound, not the 30 s one: each Python start imports the SDK
    // (seconds on a loaded CI machine).
    let outcome = tokio::time::timeout(Duration::from_secs(300), async {
        let (a, b) = (Sim::start(1601, 2), Sim::start(1602, 1));
        let server = proxypal_server::start(&config(&a, &b), false).await.unwrap();
        let base = format!("http://{}", server.addr());
        let run = |name: &'static str| scenario(&python, &base, ALICE, name);
        // What needs no fault in between, in one interpreter; then what the
        // upstream was sent, found by what each request carries.
        let names =
            ["plain", "streaming", "tool_round_trip", "parallel_tools_streamed", "stop_sequences", "image"];
        let [plain, streamed, tools, parallel, stop, image]: [Value; 6] =
            scenarios(&python, &base, ALICE, &names).await.try_into().unwrap();
        let log = a.handle.request_log();
        let sent_where = |what: &str, f: &dyn Fn(&Value) -> bool| {
            log.iter()
                .find(|b| f(b))
                .cloned()
                .unwrap_or_else(|| panic!("no upstream request {what}: {log:?}"))
        };

        // Plain: a message, routed by the glob alias, translated for the upstream.
        assert_eq!(plain["stop_reason"], "end_turn", "{plain}");
        assert!(
            plain["content"][0]["text"].as_str().unwrap().starts_with("Hello from the simulated"),
            "{plain}"
        );
        assert!(plain["id"].as_str().unwrap().starts_with("msg_"), "{plain}");
        assert_eq!(plain["model"], "claude-sonnet-4-5-20250929");
        assert!(plain["usage"]["input"].as_u64().unwrap() > 0, "{plain}");
        let sent = sent_where("plain", &|b| {
            b.get("stream").is_none() && b.get("tools").is_none() && b.get("stop").is_none()
        });
        assert_eq!(sent["model"], "a-llama", "the alias's target model: {sent}");
        assert_eq!(sent["max_tokens"], 256, "{sent}");
        assert_eq!(sent["messages"], serde_json::json!([{"role": "user", "content": "Hello"}]), "{sent}");

        // Streaming: the SDK's text stream and final message agree.
        assert_eq!(streamed["text"], streamed["final"]["content"][0]["text"], "{streamed}");
        assert_eq!(streamed["final"]["stop_reason"], "end_turn");
        assert!(streamed["text"].as_str().unwrap().starts_with("Hello from the simulated"), "{streamed}");

        // A tool round trip: the model asks, the client answers, the model replies.
        let call = &tools["first"]["content"][0];
        assert_eq!(tools["first"]["stop_reason"], "tool_use", "{tools}");
        assert_eq!((call["type"].as_str(), call["name"].as_str()), (Some("tool_use"), Some("get_weather")));
        assert_eq!(
            call["input"],
            serde_json::json!({"location": "location value"}),
            "parsed from the JSON string"
        );
        assert_eq!(tools["second"]["content"][0]["text"], "Tool result: sunny, 21 C", "{tools}");
        let sent = sent_where("with a tool result", &|b| b["messages"][2]["role"] == "tool");
        let messages = sent["messages"].as_array().unwrap();
        assert_eq!(messages[1]["tool_calls"][0]["id"], call["id"], "{sent}");
        assert_eq!(messages[2]["role"], "tool");
        assert_eq!(messages[2]["tool_call_id"], call["id"], "ids kept both ways: {sent}");
        assert_eq!(sent["tools"][0]["function"]["name"], "get_weather");

        // Two parallel tool calls in one stream: two blocks, inputs whole.
        let blocks = parallel["final"]["content"].as_array().unwrap();
        assert_eq!(blocks.len(), 2, "{parallel}");
        assert_eq!(blocks[0]["input"], serde_json::json!({"location": "location value"}));
        assert_eq!(blocks[1]["input"], serde_json::json!({"zone": "zone value"}));
        assert_ne!(blocks[0]["id"], blocks[1]["id"]);
        assert_eq!(parallel["final"]["stop_reason"], "tool_use");
        let starts =
            parallel["events"].as_array().unwrap().iter().filter(|e| *e == "content_block_start").count();
        assert_eq!(starts, 2, "{parallel}");

        // stop_sequences, an image block.
        assert_eq!(
            (stop["stop_reason"].as_str(), stop["stop_sequence"].as_str()),
            (Some("stop_sequence"), Some("simulated"))
        );
        assert_eq!(stop["content"][0]["text"], "Hello from the ", "{stop}");
        assert_eq!(
            sent_where("with stop", &|b| b.get("stop").is_some())["stop"],
            serde_json::json!(["simulated"])
        );
        assert!(image["content"][0]["text"].as_str().unwrap().ends_with("[1 image]"), "{image}");
        let sent = sent_where("with an image", &|b| b["messages"][0]["content"].is_array());
        let part = &sent["messages"][0]["content"][0];
        assert!(part["image_url"]["url"].as_str().unwrap().starts_with("data:image/png;base64,"), "{part}");

        // count_tokens: answered locally.
        let before = a.chats() + b.chats();
        assert!(run("count_tokens").await["input_tokens"].as_u64().unwrap() > 0);
        assert_eq!(a.chats() + b.chats(), before, "count_tokens spends no upstream request");

        // Failover across keys: a 500 on the first attempt, served by the other key.
        a.handle.push_fault(Fault::status(500, r#"{"error":"boom"}"#), FaultTarget::Any);
        let raw = run("raw_headers").await;
        assert_eq!(
            (raw["attempts"].as_str(), raw["route"].as_str()),
            (Some("2"), Some("a/a-llama")),
            "{raw}"
        );
        // Failover across providers: a failing entirely, b (tier 2) serves.
        a.handle.set_fault_always(Some(Fault::status(500, r#"{"error":"down"}"#)));
        let raw = run("raw_headers").await;
        assert_eq!(raw["route"], "b/b-llama", "{raw}");
        assert_eq!(raw["message"]["stop_reason"], "end_turn");
        a.handle.set_fault_always(None);
        // a's keys now rest (2 s, doubling): an operator reset makes a the
        // first choice again, whatever the time Python takes to start.
        for key in ["a0", "a1"] {
            assert!(server.app().gateway().reset_key(key), "{key}");
        }

        // An upstream failure mid-stream: the SDK sees an error, no message_stop.
        a.handle.push_fault(Fault::BreakMidStream { after_chunks: 2 }, FaultTarget::Any);
        let broken = run("broken_stream").await;
        assert!(broken["error"].is_string(), "the SDK raised: {broken}");
        let events = broken["events"].as_array().unwrap();
        assert_eq!(events.first().and_then(Value::as_str), Some("message_start"), "{broken}");
        assert!(!events.iter().any(|e| e == "message_stop"), "{broken}");

        // A client over its own quota: RateLimitError with its retry hint.
        let first = scenario(&python, &base, LIMITED, "rate_limited").await;
        assert_eq!(first["error"], Value::Null, "{first}");
        let limited = scenario(&python, &base, LIMITED, "rate_limited").await;
        assert_eq!(
            (limited["error"].as_str(), limited["status"].as_u64()),
            (Some("RateLimitError"), Some(429)),
            "{limited}"
        );
        assert_eq!(limited["type"], "rate_limit_error");
        let retry: u64 = limited["retry_after"].as_str().unwrap().parse().unwrap();
        assert!((1..=61).contains(&retry), "{limited}");

        server.shutdown().await;
    })
    .await;
    assert!(outcome.is_ok(), "{test}: not within 300 s");
}

/// A recorded Claude Code-style request (system blocks with cache_control,
/// five tools, a long history of tool rounds) over plain HTTP: answered, and
/// the upstream got every tool and every tool result, paired by id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claude_code_request_is_translated_and_answered_without_loss() {
    bounded(async {
        let (a, b) = (Sim::start(1611, 1), Sim::start(1612, 1));
        let server = proxypal_server::start(&config(&a, &b), false).await.unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../crates/anthropic/tests/fixtures/claude_code_request.json");
        let mut request: Value = serde_json::from_slice(&std::fs::read(fixture).unwrap()).unwrap();
        request["stream"] = Value::Bool(false);
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{}/v1/messages", server.addr()))
            .header("x-api-key", ALICE)
            .header("anthropic-version", "2023-06-01")
            .header("anthropic-beta", "interleaved-thinking-2025-05-14")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(request.to_string())))
            .unwrap();
        let reply = send(&http_client(), req).await;
        assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
        assert_eq!(reply.json()["type"], "message");

        let sent = last_body(&a);
        let tools: Vec<&str> =
            request["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
        let got: Vec<&str> = sent["tools"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["function"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(got, tools, "every tool, in order");
        let mut asked = Vec::new();
        for m in request["messages"].as_array().unwrap() {
            for block in m["content"].as_array().into_iter().flatten() {
                if block["type"] == "tool_use" {
                    asked.push(block["id"].as_str().unwrap().to_owned());
                }
            }
        }
        let messages = sent["messages"].as_array().unwrap();
        let answered: Vec<&str> = messages
            .iter()
            .filter(|m| m["role"] == "tool")
            .map(|m| m["tool_call_id"].as_str().unwrap())
            .collect();
        let called: Vec<&str> = messages
            .iter()
            .flat_map(|m| m["tool_calls"].as_array().into_iter().flatten())
            .map(|c| c["id"].as_str().unwrap())
            .collect();
        assert!(!asked.is_empty());
        assert_eq!(called, asked, "every tool_use, in order");
        assert_eq!(answered, asked, "every tool_result, paired by id");
        assert_eq!(messages[0]["role"], "system", "{sent}");
        assert!(!sent.to_string().contains("anthropic-beta") && !sent.to_string().contains("cache_control"));
        server.shutdown().await;
    })
    .await;
}
