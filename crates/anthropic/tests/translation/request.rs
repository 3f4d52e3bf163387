//! Messages request → chat request, as a table: each case a Messages body,
//! the options, the exact chat body expected and what is reported dropped.

use proxypal_anthropic::{MessagesRequest, Options, TranslateError, to_chat};
use serde_json::{Value, json};

struct Case {
    name: &'static str,
    request: Value,
    options: Options,
    chat: Value,
    dropped: &'static [&'static str],
}

fn base(extra: Value) -> Value {
    let mut request = json!({"model": "claude-sonnet-4-5", "max_tokens": 100});
    let (Value::Object(r), Value::Object(e)) = (&mut request, extra) else { panic!("objects") };
    r.extend(e);
    request
}

fn chat(extra: Value) -> Value {
    let mut chat = json!({"model": "claude-sonnet-4-5", "max_tokens": 100});
    let (Value::Object(c), Value::Object(e)) = (&mut chat, extra) else { panic!("objects") };
    c.extend(e);
    chat
}

fn user(text: &str) -> Value {
    json!({"role": "user", "content": text})
}

fn cases() -> Vec<Case> {
    let d = Options::new();
    let weather = json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
    let weather_tool = json!({"name": "weather", "description": "Weather now", "input_schema": weather});
    let chat_weather = json!({"type": "function", "function": {"name": "weather", "description": "Weather now", "parameters": weather}});
    vec![
        Case {
            name: "system string",
            request: base(json!({"system": "Be brief.", "messages": [user("hi")]})),
            options: d,
            chat: chat(json!({"messages": [{"role": "system", "content": "Be brief."}, user("hi")]})),
            dropped: &[],
        },
        Case {
            name: "system blocks with cache_control, joined by a blank line",
            request: base(json!({"system": [
                {"type": "text", "text": "You are Claude Code."},
                {"type": "text", "text": "Use tools.", "cache_control": {"type": "ephemeral"}}
            ], "messages": [user("hi")]})),
            options: d,
            chat: chat(json!({"messages": [
                {"role": "system", "content": "You are Claude Code.\n\nUse tools."}, user("hi")
            ]})),
            dropped: &[],
        },
        Case {
            name: "empty system left out",
            request: base(json!({"system": "", "messages": [user("hi")]})),
            options: d,
            chat: chat(json!({"messages": [user("hi")]})),
            dropped: &[],
        },
        Case {
            name: "text blocks of a user message become one string",
            request: base(json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>x</system-reminder>"},
                {"type": "text", "text": "fix the bug", "cache_control": {"type": "ephemeral"}}
            ]}]})),
            options: d,
            chat: chat(json!({"messages": [user("<system-reminder>x</system-reminder>\n\nfix the bug")]})),
            dropped: &[],
        },
        Case {
            name: "images base64 and URL become parts, in order",
            request: base(json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "compare"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/b.jpg"}}
            ]}]})),
            options: d,
            chat: chat(json!({"messages": [{"role": "user", "content": [
                {"type": "text", "text": "compare"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "image_url", "image_url": {"url": "https://example.com/b.jpg"}}
            ]}]})),
            dropped: &[],
        },
        Case {
            name: "assistant text and tool_use become content and tool_calls",
            request: base(json!({"messages": [
                user("weather in Paris and Rome?"),
                {"role": "assistant", "content": [
                    {"type": "text", "text": "Checking."},
                    {"type": "tool_use", "id": "toolu_01", "name": "weather", "input": {"city": "Paris"}},
                    {"type": "tool_use", "id": "toolu_02", "name": "weather", "input": {"city": "Rome"}}
                ]}
            ]})),
            options: d,
            chat: chat(json!({"messages": [
                user("weather in Paris and Rome?"),
                {"role": "assistant", "content": "Checking.", "tool_calls": [
                    {"id": "toolu_01", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}},
                    {"id": "toolu_02", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Rome\"}"}}
                ]}
            ]})),
            dropped: &[],
        },
        Case {
            name: "assistant with only tool_use has null content; empty input is {}",
            request: base(json!({"messages": [
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "now", "input": {}}]}
            ]})),
            options: d,
            chat: chat(json!({"messages": [
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "t1", "type": "function", "function": {"name": "now", "arguments": "{}"}}
                ]}
            ]})),
            dropped: &[],
        },
        Case {
            name: "tool results before the user's text, order and ids kept, errors and lists",
            request: base(json!({"messages": [{"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "18°C"},
                {"type": "text", "text": "and tomorrow?"},
                {"type": "tool_result", "tool_use_id": "toolu_02", "is_error": true, "content": "city not found"},
                {"type": "tool_result", "tool_use_id": "toolu_03", "content": [
                    {"type": "text", "text": "line 1"}, {"type": "text", "text": "line 2"}
                ]},
                {"type": "tool_result", "tool_use_id": "toolu_04", "is_error": true},
                {"type": "tool_result", "tool_use_id": "toolu_05"}
            ]}]})),
            options: d,
            chat: chat(json!({"messages": [
                {"role": "tool", "tool_call_id": "toolu_01", "content": "18°C"},
                {"role": "tool", "tool_call_id": "toolu_02", "content": "Error: city not found"},
                {"role": "tool", "tool_call_id": "toolu_03", "content": "line 1\n\nline 2"},
                {"role": "tool", "tool_call_id": "toolu_04", "content": "Error"},
                {"role": "tool", "tool_call_id": "toolu_05", "content": ""},
                user("and tomorrow?")
            ]})),
            dropped: &[],
        },
        Case {
            name: "an image in a tool result goes to the next user message",
            request: base(json!({"messages": [{"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_09", "content": [
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/"}}
                ]},
                {"type": "text", "text": "what is it?"}
            ]}]})),
            options: d,
            chat: chat(json!({"messages": [
                {"role": "tool", "tool_call_id": "toolu_09", "content": "(image sent in the next message)"},
                {"role": "user", "content": [
                    {"type": "text", "text": "(image from tool call toolu_09)"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}},
                    {"type": "text", "text": "what is it?"}
                ]}
            ]})),
            dropped: &[],
        },
        Case {
            name: "tools, tool_choice auto",
            request: base(
                json!({"messages": [user("hi")], "tools": [weather_tool], "tool_choice": {"type": "auto"}}),
            ),
            options: d,
            chat: chat(json!({"messages": [user("hi")], "tools": [chat_weather], "tool_choice": "auto"})),
            dropped: &[],
        },
        Case {
            name: "tool_choice any is required",
            request: base(
                json!({"messages": [user("hi")], "tools": [weather_tool], "tool_choice": {"type": "any"}}),
            ),
            options: d,
            chat: chat(json!({"messages": [user("hi")], "tools": [chat_weather], "tool_choice": "required"})),
            dropped: &[],
        },
        Case {
            name: "tool_choice tool names the function; disable_parallel_tool_use",
            request: base(json!({"messages": [user("hi")], "tools": [weather_tool],
                "tool_choice": {"type": "tool", "name": "weather", "disable_parallel_tool_use": true}})),
            options: d,
            chat: chat(json!({"messages": [user("hi")], "tools": [chat_weather],
                "tool_choice": {"type": "function", "function": {"name": "weather"}}, "parallel_tool_calls": false})),
            dropped: &[],
        },
        Case {
            name: "tool_choice none",
            request: base(
                json!({"messages": [user("hi")], "tools": [weather_tool], "tool_choice": {"type": "none"}}),
            ),
            options: d,
            chat: chat(json!({"messages": [user("hi")], "tools": [chat_weather], "tool_choice": "none"})),
            dropped: &[],
        },
        Case {
            name: "disable_parallel_tool_use dropped where parallel_tool_calls is rejected",
            request: base(json!({"messages": [user("hi")], "tools": [weather_tool],
                "tool_choice": {"type": "auto", "disable_parallel_tool_use": true}})),
            options: Options::new().with_parallel_tool_calls(false),
            chat: chat(json!({"messages": [user("hi")], "tools": [chat_weather], "tool_choice": "auto"})),
            dropped: &["tool_choice.disable_parallel_tool_use"],
        },
        Case {
            name: "tool_choice without tools dropped",
            request: base(json!({"messages": [user("hi")], "tool_choice": {"type": "any"}})),
            options: d,
            chat: chat(json!({"messages": [user("hi")]})),
            dropped: &["tool_choice"],
        },
        Case {
            name: "Anthropic's own tools dropped, client tools kept (without a schema: an empty one)",
            request: base(json!({"messages": [user("hi")], "tools": [
                {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
                {"type": "custom", "name": "noop"}
            ]})),
            options: d,
            chat: chat(json!({"messages": [user("hi")], "tools": [
                {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}
            ]})),
            dropped: &["tools: web_search (web_search_20250305)"],
        },
        Case {
            name: "sampling and stop_sequences",
            request: base(json!({"messages": [user("count")], "temperature": 0.2, "top_p": 0.9,
                "stop_sequences": ["\n\nHuman:", "END"]})),
            options: d,
            chat: chat(json!({"messages": [user("count")], "temperature": 0.2, "top_p": 0.9,
                "stop": ["\n\nHuman:", "END"]})),
            dropped: &[],
        },
        Case {
            name: "empty stop_sequences left out; no max_tokens (count_tokens-like) passes",
            request: json!({"model": "m", "messages": [user("x")], "stop_sequences": []}),
            options: d,
            chat: json!({"model": "m", "messages": [user("x")]}),
            dropped: &[],
        },
        Case {
            name: "stream without usage",
            request: base(json!({"messages": [user("hi")], "stream": true})),
            options: d,
            chat: chat(json!({"messages": [user("hi")], "stream": true})),
            dropped: &[],
        },
        Case {
            name: "stream with usage where the provider accepts it",
            request: base(json!({"messages": [user("hi")], "stream": true})),
            options: Options::new().with_stream_usage(true),
            chat: chat(
                json!({"messages": [user("hi")], "stream": true, "stream_options": {"include_usage": true}}),
            ),
            dropped: &[],
        },
        Case {
            name: "stream false left out",
            request: base(json!({"messages": [user("hi")], "stream": false})),
            options: Options::new().with_stream_usage(true),
            chat: chat(json!({"messages": [user("hi")]})),
            dropped: &[],
        },
        Case {
            name: "top_k, metadata, thinking and unknown fields dropped and reported",
            request: base(json!({"messages": [user("hi")], "top_k": 40,
                "metadata": {"user_id": "user_abc_account__session_1"},
                "thinking": {"type": "enabled", "budget_tokens": 10000},
                "service_tier": "auto", "container": null})),
            options: d,
            chat: chat(json!({"messages": [user("hi")]})),
            dropped: &["top_k", "metadata", "thinking", "container", "service_tier"],
        },
        Case {
            name: "top_k, metadata and thinking mapped where the provider supports them",
            request: base(json!({"messages": [user("hi")], "top_k": 40,
                "metadata": {"user_id": "user_abc"},
                "thinking": {"type": "enabled", "budget_tokens": 10000}})),
            options: Options::new().with_top_k(true).with_user(true).with_reasoning_effort(true),
            chat: chat(
                json!({"messages": [user("hi")], "top_k": 40, "user": "user_abc", "reasoning_effort": "medium"}),
            ),
            dropped: &[],
        },
        Case {
            name: "thinking disabled and empty metadata lose nothing",
            request: base(
                json!({"messages": [user("hi")], "thinking": {"type": "disabled"}, "metadata": {}}),
            ),
            options: d,
            chat: chat(json!({"messages": [user("hi")]})),
            dropped: &[],
        },
        Case {
            name: "thinking blocks dropped; a message of only thinking left out",
            request: base(json!({"messages": [
                user("think"),
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                    {"type": "text", "text": "42"}
                ]},
                {"role": "assistant", "content": [{"type": "redacted_thinking", "data": "xx"}]}
            ]})),
            options: d,
            chat: chat(json!({"messages": [user("think"), {"role": "assistant", "content": "42"}]})),
            dropped: &["messages[1].content[0] (thinking)", "messages[2].content[0] (redacted_thinking)"],
        },
    ]
}

#[test]
fn request_translation_table() {
    for case in cases() {
        let request: MessagesRequest = serde_json::from_value(case.request.clone())
            .unwrap_or_else(|e| panic!("{}: request does not parse: {e}", case.name));
        let translation = to_chat(request, &case.options).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let got = serde_json::to_value(&translation.chat).unwrap();
        assert_eq!(got, case.chat, "{}", case.name);
        let dropped: Vec<String> = translation.dropped.iter().map(ToString::to_string).collect();
        assert_eq!(dropped, case.dropped, "{}", case.name);
    }
}

#[test]
fn thinking_budgets_map_to_efforts() {
    for (budget, effort) in
        [(1024, "low"), (4000, "low"), (10000, "medium"), (16384, "high"), (31999, "high")]
    {
        let request: MessagesRequest = serde_json::from_value(base(json!({
            "messages": [user("x")], "thinking": {"type": "enabled", "budget_tokens": budget}
        })))
        .unwrap();
        let t = to_chat(request, &Options::new().with_reasoning_effort(true)).unwrap();
        assert_eq!(t.chat.reasoning_effort.as_deref(), Some(effort), "budget {budget}");
    }
}

#[test]
fn misplaced_and_unknown_blocks_are_errors_that_say_where() {
    let table: [(Value, &str); 5] = [
        (
            json!([{"role": "user", "content": [{"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "x"}}]}]),
            "messages[0].content[0]: content block type `document` is not supported by this gateway",
        ),
        (
            json!([user("a"), {"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]),
            "invalid Messages request: messages[1].content[0]: not allowed in a user message (tool_use blocks are the assistant's)",
        ),
        (
            json!([{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]),
            "invalid Messages request: messages[0].content[0]: not allowed in an assistant message (image and tool_result blocks are user content)",
        ),
        (
            json!([{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "search_result"}]}]}]),
            "messages[0].content[0].content[0]: content block type `search_result` is not supported by this gateway",
        ),
        (
            json!([{"role": "user", "content": [{"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}]}]),
            "messages[0].content[0]: content block type `server_tool_use` is not supported by this gateway",
        ),
    ];
    for (messages, message) in table {
        let request: MessagesRequest = serde_json::from_value(base(json!({"messages": messages}))).unwrap();
        let error = to_chat(request, &Options::new()).unwrap_err();
        assert_eq!(error.to_string(), message);
        assert_eq!(error.to_api_error().kind.as_str(), "invalid_request_error");
    }

    let request: MessagesRequest = serde_json::from_value(base(json!({
        "system": [{"type": "image", "source": {"type": "url", "url": "u"}}], "messages": []
    })))
    .unwrap();
    let error = to_chat(request, &Options::new()).unwrap_err();
    assert!(matches!(error, TranslateError::InvalidRequest { .. }), "{error}");
    assert_eq!(
        error.to_string(),
        "invalid Messages request: system[0]: only text blocks may be in the system prompt, not `image`"
    );
}

#[test]
fn bad_bodies_are_invalid_requests() {
    for body in [&b"not json"[..], br#"{"messages":[]}"#, br#"{"model":"m","messages":[{"role":"user"}]}"#] {
        let error = MessagesRequest::from_slice(body).unwrap_err();
        assert!(matches!(error, TranslateError::InvalidRequest { .. }), "{error}");
    }
}
