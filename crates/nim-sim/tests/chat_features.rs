//! Integration tests of the chat completion features of the simulated NIM
//! server (tool calls, tool results, stop strings, content parts, the
//! request log) over real loopback sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests: a panic is a failure report

use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use proxypal_nim_sim::{SimConfig, SimHandle, SimServer, mask_key};
use serde_json::{Value, json};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const KEY: &str = "nvapi-sim-regression-0042";
const MODEL: &str = "meta/llama-3.1-8b-instruct";

/// Every test body runs under this bound.
async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(15), f).await.expect("test timed out");
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// POSTs `body` to `/v1/chat/completions` with [`KEY`]; returns the status
/// and the whole response body.
async fn post(c: &HttpClient, sim: &SimHandle, body: &Value) -> (StatusCode, String) {
    let req = Request::builder()
        .method(Method::POST)
        .uri(sim.url("/v1/chat/completions"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = c.request(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

/// POSTs a plain (non-streamed) request and parses the 200 answer.
async fn plain(c: &HttpClient, sim: &SimHandle, mut body: Value) -> Value {
    body["stream"] = json!(false);
    let (status, text) = post(c, sim, &body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str(&text).unwrap()
}

/// POSTs a streamed request (with usage) and returns its events before
/// `[DONE]`, parsed; asserts the stream ends with `[DONE]`.
async fn streamed(c: &HttpClient, sim: &SimHandle, mut body: Value) -> Vec<Value> {
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let (status, text) = post(c, sim, &body).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let mut events: Vec<&str> =
        text.split("\n\n").filter(|e| !e.is_empty()).map(|e| e.strip_prefix("data: ").unwrap()).collect();
    assert_eq!(events.pop(), Some("[DONE]"), "{text}");
    events.into_iter().map(|e| serde_json::from_str(e).unwrap()).collect()
}

/// The text a stream's chunks carry.
fn streamed_text(events: &[Value]) -> String {
    events.iter().filter_map(|e| e["choices"][0]["delta"]["content"].as_str()).collect()
}

/// `"created":<digits>` replaced by `"created":0`.
fn without_created(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("\"created\":") {
        let (head, tail) = rest.split_at(i + "\"created\":".len());
        out.push_str(head);
        out.push('0');
        rest = tail.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    out.push_str(rest);
    out
}

fn user(text: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": text}]})
}

fn tool(name: &str, parameters: Value) -> Value {
    json!({"type": "function", "function": {"name": name, "description": format!("the {name} tool"), "parameters": parameters}})
}

/// Two tools: `read_file(path: string, required)` and `list_dir(depth:
/// integer, recursive: boolean, both required)`.
fn tools() -> Value {
    json!([
        tool(
            "read_file",
            json!({"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]})
        ),
        tool(
            "list_dir",
            json!({"type": "object", "properties": {"recursive": {"type": "boolean"}, "depth": {"type": "integer"}},
                   "required": ["recursive", "depth"]}),
        ),
    ])
}

/// Reassembles streamed tool calls by `index`: (id, name, arguments) per
/// index, and the order of the indexes of the chunks that carried them.
fn reassemble(events: &[Value]) -> (Vec<(String, String, String)>, Vec<u64>) {
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut order = Vec::new();
    for e in events {
        let Some(tcs) = e["choices"][0]["delta"]["tool_calls"].as_array() else { continue };
        assert_eq!(tcs.len(), 1, "one call per chunk: {e}");
        let tc = &tcs[0];
        let i = tc["index"].as_u64().unwrap();
        order.push(i);
        let i = i as usize;
        if calls.len() <= i {
            calls.resize(i + 1, Default::default());
        }
        if let Some(id) = tc["id"].as_str() {
            calls[i].0.push_str(id);
        }
        if let Some(name) = tc["function"]["name"].as_str() {
            calls[i].1.push_str(name);
        }
        calls[i].2.push_str(tc["function"]["arguments"].as_str().unwrap());
    }
    (calls, order)
}

const PLAIN_BEFORE: &str = r#"{"choices":[{"finish_reason":"stop","index":0,"logprobs":null,"message":{"content":"Hello from the simulated NIM (key …0042)","role":"assistant"}}],"created":0,"id":"chatcmpl-sim-1","model":"meta/llama-3.1-8b-instruct","object":"chat.completion","usage":{"completion_tokens":7,"prompt_tokens":26,"total_tokens":33}}"#;

const STREAM_BEFORE: &str = r#"data: {"choices":[{"delta":{"content":"Hello","role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-2","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[{"delta":{"content":" from"},"finish_reason":null,"index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-2","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[{"delta":{"content":" the"},"finish_reason":null,"index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-2","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[{"delta":{"content":" simulated"},"finish_reason":null,"index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-2","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[{"delta":{"content":" NIM"},"finish_reason":null,"index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-2","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[{"delta":{"content":" (key"},"finish_reason":null,"index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-2","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[{"delta":{"content":" …0042)"},"finish_reason":null,"index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-2","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[{"delta":{"content":" [1]"},"finish_reason":null,"index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-2","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[{"delta":{},"finish_reason":"stop","index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-2","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: [DONE]

"#;

const STREAM_USAGE_BEFORE: &str = r#"data: {"choices":[{"delta":{"content":"Hello","role":"assistant"},"finish_reason":null,"index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-3","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[{"delta":{"content":" from"},"finish_reason":null,"index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-3","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[{"delta":{"content":" the"},"finish_reason":null,"index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-3","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[{"delta":{"content":" simulated"},"finish_reason":null,"index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-3","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[{"delta":{"content":" NIM"},"finish_reason":null,"index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-3","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[{"delta":{"content":" (key"},"finish_reason":null,"index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-3","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[{"delta":{"content":" …0042)"},"finish_reason":null,"index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-3","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[{"delta":{"content":" [1]"},"finish_reason":null,"index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-3","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[{"delta":{},"finish_reason":"stop","index":0,"logprobs":null}],"created":0,"id":"chatcmpl-sim-3","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk"}

data: {"choices":[],"created":0,"id":"chatcmpl-sim-3","model":"meta/llama-3.1-8b-instruct","object":"chat.completion.chunk","usage":{"completion_tokens":8,"prompt_tokens":36,"total_tokens":44}}

data: [DONE]

"#;

#[tokio::test]
async fn answers_without_the_new_features_are_unchanged() {
    bounded(async {
        // The literals were captured from the simulator before tool calls,
        // stop strings and content parts existed (`created` zeroed).
        let sim = SimServer::start(SimConfig::fast()).unwrap();
        let c = client();
        let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "stream": false});
        let (_, text) = post(&c, &sim, &body).await;
        assert_eq!(without_created(&text), PLAIN_BEFORE);
        let mut body = json!({"model": MODEL, "messages": [{"role": "user", "content": "hello there"}], "stream": true});
        let (_, text) = post(&c, &sim, &body).await;
        assert_eq!(without_created(&text), STREAM_BEFORE);
        body["stream_options"] = json!({"include_usage": true});
        let (_, text) = post(&c, &sim, &body).await;
        assert_eq!(without_created(&text), STREAM_USAGE_BEFORE);
    })
    .await;
}

#[tokio::test]
async fn one_tool_call_plain_and_streamed() {
    bounded(async {
        let interval = Duration::from_millis(25);
        let sim = SimServer::start(SimConfig::fast().with_stream(8, interval)).unwrap();
        let c = client();
        let mut req = user("read the readme");
        req["tools"] = tools();
        req["tool_choice"] = json!("auto");

        let v = plain(&c, &sim, req.clone()).await;
        assert_eq!(v["id"], "chatcmpl-sim-1");
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert!(choice.get("stop_reason").is_none());
        assert_eq!(
            choice["message"],
            json!({"role": "assistant", "content": null, "tool_calls": [{
                "id": "call_1_0", "type": "function",
                "function": {"name": "read_file", "arguments": "{\"path\":\"path value\"}"},
            }]})
        );
        // One per call plus one per argument piece.
        assert_eq!(v["usage"]["completion_tokens"], 4);

        let sent = Instant::now();
        let events = streamed(&c, &sim, req.clone()).await;
        let elapsed = sent.elapsed();
        // Role, header, 3 argument pieces, finish, usage.
        assert_eq!(events.len(), 7, "{events:#?}");
        assert_eq!(events[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        assert_eq!(
            events[1]["choices"][0]["delta"],
            json!({"tool_calls": [{"index": 0, "id": "call_2_0", "type": "function",
                                    "function": {"name": "read_file", "arguments": ""}}]})
        );
        for e in &events[2..5] {
            let tc = &e["choices"][0]["delta"]["tool_calls"][0];
            assert_eq!(tc.as_object().unwrap().len(), 2, "{tc}");
            assert_eq!(tc["index"], 0);
            assert!(!tc["function"]["arguments"].as_str().unwrap().is_empty());
        }
        for e in &events[..5] {
            assert!(e["choices"][0]["finish_reason"].is_null());
            assert_eq!(e["object"], "chat.completion.chunk");
        }
        assert_eq!(events[5]["choices"][0]["delta"], json!({}));
        assert_eq!(events[5]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(events[6]["choices"], json!([]));
        assert_eq!(events[6]["usage"]["completion_tokens"], 4);
        // Chunks spaced by the configured interval.
        assert!(elapsed >= interval * 4, "{elapsed:?}");

        let (calls, order) = reassemble(&events);
        assert_eq!(order, [0, 0, 0, 0]);
        let plain_call = &choice["message"]["tool_calls"][0]["function"];
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].1, plain_call["name"].as_str().unwrap());
        assert_eq!(calls[0].2, plain_call["arguments"].as_str().unwrap());
        let args: Value = serde_json::from_str(&calls[0].2).unwrap();
        assert_eq!(args, json!({"path": "path value"}));

        // `tool_choice` naming a function picks it.
        req["tool_choice"] = json!({"type": "function", "function": {"name": "list_dir"}});
        let v = plain(&c, &sim, req.clone()).await;
        let f = &v["choices"][0]["message"]["tool_calls"][0]["function"];
        assert_eq!(f["name"], "list_dir");
        assert_eq!(f["arguments"], "{\"depth\":1,\"recursive\":true}");
        // …and naming an unknown one is a 400.
        req["tool_choice"] = json!({"type": "function", "function": {"name": "nope"}});
        let (status, _) = post(&c, &sim, &req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    })
    .await;
}

#[tokio::test]
async fn two_parallel_calls_stream_interleaved() {
    bounded(async {
        let sim = SimServer::start(SimConfig::fast()).unwrap();
        let c = client();
        let mut req = json!({"model": MODEL, "tools": tools(), "messages": [
            {"role": "system", "content": "be quick"},
            {"role": "user", "content": [{"type": "text", "text": "Do both in parallel."}]},
        ]});
        let v = plain(&c, &sim, req.clone()).await;
        let calls = v["choices"][0]["message"]["tool_calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["id"], "call_1_0");
        assert_eq!(calls[1]["id"], "call_1_1");
        assert_eq!(calls[0]["function"]["name"], "read_file");
        assert_eq!(calls[1]["function"]["name"], "list_dir");
        assert_eq!(v["usage"]["completion_tokens"], 8);

        let events = streamed(&c, &sim, req.clone()).await;
        let (streamed_calls, order) = reassemble(&events);
        // Both headers first, then the argument pieces alternating.
        assert_eq!(order, [0, 1, 0, 1, 0, 1, 0, 1]);
        let headers: Vec<&Value> =
            events[1..3].iter().map(|e| &e["choices"][0]["delta"]["tool_calls"][0]).collect();
        assert_eq!(headers[0]["id"], "call_2_0");
        assert_eq!(headers[1]["id"], "call_2_1");
        assert_eq!(headers[0]["function"]["arguments"], "");
        assert_eq!(streamed_calls.len(), 2);
        for (i, (id, name, args)) in streamed_calls.iter().enumerate() {
            assert_eq!(id, &format!("call_2_{i}"));
            assert_eq!(name, calls[i]["function"]["name"].as_str().unwrap());
            assert_eq!(args, calls[i]["function"]["arguments"].as_str().unwrap());
            assert!(serde_json::from_str::<Value>(args).unwrap().is_object(), "{args}");
        }
        let last = &events[events.len() - 2];
        assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(events[events.len() - 1]["usage"]["completion_tokens"], 8);

        // A single tool is called twice; `parallel_tool_calls: false` keeps one call.
        req["tools"] = json!([tools()[0]]);
        let v = plain(&c, &sim, req.clone()).await;
        let names: Vec<&str> = v["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["function"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["read_file", "read_file"]);
        req["parallel_tool_calls"] = json!(false);
        let v = plain(&c, &sim, req).await;
        assert_eq!(v["choices"][0]["message"]["tool_calls"].as_array().unwrap().len(), 1);
    })
    .await;
}

#[tokio::test]
async fn a_tool_result_is_answered_with_text() {
    bounded(async {
        // 3 chunks: no filler words, so the streamed text equals the plain one.
        let sim = SimServer::start(SimConfig::fast().with_stream(3, Duration::ZERO)).unwrap();
        let c = client();
        let mut req = json!({"model": MODEL, "tools": tools(), "messages": [
            {"role": "user", "content": "read it"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1_0", "type": "function",
                "function": {"name": "read_file", "arguments": "{\"path\":\"path value\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1_0", "content": "sunny, 21 C"},
        ]});
        let v = plain(&c, &sim, req.clone()).await;
        assert_eq!(
            v["choices"][0]["message"],
            json!({"role": "assistant", "content": "Tool result: sunny, 21 C"})
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        assert!(v["choices"][0]["message"].get("tool_calls").is_none());

        let events = streamed(&c, &sim, req.clone()).await;
        assert_eq!(streamed_text(&events), "Tool result: sunny, 21 C");
        // 3 content chunks, finish, usage.
        assert_eq!(events.len(), 5);
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(events[2]["choices"][0]["delta"]["content"], " sunny, 21 C");
        assert_eq!(events[3]["choices"][0]["finish_reason"], "stop");
        assert_eq!(events[4]["usage"]["completion_tokens"], 3);

        // A result given as text parts.
        req["messages"][2]["content"] =
            json!([{"type": "text", "text": "line 1"}, {"type": "text", "text": ", line 2"}]);
        let v = plain(&c, &sim, req).await;
        assert_eq!(v["choices"][0]["message"]["content"], "Tool result: line 1, line 2");
    })
    .await;
}

#[tokio::test]
async fn stop_strings_cut_the_text_and_are_reported() {
    bounded(async {
        let sim = SimServer::start(SimConfig::fast()).unwrap();
        let c = client();
        let mut req = user("hello");
        // "simulated" starts before "NIM" in the greeting.
        req["stop"] = json!(["NIM", "simulated"]);
        let v = plain(&c, &sim, req.clone()).await;
        let choice = &v["choices"][0];
        assert_eq!(choice["message"]["content"], "Hello from the ");
        assert_eq!(choice["finish_reason"], "stop");
        assert_eq!(choice["stop_reason"], "simulated");
        assert_eq!(v["usage"]["completion_tokens"], 3);

        let events = streamed(&c, &sim, req.clone()).await;
        assert_eq!(streamed_text(&events), "Hello from the ");
        let finish = &events[events.len() - 2]["choices"][0];
        assert_eq!(finish["finish_reason"], "stop");
        assert_eq!(finish["stop_reason"], "simulated");
        assert_eq!(finish["delta"], json!({}));
        assert!(events[..events.len() - 2].iter().all(|e| e["choices"][0].get("stop_reason").is_none()));
        // "Hello", " from", " the", " " (what is left of " simulated").
        assert_eq!(events[events.len() - 1]["usage"]["completion_tokens"], 4);

        // A single string; a filler word of the stream can match too.
        req["stop"] = json!(" [1]");
        let v = plain(&c, &sim, req.clone()).await;
        assert!(v["choices"][0].get("stop_reason").is_none());
        assert_eq!(
            v["choices"][0]["message"]["content"],
            format!("Hello from the simulated NIM (key {})", mask_key(KEY))
        );
        let events = streamed(&c, &sim, req.clone()).await;
        assert_eq!(streamed_text(&events), format!("Hello from the simulated NIM (key {})", mask_key(KEY)));
        assert_eq!(events[events.len() - 2]["choices"][0]["stop_reason"], " [1]");

        // A match at the very start leaves one empty content chunk.
        req["stop"] = json!(["Hello"]);
        let events = streamed(&c, &sim, req.clone()).await;
        assert_eq!(events[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
        assert_eq!(events.len(), 3);
        assert_eq!(events[2]["usage"]["completion_tokens"], 0);

        // Not a string or a list of strings: 400.
        req["stop"] = json!(7);
        let (status, _) = post(&c, &sim, &req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    })
    .await;
}

#[tokio::test]
async fn image_parts_are_accepted_and_mentioned() {
    bounded(async {
        let sim = SimServer::start(SimConfig::fast().with_stream(3, Duration::ZERO)).unwrap();
        let c = client();
        let data_url = format!("data:image/png;base64,{}", "A".repeat(100_000));
        let req = json!({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": data_url}},
        ]}]});
        let greeting = format!("Hello from the simulated NIM (key {})", mask_key(KEY));
        let v = plain(&c, &sim, req.clone()).await;
        assert_eq!(v["choices"][0]["message"]["content"], format!("{greeting} [1 image]"));
        // The image counts 85 tokens, not its 100 kB of base64.
        let prompt = v["usage"]["prompt_tokens"].as_u64().unwrap();
        let mut sent = req.clone();
        sent["stream"] = json!(false);
        let rest = (sent.to_string().len() - data_url.len()) as u64 / 4;
        assert_eq!(prompt, rest + 85);
        let events = streamed(&c, &sim, req).await;
        assert!(streamed_text(&events).ends_with(" [1 image]"), "{}", streamed_text(&events));

        // Images in several messages are counted together.
        let req = json!({"model": MODEL, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
            {"role": "assistant", "content": "nice"},
            {"role": "user", "content": [{"type": "text", "text": "and"},
                                         {"type": "image_url", "image_url": {"url": "https://example.com/b.png", "detail": "low"}}]},
        ]});
        let v = plain(&c, &sim, req).await;
        assert_eq!(v["choices"][0]["message"]["content"], format!("{greeting} [2 images]"));
        // Text parts alone change nothing.
        let req = json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]});
        let v = plain(&c, &sim, req).await;
        assert_eq!(v["choices"][0]["message"]["content"], greeting);
    })
    .await;
}

#[tokio::test]
async fn tool_choice_none_and_other_roles_answer_text() {
    bounded(async {
        let sim = SimServer::start(SimConfig::fast()).unwrap();
        let c = client();
        let greeting = format!("Hello from the simulated NIM (key {})", mask_key(KEY));
        let mut req = user("use a tool in parallel");
        req["tools"] = tools();
        req["tool_choice"] = json!("none");
        let v = plain(&c, &sim, req.clone()).await;
        assert_eq!(v["choices"][0]["message"], json!({"role": "assistant", "content": greeting}));
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
        let events = streamed(&c, &sim, req.clone()).await;
        assert!(events.iter().all(|e| e["choices"][0]["delta"].get("tool_calls").is_none()));
        assert_eq!(events[events.len() - 2]["choices"][0]["finish_reason"], "stop");
        // The last message is not the user's: text.
        req["tool_choice"] = json!("required");
        req["messages"] =
            json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes?"}]);
        let v = plain(&c, &sim, req).await;
        assert_eq!(v["choices"][0]["message"]["content"], greeting);
    })
    .await;
}

#[tokio::test]
async fn received_bodies_can_be_read_back() {
    bounded(async {
        let c = client();
        // Default config: the last body only.
        let sim = SimServer::start(SimConfig::default()).unwrap();
        assert_eq!(sim.last_request_body(), None);
        let req = user("one");
        plain(&c, &sim, req.clone()).await;
        let mut sent = req.clone();
        sent["stream"] = json!(false);
        assert_eq!(sim.last_request_body(), Some(sent));
        assert!(sim.request_log().is_empty());

        // Fast config: nothing unless the request log is on.
        let sim = SimServer::start(SimConfig::fast()).unwrap();
        plain(&c, &sim, user("one")).await;
        assert_eq!(sim.last_request_body(), None);
        let sim = SimServer::start(SimConfig::fast().with_request_log(2)).unwrap();
        for text in ["one", "two", "three"] {
            plain(&c, &sim, user(text)).await;
        }
        let log = sim.request_log();
        let texts: Vec<&str> = log.iter().map(|b| b["messages"][0]["content"].as_str().unwrap()).collect();
        assert_eq!(texts, ["two", "three"]);
        assert_eq!(sim.last_request_body().unwrap()["messages"][0]["content"], "three");
        sim.reset_stats();
        assert!(sim.request_log().is_empty());
        assert_eq!(sim.last_request_body(), None);
    })
    .await;
}
