//! Chat completion → Messages response, as a table.

use proxypal_anthropic::{ErrorKind, TranslateError, from_chat};
use serde_json::{Value, json};

fn completion(message: Value, finish_reason: Value, extra_choice: Value) -> Value {
    let mut choice = json!({"index": 0, "message": message, "finish_reason": finish_reason});
    if let (Value::Object(c), Value::Object(e)) = (&mut choice, extra_choice) {
        c.extend(e);
    }
    json!({
        "id": "chatcmpl-abc123", "object": "chat.completion", "model": "meta/llama-3.3-70b-instruct",
        "choices": [choice], "usage": {"prompt_tokens": 57, "completion_tokens": 12, "total_tokens": 69}
    })
}

fn message(content: Value, stop_reason: &str, stop_sequence: Value) -> Value {
    json!({
        "id": "msg_abc123", "type": "message", "role": "assistant", "model": "claude-haiku-4-5",
        "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
        "usage": {"input_tokens": 57, "output_tokens": 12}
    })
}

#[test]
fn response_translation_table() {
    let text = json!({"role": "assistant", "content": "Hello!"});
    let hello = json!([{"type": "text", "text": "Hello!"}]);
    let calls = json!({"role": "assistant", "content": null, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
        {"id": "call_2", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Rome\"}"}}
    ]});
    let call_blocks = json!([
        {"type": "tool_use", "id": "call_1", "name": "weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_2", "name": "weather", "input": {"city": "Rome"}}
    ]);
    let table: Vec<(&str, Value, Value)> = vec![
        (
            "text, stop",
            completion(text.clone(), json!("stop"), json!({})),
            message(hello.clone(), "end_turn", json!(null)),
        ),
        (
            "length",
            completion(text.clone(), json!("length"), json!({})),
            message(hello.clone(), "max_tokens", json!(null)),
        ),
        (
            "content_filter",
            completion(text.clone(), json!("content_filter"), json!({})),
            message(hello.clone(), "refusal", json!(null)),
        ),
        (
            "no finish_reason",
            completion(text.clone(), json!(null), json!({})),
            message(hello.clone(), "end_turn", json!(null)),
        ),
        (
            "unknown finish_reason",
            completion(text.clone(), json!("eos"), json!({})),
            message(hello.clone(), "end_turn", json!(null)),
        ),
        (
            "stop with vLLM's matched stop string",
            completion(text.clone(), json!("stop"), json!({"stop_reason": "END"})),
            message(hello.clone(), "stop_sequence", json!("END")),
        ),
        (
            "stop with SGLang's matched_stop",
            completion(text.clone(), json!("stop"), json!({"matched_stop": "###"})),
            message(hello.clone(), "stop_sequence", json!("###")),
        ),
        (
            "stop with an EOS token id is an end_turn",
            completion(text.clone(), json!("stop"), json!({"stop_reason": 128009})),
            message(hello.clone(), "end_turn", json!(null)),
        ),
        (
            "tool calls",
            completion(calls.clone(), json!("tool_calls"), json!({})),
            message(call_blocks.clone(), "tool_use", json!(null)),
        ),
        (
            "tool calls said to stop are tool_use",
            completion(calls.clone(), json!("stop"), json!({})),
            message(call_blocks.clone(), "tool_use", json!(null)),
        ),
        (
            "text then tool calls",
            completion(
                json!({"role": "assistant", "content": "Let me check.", "tool_calls": [
                    {"id": "call_9", "type": "function", "function": {"name": "ls", "arguments": ""}}
                ]}),
                json!("tool_calls"),
                json!({}),
            ),
            message(
                json!([{"type": "text", "text": "Let me check."}, {"type": "tool_use", "id": "call_9", "name": "ls", "input": {}}]),
                "tool_use",
                json!(null),
            ),
        ),
        (
            "invalid JSON arguments become a best-effort object; a missing id is made",
            completion(
                json!({"role": "assistant", "content": "", "tool_calls": [
                    {"type": "function", "function": {"name": "edit", "arguments": "{\"path\": \"a.rs\", \"old\": "}}
                ]}),
                json!("tool_calls"),
                json!({}),
            ),
            message(
                json!([{"type": "tool_use", "id": "toolu_abc123_0", "name": "edit", "input": {"_raw": "{\"path\": \"a.rs\", \"old\": "}}]),
                "tool_use",
                json!(null),
            ),
        ),
        (
            "legacy function_call",
            completion(
                json!({"role": "assistant", "content": null, "function_call": {"name": "now", "arguments": "{}"}}),
                json!("function_call"),
                json!({}),
            ),
            message(
                json!([{"type": "tool_use", "id": "toolu_abc123_0", "name": "now", "input": {}}]),
                "tool_use",
                json!(null),
            ),
        ),
        (
            "content as text parts; empty content is no block",
            completion(
                json!({"role": "assistant", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo!"}]}),
                json!("stop"),
                json!({}),
            ),
            message(hello.clone(), "end_turn", json!(null)),
        ),
        (
            "whitespace-only text is no block",
            completion(
                json!({"role": "assistant", "content": "\n\n", "tool_calls": [
                    {"id": "call_9", "type": "function", "function": {"name": "ls", "arguments": "{}"}}
                ]}),
                json!("tool_calls"),
                json!({}),
            ),
            message(
                json!([{"type": "tool_use", "id": "call_9", "name": "ls", "input": {}}]),
                "tool_use",
                json!(null),
            ),
        ),
        (
            "empty answer",
            completion(json!({"role": "assistant", "content": ""}), json!("stop"), json!({})),
            message(json!([]), "end_turn", json!(null)),
        ),
    ];
    for (name, upstream, want) in table {
        let got = from_chat(&serde_json::to_vec(&upstream).unwrap(), "claude-haiku-4-5")
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(serde_json::to_value(&got).unwrap(), want, "{name}");
    }
}

#[test]
fn usage_and_ids() {
    let got = from_chat(br#"{"choices":[{"message":{"content":"x"},"finish_reason":"stop"}]}"#, "m").unwrap();
    assert!(got.id.starts_with("msg_proxypal"), "{}", got.id);
    assert_eq!((got.usage.input_tokens, got.usage.output_tokens), (0, 0));
    let got = from_chat(
        br#"{"id":"cmpl-1","choices":[{"message":{"content":"x"}}],"usage":{"prompt_tokens":3,"completion_tokens":null}}"#,
        "m",
    )
    .unwrap();
    assert_eq!((got.id.as_str(), got.usage.input_tokens, got.usage.output_tokens), ("msg_cmpl-1", 3, 0));
}

#[test]
fn unreadable_answers_are_errors() {
    let error = from_chat(b"<html>", "m").unwrap_err();
    assert!(matches!(error, TranslateError::InvalidResponse { .. }), "{error}");
    let error = from_chat(br#"{"id":"x","choices":[]}"#, "m").unwrap_err();
    assert_eq!(error.to_string(), "upstream answer is not a chat completion: no choices");
    assert_eq!(error.to_api_error().kind, ErrorKind::Api);
    let error = from_chat(br#"{"error":{"message":"Too many requests","code":"rate_limit_exceeded"}}"#, "m")
        .unwrap_err();
    assert_eq!(
        error,
        TranslateError::Upstream { kind: ErrorKind::RateLimit, message: "Too many requests".into() }
    );
}
