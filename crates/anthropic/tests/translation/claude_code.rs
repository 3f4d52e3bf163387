//! A recorded Claude Code-style request (system blocks with `cache_control`,
//! five tools with nested schemas, a long history of tool rounds: parallel
//! calls, a failed edit, a list result, an image result, thinking) translated
//! without loss. The expectations are read from the raw JSON, not through the
//! crate's types.

use proxypal_anthropic::{MessagesRequest, Options, estimate_tokens, to_chat};
use serde_json::Value;

const FIXTURE: &str = include_str!("../fixtures/claude_code_request.json");

fn texts_of(content: &Value, out: &mut Vec<String>) {
    match content {
        Value::String(s) => out.push(s.clone()),
        Value::Array(blocks) => {
            for block in blocks {
                if let Some(text) = block.get("text").and_then(Value::as_str) {
                    out.push(text.to_owned());
                }
                if let Some(inner) = block.get("content") {
                    texts_of(inner, out);
                }
            }
        }
        _ => {}
    }
}

#[test]
fn claude_code_request_translates_without_loss() {
    let raw: Value = serde_json::from_str(FIXTURE).unwrap();
    let request = MessagesRequest::from_slice(FIXTURE.as_bytes()).unwrap();
    assert!(estimate_tokens(&request) > 3_000, "a long request estimates long");
    let translation = to_chat(request, &Options::new().with_stream_usage(true)).unwrap();
    let chat = serde_json::to_value(&translation.chat).unwrap();
    let messages = chat["messages"].as_array().unwrap();

    // Only what Claude Code sends that chat completions cannot carry.
    let dropped: Vec<String> = translation.dropped.iter().map(ToString::to_string).collect();
    assert_eq!(dropped, ["messages[5].content[0] (thinking)", "metadata"]);

    // Scalars and the stream.
    assert_eq!(chat["model"], "claude-sonnet-4-5-20250929");
    assert_eq!(chat["max_tokens"], 32000);
    assert_eq!(chat["temperature"], 1.0);
    assert_eq!(chat["stream"], true);
    assert_eq!(chat["stream_options"]["include_usage"], true);

    // Every tool, its schema unchanged.
    let tools = raw["tools"].as_array().unwrap();
    assert_eq!(chat["tools"].as_array().unwrap().len(), tools.len());
    for (tool, got) in tools.iter().zip(chat["tools"].as_array().unwrap()) {
        assert_eq!(got["type"], "function");
        assert_eq!(got["function"]["name"], tool["name"]);
        assert_eq!(got["function"]["description"], tool["description"]);
        assert_eq!(got["function"]["parameters"], tool["input_schema"]);
    }

    // The system prompt first, its blocks joined in order.
    let system: Vec<&str> =
        raw["system"].as_array().unwrap().iter().map(|b| b["text"].as_str().unwrap()).collect();
    assert_eq!(messages[0]["role"], "system");
    assert_eq!(messages[0]["content"], system.join("\n\n"));

    // Every tool_use: an assistant tool call with its id, name and input,
    // answered by exactly one tool message before the next assistant turn.
    let mut uses = 0;
    for message in raw["messages"].as_array().unwrap() {
        for block in message["content"].as_array().into_iter().flatten() {
            if block["type"] != "tool_use" {
                continue;
            }
            uses += 1;
            let id = block["id"].as_str().unwrap();
            let (at, call) = messages
                .iter()
                .enumerate()
                .find_map(|(i, m)| {
                    let calls = m.get("tool_calls")?.as_array()?;
                    calls.iter().find(|c| c["id"] == id).map(|c| (i, c))
                })
                .unwrap_or_else(|| panic!("tool call {id} is missing"));
            assert_eq!(messages[at]["role"], "assistant");
            assert_eq!(call["function"]["name"], block["name"]);
            let arguments: Value =
                serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
            assert_eq!(arguments, block["input"], "{id} input");
            let next_assistant = messages[at + 1..]
                .iter()
                .position(|m| m["role"] == "assistant")
                .map_or(messages.len(), |p| at + 1 + p);
            let answers = messages[at + 1..next_assistant]
                .iter()
                .filter(|m| m["role"] == "tool" && m["tool_call_id"] == id)
                .count();
            assert_eq!(answers, 1, "{id} is answered once, in its turn");
            // Tool messages come right after their assistant message.
            assert!(
                messages[at + 1..next_assistant]
                    .iter()
                    .take_while(|m| m["role"] == "tool")
                    .any(|m| m["tool_call_id"] == id)
            );
        }
    }
    assert_eq!(uses, 9);
    let tool_messages = messages.iter().filter(|m| m["role"] == "tool").count();
    assert_eq!(tool_messages, uses);

    // Every text of the request is somewhere in the chat messages.
    let all_chat_text: String = messages
        .iter()
        .map(|m| match &m["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => {
                parts.iter().filter_map(|p| p["text"].as_str()).collect::<Vec<_>>().join("\n")
            }
            _ => String::new(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let mut texts = Vec::new();
    for message in raw["messages"].as_array().unwrap() {
        texts_of(&message["content"], &mut texts);
    }
    assert!(texts.len() > 15);
    for text in &texts {
        assert!(all_chat_text.contains(text.as_str()), "text lost: {text:?}");
    }

    // The failed edit reads as an error; the image result reaches the model.
    let failed = messages.iter().find(|m| m["tool_call_id"] == "toolu_04MultiEditMultiEdit0001").unwrap();
    assert!(failed["content"].as_str().unwrap().starts_with("Error: <tool_use_error>"));
    let images: Vec<&Value> = messages
        .iter()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|p| p["type"] == "image_url")
        .collect();
    assert_eq!(images.len(), 1);
    assert!(images[0]["image_url"]["url"].as_str().unwrap().starts_with("data:image/png;base64,iVBORw0KGgo"));

    // The roles alternate as chat upstreams expect: no user message between
    // an assistant's tool calls and their tool messages.
    for (i, m) in messages.iter().enumerate() {
        if m["role"] == "tool" {
            let before = &messages[i - 1];
            assert!(
                before["role"] == "tool" || before.get("tool_calls").is_some(),
                "tool message {i} follows its call"
            );
        }
    }

    // It serializes, and reads back the same.
    let body = serde_json::to_vec(&translation.chat).unwrap();
    let back: proxypal_anthropic::ChatRequest = serde_json::from_slice(&body).unwrap();
    assert_eq!(back, translation.chat);
}
